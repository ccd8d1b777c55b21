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


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by fusenorm's kernels, in the input's memory format.

    Takes torch.nn.GroupNorm's arguments, plus the keyword activation=None | "silu" | "gelu" |
    "relu", applied to the output in the same pass (GroupNorm + SiLU of diffusion UNets)."""

    activation = None  # also for modules converted from torch.nn.GroupNorm

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        F._activation_name(activation)
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")


_SWAPS = {torch.nn.LayerNorm: LayerNorm, torch.nn.RMSNorm: RMSNorm, torch.nn.GroupNorm: GroupNorm}


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
