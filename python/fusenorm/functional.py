"""Functional API with the signatures of torch.nn.functional, backed by torch.ops.fusenorm.*.

The autograd Functions call only fusenorm ops (which have fake kernels), so
torch.compile(fullgraph=True) traces them without a graph break and keeps our kernels.

Higher-order and forward-mode derivatives: the backward ops have no derivative of their own, so a
backward run with create_graph=True (a gradient penalty, gradgradcheck) computes its gradients from
torch's own composite of the same norm (torch.nn.functional), which is differentiable again; and
under forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) or the other torch.func
transforms, the functions here call that composite instead of the kernels, as they do inside
torch.onnx.export (ONNX has no form of our ops). First-order training and inference always run the
kernels.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from . import _ops  # noqa: F401  (ops + fakes)
from ._ops import _stat_dtype

F = torch.nn.functional

_ShapeT = Union[int, Sequence[int], torch.Size]


def _as_shape(normalized_shape: _ShapeT, op: str) -> List[int]:
    """normalized_shape as torch's argument parser takes it: a list or tuple (torch.Size) of integers
    (Python's, numpy's, 0-d integer tensors; not bools); anything else, a bare int included (torch's
    modules take one, its functions do not), is its TypeError."""
    head = f"{op}(): argument 'normalized_shape' (position 2) must be tuple of ints"
    if not isinstance(normalized_shape, (list, tuple)):
        raise TypeError(f"{head}, not {_type_name(normalized_shape)}")
    for i, d in enumerate(normalized_shape):
        if type(d) is not int and not _int_like(d):
            raise TypeError(f"{head}, but found element of type {_type_name(d)} at pos {i}")
    return list(normalized_shape)


def _type_name(v) -> str:
    """A value's type as torch's messages name it (the C type name: "numpy.int64", "Tensor", "str")."""
    t = type(v)
    heap = t.__flags__ & (1 << 9)  # Py_TPFLAGS_HEAPTYPE: a class defined in Python, named plainly
    return t.__name__ if heap or t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _int_like(d) -> bool:
    """An integer as torch's int arguments take it, other than a Python int: a numpy integer or a
    0-d integer tensor (not a bool)."""
    if isinstance(d, torch.Tensor):
        return d.dim() == 0 and not d.is_floating_point() and not d.is_complex() and d.dtype != torch.bool
    if isinstance(d, bool):
        return False
    return isinstance(d, int) or (type(d).__module__ == "numpy" and getattr(d, "dtype", None) is not None
                                  and d.dtype.kind in "iu")


def _check_tensor_args(op: str, *args) -> None:
    """torch's TypeError for a non-tensor argument: args are (name, position, value, optional)."""
    for name, pos, v, optional in args:
        if not isinstance(v, torch.Tensor) and not (optional and v is None):
            raise TypeError(f"{op}(): argument '{name}' (position {pos}) must be Tensor, not {_type_name(v)}")


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


_HALF = (torch.float16, torch.bfloat16)


_forward_ad = torch.autograd.forward_ad
_is_compiling = torch.compiler.is_compiling
_functorch_level = torch._C._functorch.maybe_current_level
_is_exporting = torch.compiler.is_exporting


def _reference() -> bool:
    """True under forward-mode AD or a torch.func transform (grad, jvp, vmap), which the kernels'
    autograd Functions do not support, and inside torch.onnx.export, whose graphs hold only ONNX's
    operators: the caller then runs torch's composite of the same norm. Inside torch.compile too:
    Dynamo guards on the forward-AD level and traces the functorch query. (The functions it calls
    are module globals: each attribute lookup cost ~0.05 us a call.)"""
    if _forward_ad._current_level >= 0:
        return True
    if _is_compiling():  # Dynamo traces this query (not maybe_current_level)
        return torch._C._are_functorch_transforms_active() or (_is_exporting() and _onnx_exporting())
    return _functorch_level() is not None or _onnx_exporting()



def _onnx_flag_holders():
    """The modules whose globals torch.onnx.export sets while it runs: its torch.export-based
    exporter's flag and its TorchScript exporter's GLOBALS (None where this torch has them
    elsewhere). Read directly: Dynamo replaces torch.onnx.is_in_onnx_export() by False, which
    left our ops in the exporter's strict capture, and the function imports both each call."""
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:
        _flags = None
    try:
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        try:
            from torch.onnx._globals import GLOBALS
        except ImportError:
            GLOBALS = None
    if GLOBALS is not None and not hasattr(GLOBALS, "_in_onnx_export"):
        GLOBALS = None
    return _flags, GLOBALS


_ONNX_FLAGS, _ONNX_GLOBALS = _onnx_flag_holders()


