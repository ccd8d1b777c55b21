"""Drop-in modules: subclasses of the torch.nn classes that override only forward, so the
constructor, defaults, parameters, state_dict keys, reset_parameters and extra_repr are torch's."""
from __future__ import annotations

import torch

from . import functional as F


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by fusenorm's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by fusenorm's kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


_SWAPS = {torch.nn.LayerNorm: LayerNorm, torch.nn.RMSNorm: RMSNorm}


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Replace, in place and recursively, every torch.nn norm layer that fusenorm covers with its
    fusenorm twin (same parameters and buffers, shared, not copied). Returns the module."""
    cls = _SWAPS.get(type(module))
    if cls is not None:
        module.__class__ = cls
        return module
    for child in module.children():
        convert(child)
    return module
