"""fusenorm.InstanceNorm1d/2d/3d and fusenorm.instance_norm against torch.nn, both layouts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_ARGS_BAD, FLOAT_ARGS_OK
from conftest import (DEVICES, DTYPES, assert_close_as_torch, assert_compiles_once_as_torch, assert_fp32_like_torch,
                      assert_raises_like, channels_last)

import fusenorm

MODS = {1: (torch.nn.InstanceNorm1d, fusenorm.InstanceNorm1d), 2: (torch.nn.InstanceNorm2d, fusenorm.InstanceNorm2d),
        3: (torch.nn.InstanceNorm3d, fusenorm.InstanceNorm3d)}
SPATIAL = {1: (13,), 2: (7, 9), 3: (3, 5, 7)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_functional_matches_torch(device, dtype, dims, layout):
    c = 9
    x = torch.randn((3, c) + SPATIAL[dims], dtype=dtype, device=device)
    if layout == "channels_last":
        x = channels_last(x)
    w, b = torch.randn(c, dtype=dtype, device=device), torch.randn(c, dtype=dtype, device=device)
    dy = torch.randn_like(x)
    outs = []
    for fn, cast in ((F.instance_norm, lambda t: t), (F.instance_norm, lambda t: t.double()),
                     (fusenorm.instance_norm, lambda t: t)):
        leaves = [cast(t).detach().requires_grad_() for t in (x, w, b)]
        y = fn(leaves[0], weight=leaves[1], bias=leaves[2], eps=1e-5)
        outs.append((y.detach(),) + torch.autograd.grad(y, leaves, cast(dy)))
    theirs, ref, ours = outs
    assert ours[0].stride() == x.stride(), "the output keeps the input's memory format"
    n_sp = math.prod(SPATIAL[dims])
    for name, o, t, r, scale in zip(("y", "dx", "dw", "db"), ours, theirs, ref, (1, n_sp ** 0.5, 3 * n_sp, 3 * n_sp)):
        assert_close_as_torch(o, t, r, dtype, f"instance_norm {name}", scale=max(1.0, scale ** 0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 0.5])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
def test_module_train_eval_sequence(device, momentum, affine, track):
    """Buffers after every step, outputs in train and eval, as torch.nn."""
    theirs = torch.nn.InstanceNorm2d(6, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    ours = fusenorm.InstanceNorm2d(6, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    if affine:
        with torch.no_grad():
            theirs.weight.normal_()
            theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    for step in range(4):
        train = step < 3
        theirs.train(train)
        ours.train(train)
        x = (3 + 2 * torch.randn(4, 6, 5, 7, device=device)).to(memory_format=torch.channels_last)
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-5)
        for (k, a), (_, t) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, t, atol=1e-5, rtol=1e-5, msg=f"{k} after step {step}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["silu", "relu", "gelu"])
def test_fused_activation(device, act):
    m = fusenorm.InstanceNorm2d(5, affine=True, activation=act).to(device)
    x = torch.randn(2, 5, 6, 6, device=device, requires_grad=True)
    ref = getattr(F, act)(F.instance_norm(x, weight=m.weight, bias=m.bias))
    y = m(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0],
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_unbatched_inputs(device):
    for dims in (1, 2, 3):
        t_cls, o_cls = MODS[dims]
        theirs, ours = t_cls(4, affine=True).to(device), o_cls(4, affine=True).to(device)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn((4,) + SPATIAL[dims], device=device)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    m = fusenorm.InstanceNorm1d(3, affine=True, track_running_stats=True, activation="silu").to(device).double()
    x = torch.randn(2, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fusenorm.instance_norm(t, weight=m.weight, bias=m.bias,
                                                                     activation="silu"), (x,))
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))


def test_compile_fullgraph():
    m = fusenorm.InstanceNorm2d(4, affine=True)
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    y = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(y, F.instance_norm(x, weight=m.weight, bias=m.bias), atol=1e-5, rtol=1e-5)
    tracked = fusenorm.InstanceNorm2d(4, track_running_stats=True)
    ref = torch.nn.InstanceNorm2d(4, track_running_stats=True)
    torch.testing.assert_close(torch.compile(tracked)(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tracked.running_var, ref.running_var)


def test_errors_match_torch():
    cases = [
        lambda cls: cls(4)(torch.randn(2, 4, 5, 5)),                     # 4D input to InstanceNorm1d
        lambda cls: cls(4, affine=True)(torch.randn(2, 3, 5)),           # channels != num_features
        lambda cls: cls(4)(torch.randn(2, 4, 1)),                        # one spatial element in training
    ]
    for call in cases:
        with pytest.raises(Exception) as theirs:
            call(torch.nn.InstanceNorm1d)
        with pytest.raises(Exception) as ours:
            call(fusenorm.InstanceNorm1d)
        assert type(ours.value) is type(theirs.value), (ours.value, theirs.value)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError):
        fusenorm.instance_norm(torch.randn(2, 4, 5), use_input_stats=False)
    for use_input_stats in (True, False):  # running statistics that require grad, with grad mode on
        call = lambda f: f(torch.randn(2, 4, 5), torch.zeros(4, requires_grad=True), torch.ones(4),
                           use_input_stats=use_input_stats)
        with pytest.raises(Exception) as theirs:
            call(F.instance_norm)
        with pytest.raises(Exception) as ours:
            call(fusenorm.instance_norm)
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
        empty = torch.randn(0, 4, 5)  # no error for an empty input, as torch
        assert fusenorm.instance_norm(empty, torch.zeros(4, requires_grad=True), torch.ones(4),
                                      use_input_stats=False).shape == empty.shape


def test_drop_in_modules():
    for dims, (t_cls, o_cls) in MODS.items():
        for kw in ({}, {"affine": True, "track_running_stats": True}):
            theirs, ours = t_cls(6, **kw), o_cls(6, **kw)
            assert list(ours.state_dict()) == list(theirs.state_dict())
            ours.load_state_dict(theirs.state_dict())
            theirs.load_state_dict(ours.state_dict())
            assert repr(ours) == repr(theirs)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.InstanceNorm2d(4))
    fusenorm.convert(model)
    assert type(model[1]) is fusenorm.InstanceNorm2d
    model(torch.randn(2, 3, 7, 7)).sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", [None, "relu", "silu"])
def test_eval_with_running_stats_gradients(device, act):
    """Eval with running statistics (a per-channel scale-and-shift, BatchNorm's apply op for None /
    ReLU): outputs and gradients as torch.nn, channels_last kept."""
    theirs = torch.nn.InstanceNorm2d(5, affine=True, track_running_stats=True).to(device)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
        theirs.running_mean.normal_()
        theirs.running_var.uniform_(0.5, 2)
    ours = fusenorm.InstanceNorm2d(5, affine=True, track_running_stats=True, activation=act).to(device)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    x = torch.randn(3, 5, 6, 7, device=device).to(memory_format=torch.channels_last).requires_grad_()
    y_t = theirs(x)
    if act:
        y_t = getattr(F, act)(y_t)
    y_o = ours(x)
    assert y_o.stride() == x.stride()
    torch.testing.assert_close(y_o, y_t, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y_t)
    g_t = torch.autograd.grad(y_t, [x, theirs.weight, theirs.bias], dy)
    g_o = torch.autograd.grad(y_o, [x, ours.weight, ours.bias], dy)
    for a, t in zip(g_o, g_t):
        torch.testing.assert_close(a, t, atol=1e-4, rtol=1e-4)


def test_running_stats_edge_cases():
    """The running variance is x's (not 1 / rstd^2 - eps, which cancels where eps is not small next
    to it); no sites leave the buffers alone; bad buffers raise before anything is updated."""
    x = 5 + 1e-3 * torch.randn(2, 4, 16)
    bufs = []
    for cls in (torch.nn.InstanceNorm1d, fusenorm.InstanceNorm1d):
        m = cls(4, eps=1.0, momentum=1.0, track_running_stats=True)
        m(x)
        bufs.append((m.running_mean, m.running_var))
    torch.testing.assert_close(bufs[1][0], bufs[0][0])
    torch.testing.assert_close(bufs[1][1], bufs[0][1], rtol=1e-4, atol=0)
    rm, rv = torch.ones(4), torch.ones(4)
    fusenorm.instance_norm(torch.randn(2, 4, 0), rm, rv)
    assert torch.equal(rm, torch.ones(4)) and torch.equal(rv, torch.ones(4))
    rm = torch.ones(4)
    with pytest.raises(RuntimeError, match="should contain"):
        fusenorm.instance_norm(torch.randn(2, 5, 4), rm, torch.ones(4))
    assert torch.equal(rm, torch.ones(4))
    for pair in [(torch.zeros(4), None), (None, torch.ones(4))]:
        with pytest.raises(ValueError, match="both be None"):
            fusenorm.instance_norm(torch.randn(2, 4, 5), *pair)


def test_eps_and_momentum_types_as_torch():
    """eps and momentum as torch's argument parser takes a float (conftest.FLOAT_ARGS_OK / _BAD)."""
    x = torch.randn(2, 3, 5)
    for v in FLOAT_ARGS_OK:
        for kw in ({"eps": v}, {"momentum": v}):
            bufs = [(torch.zeros(3), torch.ones(3)) for _ in range(2)]
            torch.testing.assert_close(fusenorm.instance_norm(x, *bufs[0], **kw), F.instance_norm(x, *bufs[1], **kw))
            torch.testing.assert_close(bufs[0], bufs[1])
    for v in FLOAT_ARGS_BAD:
        for kw in ({"eps": v}, {"momentum": v}):
            for f in (F.instance_norm, fusenorm.instance_norm):
                with pytest.raises(TypeError, match=next(iter(kw))):
                    f(x, torch.zeros(3), torch.ones(3), **kw)