def _onnx_exporting() -> bool:
    """torch.onnx.export is running (either exporter), in any thread: the flags are the process's.
    GLOBALS' plain attribute, not its property, which Dynamo refuses to trace (strict torch.export
    of any module failed on it)."""
    if _ONNX_FLAGS is None or _ONNX_GLOBALS is None:
        return torch.onnx.is_in_onnx_export()
    return _ONNX_FLAGS._is_onnx_exporting or _ONNX_GLOBALS._in_onnx_export


def _double_backward(fn, dy: torch.Tensor, inputs: list, want: list) -> list:
    """The gradients of fn(*inputs) (torch's differentiable composite of the forward, run on the
    saved inputs, which keep their history) for dy, with a graph (backward under create_graph=True).
    Half types are computed in fp32. None where not wanted."""
    half = inputs[0].dtype in _HALF
    up = [t.float() if half and t is not None and t.is_floating_point() else t for t in inputs]
    y = fn(*up)
    sel = [i for i, w in enumerate(want) if w]
    grads = torch.autograd.grad(y, [up[i] for i in sel], dy.to(y.dtype), create_graph=True, allow_unused=True)
    out = [None] * len(want)
    for i, g in zip(sel, grads):
        out[i] = torch.zeros_like(inputs[i]) if g is None else g.to(inputs[i].dtype)
    return out


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        y, mean, rstd = torch.ops.fusenorm.layer_norm_fwd(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.normalized_shape, ctx.eps = normalized_shape, eps
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:  # y's gradient undefined: none for the inputs either (torch's nodes' rule)
            return None, None, None, None, None
        x, mean, rstd, weight, bias = ctx.saved_tensors
        mask = _grad_mask(ctx, weight, bias, 2, 3)
        if torch.is_grad_enabled():  # create_graph=True
            shape = ctx.normalized_shape

            def fn(a, w, b):  # the bias added apart: torch's double backward misses it when w is None
                y = F.layer_norm(a, shape, w, None, ctx.eps)
                return y if b is None else y + b

            dx, dw, db = _double_backward(fn, dy, [x, weight, bias], mask)
            return dx, None, dw, db, None
        dx, dw, db = torch.ops.fusenorm.layer_norm_bwd(
            dy, x, mean, rstd, ctx.normalized_shape, weight, bias, mask
        )
        return _or_none(dx, mask[0]), None, _or_none(dw, mask[1]), _or_none(db, mask[2]), None


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        y, rstd = torch.ops.fusenorm.rms_norm_fwd(x, normalized_shape, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        ctx.normalized_shape, ctx.eps = normalized_shape, eps
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None
        x, rstd, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2]]
        if torch.is_grad_enabled():  # create_graph=True
            shape = ctx.normalized_shape
            dx, dw = _double_backward(lambda a, w: F.rms_norm(a, shape, w, ctx.eps), dy, [x, weight], mask)
            return dx, None, dw, None
        dx, dw = torch.ops.fusenorm.rms_norm_bwd(dy, x, rstd, ctx.normalized_shape, weight, mask)
        fmt = _channels_last_format(x) if mask[0] else None  # without dx wanted, dx is a placeholder
        if fmt is not None:
            dx = dx.contiguous(memory_format=fmt)
        return _or_none(dx, mask[0]), None, _or_none(dw, mask[1]), None


