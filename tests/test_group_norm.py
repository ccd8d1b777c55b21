"""fusenorm.group_norm / fusenorm.GroupNorm against torch.nn (+ the activation), both layouts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_ARGS_BAD, FLOAT_ARGS_OK
from conftest import (CUDA_SKIP, DEVICES, DTYPES, HAS_CUDA, assert_close_as_torch, assert_fp32_like_torch, assert_raises_like,
                      big_bf16_normal, channels_last)

import fusenorm

ACTS = {None: lambda t: t, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}

# (shape, groups): odd channel counts, 1d/2d/3d, groups = 1 and groups = C
SHAPES = [
    ((2, 6, 13, 17), 3),
    ((3, 33, 5), 11),
    ((1, 9, 7, 7, 7), 3),
    ((2, 12, 4, 4), 1),
    ((2, 8, 3, 5), 8),
    ((4, 6), 2),
    ((1, 64, 9, 9), 32),
]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x
    if layout == "channels_last":
        return channels_last(x)
    return x[..., ::2] if x.dim() > 2 else x.t().contiguous().t()  # strided: computed from a copy


def _reference(x, groups, w, b, act, dy):
    """torch.nn in x's dtype and in fp64. torch's CUDA GroupNorm rejects a half input with fp32
    parameters that its CPU kernel takes, so the same-dtype reference falls back to the CPU there;
    a bias without a weight fails in torch 2.11's backward (CPU and CUDA), so the reference adds
    that bias after a plain group_norm."""
    out = []
    for cast in (lambda t: t, lambda t: t.double()):
        for where in (None, "cpu"):
            move = (lambda t: t) if where is None else (lambda t: t.cpu())
            leaves = [None if t is None else move(cast(t)).detach().requires_grad_() for t in (x, w, b)]
            try:
                if leaves[1] is None and leaves[2] is not None:  # torch 2.11's backward fails here: add b apart
                    shape = [1, -1] + [1] * (x.dim() - 2)
                    y = ACTS[act](F.group_norm(leaves[0], groups, None, None, 1e-5) + leaves[2].view(shape))
                else:
                    y = ACTS[act](F.group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5))
                grads = torch.autograd.grad(y, [t for t in leaves if t is not None], move(cast(dy)))
                break
            except RuntimeError:
                if where is not None or not x.is_cuda:
                    raise
        it = iter(grads)
        res = (y.detach(),) + tuple(next(it) if t is not None else None for t in leaves)
        out.append(tuple(None if t is None else t.to(x.device) for t in res))
    return out


def _check(device, dtype, shape, groups, layout, act, affine=(True, True), pdtype=None):
    x = _layout(torch.randn(shape, dtype=dtype, device=device), layout)
    c = x.shape[1]
    pdtype = pdtype or dtype
    w = torch.randn(c, dtype=pdtype, device=device) if affine[0] else None
    b = torch.randn(c, dtype=pdtype, device=device) if affine[1] else None
    dy = torch.randn_like(x)
    theirs, ref = _reference(x, groups, w, b, act, dy)
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w, b)]
    y = fusenorm.group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5, activation=act)
    if layout != "strided":
        assert y.stride() == x.stride(), "the output keeps the input's memory format"
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    it = iter(grads)
    ours = (y.detach(),) + tuple(next(it) if t is not None else None for t in leaves)
    group_len = max(1, x.numel() // max(1, x.shape[0] * groups))
    for name, o, t, r in zip(("y", "dx", "dw", "db"), ours, theirs, ref):
        if r is None:
            continue
        scale = math.sqrt(group_len) if name == "dx" else (math.sqrt(x.numel() / c) if name in ("dw", "db") else 1.0)
        assert_close_as_torch(o, t, r, dtype, f"{name} {shape} G={groups} {layout} {act}", scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=str)
def test_matches_torch(device, dtype, layout, shape, groups):
    _check(device, dtype, shape, groups, layout, None)


# The CUDA single-pass forward (cuda/onchip_norm.cuh): FUSENORM_ONCHIP_BYTES sets the shared
# memory per block, so these units ((n, group) in contiguous layout, (n, chunk of groups) in
# channels-last) are split across clusters of 1 to 16 blocks or refused (0, and units beyond 16
# blocks: the two-pass kernels). groups = C is InstanceNorm; C = 320 with 32 groups is a UNet's.
@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=CUDA_SKIP)])
@pytest.mark.parametrize("budget", ["default", "0", "1024", "256"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,groups,act", [((2, 6, 16, 16), 3, "silu"), ((3, 9, 5, 7), 3, "gelu"),
                                              ((2, 4, 14, 14), 4, "relu"), ((1, 8, 32, 32), 2, None),
                                              ((2, 320, 8, 8), 32, "silu"), ((1, 64, 9, 11), 64, None),
                                              ((1, 160, 1, 3), 1, None)], ids=str)  # 3 rows: K > R at 1024
def test_onchip_clusters(device, budget, dtype, layout, shape, groups, act, monkeypatch):
    if budget != "default":
        monkeypatch.setenv("FUSENORM_ONCHIP_BYTES", budget)
    x = _layout((torch.randn(shape, device=device) * 2 + 1).to(dtype), layout)
    c = shape[1]
    w, b = torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
    y, mean, rstd = torch.ops.fusenorm.group_norm_fwd(x, groups, w, b, 1e-5, act or "none")
    outs = [ACTS[act](F.group_norm(t(x), groups, t(w), t(b), 1e-5)) for t in (lambda v: v, lambda v: v.double())]
    assert_close_as_torch(y, outs[0], outs[1], dtype, "group_norm y")
    xd = x.double().reshape(shape[0] * groups, -1)
    torch.testing.assert_close(mean.double().reshape(-1), xd.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double().reshape(-1), (xd.var(1, unbiased=False) + 1e-5).rsqrt(), atol=1e-5,
                               rtol=1e-4)
    assert y.stride() == x.stride()
    again = torch.ops.fusenorm.group_norm_fwd(x, groups, w, b, 1e-5, act or "none")
    assert all(torch.equal(a, o) for a, o in zip(again, (y, mean, rstd)))  # a fixed merge order


@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=CUDA_SKIP)])
@pytest.mark.parametrize("layout,kernel", [("contiguous", "onchip_norm_fwd_kernel"),
                                           ("channels_last", "onchip_nsc_fwd_kernel")])
def test_onchip_kernel_runs(device, layout, kernel):
    """At a UNet shape the default budget runs the single-pass kernel of the layout (a silent fallback
    to the two-pass kernels would still pass the value tests); the profiler names the kernels."""
    x = _layout(torch.randn(2, 320, 16, 16, device=device), layout)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.fusenorm.group_norm_fwd(x, 32, None, None, 1e-5, "silu")
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert any(kernel in k for k in names), names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("budget", ["default", "1024"])  # CUDA: the on-chip paths in one block, in clusters
def test_large_mean_tiny_variance(device, layout, budget, monkeypatch):
    """x = 1e4 + 1e-2 * noise in fp32: the group statistics and y stay close to fp64 (each sum is
    relative to a pivot of its group, and the variance is the exact two-pass one)."""
    if budget != "default":
        monkeypatch.setenv("FUSENORM_ONCHIP_BYTES", budget)
    x = _layout(1e4 + 1e-2 * torch.randn(3, 32, 12, 12, device=device), layout)
    y, mean, rstd = torch.ops.fusenorm.group_norm_fwd(x, 8, None, None, 1e-5, "none")
    xg = x.double().reshape(3, 8, -1)
    assert (mean.double().reshape(3, 8) - xg.mean(2)).abs().max() <= 1e-3  # one ulp of 1e4
    torch.testing.assert_close(rstd.double().reshape(3, 8), (xg.var(2, unbiased=False) + 1e-5).rsqrt(),
                               rtol=1e-4, atol=0)
    # y has unit variance; an fp32 mean near 1e4 is only known to half an ulp (0.05 std)
    assert (y.double() - F.group_norm(x.double(), 8, eps=1e-5)).abs().max() < 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("c,s", [(24, 64), (36, 13)])
def test_relu_gradient_follows_its_output(device, layout, dtype, c, s):
    """activation="relu": the gradient flows exactly where y > 0, as torch's relu backward (masked
    by the output). Mean >> spread puts many pre-activations within rounding of 0, where a mask
    recomputed from x could land on the other side. C = 36, S = 13: the vector blocks and their
    scalar tails in both layouts."""
    for seed in range(24):
        g = torch.Generator().manual_seed(seed)
        x = _layout((torch.randn(2, c, s, 1, generator=g, dtype=torch.float64) * 0.1 + 10).to(dtype), layout)
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
        w, b = torch.randn(c, generator=g, dtype=pdtype), torch.randn(c, generator=g, dtype=pdtype)
        x, w, b = (t.to(device).requires_grad_() for t in (x, w, b))
        y = fusenorm.group_norm(x, 2, w, b, activation="relu")
        _, db = torch.autograd.grad(y, (x, b), torch.ones_like(y))
        torch.testing.assert_close(db, (y > 0).sum((0, 2, 3)).to(db.dtype), rtol=0, atol=0)
        y = fusenorm.instance_norm(x, None, None, w, b, activation="relu")
        (db,) = torch.autograd.grad(y, b, torch.ones_like(y))
        torch.testing.assert_close(db, (y > 0).sum((0, 2, 3)).to(db.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c,s", [(24, 64), (36, 13), (64, 7), (3, 20)])
def test_relu_backward_op_masks_by_y(device, layout, dtype, c, s):
    """group_norm_bwd with "relu" takes its mask from the y it is given (y > 0, NaN passes), in
    every path (vector blocks, their tails, both layouts): the same gradients as the backward of no
    activation on the masked dy. A y unrelated to x, so a mask recomputed from x fails."""
    g = torch.Generator().manual_seed(c * 100 + s)
    x, dy, y = (torch.randn(2, c, s, 1, generator=g) for _ in range(3))
    y.view(-1)[::7] = 0
    y.view(-1)[::11] = float("nan")
    x, dy, y = (_layout(t.to(dtype), layout).to(device) for t in (x, dy, y))
    w, b = (torch.randn(c, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32).to(device)
            for _ in range(2))
    groups = math.gcd(c, 4)
    _, mean, rstd = torch.ops.fusenorm.group_norm_fwd(x, groups, w, b, 1e-5, "relu")
    got = torch.ops.fusenorm.group_norm_bwd(dy, x, mean, rstd, groups, w, b, y, "relu", [True, True, True])
    masked = torch.where(y > 0, dy, 0).where(~y.isnan(), dy)
    want = torch.ops.fusenorm.group_norm_bwd(masked, x, mean, rstd, groups, w, b, None, "none", [True, True, True])
    for name, a, e in zip(("dx", "dw", "db"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=name)
    with pytest.raises(RuntimeError, match="needs the forward output y"):
        torch.ops.fusenorm.group_norm_bwd(dy, x, mean, rstd, groups, w, b, None, "relu", [True, True, True])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_long_groups_of_repeated_values(device, layout):
    """Groups of 4x256x256 ReLU-like fp32 values (half of them 0): as precise as torch.nn (partial
    sums over whole groups lost 2e-4 of y)."""
    x = _layout(torch.relu(torch.randn(1, 8, 256, 256, device=device)), layout)
    assert_fp32_like_torch(lambda t: fusenorm.group_norm(t, 2), lambda t: F.group_norm(t, 2), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels", [12, 16])  # CPU: 8 vector + 4 scalar channels, and vectors only
def test_fused_activation(device, act, layout, dtype, channels):
    _check(device, dtype, (2, channels, 6, 7), 4, layout, act)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gelu_over_its_whole_range(device, layout):
    """GELU on z from -12 to 12, across the CPU's polynomial pieces (|z| < sqrt 2, up to 4 sqrt 2 and
    the clamped tail): y within 2e-6 relative (1e-6 absolute) of fp64 GELU of our own fp32 z, and the
    gradients against fp64 as torch's are."""
    s = 4096
    ramp = torch.linspace(-12, 12, s, dtype=torch.float64, device=device)
    # 16 channels (the 8-channel vector path of channels-last), 2 groups: each channel a shifted ramp
    x = torch.stack([ramp.roll(37 * c) for c in range(16)]).reshape(1, 16, 64, 64)
    sd = x.reshape(2, -1).std(1, correction=0)
    w = sd.repeat_interleave(8)  # z = (x - mean) / sd * sd: z spans the ramp
    xf, wf = _layout(x.float(), layout), w.float()
    y = fusenorm.group_norm(xf, 2, wf, eps=0.0, activation="gelu").double()
    z = fusenorm.group_norm(xf, 2, wf, eps=0.0).double()
    assert z.min() < -11.9 and z.max() > 11.9
    ref = F.gelu(z)
    err = (y - ref).abs()
    assert err.max() <= 1e-6 and (err / ref.abs())[ref.abs() > 1e-6].max() <= 2e-6, err.max()
    # |z| up to 1e37 (a huge bias): y = 0 and z for negative and positive z, gradients 0 and 1
    big = torch.tensor([-1e37, -1e30, 1e30, 1e37], device=device)
    xb = _layout(torch.randn(4, 16, 4, 4, device=device), layout)
    for v in big:
        yb = fusenorm.group_norm(xb, 2, None, torch.full((16,), v.item(), device=device), activation="gelu")
        torch.testing.assert_close(yb, F.gelu(F.group_norm(xb, 2, None, torch.full((16,), v.item(), device=device))))
    bb = torch.full((16,), -1e37, device=device, requires_grad=True)
    xg = xb.clone().requires_grad_()
    fusenorm.group_norm(xg, 2, None, bb, activation="gelu").sum().backward()
    assert xg.grad.abs().max() == 0 and bb.grad.abs().max() == 0
    dy = torch.randn_like(x)
    grads = {}
    for name, fn, dt in [("ours", lambda *a: fusenorm.group_norm(*a, eps=0.0, activation="gelu"), torch.float32),
                         ("torch", lambda *a: F.gelu(F.group_norm(*a, eps=0.0)), torch.float32),
                         ("ref", lambda *a: F.gelu(F.group_norm(*a, eps=0.0)), torch.float64)]:
        leaves = [_layout(x.to(dt), layout).requires_grad_(), w.to(dt).requires_grad_()]
        grads[name] = torch.autograd.grad(fn(leaves[0], 2, leaves[1]), leaves, dy.to(dt))
    for i, what in enumerate(("dx", "dw")):
        assert_close_as_torch(grads["ours"][i], grads["torch"][i], grads["ref"][i], torch.float32, what,
                              scale=grads["ref"][i].abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [None, "silu"])
