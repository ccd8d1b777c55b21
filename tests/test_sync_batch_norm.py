"""fusenorm.SyncBatchNorm in a real torch.distributed group: 2 and 3 processes with the gloo
backend, each given an uneven slice of one batch (one rank's slice is empty), against
torch.nn.BatchNorm on the whole batch: outputs, input gradients, weight/bias gradients summed over
the ranks (what DDP's all-reduce does), and the running statistics on every rank. Also a model
of converted modules trained under DistributedDataParallel against its torch.nn twin."""
from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(rank: int, world: int, store: str, sizes: list, layout: str, epilogue: bool, out_dir: str) -> None:
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    import fusenorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(7)
        full = torch.randn(sum(sizes), 6, 5, 4, generator=g) * 2 + 3
        dy_full = torch.randn(full.shape, generator=g)
        z_full = torch.randn(full.shape, generator=g) * 3
        start = sum(sizes[:rank])
        x = full[start:start + sizes[rank]].clone()
        dy = dy_full[start:start + sizes[rank]].clone()
        z = z_full[start:start + sizes[rank]].clone()
        if layout == "channels_last":
            x, dy, z = (t.to(memory_format=torch.channels_last) for t in (x, dy, z))
        x.requires_grad_()
        z.requires_grad_()
        m = fusenorm.SyncBatchNorm(6, momentum=0.3, activation="relu" if epilogue else None)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
        outs = []
        for step in range(2):  # two steps: the running statistics compound
            y = m(x, residual=z) if epilogue else m(x)
            (y * dy).sum().backward()
            outs.append({"y": y.detach().clone(), "dx": x.grad.clone(), "dw": m.weight.grad.clone(),
                         "db": m.bias.grad.clone(), "dz": z.grad.clone() if epilogue else None})
            x.grad = None
            z.grad = None
            m.weight.grad = None
            m.bias.grad = None
        torch.save({"steps": outs, "state": m.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[5, 3], [4, 0, 3]], ids=["2-ranks", "3-ranks-one-empty"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "relu-residual"])
def test_sync_batch_norm_matches_whole_batch(tmp_path, sizes, layout, epilogue):
    """With the epilogue: y = relu(bn(x) + z) on every rank, against torch's on the whole batch,
    the residual's gradient included."""
    world = len(sizes)
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), sizes, layout, epilogue, str(tmp_path)), nprocs=world,
             join=True)
    g = torch.Generator().manual_seed(7)
    full = (torch.randn(sum(sizes), 6, 5, 4, generator=g) * 2 + 3).requires_grad_()
    dy_full = torch.randn(full.shape, generator=g)
    z_full = (torch.randn(full.shape, generator=g) * 3).requires_grad_()
    ref = torch.nn.BatchNorm2d(6, momentum=0.3)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 6))
        ref.bias.copy_(torch.linspace(-1, 1, 6))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for step in range(2):
        y = torch.relu(ref(full) + z_full) if epilogue else ref(full)
        dx, dw, db, dz = torch.autograd.grad((y * dy_full).sum(), [full, ref.weight, ref.bias, z_full],
                                             allow_unused=True)
        if epilogue:
            torch.testing.assert_close(torch.cat([r["steps"][step]["dz"] for r in results]), dz)
            assert (dz == 0).any() and (dz != 0).any()  # the ReLU masks some values and passes others
        got_y = torch.cat([r["steps"][step]["y"] for r in results])
        got_dx = torch.cat([r["steps"][step]["dx"] for r in results])
        torch.testing.assert_close(got_y, y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_dx, dx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sum(r["steps"][step]["dw"] for r in results), dw, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(sum(r["steps"][step]["db"] for r in results), db, atol=1e-4, rtol=1e-5)
        for r in results:
            assert r["steps"][step]["y"].stride() == (
                r["steps"][step]["y"].contiguous(memory_format=torch.channels_last).stride()
                if layout == "channels_last" else r["steps"][step]["y"].contiguous().stride())
    for r in results:
        assert list(r["state"]) == list(ref.state_dict())
        for k, t in ref.state_dict().items():
            torch.testing.assert_close(r["state"][k], t, atol=1e-5, rtol=1e-5, msg=k)


def _ddp_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    import fusenorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        states = []
        for convert in (True, False):
            torch.manual_seed(0)  # the same initial model on every rank and for both twins
            model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 8, 1), torch.nn.GroupNorm(4, 8),
                                        torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
                                        torch.nn.Flatten(1), torch.nn.Linear(8 * 6 * 6, 4), torch.nn.LayerNorm(4))
            if convert:
                fusenorm.convert(model)
                assert isinstance(model[1], fusenorm.BatchNorm2d)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
            for _ in range(3):
                loss = ddp(torch.randn(4, 3, 8, 8, generator=g)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            states.append(model.state_dict())
        torch.save(states, os.path.join(out_dir, f"ddp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_training_matches_torch(tmp_path):
    """A model converted to fusenorm modules (BatchNorm, GroupNorm, InstanceNorm with running
    statistics, LayerNorm) trains under DistributedDataParallel (2 gloo processes, their own
    batches, 3 SGD steps: gradients all-reduced, BatchNorm buffers broadcast from rank 0) to the
    same parameters and buffers as the torch.nn model, on every rank."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        ours, theirs = torch.load(tmp_path / f"ddp{rank}.pt")
        assert ours.keys() == theirs.keys()
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-5, msg=k)


def test_sync_residual_checked_before_the_update():
    """A residual of the wrong size or device raises before the all-gather and the running update
    (no process group needed to reach the check), as the non-synced op raises before its own."""
    import fusenorm

    x, rm, rv = torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3)
    for bad in (torch.randn(4, 3, 6), torch.randn(4, 3, 5, device="meta")):
        with pytest.raises(RuntimeError, match="residual of size"):
            fusenorm.sync_batch_norm(x, rm, rv, None, None, 0.1, 1e-5, residual=bad, activation="relu")
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
