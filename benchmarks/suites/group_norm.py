"""GroupNorm + SiLU suite (the diffusion-UNet block), in both memory layouts.

Rows are named group_norm+silu (NCHW) and group_norm+silu_cl (channels_last); torch.nn's peer is
F.silu(F.group_norm(x)), two kernels where fusenorm runs one."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..harness import Case, pick_shapes

NORM = "group_norm+silu"
GROUPS = 32
EPS = 1e-5


def default_shapes(device: str, full: bool) -> List[Tuple[int, int, int, int]]:
    """Stable-Diffusion UNet GroupNorm inputs (N, C, H, W); DRAM-sized on CPU."""
    if device == "cpu":  # 42 MB each in fp32: over twice a 32 MB L3 with the output
        shapes = [(8, 320, 64, 64), (32, 1280, 16, 16)]
        if full:
            shapes += [(8, 640, 32, 32), (16, 320, 32, 32)]
        return shapes
    shapes = [(2, 320, 64, 64), (16, 320, 64, 64), (8, 640, 32, 32)]
    if full:
        shapes += [(16, 1280, 32, 32), (2, 640, 32, 32), (16, 640, 64, 64), (2, 1280, 16, 16), (16, 1280, 16, 16)]
    return shapes


def channel_inputs(shape, dtype: torch.dtype, channels_last: bool):
    """x: [N, C, H, W] (channels_last if asked), weight and bias: [C]."""

    def make(device: str):
        x = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        c = shape[1]
        w = (1.0 + 0.1 * torch.randn(c, device=device)).to(dtype)
        b = (0.1 * torch.randn(c, device=device)).to(dtype)
        return x, (w, b)

    return make


def channel_cases(norm: str, shapes, dtypes: Sequence[torch.dtype], ours, theirs) -> List[Case]:
    """One case per shape, layout (NCHW, then channels_last as norm + "_cl") and dtype."""
    out = []
    for shape in shapes:
        for channels_last in (False, True):
            for dtype in dtypes:
                out.append(Case(
                    norm=norm + ("_cl" if channels_last else ""), shape=tuple(shape), normalized_shape=(shape[1],),
                    dtype=dtype, n_params=2, make_inputs=channel_inputs(shape, dtype, channels_last),
                    fusenorm=ours, torch_fn=theirs,
                ))
    return out


def peers():
    """No third-party GroupNorm+SiLU training kernel to compare with."""
    return []


def cases(device: str, full: bool, dtypes: Sequence[torch.dtype],
          shapes: Optional[Sequence[Tuple[int, ...]]] = None) -> List[Case]:
    """GroupNorm(32)+SiLU cases, NCHW and channels_last (4-D --shapes replace the defaults)."""
    import fusenorm

    return channel_cases(NORM, pick_shapes(shapes, 4, default_shapes(device, full)), dtypes,
                         lambda x, w, b: fusenorm.group_norm(x, GROUPS, w, b, EPS, activation="silu"),
                         lambda x, w, b: F.silu(F.group_norm(x, GROUPS, w, b, EPS)))


__all__ = ["NORM", "cases", "channel_cases", "channel_inputs", "peers"]
