"""fusenorm::layer_norm_fwd / layer_norm_bwd, fusenorm.layer_norm and fusenorm.LayerNorm against torch.nn."""
import pytest
import torch
from row_norm_cases import *  # noqa: F401,F403
from row_norm_cases import NormSpec

import fusenorm


@pytest.fixture
def spec():
    return NormSpec(
        name="layer_norm",
        ours=fusenorm.layer_norm,
        theirs=torch.nn.functional.layer_norm,
        has_bias=True,
        ours_module=fusenorm.LayerNorm,
        theirs_module=torch.nn.LayerNorm,
        fwd_op=torch.ops.fusenorm.layer_norm_fwd,
        bwd_op=torch.ops.fusenorm.layer_norm_bwd,
    )


def test_statistics_are_fp32_and_exact():
    x = torch.randn(5, 7, 300, dtype=torch.bfloat16)
    y, mean, rstd = torch.ops.fusenorm.layer_norm_fwd(x, [300], None, None, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (5, 7)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (xd.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=1e-5, rtol=1e-5)


def test_bias_false_module():
    m = fusenorm.LayerNorm(16, bias=False)
    assert m.bias is None and "bias" not in m.state_dict()
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), torch.nn.functional.layer_norm(x, (16,), m.weight, None))


def test_weight_on_another_device_raises():
    """A meta weight (a model built on the meta device, never loaded) with a CPU input raises as
    torch does; the ops' meta kernels used to return an uninitialized CPU tensor."""
    x = torch.randn(2, 8)
    for call in (lambda: fusenorm.layer_norm(x, [8], torch.ones(8, device="meta")),
                 lambda: fusenorm.rms_norm(x, [8], torch.ones(8, device="meta")),
                 lambda: fusenorm.group_norm(torch.randn(2, 4, 3), 2, torch.ones(4, device="meta")),
                 lambda: fusenorm.batch_norm(torch.randn(2, 4, 3), None, None, torch.ones(4, device="meta"),
                                             training=True)):
        with pytest.raises(RuntimeError, match="expected device"):
            call()
    assert fusenorm.layer_norm(x.to("meta"), [8], torch.ones(8, device="meta")).device.type == "meta"


def test_backward_ops_check_saved_statistics():
    """The raw backward ops check mean/rstd (shape, dtype): a wrong one used to be read out of bounds
    (a crash for an empty one, garbage for a short one)."""
    x = torch.randn(4, 8)
    y, mean, rstd = torch.ops.fusenorm.layer_norm_fwd(x, [8], None, None, 1e-5)
    bad = [(mean, torch.empty(0)), (mean[:1], rstd), (mean, rstd.view(2, 2)), (mean.double(), rstd)]
    for m, r in bad:
        with pytest.raises(RuntimeError, match="mean|rstd"):
            torch.ops.fusenorm.layer_norm_bwd(x, x, m, r, [8], None, None, [True, False, False])
    _, rs = torch.ops.fusenorm.rms_norm_fwd(x, [8], None, 1e-5)
    for r in (torch.empty(0), rs[:1], torch.zeros(100)):
        with pytest.raises(RuntimeError, match="rstd"):
            torch.ops.fusenorm.rms_norm_bwd(x, x, r, [8], None, [True, False])
    x3 = torch.randn(2, 6, 5)
    _, m, r = torch.ops.fusenorm.group_norm_fwd(x3, 3, None, None, 1e-5, "none")
    for mm, rr, g in [(torch.empty(0), torch.empty(0), 3), (m, r, 6), (m.t(), r.t(), 3)]:
        with pytest.raises(RuntimeError, match="mean|rstd"):
            torch.ops.fusenorm.group_norm_bwd(x3, x3, mm, rr, g, None, None, None, "none", [True, False, False])
    with pytest.raises(RuntimeError, match="number of channels"):
        torch.ops.fusenorm.group_norm_fwd(torch.randn(2, 0, 5), 1, None, None, 1e-5, "none")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [25, 4096])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_nonfinite_value_mean(device, dtype, n, value, first):
    """A row holding one infinity has that infinity as its mean (torch's CPU kernel gives NaN),
    also when it is the row's first value (the pivot, then taken as 0); y is NaN in that row and
    as torch's elsewhere."""
    x = torch.randn(6, n, device=device, dtype=dtype)
    x[(1, 0) if first else (1, n // 2)] = value
    y, mean, _ = torch.ops.fusenorm.layer_norm_fwd(x, [n], None, None, 1e-5)
    torch.testing.assert_close(mean.double(), x.double().mean(-1), equal_nan=True, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, [n]), equal_nan=True, atol=2e-2, rtol=2e-2)
