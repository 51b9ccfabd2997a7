"""Where is the Armijo edge, relative to the best Adam learning rate, along a run of that Adam?

    python -m benchmarks.quality.probe --workloads gru_markov,cnn_bn --every 25

A diagnostic for choosing line-search rules, not a benchmark: it trains Adam at each workload's
given learning rate and, every ``--every`` steps, scans the current mini-batch's loss along the two
directions the line searches use (ADAM's momentum direction m_hat*p and the gradient direction
g*p, both with this step's moments), on a log grid of step sizes, with the gradient forward's
random numbers and BatchNorm buffers restored for every trial.  Per probe it reports the Armijo
edge (the largest grid step size, scanning down from the top, whose decrease is at least
c*eta*slope, c = 0.5 and 0.3) and the grid minimum of the loss.  If the best Adam learning rate
is a steady fraction of one of these across model families and along the run, a line search can
find it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from .workloads import WORKLOADS

GRID = [2.0 ** (k / 2) for k in range(-34, 3)]          # 3e-6 .. 2


def _direction(opt: torch.optim.Adam, p: torch.Tensor, momentum: bool) -> torch.Tensor:
    """This step's m_hat*p or g*p, as Adam is about to take it (moments updated with p.grad)."""
    (b1, b2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    st = opt.state.get(p, {})
    t = int(st["step"]) + 1 if st else 1
    g = p.grad
    m = st["exp_avg"] * b1 + (1 - b1) * g if st else (1 - b1) * g
    v = st["exp_avg_sq"] * b2 + (1 - b2) * g * g if st else (1 - b2) * g * g
    precond = 1 / ((v / (1 - b2 ** t)).sqrt() + eps)
    return (m / (1 - b1 ** t)) * precond if momentum else g * precond


def probe_once(model, params, opt, closure, loss0: float, rng, buffers) -> dict:
    out = {}
    w0 = [p.detach().clone() for p in params]
    saved = [b.clone() for b in buffers]
    for name, momentum in (("mom", True), ("grad", False)):
        ds = [_direction(opt, p, momentum) for p in params]
        slope = float(sum((p.grad * d).sum() for p, d in zip(params, ds)))
        losses = []
        with torch.no_grad():
            for eta in GRID:
                for p, w, d in zip(params, w0, ds):
                    p.copy_(w - eta * d)
                torch.set_rng_state(rng)
                losses.append(float(closure()))
                for b, s in zip(buffers, saved):
                    b.copy_(s)
            for p, w in zip(params, w0):
                p.copy_(w)
        for c in (0.5, 0.3):
            edge = next((eta for eta, L in zip(reversed(GRID), reversed(losses))
                         if math.isfinite(L) and loss0 - L >= c * eta * slope), None)
            out[f"{name}_edge_c{c}"] = edge
        finite = [(L, eta) for eta, L in zip(GRID, losses) if math.isfinite(L)]
        out[f"{name}_min"] = min(finite)[1] if finite else None
        out[f"{name}_slope"] = slope
    return out


def run(wl_name: str, lr: float, every: int, seed: int, steps: int) -> list:
    wl = WORKLOADS[wl_name]
    data = wl.make_data(seed)
    torch.manual_seed(seed)
    model = wl.make_model()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [b for b in model.buffers() if b.dtype.is_floating_point]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(10_000 + seed)
    batches = torch.randint(0, data.n_train, (steps, wl.batch_size), generator=gen)
    torch.manual_seed(20_000 + seed)
    rows = []
    for i in range(steps):
        x, y = data.get(batches[i])

        def closure(x=x, y=y):
            return wl.loss_fn(model(x), y)
        rng = torch.get_rng_state()
        saved = [b.clone() for b in buffers]
        opt.zero_grad(set_to_none=True)
        loss = closure()
        loss.backward()
        if i % every == 0:
            after = [b.clone() for b in buffers]
            for b, s in zip(buffers, saved):
                b.copy_(s)
            r = probe_once(model, params, opt, closure, float(loss.detach()), rng, buffers)
            for b, a in zip(buffers, after):
                b.copy_(a)
            torch.set_rng_state(rng)
            torch.rand(0)                    # the stream continues as the gradient forward left it
            r.update(step=i + 1, loss=float(loss.detach()), lr=lr)
            rows.append(r)
        opt.step()
    return rows


def _ratio(row: dict, key: str) -> str:
    return f"{row['lr'] / row[key]:8.3f}" if row[key] else "     inf"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", required=True, help="name=lr,... (lr: the Adam learning rate to follow)")
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="write every probe here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    allrows = {}
    for item in args.workloads.split(","):
        name, lr = item.split("=")
        wl = WORKLOADS[name]
        rows = run(name, float(lr), args.every, args.seed, wl.quick_steps if args.quick else wl.steps)
        allrows[name] = rows
        print(f"{name} (Adam lr {float(lr):g}): step, loss, lr / edge along m_hat*p (c .5, .3), lr / its grid "
              "minimum, lr / edge along g*p (c .5, .3), lr / its grid minimum")
        for r in rows:
            print(f"  {r['step']:5d} {r['loss']:9.4g} " + " ".join(_ratio(r, k) for k in (
                "mom_edge_c0.5", "mom_edge_c0.3", "mom_min", "grad_edge_c0.5", "grad_edge_c0.3", "grad_min")),
                flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(allrows, f)


if __name__ == "__main__":
    sys.exit(main())