def layer_norm(
    input: torch.Tensor,
    normalized_shape: _ShapeT,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the trailing dims. input: [*, *normalized_shape]; weight, bias: normalized_shape."""
    _check_tensor_args("layer_norm", ("input", 1, input, False), ("weight", 3, weight, True), ("bias", 4, bias, True))
    x, weight, bias = _autocast_fp32(input, weight, bias) if input.is_cuda else (input, weight, bias)
    shape = _as_shape(normalized_shape, "layer_norm")
    _float_arg(eps, "layer_norm", "eps", 5)
    if _reference():
        return F.layer_norm(x, shape, weight, bias, eps)
    if (torch.is_grad_enabled() and (x.requires_grad or _need(weight) or _need(bias))) or _jit_tracing():
        return LayerNormFunction.apply(x, shape, weight, bias, float(eps))
    return _LN_FWD(x, shape, weight, bias, float(eps))[0]


_EPS32, _EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def _channels_last_format(x: torch.Tensor):
    """channels_last(_3d) where x is stored so and not also contiguous, else None: torch's rms_norm
    keeps that format in its output and input gradient (its layer_norm does not)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def rms_norm(
    input: torch.Tensor,
    normalized_shape: _ShapeT,
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """RMSNorm over the trailing dims. input: [*, *normalized_shape]; weight: normalized_shape.

    eps=None uses the machine epsilon of the computation type (fp32 for half types), as torch does."""
    _check_tensor_args("rms_norm", ("input", 1, input, False), ("weight", 3, weight, True))
    x = input
    if x.is_complex():  # torch's composite takes complex inputs; the kernels are real
        return F.rms_norm(x, normalized_shape, weight, eps)
    if eps is not None:
        _float_arg(eps, "rms_norm", "eps", 4)
    if eps is None:
        eps = _EPS64 if x.dtype == torch.float64 else _EPS32
    shape = _as_shape(normalized_shape, "rms_norm")
    if len(shape) > x.dim():
        raise ValueError(f"Input tensor must have at least {len(shape)} dimensions, but got {x.dim()}")
    if weight is not None and weight.is_complex():  # torch's composite takes it, as complex inputs
        return F.rms_norm(x, shape, weight, eps)
    if weight is not None and x.is_floating_point():
        # torch accepts any weight dtype (integer and bool too) and returns x's; the kernels take
        # x's, or fp32 for half x
        if weight.dtype not in (x.dtype, _stat_dtype(x)):
            weight = weight.to(_stat_dtype(x))
    if _reference():
        return F.rms_norm(x, shape, weight, eps)
    if (torch.is_grad_enabled() and (x.requires_grad or _need(weight))) or _jit_tracing():
        # dweight needs x, and an inference tensor cannot be saved (torch's composite saves only its
        # normalized x, so it works there). Dynamo cannot trace is_inference().
        if not torch.compiler.is_compiling() and x.is_inference():
            x = x.clone()
        y = RMSNormFunction.apply(x, shape, weight, float(eps))
    else:
        y = _RMS_FWD(x, shape, weight, float(eps))[0]
    fmt = _channels_last_format(x) if x.dim() > 3 else None
    return y if fmt is None else y.contiguous(memory_format=fmt)



class GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, activation):
        y, mean, rstd = torch.ops.fusenorm.group_norm_fwd(x, num_groups, weight, bias, eps, activation)
        ctx.save_for_backward(x, mean, rstd, weight, bias, y if activation == "relu" else None)
        ctx.num_groups, ctx.activation, ctx.eps = num_groups, activation, eps
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None, None, None
        dx, dw, db = _group_norm_backward(ctx, dy, 2, 3)
        return dx, None, dw, db, None, None


def _group_norm_backward(ctx, dy, w_index: int, b_index: int) -> tuple:
    """(dx, dweight, dbias) of a GroupNorm forward (weight and bias its inputs w_index, b_index),
    None where not wanted; under create_graph=True through torch's composite."""
    x, mean, rstd, weight, bias, y = ctx.saved_tensors
    mask = _grad_mask(ctx, weight, bias, w_index, b_index)
    groups, eps, act = ctx.num_groups, ctx.eps, ctx.activation
    if torch.is_grad_enabled():  # create_graph=True
        return tuple(_double_backward(lambda a, w, b: _act(F.group_norm(a, groups, w, b, eps), act), dy,
                                      [x, weight, bias], mask))
    # y: ReLU's mask is y > 0, as torch's relu backward (recomputed from x, a pre-activation within
    # rounding of 0 could fall on the other side of it than in the forward)
    dx, dw, db = torch.ops.fusenorm.group_norm_bwd(dy, x, mean, rstd, groups, weight, bias, y, act, mask)
    return _or_none(dx, mask[0]), _or_none(dw, mask[1]), _or_none(db, mask[2])


# Under torch.jit.trace the kernels always run through their autograd.Function: the traced graph
# serves later calls that may need gradients, and the trace's check re-traces without grad.
_jit_tracing = torch.jit.is_tracing


def _activation_name(activation: Optional[str]) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fusenorm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation or "none"


def _act(y: torch.Tensor, act: str) -> torch.Tensor:
    """torch's activation named act ("none", "silu", "gelu", "relu") on y."""
    return y if act == "none" else _ACT_FNS[act](y)


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
    _check_tensor_args("group_norm", ("weight", 3, weight, True), ("bias", 4, bias, True))
    _float_arg(eps, "group_norm", "eps", 5)
    if isinstance(num_groups, bool) or not hasattr(type(num_groups), "__index__"):
        raise TypeError(f"group_norm(): argument 'num_groups' (position 2) must be int, not {type(num_groups).__name__}")
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    nc = input.size(0) * input.size(1)
    sites = input.numel() // nc if nc else math.prod(input.shape[2:])
    if nc // num_groups * sites == 1:  # torch's _verify_batch_size, whose list costs ~7 us to build
        torch.nn.functional._verify_batch_size([nc // num_groups, num_groups] + list(input.size()[2:]))
    if input.size(1) == 0:
        raise RuntimeError("Expected number of channels to be greater than 0, got 0")
    if sites == 0:
        raise RuntimeError("Expected HxW to be greater than 0, got 0")
    return _group_norm(input, int(num_groups), weight, bias, eps, act)


def _group_norm(input, num_groups: int, weight, bias, eps, act: str) -> torch.Tensor:
    """group_norm after its argument checks (InstanceNorm's path too, which allows empty sizes)."""
    x, weight, bias = _autocast_fp32(input, weight, bias) if input.is_cuda else (input, weight, bias)
    if _reference():
        return _act(F.group_norm(x, num_groups, weight, bias, eps), act)
    if (torch.is_grad_enabled() and (x.requires_grad or _need(weight) or _need(bias))) or _jit_tracing():
        return GroupNormFunction.apply(x, num_groups, weight, bias, float(eps), act)
    return _GN_FWD(x, num_groups, weight, bias, float(eps), act)[0]


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
    if use_input_stats:
        torch.nn.functional._verify_spatial_size(input.size())
    if not isinstance(use_input_stats, bool):  # torch's argument parser
        raise TypeError("instance_norm(): argument 'use_input_stats' (position 6) must be bool, not "
                        f"{type(use_input_stats).__name__}")
    momentum = _momentum_value(_float_arg(momentum, "instance_norm", "momentum", 7))
    _float_arg(eps, "instance_norm", "eps", 8)
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    if (running_mean is None) != (running_var is None) and use_input_stats:
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    c = input.size(1)
    _check_running("running_mean", running_mean, c, input, dtype=False)
    _check_running("running_var", running_var, c, input, dtype=False)
    if running_mean is not None and running_var is not None and running_mean.dtype != running_var.dtype:
        raise RuntimeError(f"expected scalar type {_scalar_name(running_mean.dtype)} but found "
                           f"{_scalar_name(running_var.dtype)}")
    for t in (running_mean, running_var) if use_input_stats else ():
        if t is not None and t.numel() > 1 and t.stride(0) == 0:  # an expanded buffer: torch's error
            raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers to a "
                               "single memory location. Please clone() the tensor before performing the operation.")
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
        # eval with running statistics: BatchNorm's one-pass apply (SiLU / GELU after it, by torch)
        x, weight, bias = _autocast_fp32(input, weight, bias) if input.is_cuda else (input, weight, bias)
        acc = _stat_dtype(x)  # any float buffers, as torch
        if _reference():  # torch's batch_norm op (F.instance_norm did not trace under a compiled vmap)
            y = torch.batch_norm(x, weight, bias, running_mean.to(acc), running_var.to(acc), False, 0.0, float(eps),
                                 torch.backends.cudnn.enabled)
            return _act(y, act)
        _check_running_grad(x, c, running_mean, running_var)
        grad = (torch.is_grad_enabled() and (x.requires_grad or _need(weight) or _need(bias))) or _jit_tracing()
        y = _bn_eval(x, running_mean.to(acc), running_var.to(acc), weight, bias, None, float(eps),
                     "relu" if act == "relu" else "none", grad)  # any eps, as torch's instance_norm
        return _act(y, act) if act in ("silu", "gelu") else y
    if c == 0:  # no channels: an empty output, as torch
        return input.clone()
    if not input.is_floating_point():  # torch's batch_norm kernel: after the sizes, before the dtypes
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.numel() != c:
                raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
        raise NotImplementedError(f'"instance_norm" not implemented for \'{_scalar_name(input.dtype)}\'')
    if running_mean is None:
        return _group_norm(input, c, weight, bias, eps, act)
    x, weight, bias = _autocast_fp32(input, weight, bias) if input.is_cuda else (input, weight, bias)
    if _reference():
        return _act(F.instance_norm(x, running_mean, running_var, weight, bias, True, momentum, eps), act)
    _check_running_grad(x, c, running_mean, running_var)
    if (torch.is_grad_enabled() and (x.requires_grad or _need(weight) or _need(bias))) or _jit_tracing():
        y, mean, rstd = InstanceNormStatsFunction.apply(x, weight, bias, float(eps), act)
    else:
        y, mean, rstd = _GN_FWD(x, c, weight, bias, float(eps), act)
    n = x.numel() // max(1, x.size(0) * c)  # values per instance
    if n > 0:  # no values: torch leaves the running statistics as they are
        # the biased variance per instance, from x (1 / rstd^2 - eps would cancel where eps is not
        # small next to the variance); half types reduced in fp32. BatchNorm's update rule (unbiased
        # by n / (n - 1)) on the means over the batch. x detached rather than a no_grad block, which
        # torch.export could not take around the update op (a node without a value)
        xd = x.detach()
        var = (xd.float() if xd.dtype in _HALF else xd).var(tuple(range(2, x.dim())), correction=0)
        _update_running(running_mean, running_var, mean.mean(0), var.mean(0), n, momentum)
    return y


class InstanceNormStatsFunction(torch.autograd.Function):
    """GroupNorm with one group per channel that also returns the statistics (not differentiable),
    for the running-statistics update."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, activation):
        y, mean, rstd = torch.ops.fusenorm.group_norm_fwd(x, x.size(1), weight, bias, eps, activation)
        ctx.save_for_backward(x, mean, rstd, weight, bias, y if activation == "relu" else None)
        ctx.num_groups, ctx.activation, ctx.eps = x.size(1), activation, eps
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        return y, mean, rstd

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        if dy is None:
            return None, None, None, None, None
        dx, dw, db = _group_norm_backward(ctx, dy, 1, 2)
        return dx, dw, db, None, None


_BN_FWD = torch.ops.fusenorm.batch_norm_fwd.default
_BN_STATS = torch.ops.fusenorm.batch_norm_stats.default
_BN_APPLY = torch.ops.fusenorm.batch_norm_apply.default
_BN_UPDATE = torch.ops.fusenorm.batch_norm_update_running.default
_BN_BWD = torch.ops.fusenorm.batch_norm_bwd.default
BN_ACTIVATIONS = (None, "relu")


def _bn_activation_name(activation: Optional[str]) -> str:
    if activation not in BN_ACTIVATIONS:
        raise ValueError(f"fusenorm: batch_norm activation must be one of {BN_ACTIVATIONS}, got {activation!r}")
    return activation or "none"


def _bn_save(ctx, x, mean, var, weight, bias, residual, y, eps, training, activation) -> None:
    """What the BatchNorm backward needs (y only for the ReLU mask)."""
    ctx.save_for_backward(x, mean, var, weight, y if activation == "relu" else None)
    ctx.eps, ctx.training, ctx.activation = eps, training, activation
    ctx.has_weight, ctx.bias_dtype = weight is not None, None if bias is None else bias.dtype
    ctx.has_residual = residual is not None


class BatchNormFunction(torch.autograd.Function):
    """Eval: y = act(bn(x) + residual) with the running statistics (constants for the backward)."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, residual, eps, activation):
        y = _BN_APPLY(x, mean, var, weight, bias, residual, eps, activation)
        _bn_save(ctx, x, mean, var, weight, bias, residual, y, eps, False, activation)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None, None, None, None, None
        x, mean, var, weight, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        want = [need[0], ctx.has_weight and need[3], ctx.bias_dtype is not None and need[4],
                ctx.has_residual and need[5]]
        dx, dw, db, dz = _bn_backward(ctx, dy, x, mean, var, weight, y, want)
        return dx, None, None, dw, db, dz, None, None


class BatchNormTrainFunction(torch.autograd.Function):
    """Training forward in one op: y = act(bn(x) + residual) with x's batch statistics, which are
    also returned (not differentiable) for the running-statistics update. Eagerly, update (the
    running-statistics update, or None) runs inside: activation checkpointing's recomputation stops
    once the tensors the backward needs are saved, and torch's op updates its buffers before that
    point too (so both update twice under checkpointing)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, activation, update=None):
        y, mean, var = _BN_FWD(x, weight, bias, residual, eps, activation)
        if update is not None:
            update(mean, var)
        _bn_save(ctx, x, mean, var, weight, bias, residual, y, eps, True, activation)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # and no zero tensors made for the statistics' (~6 us)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        if dy is None:
            return None, None, None, None, None, None, None
        x, mean, var, weight, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        want = [need[0], ctx.has_weight and need[1], ctx.bias_dtype is not None and need[2],
                ctx.has_residual and need[3]]
        dx, dw, db, dz = _bn_backward(ctx, dy, x, mean, var, weight, y, want)
        return dx, dw, db, dz, None, None, None


def _bn_backward(ctx, dy, x, mean, var, weight, y, want):
    """(dx, dweight, dbias, dresidual), None where not wanted."""
    relu = ctx.activation == "relu"
    if torch.is_grad_enabled():  # create_graph=True: through torch's batch_norm (ReLU's mask is constant)
        g = dy * (y <= 0).logical_not() if relu else dy  # NaN y passes dy, as torch's threshold_backward
        eps, training = ctx.eps, ctx.training

        def fn(a, w):
            stats = (None, None) if training else (mean.to(a.dtype), var.to(a.dtype))
            return F.batch_norm(a, *stats, w, None, training, 0.0, eps)

        dx, dw = _double_backward(fn, g, [x, weight], want[:2]) if want[0] or want[1] else (None, None)
        db = g.sum([0] + list(range(2, x.dim())), dtype=_stat_dtype(x)).to(ctx.bias_dtype) if want[2] else None
        return dx, dw, db, g if want[3] else None
    dx, dw, db, dz = _BN_BWD(
        dy, x, mean, var, weight, y, ctx.eps, ctx.training, ctx.activation,
        [want[0], want[1], want[2], want[3] and relu],
    )
    if want[2] and db.dtype != ctx.bias_dtype:
        db = db.to(ctx.bias_dtype)
    if want[3] and not relu:
        dz = dy
    return tuple(_or_none(t, w) for t, w in zip((dx, dw, db, dz), want))


def _check_running(name: str, t: Optional[torch.Tensor], c: int, x: torch.Tensor, dtype: bool = True) -> None:
    """A running statistic: C values in one dim, of x's dtype (or fp32 for half x) where dtype
    (BatchNorm's rule; torch's instance_norm takes any float dtype)."""
    if t is None:
        return
    if t.device != x.device:  # torch's message (a meta buffer was taken and left as it was)
        raise RuntimeError(f"Tensor on device {t.device} is not on the expected device {x.device}!")
    if t.dim() != 1 or t.size(0) != c:
        if t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
        raise RuntimeError(f"{name} should be a 1-D tensor of {c} elements, got shape {tuple(t.shape)}")
    if dtype:
        _check_running_dtype(name, t, x)


def _check_running_dtype(name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> None:
    """BatchNorm's rule for a running statistic: x's dtype, or fp32 for a half x."""
    if t is not None and t.dtype != x.dtype and x.is_floating_point() and t.dtype != _stat_dtype(x):
        raise RuntimeError(f"mixed dtype: expected {name} of input's dtype or float, got {t.dtype} for {x.dtype} "
                           f"input (expect parameter to have scalar type of {_stat_dtype(x)})")


def _check_running_grad(x, c: int, running_mean, running_var, weight=None, bias=None) -> None:
    """torch's error for running statistics that require grad while grad mode is on (its batch_norm
    op is not differentiable with respect to them; fusenorm would update them in place), in torch's
    order: after the sizes of the buffers and of weight and bias, before any dtype rule; none for an
    empty input, for which torch returns first."""
    if not torch.is_grad_enabled() or x.numel() == 0:
        return
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:
            for pname, p in (("weight", weight), ("bias", bias)):
                if p is not None and p.numel() != c:
                    raise RuntimeError(f"{pname} should contain {c} elements not {p.numel()}")
            raise RuntimeError(f"The function 'native_batch_norm' is not differentiable with respect to argument "
                               f"'{name}'. This input cannot have requires_grad True.")


def _scalar_name(dtype: torch.dtype) -> str:
    """torch's C++ name of a dtype (Float, Double, Half, BFloat16, Long, ...) for its messages."""
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
            torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}.get(dtype, str(dtype))


