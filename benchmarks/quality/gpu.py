"""GPU mode of the quality harness: a GPT-2-small-shaped byte-level model, one call < 3 minutes.

    python -m benchmarks.quality --gpu [--out DIR]

12 layers, d_model 768, 12 heads (GPT-2 small's body; byte vocabulary, so about 85M parameters),
context 256, batch 16, bf16 autocast, on this machine's Python standard-library sources; 300 steps
each of Adam 1e-3, Adam 3e-4, the paper's ALSALS (every step) and "adaptive" ("auto"), same init,
batches and dropout stream.  Writes ``gpu-results.md`` / ``gpu-results.json`` / ``gpu_gpt2.png``.
Estimated at well under 3 minutes on one H100/H200-class GPU; it has NOT been run yet (no GPU was
available when it was written): the first run's numbers are the first evidence.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from alsals_fused import ALSALS
from alsals_fused.examples.data import get_batch, load_corpus, random_starts
from alsals_fused.examples.models import ByteGPT, GPTConfig, lm_loss

CFG = dict(context=256, n_layer=12, n_head=12, d_model=768, dropout=0.1)
STEPS, BATCH = 300, 16
METHODS = ("adam@0.001", "adam@0.0003", "alsals/every", "adaptive/auto")


def _opt(name, model):
    if name.startswith("adam@"):
        return torch.optim.Adam(model.parameters(), lr=float(name.split("@")[1]))
    variant, mode = name.split("/")
    return ALSALS(model.parameters(), variant=variant, line_search_every=1 if mode == "every" else "auto")


def main(args) -> dict:
    if not torch.cuda.is_available():
        msg = "GPU mode needs a CUDA device; none is available here, so nothing was run."
        print(msg, file=sys.stderr)
        return {"skipped": msg}
    device = torch.device("cuda")
    corpus = load_corpus(4_000_000, 200_000)
    starts = random_starts(len(corpus.train), CFG["context"], BATCH, STEPS, seed=0)
    rows, t_all = {}, time.perf_counter()
    for name in METHODS:
        torch.manual_seed(0)
        model = ByteGPT(GPTConfig(**CFG)).to(device).train()
        opt = _opt(name, model)
        torch.manual_seed(1)
        losses, etas, forwards = [], [], 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(STEPS):
            x, y = (t.to(device, non_blocking=True) for t in get_batch(corpus.train, starts[i], CFG["context"]))

            def closure(x=x, y=y, model=model):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return lm_loss(model(x), y)          # the loss in fp32 (equality guard)
            opt.zero_grad(set_to_none=True)
            if isinstance(opt, ALSALS):
                loss = opt.step(closure)
                info = opt.last_step
                losses.append(float(loss))
                etas.append(info.eta)
                forwards += 1 + info.trials
            else:
                loss = closure()
                loss.backward()
                opt.step()
                losses.append(float(loss))
                etas.append(opt.param_groups[0]["lr"])
                forwards += 1
        torch.cuda.synchronize()
        tail = losses[-STEPS // 10:]
        rows[name] = dict(final_train_loss=sum(tail) / len(tail), forwards_per_step=forwards / STEPS,
                          wall_s=time.perf_counter() - t0, final_eta=etas[-1], losses=losses, etas=etas)
        print(f"{name:<16} final {rows[name]['final_train_loss']:.4f} fwd/step "
              f"{rows[name]['forwards_per_step']:.2f} {rows[name]['wall_s']:.1f}s", flush=True)
        model = opt = None
        torch.cuda.empty_cache()
    ref = rows["adam@0.001"]["final_train_loss"]
    best = min(r["final_train_loss"] for n, r in rows.items() if n.startswith("adam@"))
    lines = [f"# GPU mode: GPT-2-small-shaped byte model ({torch.cuda.get_device_name()})", "",
             f"{STEPS} steps, batch {BATCH}x{CFG['context']}, bf16 autocast; total "
             f"{time.perf_counter() - t_all:.0f} s.", "",
             "| method | final train loss | x Adam 1e-3 | x best Adam | fwd/step | s/run | final eta/lr |",
             "|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['final_train_loss']:.4f} | {r['final_train_loss'] / ref:.3f} | "
                     f"{r['final_train_loss'] / best:.3f} | {r['forwards_per_step']:.2f} | {r['wall_s']:.1f} | "
                     f"{r['final_eta']:.2e} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu-results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "gpu-results.json"), "w") as f:
        json.dump(rows, f)
    if not args.no_plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        fig = Figure(figsize=(12, 4.4), layout="constrained")
        FigureCanvasAgg(fig)
        a, b = fig.subplots(1, 2)
        for n, r in rows.items():
            a.plot(r["losses"], label=n, linewidth=1)
            b.plot(r["etas"], label=n)
        a.set(xlabel="step", ylabel="training loss", title="training loss")
        b.set(xlabel="step", ylabel="eta / lr", yscale="log", title="eta against Adam's lr")
        b.legend()
        fig.savefig(os.path.join(args.out, "gpu_gpt2.png"), dpi=100)
    print("\n".join(lines))
    return rows
