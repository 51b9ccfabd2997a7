"""The quality harness: every variant against Adam's grid, AdamW+cosine, the learning-rate-free
optimizers users compare with (Prodigy, schedule-free AdamW, D-Adapt Adam) and the SaLSA package.

    python -m benchmarks.quality               # full: 11 workloads x 3 seeds (hours on 2 cores)
    python -m benchmarks.quality --quick       # 1 seed, shorter budgets
    python -m benchmarks.quality --workloads cnn_bn,regression --methods adam@0.001,adaptive/auto
    python -m benchmarks.quality --gpu         # GPT-2-small-shaped model on CUDA (one call, < 3 min)

Offline: the data are generated from seeds or read from this machine's Python standard-library
sources.  One CPU thread per run (``torch.set_num_threads(1)``).  Within a workload and seed,
every method starts from the same initialization and sees the same mini-batches and dropout
stream.  Reported per method (mean over seeds): final training loss = mean of the last 10% of
the mini-batch losses (each measured at the weights before the step, as every method reports
it), the same at an equal number of forward passes (the loss when the method has spent the
forwards Adam spends in its whole run), held-out loss and accuracy (R^2 for regression), forward
passes per step (the gradient forward plus trial forwards), wall time per run, first-step trial
forwards, rejected steps, the longest run of consecutive rejections and eta collapses.  The
workloads are split: ``tune`` ones choose rules, ``confirm`` ones only check them.  Writes
``results.md`` (targets, verdict tables, one table per workload), ``results.json`` (everything,
with per-step loss, eta and forwards) and ``<workload>.png`` into ``--out`` (by default a
gitignored folder: the committed record in ``results/`` is rewritten only when named).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch

from .methods import ADAM_GRID, ADAMW_COSINE, PEERS, all_methods, peer_status, salsa_package_status
from .workloads import WORKLOADS, Workload

HERE = os.path.dirname(os.path.abspath(__file__))
# Runs write into a gitignored folder; the committed record (results/) is rewritten only when asked
# for by name (--out benchmarks/quality/results).
DEFAULT_OUT = os.path.join(HERE, "out")


def _evaluate(model, wl: Workload, data) -> Dict[str, float]:
    was = model.training
    model.eval()
    total = n = 0.0
    correct = 0.0
    sse = sst = 0.0
    with torch.no_grad():
        for x, y in data.tests():
            out = model(x)
            total += float(wl.loss_fn(out, y)) * len(y)
            n += len(y)
            if wl.metric == "accuracy":
                correct += float((out.argmax(-1) == y).float().sum()) / (y[0].numel() if y.dim() > 1 else 1)
            else:
                sse += float(((out - y) ** 2).sum())
                sst += float(((y - y.mean()) ** 2).sum())
    model.train(was)
    metric = correct / n if wl.metric == "accuracy" else 1 - sse / max(sst, 1e-30)
    return {"heldout_loss": total / n, "heldout_metric": metric}


def run_one(wl: Workload, method, seed: int, steps: int, data) -> dict:
    torch.manual_seed(seed)
    model = wl.make_model()
    model.train()
    adapter = method.make(model, steps, seed, wl)
    gen = torch.Generator().manual_seed(10_000 + seed)
    batches = torch.randint(0, data.n_train, (steps, wl.batch_size), generator=gen)
    torch.manual_seed(20_000 + seed)          # dropout stream: the same for every method
    losses: List[float] = []
    etas: List[float] = []
    fwds: List[int] = []
    forwards = 0
    diverged = False
    t0 = time.perf_counter()
    for i in range(steps):
        x, y = data.get(batches[i])

        def closure(x=x, y=y):
            return wl.loss_fn(model(x), y)
        try:
            loss, eta, fwd = adapter.step(closure)
        except (ValueError, RuntimeError) as e:   # e.g. the SaLSA package raises on NaN
            diverged = True
            losses.append(math.nan)
            etas.append(math.nan)
            print(f"    {method.name} seed {seed}: stopped at step {i + 1}: {e}", file=sys.stderr)
            break
        losses.append(loss)
        etas.append(eta)
        fwds.append(fwd)
        forwards += fwd
    wall = time.perf_counter() - t0
    tail = losses[-max(1, steps // 10):]
    final = sum(tail) / len(tail) if not diverged else math.nan
    final_eqf = _final_at_forwards(losses, fwds, steps) if not diverged else math.nan
    row = dict(workload=wl.name, method=method.name, family=method.family, seed=seed, steps=steps,
               final_train_loss=final if math.isfinite(final) else math.nan,
               final_train_loss_eqf=final_eqf if math.isfinite(final_eqf) else math.nan,
               forwards_per_step=forwards / max(1, len(losses)), wall_s=wall,
               final_eta=etas[-1] if etas else math.nan, diverged=diverged or not math.isfinite(final))
    if not row["diverged"]:
        adapter.before_eval(model, [data.get(batches[i]) for i in range(min(steps, 20))])
    row.update(_evaluate(model, wl, data) if not row["diverged"] else
               {"heldout_loss": math.nan, "heldout_metric": math.nan})
    row.update(adapter.summary())
    row["eta_collapse"] = _eta_collapse(etas)
    row["losses"] = losses
    row["etas"] = etas
    row["fwds"] = fwds
    return row


def _final_at_forwards(losses: List[float], fwds: List[int], budget: int) -> float:
    """The final loss at an equal number of forward passes: the mean mini-batch loss over the steps
    whose forwards fall in the last 10% of a budget of ``budget`` forwards (the Adam runs' count).
    A method with trial forwards reaches the budget after fewer steps; NaN if it never ends a
    step inside the window (it stopped early)."""
    window, spent, tail = budget - max(1, budget // 10), 0, []
    for loss, f in zip(losses, fwds):
        spent += f
        if spent > budget:
            break
        if spent > window:
            tail.append(loss)
    return sum(tail) / len(tail) if tail else math.nan


def _eta_collapse(etas: List[float]) -> bool:
    """A step size below 1e-6, or a fall of more than 1000x below its running maximum."""
    peak = 0.0
    for e in etas:
        if not math.isfinite(e) or e <= 0:
            continue
        peak = max(peak, e)
        if e < 1e-6 or e < peak / 1000:
            return True
    return False


def _mean(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return sum(xs) / len(xs)


def _relative_se(xs) -> Optional[float]:
    """Standard error of the mean over seeds, relative to the mean (None below two finite values).
    For the best Adam point it shows how much a workload's difficulty varies between seeds: a
    mean ratio on a workload where one seed dominates (regression: ±51% at 3 quick seeds) says
    mostly how a method does on that seed."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if len(xs) < 2:
        return None
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return sd / math.sqrt(len(xs)) / mean if mean > 0 else None


def aggregate(rows: List[dict]) -> Dict[str, Dict[str, dict]]:
    """{workload: {method: mean-over-seeds summary}} plus the ratios of the verdict table."""
    out: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["workload"], {}).setdefault(r["method"], []).append(r)
    agg: Dict[str, Dict[str, dict]] = {}
    for wl, methods in out.items():
        agg[wl] = {}
        for m, rs in methods.items():
            a = {k: _mean([r.get(k) for r in rs]) for k in
                 ("final_train_loss", "final_train_loss_eqf", "heldout_loss", "heldout_metric",
                  "forwards_per_step", "wall_s", "final_eta")}
            a["final_train_loss_rse"] = _relative_se([r.get("final_train_loss") for r in rs])
            a["eta_collapse"] = sum(bool(r.get("eta_collapse")) for r in rs)
            a["seeds"] = len(rs)
            a["steps"] = rs[0]["steps"]
            a["diverged"] = sum(bool(r["diverged"]) for r in rs)
            for k in ("first_step_trials", "rejected", "max_consecutive_rejected"):
                if k in rs[0]:
                    vals = [r.get(k) for r in rs if r.get(k) is not None]
                    a[k] = max(vals) if vals else None
            a["family"] = rs[0]["family"]
            agg[wl][m] = a
        adam = {m: a for m, a in agg[wl].items() if a["family"] == "adam"
                and a["final_train_loss"] is not None and math.isfinite(a["final_train_loss"])}
        best = min(adam, key=lambda m: adam[m]["final_train_loss"]) if adam else None
        peers = {m: a for m, a in agg[wl].items() if a["family"] in PEERS
                 and a["final_train_loss"] is not None and math.isfinite(a["final_train_loss"])}
        best_peer = min(peers, key=lambda m: peers[m]["final_train_loss"]) if peers else None
        ref = agg[wl].get("adam@0.001")
        for a in agg[wl].values():
            f, fe = a["final_train_loss"], a["final_train_loss_eqf"]
            a["vs_adam_1e-3"] = f / ref["final_train_loss"] if ref and f is not None else None
            a["vs_best_adam"] = f / adam[best]["final_train_loss"] if best and f is not None else None
            a["vs_best_peer"] = f / peers[best_peer]["final_train_loss"] if best_peer and f is not None else None
            # At an equal number of forwards: the reference methods all take one forward per step.
            a["eqf_vs_adam_1e-3"] = fe / ref["final_train_loss"] if ref and fe is not None else None
            a["eqf_vs_best_adam"] = fe / adam[best]["final_train_loss"] if best and fe is not None else None
            a["eqf_vs_best_peer"] = (fe / peers[best_peer]["final_train_loss"]
                                     if best_peer and fe is not None else None)
        agg[wl]["_best_adam"] = {"method": best}
        agg[wl]["_best_peer"] = {"method": best_peer}
    return agg


