"""Demo: what a new user compares.  ``ALSALS()`` with its defaults against Adam at 1e-3, the best
point of a small Adam grid and Prodigy (a learning-rate-free optimizer), on a small byte-level
GPT, on CPU, in a few minutes; ``--optimizers`` adds the other variants (``alsals_plateau``,
``adaptive``, ``adam_sls``).

    python -m alsals_fused.demo                 # defaults: about 3 minutes on a 2-core CPU
    python -m alsals_fused.demo --optimizers alsals,alsals_plateau,adam,prodigy
    python -m alsals_fused.demo --device cuda --bf16 --steps 1000
    python -m alsals_fused.demo --tiny          # a few seconds: a smoke test

The text is the running Python's standard-library sources (``alsals_fused.examples.data``), so nothing is
downloaded.  Every optimizer starts from the same initialization and sees the same batches and,
because ALSALS leaves the generators where the gradient forward left them, the same dropout masks
at every step.  The line searches run trial forwards, so the table compares every method both at
an equal number of steps and at an equal number of forward passes (its loss when it has spent the
forwards Adam spends in the whole run).  Output: a progress line every few steps, a table, and in
``--out`` ``demo.png`` (training loss per step and against forward passes, and the step size of
each method) and ``demo.json`` (config, table, per-step records).

Results are deterministic given the seed, the device and the number of CPU threads (the thread
count changes the order of floating-point reductions).

``main(argv)`` returns the table rows as a dict keyed by run name (a variant, "adam@0.001", ...,
"prodigy").
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from ..config import DEFAULT_VARIANT
from ..optimizer import ALSALS
from .data import TextCorpus, fixed_starts, get_batch, load_corpus, random_starts
from .models import ByteGPT, GPTConfig, lm_loss

OPTIMIZERS = ("alsals", "alsals_plateau", "adaptive", "adam", "prodigy", "adam_sls")
DEFAULT_OPTIMIZERS = (DEFAULT_VARIANT, "adam", "prodigy")      # ALSALS() with its defaults first
ADAM_GRID = (1e-3, 3e-3, 1e-2)              # "adam" runs each of these (--adam-lrs)
PNG_NAME = "demo.png"
JSON_NAME = "demo.json"

# Sized for under 4 minutes in all on a 2-core CPU: a 2-layer, d=128 model on 64-byte windows,
# 200 steps per run, five runs (250 steps and a 4-point grid took 4:48; a sixth run, alsals_plateau,
# took the default set to 4:15 on a slow day).  The every-step line search costs about 1.4-1.7x
# Adam per step on CPU, where a no-grad forward is close to half of forward+backward at this size,
# plus the first step's backtracking from eta = 0.1 (30-50 trial forwards).
DEFAULTS = dict(steps=200, batch_size=32, context=64, n_layer=2, n_head=4, d_model=128,
                dropout=0.1, train_bytes=2_000_000, heldout_bytes=200_000, eval_batches=8,
                log_every=50, last_k=20)
# --tiny: the end-to-end test's size (seconds); explicit options still override it.
TINY = dict(steps=5, batch_size=4, context=16, n_layer=1, n_head=2, d_model=32, dropout=0.1,
            train_bytes=50_000, heldout_bytes=10_000, eval_batches=2, log_every=1, last_k=3)


def _label(run: str) -> str:
    if run.startswith("adam@"):
        return f"Adam (lr={float(run[5:]):g})"
    if run == DEFAULT_VARIANT:
        return f"ALSALS() default ({run})"
    return {"adaptive": "adaptive (auto)", "alsals": "alsals (the paper's)", "prodigy": "Prodigy (lr=1)",
            "adam_sls": "ADAM+SLS", "alsals_plateau": "alsals_plateau"}[run]


def expand_runs(optimizers: List[str], adam_lrs: List[float]) -> List[str]:
    """Run names: "adam" becomes one run per learning rate of the grid."""
    runs: List[str] = []
    for name in optimizers:
        runs += [f"adam@{lr:g}" for lr in adam_lrs] if name == "adam" else [name]
    return runs


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m alsals_fused.demo", description=__doc__.split("\n\n")[0],
                                epilog="Model and size options default to the values above, or to --tiny's.")
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N); default cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in the forward (for cuda)")
    p.add_argument("--steps", type=int, help=f"steps per optimizer (default {DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, help=f"windows per batch (default {DEFAULTS['batch_size']})")
    p.add_argument("--context", type=int, help=f"bytes per window (default {DEFAULTS['context']})")
    p.add_argument("--n-layer", type=int, help=f"transformer blocks (default {DEFAULTS['n_layer']})")
    p.add_argument("--n-head", type=int, help=f"attention heads (default {DEFAULTS['n_head']})")
    p.add_argument("--d-model", type=int, help=f"model width (default {DEFAULTS['d_model']})")
    p.add_argument("--dropout", type=float, help=f"dropout (default {DEFAULTS['dropout']})")
    p.add_argument("--untied", action="store_true", help="separate input and output embeddings")
    p.add_argument("--train-bytes", type=int, help=f"training text budget in bytes (default {DEFAULTS['train_bytes']})")
    p.add_argument("--heldout-bytes", type=int,
                   help=f"held-out text budget in bytes (default {DEFAULTS['heldout_bytes']})")
    p.add_argument("--eval-batches", type=int,
                   help=f"fixed held-out batches for the held-out loss (default {DEFAULTS['eval_batches']})")
    p.add_argument("--log-every", type=int, help=f"steps between progress lines (default {DEFAULTS['log_every']})")
    p.add_argument("--last-k", type=int,
                   help=f"final train loss = mean of the last k steps (default {DEFAULTS['last_k']})")
    p.add_argument("--seed", type=int, default=0, help="model init, batches and dropout (default 0)")
    p.add_argument("--adam-lrs", default=",".join(f"{lr:g}" for lr in ADAM_GRID),
                   help="Adam's learning-rate grid, comma-separated (default: %(default)s)")
    p.add_argument("--init-step-size", type=float, default=None,
                   help="initial eta of the line-search methods (default: the variant's)")
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                   help="comma-separated subset of " + ",".join(OPTIMIZERS) + " (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: half the cores this process may use, at most 4)")
    p.add_argument("--out", default="demo_out", help="directory for demo.png and demo.json (default ./demo_out)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and 5 steps: a smoke test")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    base = TINY if args.tiny else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        p.error(f"--optimizers: unknown {unknown}; choose from {','.join(OPTIMIZERS)}")
    args.optimizers = names
    try:
        args.adam_lrs = [float(x) for x in args.adam_lrs.split(",") if x.strip()]
    except ValueError:
        p.error(f"--adam-lrs: expected comma-separated numbers, got {args.adam_lrs!r}")
    if "adam" in names and (not args.adam_lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in args.adam_lrs)):
        p.error(f"--adam-lrs: expected positive learning rates, got {args.adam_lrs}")
    if "prodigy" in names:
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            p.error("--optimizers prodigy needs the prodigyopt package: pip install -e \".[demo]\" "
                    "(or leave prodigy out of --optimizers)")
    for key in ("steps", "batch_size", "context", "eval_batches", "log_every", "last_k"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to this torch build")
    return args


def _default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))     # respects taskset / container CPU sets
    except AttributeError:
        cores = os.cpu_count() or 1
    # Half the cores, at most 4: a model this small gains little from more intra-op threads, and
    # on a shared machine OpenMP threads that wait on a descheduled sibling are slow (measured on
    # 2 busy cores: 2 threads ran this demo 2-6x slower than 1 thread).
    return max(1, min(cores // 2, 4))


def model_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(context=args.context, n_layer=args.n_layer, n_head=args.n_head,
                     d_model=args.d_model, dropout=args.dropout, tie_weights=not args.untied)


def build_model(cfg: GPTConfig, seed: int = 0, device="cpu") -> ByteGPT:
    """The demo's model, initialized from ``seed`` alone (the same for every optimizer)."""
    torch.manual_seed(seed)
    return ByteGPT(cfg).to(device)