def _check_bn_eps(eps: float, training: bool) -> None:
    """torch.nn.functional.batch_norm's rule: eps > 0 in training, eps >= 0 in eval."""
    if training and eps <= 0.0:  # as torch's comparisons: a NaN eps passes
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _update_running(running_mean, running_var, mean, var, count, momentum) -> None:
    """torch.nn's rule: running = (1 - momentum) * running + momentum * batch, with the unbiased
    batch variance. momentum may be a 0-d tensor (the cumulative average 1 / num_batches_tracked,
    kept on the device: no host sync)."""
    # the usual case on CPU, where each small op costs 10-20 us (the form below took ~140 us of a
    # 2x16x8x8 training step): one op, where nothing requires grad (the training Functions return
    # mean and var non-differentiable). Not under torch.compile, which fuses the form below itself:
    # the op's float factor count / (count - 1) made a dynamic batch size recompile at every size
    if (isinstance(momentum, (int, float)) and isinstance(count, int) and not _is_compiling()
            and running_mean is not None
            and running_var is not None and mean.device.type == "cpu"
            and running_mean.device.type == "cpu" and running_var.device.type == "cpu"
            and not (mean.requires_grad or var.requires_grad or running_mean.requires_grad
                     or running_var.requires_grad)):
        _BN_UPDATE(running_mean, running_var, mean, var, float(momentum), count / (count - 1))
        return
    # detached operands rather than a no_grad block, which torch.export could not save (a node
    # without a value); a buffer that requires grad got torch's error before, in grad mode
    mean, var = mean.detach(), var.detach()
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_((mean * momentum).to(running_mean.dtype))
    if running_var is not None:
        unbiased = var * (count / (count - 1))  # count: an int, or a tensor (SyncBatchNorm)
        running_var.mul_(1 - momentum).add_((unbiased * momentum).to(running_var.dtype))


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: Union[float, torch.Tensor] = 0.1,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """BatchNorm over [N, C, *] (contiguous or channels-last, kept in the output), as
    torch.nn.functional.batch_norm: in training, normalizes with the batch statistics (biased
    variance) and updates the running buffers in place (unbiased variance); else uses the running
    statistics. Optional epilogue in the same pass: y = act(bn(x) + residual), act None or "relu"."""
    act = _bn_activation_name(activation)
    x = input
    c = x.size(1) if x.dim() >= 2 else 0
    # torch's check (one value per channel; 0-D: its IndexError), without its ~7 us list; numel = c
    # times that count
    if training and (x.numel() == c if c else x.dim() < 2 or x.size(0) * math.prod(x.shape[2:]) == 1):
        torch.nn.functional._verify_batch_size(x.size())
    eps = float(_float_arg(eps, "batch_norm", "eps", 8))
    _check_bn_eps(eps, training)
    if not isinstance(training, bool):  # torch's argument parser: a bool, not 1 or numpy's bool
        raise TypeError(f"batch_norm(): argument 'training' (position 6) must be bool, not {type(training).__name__}")
    momentum = _momentum_value(_float_arg(momentum, "batch_norm", "momentum", 7))
    if x.numel() == 0:  # torch returns here, before any check of the buffers, weight or bias
        return _bn_empty(x, weight, bias, residual, act)
    if x.dim() < 2:
        raise RuntimeError(f"fusenorm.batch_norm: expected an input of at least 2 dimensions [N, C, *], got {x.dim()}D input")
    _check_running("running_mean", running_mean, c, x, dtype=False)
    _check_running("running_var", running_var, c, x, dtype=False)
    _check_running_grad(x, c, running_mean, running_var, weight, bias)
    _check_running_dtype("running_mean", running_mean, x)
    _check_running_dtype("running_var", running_var, x)
    if x.dtype in _HALF:  # torch: a half input's parameters and buffers all of one dtype (its own or fp32)
        dts = {t.dtype for t in (weight, bias, running_mean, running_var) if t is not None}
        if len(dts) > 1:
            raise RuntimeError("mixed dtype: expect parameter (weight, bias, running_mean, running_var) to have "
                               f"one scalar type, {x.dtype} or float, got {sorted(map(str, dts))}")
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    # torch takes a weight or bias of any shape with C values (its forward; its backward then fails)
    if weight is not None and weight.dim() != 1 and weight.numel() == c:
        weight = weight.reshape(c)
    if bias is not None and bias.dim() != 1 and bias.numel() == c:
        bias = bias.reshape(c)
    if _reference():
        m = float(momentum) if isinstance(momentum, torch.Tensor) else momentum
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, m, eps)
        return _act(y if residual is None else y + residual, act)
    grad = torch.is_grad_enabled() and (x.requires_grad or _need(weight) or _need(bias) or _need(residual))
    grad = grad or _jit_tracing()
    if training:
        count = x.numel() // c if c else 0
        update = None
        if (grad and count > 0 and (running_mean is not None or running_var is not None) and not _is_compiling()
                and not _jit_tracing()):  # inside the Function (see its docstring)
            def update(mean, var):
                _update_running(running_mean, running_var, mean, var, count, momentum)
        if grad:
            y, mean, var = BatchNormTrainFunction.apply(x, weight, bias, residual, eps, act, update)
        else:
            y, mean, var = _BN_FWD(x, weight, bias, residual, eps, act)
        if count > 0 and update is None:
            _update_running(running_mean, running_var, mean, var, count, momentum)
        return y
    if running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if running_var is None:
        raise RuntimeError("running_var must be defined in evaluation mode")
    return _bn_eval(x, running_mean, running_var, weight, bias, residual, eps, act, grad)


