"""The CUDA kernels of csrc/cuda/, run on the CPU by the host emulator (csrc/common/simt_host.h).

The same kernel source that nvcc compiles is built here as host C++ (tests/simt/*.cpp, a small
extension built on first use under build/simt/) and launched through the same launchers, with
the real op wrappers, so every path the launchers can choose runs against torch.nn on small
shapes. Planted-bug builds (FUSENORM_PLANT_BUG, see csrc/common/simt.cuh) show that a missing
barrier, a wrong shuffle, an off-by-one in a loop bound and an unchecked alignment are caught.

What the emulator cannot show (speed, true concurrency, hardware limits) is left to
scripts/gpu_check.sh on a real GPU."""
from __future__ import annotations

import os
import re
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_as_torch, channels_last

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMT_DIR = os.path.join(ROOT, "tests", "simt")
BUILD_DIR = os.path.join(ROOT, "build", "simt")

# The emulated device. Few multiprocessors, so that the backward's grid-stride loops and its
# per-block partials see several rows per block.
SMS, SMEM_OPTIN, BLOCKS_PER_SM = 2, 227 * 1024, 1


def _build(name: str, sources, plant: int = 0) -> str:
    from torch.utils import cpp_extension

    build_dir = os.path.join(BUILD_DIR, name)
    os.makedirs(build_dir, exist_ok=True)
    flags = ["-O1", "-std=c++20", "-Wno-unknown-pragmas", "-DFUSENORM_SIMT_HOST", f"-DFUSENORM_SIMT_NS={name}"]
    if plant:
        flags.append(f"-DFUSENORM_PLANT_BUG={plant}")
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=flags,
        extra_include_paths=[os.path.join(ROOT, "csrc"), SIMT_DIR],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    return name


@pytest.fixture(scope="module")
def simt():
    name = _build(
        "fusenorm_simt",
        [os.path.join(SIMT_DIR, f) for f in ("controls.cpp", "layer_norm.cpp", "rms_norm.cpp", "group_norm.cpp",
                                             "batch_norm.cpp", "probes.cpp")]
        + [os.path.join(ROOT, "csrc", "common", f) for f in ("row_norm_args.cpp", "group_norm_args.cpp",
                                                             "batch_norm_args.cpp")],
    )
    lib = getattr(torch.ops, name)
    lib.configure(SMS, SMEM_OPTIN, BLOCKS_PER_SM, 1234)
    lib.take_launch_log()
    yield lib
    lib.configure(SMS, SMEM_OPTIN, BLOCKS_PER_SM, 1234)


@pytest.fixture(autouse=True)
def _two_pass_by_default(monkeypatch):
    """The tests below check the two-pass BatchNorm/GroupNorm kernels unless they set a shared
    memory budget for the single-pass one themselves (cuda/onchip_norm.cuh)."""
    monkeypatch.setenv("FUSENORM_ONCHIP_BYTES", "0")


def _launched(lib) -> list:
    return [line for line in lib.take_launch_log().splitlines() if line]


# ---------------------------------------------------------------------------------------------
# Which kernel the launchers should pick (mirrors pick_fwd_config / pick_bwd_config).
FWD_G = [(64, 8), (256, 32), (1024, 32), (2048, 128), (4096, 256), (8192, 512), (16384, 1024)]
BWD_G = [(64, 8), (256, 32), (512, 32), (1024, 128), (2048, 256), (4096, 512), (8192, 512)]


def expected_kernel(direction: str, n: int, dtype, aligned: bool, smem_optin: int = SMEM_OPTIN) -> str:
    vec = 16 // torch.tensor([], dtype=dtype).element_size()
    if aligned and n % vec == 0:
        for limit, g in FWD_G if direction == "fwd" else BWD_G:
            if n <= limit:
                return f"row_norm_{direction}_reg_kernel G={g}"
    if direction == "bwd":
        return "row_norm_bwd_block_kernel"
    acc = 8 if dtype == torch.float64 else 4
    return "row_norm_fwd_block_kernel cache=" + ("true" if n * acc <= smem_optin else "false")


