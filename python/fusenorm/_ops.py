"""Fake (meta) kernels for every fusenorm op: shapes and dtypes only, never data."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _C  # noqa: F401  (registers the ops)


def _same_device(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> None:
    """torch's check that every tensor argument is on x's device. These fakes are also the ops'
    Meta kernels, which the dispatcher picks when any argument is a meta tensor (say, a weight
    never loaded into a model built on the meta device): without it a CPU input would get an
    uninitialized output."""
    for t in tensors:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"Tensor on device {t.device} is not on the expected device {x.device}!")


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _lead(x: torch.Tensor, normalized_shape: Sequence[int]) -> list:
    return list(x.shape[: x.dim() - len(normalized_shape)])


def _masked(want: bool, like: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if want and like is not None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return x.new_empty((0,))


@torch.library.register_fake("fusenorm::layer_norm_fwd")
def _layer_norm_fwd_fake(x, normalized_shape, weight, bias, eps):
    _same_device(x, weight, bias)
    lead = _lead(x, normalized_shape)
    stat = x.new_empty(lead, dtype=_stat_dtype(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stat, stat.clone()


@torch.library.register_fake("fusenorm::layer_norm_bwd")
def _layer_norm_bwd_fake(dy, x, mean, rstd, normalized_shape, weight, bias, output_mask):
    _same_device(x, dy, mean, rstd, weight, bias)
    return (
        _masked(output_mask[0], x, x),
        _masked(output_mask[1], weight, x),
        _masked(output_mask[2], bias, x),
    )


@torch.library.register_fake("fusenorm::rms_norm_fwd")
def _rms_norm_fwd_fake(x, normalized_shape, weight, eps):
    _same_device(x, weight)
    lead = _lead(x, normalized_shape)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(lead, dtype=_stat_dtype(x))


@torch.library.register_fake("fusenorm::rms_norm_bwd")
def _rms_norm_bwd_fake(dy, x, rstd, normalized_shape, weight, output_mask):
    _same_device(x, dy, rstd, weight)
    return _masked(output_mask[0], x, x), _masked(output_mask[1], weight, x)


def _channel_layout_like(x: torch.Tensor) -> torch.Tensor:
    """The layout the GroupNorm and BatchNorm ops compute in (and return): x's own when it is
    contiguous or channels-last-like ([N, C, *] stored as [N, *, C]), else contiguous."""
    if x.is_contiguous():
        return torch.empty_like(x)
    if x.dim() >= 3 and x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fusenorm::group_norm_fwd")
def _group_norm_fwd_fake(x, num_groups, weight, bias, eps, activation="none"):
    _same_device(x, weight, bias)
    stat = x.new_empty((x.shape[0], num_groups), dtype=_stat_dtype(x))
    return _channel_layout_like(x), stat, stat.clone()


@torch.library.register_fake("fusenorm::group_norm_bwd")
def _group_norm_bwd_fake(dy, x, mean, rstd, num_groups, weight, bias, y, activation, output_mask):
    _same_device(x, dy, mean, rstd, weight, bias, y)
    dx = _channel_layout_like(x) if output_mask[0] else x.new_empty((0,))
    return dx, _masked(output_mask[1], weight, x), _masked(output_mask[2], bias, x)


@torch.library.register_fake("fusenorm::batch_norm_fwd")
def _batch_norm_fwd_fake(x, weight, bias, residual, eps, activation="none"):
    _same_device(x, weight, bias, residual)
    stat = x.new_empty((x.shape[1],), dtype=_stat_dtype(x))
    return _channel_layout_like(x), stat, stat.clone()


@torch.library.register_fake("fusenorm::batch_norm_stats")
def _batch_norm_stats_fake(x):
    stat = x.new_empty((x.shape[1],), dtype=_stat_dtype(x))
    return stat, stat.clone()


@torch.library.register_fake("fusenorm::batch_norm_update_running")
def _batch_norm_update_running_fake(running_mean, running_var, mean, var, momentum, unbias):
    _same_device(running_mean, running_var, mean, var)


@torch.library.register_fake("fusenorm::batch_norm_apply")
def _batch_norm_apply_fake(x, mean, var, weight, bias, residual, eps, activation="none"):
    _same_device(x, mean, var, weight, bias, residual)
    return _channel_layout_like(x)


@torch.library.register_fake("fusenorm::batch_norm_bwd")
def _batch_norm_bwd_fake(dy, x, mean, var, weight, y, eps, training, activation, output_mask):
    _same_device(x, dy, mean, var, weight, y)
    dx = _channel_layout_like(x) if output_mask[0] else x.new_empty((0,))
    dw = weight.new_empty(weight.shape) if output_mask[1] and weight is not None else x.new_empty((0,))
    db_dtype = weight.dtype if weight is not None else _stat_dtype(x)
    db = x.new_empty((x.shape[1],), dtype=db_dtype) if output_mask[2] else x.new_empty((0,))
    dz = _channel_layout_like(x) if output_mask[3] and activation == "relu" else x.new_empty((0,))
    return dx, dw, db, dz


@torch.library.register_fake("fusenorm::batch_norm_bwd_reduce")
def _batch_norm_bwd_reduce_fake(dy, x, mean, var, eps):
    _same_device(x, dy, mean, var)
    stat = x.new_empty((x.shape[1],), dtype=_stat_dtype(x))
    return stat, stat.clone()


@torch.library.register_fake("fusenorm::batch_norm_bwd_elemt")
def _batch_norm_bwd_elemt_fake(dy, x, mean, var, weight, mean_dy, mean_dy_xhat, eps):
    _same_device(x, dy, mean, var, weight, mean_dy, mean_dy_xhat)
    return _channel_layout_like(x)
