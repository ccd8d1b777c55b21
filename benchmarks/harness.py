"""Timing, byte accounting, copy ceiling, peers, table, JSON and PNG output for the fusenorm benchmarks.

Everything here depends only on torch (numpy/matplotlib optional). Suites (``benchmarks/suites/*.py``)
describe *what* to run as :class:`Case` objects; this module decides *how* to run and report it.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import MALLOC_ENV

Tensor = torch.Tensor
NormFn = Callable[..., Tensor]  # fn(x, *params) -> y

MODES_ALL: Tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")
DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

REPO_ROOT = Path(__file__).resolve().parent.parent


class PeerSkipped(Exception):
    """Raised by a peer factory when the peer cannot run here (not installed, wrong device...)."""


# --------------------------------------------------------------------------------------------------
# Cases and peers
# --------------------------------------------------------------------------------------------------
@dataclass
class Peer:
    """An optional third-party implementation.

    ``build(case, device)`` returns ``fn(x, *params) -> y`` or raises :class:`PeerSkipped`.
    ``module`` is imported first; if that fails the peer is reported once as "skipped: not installed".
    """

    name: str
    module: str
    build: Callable[["Case", str], NormFn]
    gpu_only: bool = True


@dataclass
class Case:
    """One (norm, shape, dtype) benchmark case; every implementation gets the same inputs."""

    norm: str
    shape: Tuple[int, ...]
    normalized_shape: Tuple[int, ...]
    dtype: torch.dtype
    n_params: int  # affine tensors of size normalized_shape: 2 for LayerNorm, 1 for RMSNorm
    make_inputs: Callable[[str], Tuple[Tensor, Tuple[Tensor, ...]]]  # device -> (x, params)
    fusenorm: NormFn
    torch_fn: NormFn  # torch.nn.functional eager; also the fp64 reference and the compile target
    peers: List[Peer] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Human-readable 'norm AxB dtype'."""
        return f"{self.norm} {shape_str(self.shape)} {DTYPE_NAMES.get(self.dtype, str(self.dtype))}"


def shape_str(shape: Sequence[int]) -> str:
    """(4096, 4096) -> '4096x4096'."""
    return "x".join(str(int(s)) for s in shape)


def parse_shapes(text: str) -> List[Tuple[int, ...]]:
    """'64x256,16x320x64x64' -> [(64, 256), (16, 320, 64, 64)]."""
    return [tuple(int(d) for d in item.lower().strip().split("x")) for item in text.split(",")]


def pick_shapes(shapes: Optional[Sequence[Tuple[int, ...]]], rank: int, default: List[Tuple[int, ...]]):
    """A suite's shapes: those of --shapes with `rank` dims (2: the row norms, 4: the channel
    norms), or the suite's defaults without --shapes."""
    return default if shapes is None else [tuple(s) for s in shapes if len(s) == rank]


def default_shapes(device: str, full: bool) -> List[Tuple[int, int]]:
    """(tokens, hidden) shapes from real models; DRAM-sized on CPU, HBM-sized on GPU."""
    if device == "cpu":
        shapes = [(4096, 4096), (16384, 1024)]  # LLaMA-7B hidden, BERT/ViT-L hidden: 64 MB fp32 each
        if full:
            shapes += [(8192, 768), (4096, 2048), (2048, 8192), (8192, 4096)]
        return shapes
    shapes = [(16384, 4096), (8192, 8192), (32768, 1024), (65536, 768)]
    if full:
        for tokens in (4096, 8192, 16384):
            for hidden in (768, 1024, 2048, 4096, 5120, 8192, 16384, 65536):
                if tokens * hidden <= (1 << 28) and (tokens, hidden) not in shapes:
                    shapes.append((tokens, hidden))
    return shapes


def default_modes(device: str, full: bool) -> Tuple[str, ...]:
    """--quick on CPU skips the bwd-only rows to save time."""
    if device == "cpu" and not full:
        return ("fwd", "fwd+bwd")
    return MODES_ALL


