"""fusenorm::rms_norm_fwd / rms_norm_bwd, fusenorm.rms_norm and fusenorm.RMSNorm against torch.nn."""
import pytest
import torch
from row_norm_cases import *  # noqa: F401,F403
from row_norm_cases import NormSpec

import fusenorm


@pytest.fixture
def spec():
    return NormSpec(
        name="rms_norm",
        ours=fusenorm.rms_norm,
        theirs=torch.nn.functional.rms_norm,
        has_bias=False,
        ours_module=fusenorm.RMSNorm,
        theirs_module=torch.nn.RMSNorm,
        fwd_op=torch.ops.fusenorm.rms_norm_fwd,
        bwd_op=torch.ops.fusenorm.rms_norm_bwd,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_default_eps_matches_torch(dtype):
    """eps=None: the epsilon of the computation type (fp32 for half inputs), as torch uses."""
    x = torch.full((2, 4), 1e-4, dtype=dtype)
    torch.testing.assert_close(fusenorm.rms_norm(x, (4,)), torch.nn.functional.rms_norm(x, (4,)))
    m, t = fusenorm.RMSNorm(4), torch.nn.RMSNorm(4)
    assert m.eps is None and repr(m) == repr(t).replace("RMSNorm", "RMSNorm")


def test_weight_of_another_dtype_and_rank_error():
    """torch.nn.functional.rms_norm takes a weight of any float dtype and returns x's dtype."""
    for xd, wd in [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float16, torch.bfloat16),
                   (torch.bfloat16, torch.float64)]:
        x = torch.randn(3, 16, dtype=xd)
        w = torch.rand(16, dtype=wd) + 0.5
        y = fusenorm.rms_norm(x, [16], w)
        ref = torch.nn.functional.rms_norm(x, [16], w)
        assert y.dtype == ref.dtype == xd
        tol = 1e-5 if xd in (torch.float32, torch.float64) else 1e-2
        torch.testing.assert_close(y, ref, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        fusenorm.rms_norm(torch.randn(2, 8), [2, 2, 8])


def test_complex_input_as_torch():
    """torch's RMSNorm takes complex inputs (its composite); fusenorm's kernels are real, and hand
    them to it: values and gradients as torch's."""
    for dtype in (torch.complex64, torch.complex128):
        x = torch.randn(3, 8, dtype=dtype, requires_grad=True)
        for m in (fusenorm.RMSNorm(8, dtype=dtype), fusenorm.RMSNorm(8, elementwise_affine=False)):
            affine = m.weight is not None
            t = torch.nn.RMSNorm(8, elementwise_affine=affine, dtype=dtype if affine else None)
            y, ref = m(x), t(x)
            assert y.dtype == ref.dtype == dtype
            torch.testing.assert_close(y, ref)
            dy = torch.randn_like(y)
            torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0])


def test_inference_mode_input_with_trainable_weight():
    """An input made under torch.inference_mode, then a training step outside it: torch's RMSNorm
    gives the weight's gradient (it saves only its normalized x); ours must too."""
    with torch.inference_mode():
        x = torch.randn(4, 8, 6)
    ours, theirs = fusenorm.RMSNorm(6), torch.nn.RMSNorm(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    dy = torch.randn(4, 8, 6)
    y_o, y_t = ours(x), theirs(x)
    (y_o * dy).sum().backward()
    (y_t * dy).sum().backward()
    torch.testing.assert_close(y_o, y_t)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)


def test_integer_and_complex_weights_as_torch():
    """torch's rms_norm takes a weight of any dtype with a float input and returns the input's dtype
    (an integer or bool weight used as its values; a complex one through torch's composite)."""
    import warnings

    x = torch.randn(4, 6)
    for w in (torch.arange(6), torch.tensor([True, False] * 3), torch.ones(6, dtype=torch.complex64)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the dtypes
            theirs, ours = torch.nn.functional.rms_norm(x, [6], w), fusenorm.rms_norm(x, [6], w)
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs)
