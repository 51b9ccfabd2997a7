"""Writes ckpt_v1.pt with the format-1 code (the first release: commit 91b3c28 of main).

Run from a checkout of that commit: PYTHONPATH=<checkout>:<checkout>/tests python make_v1_checkpoint.py
It trains OddModel 6 steps (foreach, salsa: the "auto" schedule state is non-trivial), saves
model, optimizer and RNG, trains 6 more and saves the parameters and host state it reached, so a
newer version can check that it resumes a format-1 checkpoint bit-identically.
"""
import os

import torch

from alsals_fused import ALSALS
from helpers import OddModel, make_data

data = [make_data(seed=s) for s in range(3)]


def train(model, opt, start, steps):
    for k in range(start, start + steps):
        x, y = data[k % 3]
        opt.zero_grad()
        opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))


torch.manual_seed(0)
model = OddModel()
opt = ALSALS(model.groups(), variant="salsa", backend="foreach", init_step_size=1.0)
train(model, opt, 0, 6)
saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
         "opt": opt.state_dict(), "rng": torch.get_rng_state()}
train(model, opt, 6, 6)
saved["after"] = {"params": [p.detach().clone() for p in model.parameters()], "eta": opt.eta,
                  "t": opt.t, "counters": dict(opt.counters)}
torch.save(saved, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ckpt_v1.pt"))
