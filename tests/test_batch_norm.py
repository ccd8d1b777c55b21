"""fusenorm.BatchNorm1d/2d/3d and fusenorm.batch_norm against torch.nn, both layouts."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_ARGS_BAD, FLOAT_ARGS_OK
from conftest import (CUDA_SKIP, DEVICES, DTYPES, assert_close_as_torch, assert_compiles_once_as_torch,
                      assert_fp32_like_torch, assert_raises_like, big_bf16_normal, channels_last)

import fusenorm

MODS = {1: (torch.nn.BatchNorm1d, fusenorm.BatchNorm1d), 2: (torch.nn.BatchNorm2d, fusenorm.BatchNorm2d),
        3: (torch.nn.BatchNorm3d, fusenorm.BatchNorm3d)}
# input shapes by case: BatchNorm1d takes [N, C] and [N, C, L]
SHAPES = {"1d-2D": (12, 9), "1d-3D": (4, 9, 13), "2d": (3, 9, 7, 6), "3d": (2, 9, 3, 5, 4),
          # a channel too large to stay in cache between passes (the CPU's two-step path), and one channel
          "2d-large": (40, 2, 64, 64), "2d-one-channel": (5, 1, 6, 7),
          # CPU: several fused channel blocks per thread (contiguous); a 32- and an 8-channel block
          # of the channels-last statistics
          "2d-channel-blocks": (8, 16, 48, 48), "2d-40-channels": (4, 40, 9, 9)}


def _run(fn, cast, x, w, b, z, dy, rm, rv, training, **kw):
    leaves = [cast(t).detach().requires_grad_() for t in (x, w, b)]
    rm, rv = cast(rm).clone(), cast(rv).clone()
    y = fn(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5, **kw)
    return (y.detach(),) + torch.autograd.grad(y, leaves, cast(dy)), (rm, rv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_matches_torch(device, dtype, case, layout, training):
    shape = SHAPES[case]
    c = shape[1]
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype)
    if layout == "channels_last":
        x = channels_last(x)
    w, b = torch.randn(c, dtype=dtype, device=device), torch.randn(c, dtype=dtype, device=device)
    rm, rv = torch.randn(c, dtype=dtype, device=device), torch.rand(c, dtype=dtype, device=device) + 0.5
    dy = torch.randn_like(x)
    (theirs, t_run), (ref, r_run), (ours, o_run) = (
        _run(F.batch_norm, lambda t: t, x, w, b, None, dy, rm, rv, training),
        _run(F.batch_norm, lambda t: t.double(), x, w, b, None, dy, rm, rv, training),
        _run(fusenorm.batch_norm, lambda t: t, x, w, b, None, dy, rm, rv, training),
    )
    assert ours[0].stride() == x.stride(), "the output keeps the input's memory format"
    count = x.numel() // c
    for name, o, t, r, scale in zip(("y", "dx", "dw", "db"), ours, theirs, ref, (1, 4, count ** 0.5, count ** 0.5)):
        assert_close_as_torch(o, t, r, dtype, f"batch_norm {name}", scale=scale)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    for a, r in zip(o_run, r_run):  # running statistics (in place, unbiased variance), against fp64: torch's
        torch.testing.assert_close(a, r.to(a.dtype), atol=tol, rtol=tol)  # own are 1e-4 off on one thread


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_fp32_parameters(device, dtype):
    theirs = torch.nn.BatchNorm2d(8).to(device)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours = fusenorm.convert(copy.deepcopy(theirs))
    x = torch.randn(4, 8, 6, 6, device=device).to(dtype).requires_grad_()
    y_t, y_o = theirs(x), ours(x)
    assert y_o.dtype == y_t.dtype == dtype
    torch.testing.assert_close(y_o, y_t, atol=2e-2, rtol=1e-2)
    dy = torch.randn_like(y_t)
    g_t = torch.autograd.grad(y_t, [x, theirs.weight], dy)
    g_o = torch.autograd.grad(y_o, [x, ours.weight], dy)
    torch.testing.assert_close(g_o[0], g_t[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(g_o[1], g_t[1], atol=0.3, rtol=1e-2)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device,shape", [pytest.param("cpu", (3, 10, 5, 7), id="cpu-small"),
                                          pytest.param("cuda", (64, 8200, 64, 64), id="cuda", marks=CUDA_SKIP)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_than_2_31_elements(device, shape, layout):
    """Training forward of a bf16 tensor of more than 2^31 elements on the GPU (512 KiB channels: the
    single-pass kernel in contiguous layout, the two-pass kernels in channels-last): the first,
    middle and last channels against fp64. The CPU case runs the same checks on a small tensor."""
    x = big_bf16_normal(device, shape, layout)
    try:
        y = fusenorm.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
        assert y.stride() == x.stride()
        C = shape[1]
        for c in (0, C // 2, C - 1):
            xc = x[:, c].double()
            ref = (xc - xc.mean()) / torch.sqrt(xc.var(unbiased=False) + 1e-5)
            assert (y[:, c].double() - ref).abs().max().item() < 5e-2, f"channel {c}"
    finally:  # free the 8 GiB before the next large test, also when this one fails
        x = y = None
        if device == "cuda":
            torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_output_rounding_matches_torch(dtype, layout):
    """Eval with mean 0, variance 1, eps 0 and no bias computes y = x * w exactly in fp32, so the
    half output must be torch's rounding of that product bit for bit (round to nearest even,
    infinities, overflow, subnormals, NaN where torch has NaN), at every SIMD width and tail of a
    1517-site run. bfloat16's exponents reach fp32's subnormals, which the hardware rounding of
    AVX512-BF16 hosts flushes to zero (cpu/vec.h takes the exact path for them)."""
    torch.manual_seed(0)
    C = 24  # channels last: one 16-wide and one 8-wide vector per site
    low = -140 if dtype == torch.bfloat16 else -20
    x = torch.randn(3, C, 37, 41) * torch.exp2(torch.randint(low, 20, (3, C, 37, 41)).float())
    x = x.to(dtype)
    flat = x.view(-1)
    idx = torch.randperm(flat.numel())[:60]
    specials = [float("nan"), float("inf"), float("-inf"), 0.0, torch.finfo(dtype).max, -torch.finfo(dtype).max]
    for k, i in enumerate(idx.tolist()):
        flat[i] = specials[k % len(specials)]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = 1 + torch.arange(1, C + 1, dtype=torch.float32) * 2.0 ** -10 * 3  # x * w is exact in fp32
    y = fusenorm.batch_norm(x, torch.zeros(C), torch.ones(C), w, None, False, 0.1, 0.0)
    ref = (x.float() * w.view(1, C, 1, 1) + 0.0).to(dtype)
    assert torch.equal(y.isnan(), ref.isnan())
    fin = ~ref.isnan()
    assert torch.equal(y[fin].view(torch.int16), ref[fin].view(torch.int16))
    if dtype == torch.bfloat16:  # NaN inputs with payloads, either sign, quiet or signaling: 0x7fc0 out
        bits = x.view(torch.int16).clone()
        nan_at = tuple(torch.randint(0, n, (90,)) for n in bits.shape)
        bits[nan_at] = torch.tensor([0xff81 - 0x10000, 0x7f81, 0xffc1 - 0x10000], dtype=torch.int16).repeat(30)
        y = fusenorm.batch_norm(bits.view(torch.bfloat16), torch.zeros(C), torch.ones(C), w, None, False, 0.1, 0.0)
        assert torch.equal(y.view(torch.int16)[nan_at], torch.full((90,), 0x7fc0, dtype=torch.int16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_train_eval_sequence(device, momentum, affine, track, layout):
    """Buffers (num_batches_tracked too) after every step, outputs in train and eval, as torch.nn."""
    theirs = torch.nn.BatchNorm2d(6, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    ours = fusenorm.BatchNorm2d(6, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    if affine:
        with torch.no_grad():
            theirs.weight.normal_()
            theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    for step in range(6):
        train = step not in (2, 5)
        theirs.train(train)
        ours.train(train)
        x = 3 + 2 * torch.randn(4, 6, 5, 7, device=device)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=1e-5)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for (k, a), (_, t) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, t, atol=1e-5, rtol=1e-5, msg=f"{k} after step {step}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("budget", ["default", "1024"])  # CUDA: the on-chip path in one block, in clusters
def test_large_mean_tiny_variance(device, layout, budget, monkeypatch):
    """x = 1e4 + 1e-2 * noise in fp32: statistics and output stay close to fp64 (exact moments,
    and the mean is subtracted before scaling, so nothing cancels)."""
    if budget != "default":
        monkeypatch.setenv("FUSENORM_ONCHIP_BYTES", budget)
    x = 1e4 + 1e-2 * torch.randn(8, 4, 16, 16, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    dy = torch.randn_like(x)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    (theirs, _), (ref, ref_run), (ours, our_run) = (
        _run(F.batch_norm, lambda t: t, x, w, b, None, dy, rm, rv, True),
        _run(F.batch_norm, lambda t: t.double(), x, w, b, None, dy, rm, rv, True),
        _run(fusenorm.batch_norm, lambda t: t, x, w, b, None, dy, rm, rv, True),
    )
    for name, o, t, r in zip(("dx", "dw", "db"), ours[1:], theirs[1:], ref[1:]):
        assert_close_as_torch(o, t, r, torch.float32, f"batch_norm {name}", scale=1e2)
    # y has unit variance; an fp32 mean near 1e4 is only known to half an ulp (5e-4, 0.05 std), for
    # torch too, where E[x^2] - E[x]^2 or merging rounded means would lose the variance
    assert (ours[0].double() - ref[0]).abs().max() < 0.1
    mean, var = torch.ops.fusenorm.batch_norm_stats(x)
    xd = x.double().transpose(0, 1).reshape(4, -1)
    assert (mean.double() - xd.mean(1)).abs().max() <= 1e-3  # one ulp of 1e4
    torch.testing.assert_close(var.double(), xd.var(1, unbiased=False), rtol=1e-5, atol=0)
    torch.testing.assert_close(our_run[1].double(), ref_run[1], rtol=1e-3, atol=1e-9)


# The CUDA single-pass training forward (cuda/onchip_norm.cuh): FUSENORM_ONCHIP_BYTES sets the
# shared memory per block, so these small channels are split across clusters of 1 to 16 blocks (a
# 4 KiB channel: 1 block at the default budget, 4 at 1024, 16 at 256) or refused (0, and channels
# beyond 16 blocks: the two-pass kernels). Vector widths: 16 bytes, 8 (bf16 at 14x14), one value.
# Channels-last inputs take the two-pass kernels at every budget (batch_norm.cuh says why).
@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=CUDA_SKIP)])
@pytest.mark.parametrize("budget", ["default", "0", "1024", "256"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (16, 3, 5, 7), (5, 4, 14, 14), (3, 2, 40, 40), (6, 48, 7, 7),
                                   (2, 20, 9, 9)], ids=str)
def test_onchip_clusters(device, budget, dtype, layout, shape, monkeypatch):
    if budget != "default":
        monkeypatch.setenv("FUSENORM_ONCHIP_BYTES", budget)
    x = (torch.randn(shape, device=device) * 2 + 1).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
    z = torch.randn_like(x)
    y, mean, var = torch.ops.fusenorm.batch_norm_fwd(x, w, b, z, 1e-5, "relu")
    outs = [F.relu(F.batch_norm(t(x), None, None, t(w), t(b), True, 0.1, 1e-5) + t(z))
            for t in (lambda v: v, lambda v: v.double())]
    assert_close_as_torch(y, outs[0], outs[1], dtype, "batch_norm y")
    xd = x.double().transpose(0, 1).reshape(c, -1)
    torch.testing.assert_close(mean.double(), xd.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), xd.var(1, unbiased=False), atol=1e-5, rtol=1e-4)
    assert y.stride() == x.stride()
    again = torch.ops.fusenorm.batch_norm_fwd(x, w, b, z, 1e-5, "relu")
    assert all(torch.equal(a, o) for a, o in zip(again, (y, mean, var)))  # a fixed merge order


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_residual_epilogue(device, layout, training):
    """forward(x, residual) with activation="relu" = relu(bn(x) + residual), gradients for all."""
    ours = fusenorm.BatchNorm2d(5, activation="relu").to(device)
    theirs = torch.nn.BatchNorm2d(5).to(device)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
        theirs.running_mean.normal_()
    ours.load_state_dict(theirs.state_dict())
    ours.train(training)
    theirs.train(training)
    x = torch.randn(3, 5, 6, 7, device=device)
    z = torch.randn(3, 5, 6, 7, device=device)
    if layout == "channels_last":
        x, z = x.to(memory_format=torch.channels_last), z.to(memory_format=torch.channels_last)
    x.requires_grad_()
    z.requires_grad_()
    y_o = ours(x, z)
    y_t = F.relu(theirs(x) + z)
    torch.testing.assert_close(y_o, y_t, atol=1e-5, rtol=1e-5)
    assert y_o.stride() == x.stride()
    dy = torch.randn_like(y_t)
    g_o = torch.autograd.grad(y_o, [x, z, ours.weight, ours.bias], dy)
    g_t = torch.autograd.grad(y_t, [x, z, theirs.weight, theirs.bias], dy)
    for a, t in zip(g_o, g_t):
        torch.testing.assert_close(a, t, atol=1e-4, rtol=1e-4)
    for (k, a), (_, t) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, t, atol=1e-6, rtol=1e-5, msg=k)
    # residual without activation
    plain = fusenorm.BatchNorm2d(5).to(device).train(training)
    plain.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(plain(x, z), F.batch_norm(x, plain.running_mean.clone(), plain.running_var.clone(),
                                                         plain.weight, plain.bias, training) + z, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    theirs, ours = torch.nn.BatchNorm2d(3).to(device), fusenorm.BatchNorm2d(3).to(device)
    for m in (theirs, ours):
        with torch.no_grad():
            m.running_mean.fill_(2)
            m.running_var.fill_(3)
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    y_t, y_o = theirs(x), ours(x)
    assert y_o.shape == y_t.shape
    for (k, a), (_, t) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, t, msg=k)
    y_o.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(ours.weight.grad, torch.zeros(3, device=device))
    ours.eval()
    assert ours(torch.randn(0, 3, 2, 2, device=device)).shape == (0, 3, 2, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    z = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64, device=device), torch.rand(4, dtype=torch.float64, device=device) + 1
    assert torch.autograd.gradcheck(lambda t, ww, bb: fusenorm.batch_norm(t, None, None, ww, bb, True), (x, w, b))
    assert torch.autograd.gradcheck(lambda t, ww, bb: fusenorm.batch_norm(t, rm, rv, ww, bb, False), (x, w, b))
    xc = channels_last(torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fusenorm.batch_norm(t, None, None, None, None, True), (xc,))
    # relu + residual, away from the kink
    assert torch.autograd.gradcheck(
        lambda t, zz, ww, bb: fusenorm.batch_norm(t, None, None, ww, bb, True, activation="relu", residual=zz),
        (x, z, w, b), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(4, 6, 5, 3, device=device)
    xc = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    ops = torch.ops.fusenorm
    for t in (x, xc):
        mean, var = ops.batch_norm_stats(t)
        y = ops.batch_norm_apply(t, mean, var, w, b, torch.randn_like(t), 1e-5, "relu")
        dy = torch.randn_like(t)
        torch.library.opcheck(ops.batch_norm_stats, (t,))
        torch.library.opcheck(ops.batch_norm_fwd, (t, w, b, None, 1e-5, "none"))
        torch.library.opcheck(ops.batch_norm_fwd, (t, None, None, torch.randn_like(t), 1e-5, "relu"))
        torch.library.opcheck(ops.batch_norm_apply, (t, mean, var, w, b, None, 1e-5, "none"))
        torch.library.opcheck(ops.batch_norm_apply, (t, mean, var, w, b, torch.randn_like(t), 1e-5, "relu"))
        torch.library.opcheck(ops.batch_norm_bwd, (dy, t, mean, var, w, y, 1e-5, True, "relu", [True, True, True, True]))
        torch.library.opcheck(ops.batch_norm_bwd, (dy, t, mean, var, None, None, 1e-5, False, "none",
                                                   [True, False, True, False]))
        torch.library.opcheck(ops.batch_norm_bwd_reduce, (dy, t, mean, var, 1e-5))
        torch.library.opcheck(ops.batch_norm_bwd_elemt, (dy, t, mean, var, w, mean, var, 1e-5))


@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_update_running_op(buf_dtype):
    """The CPU op behind the running-statistics update: torch.nn's rule in fp64, into buffers of any
    float dtype and stride; opcheck; mismatched sizes raise."""
    ops = torch.ops.fusenorm
    stat_dtype = torch.float64 if buf_dtype == torch.float64 else torch.float32
    rm = torch.randn(12).to(buf_dtype)[::2]  # a strided buffer
    rv = torch.rand(6).to(buf_dtype)
    mean, var = torch.randn(6, dtype=stat_dtype), torch.rand(6, dtype=stat_dtype)
    want_m = (0.7 * rm.double() + 0.3 * mean.double()).to(buf_dtype)
    want_v = (0.7 * rv.double() + 0.3 * (10 / 9) * var.double()).to(buf_dtype)
    ops.batch_norm_update_running(rm, rv, mean, var, 0.3, 10 / 9)
    torch.testing.assert_close(rm, want_m, atol=0, rtol=0)
    torch.testing.assert_close(rv, want_v, atol=0, rtol=0)
    torch.library.opcheck(ops.batch_norm_update_running, (rm.clone(), rv.clone(), mean, var, 0.1, 2.0))
    before = rm.clone()
    with pytest.raises(RuntimeError, match="running statistic"):  # the second pair checked before the first is written
        ops.batch_norm_update_running(rm, torch.zeros(5, dtype=buf_dtype), mean, var, 0.1, 2.0)
    assert torch.equal(rm, before)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph(layout, momentum):
    """torch.compile keeps the ops and the in-place buffer updates: same outputs, same buffers."""
    theirs = torch.nn.BatchNorm2d(4, momentum=momentum)
    ours = fusenorm.BatchNorm2d(4, momentum=momentum)
    compiled = torch.compile(ours, fullgraph=True)
    for step in range(3):
        x = torch.randn(2, 4, 6, 6) * 2 + 1
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        y = compiled(x)
        torch.testing.assert_close(y, theirs(x), atol=1e-5, rtol=1e-5)
        y.sum().backward()
    for (k, a), (_, t) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, t, atol=1e-5, rtol=1e-5, msg=k)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(torch.compile(ours, fullgraph=True)(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_is_deterministic(device, layout):
    x = torch.randn(16, 32, 17, 19, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    m = fusenorm.BatchNorm2d(32).to(device)
    x.requires_grad_()
    dy = torch.randn_like(x)
    grads = [torch.autograd.grad(m(x), [x, m.weight, m.bias], dy) for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


class _TorchNS:
    """torch.nn's classes and torch.nn.functional under fusenorm's names."""
    BatchNorm1d, BatchNorm2d, BatchNorm3d = torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d
    SyncBatchNorm, functional = torch.nn.SyncBatchNorm, F


def test_errors_match_torch():
    cases = [
        lambda ns: ns.BatchNorm2d(3)(torch.randn(1, 3, 1, 1)),          # one value per channel in training
        lambda ns: ns.BatchNorm1d(3)(torch.randn(1, 3)),                # same, 2-D input
        lambda ns: ns.BatchNorm2d(3)(torch.randn(2, 3, 4)),             # wrong rank
        lambda ns: ns.BatchNorm1d(3)(torch.randn(2, 3, 4, 4)),          # wrong rank
        lambda ns: ns.BatchNorm3d(3)(torch.randn(2, 3, 4, 4)),          # wrong rank
        lambda ns: ns.BatchNorm2d(3).eval()(torch.randn(2, 4, 3, 3)),   # channel mismatch (running stats)
        lambda ns: ns.BatchNorm2d(3)(torch.randn(2, 4, 3, 3)),          # channel mismatch in training
        lambda ns: ns.BatchNorm2d(3, eps=0.0)(torch.randn(2, 3, 2, 2)),  # eps must be > 0 in training
        lambda ns: ns.BatchNorm1d(3, eps=-1e-5)(torch.randn(4, 3)),      # eps < 0
        lambda ns: ns.BatchNorm1d(3, eps=-1e-5).eval()(torch.randn(4, 3)),  # eps < 0 in eval too
        lambda ns: ns.BatchNorm3d(3, eps=0.0)(torch.randn(2, 4, 2, 2, 2)),  # eps before channel mismatch
        lambda ns: ns.BatchNorm1d(3, eps=0.0)(torch.randn(1, 3)),        # one value per channel before eps
        lambda ns: ns.SyncBatchNorm(3, eps=0.0)(torch.randn(2, 3, 2, 2)),  # no process group: batch_norm's rule
        lambda ns: ns.functional.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True,
                                            eps=-0.5),
        # running buffers on another device (meta), in training and in eval
        lambda ns: ns.functional.batch_norm(torch.randn(4, 3), torch.zeros(3, device="meta"),
                                            torch.ones(3, device="meta"), training=True),
        lambda ns: ns.functional.batch_norm(torch.randn(4, 3), torch.zeros(3, device="meta"),
                                            torch.ones(3, device="meta"), training=False),
        lambda ns: ns.BatchNorm1d(3).to("meta")(torch.randn(4, 3)),
        # SyncBatchNorm with track_running_stats switched on after construction: no counter
        lambda ns: setattr(m := ns.SyncBatchNorm(3, track_running_stats=False), "track_running_stats", True)
        or m(torch.randn(2, 3, 2, 2)),
        # running statistics that require grad (grad mode on), in training and in eval
        lambda ns: ns.functional.batch_norm(torch.randn(4, 3), torch.zeros(3, requires_grad=True), torch.ones(3),
                                            training=True),
        lambda ns: ns.functional.batch_norm(torch.randn(4, 3, 2), torch.zeros(3), torch.ones(3, requires_grad=True),
                                            training=False),
        # ... after the weight's size, before the buffers' dtype rule (torch's order)
        lambda ns: ns.functional.batch_norm(torch.randn(4, 3), torch.zeros(3, requires_grad=True), torch.ones(3),
                                            torch.ones(4), training=True),
        lambda ns: ns.functional.batch_norm(torch.randn(4, 3), torch.zeros(3, requires_grad=True, dtype=torch.float64),
                                            torch.ones(3), training=True),
    ]
    for call in cases:
        with pytest.raises(Exception) as theirs:
            call(_TorchNS)
        with pytest.raises(Exception) as ours:
            call(fusenorm)
        assert type(ours.value) is type(theirs.value), (ours.value, theirs.value)
        assert str(ours.value) == str(theirs.value)
    assert fusenorm.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), eps=0.0).isfinite().all()  # eval: 0
    for x in (torch.randn(()), torch.randn(4)):  # fewer than 2 dims: torch's exception types
        assert_raises_like(lambda f: f(x, torch.zeros(4), torch.ones(4), training=True), F.batch_norm,
                           fusenorm.batch_norm)
    for training in (True, False):  # an empty input: no error, as torch (it returns before its check)
        rm = torch.zeros(3, requires_grad=True)
        assert fusenorm.batch_norm(torch.randn(0, 3, 2), rm, torch.ones(3), training=training).shape == (0, 3, 2)
    with torch.no_grad():  # no error there, as torch: the buffers are updated
        rm = torch.zeros(3, requires_grad=True)
        fusenorm.batch_norm(torch.randn(4, 3) + 1, rm, torch.ones(3), training=True)
        assert rm.abs().min() > 0
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        fusenorm.batch_norm(torch.randn(2, 3), None, None, training=False)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        fusenorm.batch_norm(torch.randn(2, 3, 4), None, None, torch.ones(4), training=True)
    with pytest.raises(NotImplementedError):
        fusenorm.batch_norm(torch.randint(0, 3, (2, 3)), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="activation"):
        fusenorm.BatchNorm2d(3, activation="silu")


def test_drop_in_modules():
    for t_cls, o_cls in MODS.values():
        for kw in ({}, {"affine": False}, {"track_running_stats": False}, {"momentum": None, "eps": 1e-3}):
            theirs, ours = t_cls(6, **kw), o_cls(6, **kw)
            assert list(ours.state_dict()) == list(theirs.state_dict())
            ours.load_state_dict(theirs.state_dict())
            theirs.load_state_dict(ours.state_dict())
            assert repr(ours) == repr(theirs)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(100, 8), torch.nn.BatchNorm1d(8))
    ref = copy.deepcopy(model)
    fusenorm.convert(model)
    assert type(model[1]) is fusenorm.BatchNorm2d and type(model[4]) is fusenorm.BatchNorm1d
    x = torch.randn(5, 3, 7, 7)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    model(x).sum().backward()
    sync = fusenorm.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    assert type(sync[1]) is fusenorm.SyncBatchNorm and type(sync[4]) is fusenorm.SyncBatchNorm
    assert list(sync.state_dict()) == list(torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)).state_dict())
    # without a process group SyncBatchNorm is a BatchNorm
    torch.testing.assert_close(sync(x), ref(x), atol=1e-5, rtol=1e-5)


def test_no_channels_and_bad_running_buffers():
    """C = 0 gives empty outputs (it used to divide by zero in the channels-last path); one running
    buffer alone, or buffers of the wrong rank or dtype, raise as torch.nn's do."""
    for shape in [(4, 0), (4, 0, 1), (4, 0, 3, 3)]:
        x = torch.randn(shape, requires_grad=True)
        y = fusenorm.batch_norm(x, None, None, training=True)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
    x = torch.randn(4, 3, 5)
    for rm, rv in [(torch.zeros(3), None), (None, torch.ones(3))]:
        with pytest.raises(ValueError, match="both be None"):
            fusenorm.batch_norm(x, rm, rv, training=True)
    bad = [(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), x),
           (torch.zeros(1, 3), torch.ones(1, 3), x),
           (torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16), x)]
    for rm, rv, inp in bad:
        for training in (True, False):
            with pytest.raises(RuntimeError):
                F.batch_norm(inp, rm.clone(), rv.clone(), training=training)
            before = rm.clone()
            with pytest.raises(RuntimeError):
                fusenorm.batch_norm(inp, rm, rv, training=training)
            assert torch.equal(rm, before)
    # fp32 buffers with a half input are allowed (torch's mixed precision)
    xh = x.bfloat16()
    fusenorm.batch_norm(xh, torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3), training=True)


