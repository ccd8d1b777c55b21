"""CLI: ``PYTHONPATH=python python -m benchmarks [--quick|--full] [--device cpu|cuda] ...``.

Before torch is imported, the process re-executes itself once with the glibc malloc settings of
``harness.MALLOC_ENV`` (see benchmarks/README.md), unless FUSENORM_BENCH_NO_REEXEC=1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

_REEXEC_FLAG = "FUSENORM_BENCH_REEXEC"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "local"


def _maybe_reexec(argv: Sequence[str]) -> None:
    """Re-exec with the malloc env vars set (glibc reads them only at process start)."""
    if sys.platform != "linux" or os.environ.get("FUSENORM_BENCH_NO_REEXEC") == "1":
        return
    if os.environ.get(_REEXEC_FLAG) == "1":
        return
    from . import MALLOC_ENV  # no torch import

    env = dict(os.environ)
    env.update(MALLOC_ENV)
    env[_REEXEC_FLAG] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], env)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="fusenorm benchmarks")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="full", action="store_false", help="small set of shapes (default)")
    size.add_argument("--full", dest="full", action="store_true", help="all shapes")
    p.set_defaults(full=False)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available else cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dir (default {DEFAULT_OUT})")
    p.add_argument("--norms", default=None, help="comma-separated suites (default: all)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16,fp16,fp64")
    p.add_argument("--modes", default=None, help="comma-separated subset of fwd,bwd,fwd+bwd "
                   "(default: all; --quick on cpu: fwd,fwd+bwd)")
    p.add_argument("--shapes", default=None, help="override shapes, e.g. 4096x4096,8192x1024")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile peer")
    p.add_argument("--max-time", type=float, default=0.5, help="CPU: cap per measurement in seconds")
    p.add_argument("--reps", type=int, default=100, help="max repeats per measurement")
    p.add_argument("--min-reps", type=int, default=3, help="min repeats per measurement")
    p.add_argument("--warmup", type=int, default=1, help="CPU warm-up calls per measurement")
    p.add_argument("--no-png", dest="png", action="store_false", help="do not draw the PNG chart")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmarks, print the table; returns the result dict."""
    args = parse_args(argv)
    import torch

    from . import harness
    from .suites import SUITES

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    dtypes = []
    for name in args.dtypes.split(","):
        if name.strip() not in harness.DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; choose from {sorted(harness.DTYPES)}")
        dtypes.append(harness.DTYPES[name.strip()])
    modes: List[str] = list(harness.default_modes(device, args.full))
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",")]
        bad = [m for m in modes if m not in harness.MODES_ALL]
        if bad:
            raise SystemExit(f"unknown modes {bad}; choose from {harness.MODES_ALL}")
    shapes = harness.parse_shapes(args.shapes) if args.shapes else None
    cases = []
    for norm in (args.norms or ",".join(SUITES)).split(","):
        if norm.strip() not in SUITES:
            raise SystemExit(f"unknown norm {norm!r}; choose from {sorted(SUITES)}")
        cases += SUITES[norm.strip()].cases(device, args.full, dtypes, shapes)

    cfg = harness.TimingConfig(warmup=args.warmup, min_reps=args.min_reps, max_reps=args.reps,
                               max_time_s=args.max_time)
    result = harness.run(cases, device, modes, cfg, use_compile=args.compile, out_dir=args.out,
                         quiet=args.quiet, png=args.png)
    print(f"fusenorm {result['fusenorm_version']} | torch {result['torch_version']} | "
          f"{result['device_name']} | commit {result['git_commit']} | {result['date']}")
    print(harness.format_table(result["rows"]))
    print()
    for line in harness.summary_lines(result):
        print(line)
    return result


if __name__ == "__main__":
    _maybe_reexec(sys.argv[1:])
    main()
