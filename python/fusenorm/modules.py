"""Drop-in modules: subclasses of the torch.nn classes that override only forward, so the
constructor, defaults, parameters, state_dict keys, reset_parameters and extra_repr are torch's."""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from . import functional as F


def _fx_leaf(module: torch.nn.Module, input: torch.fx.Proxy, *args, **kwargs) -> torch.fx.Proxy:
    """Under torch.fx symbolic tracing (the input a Proxy): one call_module node for module, as fx
    records torch.nn's own norm layers, which it keeps as leaves (it traces into other modules,
    and Python control flow on the input fails there)."""
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if not path:
        raise RuntimeError(f"fusenorm.{type(module).__name__} cannot be the root of torch.fx.symbolic_trace: "
                           "trace a module that contains it (it is then one call_module node)")
    return tracer.create_proxy("call_module", path, (input,) + args, kwargs)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by fusenorm's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return _fx_leaf(self, input)
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by fusenorm's kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
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
        if isinstance(input, torch.fx.Proxy):
            return _fx_leaf(self, input)
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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return _fx_leaf(self, input)
        return super().forward(input)

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


class _BatchNormMixin:
    """torch's _BatchNorm.forward with fusenorm's kernels, plus the keyword activation=None |
    "relu" and an optional residual: forward(input, residual=None) = act(bn(input) + residual).
    With momentum=None the cumulative-average factor stays a tensor on the device (torch reads
    num_batches_tracked back to the host for it)."""

    activation = None

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        F._bn_activation_name(activation)
        self.activation = activation

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return _fx_leaf(self, input) if residual is None else _fx_leaf(self, input, residual)
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / self.num_batches_tracked.double()  # fp64: exact for fp64 buffers
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats  # buffers passed only when used
        return self._normalize(input, residual, self.running_mean if keep else None,
                               self.running_var if keep else None, bn_training, momentum)

    def _normalize(self, input, residual, running_mean, running_var, bn_training, momentum):
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, momentum,
                            self.eps, activation=self.activation, residual=residual)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by fusenorm's kernels."""


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by fusenorm's kernels, in the input's memory format."""


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by fusenorm's kernels, in the input's memory format."""


class SyncBatchNorm(_BatchNormMixin, torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm computed by fusenorm's kernels, over any torch.distributed backend
    (gloo on CPU, tested; NCCL on GPU, untested): the ranks' (count, mean, M2) are merged with one all-gather in the
    forward, and the two per-channel gradient sums with one all-reduce in the backward. Ranks may
    hold different batch sizes, an empty one included. Same state_dict as torch.nn.SyncBatchNorm.
    BatchNorm's epilogue (activation="relu", a residual) works while syncing too."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        super()._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if self.training and self.track_running_stats and self.num_batches_tracked is None:
            # torch.nn.SyncBatchNorm's check (track_running_stats switched on after construction)
            raise AssertionError("num_batches_tracked must not be None")

    def _normalize(self, input, residual, running_mean, running_var, bn_training, momentum):
        group = self.process_group or (torch.distributed.group.WORLD if torch.distributed.is_available() else None)
        need_sync = (bn_training and self.training and torch.distributed.is_available()
                     and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1)
        if not need_sync:
            return super()._normalize(input, residual, running_mean, running_var, bn_training, momentum)
        return F.sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, momentum, self.eps,
                                 group, activation=self.activation, residual=residual)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Every BatchNorm*d layer of module replaced by a fusenorm.SyncBatchNorm sharing its
        parameters and buffers (torch.nn.SyncBatchNorm.convert_sync_batchnorm's rules)."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            out.activation = getattr(module, "activation", None)
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return out


def _sign_init(cls: type) -> None:
    """cls.__init__ (a mixin's: torch's arguments through *args/**kwargs, plus activation) as a
    function of cls's own whose signature, for inspect, is torch's plus the keyword activation:
    torch.nn.utils.skip_init, for one, looks there for a device parameter."""
    inner = cls.__init__

    def __init__(self, *args, **kwargs):
        inner(self, *args, **kwargs)

    base = next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn"))
    sig = inspect.signature(base.__init__)
    act = inspect.Parameter("activation", inspect.Parameter.KEYWORD_ONLY, default=None)
    __init__.__signature__ = sig.replace(parameters=[*sig.parameters.values(), act])
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = __init__


for _cls in (GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, BatchNorm1d, BatchNorm2d, BatchNorm3d,
             SyncBatchNorm):
    _sign_init(_cls)


_SWAPS = {
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.GroupNorm: GroupNorm,
    torch.nn.InstanceNorm1d: InstanceNorm1d,
    torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.SyncBatchNorm: SyncBatchNorm,
}


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Replace, in place and recursively, every torch.nn norm layer that fusenorm covers with its
    fusenorm twin (same parameters and buffers, shared, not copied); a lazy one (LazyBatchNorm2d,
    ...) becomes the twin when its first forward materializes it. Returns the module."""
    cls = _SWAPS.get(type(module))
    if cls is not None:
        module.__class__ = cls
        return module
    # a lazy norm becomes its class's cls_to_become (torch's twin) on its first forward
    lazy = isinstance(module, torch.nn.modules.lazy.LazyModuleMixin)
    cls = _SWAPS.get(module.cls_to_become) if lazy else None
    if cls is not None:
        module.cls_to_become = cls
        return module
    for child in module.children():
        convert(child)
    return module

