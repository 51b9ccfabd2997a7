"""Plot optimizer step time against parameter count, one line per path.

    python benchmarks/plot_results.py RESULTS.json [-o OUT.png]

RESULTS is the GPU suite's results JSON, a JSONL of rows ($ALSALS_BENCH_JSONL) or a pytest-benchmark
``--benchmark-json`` file.  Two panels: the ``step`` groups (whole optimizer steps) and the
``pass`` groups (single ALSALS passes), log-log; the dashed copy line is the bandwidth floor.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import _report  # this folder is on sys.path: run as a script, or imported by gpu_suite.py


def plot(rows, out: str, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    micro = [r for r in rows if r.get("kind") == "micro" and r.get("stats")]
    paths = sorted({r["row"] for r in micro})
    cmap = plt.get_cmap("tab20")
    color = {p: cmap(i % 20) for i, p in enumerate(paths)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 7.5))
    for ax, kind in zip(axes, ("step", "pass"), strict=True):
        lines: Dict[str, list] = {}
        scatter: Dict[str, list] = {}
        for r in micro:
            if (r.get("group") or "").split(" ")[0] != kind:
                continue
            # GPT-shaped sets form each path's line; the many-small set (same work, 2000 tensors)
            # is drawn as an open marker of the path's colour, so per-tensor overhead shows.
            dest = scatter if r.get("family") == "many-small" else lines
            dest.setdefault(r["row"], []).append((r["params"], r["stats"]["median"] * 1e3))
        for path in sorted(set(lines) | set(scatter)):
            style = "--" if path == "copy" else "-"
            if path in lines:
                xs, ys = zip(*sorted(lines[path]), strict=True)
                ax.plot(xs, ys, style, marker="o", markersize=4, color=color[path], label=path)
            if path in scatter:
                xs, ys = zip(*sorted(scatter[path]), strict=True)
                ax.plot(xs, ys, "none", marker="s", markersize=6, markerfacecolor="none",
                        color=color[path], label=None if path in lines else path)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (circles: GPT-shaped sets; open squares: many small tensors)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{kind} rows")
        ax.grid(True, which="both", alpha=0.3)
        if lines or scatter:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    fig.suptitle(title or "ALSALS optimizer step time vs parameter count")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("-o", "--out", help="PNG path (default: next to the results, .png)")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    print(plot(_report.load_rows(args.results), out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