def _best_adam_rse(workload_agg) -> str:
    best = workload_agg["_best_adam"]["method"]
    rse = workload_agg[best].get("final_train_loss_rse") if best else None
    return f" (±{rse:.0%})" if rse is not None else ""


def _fmt(x, spec=".4g"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec)


TARGET_VS_BEST_ADAM = 1.10
TARGET_FORWARDS = 1.3
TARGET_FIRST_STEP = 6
TARGET_REJECTED = 0.01


def targets(agg, wls, method) -> Optional[dict]:
    """The quality targets of one method over the workloads it ran on (None if it ran on none)."""
    rows = [(wl, agg[wl][method]) for wl in wls if method in agg[wl]]
    if not rows:
        return None
    ratios = [a["vs_best_adam"] for _, a in rows]
    peer = [a["vs_best_peer"] for _, a in rows if a["vs_best_peer"] is not None]
    first = [a.get("first_step_trials") for _, a in rows]
    rej = [(a.get("rejected") or 0) / max(1, a.get("steps") or 1) for _, a in rows]
    return dict(
        worst_vs_best_adam=max((r for r in ratios if r is not None), default=None),
        within=sum(r is not None and r <= TARGET_VS_BEST_ADAM for r in ratios),
        below_peer=sum(r < 1 for r in peer), peer_n=len(peer), n=len(rows),
        forwards=_mean([a["forwards_per_step"] for _, a in rows]),
        first_step=max((1 + f for f in first if f is not None), default=None),
        collapses=sum(a.get("eta_collapse") or 0 for _, a in rows),
        rejected=max(rej, default=0.0))