def kernel_key(line: str) -> str:
    m = re.search(r"(row_norm_(?:fwd|bwd)_reg_kernel)<[^>]*?, (\d+), (\d+)>", line)
    if m:
        return f"{m.group(1)} G={m.group(2)}"
    m = re.search(r"row_norm_fwd_block_kernel<.*, (true|false)>", line)
    if m:
        return f"row_norm_fwd_block_kernel cache={m.group(1)}"
    m = re.search(r"(row_norm_bwd_block_kernel|column_sum_kernel)<", line)
    if m:
        return m.group(1)
    return line


# ---------------------------------------------------------------------------------------------
def _make_x(m: int, n: int, dtype, aligned: bool) -> torch.Tensor:
    if aligned:
        return torch.randn(m, n, dtype=dtype)
    # contiguous rows whose storage starts one element past a 16-byte boundary
    return torch.randn(m * n + 1, dtype=dtype)[1:].view(m, n)


def _reference(norm: str, x, w, b, dy, eps: float):
    """torch.nn's forward and gradients, in x's dtype and in fp64."""
    out = []
    for cast in (lambda t: t, lambda t: t.double()):
        leaves = [None if t is None else cast(t).detach().requires_grad_() for t in (x, w, b)]
        xx, ww, bb = leaves
        if norm == "layer_norm":
            y = F.layer_norm(xx, [x.shape[-1]], ww, bb, eps)
        else:
            y = F.rms_norm(xx, [x.shape[-1]], ww, eps)
        grads = torch.autograd.grad(y, [t for t in leaves if t is not None], cast(dy))
        it = iter(grads)
        out.append((y.detach(),) + tuple(next(it) if t is not None else None for t in leaves))
    return out


def _check(lib, norm: str, m: int, n: int, dtype, pdtype, aligned: bool, affine=(True, True), mask=None):
    eps = 1e-5
    x = _make_x(m, n, dtype, aligned)
    w = torch.randn(n, dtype=pdtype) if affine[0] else None
    b = torch.randn(n, dtype=pdtype) if affine[1] and norm == "layer_norm" else None
    dy = torch.randn(m, n, dtype=dtype)
    theirs, ref = _reference(norm, x, w, b, dy, eps)
    if norm == "layer_norm":
        y, mean, rstd = lib.layer_norm_fwd(x, [n], w, b, eps)
    else:
        y, rstd = lib.rms_norm_fwd(x, [n], w, eps)
    fwd_log = _launched(lib)
    assert_close_as_torch(y, theirs[0], ref[0], dtype, f"{norm} y n={n}")

    mask = mask or [True, w is not None, b is not None]
    if norm == "layer_norm":
        dx, dw, db = lib.layer_norm_bwd(dy, x, mean, rstd, [n], w, b, mask)
    else:
        dx, dw = lib.rms_norm_bwd(dy, x, rstd, [n], w, mask[:2])
        db = None
    bwd_log = _launched(lib)
    for name, ours, t, r, want in (("dx", dx, theirs[1], ref[1], mask[0]), ("dw", dw, theirs[2], ref[2], mask[1]),
                                   ("db", db, theirs[3], ref[3], mask[2] and norm == "layer_norm")):
        if not want or r is None:
            assert ours is None or ours.numel() == 0, name
            continue
        scale = n ** 0.5 if name == "dx" else max(1.0, m ** 0.5)
        assert_close_as_torch(ours, t, r, dtype, f"{norm} {name} n={n}", scale=scale)
    return [kernel_key(l) for l in fwd_log], [kernel_key(l) for l in bwd_log]


DTYPE_CASES = [
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.float64, torch.float64, id="fp64"),
    pytest.param(torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32params"),
]
# odd sizes (the block kernels, any alignment) and the register path of every (G, K)
ODD_SIZES = [1, 3, 31, 33, 127, 769, 4097]
REG_SIZES = [8, 64, 256, 512, 1024, 2048, 4096, 8192]


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype,pdtype", DTYPE_CASES)
@pytest.mark.parametrize("n", ODD_SIZES + REG_SIZES)
def test_kernels_match_torch(simt, norm, dtype, pdtype, n):
    m = 5 if n <= 1024 else 3
    fwd, bwd = _check(simt, norm, m, n, dtype, pdtype, aligned=True)
    assert fwd == [expected_kernel("fwd", n, dtype, True)]
    assert bwd[0] == expected_kernel("bwd", n, dtype, True)
    assert bwd[1:] == ["column_sum_kernel"] * (2 if norm == "layer_norm" else 1)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 1024, 4096])