def test_cumulative_momentum_in_fp64():
    """momentum=None: the factor 1 / num_batches_tracked is exact for fp64 buffers, as torch's."""
    mods = []
    for cls in (torch.nn.BatchNorm1d, fusenorm.BatchNorm1d):
        torch.manual_seed(0)
        m = cls(2, momentum=None).double()
        for _ in range(3):
            m(torch.randn(8, 2, dtype=torch.float64))
        mods.append(m)
    torch.testing.assert_close(mods[1].running_mean, mods[0].running_mean, atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(mods[1].running_var, mods[0].running_var, atol=1e-15, rtol=1e-14)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_relu_keeps_nan(layout):
    """relu(NaN) is NaN, as torch.relu (max(z, 0) had turned it into 0)."""
    x = torch.randn(3, 4, 5, 6)
    x[1, 2, 3, 4] = float("nan")
    if layout == "channels_last":
        x = channels_last(x)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    y = fusenorm.batch_norm(x, rm, rv, activation="relu")
    torch.testing.assert_close(y, F.relu(F.batch_norm(x, rm, rv)), equal_nan=True)
    assert y.isnan().sum() == 1


def test_eps_and_momentum_types_as_torch():
    """eps and momentum as torch's argument parser takes a float (conftest.FLOAT_ARGS_OK / _BAD):
    the same outputs and buffers, or torch's TypeError."""
    x = torch.randn(4, 3, 5)
    for v in FLOAT_ARGS_OK:
        for kw in ({"eps": v}, {"momentum": v}):
            bufs = [(torch.zeros(3), torch.ones(3)) for _ in range(2)]
            torch.testing.assert_close(fusenorm.batch_norm(x, *bufs[0], training=True, **kw),
                                       F.batch_norm(x, *bufs[1], training=True, **kw))
            torch.testing.assert_close(bufs[0], bufs[1])
    for v in FLOAT_ARGS_BAD:
        for kw in ({"eps": v}, {"momentum": v}):
            for f in (F.batch_norm, fusenorm.batch_norm):
                with pytest.raises(TypeError):
                    f(x, torch.zeros(3), torch.ones(3), training=True, **kw)


@pytest.mark.parametrize("training", [True, False])
def test_weight_of_any_shape_with_c_values(training):
    """torch.batch_norm takes a weight or bias of any shape holding C values ([C, 1], [2, 2], 0-D
    for C = 1); its backward then fails, ours gives the gradient in the parameter's shape."""
    for x, shape in ((torch.randn(4, 4, 3), (4, 1)), (torch.randn(4, 4, 3), (2, 2)), (torch.randn(4, 1, 3), ())):
        c = x.size(1)
        w, b = torch.randn(shape), torch.randn(shape)
        stats = lambda: (torch.randn(c), torch.rand(c) + 0.5)  # noqa: E731
        torch.manual_seed(0)
        want = F.batch_norm(x, *stats(), w, b, training)
        torch.manual_seed(0)
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        got = fusenorm.batch_norm(x, *stats(), wg, bg, training)
        torch.testing.assert_close(got, want)
        dy = torch.randn_like(got)
        dw, db = torch.autograd.grad(got, (wg, bg), dy)
        w1, b1 = w.reshape(c).requires_grad_(), b.reshape(c).requires_grad_()
        torch.manual_seed(0)
        ref = torch.autograd.grad(F.batch_norm(x, *stats(), w1, b1, training), (w1, b1), dy)
        assert dw.shape == w.shape and db.shape == b.shape
        torch.testing.assert_close(dw, ref[0].reshape(shape))
        torch.testing.assert_close(db, ref[1].reshape(shape))


def test_raw_ops_check_grad_output_and_vectors():
    """grad_output must be floating point (an integer one was cast silently) and the per-channel
    vectors 1-D (a [C, 1] weight was taken by its element count)."""
    x = torch.randn(4, 3, 5)
    y, mean, var = torch.ops.fusenorm.batch_norm_fwd(x, None, None, None, 1e-5, "none")
    dyi = torch.ones(4, 3, 5, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="floating"):
        torch.ops.fusenorm.batch_norm_bwd(dyi, x, mean, var, None, None, 1e-5, True, "none", [True, False, False, False])
    with pytest.raises(RuntimeError, match="floating"):
        torch.ops.fusenorm.batch_norm_bwd_reduce(dyi, x, mean, var, 1e-5)
    with pytest.raises(RuntimeError, match="floating"):
        torch.ops.fusenorm.group_norm_bwd(dyi, x, *torch.ops.fusenorm.group_norm_fwd(x, 3, None, None, 1e-5, "none")[1:],
                                          3, None, None, None, "none", [True, False, False])
    with pytest.raises(RuntimeError, match="1-D"):
        torch.ops.fusenorm.batch_norm_fwd(x, torch.ones(3, 1), None, None, 1e-5, "none")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(64, 4, 32, 32), (2048, 4, 7, 7), (2, 2, 256, 256)], ids=str)
