"""Times the CUDA single-pass training forward (csrc/cuda/onchip_norm.cuh) against the two-pass
kernels, a device-to-device copy of the same bytes and torch.nn, at several shared-memory budgets
per block (FUSENORM_ONCHIP_BYTES; 0 = the two-pass kernels), to choose the default budget.

    python scripts/onchip_sweep.py OUT.json

Medians of triton.testing.do_bench; GB/s counts x read and y written once. Prints a table."""
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import fusenorm  # noqa: E402,F401  (registers torch.ops.fusenorm)

BUDGETS = ["0", str(48 * 1024), str(72 * 1024), str(100 * 1024), str(150 * 1024), str(224 * 1024)]
# (norm, shape, groups): ResNet-50 BatchNorm, diffusion-UNet GroupNorm, an InstanceNorm; each in
# contiguous layout, then those whose channels-last units can fit on chip in channels_last
CASES = [("batch_norm", (64, 256, 56, 56), None), ("batch_norm", (256, 1024, 14, 14), None),
         ("batch_norm", (256, 2048, 7, 7), None), ("group_norm", (16, 320, 64, 64), 32),
         ("group_norm", (2, 320, 64, 64), 32), ("group_norm", (8, 640, 32, 32), 32),
         ("group_norm", (16, 1280, 32, 32), 32), ("instance_norm", (16, 64, 256, 256), 64)]
CASES = [c + (False,) for c in CASES] + [c + (True,) for c in CASES[1:-1]] + [
    ("instance_norm", (16, 64, 64, 64), 64, True)]


def main() -> int:
    out = sys.argv[1] if len(sys.argv) > 1 else "onchip_sweep.json"
    rows = []
    ops = torch.ops.fusenorm
    for norm, shape, groups, nsc in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device="cuda", dtype=dtype)
            if nsc:
                x = x.to(memory_format=torch.channels_last)
            c = shape[1]
            w, b = torch.randn(c, device="cuda", dtype=dtype), torch.randn(c, device="cuda", dtype=dtype)
            y = torch.empty_like(x)
            nbytes = 2 * x.numel() * x.element_size()
            if norm == "batch_norm":
                ours = lambda: ops.batch_norm_fwd(x, w, b, None, 1e-5, "none")  # noqa: E731
                torch_fn = lambda: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)  # noqa: E731
            else:
                act = "silu" if norm == "group_norm" else "none"
                ours = lambda: ops.group_norm_fwd(x, groups, w, b, 1e-5, act)  # noqa: E731
                torch_fn = (lambda: F.silu(F.group_norm(x, groups, w, b, 1e-5))) if act == "silu" else \
                    (lambda: F.group_norm(x, groups, w, b, 1e-5))  # noqa: E731
            copy_ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
            torch_ms = do_bench(torch_fn, warmup=25, rep=100, return_mode="median")
            row = {"norm": norm + ("_cl" if nsc else ""), "shape": "x".join(map(str, shape)),
                   "dtype": str(dtype).replace("torch.", ""),
                   "copy_ms": copy_ms, "torch_ms": torch_ms, "budgets": {}}
            ref = None
            for budget in BUDGETS:
                os.environ["FUSENORM_ONCHIP_BYTES"] = budget
                try:
                    got = ours()
                    if ref is None:
                        ref = got
                    err = (got[0].float() - ref[0].float()).abs().max().item()
                    ms = do_bench(ours, warmup=25, rep=100, return_mode="median")
                    row["budgets"][budget] = {"ms": ms, "pct_copy": 100 * copy_ms / ms, "x_torch": torch_ms / ms,
                                              "max_diff_vs_two_pass": err}
                except Exception as e:  # noqa: BLE001  (report and go on: this is a sweep)
                    row["budgets"][budget] = {"error": str(e)[:200]}
            os.environ.pop("FUSENORM_ONCHIP_BYTES", None)
            rows.append(row)
            cells = []
            for budget in BUDGETS:
                r = row["budgets"][budget]
                cells.append("ERR" if "error" in r else f"{r['pct_copy']:4.0f}%/{r['x_torch']:.2f}x")
            print(f"{row['norm']:16s} {row['shape']:16s} {row['dtype']:8s} copy {nbytes / copy_ms / 1e6:6.0f} GB/s | "
                  + " | ".join(f"{b_}: {c_}" for b_, c_ in zip(BUDGETS, cells)), flush=True)
            del x, y, w, b, ref
            torch.cuda.empty_cache()
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, open(out, "w"),
              indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
