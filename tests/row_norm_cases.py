"""Tests shared by LayerNorm and RMSNorm. Each test module defines a `spec` fixture (a NormSpec)
and imports these functions, so every row-norm op runs the same cases against torch.nn."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import pytest
import torch
from conftest import (ATOL, DEVICES, DTYPES, FLOAT_ARGS_BAD, FLOAT_ARGS_OK, HAS_CUDA, assert_close_as_torch,
                      assert_fp32_like_torch)

import fusenorm


@dataclasses.dataclass
class NormSpec:
    name: str
    ours: Callable  # functional, torch.nn.functional signature
    theirs: Callable
    has_bias: bool
    ours_module: type
    theirs_module: type
    fwd_op: object
    bwd_op: object

    def call(self, fn, x, shape, w, b, eps=1e-5):
        if self.has_bias:
            return fn(x, shape, w, b, eps)
        return fn(x, shape, w, eps)


SIZES_CPU = [1, 3, 127, 769, 1000, 4096, 4097, 65537]


def _rows_for(n: int, device: str) -> int:
    if n >= 65537:
        return 3
    if device == "cuda":
        return 37
    return 37 if n <= 4097 else 4


def _params(spec, n, dtype, device, affine, pdtype=None):
    has_w, has_b = affine
    pdtype = pdtype or dtype
    w = torch.randn(n, dtype=pdtype, device=device).requires_grad_() if has_w else None
    b = torch.randn(n, dtype=pdtype, device=device).requires_grad_() if (has_b and spec.has_bias) else None
    return w, b


def _run(spec, fn, x, shape, w, b, dy):
    """forward + backward; returns (y, dx, dw, db) with None for absent params."""
    leaves = [t for t in (x, w, b) if t is not None]
    y = spec.call(fn, x, shape, w, b)
    grads = torch.autograd.grad(y, leaves, dy)
    it = iter(grads)
    return (y,) + tuple(next(it) if t is not None else None for t in (x, w, b))


def _compare_to_torch(spec, x, shape, w, b, what):
    dtype = x.dtype
    dy = torch.randn_like(x)
    ours = _run(spec, spec.ours, x, shape, w, b, dy)
    theirs = _run(spec, spec.theirs, x, shape, w, b, dy)
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    ref = _run(spec, spec.theirs, d(x), shape, d(w), d(b), dy.double())
    n = 1
    for s in shape:
        n *= s
    rows = x.numel() // max(n, 1)
    for name, o, t, r in zip(("y", "dx", "dw", "db"), ours, theirs, ref):
        if r is None:
            assert o is None
            continue
        # parameter grads sum over rows; allow their absolute error to grow with the row count
        scale = max(1.0, rows ** 0.5) if name in ("dw", "db") else 1.0
        if name == "dx":
            scale = max(n ** 0.5, _dx_cancellation(spec, x, w, dy, n) / ATOL[dtype])
        assert_close_as_torch(o, t, r, dtype, f"{what} {name}", scale=scale)


def _dx_cancellation(spec, x, w, dy, n):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w: its terms cancel when a row is
    short (n = 1: RMSNorm's dx is rstd * g * eps / (x^2 + eps)), so any fp32 evaluation errs by a
    few ulps of |rstd * g|, not of dx. That magnitude, times 4 ulps of the accumulation type."""
    xd = x.detach().double().reshape(-1, n)
    ms = xd.var(1, unbiased=False) if spec.has_bias else xd.pow(2).mean(1)
    g = dy.double().reshape(-1, n) * (1.0 if w is None else w.detach().double().reshape(-1))
    ulp = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    return 4 * ulp * ((ms + 1e-5).rsqrt()[:, None] * g).abs().max().item()


AFFINE = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES_CPU)
def test_matches_torch(spec, device, dtype, n):
    x = torch.randn(_rows_for(n, device), n, dtype=dtype, device=device).requires_grad_()
    w, b = _params(spec, n, dtype, device, (True, True))
    _compare_to_torch(spec, x, [n], w, b, f"{spec.name} n={n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", AFFINE, ids=str)
