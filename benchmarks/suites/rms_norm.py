"""RMSNorm suite: y = x * rsqrt(mean(x^2) + eps) * weight over the last dim (weight only)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..harness import Case, NormFn, Peer, default_shapes, pick_shapes

NORM = "rms_norm"
EPS = 1e-6  # LLaMA's value; passed explicitly to every implementation


def _make_inputs(shape: Tuple[int, int], dtype: torch.dtype):
    hidden = shape[-1]

    def make(device: str) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        x = torch.randn(shape, device=device, dtype=torch.float32).mul_(2.0).to(dtype)
        w = (1.0 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
        return x, (w,)

    return make


def _module_peer(mod: torch.nn.Module) -> NormFn:
    """Call a third-party nn.Module with *our* weight tensor (so its grad flows to it)."""

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(mod, {"weight": w}, (x,))

    return fn


def _liger(case: Case, device: str) -> NormFn:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm  # type: ignore

    mod = LigerRMSNorm(case.shape[-1], eps=EPS).to(device, case.dtype)
    if hasattr(mod, "in_place"):
        mod.in_place = False  # in-place backward would overwrite our reused dy
    return _module_peer(mod)


def _apex(case: Case, device: str) -> NormFn:
    from apex.normalization import FusedRMSNorm  # type: ignore

    return _module_peer(FusedRMSNorm(case.shape[-1], eps=EPS).to(device, case.dtype))


def _quack(case: Case, device: str) -> NormFn:
    import quack  # type: ignore

    rmsnorm = getattr(quack, "rmsnorm", None)
    if rmsnorm is None:
        from quack.rmsnorm import rmsnorm  # type: ignore

    return lambda x, w: rmsnorm(x, w, eps=EPS)


def peers() -> List[Peer]:
    """Optional GPU peers for RMSNorm."""
    return [
        Peer("liger", "liger_kernel.transformers.rms_norm", _liger),
        Peer("apex", "apex.normalization", _apex),
        Peer("quack", "quack", _quack),
    ]


def cases(device: str, full: bool, dtypes: Sequence[torch.dtype],
          shapes: Optional[Sequence[Tuple[int, int]]] = None) -> List[Case]:
    """All RMSNorm cases for this device / size class."""
    import fusenorm

    out = []
    for shape in pick_shapes(shapes, 2, default_shapes(device, full)):
        ns = (shape[-1],)
        for dtype in dtypes:
            out.append(Case(
                norm=NORM, shape=tuple(shape), normalized_shape=ns, dtype=dtype, n_params=1,
                make_inputs=_make_inputs(tuple(shape), dtype),
                fusenorm=lambda x, w, ns=ns: fusenorm.rms_norm(x, ns, w, EPS),
                torch_fn=lambda x, w, ns=ns: F.rms_norm(x, ns, w, EPS),
                peers=peers(),
            ))
    return out


__all__ = ["NORM", "EPS", "cases", "peers"]
