"""Shared test setup: devices, dtypes, tolerances, and the comparison rule.

Rule (flash-attention's): fusenorm's error against an fp64 reference may be at most twice
torch.nn's own error in the same dtype, plus a small per-dtype atol."""
from __future__ import annotations

import fractions
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.dirname(__file__))

import fusenorm  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
CUDA_SKIP = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible (CUDA kernels are compiled but cannot run here)")

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_SKIP)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# atol added to 2x torch's own error, per dtype
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref.double()).abs().max().item()


def assert_close_as_torch(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, dtype, what: str = "",
                          scale: float = 1.0) -> None:
    """ours and theirs (torch.nn in the same dtype) against an fp64 reference."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert ours.dtype == theirs.dtype, (what, ours.dtype, theirs.dtype)
    assert torch.isfinite(ours).all() == torch.isfinite(ref).all(), f"{what}: non-finite values differ"
    e_ours, e_torch = max_err(ours, ref), max_err(theirs, ref)
    bound = 2 * e_torch + ATOL[dtype] * scale
    assert e_ours <= bound, f"{what}: fusenorm error {e_ours:.3g} > bound {bound:.3g} (torch.nn error {e_torch:.3g})"


def assert_fp32_like_torch(ours, theirs, x: torch.Tensor) -> None:
    """ours(x) and its input gradient in fp32 against fp64: within 3x the error of theirs (torch.nn)
    plus 1e-6 (y) or 1e-6 of the largest gradient (dx). For long reductions of ReLU-like data (many
    equal values), where fp32 partial sums that each run over a whole row lose precision."""
    x = x.detach().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y, y_torch, y64 = ours(x), theirs(x), theirs(x64)
    dy = torch.randn_like(y64)
    (dx,) = torch.autograd.grad(y, x, dy.to(y.dtype))
    (dx_torch,) = torch.autograd.grad(y_torch, x, dy.to(y.dtype))
    (dx64,) = torch.autograd.grad(y64, x64, dy)
    for what, a, t, ref, tol in [("y", y, y_torch, y64, 1e-6), ("dx", dx, dx_torch, dx64, 1e-6 * max_err(dx64, 0 * dx64))]:
        e_ours, e_torch = max_err(a, ref), max_err(t, ref)
        assert e_ours <= 3 * e_torch + tol, f"{what}: fusenorm error {e_ours:.3g}, torch.nn {e_torch:.3g}"


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh random data per test, but reproducible from the test id
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield


def assert_raises_like(call, theirs, ours) -> None:
    """call(theirs) and call(ours) both raise, the same exception type."""
    with pytest.raises(Exception) as t:
        call(theirs)
    with pytest.raises(Exception) as o:
        call(ours)
    assert type(o.value) is type(t.value), (o.value, t.value)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x ([N, C, *], any rank) stored as [N, *, C]: channels_last / channels_last_3d, and the same
    for 3-D inputs."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def big_bf16_normal(device: str, shape, layout: str) -> torch.Tensor:
    """A bf16 N(0, 1) tensor of shape [N, C, H, W] in `layout` ("contiguous" or "channels_last"),
    generated in place; on CUDA, skips unless 24 GiB are free (for tensors of 2^31 elements)."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if free < 24 * 2**30:
            pytest.skip(f"needs 24 GiB free GPU memory, {free / 2**30:.1f} GiB free")
    n, c, h, w = shape
    if layout == "channels_last":
        x = torch.empty(n, h, w, c, device=device, dtype=torch.bfloat16).permute(0, 3, 1, 2)
    else:
        x = torch.empty(shape, device=device, dtype=torch.bfloat16)
    return x.normal_()


# eps / momentum values torch's argument parser takes as a float, and ones it rejects (TypeError)
FLOAT_ARGS_OK = [0.25, 1, np.float32(0.25), np.float64(0.25), np.int64(1), np.bool_(True), torch.tensor(0.25)]
FLOAT_ARGS_BAD = ["0.25", torch.tensor([0.25]), torch.tensor(0.25, requires_grad=True), [0.25],
                  fractions.Fraction(1, 4)]


def assert_step_as_torch(ours, theirs, x: torch.Tensor) -> None:
    """ours(x) and theirs(x) (fp32 modules or callables): the same output and input gradient."""
    x = x.detach().requires_grad_()
    y, yt = ours(x), theirs(x)
    torch.testing.assert_close(y, yt, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(yt, x, dy)[0],
                               atol=1e-4, rtol=1e-4)


def assert_compiles_once_as_torch(ours: torch.nn.Module, theirs: torch.nn.Module, shapes) -> None:
    """ours under torch.compile(dynamic=True, fullgraph=True), run in training on inputs of each
    shape: outputs, input gradients and finally the state_dict as torch's module's, and no
    recompilation after the first call (Dynamo may trace that one twice)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(ours, backend=counter, dynamic=True, fullgraph=True)
    first = None
    for shape in shapes:
        assert_step_as_torch(compiled, theirs, torch.randn(shape))
        first = first or counter.frame_count
    for (k, a), (_, t) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, t, atol=1e-5, rtol=1e-5, msg=k)
    assert counter.frame_count == first