def make_optimizer(run: str, model: torch.nn.Module,
                   init_step_size: Optional[float] = None) -> torch.optim.Optimizer:
    if run.startswith("adam@"):
        return torch.optim.Adam(model.parameters(), lr=float(run[5:]))
    if run == "prodigy":
        from prodigyopt import Prodigy
        return Prodigy(model.parameters(), lr=1.0)
    # No buffers=: the model has no BatchNorm-like buffers that a trial forward could change.
    return ALSALS(model.parameters(), variant=run, init_step_size=init_step_size)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor, starts: torch.Tensor, context: int,
             batch_size: int, device: torch.device, bf16: bool = False) -> float:
    """Mean loss over fixed windows, in eval mode (no dropout); the mode is restored after."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in starts.split(batch_size):
        x, y = (t.to(device) for t in get_batch(data, chunk, context))
        with _autocast(device, bf16):
            total += float(lm_loss(model(x), y)) * len(chunk)
        count += len(chunk)
    model.train(was_training)
    return total / count


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(name: str, args: argparse.Namespace, corpus: TextCorpus, train_starts: torch.Tensor,
              eval_starts: torch.Tensor, device: torch.device, log=print) -> tuple:
    """Train one optimizer from the shared init on the shared batches: (table row, records)."""
    label = _label(name)
    model = build_model(model_config(args), args.seed, device)
    model.train()
    opt = make_optimizer(name, model, args.init_step_size)
    # Dropout stream: reseeded so every optimizer draws the same masks at every step (ALSALS
    # restores the generators to where its gradient forward left them after the trials).
    torch.manual_seed(args.seed + 1)
    records: List[dict] = []
    forwards = 0
    _sync(device)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = (t.to(device) for t in get_batch(corpus.train, train_starts[step - 1], args.context))

        def closure(x=x, y=y):
            with _autocast(device, args.bf16):
                return lm_loss(model(x), y)

        opt.zero_grad(set_to_none=True)
        rec: Dict[str, Any]
        if not isinstance(opt, ALSALS):
            loss = closure()
            loss.backward()
            opt.step()
            group = opt.param_groups[0]           # Prodigy's step size is d * lr
            rec = dict(step=step, loss=float(loss.detach()),
                       step_size=float(group["lr"]) * float(group.get("d", 1.0)), forwards=1)
        else:
            opt.step(closure)
            info = opt.last_step
            assert info is not None                 # set by every step(closure)
            # Forwards: the gradient forward plus one per trial.
            rec = dict(step=step, loss=float(info.loss), step_size=float(info.eta),
                       forwards=1 + info.trials, trials=info.trials, searched=info.searched,
                       accepted=info.accepted)
        forwards += rec["forwards"]
        rec["elapsed_s"] = round(time.perf_counter() - start, 4)
        records.append(rec)
        if not args.quiet and (step == 1 or step % args.log_every == 0 or step == args.steps):
            kind = "eta" if isinstance(opt, ALSALS) else "lr "
            log(f"  {label:<16} step {step:>5}/{args.steps}  loss {rec['loss']:.4f}  "
                f"{kind} {rec['step_size']:.3e}  fwd/step {forwards / step:.2f}  "
                f"{rec['elapsed_s']:6.1f}s")
    _sync(device)
    wall = time.perf_counter() - start
    heldout = evaluate(model, corpus.heldout, eval_starts, args.context, args.batch_size, device,
                       args.bf16)
    last = [r["loss"] for r in records[-args.last_k:]]
    row = dict(optimizer=label, train_loss=sum(last) / len(last),
               train_loss_equal_forwards=loss_at_forwards(records, args.steps, args.last_k),
               heldout_loss=heldout, forwards_per_step=forwards / args.steps,
               final_step_size=records[-1]["step_size"], wall_s=wall)
    if isinstance(opt, ALSALS):
        row["counters"] = dict(opt.counters)
    return row, records


def loss_at_forwards(records: List[dict], budget: int, last_k: int) -> float:
    """The mean loss of the last ``last_k`` steps that end within ``budget`` forward passes (the
    forwards a one-forward-per-step optimizer spends in the whole run)."""
    spent, inside = 0, []
    for r in records:
        spent += r["forwards"]
        if spent > budget:
            break
        inside.append(r["loss"])
    tail = inside[-last_k:]
    return sum(tail) / len(tail) if tail else math.nan


def compare(rows: Dict[str, dict]) -> Dict[str, Optional[str]]:
    """The reference runs the table's ratios are taken to: Adam 1e-3, the best Adam grid point
    (by training loss) and Prodigy, where they ran."""
    adam = {n: r for n, r in rows.items() if n.startswith("adam@") and math.isfinite(r["train_loss"])}
    return {"adam@0.001": "adam@0.001" if "adam@0.001" in rows else None,
            "best_adam": min(adam, key=lambda n: adam[n]["train_loss"]) if adam else None,
            "prodigy": "prodigy" if "prodigy" in rows else None}


def format_table(rows: Dict[str, dict], last_k: int) -> str:
    refs = compare(rows)
    # (title, the reference run's training loss) for each reference that ran
    ratios = [(title, rows[run]["train_loss"]) for ref, title in
              (("adam@0.001", "x Adam 1e-3"), ("best_adam", "x best Adam"), ("prodigy", "x Prodigy"))
              if (run := refs[ref]) is not None]
    head = ["optimizer", f"train loss (last {last_k})"] + [title for title, _ in ratios]
    head += ["at Adam's forwards", "held-out loss", "fwd/step", "final step size", "wall time"]
    lines = []
    for r in rows.values():
        cells = [r["optimizer"], f"{r['train_loss']:.4f}"]
        cells += [f"{r['train_loss'] / ref_loss:.3f}" for _, ref_loss in ratios]
        cells += [f"{r['train_loss_equal_forwards']:.4f}", f"{r['heldout_loss']:.4f}",
                  f"{r['forwards_per_step']:.2f}", f"{r['final_step_size']:.2e}", f"{r['wall_s']:.1f} s"]
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    table = "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines])
    best = refs["best_adam"]
    if best is not None:
        table += f"\nbest Adam grid point: {rows[best]['optimizer']}"
    return table


def _smooth(values: List[float], span: int) -> List[float]:
    """Exponential moving average, bias-corrected so the curve starts at the first value."""
    alpha, avg, out = 2 / (span + 1), 0.0, []
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def plot(records: Dict[str, List[dict]], labels: Dict[str, str], path: str, title: str) -> None:
    # The object API with the Agg canvas: no pyplot, no global backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_fwd, ax_eta = fig.subplots(1, 3)
    colors = {"adaptive": "black", "alsals": "tab:red", "alsals_plateau": "tab:orange", "prodigy": "tab:brown",
              "adam_sls": "tab:green"}
    blues = iter(["tab:cyan", "tab:blue", "navy", "tab:purple", "tab:gray", "tab:olive"])
    for name in records:
        if name not in colors:
            colors[name] = next(blues, "tab:gray")
    for name, recs in records.items():
        steps = [r["step"] for r in recs]
        losses = [r["loss"] for r in recs]
        span = max(1, len(recs) // 30)
        smooth = _smooth(losses, span)
        forwards, total = [], 0
        for r in recs:
            total += r["forwards"]
            forwards.append(total)
        ax_loss.plot(steps, losses, color=colors[name], alpha=0.25, linewidth=0.8)
        ax_loss.plot(steps, smooth, color=colors[name], linewidth=1.8, label=labels[name])
        ax_fwd.plot(forwards, smooth, color=colors[name], linewidth=1.8, label=labels[name])
        ax_eta.plot(steps, [r["step_size"] for r in recs], color=colors[name], linewidth=1.5,
                    label=labels[name])
    ax_loss.set(xlabel="step", ylabel="training loss (nats/byte)",
                title="training loss (faint: per step; solid: moving average)")
    ax_fwd.set(xlabel="forward passes (gradient forward + trial forwards)", ylabel="training loss",
               title="training loss against cost (moving average)")
    ax_eta.set(xlabel="step", ylabel="step size", yscale="log",
               title="step size: eta of each line search, Adam's lr, Prodigy's d*lr")
    for ax in (ax_loss, ax_fwd, ax_eta):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    """Run the comparison; returns the table rows keyed by optimizer name (see format_table)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    threads_before = torch.get_num_threads()
    threads = args.threads or _default_threads()
    torch.set_num_threads(threads)
    try:
        return _run(args, device, threads)
    finally:
        torch.set_num_threads(threads_before)     # main() may be called from a test process


