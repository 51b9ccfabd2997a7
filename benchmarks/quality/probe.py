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

``--mode next``: along the same Adam run, every ``--every`` steps, the step just taken (w -> w')
is scanned on the NEXT mini-batch (independent of that step; the next gradient forward's random
numbers and buffers restored per trial) at w + s*(w' - w) on a log grid of s.  It reports the
next-batch line minimizer s* (in units of Adam's step, so lr*s* is the next-batch optimal step
size along it) and the 3-point quadratic estimate s*_quad from the next batch's loss at w and at
w' and its gradient at w' dotted with (w' - w): the numbers a rule that spends one extra forward
(at w) has.
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


def _adam_run(wl_name: str, lr: float, seed: int, steps: int):
    """A workload's data, model (in training mode), float buffers, Adam at ``lr`` and batch
    indices, seeded as the harness seeds a run."""
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
    return wl, data, model, params, buffers, opt, batches


def run(wl_name: str, lr: float, every: int, seed: int, steps: int) -> list:
    wl, data, model, params, buffers, opt, batches = _adam_run(wl_name, lr, seed, steps)
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


S_GRID = [2.0 ** (k / 2) for k in range(-10, 11)]      # 1/32 .. 32, in units of Adam's step


def quad_min(L0: float, L1: float, G1: float) -> float:
    """Minimizer in s of the quadratic through f(0) = L0, f(1) = L1, f'(1) = G1; inf when it is
    not convex (no minimum), nan when an input is not finite."""
    a = G1 - (L1 - L0)                 # f = a s^2 + b s + L0
    b = (L1 - L0) - a
    if not all(math.isfinite(v) for v in (L0, L1, G1)):
        return math.nan
    return -b / (2 * a) if a > 0 else math.inf


def _line_min(scan: list) -> tuple:
    """(s*, at the grid's edge) from the losses at s = 0 and the S_GRID points."""
    L0 = scan[0]
    finite = [(L, k) for k, L in enumerate(scan[1:]) if math.isfinite(L)]
    if not finite or not math.isfinite(L0):
        return math.nan, False
    k = min(finite)[1]
    s_star = S_GRID[k] if scan[k + 1] < L0 else 0.0     # 0: the step went uphill on this batch
    if 0 < k < len(S_GRID) - 1 and s_star > 0:          # parabola in log s through the minimum and its neighbours
        ym, y0, yp = scan[k], scan[k + 1], scan[k + 2]
        den = ym - 2 * y0 + yp
        if den > 0:
            s_star *= 2.0 ** (0.5 * 0.5 * (ym - yp) / den)
    return s_star, k in (0, len(S_GRID) - 1)


def run_next(wl_name: str, lr: float, every: int, seed: int, steps: int, horizons=(1,)) -> list:
    """Adam at ``lr``; every ``every`` steps, the displacement over the last K steps (K in
    ``horizons``; K = 1: the step just taken) scanned on the next mini-batch."""
    wl, data, model, params, buffers, opt, batches = _adam_run(wl_name, lr, seed, steps)
    rows, history = [], []                 # history[-K]: the parameters K steps back
    for i in range(steps):
        x, y = data.get(batches[i])

        def closure(x=x, y=y):
            return wl.loss_fn(model(x), y)
        rng = torch.get_rng_state()
        now = [p.detach().clone() for p in params]
        probing = [K for K in horizons if len(history) >= K and (i - 1) % every == 0]
        scans = {}
        if probing:                        # scan on this (the next) batch
            saved = [b.clone() for b in buffers]
            with torch.no_grad():
                for K in probing:
                    scans[K] = []
                    for s in [0.0] + S_GRID:
                        for p, w, w1 in zip(params, history[-K], now):
                            p.copy_(w + s * (w1 - w))
                        torch.set_rng_state(rng)
                        scans[K].append(float(closure()))
                        for b, v in zip(buffers, saved):
                            b.copy_(v)
                for p, w1 in zip(params, now):
                    p.copy_(w1)
            torch.set_rng_state(rng)
        opt.zero_grad(set_to_none=True)
        loss = closure()
        loss.backward()
        if scans:
            L1 = float(loss.detach())
            row = dict(step=i, lr=lr, loss=L1)
            for K, scan in scans.items():
                L0 = scan[0]
                G1 = float(sum((p.grad * (w1 - w)).sum() for p, w, w1 in zip(params, history[-K], now)))
                s_star, edge = _line_min(scan)
                row[f"K{K}"] = dict(L0=L0, G1=G1, s_star=s_star, s_edge=edge, s_quad=quad_min(L0, L1, G1),
                                    curve=[L - L0 for L in scan[1:]])
            rows.append(row)
        history = (history + [now])[-max(horizons):]
        opt.step()
    return rows


def _q(xs: list, f: float) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    pos = f * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] if xs[hi] == xs[lo] else xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def controller_point(xs: list, lo: float = 0.25, hi: float = 4.0) -> float:
    """The geometric mean of s*_quad clipped to [lo, hi] (uphill and non-convex fits at the clips):
    where a rule eta *= clip(kappa * s*_quad) ** gain settles when kappa = 1 / this."""
    xs = [min(hi, max(lo, x)) for x in xs if not math.isnan(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def summarize_next(name: str, rows: list, K: int = 1) -> str:
    """median [IQR] of s* and s*_quad over the whole run and its early / late halves (non-convex
    quadratic fits count as +inf, so they move the quartiles, not the sample size), the expected
    next-batch loss's minimizer (the probes' curves averaged), and the controller's point."""
    rows = [dict(r[f"K{K}"], step=r["step"], lr=r["lr"], loss=r["loss"]) for r in rows if f"K{K}" in r]
    half = rows[len(rows) // 2]["step"] if rows else 0
    parts = []
    for label, sel in (("all", rows), ("early", [r for r in rows if r["step"] < half]),
                       ("late", [r for r in rows if r["step"] >= half])):
        for key in ("s_star", "s_quad"):
            xs = [r[key] for r in sel if not math.isnan(r[key])]
            parts.append(f"{label} {key} {_q(xs, 0.5):.3g} [{_q(xs, 0.25):.3g}, {_q(xs, 0.75):.3g}]")
        mean = [sum(r["curve"][j] for r in sel) / max(1, len(sel)) for j in range(len(S_GRID))]
        k = min(range(len(S_GRID)), key=lambda j: mean[j])
        dl = sum(r["loss"] - r["L0"] for r in sel) / max(1, len(sel))
        g1 = sum(r["G1"] for r in sel) / max(1, len(sel))
        parts.append(f"{label} pooled s_star {S_GRID[k] if mean[k] < 0 else 0.0:.3g} "
                     f"s_quad {quad_min(0.0, dl, g1):.3g} ctl {controller_point([r['s_quad'] for r in sel]):.3g}")
    nonconvex = sum(1 for r in rows if math.isinf(r["s_quad"]))
    edge = sum(1 for r in rows if r["s_edge"])
    return (f"{name} lr {rows[0]['lr'] if rows else 0:g} K {K}: {len(rows)} probes, {nonconvex} non-convex fits, "
            f"{edge} minima at the grid's edge; " + "; ".join(parts))


def _ratio(row: dict, key: str) -> str:
    return f"{row['lr'] / row[key]:8.3f}" if row[key] else "     inf"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", required=True, help="name=lr,... (lr: the Adam learning rate to follow)")
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="write every probe here")
    p.add_argument("--mode", choices=("edge", "next"), default="edge",
                   help="edge: the current batch's Armijo edges; next: the next batch's line minimum along the step")
    p.add_argument("--horizons", default="1", help="next mode: the displacements scanned, in steps (1: the last step)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    allrows = {}
    for item in args.workloads.split(","):
        name, lr = item.split("=")
        wl = WORKLOADS[name]
        if args.mode == "next":
            horizons = tuple(int(k) for k in args.horizons.split(","))
            rows = run_next(name, float(lr), args.every, args.seed, wl.quick_steps if args.quick else wl.steps,
                            horizons)
            allrows[f"{name}={lr}"] = rows
            for K in horizons:
                print(summarize_next(name, rows, K), flush=True)
            continue
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