def test_parameter_grads_only(device, layout, act):
    """x without grad: no dx pass; dweight and dbias through the activation still match torch.nn."""
    x = _layout(torch.randn(2, 16, 6, 7, device=device), layout)
    w, b = torch.randn(16, device=device), torch.randn(16, device=device)
    dy = torch.randn_like(x)
    grads = []
    for fn in (lambda *a: ACTS[act](F.group_norm(*a)), lambda *a: fusenorm.group_norm(*a, activation=act)):
        leaves = [t.detach().requires_grad_() for t in (w, b)]
        grads.append(torch.autograd.grad(fn(x, 4, leaves[0], leaves[1]), leaves, dy))
    for theirs, ours in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [16, 12])  # 8-channel vector path, and its scalar fallback
def test_relu_blocks_nonfinite_grad_like_torch(device, layout, channels):
    """Where ReLU is 0, torch's backward drops the incoming gradient even when it is inf."""
    x = _layout(torch.randn(2, channels, 6, 7, device=device), layout)
    w, b = torch.randn(channels, device=device), torch.randn(channels, device=device)
    dy = torch.randn_like(x)
    dy[F.relu(F.group_norm(x, 4, w, b)) == 0] = float("inf")
    outs = []
    for fn in (lambda *a: F.relu(F.group_norm(*a)), lambda *a: fusenorm.group_norm(*a, activation="relu")):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        outs.append(torch.autograd.grad(fn(leaves[0], 4, leaves[1], leaves[2]), leaves, dy))
    for theirs, ours in zip(*outs):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("act", [None, "silu"])
