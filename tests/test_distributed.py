"""Section 6: data-parallel ranks average their losses, so they take the same steps.

Two CPU processes (gloo) train a DDP model on different mini-batches; with mean-reduced losses
and equal batch sizes that is the same optimization as one process on the mean of both losses.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alsals_fused import ALSALS

STEPS = 6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).double()


def _batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 5, generator=gen, dtype=torch.float64),
             torch.randn(8, 2, generator=gen, dtype=torch.float64)) for _ in range(2)]


def _rank_main(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        opt = ALSALS(model.parameters(), process_group=dist.group.WORLD, init_step_size=1.0)
        x, y = _batches()[rank]
        for _ in range(STEPS):
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        torch.save({"params": [p.detach() for p in model.parameters()], "eta": opt.eta,
                    "trials": opt.counters["trials"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_ranks_agree_and_match_the_single_process_mean_loss(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["eta"] == r1["eta"] and r0["trials"] == r1["trials"]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)

    model = _model()
    opt = ALSALS(model.parameters(), init_step_size=1.0)
    (x0, y0), (x1, y1) = _batches()
    for _ in range(STEPS):
        opt.zero_grad()
        opt.step(lambda: (torch.nn.functional.mse_loss(model(x0), y0)
                          + torch.nn.functional.mse_loss(model(x1), y1)) / 2)
    assert opt.counters["trials"] == r0["trials"] and opt.eta == pytest.approx(r0["eta"], rel=1e-12)
    for a, b in zip(model.parameters(), r0["params"]):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)


def test_sharded_needs_a_group():
    with pytest.raises(ValueError, match="sharded=True needs process_group"):
        ALSALS([torch.nn.Parameter(torch.zeros(2))], sharded=True)
