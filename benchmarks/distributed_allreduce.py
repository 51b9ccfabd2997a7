"""The cost of ALSALS's cross-rank reductions, and their share of a step.

    python benchmarks/distributed_allreduce.py [--ranks 2] [--steps 12] [--hidden 256]

Spawns ``--ranks`` CPU processes with gloo (or uses NCCL with one GPU per rank when
``--nccl`` and GPUs are there) and trains a small MLP under DDP and under FSDP2 with
``line_search_every=1`` (every step searches).  ``torch.distributed.all_reduce`` is wrapped with a
timer for the duration of ``opt.step``: the calls counted are the optimizer's own (L0 and each
trial loss averaged over the data-parallel group; under FSDP2 also the gradient sum of squares
and the two slope sums added over the shard group); DDP's gradient buckets and FSDP2's
all-gather/reduce-scatter go through other entry points and are not counted.  Printed per mode:
step time (median), ALSALS all-reduces per step, trials per step, the median time of one
all-reduce (the per-trial cost: one float64 scalar), and the all-reduces' share of the step.
"""
import argparse
import datetime
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alsals_fused import ALSALS


def _model(hidden, device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, 8)).to(device)


def _wrap(model, mode, device):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


class _Timed:
    """Times every torch.distributed.all_reduce call made while active."""

    def __init__(self, device):
        self.device, self.active, self.times = device, False, []
        self._orig = dist.all_reduce

        def timed(tensor, *a, **kw):
            if not self.active:
                return self._orig(tensor, *a, **kw)
            t0 = time.perf_counter()
            out = self._orig(tensor, *a, **kw)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times.append(time.perf_counter() - t0)
            return out
        dist.all_reduce = timed


def _rank(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    nccl = args.nccl and torch.cuda.is_available()
    dist.init_process_group("nccl" if nccl else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    timer = _Timed(device)
    rows = []
    for mode in ("ddp", "fsdp2"):
        model = _wrap(_model(args.hidden, device), mode, device)
        opt = ALSALS(model.parameters(), process_group=dist.group.WORLD, line_search_every=1)
        step_s, calls, comm_s, trials, each = [], [], [], [], []
        for k in range(args.steps):
            gen = torch.Generator().manual_seed(1000 * k + rank)
            x = torch.randn(64, 64, generator=gen).to(device)
            y = torch.randn(64, 8, generator=gen).to(device)
            opt.zero_grad()
            dist.barrier()
            timer.times, timer.active = [], True
            t0 = time.perf_counter()
            opt.step(lambda model=model, x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s.append(time.perf_counter() - t0)
            timer.active = False
            if k >= 2:                                      # warm-up
                calls.append(len(timer.times))
                comm_s.append(sum(timer.times))
                trials.append(opt.last_step.trials)
                each.extend(timer.times)
        one = statistics.median(each) if each else float("nan")
        rows.append({"mode": mode, "step_ms": 1e3 * statistics.median(step_s[2:]),
                     "calls": statistics.mean(calls), "trials": statistics.mean(trials),
                     "allreduce_us": 1e6 * one,
                     "share": statistics.median(c / s for c, s in zip(comm_s, step_s[2:]))})
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--nccl", action="store_true", help="NCCL, one GPU per rank (if available)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "rows.pt")
    ctx = mp.spawn(_rank, args=(args.ranks, port, args, out), nprocs=args.ranks, join=False)
    deadline = time.monotonic() + 600
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise SystemExit("timed out")
    rows = torch.load(out)
    backend = "nccl" if args.nccl and torch.cuda.is_available() else "gloo (CPU)"
    params = sum(p.numel() for p in _model(args.hidden, "cpu").parameters())
    print(f"{backend}, {args.ranks} ranks, MLP {params / 1e3:.0f}K params, every step searches")
    print("| mode | step ms | ALSALS all-reduces/step | trials/step | one all-reduce us | share of step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['step_ms']:.2f} | {r['calls']:.1f} | {r['trials']:.1f} | "
              f"{r['allreduce_us']:.0f} | {100 * r['share']:.1f}% |")


if __name__ == "__main__":
    main()
