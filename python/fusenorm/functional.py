"""Functional API with the signatures of torch.nn.functional, backed by torch.ops.fusenorm.*.

The autograd Functions call only fusenorm ops (which have fake kernels), so
torch.compile(fullgraph=True) traces them without a graph break and keeps our kernels.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from . import _ops  # noqa: F401  (ops + fakes)

_ShapeT = Union[int, Sequence[int], torch.Size]


def _as_shape(normalized_shape: _ShapeT) -> List[int]:
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return [int(s) for s in normalized_shape]


_LN_FWD = torch.ops.fusenorm.layer_norm_fwd.default
_RMS_FWD = torch.ops.fusenorm.rms_norm_fwd.default
_GN_FWD = torch.ops.fusenorm.group_norm_fwd.default

ACTIVATIONS = (None, "silu", "gelu", "relu")


def _autocast_fp32(x: torch.Tensor, *params: Optional[torch.Tensor]):
    """torch's CUDA autocast runs layer_norm in fp32 (and casts nothing on CPU). rms_norm is not
    cast: torch returns the input's dtype under autocast, computing in fp32 inside, as we do."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        cast = lambda t: t.float() if t is not None and t.is_floating_point() else t  # noqa: E731
        return (cast(x),) + tuple(cast(p) for p in params)
    return (x,) + params


def _need(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.requires_grad


def _or_none(t: torch.Tensor, want: bool) -> Optional[torch.Tensor]:
    return t if want else None


def _grad_mask(ctx, weight, bias, w_index: int, b_index: int) -> list:
    """[dx, dweight, dbias] wanted: weight/bias are the forward's inputs w_index / b_index."""
    return [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[w_index],
            bias is not None and ctx.needs_input_grad[b_index]]


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        y, mean, rstd = torch.ops.fusenorm.layer_norm_fwd(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.normalized_shape = normalized_shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias, 2, 3)
        dx, dw, db = torch.ops.fusenorm.layer_norm_bwd(
            dy, x, mean, rstd, ctx.normalized_shape, weight, bias, mask
        )
        return _or_none(dx, mask[0]), None, _or_none(dw, mask[1]), _or_none(db, mask[2]), None


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        y, rstd = torch.ops.fusenorm.rms_norm_fwd(x, normalized_shape, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        ctx.normalized_shape = normalized_shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2]]
        dx, dw = torch.ops.fusenorm.rms_norm_bwd(dy, x, rstd, ctx.normalized_shape, weight, mask)
        return _or_none(dx, mask[0]), None, _or_none(dw, mask[1]), None


def layer_norm(
    input: torch.Tensor,
    normalized_shape: _ShapeT,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the trailing dims. input: [*, *normalized_shape]; weight, bias: normalized_shape."""
    x, weight, bias = _autocast_fp32(input, weight, bias)
    shape = _as_shape(normalized_shape)
    if torch.is_grad_enabled() and (x.requires_grad or _need(weight) or _need(bias)):
        return LayerNormFunction.apply(x, shape, weight, bias, float(eps))
    return _LN_FWD(x, shape, weight, bias, float(eps))[0]


def rms_norm(
    input: torch.Tensor,
    normalized_shape: _ShapeT,
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """RMSNorm over the trailing dims. input: [*, *normalized_shape]; weight: normalized_shape.

    eps=None uses the machine epsilon of the computation type (fp32 for half types), as torch does."""
    x = input
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    shape = _as_shape(normalized_shape)
    if torch.is_grad_enabled() and (x.requires_grad or _need(weight)):
        return RMSNormFunction.apply(x, shape, weight, float(eps))
    return _RMS_FWD(x, shape, weight, float(eps))[0]



class GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, activation):
        y, mean, rstd = torch.ops.fusenorm.group_norm_fwd(x, num_groups, weight, bias, eps, activation)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.num_groups, ctx.activation = num_groups, activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias, 2, 3)
        dx, dw, db = torch.ops.fusenorm.group_norm_bwd(
            dy, x, mean, rstd, ctx.num_groups, weight, bias, ctx.activation, mask
        )
        return _or_none(dx, mask[0]), None, _or_none(dw, mask[1]), _or_none(db, mask[2]), None, None


def _activation_name(activation: Optional[str]) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fusenorm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation or "none"


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """GroupNorm over [N, C, *] (contiguous or channels-last, kept in the output), then the optional
    activation ("silu", "gelu" (exact), "relu") in the same pass. weight, bias: [C]."""
    act = _activation_name(activation)
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    torch.nn.functional._verify_batch_size(
        [input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:])
    )
    x, weight, bias = _autocast_fp32(input, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or _need(weight) or _need(bias)):
        return GroupNormFunction.apply(x, int(num_groups), weight, bias, float(eps), act)
    return _GN_FWD(x, int(num_groups), weight, bias, float(eps), act)[0]


_ACT_FNS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu}


def instance_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """InstanceNorm over [N, C, *] (contiguous or channels-last, kept in the output): GroupNorm with
    one group per channel. With use_input_stats and running buffers, updates them in place as
    torch.nn does (mean over the batch of the per-instance mean and unbiased variance, weighted by
    momentum). Without use_input_stats, normalizes with the running statistics."""
    act = _activation_name(activation)
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
        # eval with running statistics: one scale-and-shift per channel (torch elementwise ops)
        shape = [1, input.size(1)] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(running_var.float() + eps)
        if weight is not None:
            scale = scale * weight.float()
        shift = -running_mean.float() * scale
        if bias is not None:
            shift = shift + bias.float()
        y = torch.addcmul(shift.view(shape), input, scale.view(shape)).to(input.dtype)
        return _ACT_FNS[act](y) if activation else y
    torch.nn.functional._verify_spatial_size(input.size())
    x, weight, bias = _autocast_fp32(input, weight, bias)
    c = x.size(1)
    if running_mean is None and running_var is None:
        return group_norm(x, c, weight, bias, eps, activation=activation)
    if torch.is_grad_enabled() and (x.requires_grad or _need(weight) or _need(bias)):
        y, mean, rstd = InstanceNormStatsFunction.apply(x, weight, bias, float(eps), act)
    else:
        y, mean, rstd = _GN_FWD(x, c, weight, bias, float(eps), act)
    with torch.no_grad():
        n = x.numel() // max(1, x.size(0) * c)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.mean(0).to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            var = (1.0 / rstd.double() ** 2 - eps).clamp_min(0) * (n / (n - 1))  # unbiased, per instance
            running_var.mul_(1 - momentum).add_(var.mean(0).to(running_var.dtype), alpha=momentum)
    return y


class InstanceNormStatsFunction(torch.autograd.Function):
    """GroupNorm with one group per channel that also returns the statistics (not differentiable),
    for the running-statistics update."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, activation):
        y, mean, rstd = torch.ops.fusenorm.group_norm_fwd(x, x.size(1), weight, bias, eps, activation)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.activation = activation
        ctx.mark_non_differentiable(mean, rstd)
        return y, mean, rstd

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias, 1, 2)
        dx, dw, db = torch.ops.fusenorm.group_norm_bwd(dy, x, mean, rstd, x.size(1), weight, bias, ctx.activation,
                                                       mask)
        return _or_none(dx, mask[0]), _or_none(dw, mask[1]), _or_none(db, mask[2]), None, None