# --------------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------------
def bytes_moved(
    n_params: int,
    shape: Sequence[int],
    normalized_shape: Sequence[int],
    dtype: torch.dtype,
    mode: str,
    param_dtype: Optional[torch.dtype] = None,
) -> int:
    """Minimum DRAM/HBM traffic of the op.

    fwd: read x + write y + read params.
    bwd: read x + read dy + write dx + read params + write dparams.
    fwd+bwd: the sum. The per-row mean/rstd statistics are not counted (negligible).
    """
    numel = math.prod(int(s) for s in shape)
    pnumel = math.prod(int(s) for s in normalized_shape)
    es = torch.empty((), dtype=dtype).element_size()
    pes = torch.empty((), dtype=param_dtype or dtype).element_size()
    fwd = 2 * numel * es + n_params * pnumel * pes
    bwd = 3 * numel * es + 2 * n_params * pnumel * pes
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    if mode == "fwd+bwd":
        return fwd + bwd
    raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
@dataclass
class TimingConfig:
    """How hard to time: CPU caps each measurement at ``max_time_s`` (at least ``min_reps`` runs)."""

    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 100
    max_time_s: float = 0.5


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, cfg: TimingConfig) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    if device == "cuda":
        try:
            from triton.testing import do_bench  # type: ignore

            return float(do_bench(fn, return_mode="median"))
        except Exception:  # noqa: BLE001 - no triton / old triton: fall back to CUDA events
            pass
        for _ in range(max(cfg.warmup, 3)):
            fn()
        torch.cuda.synchronize()
        times = []
        t_start = time.perf_counter()
        while len(times) < cfg.max_reps and (len(times) < cfg.min_reps or time.perf_counter() - t_start < 1.0):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(statistics.median(times))
    for _ in range(cfg.warmup):
        fn()
    times = []
    t_start = time.perf_counter()
    while len(times) < cfg.max_reps and (
        len(times) < cfg.min_reps or time.perf_counter() - t_start < cfg.max_time_s
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times)) * 1e3


