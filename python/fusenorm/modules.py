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


class _InstanceNormMixin:
    """torch's _InstanceNorm.forward (input checks, unbatched inputs) with fusenorm's kernels for
    the normalization itself, plus the keyword activation=None | "silu" | "gelu" | "relu"."""

    activation = None

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        F._activation_name(activation)
        self.activation = activation

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps, activation=self.activation,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by fusenorm's kernels."""


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by fusenorm's kernels, in the input's memory format."""


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by fusenorm's kernels, in the input's memory format."""


_SWAPS = {
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.GroupNorm: GroupNorm,
    torch.nn.InstanceNorm1d: InstanceNorm1d,
    torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
}


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