@pytest.mark.parametrize("n", [64, 769, 4096])
def test_affine_combinations(spec, device, affine, n):
    x = torch.randn(9, n, device=device).requires_grad_()
    w, b = _params(spec, n, torch.float32, device, affine)
    _compare_to_torch(spec, x, [n], w, b, f"affine={affine}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [256, 1000, 4096])
def test_half_input_fp32_params(spec, device, dtype, n):
    """mixed precision: half input, fp32 weight/bias (torch.nn allows it; output keeps x's dtype)."""
    x = torch.randn(17, n, dtype=dtype, device=device).requires_grad_()
    w, b = _params(spec, n, dtype, device, (True, True), pdtype=torch.float32)
    # torch.nn refuses this mix on CUDA; its fp32 computation rounded to x's dtype is the baseline
    def theirs(xx, *a):
        return spec.theirs(xx.float(), *a).to(xx.dtype) if xx.dtype == dtype else spec.theirs(xx, *a)

    _compare_to_torch(dataclasses.replace(spec, theirs=theirs), x, [n], w, b, "mixed")


@pytest.mark.parametrize("device", DEVICES)
def test_batch_one_and_leading_dims(spec, device):
    for shape, norm_shape in [((1, 512), [512]), ((2, 3, 5, 64), [64]), ((4, 6, 8), [6, 8]), ((7,), [7])]:
        x = torch.randn(*shape, device=device).requires_grad_()
        n = 1
        for s in norm_shape:
            n *= s
        w = torch.randn(*norm_shape, device=device).requires_grad_()
        b = torch.randn(*norm_shape, device=device).requires_grad_() if spec.has_bias else None
        _compare_to_torch(spec, x, norm_shape, w, b, f"shape={shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_noncontiguous_and_misaligned(spec, device, dtype):
    n = 1024
    base = torch.randn(8 * n + 1, dtype=dtype, device=device)
    x_mis = base[1:].view(8, n).detach().requires_grad_()  # contiguous, storage offset 1 element
    assert x_mis.storage_offset() == 1
    x_t = torch.randn(n, 8, dtype=dtype, device=device).t().detach().requires_grad_()  # transposed
    x_sl = torch.randn(8, n + 3, dtype=dtype, device=device)[:, 1:-2].detach().requires_grad_()  # strided rows
    for what, x in [("misaligned", x_mis), ("transposed", x_t), ("sliced", x_sl)]:
        w, b = _params(spec, n, dtype, device, (True, True))
        _compare_to_torch(spec, x, [n], w, b, what)


@pytest.mark.parametrize("shape,fmt", [((2, 3, 4, 5), torch.channels_last), ((2, 3, 2, 4, 5), torch.channels_last_3d)])
def test_channels_last_strides_as_torch(spec, shape, fmt):
    """A channels_last(_3d) input: output and input gradient strides as torch.nn's (RMSNorm keeps
    the format, LayerNorm returns contiguous), values as before. CPU: torch's CPU kernels are the
    reference checked here."""
    x = torch.randn(shape).contiguous(memory_format=fmt)
    for ns in ([shape[-1]], list(shape[-2:])):
        ys, dxs = [], []
        for f in (spec.theirs, spec.ours):
            xl = x.clone().requires_grad_()
            y = spec.call(f, xl, ns, None, None)
            dy = torch.randn_like(y)
            (dx,) = torch.autograd.grad(y, xl, dy)
            ys.append(y)
            dxs.append(dx)
            assert y.stride() == spec.call(spec.theirs, x, ns, None, None).stride()
        assert dxs[1].stride() == dxs[0].stride()
        torch.testing.assert_close(ys[1], ys[0])
        if spec.has_bias:
            continue
        # a weight gradient alone (a frozen channels-last input)
        grads, w0 = [], torch.randn(ns)
        for f in (spec.theirs, spec.ours):
            w = w0.clone().requires_grad_()
            (dw,) = torch.autograd.grad(spec.call(f, x, ns, w, None).square().sum(), w)
            grads.append(dw)
        torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input(spec, device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w, b = _params(spec, 16, torch.float32, device, (True, True))
    y, dx, dw, db = _run(spec, spec.ours, x, [16], w, b, torch.randn(0, 16, device=device))
    assert y.shape == (0, 16) and dx.shape == (0, 16)
    assert torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 5, 33])
@pytest.mark.parametrize("affine", AFFINE, ids=str)
def test_gradcheck_fp64(spec, device, n, affine):
    x = torch.randn(3, 2, n, dtype=torch.float64, device=device, requires_grad=True)
    w, b = _params(spec, n, torch.float64, device, affine)
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def f(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return spec.call(spec.ours, xx, [n], ww, bb)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5)  # through torch's composite


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_deterministic(spec, device, dtype):
    n = 4096 if device == "cuda" else 1000
    x = torch.randn(3000, n, dtype=dtype, device=device, requires_grad=True)
    w, b = _params(spec, n, dtype, device, (True, True))
    dy = torch.randn_like(x)
    r1 = _run(spec, spec.ours, x, [n], w, b, dy)
    r2 = _run(spec, spec.ours, x, [n], w, b, dy)
    for a, c in zip(r1, r2):
        if a is not None:
            assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_long_rows_of_repeated_values(spec, device):
    """Rows of 65536 ReLU-like fp32 values (half of them 0): as precise as torch.nn (the sums
    restart their lanes every 1024 values; lanes over whole rows lost 5e-5 of LayerNorm's y)."""
    n = 65536
    x = torch.relu(torch.randn(4, n, device=device))
    assert_fp32_like_torch(lambda t: spec.call(spec.ours, t, [n], None, None),
                           lambda t: spec.call(spec.theirs, t, [n], None, None), x)


@pytest.mark.parametrize("device", DEVICES)
def test_numerics_large_mean_small_std(spec, device):
    n = 4096
    x = (1e4 + 1e-2 * torch.randn(16, n, device=device)).float()  # fp32 input, mean 1e4, std 1e-2
    ref = spec.call(spec.theirs, x.double(), [n], None, None)
    y = spec.call(spec.ours, x, [n], None, None)
    assert torch.isfinite(y).all()
    assert (y.double() - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_rows(spec, device, dtype):
    n = 300
    x = torch.full((5, n), 3.25, dtype=dtype, device=device)
    w = torch.randn(n, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device) if spec.has_bias else None
    y = spec.call(spec.ours, x, [n], w, b)
    if spec.has_bias:
        assert torch.equal(y, b.expand_as(y)), "constant rows must give exactly beta"
    else:
        assert torch.equal(y, spec.call(spec.theirs, x, [n], w, b)) or torch.allclose(
            y.double(), spec.call(spec.theirs, x.double(), [n], w.double(), None), atol=1e-2
        )


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_near_limits(spec, device):
    n = 1024
    x = (torch.rand(8, n, device=device) * 2 - 1) * 60000
    x[:, 0] = 65000
    x = x.half()
    ref = spec.call(spec.theirs, x.double(), [n], None, None)
    y = spec.call(spec.ours, x, [n], None, None)
    assert torch.isfinite(y).all()
    assert (y.double() - ref).abs().max().item() < 5e-3


@pytest.mark.parametrize("device", DEVICES)
def test_errors_match_torch(spec, device):
    def same_exception(make):
        try:
            make(spec.theirs)
        except Exception as e:  # noqa: BLE001
            expected = type(e)
        else:
            pytest.fail("torch.nn accepted the input")
        with pytest.raises(expected) as info:
            make(spec.ours)
        assert len(str(info.value)) > 10
        return str(info.value)

    x = torch.randn(4, 8, device=device)
    msg = same_exception(lambda f: spec.call(f, x, [7], None, None))
    assert "normalized_shape" in msg
    msg = same_exception(lambda f: spec.call(f, x, [8], torch.randn(7, device=device), None))
    assert "weight" in msg
    same_exception(lambda f: spec.call(f, torch.ones(4, 8, dtype=torch.long, device=device), [8], None, None))
    if device == "cpu":  # a non-float input with a float weight: "mixed dtype" (LayerNorm) before the dtype
        for dtype in (torch.long, torch.bool) + ((torch.complex64,) if spec.has_bias else ()):  # RMSNorm takes complex
            xi = torch.ones(4, 8, device=device).to(dtype)
            same_exception(lambda f: spec.call(f, xi, [8], torch.ones(8, device=device), None))
            same_exception(lambda f: spec.call(f, xi, [7], torch.ones(7, device=device), None))
            if spec.has_bias:  # torch compares the weight's dtype only: a weight of x's dtype is not "mixed"
                same_exception(lambda f: spec.call(f, xi, [8], torch.ones(8, device=device).to(dtype),
                                                   torch.ones(8, device=device)))
    same_exception(lambda f: spec.call(f, x, [8, 8], None, None))
    msg = same_exception(lambda f: spec.call(f, x, 8, None, None))  # an int: torch's functions take a tuple
    assert "tuple of ints" in msg


def test_argument_types_as_torch(spec):
    """normalized_shape, input and weight/bias take what torch's argument parser takes (lists and
    tuples of Python/numpy integers or 0-d integer tensors; tensors), and anything else raises its
    TypeError with its message (numpy arrays, 1-element tensors, ranges, floats, bools, strings,
    nested lists; a list or None for a tensor). The shape mismatch message is torch's own for each op."""
    import numpy as np

    x = torch.randn(3, 8)
    for shape in ([8], (8,), torch.Size([8]), [np.int64(8)], [torch.tensor(8)]):
        torch.testing.assert_close(spec.call(spec.ours, x, shape, None, None), spec.call(spec.theirs, x, shape, None, None))
    bad = [lambda f, s=shape: spec.call(f, x, s, None, None) for shape in
           (np.array([8]), torch.tensor([8]), range(8, 9), [8.0], [True], [np.bool_(True)], "8", [[8]], np.int64(8))]
    bad += [lambda f: spec.call(f, None, [8], None, None), lambda f: spec.call(f, x.tolist(), [8], None, None),
            lambda f: spec.call(f, x, [8], [1.0] * 8, None), lambda f: spec.call(f, x, [9], None, None)]
    if spec.has_bias:
        bad.append(lambda f: spec.call(f, x, [8], None, "b"))
    for call in bad:
        with pytest.raises(Exception) as theirs:
            call(spec.theirs)
        with pytest.raises(Exception) as ours:
            call(spec.ours)
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_eps_types_as_torch(spec):
    """eps: what torch's argument parser takes as a float (numbers, numpy's, 0-d tensors) works as
    torch's; a string, a 1-element tensor or one requiring grad is its TypeError (float() took them)."""
    x = torch.randn(3, 8)
    for eps in FLOAT_ARGS_OK:
        torch.testing.assert_close(spec.call(spec.ours, x, [8], None, None, eps=eps),
                                   spec.call(spec.theirs, x, [8], None, None, eps=eps))
    for eps in FLOAT_ARGS_BAD:
        for f in (spec.theirs, spec.ours):
            with pytest.raises(TypeError, match="eps"):
                spec.call(f, x, [8], None, None, eps=eps)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(spec, device):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 40, dtype=dtype, device=device)
        w = torch.randn(40, dtype=dtype, device=device)
        b = torch.randn(40, dtype=dtype, device=device)
        if spec.has_bias:
            y, mean, rstd = spec.fwd_op(x, [40], w, b, 1e-5)
            torch.library.opcheck(spec.fwd_op, (x, [40], w, b, 1e-5))
            torch.library.opcheck(spec.fwd_op, (x, [40], None, None, 1e-5))
            dy = torch.randn_like(x)
            torch.library.opcheck(spec.bwd_op, (dy, x, mean, rstd, [40], w, b, [True, True, True]))
            torch.library.opcheck(spec.bwd_op, (dy, x, mean, rstd, [40], None, b, [True, False, True]))
        else:
            y, rstd = spec.fwd_op(x, [40], w, 1e-6)
            torch.library.opcheck(spec.fwd_op, (x, [40], w, 1e-6))
            dy = torch.randn_like(x)
            torch.library.opcheck(spec.bwd_op, (dy, x, rstd, [40], w, [True, True]))
            torch.library.opcheck(spec.bwd_op, (dy, x, rstd, [40], None, [True, False]))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_keeps_our_ops(spec, device):
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)

    n = 96
    mod = spec.ours_module(n).to(device)
    x = torch.randn(4, 5, n, device=device, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(mod, backend=backend, fullgraph=True)(x)
    out.sum().backward()
    assert len(graphs) == 2, graphs  # one forward and one backward graph: no graph break
    assert f"fusenorm.{spec.name}_fwd" in graphs[0], graphs[0]
    assert f"fusenorm.{spec.name}_bwd" in graphs[1], graphs[1]
    torch._dynamo.reset()
    # inductor parity, forward and backward
    x1 = torch.randn(4, 5, n, device=device, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1 = torch.compile(mod, fullgraph=True)(x1)
    y2 = mod(x2)
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_module_is_drop_in(spec, device):
    for kwargs in ({}, {"elementwise_affine": False}, {"eps": 1e-3}):
        if spec.has_bias:
            variants = [dict(kwargs), dict(kwargs, bias=False)]
        else:
            variants = [dict(kwargs)]
        for kw in variants:
            ours = spec.ours_module((4, 8), **kw).to(device)
            theirs = spec.theirs_module((4, 8), **kw).to(device)
            assert isinstance(ours, spec.theirs_module)
            assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
            assert list(ours.state_dict()) == list(theirs.state_dict())
            assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
            with torch.no_grad():
                for p in theirs.parameters():
                    p.normal_()
            ours.load_state_dict(theirs.state_dict())
            x = torch.randn(3, 4, 8, device=device)
            torch.testing.assert_close(ours(x), theirs(x))
            theirs.load_state_dict(ours.state_dict())
            ours.reset_parameters()
            theirs.reset_parameters()
            for a, c in zip(ours.parameters(), theirs.parameters()):
                assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_dtype_matches_torch(spec, device):
    dtype = torch.bfloat16
    ours = spec.ours_module(64).to(device)
    theirs = spec.theirs_module(64).to(device)
    for xdtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 64, device=device, dtype=xdtype)
        with torch.autocast(device, dtype=dtype):
            a, c = ours(x), theirs(x)
        assert a.dtype == c.dtype, (xdtype, a.dtype, c.dtype)
        torch.testing.assert_close(a.float(), c.float(), atol=2e-2, rtol=2e-2)


def test_convert_swaps_modules(spec):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), spec.theirs_module(8), torch.nn.Sequential(spec.theirs_module(8)))
    x = torch.randn(2, 8)
    before = model(x)
    fusenorm.convert(model)
    assert type(model[1]) is spec.ours_module and type(model[2][0]) is spec.ours_module
    torch.testing.assert_close(model(x), before)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_many_rows(spec):
    x = torch.randn(70001, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w, b = _params(spec, 64, torch.bfloat16, "cuda", (True, True))
    _compare_to_torch(spec, x, [64], w, b, "rows>65536")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_more_than_2_31_elements(spec):
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip(f"needs 20 GiB free GPU memory, {free / 2**30:.1f} GiB free")
    n = 1024
    rows = 2**31 // n + 64
    x = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    x.normal_()
    y = spec.call(spec.ours, x, [n], None, None)
    check = [0, rows // 2, rows - 1, rows - 2]
    ref = spec.call(spec.theirs, x[check].double(), [n], None, None)
    assert (y[check].double() - ref).abs().max().item() < 5e-2
    del x, y
    torch.cuda.empty_cache()