def test_misaligned_input_takes_the_scalar_path(simt, norm, dtype, n):
    fwd, bwd = _check(simt, norm, 3, n, dtype, dtype, aligned=False)
    assert fwd == [expected_kernel("fwd", n, dtype, False)]
    assert bwd[0] == "row_norm_bwd_block_kernel"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_beyond_shared_memory_take_the_global_path(simt, dtype):
    simt.configure(SMS, 1024, BLOCKS_PER_SM, 99)  # 1 KiB of shared memory: 769 elements do not fit
    try:
        fwd, _ = _check(simt, "layer_norm", 4, 769, dtype, dtype, aligned=True)
    finally:
        simt.configure(SMS, SMEM_OPTIN, BLOCKS_PER_SM, 1234)
    assert fwd == ["row_norm_fwd_block_kernel cache=false"]


def test_longest_register_row(simt):
    fwd, _ = _check(simt, "layer_norm", 2, 16384, torch.float32, torch.float32, aligned=True)
    assert fwd == ["row_norm_fwd_reg_kernel G=1024"]


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, True], [True, False, False], [False, False, True]])
@pytest.mark.parametrize("n", [96, 769])
def test_affine_and_output_masks(simt, affine, mask, n):
    _check(simt, "layer_norm", 7, n, torch.float32, torch.float32, aligned=True, affine=affine, mask=mask)


@pytest.mark.parametrize("sms,blocks_per_sm", [(1, 1), (3, 2), (64, 4)])
def test_backward_partials_for_any_grid(simt, sms, blocks_per_sm):
    """More or fewer blocks than rows: grid-stride rows, [blocks, N] partials, column sums."""
    simt.configure(sms, SMEM_OPTIN, blocks_per_sm, 7)
    try:
        for n in (32, 256, 769):  # R > 1 rows per block (smem merge), one warp per row, block kernel
            _check(simt, "layer_norm", 9, n, torch.float32, torch.float32, aligned=True)
    finally:
        simt.configure(SMS, SMEM_OPTIN, BLOCKS_PER_SM, 1234)


def test_numerics_large_mean_small_spread(simt):
    x = 1e4 + 1e-2 * torch.randn(4, 1024, dtype=torch.float64)
    for xx in (x.float(), x.float()[:, 1:].contiguous()):  # register and block kernels
        y, _, _ = simt.layer_norm_fwd(xx, [xx.shape[-1]], None, None, 1e-5)
        ref = F.layer_norm(xx.double(), [xx.shape[-1]], eps=1e-5)
        assert torch.isfinite(y).all()
        assert (y.double() - ref).abs().max().item() < 2e-2


def test_constant_rows_give_bias(simt):
    for n in (256, 769):
        x = torch.full((3, n), 7.25)
        b = torch.randn(n)
        y, _, _ = simt.layer_norm_fwd(x, [n], torch.randn(n), b, 1e-5)
        assert torch.equal(y, b.expand_as(y))


def test_backward_is_deterministic(simt):
    x, dy, w, b = torch.randn(33, 769), torch.randn(33, 769), torch.randn(769), torch.randn(769)
    _, mean, rstd = simt.layer_norm_fwd(x, [769], w, b, 1e-5)
    simt.configure(SMS, SMEM_OPTIN, BLOCKS_PER_SM, 1)
    first = simt.layer_norm_bwd(dy, x, mean, rstd, [769], w, b, [True, True, True])
    simt.configure(SMS, SMEM_OPTIN, BLOCKS_PER_SM, 2)  # another thread schedule
    second = simt.layer_norm_bwd(dy, x, mean, rstd, [769], w, b, [True, True, True])
    for a, c in zip(first, second):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# GroupNorm: one block per (n, group), both layouts, the fused activations, the [N, C] partials.