def test_affine_combinations(device, affine, act):
    _check(device, torch.float32, (2, 6, 5, 5), 3, "channels_last", act, affine=affine)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_params(device):
    _check(device, torch.bfloat16, (2, 8, 6, 6), 4, "contiguous", "silu", pdtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    for layout in ("contiguous", "channels_last"):
        x = _layout(torch.randn(0, 6, 4, 4, device=device), layout).requires_grad_()
        m = fusenorm.GroupNorm(3, 6).to(device)
        y = m(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert torch.equal(m.weight.grad, torch.zeros_like(m.weight))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    for layout in ("contiguous", "channels_last"):
        for act in (None, "silu", "gelu"):
            x = _layout(torch.randn(2, 6, 3, 2, dtype=torch.float64, device=device), layout).requires_grad_()
            w = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
            b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
            assert torch.autograd.gradcheck(lambda *a: fusenorm.group_norm(a[0], 3, a[1], a[2], activation=act),
                                            (x, w, b))


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("shape,groups", [((3, 12, 5, 7), 4), ((2, 9, 11), 3), ((2, 16, 3, 4, 5), 16)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fp64_activation_matches_torch(act, shape, groups, layout):
    """fp64 with SiLU/GELU on CPU (torch's vectorized activation and its backward around the norm's
    own passes): y and every gradient within 1e-12 of torch.nn, in the input's layout."""
    x = _layout(torch.randn(shape, dtype=torch.float64), layout)
    w, b = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    dy = _layout(torch.randn(shape, dtype=torch.float64), layout)
    outs = []
    for fn in (lambda *a: fusenorm.group_norm(*a, activation=act), lambda *a: ACTS[act](F.group_norm(*a))):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(leaves[0], groups, leaves[1], leaves[2])
        outs.append((y, *torch.autograd.grad(y, leaves, dy)))
    for ours, theirs in zip(*outs):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    assert outs[0][0].stride() == x.stride() and outs[0][1].stride() == x.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 6, 4, 5, device=device)
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    for xx in (x, x.to(memory_format=torch.channels_last)):
        for act in ("silu", "relu"):
            torch.library.opcheck(torch.ops.fusenorm.group_norm_fwd.default, (xx, 3, w, b, 1e-5, act))
            y, mean, rstd = torch.ops.fusenorm.group_norm_fwd(xx, 3, w, b, 1e-5, act)
            torch.library.opcheck(torch.ops.fusenorm.group_norm_bwd.default,
                                  (torch.randn_like(y), xx, mean, rstd, 3, w, b, y, act, [True, True, True]))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    x = torch.randn(3, 12, 9, 9, device=device).to(memory_format=torch.channels_last).requires_grad_()
    m = fusenorm.GroupNorm(4, 12, activation="silu").to(device)
    dy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        x.grad = None
        m.zero_grad()
        m(x).backward(dy)
        runs.append((x.grad.clone(), m.weight.grad.clone(), m.bias.grad.clone()))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_compile_fullgraph_keeps_our_ops():
    m = fusenorm.GroupNorm(4, 8, activation="silu")
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    graphs = []

    def backend(gm, example_inputs):
        from torch._functorch.aot_autograd import aot_module_simplified

        def keep(g, _):
            graphs.append(str(g.graph))
            return g

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    y = torch.compile(m, fullgraph=True, backend=backend)(x)
    y.sum().backward()
    assert any("fusenorm.group_norm_fwd" in g for g in graphs)
    assert any("fusenorm.group_norm_bwd" in g for g in graphs)
    ref = F.silu(F.group_norm(x.detach(), 4, m.weight.detach(), m.bias.detach()))
    torch.testing.assert_close(y.detach(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x).detach(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_errors_match_torch(device):
    cases = [
        (lambda f: f(torch.randn(2, 6, 4, device=device), 4), "channels not divisible"),
        (lambda f: f(torch.randn(1, 6, device=device), 6), "one value per group"),
        (lambda f: f(torch.randn(6, device=device), 3), "rank 1"),
        (lambda f: f(torch.randn(2, 6, 4, device=device), 3, torch.randn(5, device=device)), "weight shape"),
        (lambda f: f(torch.ones(2, 6, 4, dtype=torch.long, device=device), 3), "integer input"),
        (lambda f: f(torch.randn(2, 6, 4, device=device), 3, [1.0] * 6), "weight not a tensor"),
        (lambda f: f(torch.randn(2, 6, 4, device=device), 3, None, "b"), "bias not a tensor"),
    ]
    for call, what in cases:
        with pytest.raises(Exception) as theirs:
            call(F.group_norm)
        with pytest.raises(Exception) as ours:
            call(fusenorm.group_norm)
        assert type(ours.value) is type(theirs.value), (what, ours.value, theirs.value)
    with pytest.raises(ValueError, match="activation"):
        fusenorm.GroupNorm(2, 4, activation="tanh")


def test_drop_in_module():
    theirs = torch.nn.GroupNorm(4, 12, eps=1e-3)
    ours = fusenorm.GroupNorm(4, 12, eps=1e-3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 12, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    assert repr(ours) == repr(theirs).replace("GroupNorm", "GroupNorm", 1)
    assert "activation='silu'" in repr(fusenorm.GroupNorm(4, 12, activation="silu"))
    assert fusenorm.GroupNorm(2, 4, affine=False).weight is None
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8))
    fusenorm.convert(model)
    assert type(model[1]) is fusenorm.GroupNorm
    model(torch.randn(1, 3, 6, 6)).sum().backward()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_autocast_dtype():
    m = fusenorm.GroupNorm(4, 8).cuda()
    x = torch.randn(2, 8, 4, 4, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert m(x).dtype == torch.nn.GroupNorm(4, 8).cuda()(x).dtype


@pytest.mark.parametrize("device,shape", [pytest.param("cpu", (3, 10, 5, 7), id="cpu-small"),
                                          pytest.param("cuda", (64, 8200, 64, 64), id="cuda", marks=CUDA_SKIP)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_than_2_31_elements(device, shape, layout):
    """GroupNorm with two channels per group over a bf16 tensor of more than 2^31 elements on the GPU
    (the single-pass kernels of both layouts: channels-last in rows of 8 channels): the first,
    a middle and the last (sample, group) against fp64, and the statistics. The CPU case runs the
    same checks on a small tensor."""
    x = big_bf16_normal(device, shape, layout)
    n, c = shape[:2]
    G = c // 2
    try:
        y, mean, rstd = torch.ops.fusenorm.group_norm_fwd(x, G, None, None, 1e-5, "none")
        assert y.stride() == x.stride()
        for s, g in ((0, 0), (n // 2, G // 2), (n - 1, G - 1)):
            xs = x[s, 2 * g:2 * g + 2].double()
            mu, var = xs.mean(), xs.var(unbiased=False)
            ref = (xs - mu) / torch.sqrt(var + 1e-5)
            assert (y[s, 2 * g:2 * g + 2].double() - ref).abs().max().item() < 5e-2, f"sample {s}, group {g}"
            assert abs(mean[s, g].item() - mu.item()) < 1e-4
            assert abs(rstd[s, g].item() * math.sqrt(var.item() + 1e-5) - 1) < 1e-4
    finally:  # free the 8 GiB before the next large test, also when this one fails
        x = y = None
        if device == "cuda":
            torch.cuda.empty_cache()


def test_eps_types_as_torch():
    """eps as torch's argument parser takes a float (see conftest.FLOAT_ARGS_OK / _BAD)."""
    x = torch.randn(2, 6, 5)
    for eps in FLOAT_ARGS_OK:
        torch.testing.assert_close(fusenorm.group_norm(x, 3, eps=eps), F.group_norm(x, 3, eps=eps))
    for eps in FLOAT_ARGS_BAD:
        for f in (F.group_norm, fusenorm.group_norm):
            with pytest.raises(TypeError, match="eps"):
                f(x, 3, eps=eps)


def test_empty_channel_or_spatial_and_group_type_errors():
    """torch.nn's errors for no channels, no sites, and a num_groups that is not an int."""
    calls = [lambda f: f(torch.randn(2, 6, 0), 3), lambda f: f(torch.randn(2, 0, 3), 1),
             lambda f: f(torch.randn(2, 6, 3), 3.0), lambda f: f(torch.randn(2, 6, 3), True)]
    for dtype in (torch.long, torch.bool, torch.complex64):  # "mixed dtype" with a weight, else not implemented
        xi = torch.ones(2, 6, 3).to(dtype)
        calls += [lambda f, xi=xi: f(xi, 3), lambda f, xi=xi: f(xi, 3, torch.ones(6)),
                  lambda f, xi=xi: f(xi, 3, None, torch.ones(6)), lambda f, xi=xi: f(xi, 4, torch.ones(6))]
    for call in calls:
        assert_raises_like(call, F.group_norm, fusenorm.group_norm)
    assert fusenorm.group_norm(torch.randn(0, 6, 3), 3).shape == (0, 6, 3)  # an empty batch is fine


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_relu_keeps_nan(layout, dtype):
    """relu(NaN) is NaN, as torch.relu: one NaN makes its whole group NaN after the ReLU too."""
    x = torch.randn(2, 4, 40, dtype=dtype)
    x[0, 0, 1] = float("nan")
    if layout == "channels_last":
        x = channels_last(x)
    y = fusenorm.group_norm(x, 2, activation="relu")
    assert y[0, :2].isnan().all() and not y[0, 2:].isnan().any() and not y[1].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_nonfinite_value_mean(device, layout, value, first):
    """The op's mean of a group holding one infinity is that infinity (torch's contiguous CPU kernel
    gives NaN there, its channels-last one inf), also when it is the group's first value (the
    pivot, then taken as 0); y is NaN in that group and as torch's elsewhere."""
    x = torch.randn(4, 6, 5, 5, device=device)
    x[(0, 2, 0, 0) if first else (2, 3, 3, 3)] = value
    x = channels_last(x) if layout == "channels_last" else x
    y, mean, _ = torch.ops.fusenorm.group_norm_fwd(x, 3, None, None, 1e-5, "none")
    torch.testing.assert_close(mean.double().view(-1), x.double().reshape(12, -1).mean(1), equal_nan=True, atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(y, F.group_norm(x, 3), equal_nan=True)
