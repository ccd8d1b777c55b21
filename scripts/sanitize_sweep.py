"""A small forward+backward sweep that reaches every CUDA code path once, for compute-sanitizer.

Paths: each register config (sub-warp, warp, block per row), the shared-memory and global
block-per-row fallbacks, the scalar path (odd N, misaligned storage), fp32/bf16/fp64, mixed
fp32 parameters, with and without weight/bias; GroupNorm + SiLU / GELU in both layouts and with
one group per channel (InstanceNorm); BatchNorm training and eval with relu + residual, both
layouts, vectorized and scalar; GroupNorm and BatchNorm at three shared-memory budgets (the
single-pass kernels with one block and with clusters, and the two-pass kernels). Exits non-zero on
a mismatch with torch.nn."""
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
    # GroupNorm and BatchNorm at three shared-memory budgets: the default (single-pass kernels, one
    # block per unit), 1 KiB (clusters of several blocks where the device has them) and 0 (the
    # two-pass kernels)
    for budget in (None, "1024", "0"):
        if budget is None:
            os.environ.pop("FUSENORM_ONCHIP_BYTES", None)
        else:
            os.environ["FUSENORM_ONCHIP_BYTES"] = budget
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
        # GroupNorm in bf16, channels-last, vectorized apply (C % 8 == 0), and an odd-sized fp32 case
        for shape, groups, cl, dt in (((2, 32, 6, 6), 8, True, torch.bfloat16),
                                      ((3, 6, 7, 5), 3, False, torch.float32)):
            x = torch.randn(shape, device=dev, dtype=dt)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            y = fusenorm.group_norm(x, groups, activation="gelu")
            ok &= check(f"group_norm {shape} {dt} gelu", y, F.gelu(F.group_norm(x.double(), groups)), 0.05)
        # BatchNorm: training (stats, apply, backward) and eval, both layouts, relu + residual, the
        # vectorized and the scalar paths, fp32 / bf16 / fp64
        for shape, cl, dt in (((4, 16, 6, 8), False, torch.float32), ((4, 16, 6, 8), True, torch.bfloat16),
                              ((3, 5, 7, 3), False, torch.float32), ((3, 5, 7, 3), True, torch.float64),
                              ((40, 24), False, torch.float32)):
            x = torch.randn(shape, device=dev, dtype=dt) * 2 + 1
            if cl:
                x = x.to(memory_format=torch.channels_last)
            z = torch.randn_like(x)
            x.requires_grad_()
            c = shape[1]
            w = torch.randn(c, device=dev, dtype=dt, requires_grad=True)
            b = torch.randn(c, device=dev, dtype=dt, requires_grad=True)
            dy = torch.randn_like(x)
            tol = 0.1 if dt == torch.bfloat16 else 1e-3
            for training in (True, False):
                rm, rv = torch.zeros(c, device=dev, dtype=dt), torch.ones(c, device=dev, dtype=dt)
                y = fusenorm.batch_norm(x, rm, rv, w, b, training, activation="relu", residual=z)
                grads = torch.autograd.grad(y, [x, w, b], dy)
                xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
                rmd = torch.zeros(c, device=dev, dtype=torch.float64)
                rvd = torch.ones(c, device=dev, dtype=torch.float64)
                yr = F.relu(F.batch_norm(xd, rmd, rvd, wd, bd, training) + z.double())
                gr = torch.autograd.grad(yr, [xd, wd, bd], dy.double())
                ok &= check(f"batch_norm {shape} cl={cl} {dt} train={training} y", y, yr, tol)
                ok &= check(f"batch_norm {shape} cl={cl} {dt} running_var", rv, rvd, tol)
                for i, (g, r) in enumerate(zip(grads, gr)):
                    ok &= check(f"batch_norm {shape} cl={cl} {dt} train={training} grad{i}", g, r, tol * 10)
    os.environ.pop("FUSENORM_ONCHIP_BYTES", None)
    torch.cuda.synchronize()
    print("sanitize sweep:", "ok" if ok else "MISMATCHES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
