"""Benchmark rows -> markdown tables and the target ratios (used by conftest, gpu_suite, plot).

A row is a dict: ``test``, ``group``, ``stats`` ({min, median, mean, stddev, rounds} in seconds, or
None), and the row's extra_info (``row``, ``set``, ``family``, ``kind``, ``params``, ``gbps``, ...).
Rows come from ``$ALSALS_BENCH_JSONL`` files or from pytest-benchmark's ``--benchmark-json``.
On CUDA a micro row also has ``device_s`` (CUDA-event seconds per call), ``wall_s`` and
``wall_over_device``; ``stats`` is then wall time per call over many calls per synchronization.
The accepted-step and Adam rows also have ``busy_s``, the device's busy time per call (the
profiler's kernel durations): the accepted step reads its verdict, so its event span also holds
host work, and the work target compares busy times.
Rows of kind ``hot-path`` (``hot_path_rows``: ``hot_path.py --json``, run by the GPU suite) carry
device operations and host microseconds per step instead of timing stats.
"""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional

BACKENDS = ("reference", "foreach", "triton", "cuda")


def load_rows(path: str) -> List[dict]:
    """Rows from a JSONL file of rows, a suite results JSON, or a pytest-benchmark JSON."""
    with open(path) as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(doc, dict) and "rows" in doc:
        return doc["rows"]
    if isinstance(doc, dict) and "benchmarks" in doc:   # pytest-benchmark
        keys = ("min", "median", "mean", "stddev", "rounds")
        return [{"test": b["name"], "group": b.get("group"),
                 "stats": {k: b["stats"][k] for k in keys}, **b.get("extra_info", {})}
                for b in doc["benchmarks"]]
    raise ValueError(f"{path}: not a rows file")


def _median(row: Optional[dict]) -> Optional[float]:
    return row["stats"]["median"] if row and row.get("stats") else None


def _fmt(x, spec: str = ".3g", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.4g}"