def copy_ceiling_ms(n_bytes: int, device: str, cfg: TimingConfig) -> float:
    """Time of ``dst.copy_(src)`` moving ``n_bytes`` in total (n_bytes/2 read + n_bytes/2 written)."""
    half = max(n_bytes // 2, 1)
    src = torch.ones(half, dtype=torch.uint8, device=device)
    dst = torch.zeros(half, dtype=torch.uint8, device=device)
    ms = time_fn(lambda: dst.copy_(src), device, cfg)
    del src, dst
    return ms


# --------------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------------
def _leaf(t: Tensor, grad: bool) -> Tensor:
    return t.detach().clone().requires_grad_(grad)


def _max_err(a: Tensor, ref: Tensor) -> float:
    return float((a.detach().double() - ref).abs().max().item())


@dataclass
class Impl:
    """A runnable implementation of a case (fusenorm, torch, compile, or a third-party peer)."""

    name: str
    fn: Optional[NormFn]  # fwd and fwd+bwd use the same callable
    fn_fwd: Optional[NormFn] = None  # optional separate callable for no-grad fwd (torch.compile)
    skip_reason: Optional[str] = None
    setup_s: Optional[float] = None


def _compiled_impls(case: Case, enabled: bool) -> Impl:
    """torch.compile of the torch.nn.functional op, one compiled object per case (fixed shape)."""
    if not enabled:
        return Impl("compile", None, skip_reason="disabled (--no-compile)")
    try:
        import torch._dynamo

        # Dynamo caches compiled code per Python code object; every case reuses the same wrapper code, so
        # drop the previous cases' entries rather than hit the recompile limit (which silently runs eager).
        torch._dynamo.reset()
        # AOTAutograd's "donated buffers" forbid backward(retain_graph=True), which the bwd rows need.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        fn = torch.compile(case.torch_fn, dynamic=False)
    except Exception as e:  # noqa: BLE001
        return Impl("compile", None, skip_reason=f"torch.compile unavailable: {type(e).__name__}: {e}"[:200])
    return Impl("compile", fn, fn_fwd=fn)


def _peer_impls(case: Case, device: str, skipped: Dict[str, str]) -> List[Impl]:
    """Build third-party peers; not-installed ones are recorded once in ``skipped`` and dropped."""
    out = []
    for peer in case.peers:
        try:
            importlib.import_module(peer.module)
        except Exception as e:  # noqa: BLE001 - ImportError or a broken install
            skipped.setdefault(peer.name, f"not installed ({peer.module}: {type(e).__name__})")
            continue
        if peer.gpu_only and device != "cuda":
            skipped.setdefault(peer.name, "GPU-only peer, device is cpu")
            continue
        try:
            out.append(Impl(peer.name, peer.build(case, device)))
        except PeerSkipped as e:
            out.append(Impl(peer.name, None, skip_reason=str(e)))
        except Exception as e:  # noqa: BLE001
            out.append(Impl(peer.name, None, skip_reason=f"setup failed: {type(e).__name__}: {e}"[:200]))
    return out


def _row(case: Case, mode: str, impl: str, **kw: Any) -> Dict[str, Any]:
    row: Dict[str, Any] = {
        "norm": case.norm,
        "shape": list(case.shape),
        "normalized_shape": list(case.normalized_shape),
        "dtype": DTYPE_NAMES.get(case.dtype, str(case.dtype)),
        "direction": mode,
        "implementation": impl,
        "status": "ok",
        "reason": None,
        "bytes": None,
        "time_ms": None,
        "gbps": None,
        "pct_of_copy": None,
        "max_err": None,
        "max_err_dx": None,
        "speedup_vs_torch": None,
        "speedup_vs_compile": None,
        "setup_s": None,
    }
    row.update(kw)
    return row


def run_case(
    case: Case,
    device: str,
    modes: Sequence[str],
    cfg: TimingConfig,
    use_compile: bool,
    skipped: Dict[str, str],
    progress: Callable[[str], None],
    copy_cache: Dict[int, float],
) -> List[Dict[str, Any]]:
    """Correctness check + timings of every implementation of ``case`` for each mode."""
    torch.manual_seed(0)
    x, params = case.make_inputs(device)
    need_bwd = any(m != "fwd" for m in modes)

    # fp64 reference on the same inputs (on the same device).
    xr, pr = _leaf(x.double(), need_bwd), tuple(_leaf(p.double(), False) for p in params)
    y_ref = case.torch_fn(xr, *pr)
    dy = torch.randn_like(y_ref, dtype=x.dtype)  # in y's memory format (channels-last suites)
    dx_ref = torch.autograd.grad(y_ref, xr, dy.double())[0].detach() if need_bwd else None
    y_ref = y_ref.detach()
    del xr, pr

    impls = [Impl("fusenorm", case.fusenorm), Impl("torch", case.torch_fn), _compiled_impls(case, use_compile)]
    impls += _peer_impls(case, device, skipped)

    # Correctness (also the first, compiling call).
    errs: Dict[str, Tuple[float, Optional[float]]] = {}
    for impl in impls:
        if impl.fn is None:
            continue
        try:
            t0 = time.perf_counter()
            if impl.fn_fwd is not None and "fwd" in modes:
                with torch.no_grad():
                    impl.fn_fwd(x, *params)
            xg, pg = _leaf(x, need_bwd), tuple(_leaf(p, need_bwd) for p in params)
            y = impl.fn(xg, *pg)
            dx = torch.autograd.grad(y, xg, dy)[0] if need_bwd else None
            _sync(device)
            impl.setup_s = time.perf_counter() - t0
            errs[impl.name] = (_max_err(y, y_ref), _max_err(dx, dx_ref) if dx is not None else None)
            del xg, pg, y, dx
        except Exception as e:  # noqa: BLE001 - a failing peer is a row, never a crash
            status = "skipped" if impl.name == "compile" else "error"
            impl.skip_reason = f"{status}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            impl.fn = None

    rows: List[Dict[str, Any]] = []
    for mode in modes:
        progress(f"{case.label} {mode}")
        nbytes = bytes_moved(case.n_params, case.shape, case.normalized_shape, case.dtype, mode)
        if nbytes not in copy_cache:
            copy_cache[nbytes] = copy_ceiling_ms(nbytes, device, cfg)
        copy_ms = copy_cache[nbytes]
        copy_gbps = nbytes / (copy_ms * 1e-3) / 1e9
        mode_rows = [_row(case, mode, "copy", bytes=nbytes, time_ms=copy_ms, gbps=copy_gbps, pct_of_copy=100.0)]
        for impl in impls:
            if impl.fn is None:
                reason = impl.skip_reason or "unavailable"
                status = "error" if reason.startswith("error") else "skipped"
                mode_rows.append(_row(case, mode, impl.name, status=status, reason=reason, bytes=nbytes))
                continue
            try:
                ms = _time_mode(impl, mode, x, params, dy, device, cfg)
            except Exception as e:  # noqa: BLE001
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                status = "skipped" if impl.name == "compile" else "error"
                mode_rows.append(_row(case, mode, impl.name, status=status, reason=reason, bytes=nbytes))
                continue
            gbps = nbytes / (ms * 1e-3) / 1e9
            err_y, err_dx = errs[impl.name]
            mode_rows.append(
                _row(case, mode, impl.name, bytes=nbytes, time_ms=ms, gbps=gbps,
                     pct_of_copy=100.0 * gbps / copy_gbps,
                     max_err=err_y if mode != "bwd" else None,
                     max_err_dx=err_dx if mode != "fwd" else None,
                     setup_s=impl.setup_s)
            )
        _add_speedups(mode_rows)
        rows += mode_rows
    return rows


def _time_mode(
    impl: Impl, mode: str, x: Tensor, params: Tuple[Tensor, ...], dy: Tensor, device: str, cfg: TimingConfig
) -> float:
    """Time one implementation in one mode (fwd under no_grad; bwd on a prebuilt graph)."""
    fn = impl.fn
    assert fn is not None
    if mode == "fwd":
        fwd = impl.fn_fwd or fn

        def run() -> Any:
            with torch.no_grad():
                return fwd(x, *params)

        return time_fn(run, device, cfg)
    xg, pg = _leaf(x, True), tuple(_leaf(p, True) for p in params)
    inputs = (xg,) + pg
    # dy in the memory format of this implementation's own output, as the layer after it would
    # produce (torch.nn's InstanceNorm returns contiguous for a channels_last input, fusenorm does not)
    with torch.no_grad():
        y0 = fn(x, *params)
    if dy.stride() != y0.stride():
        dy = torch.empty_like(y0).copy_(dy)
    del y0
    if mode == "fwd+bwd":
        return time_fn(lambda: torch.autograd.grad(fn(xg, *pg), inputs, dy), device, cfg)
    if mode == "bwd":
        y = fn(xg, *pg)
        return time_fn(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), device, cfg)
    raise ValueError(mode)