def _bn_empty(x, weight, bias, residual, act: str) -> torch.Tensor:
    """torch's batch_norm of an input without values: a copy (not a view, which would break the
    gradient chain), times weight[0] and plus bias[0] where given; the epilogue after it."""
    y = x.clone()
    if weight is not None:
        y = y * weight[0]
    if bias is not None:
        y = y + bias[0]
    return _act(y if residual is None else y + residual, act)


def _bn_eval(x, running_mean, running_var, weight, bias, residual, eps: float, act: str, grad: bool):
    """BatchNorm with the running statistics (checked by the caller): one fused pass."""
    if grad:
        return BatchNormFunction.apply(x, running_mean, running_var, weight, bias, residual, eps, act)
    return _BN_APPLY(x, running_mean, running_var, weight, bias, residual, eps, act)


def _float_arg(v, fn: str, name: str, pos: int):
    """v, where torch's argument parser takes a float: a Python number, a numpy scalar (bool, int or
    float), or a 0-d tensor that does not require grad; anything else is its TypeError (float() took
    "0.3" and tensor([0.3]))."""
    if isinstance(v, (float, int)):
        return v
    if isinstance(v, torch.Tensor):
        if v.dim() == 0 and not v.requires_grad:
            return v
    elif type(v).__module__ == "numpy" and getattr(v, "dtype", None) is not None and v.dtype.kind in "biuf":
        return v
    raise TypeError(f"{fn}(): argument '{name}' (position {pos}) must be float, not {type(v).__name__}")