GN_ACTS = {"none": lambda t: t, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,pdtype", DTYPE_CASES)
@pytest.mark.parametrize("shape,groups,act", [((2, 6, 13, 17), 3, "none"), ((3, 33, 5), 11, "silu"),
                                              ((1, 9, 3, 5, 7), 3, "gelu"), ((2, 8, 4, 4), 8, "relu"),
                                              ((1, 64, 33), 1, "silu")], ids=str)
def test_group_norm_kernels_match_torch(simt, layout, dtype, pdtype, shape, groups, act):
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        x = channels_last(x)
    c = shape[1]
    w, b, dy = torch.randn(c, dtype=pdtype), torch.randn(c, dtype=pdtype), torch.randn_like(x)
    outs = []
    for cast in (lambda t: t, lambda t: t.double()):
        leaves = [cast(t).detach().requires_grad_() for t in (x, w, b)]
        y = GN_ACTS[act](F.group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5))
        outs.append((y.detach(),) + torch.autograd.grad(y, leaves, cast(dy)))
    theirs, ref = outs
    y, mean, rstd = simt.group_norm_fwd(x, groups, w, b, 1e-5, act)
    assert y.stride() == x.stride()
    dx, dw, db = simt.group_norm_bwd(dy, x, mean, rstd, groups, w, b, y, act, [True, True, True])
    log = [kernel_key(line) for line in _launched(simt)]
    assert any("group_norm_apply_kernel" in k for k in log) and any("group_norm_dx_kernel" in k for k in log)
    kind = "nsc" if layout == "channels_last" else "ncs"
    assert any(f"channel_reduce_{kind}_kernel" in k for k in log), log
    group_len = x.numel() // (shape[0] * groups)
    for name, o, t, r, scale in (("y", y, theirs[0], ref[0], 1.0), ("dx", dx, theirs[1], ref[1], group_len ** 0.5),
                                 ("dw", dw, theirs[2], ref[2], (x.numel() / c) ** 0.5),
                                 ("db", db, theirs[3], ref[3], (x.numel() / c) ** 0.5)):
        assert_close_as_torch(o, t, r, dtype, f"group_norm {name}", scale=scale)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 16), (2, 12, 5)], ids=str)
def test_group_norm_relu_mask_from_y(simt, layout, dtype, shape):
    """With "relu" the backward kernels (sums and dx) mask dy by the y they are given (y > 0, NaN
    passes), not by a mask recomputed from x: y unrelated to x, against no activation on the
    masked dy. (2, 12, 5): vectors of 1 value."""
    x, dy, y = (torch.randn(shape) for _ in range(3))
    y.view(-1)[::7] = 0
    y.view(-1)[::11] = float("nan")
    x, dy, y = (t.to(dtype) for t in (x, dy, y))
    if layout == "channels_last":
        x, dy, y = (channels_last(t) for t in (x, dy, y))
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    _, mean, rstd = simt.group_norm_fwd(x, 4, w, b, 1e-5, "relu")
    got = simt.group_norm_bwd(dy, x, mean, rstd, 4, w, b, y, "relu", [True, True, True])
    masked = torch.where(y > 0, dy, 0).where(~y.isnan(), dy)
    want = simt.group_norm_bwd(masked, x, mean, rstd, 4, w, b, None, "none", [True, True, True])
    for name, a, e in zip(("dx", "dw", "db"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
def test_group_norm_split_reductions(simt, layout, groups):
    """Few groups with many sites: each (n, c) is reduced in several slices (forward statistics and
    backward sums), merged by the finalize kernels."""
    x = torch.randn(1, 2, 96, 96)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w, b, dy = torch.randn(2), torch.randn(2), torch.randn_like(x)
    y, mean, rstd = simt.group_norm_fwd(x, groups, w, b, 1e-5, "silu")
    dx, dw, db = simt.group_norm_bwd(dy, x, mean, rstd, groups, w, b, None, "silu", [True, True, True])
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = F.silu(F.group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5))
    grads = torch.autograd.grad(ref, leaves, dy.double())
    torch.testing.assert_close(y.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip((dx, dw, db), grads):
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# BatchNorm: split per-channel reductions (NCS segments / NSC channel tiles) + finalize, and the
# vectorized elementwise passes, in both layouts, vector widths 1 and 16 bytes.
def _bn_reference(x, w, b, z, dy, training, relu, mean=None, var=None):
    outs = []
    for cast in (lambda t: t, lambda t: t.double()):
        leaves = [cast(t).detach().requires_grad_() for t in (x, w, b, z)]
        rm = None if training else cast(mean).clone()
        rv = None if training else cast(var).clone()
        y = F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5) + leaves[3]
        y = F.relu(y) if relu else y
        outs.append((y.detach(),) + torch.autograd.grad(y, leaves, cast(dy)))
    return outs


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,pdtype", DTYPE_CASES)
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 5, 3, 7), (3, 16, 2, 2), (5, 24), (2, 9, 3, 1, 5), (7, 3, 1)],
                         ids=str)
