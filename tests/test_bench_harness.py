"""Tests of the benchmark harness itself (benchmarks/): no timing assertions, tiny shapes only."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python"))

from benchmarks import harness  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402
from benchmarks.suites import SUITES  # noqa: E402

TINY = harness.TimingConfig(warmup=0, min_reps=1, max_reps=2, max_time_s=0.001)
ROW_FIELDS = {
    "norm", "shape", "normalized_shape", "dtype", "direction", "implementation", "status", "reason",
    "bytes", "time_ms", "gbps", "pct_of_copy", "max_err", "max_err_dx", "speedup_vs_torch",
    "speedup_vs_compile", "setup_s",
}


@pytest.mark.parametrize(
    "n_params,shape,dtype,mode,expected",
    [
        # LayerNorm (weight + bias), 4096x4096 fp32: x,y = 2*64 MiB; params 2*16 KiB
        (2, (4096, 4096), torch.float32, "fwd", 2 * 4096 * 4096 * 4 + 2 * 4096 * 4),
        (2, (4096, 4096), torch.float32, "bwd", 3 * 4096 * 4096 * 4 + 4 * 4096 * 4),
        (2, (4096, 4096), torch.float32, "fwd+bwd", 134250496 + 201392128),
        # RMSNorm (weight), 8192x1024 bf16
        (1, (8192, 1024), torch.bfloat16, "fwd", 33556480),
        (1, (8192, 1024), torch.bfloat16, "bwd", 50335744),
        (1, (8192, 1024), torch.bfloat16, "fwd+bwd", 33556480 + 50335744),
    ],
)
def test_bytes_moved(n_params: int, shape, dtype, mode: str, expected: int) -> None:
    assert harness.bytes_moved(n_params, shape, shape[-1:], dtype, mode) == expected


def test_bytes_known_values() -> None:
    assert harness.bytes_moved(2, (4096, 4096), (4096,), torch.float32, "fwd") == 134250496
    assert harness.bytes_moved(2, (4096, 4096), (4096,), torch.float32, "bwd") == 201392128
    with pytest.raises(ValueError):
        harness.bytes_moved(1, (2, 2), (2,), torch.float32, "sideways")


def test_suites_param_counts() -> None:
    ln = SUITES["layer_norm"].cases("cpu", False, [torch.float32], [(8, 16)])[0]
    rms = SUITES["rms_norm"].cases("cpu", False, [torch.float32], [(8, 16)])[0]
    assert (ln.n_params, rms.n_params) == (2, 1)
    assert len(ln.make_inputs("cpu")[1]) == 2 and len(rms.make_inputs("cpu")[1]) == 1


def test_shapes_option_goes_to_the_suites_of_its_rank() -> None:
    shapes = harness.parse_shapes("64x256, 2x8x4x4")
    assert shapes == [(64, 256), (2, 8, 4, 4)]
    f32 = [torch.float32]
    assert {c.shape for c in SUITES["layer_norm"].cases("cpu", False, f32, shapes)} == {(64, 256)}
    for norm in ("group_norm", "instance_norm", "batch_norm"):
        assert {c.shape for c in SUITES[norm].cases("cpu", False, f32, shapes)} == {(2, 8, 4, 4)}, norm
    # without --shapes each suite keeps its defaults
    assert {c.shape for c in SUITES["batch_norm"].cases("cpu", False, f32)} == {(16, 256, 56, 56), (64, 1024, 14, 14)}


def test_group_norm_suite_layouts_and_bytes() -> None:
    cases = SUITES["group_norm"].cases("cpu", False, [torch.bfloat16])
    names = {c.norm for c in cases}
    assert names == {"group_norm+silu", "group_norm+silu_cl"}
    for c in cases:
        x, params = c.make_inputs("meta")
        assert x.is_contiguous(memory_format=torch.channels_last) == c.norm.endswith("_cl")
        assert [p.shape[0] for p in params] == [c.shape[1]] * 2
        # x read + y written (bf16) + weight and bias read
        n, ch, h, w = c.shape
        assert harness.bytes_moved(c.n_params, c.shape, c.normalized_shape, c.dtype, "fwd") == \
            2 * n * ch * h * w * 2 + 2 * ch * 2


def test_batch_norm_suite_modes_layouts_and_bytes() -> None:
    quick = SUITES["batch_norm"].cases("cpu", False, [torch.float32])
    names = sorted({c.norm for c in quick})
    assert names == ["batch_norm", "batch_norm_cl", "batch_norm_eval", "batch_norm_eval_cl"]
    # --quick: every shape in training, the first in eval; --full: eval at every shape too
    train = [c for c in quick if not c.norm.startswith("batch_norm_eval")]
    evals = [c for c in quick if c.norm.startswith("batch_norm_eval")]
    assert len({c.shape for c in evals}) == 1 and len({c.shape for c in train}) > 1
    full = SUITES["batch_norm"].cases("cpu", True, [torch.float32])
    assert {c.shape for c in full if c.norm == "batch_norm_eval"} == {c.shape for c in full if c.norm == "batch_norm"}
    for c in quick:
        x, params = c.make_inputs("cpu")
        assert x.is_contiguous(memory_format=torch.channels_last) == c.norm.endswith("_cl")
        n, ch, h, w = c.shape
        # fwd: x read + y written (fp32) + weight and bias read; fwd+bwd adds x, dy read, dx written,
        # the parameters read and their gradients written
        assert harness.bytes_moved(c.n_params, c.shape, c.normalized_shape, c.dtype, "fwd") == 2 * n * ch * h * w * 4 + 2 * ch * 4
        assert harness.bytes_moved(c.n_params, c.shape, c.normalized_shape, c.dtype, "fwd+bwd") == \
            5 * n * ch * h * w * 4 + 6 * ch * 4
    small = [c for c in quick if c.norm == "batch_norm_eval"][0]
    x, (w, b) = small.make_inputs("cpu")
    x = x[:2, :, :3, :3].contiguous()
    torch.testing.assert_close(small.fusenorm(x, w, b), small.torch_fn(x, w, b))


@pytest.fixture(scope="module")
def cli_result(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    result = main([
        "--device", "cpu", "--norms", "layer_norm,rms_norm", "--shapes", "32x128", "--dtypes", "fp32,bf16",
        "--modes", "fwd,bwd,fwd+bwd",
        "--no-compile", "--max-time", "0.001", "--reps", "2", "--min-reps", "1", "--warmup", "0",
        "--out", str(out), "--quiet", "--no-png",
    ])
    result["_out"] = out
    return result


def test_json_schema(cli_result: Dict[str, Any]) -> None:
    files = list(cli_result["_out"].glob("bench-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    for key in ("machine", "device", "device_name", "torch_version", "cuda_version", "fusenorm_version",
                "git_commit", "date", "allocator", "timing", "bytes_model", "skipped", "rows"):
        assert key in data, key
    assert {"hostname", "cpu_model", "cores"} <= set(data["machine"])
    assert data["device"] == "cpu"
    rows: List[Dict[str, Any]] = data["rows"]
    # 2 norms x 1 shape x 2 dtypes x 3 modes, each with copy, fusenorm, torch, compile rows.
    assert len(rows) == 2 * 2 * 3 * 4
    for r in rows:
        assert ROW_FIELDS <= set(r), set(r) ^ ROW_FIELDS
        assert r["direction"] in harness.MODES_ALL
        assert r["status"] in ("ok", "skipped", "error")
        if r["status"] == "ok":
            assert r["time_ms"] > 0 and r["gbps"] > 0 and r["pct_of_copy"] > 0
    impls = {r["implementation"] for r in rows}
    assert impls == {"copy", "fusenorm", "torch", "compile"}
    compile_rows = [r for r in rows if r["implementation"] == "compile"]
    assert all(r["status"] == "skipped" and "no-compile" in r["reason"] for r in compile_rows)
    assert all(r["speedup_vs_torch"] is not None for r in rows if r["implementation"] == "fusenorm")


def test_missing_peers_skipped_not_failed(cli_result: Dict[str, Any]) -> None:
    skipped = {s["implementation"]: s["reason"] for s in cli_result["skipped"]}
    for peer in ("liger", "apex", "quack"):
        assert peer in skipped  # either "not installed" or "GPU-only" on this CPU run
    assert not any(r["status"] == "error" for r in cli_result["rows"])


def test_fusenorm_errors_finite_and_small(cli_result: Dict[str, Any]) -> None:
    rows = [r for r in cli_result["rows"] if r["implementation"] == "fusenorm"]
    assert rows
    for r in rows:
        assert r["status"] == "ok", r
        tol = 1e-4 if r["dtype"] == "fp32" else 0.1
        errs = [e for e in (r["max_err"], r["max_err_dx"]) if e is not None]
        assert errs
        for e in errs:
            assert math.isfinite(e) and e < tol, r


def _tiny_case(peers: List[harness.Peer]) -> harness.Case:
    case = SUITES["rms_norm"].cases("cpu", False, [torch.float32], [(16, 32)])[0]
    case.peers = peers
    return case


def test_fake_missing_and_broken_peers() -> None:
    def broken(case: harness.Case, device: str):
        raise harness.PeerSkipped("unsupported here")

    peers = [
        harness.Peer("ghost", "fusenorm_bench_no_such_module_xyz", broken, gpu_only=False),
        harness.Peer("gpuonly", "math", broken, gpu_only=True),
        harness.Peer("refuses", "math", broken, gpu_only=False),
    ]
    result = harness.run([_tiny_case(peers), _tiny_case(peers)], "cpu", ["fwd"], TINY,
                         use_compile=False, quiet=True)
    skipped = {s["implementation"]: s["reason"] for s in result["skipped"]}
    assert skipped["ghost"].startswith("not installed")
    assert "GPU-only" in skipped["gpuonly"]
    assert len(result["skipped"]) == 2  # listed once, not once per case
    refused = [r for r in result["rows"] if r["implementation"] == "refuses"]
    assert len(refused) == 2 and all(r["status"] == "skipped" for r in refused)
    assert not any(r["status"] == "error" for r in result["rows"])


def test_compile_failure_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compile(*args: Any, **kwargs: Any):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(torch, "compile", no_compile)
    result = harness.run([_tiny_case([])], "cpu", ["fwd", "fwd+bwd"], TINY, use_compile=True, quiet=True)
    rows = [r for r in result["rows"] if r["implementation"] == "compile"]
    assert len(rows) == 2
    assert all(r["status"] == "skipped" and "compiler exploded" in r["reason"] for r in rows)
    assert all(r["speedup_vs_compile"] is None for r in result["rows"])


def test_table_and_png_note(cli_result: Dict[str, Any], tmp_path: Path) -> None:
    table = harness.format_table(cli_result["rows"])
    assert "fusenorm" in table and "GB/s" in table
    png, note = harness.write_png(cli_result, tmp_path / "x.json")
    assert (png is not None and png.exists()) or note.startswith("PNG skipped")
