"""LayerNorm suite: y = (x - mean) * rstd * weight + bias over the last dim (weight + bias)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..harness import Case, NormFn, Peer, default_shapes, pick_shapes

NORM = "layer_norm"
EPS = 1e-5


def _make_inputs(shape: Tuple[int, int], dtype: torch.dtype):
    hidden = shape[-1]

    def make(device: str) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        x = torch.randn(shape, device=device, dtype=torch.float32).mul_(2.0).add_(0.5).to(dtype)
        w = (1.0 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
        b = (0.1 * torch.randn(hidden, device=device)).to(dtype)
        return x, (w, b)

    return make


def _module_peer(module_ctor, hidden: int) -> NormFn:
    """Call a third-party nn.Module with *our* weight/bias tensors (so grads flow to them)."""
    mod = module_ctor(hidden)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(mod, {"weight": w, "bias": b}, (x,))

    return fn


def _liger(case: Case, device: str) -> NormFn:
    from liger_kernel.transformers.layer_norm import LigerLayerNorm  # type: ignore

    return _module_peer(lambda h: LigerLayerNorm(h, eps=EPS).to(device, case.dtype), case.shape[-1])


def _apex(case: Case, device: str) -> NormFn:
    from apex.normalization import FusedLayerNorm  # type: ignore

    return _module_peer(lambda h: FusedLayerNorm(h, eps=EPS).to(device, case.dtype), case.shape[-1])


def peers() -> List[Peer]:
    """Optional GPU peers for LayerNorm."""
    return [
        Peer("liger", "liger_kernel.transformers.layer_norm", _liger),
        Peer("apex", "apex.normalization", _apex),
    ]


def cases(device: str, full: bool, dtypes: Sequence[torch.dtype],
          shapes: Optional[Sequence[Tuple[int, int]]] = None) -> List[Case]:
    """All LayerNorm cases for this device / size class."""
    import fusenorm

    out = []
    for shape in pick_shapes(shapes, 2, default_shapes(device, full)):
        ns = (shape[-1],)
        for dtype in dtypes:
            out.append(Case(
                norm=NORM, shape=tuple(shape), normalized_shape=ns, dtype=dtype, n_params=2,
                make_inputs=_make_inputs(tuple(shape), dtype),
                fusenorm=lambda x, w, b, ns=ns: fusenorm.layer_norm(x, ns, w, b, EPS),
                torch_fn=lambda x, w, b, ns=ns: F.layer_norm(x, ns, w, b, EPS),
                peers=peers(),
            ))
    return out


__all__ = ["NORM", "EPS", "cases", "peers"]
