"""A small forward+backward sweep that reaches every CUDA code path once, for compute-sanitizer.

Paths: each register config (sub-warp, warp, block per row), the shared-memory and global
block-per-row fallbacks, the scalar path (odd N, misaligned storage), fp32/bf16/fp64, mixed
fp32 parameters, with and without weight/bias; GroupNorm + SiLU in both layouts and with one
group per channel (InstanceNorm). Exits non-zero on a mismatch with torch.nn."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import fusenorm  # noqa: E402

F = torch.nn.functional


def check(name, ours, ref, tol):
    err = (ours.double() - ref.double()).abs().max().item() if ours.numel() else 0.0
    if not err <= tol:
        print(f"MISMATCH {name}: {err:.3g} > {tol}")
        return False
    return True


def main() -> int:
    ok = True
    dev = "cuda"
    cases = []
    for n in (8, 40, 256, 1000, 1024, 4096, 8192, 16384, 20000, 70000):
        cases.append((n, torch.bfloat16, torch.bfloat16, 0))
    for n in (3, 127, 4097):
        cases.append((n, torch.float32, torch.float32, 0))
    cases += [(1024, torch.float32, torch.float32, 1), (2048, torch.bfloat16, torch.float32, 0),
              (512, torch.float64, torch.float64, 0), (4096, torch.float16, torch.float32, 0)]
    for n, dt, pdt, offset in cases:
        rows = 5 if n > 10000 else 33
        base = torch.randn(rows * n + offset, device=dev, dtype=dt)
        x = base[offset:].view(rows, n).detach().requires_grad_()
        w = torch.randn(n, device=dev, dtype=pdt, requires_grad=True)
        b = torch.randn(n, device=dev, dtype=pdt, requires_grad=True)
        dy = torch.randn_like(x)
        tol = 0.1 if dt in (torch.bfloat16, torch.float16) else 1e-3
        for name, ours, theirs, args in (
            ("layer_norm", fusenorm.layer_norm, F.layer_norm, (w, b)),
            ("rms_norm", fusenorm.rms_norm, F.rms_norm, (w,)),
            ("layer_norm_noaffine", fusenorm.layer_norm, F.layer_norm, (None, None)),
        ):
            y = ours(x, (n,), *args)
            grads = torch.autograd.grad(y, [x] + [a for a in args if a is not None], dy)
            xd = x.detach().double().requires_grad_()
            ad = [a.detach().double().requires_grad_() if a is not None else None for a in args]
            yr = theirs(xd, (n,), *ad)
            gr = torch.autograd.grad(yr, [xd] + [a for a in ad if a is not None], dy.double())
            ok &= check(f"{name} n={n} {dt} y", y, yr, tol)
            for i, (g, r) in enumerate(zip(grads, gr)):
                ok &= check(f"{name} n={n} {dt} grad{i}", g, r, tol * (rows ** 0.5 if i else 1) * 4)
    # GroupNorm (+ SiLU) in both layouts, and InstanceNorm (one group per channel)
    for shape, groups, cl in (((2, 12, 5, 7), 4, False), ((2, 12, 5, 7), 4, True), ((1, 8, 33), 8, False)):
        x = torch.randn(shape, device=dev)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.randn(shape[1], device=dev, requires_grad=True)
        b = torch.randn(shape[1], device=dev, requires_grad=True)
        dy = torch.randn_like(x)
        y = fusenorm.group_norm(x, groups, w, b, activation="silu")
        grads = torch.autograd.grad(y, [x, w, b], dy)
        xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
        yr = F.silu(F.group_norm(xd, groups, wd, bd))
        gr = torch.autograd.grad(yr, [xd, wd, bd], dy.double())
        ok &= check(f"group_norm {shape} cl={cl} y", y, yr, 1e-3)
        for i, (g, r) in enumerate(zip(grads, gr)):
            ok &= check(f"group_norm {shape} cl={cl} grad{i}", g, r, 1e-2)
    torch.cuda.synchronize()
    print("sanitize sweep:", "ok" if ok else "MISMATCHES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