def markdown_tables(rows: Iterable[dict]) -> str:
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("group") or "?", []).append(r)
    out = []
    for group, rs in groups.items():
        if rs[0].get("kind") == "e2e":
            adam = next((r for r in rs if r["row"].startswith("adam")), None)
            base = adam.get("tokens_per_s") if adam else None
            out += [f"\n**{group}** ({rs[0].get('params', 0):,} params, "
                    f"{rs[0].get('tokens_per_step')} tokens/step, {rs[0].get('steps')} timed steps)\n",
                    "| run | tokens/s | x Adam | forwards/step | peak mem GiB | state B/param | final loss | backend |",
                    "|---|---|---|---|---|---|---|---|"]
            for r in rs:
                tps = r.get("tokens_per_s")
                rel = tps / base if (tps and base) else None
                mem = r.get("peak_mem_bytes")
                out.append(f"| {r['row']} | {_fmt(tps, '.1f')} | {_fmt(rel, '.3f')} | "
                           f"{_fmt(r.get('forwards_per_step'))} | "
                           f"{_fmt(mem / 2**30 if mem else None, '.2f', 'n/a (CPU)')} | "
                           f"{_fmt(r.get('state_bytes_per_param'))} | {_fmt(r.get('final_loss'))} | "
                           f"{'+'.join(r.get('backend') or ['torch'])} |")
            continue
        if rs[0].get("kind") == "hot-path":
            out += [f"\n**{group}**\n", "| backend | tensors | " + " | ".join(HOT_PATH_COLUMNS.values())
                    + " | note |", "|---|---|" + "---|" * len(HOT_PATH_COLUMNS) + "---|"]
            for r in rs:
                out.append(f"| {r['row']} | {r.get('tensors')} | "
                           + " | ".join(_fmt(r.get(k), ".0f") for k in HOT_PATH_COLUMNS)
                           + f" | {r.get('note') or ''} |")
            continue
        first = rs[0]
        timed = any(r.get("device_s") for r in rs)
        out += [f"\n**{group}** ({first.get('params', 0):,} params in {first.get('tensors')} tensors)\n",
                "| row | wall ms/call | min ms | device ms/call | busy ms/call | wall/device | calls/sync | "
                "rounds | B/param | GB/s | of copy | reads/step | syncs/step | state B/param |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            s = r.get("stats") or {}
            frac = r.get("frac_copy")
            dev = _ms(r.get("device_s")) if timed else "= wall (CPU)"
            out.append(f"| {r['row']} | {_ms(s.get('median'))} | {_ms(s.get('min'))} | {dev} | "
                       f"{_ms(r.get('busy_s'))} | "
                       f"{_fmt(r.get('wall_over_device'), '.3g')} | {r.get('calls_per_sync', 1)} | "
                       f"{s.get('rounds', '-')} | {r.get('bytes_per_param', '-')} | "
                       f"{_fmt(r.get('gbps'), '.1f')} | "
                       f"{_fmt(frac * 100 if frac else None, '.0f')}{'%' if frac else ''} | "
                       f"{_fmt(r.get('reads_per_step'))} | {_fmt(r.get('syncs_per_step'), '.3g', 'n/a')} | "
                       f"{_fmt(r.get('state_bytes_per_param'))} |")
    return "\n".join(out)


# hot_path.py's keys (one row per backend and tensor count) and their column headings.
HOT_PATH_COLUMNS = {
    "ops_searching_step": "device ops, searching step",
    "ops_extra_trial": "device ops, extra trial",
    "ops_nonsearching_step": "device ops, non-searching step",
    "host_us_searching_step": "host us, searching step",
    "host_us_nonsearching_step": "host us, non-searching step",
    "host_us_harness_floor": "host us, harness alone (included above)",
}
HOT_PATH_GROUP = "hot path: device operations and host microseconds per step (hot_path.py)"


def hot_path_rows(records: Iterable[dict], **common) -> List[dict]:
    """``hot_path.py --json`` records -> report rows (kind ``hot-path``, no timing stats)."""
    rows = []
    for rec in records:
        row = {"test": f"hot_path[{rec.get('backend')}-{rec.get('tensors')}]", "group": HOT_PATH_GROUP,
               "stats": None, "kind": "hot-path", "row": rec.get("backend"),
               "set": f"{rec.get('tensors')} tensors", **common}
        row.update({k: v for k, v in rec.items() if k != "detail"})
        rows.append(row)
    return rows


def _device(row: Optional[dict]) -> Optional[float]:
    """Device seconds per call (CUDA events) where measured, else the median wall time."""
    if row and row.get("device_s"):
        return row["device_s"]
    return _median(row)


def targets(rows: Iterable[dict]) -> List[dict]:
    """The project's goals as ratios within one run (goals, not assertions)."""
    rows = [r for r in rows if r.get("stats") or r.get("kind") in ("e2e", "hot-path")]
    micro = {(r["set"], r["row"]): r for r in rows if r.get("kind") == "micro"}
    out: List[dict] = []

    def add(name, label, value, goal, ok, detail=""):
        out.append({"target": name, "set": label, "value": value, "goal": goal,
                    "met": None if value is None or ok is None else bool(ok), "detail": detail})

    for label in sorted({r["set"] for r in micro.values() if r.get("family") == "gpt2"}):
        adam = micro.get((label, "adam-fused")) or micro.get((label, "adam-foreach"))
        salsa = micro.get((label, "salsa-pkg"))
        for b in BACKENDS:
            sp = micro.get((label, f"alsals-{b}-step_pass"))
            if sp and sp.get("frac_copy") is not None:
                add(f"{b}: step pass / copy bandwidth", label, sp["frac_copy"], ">= 0.90",
                    sp["frac_copy"] >= 0.90, f"{sp['gbps']} vs {sp['copy_gbps']} GB/s"
                    + (" (device time)" if sp.get("device_s") else ""))
            acc_row = micro.get((label, f"alsals-{b}-accepted"))
            work = None                   # (ratio, how it was timed)
            if acc_row and adam and acc_row.get("busy_s") and adam.get("busy_s"):
                work = acc_row["busy_s"] / adam["busy_s"], "device busy time (profiler)"
            elif acc_row and adam and _device(acc_row) and _device(adam):
                # The accepted step reads its verdict: its event span holds the host's work after
                # the read too, so this ratio is an upper bound of the work's.
                work = (_device(acc_row) / _device(adam), "event span, with ALSALS's host work after "
                        "its read (an upper bound)" if acc_row.get("device_s") else "wall time")
            if work is not None:          # (adam is then a row)
                add(f"{b}: accepted-step work / torch {adam['row']}", label, work[0], "<= 1.35",
                    work[0] <= 1.35, work[1])
            full = _median(micro.get((label, f"alsals-{b}-opt.step")))
            if full and adam and _median(adam):
                ratio = full / _median(adam)
                add(f"{b}: opt.step incl. host work / torch {adam['row']}", label, ratio, "<= 1.5",
                    ratio <= 1.5, "wall time per call")
            salsa_t = _median(salsa)
            if full and salsa_t:
                ratio = salsa_t / full
                add(f"{b}: speedup of opt.step over the SaLSA package", label, ratio, ">= 10",
                    ratio >= 10)
    # Informational: per-step overhead of foreach against the reference loop (small GPT sets).
    for (label, row), r in sorted(micro.items()):
        if row == "alsals-foreach-opt.step" and (label, "alsals-reference-opt.step") in micro:
            ref, mine = _median(micro[(label, "alsals-reference-opt.step")]), _median(r)
            if ref and mine:
                add("foreach / reference opt.step time", label, mine / ref, "(info)", None,
                    f"{mine * 1e3:.3g} ms vs {ref * 1e3:.3g} ms")
    e2e = {(r["set"], r["row"]): r for r in rows if r.get("kind") == "e2e"}
    for label in sorted({s for s, _ in e2e}):
        adam = e2e.get((label, "adam-fused")) or e2e.get((label, "adam-foreach"))
        if not adam or not adam.get("tokens_per_s"):
            continue
        for run, goal in (("alsals-auto", 0.93), ("alsals-every1", None)):
            e2e_row = e2e.get((label, run))
            if e2e_row and e2e_row.get("tokens_per_s"):
                ratio = e2e_row["tokens_per_s"] / adam["tokens_per_s"]
                add(f"end to end tokens/s: {run} / {adam['row']}", label, ratio,
                    f">= {goal}" if goal else "(info)", ratio >= goal if goal else None,
                    f"{e2e_row.get('forwards_per_step')} forwards/step")
    # The hot-path goals (host time goals are for the 2-core CI machine; info elsewhere).
    goals = {"ops_searching_step": 6, "ops_extra_trial": 3, "ops_nonsearching_step": 3}
    host_goals = {148: {"host_us_searching_step": 150, "host_us_nonsearching_step": 80},
                  580: {"host_us_searching_step": 400, "host_us_nonsearching_step": 250}}
    for r in rows:
        if r.get("kind") != "hot-path" or r.get("row") not in ("triton", "cuda"):
            continue
        for key, goal in [*goals.items(), *host_goals.get(r.get("tensors"), {}).items()]:
            v = r.get(key)
            if v is not None:
                add(f"{r['row']}: {HOT_PATH_COLUMNS[key]}", r["set"], v, f"<= {goal}", v <= goal,
                    "on the 2-core CI machine" if key.startswith("host") else "")
    return out


def markdown_targets(ts: List[dict]) -> str:
    if not ts:
        return "\n(no target ratios: the rows they need did not run)"
    lines = ["\n**Targets** (ratios within this run; goals, not assertions)\n",
             "| target | set | value | goal | met | detail |", "|---|---|---|---|---|---|"]
    for t in ts:
        met = {True: "yes", False: "NO", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['set']} | {_fmt(t['value'], '.3f')} | {t['goal']} | "
                     f"{met} | {t['detail']} |")
    return "\n".join(lines)
