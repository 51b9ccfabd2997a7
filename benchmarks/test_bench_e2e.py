"""End-to-end training: a GPT-2-shaped model trained N steps with torch Adam and with ALSALS.

GPU: GPT-2 small (124M), bf16 autocast, 8 x 1024 tokens per step, torch fused Adam.
CPU: a tiny fp32 GPT, torch foreach Adam.  ALSALS runs with line_search_every=1 and "auto", on
the "auto" backend.  Data: a seeded synthetic Markov chain (each token has 4 possible successors),
so the loss falls and the line search sees a real descent problem, not noise.

Warmup steps (untimed) cover Triton/cuBLAS warmup and ALSALS's first searches: "auto" searches at
every step while t <= 10.  The row's time is the timed steps only; extra_info has tokens/s,
forwards per step (1 + trial forwards / step), peak device memory during the timed steps (CUDA)
and optimizer-state bytes per parameter.  Learning rates are not tuned: throughput is the point.
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

import _benchlib as lib
from alsals_fused import ALSALS

CFG, BATCH, SEQ, WARMUP, STEPS = lib.E2E[lib.SIZE]
STEPS = int(os.environ.get("ALSALS_BENCH_E2E_STEPS") or STEPS)
ADAM_NAME = "adam-fused" if lib.IS_CUDA else "adam-foreach"
RUNS = (ADAM_NAME, "alsals-every1", "alsals-auto")


def _markov_batches(n: int, seed: int = 0):
    """n (inputs, targets) batches of a random 4-successor Markov chain over the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(CFG.vocab, (CFG.vocab, 4), generator=gen)
    choice = torch.randint(4, (n * BATCH, SEQ), generator=gen)
    seq = torch.empty(n * BATCH, SEQ + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(CFG.vocab, (n * BATCH,), generator=gen)
    for t in range(SEQ):
        seq[:, t + 1] = successors[seq[:, t], choice[:, t]]
    seq = seq.to(lib.DEVICE).view(n, BATCH, SEQ + 1)
    return [(s[:, :-1], s[:, 1:]) for s in seq]


def _loss_fn(model):
    def loss(x, y):
        if lib.IS_CUDA:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x, y)
        return model(x, y)
    return loss


class _Trainer:
    def __init__(self, run: str):
        torch.manual_seed(0)
        self.model = lib.GPT(CFG).to(lib.DEVICE)
        self.loss = _loss_fn(self.model)
        self.run = run
        if run.startswith("adam"):
            kw = {"fused": True} if run == "adam-fused" else {"foreach": True}
            self.opt = torch.optim.Adam(self.model.parameters(), lr=6e-4, **kw)
        else:
            every = "auto" if run == "alsals-auto" else 1
            self.opt = ALSALS(self.model.parameters(), line_search_every=every, init_step_size=1e-3)

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        if isinstance(self.opt, ALSALS):
            return self.opt.step(lambda: self.loss(x, y))
        loss = self.loss(x, y)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def trials(self) -> int:
        return self.opt.counters["trials"] if isinstance(self.opt, ALSALS) else 0


@pytest.mark.e2e
@pytest.mark.parametrize("run", [pytest.param(r, marks=[pytest.mark.smoke] if r != "alsals-every1" else [],
                                              id=r) for r in RUNS])
def test_e2e(bench, run):
    label = f"gpt2-{lib.human(sum(math.prod(s) for s in lib.gpt_shapes(CFG)))}"
    bench.group = f"e2e {label}"
    batches = _markov_batches(WARMUP + STEPS)
    box = {}

    def setup():
        trainer = _Trainer(run)
        for x, y in batches[:WARMUP]:
            trainer.step(x, y)
        lib.sync()
        if lib.IS_CUDA:
            torch.cuda.reset_peak_memory_stats()
        box["trainer"], box["trials0"] = trainer, trainer.trials()
        return (trainer,), {}

    def train(trainer):
        start = time.perf_counter()
        for x, y in batches[WARMUP:]:
            loss = trainer.step(x, y)
        lib.sync()
        box["seconds"], box["loss"] = time.perf_counter() - start, float(loss)

    try:
        bench.pedantic(train, setup=setup, rounds=1, warmup_rounds=0, iterations=1)
        trainer = box["trainer"]
        numel = sum(p.numel() for p in trainer.model.parameters())
        tokens = BATCH * SEQ * STEPS
        bench.extra_info.update({
            "row": run, "set": label, "family": "e2e", "kind": "e2e", "params": numel,
            "steps": STEPS, "warmup_steps": WARMUP, "tokens_per_step": BATCH * SEQ,
            "tokens_per_s": round(tokens / box["seconds"], 1),
            "forwards_per_step": round(1 + (trainer.trials() - box["trials0"]) / STEPS, 3),
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if lib.IS_CUDA else None,
            "state_bytes_per_param": lib.state_bytes_per_param(trainer.opt, numel),
            "final_loss": round(box["loss"], 4),
            "autocast": "bf16" if lib.IS_CUDA else "fp32",
        })
        if isinstance(trainer.opt, ALSALS):
            resolved = getattr(trainer.opt, "_resolved", {}).values()
            bench.extra_info.update({"eta": trainer.opt.eta, "counters": dict(trainer.opt.counters),
                                     "backend": sorted({b.name for b in resolved})})
    finally:
        box.clear()
        lib.free_memory()