def _momentum_value(momentum):
    """momentum (checked by _float_arg) as batch_norm/instance_norm take it: a Python number, or a
    0-d tensor kept on its device in fp64 (fusenorm's modules pass 1 / num_batches_tracked so, with
    momentum=None); fp32 scalars in fp64 too, where 1 - momentum in fp32 made the two weights of the
    update miss 1."""
    if isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
        return float(momentum)
    if isinstance(momentum, torch.Tensor):
        return momentum if momentum.dtype == torch.float64 else momentum.double()
    return float(momentum)  # numpy's and other numbers


class SyncBatchNormFunction(torch.autograd.Function):
    """BatchNorm in training over the union of every rank's batch, with the optional epilogue
    y = act(bn(x) + residual). Forward: local (count, mean, M2) in one pass, one all-gather, Chan's
    merge; backward: g = dy masked by ReLU's output, local sums of g and g * xhat, one all-reduce,
    then dx (the residual's gradient is g). dweight/dbias stay local (as torch.nn.SyncBatchNorm's;
    DDP averages them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group, residual, activation):
        import torch.distributed as dist

        c = x.size(1)
        count = x.numel() // c
        mean, var = _BN_STATS(x)
        packed = torch.cat([mean, var * count, mean.new_full((1,), float(count))])
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed, group=group)
        g = torch.stack(gathered)  # [ranks, 2C + 1]: mean, M2, count
        counts = g[:, 2 * c:]
        total = counts.sum(0)
        gmean = (g[:, :c] * counts).sum(0) / total
        gvar = (g[:, c:2 * c] + counts * (g[:, :c] - gmean) ** 2).sum(0) / total
        _update_running(running_mean, running_var, gmean, gvar, total, momentum)
        y = _BN_APPLY(x, gmean, gvar, weight, bias, residual, eps, activation)
        ctx.save_for_backward(x, weight, gmean, gvar, total, y if activation == "relu" else None)
        ctx.eps, ctx.group, ctx.has_bias = eps, group, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        import torch.distributed as dist

        x, weight, mean, var, total, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        if y is not None:  # ReLU: its gradient where y > 0 (a NaN y passes dy, as torch's threshold_backward)
            dy = torch.where(y <= 0, torch.zeros((), dtype=dy.dtype, device=dy.device), dy)
        sum_dy, sum_dy_xhat = torch.ops.fusenorm.batch_norm_bwd_reduce(dy, x, mean, var, ctx.eps)
        dw = sum_dy_xhat.to(weight.dtype) if weight is not None and need[1] else None
        db = (sum_dy.to(weight.dtype) if weight is not None else sum_dy) if ctx.has_bias and need[2] else None
        dx = None
        if need[0]:
            c = x.size(1)
            both = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(both, group=ctx.group)
            dx = torch.ops.fusenorm.batch_norm_bwd_elemt(dy, x, mean, var, weight, both[:c] / total,
                                                         both[c:] / total, ctx.eps)
        return dx, dw, db, None, None, None, None, None, dy if need[8] else None, None


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    momentum: Union[float, torch.Tensor],
    eps: float,
    group=None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """BatchNorm in training with statistics over every rank of the torch.distributed group
    (default: the world); updates the running buffers with the global statistics. Optional
    epilogue as batch_norm's: y = act(bn(x) + residual), act None or "relu"."""
    act = _bn_activation_name(activation)
    c = input.size(1)
    _check_bn_eps(float(eps), True)
    _check_running("running_mean", running_mean, c, input)
    _check_running("running_var", running_var, c, input)
    if residual is not None and (residual.shape != input.shape or residual.device != input.device):
        # the apply op's check, here before the all-gather and the buffer update
        raise RuntimeError(f"fusenorm.batch_norm: residual of size {list(residual.shape)} on {residual.device} does "
                           f"not match input of size {list(input.shape)} on {input.device}")
    return SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, momentum, float(eps), group,
                                       residual, act)
