"""InstanceNorm2d suite (style-transfer networks), affine, in both memory layouts.

Rows are named instance_norm (NCHW) and instance_norm_cl (channels_last)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..harness import Case, pick_shapes
from .group_norm import channel_cases

NORM = "instance_norm"
EPS = 1e-5


def default_shapes(device: str, full: bool) -> List[Tuple[int, int, int, int]]:
    """(N, C, H, W) of fast-style-transfer / CycleGAN generators; DRAM-sized on CPU."""
    if device == "cpu":
        shapes = [(16, 64, 128, 128)]  # 67 MB in fp32
        if full:
            shapes += [(8, 128, 64, 64), (2, 32, 256, 256), (16, 256, 32, 32)]
        return shapes
    shapes = [(16, 64, 256, 256)]
    if full:
        shapes += [(16, 128, 128, 128), (16, 256, 64, 64), (1, 32, 512, 512), (4, 64, 256, 256)]
    return shapes


def peers():
    """No third-party InstanceNorm kernel to compare with."""
    return []


def cases(device: str, full: bool, dtypes: Sequence[torch.dtype],
          shapes: Optional[Sequence[Tuple[int, ...]]] = None) -> List[Case]:
    """Affine InstanceNorm2d cases, NCHW and channels_last (4-D --shapes replace the defaults)."""
    import fusenorm

    return channel_cases(NORM, pick_shapes(shapes, 4, default_shapes(device, full)), dtypes,
                         lambda x, w, b: fusenorm.instance_norm(x, weight=w, bias=b, eps=EPS),
                         lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=EPS))


__all__ = ["NORM", "cases", "peers"]