def _add_speedups(rows: List[Dict[str, Any]]) -> None:
    """speedup_vs_X = time(X) / time(row): > 1 means the row's implementation is faster than X."""
    times = {r["implementation"]: r["time_ms"] for r in rows if r["time_ms"] is not None}
    for r in rows:
        if r["time_ms"] is None or r["implementation"] == "copy":
            continue
        if "torch" in times:
            r["speedup_vs_torch"] = times["torch"] / r["time_ms"]
        if "compile" in times:
            r["speedup_vs_compile"] = times["compile"] / r["time_ms"]


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def git_commit() -> str:
    """Short commit hash of the repo (FUSENORM_COMMIT when set: a copied tree's .git can be stale), or 'unknown'."""
    if os.environ.get("FUSENORM_COMMIT"):
        return os.environ["FUSENORM_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def allocator_note(device: str) -> str:
    """Describe the CPU allocator setup actually in effect for this process."""
    active = {k: os.environ.get(k) for k in MALLOC_ENV}
    if all(active[k] == v for k, v in MALLOC_ENV.items()):
        how = ("glibc malloc tuned before torch loaded (process re-exec): "
               + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
               + "; large tensors come from the reused heap, not fresh mmap()s, so no implementation "
               "pays page faults on its output; applied alike to every implementation and the copy")
    else:
        set_vars = " ".join(f"{k}={v}" for k, v in active.items() if v is not None) or "none"
        how = (f"default allocator (MALLOC_* vars in effect: {set_vars}); large outputs may be fresh mmap()s "
               "that page-fault on every call, inflating all CPU timings alike")
    if device == "cuda":
        how = "CUDA timings use torch's caching allocator; host allocator: " + how
    return how


def device_name(device: str) -> str:
    """GPU name or CPU model."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_model()


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    text = re.sub(r"\(r\)|\(tm\)|@", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:60] or "device"


def metadata(device: str) -> Dict[str, Any]:
    """Machine / software description stored at the top of the JSON."""
    try:
        import fusenorm

        fn_version = getattr(fusenorm, "__version__", "unknown")
        fn_isa = fusenorm.cpu_isa()
        fn_cuda = fusenorm.cuda_kernels_compiled()
    except Exception as e:  # noqa: BLE001
        fn_version, fn_isa, fn_cuda = f"import failed: {e}", None, None
    return {
        "machine": {
            "hostname": socket.gethostname(),
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
        },
        "device": device,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "fusenorm_version": fn_version,
        "fusenorm_cpu_isa": fn_isa,
        "fusenorm_cuda_kernels": fn_cuda,
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "allocator": allocator_note(device),
    }


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    return format(v, spec)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Plain-text table, one line per (case, direction, implementation)."""
    header = ["norm", "shape", "dtype", "dir", "impl", "ms", "GB/s", "%copy", "max_err", "dx_err",
              "x torch", "x compile", "note"]
    lines = []
    for r in rows:
        lines.append([
            r["norm"], shape_str(r["shape"]), r["dtype"], r["direction"], r["implementation"],
            _fmt(r["time_ms"], ".3f"), _fmt(r["gbps"], ".1f"), _fmt(r["pct_of_copy"], ".0f"),
            _fmt(r["max_err"], ".1e"), _fmt(r["max_err_dx"], ".1e"),
            _fmt(r["speedup_vs_torch"], ".2f"), _fmt(r["speedup_vs_compile"], ".2f"),
            "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"[:70],
        ])
    widths = [max(len(h), *(len(str(l[i])) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    right = {5, 6, 7, 8, 9, 10, 11}

    def fmt_line(cells: Sequence[str]) -> str:
        parts = [(str(c).rjust(w) if i in right else str(c).ljust(w)) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    out = [fmt_line(header), fmt_line(["-" * w for w in widths])]
    prev = None
    for r, l in zip(rows, lines):
        key = (r["norm"], tuple(r["shape"]), r["dtype"], r["direction"])
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(fmt_line(l))
    return "\n".join(out)


def write_json(result: Dict[str, Any], out_dir: Path) -> Path:
    """Write ``bench-<device-slug>-<date>.json`` into out_dir and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-{slug(result['device_name'])}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return path


def write_png(result: Dict[str, Any], json_path: Path) -> Tuple[Optional[Path], str]:
    """GB/s bar chart, one panel per (norm, direction); returns (path or None, note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return None, f"PNG skipped: matplotlib not importable ({type(e).__name__})"
    rows = [r for r in result["rows"] if r["gbps"] is not None]
    panels = sorted({(r["norm"], r["direction"]) for r in rows}, key=lambda k: (k[0], MODES_ALL.index(k[1])))
    if not panels:
        return None, "PNG skipped: no timed rows"
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)
    for ax, (norm, mode) in zip(axes.flat, panels):
        sub = [r for r in rows if r["norm"] == norm and r["direction"] == mode]
        groups = list(dict.fromkeys(f"{shape_str(r['shape'])}\n{r['dtype']}" for r in sub))
        impls = list(dict.fromkeys(r["implementation"] for r in sub))
        width = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            vals = {f"{shape_str(r['shape'])}\n{r['dtype']}": r["gbps"] for r in sub if r["implementation"] == impl}
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(groups))]
            hatch = "//" if impl == "copy" else None
            ax.bar(xs, [vals.get(g, 0.0) for g in groups], width, label=impl, hatch=hatch,
                   color="lightgray" if impl == "copy" else None, edgecolor="black", linewidth=0.3)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{norm} {mode}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"fusenorm on {result['device_name']} ({result['date']})", fontsize=9)
    fig.tight_layout()
    path = json_path.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, f"PNG written: {path}"


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def run(
    cases: Sequence[Case],
    device: str,
    modes: Sequence[str],
    cfg: TimingConfig,
    use_compile: bool = True,
    out_dir: Optional[Path] = None,
    quiet: bool = False,
    png: bool = True,
) -> Dict[str, Any]:
    """Run all cases; returns the result dict (and writes JSON/PNG if out_dir is given)."""
    total = len(cases) * len(modes)
    counter = [0]

    def progress(msg: str) -> None:
        counter[0] += 1
        if not quiet:
            print(f"[{counter[0]}/{total}] {msg}", file=sys.stderr, flush=True)

    skipped: Dict[str, str] = {}
    copy_cache: Dict[int, float] = {}
    rows: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    for case in cases:
        rows += run_case(case, device, modes, cfg, use_compile, skipped, progress, copy_cache)
    result = metadata(device)
    result.update({
        "modes": list(modes),
        "timing": {"warmup": cfg.warmup, "min_reps": cfg.min_reps, "max_reps": cfg.max_reps,
                   "max_time_s": cfg.max_time_s,
                   "method": _timing_method(device)},
        "bytes_model": "fwd: x read + y written + params read; bwd: x, dy read + dx written + params read "
                       "+ dparams written; fwd+bwd: sum; mean/rstd not counted",
        "compile_note": "torch.compile(torch.nn.functional op, dynamic=False), default mode, one per "
                        "norm/shape/dtype; torch._functorch.config.donated_buffer=False so that bwd rows "
                        "can use retain_graph=True" if use_compile else "disabled (--no-compile)",
        "skipped": [{"implementation": k, "reason": v} for k, v in sorted(skipped.items())],
        "elapsed_s": round(time.perf_counter() - t0, 2),
        "rows": rows,
    })
    if out_dir is not None:
        path = write_json(result, out_dir)
        result["json_path"] = str(path)
        png_path, note = write_png(result, path) if png else (None, "PNG skipped: --no-png")
        result["png_path"] = str(png_path) if png_path else None
        result["png_note"] = note
    return result


def _timing_method(device: str) -> str:
    if device == "cuda":
        try:
            import triton.testing  # type: ignore  # noqa: F401

            return "triton.testing.do_bench median"
        except Exception:  # noqa: BLE001
            return "CUDA events median"
    return "time.perf_counter median after warm-up, each measurement capped at max_time_s"


def summary_lines(result: Dict[str, Any]) -> List[str]:
    """Lines printed under the table: skipped peers, allocator note, output paths."""
    out = []
    for s in result["skipped"]:
        out.append(f"skipped: {s['implementation']}: {s['reason']}")
    out.append(f"allocator: {result['allocator']}")
    out.append(f"timing: {result['timing']['method']}; bytes: {result['bytes_model']}")
    out.append("x torch / x compile = time(torch or compile) / time(row): > 1 means the row is faster")
    if result.get("json_path"):
        out.append(f"JSON: {result['json_path']}")
    if result.get("png_note"):
        out.append(result["png_note"])
    out.append(f"elapsed: {result['elapsed_s']:.1f} s")
    return out