def _run(args: argparse.Namespace, device: torch.device, threads: int) -> Dict[str, dict]:
    t_start = time.perf_counter()
    corpus = load_corpus(args.train_bytes, args.heldout_bytes)
    train_starts = random_starts(len(corpus.train), args.context, args.batch_size, args.steps,
                                 args.seed)
    eval_starts = fixed_starts(len(corpus.heldout), args.context, args.eval_batches * args.batch_size)
    cfg = model_config(args)
    n_params = build_model(cfg, args.seed).num_parameters()
    print(f"data: {corpus.describe()}")
    print(f"model: byte-level GPT, {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, "
          f"context {cfg.context}, dropout {cfg.dropout}, "
          f"{'tied' if cfg.tie_weights else 'untied'} embeddings, {n_params:,} parameters")
    print(f"run: {args.steps} steps x batch {args.batch_size}, seed {args.seed}, device {device}"
          f"{' (bf16 autocast)' if args.bf16 else ''}, {threads} CPU thread(s)")

    runs = expand_runs(args.optimizers, args.adam_lrs)
    labels = {n: _label(n) for n in runs}
    rows: Dict[str, dict] = {}
    records: Dict[str, List[dict]] = {}
    for name in runs:
        if not args.quiet:
            print(f"{labels[name]}:")
        rows[name], records[name] = train_one(name, args, corpus, train_starts, eval_starts, device)

    print()
    print(format_table(rows, args.last_k))
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, PNG_NAME)
    if not args.no_plot:
        plot(records, labels, png,
             f"byte-level GPT ({n_params:,} params) on Python stdlib sources: "
             f"{args.steps} steps, batch {args.batch_size}x{args.context}, seed {args.seed}")
    report = dict(
        config={k: v for k, v in vars(args).items()},
        model=cfg.to_dict(), n_params=n_params,
        data=dict(root=corpus.root, train_bytes=len(corpus.train), heldout_bytes=len(corpus.heldout),
                  train_files=corpus.train_files, heldout_files=corpus.heldout_files),
        environment=dict(python=sys.version.split()[0], torch=torch.__version__,
                         platform=platform.platform(), device=str(device), threads=threads),
        table=rows, records=records, total_wall_s=time.perf_counter() - t_start)
    json_path = os.path.join(args.out, JSON_NAME)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, allow_nan=True)
    wrote = ([png] if not args.no_plot else []) + [json_path]
    print(f"\nwrote {', '.join(wrote)}  (total {report['total_wall_s']:.1f} s)")
    bad = [rows[n]["optimizer"] for n in rows if not math.isfinite(rows[n]["train_loss"])]
    if bad:
        print(f"warning: non-finite training loss for {', '.join(bad)}")
    return rows


if __name__ == "__main__":
    main()
