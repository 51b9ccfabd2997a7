"""How hard is the first target ("within 1.10x of the best Adam grid point on every workload")?

    python -m benchmarks.quality.calibrate benchmarks/quality/results/quick-6seeds-round10-finals.json

Reads harness results (``<tag>-results.json``, or the per-run finals this module writes with
``--write-finals``) and reports, per method, against the same Adam grid:

- Adam at one learning rate on every workload: what the target asks of a method that is not
  tuned per workload;
- Adam tuned per workload on half of the seeds and judged on the other half (every split of the
  seeds into two halves): whether the target is within reach of tuning at this number of seeds,
  or is lost in the seeds' spread;
- each method on every subset of half of the seeds: how much its count moves with the seeds;
- each method's worst, second-worst and median ratio: the tolerance it would need on every
  workload.

The ratio is the harness's: the mean over seeds of the final training loss over the mean of the
best Adam point's.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

from .run import TARGET_VS_BEST_ADAM

FINAL_KEYS = ("workload", "method", "seed", "final_train_loss", "forwards_per_step")
Finals = Dict[Tuple[str, str], Dict[int, float]]


def load_finals(paths: Iterable[str]) -> Finals:
    finals: Finals = defaultdict(dict)
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["runs"]:
                finals[(r["workload"], r["method"])][int(r["seed"])] = float(r["final_train_loss"])
    return finals


def _mean(finals: Finals, workload: str, method: str, seeds: Sequence[int]) -> float:
    return statistics.mean(finals[(workload, method)][s] for s in seeds)


def _layout(finals: Finals) -> Tuple[List[str], List[str], List[str], List[int], List[str]]:
    """Workloads, Adam grid methods, the other methods that ran every seed the grid ran on every
    workload, those seeds, and the methods left out for running fewer (seeds added later for
    some methods only)."""
    workloads = list(dict.fromkeys(w for w, _ in finals))
    methods = list(dict.fromkeys(m for _, m in finals))
    adam = [m for m in methods if m.startswith("adam@")]
    missing = [(w, a) for w in workloads for a in adam if (w, a) not in finals]
    if not adam or missing:
        raise SystemExit(f"calibrate: needs the Adam grid (adam@lr) on every workload; "
                         f"missing: {missing[:5] or 'the Adam grid'}")
    seeds = sorted(set.intersection(*(set(finals[(w, a)]) for w in workloads for a in adam)))
    candidates = [m for m in methods if not m.startswith(("adam@", "adam_cd@"))]
    others = [m for m in candidates
              if all(set(seeds) <= set(finals.get((w, m), ())) for w in workloads)]
    return workloads, adam, others, seeds, [m for m in candidates if m not in others]


def within_count(finals: Finals, method_of, workloads, adam, seeds) -> int:
    """Workloads where ``method_of(workload)`` is within the target of the best Adam point, on
    ``seeds``."""
    count = 0
    for w in workloads:
        best = min(_mean(finals, w, a, seeds) for a in adam)
        count += _mean(finals, w, method_of(w), seeds) / best <= TARGET_VS_BEST_ADAM
    return count


def half_splits(seeds: Sequence[int]) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """Each split of the seeds into two halves once (the first seed always in the first half)."""
    half = len(seeds) // 2
    splits = []
    for chosen in itertools.combinations(seeds, half):
        if seeds[0] in chosen:
            rest = tuple(s for s in seeds if s not in chosen)
            splits.append((chosen, rest))
    return splits


def report(finals: Finals) -> List[str]:
    workloads, adam, others, seeds, left_out = _layout(finals)
    n = len(workloads)
    out = [f"# How hard the first target is ({n} workloads, seeds {seeds})", ""]
    if left_out:
        out += [f"Left out (not run on every one of these seeds and workloads): {', '.join(left_out)}.", ""]

    out += ["## Adam at one learning rate on every workload", "",
            f"| method | within {TARGET_VS_BEST_ADAM:.2f}x of the best Adam point | worst ratio |", "|---|---|---|"]
    best = {w: min(_mean(finals, w, a, seeds) for a in adam) for w in workloads}
    for a in adam:
        ratios = [_mean(finals, w, a, seeds) / best[w] for w in workloads]
        out.append(f"| {a} | {sum(r <= TARGET_VS_BEST_ADAM for r in ratios)}/{n} | {max(ratios):.2f} |")

    splits = half_splits(seeds) if len(seeds) >= 2 else []
    if splits:
        counts, missed = [], defaultdict(int)
        for tune, judge in splits:
            pick = {w: min(adam, key=lambda a, w=w: _mean(finals, w, a, tune)) for w in workloads}
            misses = [w for w in workloads if not within_count(finals, pick.__getitem__, [w], adam, judge)]
            counts.append(n - len(misses))
            for w in misses:
                missed[w] += 1
        where = ", ".join(f"{w} in {k}" for w, k in missed.items()) or "none"
        out += ["", "## Adam tuned per workload on half of the seeds, judged on the other half", "",
                f"{len(splits)} splits of seeds {seeds} into two halves: the best grid point on one half is "
                f"within {TARGET_VS_BEST_ADAM:.2f}x of the other half's best point on {min(counts)}-{max(counts)} "
                f"of {n} workloads (mean {statistics.mean(counts):.1f}); missed: {where} of the splits."]

    half = max(1, len(seeds) // 2)
    subsets = list(itertools.combinations(seeds, half))
    out += ["", f"## Each method, all {n} workloads", "",
            f"| method | within {TARGET_VS_BEST_ADAM:.2f}x, all seeds | within, on each subset of {half} seeds "
            "(min-max, mean) | worst ratio | second worst | median |", "|---|---|---|---|---|---|"]
    for m in others:
        ratios = sorted(_mean(finals, w, m, seeds) / best[w] for w in workloads)
        on_subsets = [within_count(finals, lambda w, m=m: m, workloads, adam, s) for s in subsets]
        second = ratios[-2] if len(ratios) > 1 else ratios[-1]
        out.append(f"| {m} | {sum(r <= TARGET_VS_BEST_ADAM for r in ratios)}/{n} | {min(on_subsets)}-"
                   f"{max(on_subsets)}, {statistics.mean(on_subsets):.1f} | {ratios[-1]:.2f} | "
                   f"{second:.2f} | {statistics.median(ratios):.2f} |")
    return out + [""]


def write_finals(paths: Iterable[str], out_path: str) -> int:
    """The per-run final numbers of harness results (a few hundred bytes per run instead of the
    per-step traces): what this module needs, small enough to commit."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs += [{k: r[k] for k in FINAL_KEYS} for r in json.load(f)["runs"]]
    with open(out_path, "w") as f:
        f.write('{"runs": [\n' + ",\n".join(json.dumps(r) for r in runs) + "\n]}\n")   # a run per line
    return len(runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="harness <tag>-results.json files (or finals written by this)")
    ap.add_argument("--write-finals", metavar="PATH", help="also write the runs' final numbers to PATH")
    args = ap.parse_args(argv)
    if args.write_finals:
        print(f"wrote {write_finals(args.results, args.write_finals)} runs to {args.write_finals}", file=sys.stderr)
    print("\n".join(report(load_finals(args.results))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