@pytest.mark.parametrize("training,relu", [(True, False), (True, True), (False, True)], ids=["train", "train-relu",
                                                                                           "eval-relu"])
def test_batch_norm_kernels_match_torch(simt, layout, dtype, pdtype, shape, training, relu):
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    if layout == "channels_last" and x.dim() > 2:
        x = channels_last(x)
    c = shape[1]
    w, b = torch.randn(c, dtype=pdtype), torch.randn(c, dtype=pdtype)
    z, dy = torch.randn_like(x), torch.randn_like(x)
    rm, rv = torch.randn(c, dtype=pdtype), torch.rand(c, dtype=pdtype) + 0.5
    theirs, ref = _bn_reference(x, w, b, z, dy, training, relu, rm, rv)
    act = "relu" if relu else "none"
    if training:
        y, mean, var = simt.batch_norm_fwd(x, w, b, z, 1e-5, act)
        m2, v2 = simt.batch_norm_stats(x)
        assert torch.equal(m2, mean) and torch.equal(v2, var)
        xd = x.double().transpose(0, 1).reshape(c, -1)
        torch.testing.assert_close(mean.double(), xd.mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(var.double(), xd.var(1, unbiased=False), atol=1e-5, rtol=1e-4)
    else:
        mean, var = rm, rv
        y = simt.batch_norm_apply(x, mean, var, w, b, z, 1e-5, act)
    assert y.stride() == x.stride()
    dx, dw, db, dz = simt.batch_norm_bwd(dy, x, mean, var, w, y, 1e-5, training, act, [True, True, True, True])
    if not relu:
        dz = dy
    log = _launched(simt)
    layout_cl = layout == "channels_last" or x.dim() == 2 or x[0, 0].numel() == 1
    kind = "nsc" if layout_cl else "ncs"
    assert any(f"channel_reduce_{kind}_kernel" in k for k in log), log
    assert any("bn_apply_kernel" in k for k in log) and any("bn_grad_kernel" in k for k in log)
    count = x.numel() / c
    for name, o, t, r, scale in (("y", y, theirs[0], ref[0], 1.0), ("dx", dx, theirs[1], ref[1], 4.0),
                                 ("dw", dw, theirs[2], ref[2], count ** 0.5), ("db", db, theirs[3], ref[3], count ** 0.5),
                                 ("dz", dz, theirs[4], ref[4], 1.0)):
        assert_close_as_torch(o.to(t.dtype), t, r, dtype, f"batch_norm {name}", scale=scale)


@pytest.mark.parametrize("layout,budget", [("contiguous", "0"), ("channels_last", "0"), ("contiguous", "102400"),
                                           ("channels_last", "102400")],
                         ids=["contiguous", "channels_last", "contiguous-onchip", "channels_last-onchip"])
def test_channel_statistics_large_mean(simt, monkeypatch, layout, budget):
    """x = 1e4 + 1e-2 * noise in fp32: BatchNorm's and GroupNorm's statistics keep the variance
    (E[x^2] - E[x]^2 or unshifted fp32 Welford would lose it). Two-pass kernels: several slices per
    channel, each relative to a pivot; single-pass (budget > 0): the share's sums are relative to the
    unit's first value and the variance is the exact two-pass one from shared memory."""
    _launched(simt)  # drop what earlier tests launched
    monkeypatch.setenv("FUSENORM_ONCHIP_BYTES", budget)
    x = 1e4 + 1e-2 * torch.randn(8, 4, 48, 48)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    mean, var = simt.batch_norm_fwd(x, None, None, None, 1e-5, "none")[1:]
    xd = x.double().transpose(0, 1).reshape(4, -1)
    assert (mean.double() - xd.mean(1)).abs().max() < 1e-3  # an ulp of 1e4 is 1e-3
    torch.testing.assert_close(var.double(), xd.var(1, unbiased=False), rtol=1e-3, atol=0)
    _, gmean, grstd = simt.group_norm_fwd(x, 2, None, None, 1e-12, "none")
    xg = x.double().reshape(8, 2, -1)
    torch.testing.assert_close(grstd.double(), xg.var(2, unbiased=False).rsqrt(), rtol=1e-3, atol=0)
    assert (gmean.double() - xg.mean(2)).abs().max() < 1e-3
    log = _launched(simt)
    if budget == "0":
        kernel = f"channel_reduce_{'nsc' if layout == 'channels_last' else 'ncs'}_kernel"
        assert sum(kernel in k for k in log) == 2, log  # BatchNorm's and GroupNorm's
    elif layout == "contiguous":
        assert sum("onchip_norm_fwd_kernel" in k for k in log) == 2, log
    else:  # a GroupNorm sample (36 KiB) fits; a BatchNorm chunk of channels (288 KiB) does not
        assert sum("onchip_nsc_fwd_kernel" in k for k in log) == 1, log


@pytest.mark.parametrize("layout,budget", [("contiguous", "0"), ("channels_last", "0"), ("contiguous", "102400"),
                                           ("channels_last", "102400")],
                         ids=["contiguous", "channels_last", "contiguous-onchip", "channels_last-onchip"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf")], ids=["inf", "-inf"])
def test_nonfinite_value_means(simt, monkeypatch, layout, budget, value):
    """A channel (group, row) holding one infinity has that infinity as its mean, as torch's
    running_mean: where it is the first value (the pivot, then taken as 0) and where it sits in a
    slice whose partials are merged with later ones (merged_mean). Other channels are unchanged."""
    monkeypatch.setenv("FUSENORM_ONCHIP_BYTES", budget)
    x = torch.randn(8, 4, 48, 48)
    x[0, 1, 0, 0] = value  # channel 1's (and group 0's) first value
    x[3, 2, 5, 7] = value  # inside channel 2 (group 1), ahead of the other samples' partials
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    mean, var = simt.batch_norm_fwd(x, None, None, None, 1e-5, "none")[1:]
    ref = x.double().transpose(0, 1).reshape(4, -1).mean(1)
    torch.testing.assert_close(mean.double(), ref, atol=1e-5, rtol=1e-5)
    assert var[1:3].isnan().all() and var[[0, 3]].isfinite().all()
    _, gmean, _ = simt.group_norm_fwd(x, 2, None, None, 1e-5, "none")
    torch.testing.assert_close(gmean.double().reshape(-1), x.double().reshape(16, -1).mean(1), atol=1e-5, rtol=1e-5)
    for n in (64, 769, 4096):  # register and block kernels
        r = torch.randn(6, n)
        r[1, 0], r[4, n // 2] = value, value
        lmean = simt.layer_norm_fwd(r, [n], None, None, 1e-5)[1]
        torch.testing.assert_close(lmean.double(), r.double().mean(1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The single-pass forward (cuda/onchip_norm.cuh) with clusters of one block, as every device
# before sm_90 runs it (the emulator has no clusters; tests/test_batch_norm.py and
# test_group_norm.py run clusters of 2 to 16 blocks on a GPU).
ONCHIP_CASES = [  # (norm, shape, groups, act); vector widths: 16 bytes, 8 bytes (bf16, S % 8 == 4), one value
    ("batch_norm", (4, 3, 8, 8), None, "none"), ("batch_norm", (3, 5, 2, 6), None, "relu"),
    ("batch_norm", (2, 4, 5, 7), None, "relu"), ("batch_norm", (6, 2, 9), None, "none"),
    ("group_norm", (2, 6, 8, 8), 3, "silu"), ("group_norm", (3, 9, 2, 6), 3, "gelu"),
    ("group_norm", (2, 4, 5, 7), 4, "relu"), ("group_norm", (1, 8, 3, 2, 2), 2, "none"),
    # channels-last units of several chunks, statistics and vectors per site row (GroupNorm only:
    # BatchNorm keeps its two-pass kernels in channels-last)
    ("batch_norm", (5, 48, 3, 3), None, "relu"), ("group_norm", (2, 32, 5, 3), 8, "silu"),
    ("group_norm", (2, 40, 4, 4), 4, "none"), ("group_norm", (3, 24, 2, 5), 24, "gelu"),
]


@pytest.mark.parametrize("dtype,pdtype", DTYPE_CASES)
@pytest.mark.parametrize("norm,shape,groups,act,layout",
                         [c + ("contiguous",) for c in ONCHIP_CASES]
                         + [c + ("channels_last",) for c in ONCHIP_CASES if c[0] == "group_norm"], ids=str)
def test_onchip_forward_matches_torch(simt, monkeypatch, dtype, pdtype, norm, shape, groups, act, layout):
    _launched(simt)  # drop what earlier tests launched
    monkeypatch.setenv("FUSENORM_ONCHIP_BYTES", str(100 * 1024))
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    if layout == "channels_last":
        x = channels_last(x)
    c = shape[1]
    w, b = torch.randn(c, dtype=pdtype), torch.randn(c, dtype=pdtype)
    z = torch.randn_like(x) if norm == "batch_norm" else None
    outs = []
    for cast in (lambda t: t, lambda t: t.double()):
        if norm == "batch_norm":
            r = F.batch_norm(cast(x), None, None, cast(w), cast(b), True, 0.1, 1e-5) + cast(z)
        else:
            r = F.group_norm(cast(x), groups, cast(w), cast(b), 1e-5)
        outs.append(GN_ACTS[act](r))
    if norm == "batch_norm":
        y, mean, var = simt.batch_norm_fwd(x, w, b, z, 1e-5, act)
        xd, n = x.double().transpose(0, 1).reshape(c, -1), 1
        ref_var = xd.var(1, unbiased=False)
    else:
        y, mean, rstd = simt.group_norm_fwd(x, groups, w, b, 1e-5, act)
        xd = x.double().reshape(shape[0] * groups, -1)
        var, ref_var = rstd.double().reshape(-1) ** -2 - 1e-5, xd.var(1, unbiased=False)
    log = _launched(simt)
    kernel = "onchip_nsc_fwd_kernel" if layout == "channels_last" and x[0, 0].numel() > 1 else "onchip_norm_fwd_kernel"
    assert any(kernel in k for k in log), log
    assert not any("channel_reduce" in k for k in log), log
    assert y.stride() == x.stride()
    assert_close_as_torch(y, outs[0], outs[1], dtype, f"{norm} y")
    torch.testing.assert_close(mean.double().reshape(-1), xd.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double().reshape(-1), ref_var, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm", ["batch_norm", "group_norm"])
def test_onchip_budget_picks_the_path(simt, monkeypatch, norm):
    """A unit larger than the budget (with no clusters to split it) takes the two-pass kernels; the
    two paths agree, in both layouts."""
    _launched(simt)  # drop what earlier tests launched
    x = torch.randn(4, 6, 12, 12)  # BatchNorm channel: 2.3 KiB; GroupNorm (n, group) of 2 channels: 1.2 KiB
    run = {"batch_norm": lambda t: simt.batch_norm_fwd(t, None, None, None, 1e-5, "none"),
           "group_norm": lambda t: simt.group_norm_fwd(t, 3, None, None, 1e-5, "none")}[norm]
    results = {}
    for budget, kernel in (("1024", "channel_reduce_ncs_kernel"), ("4096", "onchip_norm_fwd_kernel")):
        monkeypatch.setenv("FUSENORM_ONCHIP_BYTES", budget)
        results[budget] = run(x)
        assert any(kernel in k for k in _launched(simt)), budget
    for a, b in zip(results["1024"], results["4096"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # channels-last: GroupNorm's unit is a sample's 6 channels at 144 sites (3.4 KiB); BatchNorm
    # keeps the two-pass kernels
    xl = x.to(memory_format=torch.channels_last)
    onchip = "onchip_nsc_fwd_kernel" if norm == "group_norm" else "channel_reduce_nsc_kernel"
    for budget, kernel in (("1024", "channel_reduce_nsc_kernel"), ("16384", onchip)):
        monkeypatch.setenv("FUSENORM_ONCHIP_BYTES", budget)
        out = run(xl)
        assert any(kernel in k for k in _launched(simt)), budget
        for a, b in zip(out, results["1024"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_sync_halves_match_fused_backward(simt, layout):
    x = torch.randn(6, 8, 5, 4)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w, dy = torch.randn(8), torch.randn_like(x)
    mean, var = simt.batch_norm_stats(x)
    dx, dw, db, _ = simt.batch_norm_bwd(dy, x, mean, var, w, None, 1e-5, True, "none", [True, True, True, False])
    sg, sgx = simt.batch_norm_bwd_reduce(dy, x, mean, var, 1e-5)
    n = x.numel() / 8
    dx2 = simt.batch_norm_bwd_elemt(dy, x, mean, var, w, sg / n, sgx / n, 1e-5)
    torch.testing.assert_close(sg, db)
    torch.testing.assert_close(sgx, dw)
    torch.testing.assert_close(dx2, dx, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The emulator itself.
@pytest.mark.parametrize("kind,arg,width", [(0, 5, 32), (0, 3, 8), (1, 1, 32), (1, 3, 8), (2, 2, 32), (2, 1, 4),
                                            (3, 1, 32), (3, 16, 32), (3, 4, 8), (3, 8, 8)])
def test_emulator_shuffles_follow_cuda(simt, kind, arg, width):
    out = simt.probe_shuffle(kind, arg, width, 64).tolist()
    for t in range(64):
        lane = t % 32
        seg = lane & ~(width - 1)
        if kind == 0:
            src = seg + arg % width
        elif kind == 1:
            src = lane - arg if lane - arg >= seg else lane
        elif kind == 2:
            src = lane + arg if lane + arg < seg + width else lane
        else:
            src = lane ^ arg if seg <= (lane ^ arg) < seg + width else lane
        assert out[t] == t - lane + src, (t, out[t])


def test_emulator_races_on_shared_memory(simt):
    n = 256
    good = simt.probe_shared_sum(True, n, 1000).tolist()
    assert good == [(t + 1) % n + 1000 for t in range(n)]
    bad = simt.probe_shared_sum(False, n, 2000).tolist()
    assert bad != [(t + 1) % n + 2000 for t in range(n)], "a missing barrier went unnoticed"


@pytest.mark.parametrize("kind,message", [
    (0, "exited while"),
    (1, "cannot make progress"),
    (2, "excludes it"),
    (3, "exited"),
    (4, "misaligned"),
    (5, "disagree on __syncthreads"),
])
def test_emulator_reports_misuse(simt, kind, message):
    with pytest.raises(RuntimeError, match=message):
        simt.probe_misuse(kind)


def test_emulator_checks_shared_memory_limits(simt):
    simt.probe_launch_with_smem(48 * 1024)
    with pytest.raises(RuntimeError, match="dynamic shared memory"):
        simt.probe_launch_with_smem(48 * 1024 + 4)


# ---------------------------------------------------------------------------------------------
# Planted bugs: each build compiles one known bug into the kernels; the harness must notice.
PLANTS = {
    1: ("a missing __syncthreads in block_allsum", 769, True),
    2: ("a shuffle that gives the sum to the first lane only", 256, True),
    3: ("a loop bound that drops the last element", 769, True),
    4: ("a vector path taken without the alignment check", 1024, False),
}


@pytest.fixture(scope="module")
def planted():
    """The planted-bug libraries, built two at a time (one source file each)."""
    from concurrent.futures import ThreadPoolExecutor

    src = [os.path.join(SIMT_DIR, "planted.cpp")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        names = list(pool.map(lambda p: _build(f"fusenorm_simt_plant{p}", src, plant=p), sorted(PLANTS)))
    return {p: getattr(torch.ops, n) for p, n in zip(sorted(PLANTS), names)}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_bug_is_caught(simt, planted, plant):
    what, n, aligned = PLANTS[plant]
    lib = planted[plant]
    lib.configure(SMS, SMEM_OPTIN, BLOCKS_PER_SM, 1234)
    x = _make_x(6, n, torch.float32, aligned)
    w, b = torch.randn(n), torch.randn(n)
    ref = F.layer_norm(x.double(), [n], w.double(), b.double(), 1e-5)
    # the clean build passes this very case
    y_clean, _, _ = simt.layer_norm_fwd(x, [n], w, b, 1e-5)
    assert (y_clean.double() - ref).abs().max().item() < 1e-4
    caught: Optional[str] = None
    try:
        y, _, _ = lib.layer_norm_fwd(x, w, b, 1e-5)
        err = (y.double() - ref).abs().max().item()
        if not err < 1e-4:  # NaN counts as caught
            caught = f"wrong answer (max error {err:.3g})"
    except RuntimeError as e:
        caught = f"error: {e}"
    assert caught, f"planted bug {plant} ({what}) went unnoticed"
    print(f"planted bug {plant} ({what}): caught as {caught}")