def test_long_channels_of_repeated_values(device, layout, shape):
    """Channels of 65536-131072 ReLU-like fp32 values (half of them 0), in runs of 1024, 49 and
    65536 values: training statistics as precise as torch.nn (lanes over a channel's runs lost 4e-5
    of y)."""
    x = torch.relu(torch.randn(*shape, device=device))
    x = channels_last(x) if layout == "channels_last" else x
    assert_fp32_like_torch(lambda t: fusenorm.batch_norm(t, None, None, training=True),
                           lambda t: F.batch_norm(t, None, None, training=True), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("need_params", [False, True])  # dx alone, and with the weight gradient's sums
def test_eval_backward_does_not_read_x(device, layout, need_params):
    """Eval: dx = dy * w * rstd, as torch.nn, so a NaN or infinite input leaves its dx finite."""
    x = torch.randn(4, 6, 5, 5, device=device)
    x[0, 1, 2, 3], x[1, 2, 0, 0], x[3, 5, 4, 4] = float("nan"), float("inf"), -float("inf")
    x = channels_last(x) if layout == "channels_last" else x
    rm, rv = torch.randn(6, device=device), torch.rand(6, device=device) + 0.5
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    dy = torch.randn_like(x)
    out = []
    for f in (F.batch_norm, fusenorm.batch_norm):
        xl = x.clone().requires_grad_()
        wl, bl = w.clone().requires_grad_(need_params), b.clone().requires_grad_(need_params)
        grads = torch.autograd.grad(f(xl, rm, rv, wl, bl, False), [xl] + ([wl, bl] if need_params else []), dy)
        out.append(grads)
    assert out[1][0].isfinite().all()
    torch.testing.assert_close(out[1][0], out[0][0])
    if need_params:  # dbias is finite; dweight is NaN in the channels of the non-finite inputs, as torch's
        torch.testing.assert_close(out[1][2], out[0][2])
        torch.testing.assert_close(out[1][1], out[0][1], equal_nan=True)


def test_argument_checks_as_torch():
    """Parameter dtype mixes, argument types and eps values that torch.nn.functional.batch_norm and
    instance_norm reject (the same exception type) or take."""
    x = torch.randn(4, 3, 5)
    f32, bf = (lambda: torch.ones(3)), (lambda: torch.ones(3, dtype=torch.bfloat16))
    xb = x.bfloat16()
    calls = [
        # a half input's parameters and buffers: all its dtype or all fp32
        lambda f: f(xb, f32(), f32(), bf(), bf(), training=False),
        lambda f: f(xb, bf(), bf(), f32(), None, training=True),
        lambda f: f(xb, f32(), bf(), None, None, training=True),
        # argument types: training a bool, momentum a float
        lambda f: f(x, None, None, training=1),
        lambda f: f(x, f32(), f32(), training=False, momentum=None),
    ]
    for call in calls:
        assert_raises_like(call, F.batch_norm, fusenorm.batch_norm)
    in_calls = [
        lambda f: f(x, torch.zeros(3), torch.ones(3, dtype=torch.float64)),  # buffers of two dtypes
        lambda f: f(x, torch.zeros(3), torch.ones(3, dtype=torch.float64), use_input_stats=False),
        lambda f: f(x, use_input_stats=1),
    ]
    for call in in_calls:
        assert_raises_like(call, F.instance_norm, fusenorm.instance_norm)
    # taken by torch: fp32 buffers of a bf16 input with no parameters, a NaN eps in training, a
    # negative eps in instance_norm's eval
    for f in (F.batch_norm, fusenorm.batch_norm):
        f(xb, f32(), f32(), None, None, training=True)
        assert f(x, None, None, training=True, eps=float("nan")).isnan().all()
    rm, rv = torch.randn(3), torch.rand(3) + 1
    torch.testing.assert_close(fusenorm.instance_norm(x, rm, rv, use_input_stats=False, eps=-1e-3),
                               F.instance_norm(x, rm, rv, use_input_stats=False, eps=-1e-3))


@pytest.mark.parametrize("momentum", [np.float32(0.2), torch.tensor(0.2), 0.2], ids=["np_float32", "tensor_fp32", "float"])
@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm"])
def test_fp32_scalar_momentum_updates_as_torch(momentum, fn):
    """A float32 momentum (numpy's, or a 0-d tensor) is taken as torch takes it, in fp64: the
    fp64 buffers after 20 updates match torch's to 1e-12."""
    x = torch.randn(4, 3, 6, dtype=torch.float64) + 80
    bufs = {lib: (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)) for lib in ("t", "o")}
    for _ in range(20):
        if fn == "batch_norm":
            F.batch_norm(x, *bufs["t"], training=True, momentum=momentum)
            fusenorm.batch_norm(x, *bufs["o"], training=True, momentum=momentum)
        else:
            F.instance_norm(x, *bufs["t"], momentum=momentum)
            fusenorm.instance_norm(x, *bufs["o"], momentum=momentum)
    for t, o in zip(bufs["t"], bufs["o"]):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=0)  # the fp32 weights missed by 2e-8 a step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_half_input_fp32_bias_gradient_in_fp32(dtype, training):
    """A half input with an fp32 bias and no weight: dbias is the fp32 sum, as torch's (it was
    rounded to the input's dtype first)."""
    x = torch.randn(64, 3, 8, 8).to(dtype)
    rm, rv = torch.zeros(3), torch.ones(3)
    grads = []
    for f in (F.batch_norm, fusenorm.batch_norm):
        b = torch.zeros(3, requires_grad=True)
        y = f(x, rm.clone(), rv.clone(), None, b, training)
        (db,) = torch.autograd.grad(y, b, torch.ones_like(y) * 1.1)
        grads.append(db)
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (40, 2, 64, 64)], ids=["fused", "two-step"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_nonfinite_value_running_stats_as_torch(device, layout, shape, value, first):
    """A channel holding one infinity has an infinite mean: running_mean gets it, as torch's, also
    when it is the channel's first value (the pivot of the exact two-pass statistics, which is then
    taken as 0) and when partial statistics after its own are merged into it (merged_mean).
    running_var and the channel's y are NaN in both; the other channels are unchanged."""
    x = torch.randn(shape, device=device)
    x[(0, 1, 0, 0) if first else (shape[0] // 2, 1, 3, 2)] = value
    x = channels_last(x) if layout == "channels_last" else x
    theirs = torch.nn.BatchNorm2d(shape[1]).to(device)
    ours = fusenorm.BatchNorm2d(shape[1]).to(device)
    ref = torch.nn.BatchNorm2d(shape[1]).to(device).double()  # torch's fp32 is 1e-4 off on one thread
    y_theirs, y_ours, y_ref = theirs(x), ours(x), ref(x.double())
    for o, t, r in ((ours.running_mean, theirs.running_mean, ref.running_mean),
                    (ours.running_var, theirs.running_var, ref.running_var), (y_ours, y_theirs, y_ref)):
        assert torch.equal(o.isnan(), t.isnan()) and torch.equal(o.isinf(), t.isinf())
        torch.testing.assert_close(o, r.float(), equal_nan=True, atol=1e-5, rtol=1e-5)
    assert ours.running_mean[1].item() == theirs.running_mean[1].item() or value != value
    mean, var = torch.ops.fusenorm.batch_norm_stats(x)  # SyncBatchNorm's local statistics
    ref = x.double().transpose(0, 1).reshape(shape[1], -1).mean(1)
    torch.testing.assert_close(mean.double(), ref, equal_nan=True, atol=1e-5, rtol=1e-5)


def test_empty_input_as_torch():
    """An input without values returns before any check of the buffers, weight or bias, as torch's
    batch_norm does (a copy, times weight[0], plus bias[0]); fewer than 2 dims raise torch's types."""
    cases = [
        lambda f: f(torch.randn(0, 3, 2), torch.zeros(4), torch.ones(4), training=True),   # buffers of 4
        lambda f: f(torch.randn(0, 3, 2), None, None, torch.ones(4) * 2, torch.ones(5), training=True),
        lambda f: f(torch.randn(0, 3, 2), torch.zeros(3, dtype=torch.float64), torch.ones(3), training=True),
        lambda f: f(torch.randn(0, 3, 2), None, None, training=False),                      # eval without buffers
        lambda f: f(torch.zeros(0, 3, 2, dtype=torch.long), torch.zeros(3), torch.ones(3), training=True),
        lambda f: f(torch.randn(0), torch.zeros(4), torch.ones(4), training=False),          # 1-D, empty
        lambda f: f(torch.randn(0, 3), None, None, torch.ones(3, requires_grad=True), training=True),
    ]
    for call in cases:
        theirs, ours = call(F.batch_norm), call(fusenorm.batch_norm)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert ours.requires_grad == theirs.requires_grad
    for call in [lambda f: f(torch.randn(0, 3, 2), None, None, torch.ones(0), training=True),  # weight[0]: IndexError
                 lambda f: f(torch.randn(1), torch.zeros(4), torch.ones(4), training=True),     # ValueError
                 lambda f: f(torch.randn(4), torch.zeros(4), torch.ones(4), training=False)]:   # RuntimeError
        assert_raises_like(call, F.batch_norm, fusenorm.batch_norm)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dims", [2, 4])
def test_compile_dynamic_batch_compiles_once(momentum, dims):
    """torch.compile(dynamic=True) in training: no recompilation for later batch sizes (the
    running-update factor count / (count - 1) is symbolic; it had specialized, one recompile per
    size), with torch.nn's outputs, gradients and buffers."""
    ours, theirs = fusenorm.BatchNorm2d(3, momentum=momentum), torch.nn.BatchNorm2d(3, momentum=momentum)
    if dims == 2:
        ours, theirs = fusenorm.BatchNorm1d(3, momentum=momentum), torch.nn.BatchNorm1d(3, momentum=momentum)
    assert_compiles_once_as_torch(ours, theirs, [(n, 3) + (4, n) * (dims == 4) for n in (2, 3, 5, 6)])


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_activation_checkpointing_updates_as_torch(use_reentrant, momentum):
    """torch.utils.checkpoint recomputes the forward in the backward; torch.nn.BatchNorm's buffers
    are updated by both runs (its recomputation stops after the op that updates them). Ours match,
    num_batches_tracked included, with the same outputs and gradients; they were updated once under
    the non-reentrant checkpoint."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ours, theirs = fusenorm.BatchNorm2d(4, momentum=momentum), torch.nn.BatchNorm2d(4, momentum=momentum)
    for step in range(2):
        x0 = torch.randn(3, 4, 5, 6) * 2 + 1
        got = []
        for m in (ours, theirs):
            x = x0.clone().requires_grad_()
            y = checkpoint(lambda a: m(a * 2), x, use_reentrant=use_reentrant)
            y.pow(2).sum().backward()
            got.append((y.detach(), x.grad, m.weight.grad.clone()))
            m.weight.grad = None
        for a, t in zip(*got):
            torch.testing.assert_close(a, t, atol=1e-4, rtol=1e-4)
        for (k, a), (_, t) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, t, atol=1e-5, rtol=1e-5, msg=k)
    assert ours.num_batches_tracked.item() == 4