def targets_markdown(agg, wls, methods) -> List[str]:
    out = ["## Targets (line searches and peers)", "",
           f"Within {TARGET_VS_BEST_ADAM}x of the best Adam point on every workload; below the best peer on "
           f"at least two thirds; at most {TARGET_FORWARDS} forwards per step (mean over workloads); first "
           f"step at most {TARGET_FIRST_STEP} forwards; no eta collapse (below 1e-6 or a 1000x fall); at most "
           f"{TARGET_REJECTED:.0%} of steps rejected. Split: `tune` workloads chose the rules, `confirm` "
           "workloads only check them. The `adam@lr` rows (split `all`) are Adam at one learning rate on "
           "every workload: what the first target asks of a method that is not tuned per workload.", "",
           "| method | split | worst x best Adam | within 1.10x | below best peer | fwd/step | 1st step fwd "
           "| collapses | max rejected |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        fam = next(agg[wl][m]["family"] for wl in wls if m in agg[wl])
        if fam == "adamw_cosine":
            continue
        for split in ("all",) if fam == "adam" else ("tune", "confirm", "all"):
            sel = [wl for wl in wls if split == "all" or WORKLOADS[wl].split == split]
            t = targets(agg, sel, m)
            if t is None:
                continue
            out.append("| " + " | ".join([
                m, split, _fmt(t["worst_vs_best_adam"], ".3f"), f"{t['within']}/{t['n']}",
                f"{t['below_peer']}/{t['peer_n']}", _fmt(t["forwards"], ".2f"), _fmt(t["first_step"], "d"),
                str(t["collapses"]), f"{t['rejected']:.1%}"]) + " |")
    return out + [""]


def markdown(agg, meta) -> str:
    lines = [f"# Quality harness results ({meta['mode']})", "",
             f"Machine: {meta['platform']}, torch {meta['torch']}, 1 thread per run; "
             f"seeds {meta['seeds']}; generated {meta['date']} in {meta['total_s'] / 60:.1f} min.",
             "Final training loss = mean of the last 10% of mini-batch losses; means over seeds. "
             "`x best` = final loss / best Adam grid point's; `x 1e-3` = / Adam 1e-3's. "
             "fwd/step counts the gradient forward plus trial forwards. "
             "1st = trial forwards of the first step; rej = rejected steps (max over seeds); "
             "run = longest run of consecutive rejected steps.", ""]
    if meta.get("notes"):
        lines += [f"- {n}" for n in meta["notes"]] + [""]
    wls = list(agg)
    methods = [m for m in agg[wls[0]] if not m.startswith("_")]
    for wl in wls[1:]:
        methods += [m for m in agg[wl] if not m.startswith("_") and m not in methods]
    lines += targets_markdown(agg, wls, methods)
    head = "| method | " + " | ".join(f"{wl} ({WORKLOADS[wl].split})" for wl in wls) + " |"
    for title, keys in (("an equal number of steps", ("vs_adam_1e-3", "vs_best_adam", "vs_best_peer")),
                        ("an equal number of forward passes (the method's loss when it has spent "
                         "the forwards Adam spent in its whole run)",
                         ("eqf_vs_adam_1e-3", "eqf_vs_best_adam", "eqf_vs_best_peer"))):
        lines += [f"## Verdict at {title}", "",
                  "Final training loss relative to Adam 1e-3 / to the best Adam grid point / to the best "
                  "learning-rate-free peer, then forwards per step.", "", head,
                  "|---|" + "---|" * len(wls)]
        for m in methods:
            cells = []
            for wl in wls:
                a = agg[wl].get(m)
                cells.append("—" if a is None else " / ".join(_fmt(a[k], ".3f") for k in keys)
                             + f" · {_fmt(a['forwards_per_step'], '.2f')}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Best Adam grid point per workload (± the standard error of its mean over seeds, relative): "
              + ", ".join(f"{wl}: {agg[wl]['_best_adam']['method']}{_best_adam_rse(agg[wl])}" for wl in wls) + ".",
              "Best learning-rate-free peer per workload: " + ", ".join(
        f"{wl}: {agg[wl]['_best_peer']['method']}" for wl in wls) + ".", ""]
    for wl in wls:
        w = WORKLOADS[wl]
        metric = "held-out R^2" if w.metric == "r2" else "held-out acc"
        lines += [f"## {wl} ({w.kind})", "", w.description + ".", "",
                  f"| method | final train loss | x 1e-3 | x best | held-out loss | {metric} | fwd/step "
                  "| s/run | final eta/lr | 1st | rej | run |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, a in agg[wl].items():
            if m.startswith("_"):
                continue
            div = f" ({a['diverged']} diverged)" if a["diverged"] else ""
            lines.append("| " + " | ".join([
                m + div, _fmt(a["final_train_loss"]), _fmt(a["vs_adam_1e-3"], ".3f"),
                _fmt(a["vs_best_adam"], ".3f"), _fmt(a["heldout_loss"]), _fmt(a["heldout_metric"], ".3f"),
                _fmt(a["forwards_per_step"], ".2f"), _fmt(a["wall_s"], ".1f"), _fmt(a["final_eta"], ".2e"),
                _fmt(a.get("first_step_trials"), "d"), _fmt(a.get("rejected"), "d"),
                _fmt(a.get("max_consecutive_rejected"), "d")]) + " |")
        lines.append("")
    return "\n".join(lines)


PLOTTED = ("adam@0.001", "adamw_cosine", "alsals/every", "adaptive/auto", "adaptive/every",
           "adam_sls/every", "salsa/auto", "salsa_pkg", "prodigy", "schedulefree", "dadapt_adam")
COLORS = {"adam@0.001": "tab:blue", "adamw_cosine": "tab:cyan", "alsals/every": "tab:red",
          "adaptive/auto": "black", "adaptive/every": "tab:gray", "adam_sls/every": "tab:green",
          "salsa/auto": "tab:orange", "salsa_pkg": "tab:purple", "best_adam": "tab:olive",
          "prodigy": "tab:brown", "schedulefree": "tab:pink", "dadapt_adam": "yellowgreen"}


def _ema(values, span):
    alpha, avg, out = 2 / (span + 1), 0.0, []
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def plot(wl: str, rows: List[dict], agg, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_fwd, ax_eta = fig.subplots(1, 3)
    best = agg[wl]["_best_adam"]["method"]
    names = [m for m in PLOTTED] + ([best] if best and best not in PLOTTED else [])
    names += [m for m in agg[wl] if m.startswith("cand:")]
    for m in names:
        rs = [r for r in rows if r["workload"] == wl and r["method"] == m and not r["diverged"]]
        if not rs:
            continue
        n = min(len(r["losses"]) for r in rs)
        loss = [sum(r["losses"][i] for r in rs) / len(rs) for i in range(n)]
        # Geometric mean over seeds; a zero lr (the end of the cosine schedule) is not drawn.
        eta = [math.exp(sum(math.log(r["etas"][i]) for r in rs) / len(rs))
               if all(r["etas"][i] > 0 for r in rs) else math.nan for i in range(n)]
        sm = _ema(loss, max(1, n // 25))
        color = COLORS.get(m, "tab:olive" if m == best else None)
        label = f"{m} (best Adam)" if m == best else m
        ax_loss.plot(range(1, n + 1), sm, color=color, label=label, linewidth=1.5)
        fwd_per_step = _mean([r["forwards_per_step"] for r in rs])
        ax_fwd.plot([fwd_per_step * (i + 1) for i in range(n)], sm, color=color, label=label, linewidth=1.5)
        ax_eta.plot(range(1, n + 1), eta, color=color, label=label, linewidth=1.3)
    for lr in ADAM_GRID:
        ax_eta.axhline(lr, color="gray", alpha=0.25, linewidth=0.8, linestyle=":")
    ax_loss.set(xlabel="step", ylabel="training loss (EMA, mean of seeds)", yscale="log",
                title="training loss per step")
    ax_fwd.set(xlabel="forward passes (gradient + trial forwards)", ylabel="training loss", yscale="log",
               title="training loss against cost")
    ax_eta.set_ylim(1e-5, 1.0)
    ax_eta.set(xlabel="step", ylabel="step size (eta; Adam: lr)", yscale="log",
               title="eta against Adam's lr (dotted: Adam grid)")
    for ax in (ax_loss, ax_fwd, ax_eta):
        ax.grid(True, which="both", alpha=0.3)
    ax_eta.legend(fontsize=7)
    fig.suptitle(f"{wl}: {WORKLOADS[wl].description}", fontsize=9)
    fig.savefig(path, dpi=100)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed and the shorter step budgets")
    p.add_argument("--seeds", type=int, default=None, help="seeds per workload (default 3; --quick 1)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ...")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="combine the runs of several results.json (e.g. one per seed) into --tag's tables")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step budget")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    p.add_argument("--methods", default=None, help="comma-separated subset of method names")
    p.add_argument("--candidates", default=None,
                   help="JSON file {name: {Hyper field: value, ...}}: extra rules to try (key 'variant': the "
                        "base variant, default adaptive; key 'rule': an experimental rule of rules.py)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="output directory (default benchmarks/quality/out, gitignored; the committed record "
                        "is benchmarks/quality/results)")
    p.add_argument("--tag", default=None, help="file name prefix for the outputs (default: none / 'quick')")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--gpu", action="store_true", help="GPU mode (see gpu.py)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw the PNGs of a results.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        prefix = os.path.basename(args.replot)[: -len("results.json")]
        for wl in saved["summary"]:
            plot(wl, saved["runs"], saved["summary"], os.path.join(os.path.dirname(args.replot), f"{prefix}{wl}.png"))
        return saved
    if args.merge:
        return _merge(args)
    if args.gpu:
        from .gpu import main as gpu_main
        return gpu_main(args)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _merge(args) -> dict:
    rows, metas = [], []
    for path in args.merge:
        with open(path) as f:
            saved = json.load(f)
        rows += saved["runs"]
        metas.append(saved["meta"])
    agg = aggregate(rows)
    meta = dict(metas[0])
    meta["seeds"] = sorted({r["seed"] for r in rows})
    meta["total_s"] = sum(m["total_s"] for m in metas)
    dates = sorted(m["date"] for m in metas)      # the runs', not the first file's alone
    meta["date"] = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    meta["mode"] = f"{metas[0]['mode']}, merged from {len(metas)} runs (total_s: their sum)"
    prefix = (args.tag + "-") if args.tag else ""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, prefix + "results.md"), "w") as f:
        f.write(markdown(agg, meta) + "\n")
    with open(os.path.join(args.out, prefix + "results.json"), "w") as f:
        json.dump(dict(meta=meta, summary=agg, runs=rows), f, allow_nan=True)
    if not args.no_plot:
        for wl in agg:
            plot(wl, rows, agg, os.path.join(args.out, f"{prefix}{wl}.png"))
    return dict(meta=meta, summary=agg, rows=rows)


def _run(args) -> dict:
    t_start = time.perf_counter()
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    cands = None
    if args.candidates:
        with open(args.candidates) as f:
            cands = json.load(f)
    methods = all_methods(cands)
    notes = []
    salsa_note = salsa_package_status()
    if salsa_note:
        print("note: " + salsa_note, file=sys.stderr)
        notes.append(salsa_note)
        methods = [m for m in methods if m.family != "salsa_pkg"]
    for family in PEERS:
        note = peer_status(family)
        if note:
            print("note: " + note, file=sys.stderr)
            notes.append(note)
            methods = [m for m in methods if m.family != family]
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = {m.name for m in methods}
        missing = [w for w in wanted if w not in known]
        if missing:
            raise SystemExit(f"unknown methods {missing}; known: {sorted(known)}")
        methods = [m for m in methods if m.name in wanted]
    wls = [WORKLOADS[w.strip()] for w in args.workloads.split(",") if w.strip()]
    rows: List[dict] = []
    for wl in wls:
        steps = max(2, int(round((wl.quick_steps if args.quick else wl.steps) * args.steps_scale)))
        for seed in seeds:
            data = wl.make_data(seed)
            for m in methods:
                r = run_one(wl, m, seed, steps, data)
                rows.append(r)
                if not args.quiet:
                    print(f"{wl.name:<12} seed {seed} {m.name:<22} final {r['final_train_loss']:.4g}  "
                          f"held-out {r['heldout_loss']:.4g}  fwd/step {r['forwards_per_step']:.2f}  "
                          f"eta {r['final_eta']:.2e}  {r['wall_s']:.1f}s", flush=True)
    agg = aggregate(rows)
    mode = "quick" if args.quick else "full"
    meta = dict(mode=mode + (f", steps x{args.steps_scale:g}" if args.steps_scale != 1 else ""),
                seeds=seeds, platform=platform.platform(), torch=torch.__version__,
                python=sys.version.split()[0], date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                total_s=time.perf_counter() - t_start, notes=notes, adam_grid=list(ADAM_GRID),
                adamw_cosine=ADAMW_COSINE, candidates=cands)
    tag = args.tag if args.tag is not None else ("quick" if args.quick else "")
    prefix = (tag + "-") if tag else ""
    os.makedirs(args.out, exist_ok=True)
    md = markdown(agg, meta)
    with open(os.path.join(args.out, prefix + "results.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, prefix + "results.json"), "w") as f:
        json.dump(dict(meta=meta, summary=agg, runs=rows), f, allow_nan=True)
    if not args.no_plot:
        for wl in wls:
            plot(wl.name, rows, agg, os.path.join(args.out, f"{prefix}{wl.name}.png"))
    if not args.quiet:
        print()
        print(md.split("## " + wls[0].name)[0])
        print(f"wrote {args.out}/{prefix}results.md (total {meta['total_s'] / 60:.1f} min)")
    return dict(meta=meta, summary=agg, rows=rows)


if __name__ == "__main__":
    main()
