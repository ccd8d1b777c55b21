"""BatchNorm2d suite (ResNet-50 shapes), affine, in both memory layouts, training and eval.

Rows: batch_norm (training: batch statistics, then normalize) and batch_norm_eval (the running
statistics: one scale-and-shift pass), each also as *_cl for channels_last inputs. Training rows
keep no running buffers (track_running_stats=False), so every implementation does the same work
on every call."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..harness import Case, pick_shapes
from .group_norm import channel_cases

NORM = "batch_norm"
EPS = 1e-5


def default_shapes(device: str, full: bool) -> List[Tuple[int, int, int, int]]:
    """(N, C, H, W) of ResNet-50's BatchNorm inputs; DRAM-sized on CPU (51 MB in fp32)."""
    if device == "cpu":
        shapes = [(16, 256, 56, 56), (64, 1024, 14, 14)]
        if full:
            shapes += [(16, 64, 112, 112), (64, 2048, 7, 7)]
        return shapes
    shapes = [(64, 256, 56, 56), (256, 1024, 14, 14)]
    if full:
        shapes += [(128, 512, 28, 28), (256, 2048, 7, 7), (64, 64, 112, 112), (256, 256, 56, 56), (128, 128, 56, 56)]
    return shapes


def _running_stats():
    """Fixed running statistics per (device, dtype, C), made on first use."""
    cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def get(x: torch.Tensor):
        key = (x.device, x.dtype, x.size(1))
        if key not in cache:
            g = torch.Generator(device="cpu").manual_seed(0)
            mean = 0.1 * torch.randn(x.size(1), generator=g)
            var = 1.0 + 0.1 * torch.rand(x.size(1), generator=g)
            cache[key] = (mean.to(x.device, x.dtype), var.to(x.device, x.dtype))
        return cache[key]

    return get


def peers():
    """Apex's BatchNorm kernels are SyncBatchNorm-only; no peer here."""
    return []


def cases(device: str, full: bool, dtypes: Sequence[torch.dtype],
          shapes: Optional[Sequence[Tuple[int, ...]]] = None) -> List[Case]:
    """Training and eval BatchNorm2d cases, NCHW and channels_last (4-D --shapes replace the defaults)."""
    import fusenorm

    stats = _running_stats()
    all_shapes = pick_shapes(shapes, 4, default_shapes(device, full))
    train = channel_cases(NORM, all_shapes, dtypes,
                          lambda x, w, b: fusenorm.batch_norm(x, None, None, w, b, True, 0.1, EPS),
                          lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.1, EPS))
    # eval: one shape with --quick, every shape with --full
    eval_shapes = all_shapes if full else all_shapes[:1]
    evals = channel_cases(NORM + "_eval", eval_shapes, dtypes,
                          lambda x, w, b: fusenorm.batch_norm(x, *stats(x), w, b, False, 0.1, EPS),
                          lambda x, w, b: F.batch_norm(x, *stats(x), w, b, False, 0.1, EPS))
    return train + evals


__all__ = ["NORM", "cases", "peers"]