def test_functional_errors_and_empty_channels():
    calls = [lambda f: f(torch.randn(3)),                              # 1-D input in training
             lambda f: f(torch.randn(2, 3, 4), momentum=None),        # momentum must be a float
             # running buffers on the meta device, or expanded (one value written by every channel)
             lambda f: f(torch.randn(2, 3, 4), torch.zeros(3, device="meta"), torch.ones(3, device="meta")),
             lambda f: f(torch.randn(2, 3, 4), torch.zeros(3), torch.ones(1).expand(3)),
             lambda f: f(torch.randn(2, 3, 4), torch.zeros(1).expand(3), torch.ones(3))]
    for dtype in (torch.long, torch.bool, torch.complex64):  # not implemented, with a weight too, after the sizes
        xi = torch.ones(2, 3, 4).to(dtype)
        calls += [lambda f, xi=xi: f(xi), lambda f, xi=xi: f(xi, weight=torch.ones(3), bias=torch.ones(3)),
                  lambda f, xi=xi: f(xi, weight=torch.ones(5)), lambda f, xi=xi: f(xi, use_input_stats=False),
                  lambda f, xi=xi: f(xi, torch.zeros(5), torch.ones(5))]
        assert fusenorm.instance_norm(torch.ones(2, 0, 4).to(dtype)).shape == (2, 0, 4)
    for call in calls:
        assert_raises_like(call, F.instance_norm, fusenorm.instance_norm)
    assert fusenorm.instance_norm(torch.randn(2, 0, 3)).shape == (2, 0, 3)
    assert fusenorm.InstanceNorm1d(0)(torch.randn(2, 0, 3)).shape == (2, 0, 3)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_eval_activation_fp64_and_dtype_checks(act):
    """Eval with running statistics and SiLU/GELU: fp64 stays fp64 (gradcheck passes), and
    parameters of another dtype raise as torch's do."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = fusenorm.instance_norm(x, rm, rv, w, b, False, activation=act)
    ref = getattr(F, act)(F.instance_norm(x, rm, rv, w, b, False))
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda a, ww, bb: fusenorm.instance_norm(a, rm, rv, ww, bb, False, activation=act),
                                    (x, w, b))
    with pytest.raises(RuntimeError):
        fusenorm.instance_norm(x.detach(), rm, rv, w.detach().float(), b.detach().float(), False, activation=act)


def test_relu_keeps_nan():
    x = torch.randn(1, 2, 4)
    x[0, 0, 1] = float("nan")
    rm, rv = torch.zeros(2), torch.ones(2)
    for ours, theirs in [(fusenorm.instance_norm(x, activation="relu"), F.relu(F.instance_norm(x))),
                         (fusenorm.instance_norm(x, rm, rv, use_input_stats=False, activation="relu"),
                          F.relu(F.instance_norm(x, rm, rv, use_input_stats=False)))]:
        torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_running_buffers_of_any_float_dtype():
    """torch's instance_norm takes running statistics of any float dtype, in training and eval."""
    x = torch.randn(2, 3, 6)
    for dt in (torch.float16, torch.float64, torch.bfloat16):
        for use_input_stats in (True, False):
            ours = (torch.zeros(3, dtype=dt), torch.ones(3, dtype=dt))
            theirs = (torch.zeros(3, dtype=dt), torch.ones(3, dtype=dt))
            y = fusenorm.instance_norm(x, *ours, use_input_stats=use_input_stats)
            torch.testing.assert_close(y, F.instance_norm(x, *theirs, use_input_stats=use_input_stats))
            tol = 1e-2 if dt == torch.bfloat16 else 1e-3  # one rounding of the buffer's dtype
            torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_long_instances_of_repeated_values(device):
    """Instances of 512x512 ReLU-like fp32 values (half of them 0): as precise as torch.nn."""
    x = torch.relu(torch.randn(1, 2, 512, 512, device=device))
    assert_fp32_like_torch(fusenorm.instance_norm, F.instance_norm, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_nonfinite_value_running_stats_as_torch(device, layout, value, first):
    """An instance holding one infinity has an infinite mean, which running_mean gets as torch's,
    also when it is the instance's first value (the pivot, then taken as 0)."""
    x = torch.randn(4, 3, 5, 5, device=device)
    x[(0, 1, 0, 0) if first else (2, 1, 3, 3)] = value
    x = channels_last(x) if layout == "channels_last" else x
    theirs = torch.nn.InstanceNorm2d(3, track_running_stats=True).to(device)
    ours = fusenorm.InstanceNorm2d(3, track_running_stats=True).to(device)
    y_theirs, y_ours = theirs(x), ours(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, equal_nan=True)
    torch.testing.assert_close(ours.running_var, theirs.running_var, equal_nan=True)
    torch.testing.assert_close(y_ours, y_theirs, equal_nan=True)


def test_compile_dynamic_shapes_compile_once():
    """torch.compile(dynamic=True) with running statistics in training: no recompilation for later
    batch and spatial sizes (the running-update factor n / (n - 1) is symbolic; it had specialized,
    one recompile per spatial size), with torch.nn's outputs and buffers."""
    ours = fusenorm.InstanceNorm2d(3, affine=True, track_running_stats=True)
    theirs = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    # no size equal to C: Dynamo gives equal sizes one symbol
    assert_compiles_once_as_torch(ours, theirs, [(n, 3, 5, n + 2) for n in (2, 4, 5, 7)])
