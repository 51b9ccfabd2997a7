"""Fill Triton's on-disk cache with every kernel specialization the tests and benchmarks launch.

    python benchmarks/warm_triton.py [--jobs N] [--configs default,tiny] [--list]

The list is ``triton_kernels.kernels.specializations()`` (what the AOT tool compiles) for each
chunk configuration in use: the backend's default (BLOCK x ITERS) and the tests' small one
(``tests/backend_suite.py``'s TRITON_TINY, 16 x 2, the contract suite's triton-tiny rows).  Each
specialization is launched for real, once, with ``n_prog = 0`` and ``finish = 0`` (no program
touches memory; the verdict kernel writes its own scratch), in the dtypes, constexprs and
compile options the backend uses, so that the JIT cache
key is the one a real launch computes (every integer argument of the kernels is
``do_not_specialize``; the pointers are 16-byte aligned torch allocations).  The work is spread
over ``--jobs`` processes (compiles are CPU-bound: LLVM and ptxas); the cache is shared through
the disk, so later processes (pytest workers, benchmarks) load instead of compiling.  Without a
GPU it runs under the interpreter (``TRITON_INTERPRET=1``): the GPU suite's dry run checks the
argument lists that way.  The last line is ``ALSALS_WARM={...}`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"default": None, "tiny": (16, 2)}   # (block, iters); None: the backend's own


def _kernels():
    """The kernels module the backend itself launches (a source checkout's triton_kernels/)."""
    from alsals_fused.backends import triton_backend
    if triton_backend._tk is None:
        raise SystemExit(f"warm_triton: triton is not importable ({triton_backend._IMPORT_ERROR})")
    return triton_backend._tk.kernels


def _specs(configs):
    K = _kernels()
    out = []
    for config in configs:
        size = CONFIGS[config]
        for kernel, sig, cx, warps in K.specializations():
            cx = dict(cx)
            if size is not None and "BLOCK" in cx:
                cx["BLOCK"], cx["ITERS"] = size
            elif size is not None:
                continue        # the verdict kernel has no chunk: one specialization for both
            out.append((config, kernel, sig, cx, warps))
    return out


def _args(kernel, sig, device):
    import torch

    from alsals_fused.backends.base import CTL_SIZE, TABLE_COLS, VERDICT_SIZE
    dtypes = {"i64": torch.int64, "i32": torch.int32, "fp32": torch.float32, "fp64": torch.float64,
              "bf16": torch.bfloat16, "fp16": torch.float16}
    sizes = {"table": TABLE_COLS, "sched": 2, "partials": 2, "counter": 2, "ctl": CTL_SIZE,
             "out": VERDICT_SIZE}
    args = []
    for name in kernel.arg_names:
        if name not in sig:
            continue                      # a constexpr: passed by keyword
        t = sig[name]
        if t.startswith("*"):
            shape = (sizes[name],) if name in sizes else ()      # loss0, loss_try: 0-dim
            args.append(torch.zeros(shape, dtype=dtypes[t[1:]], device=device))
        elif t == "fp32":
            args.append(1.0)
        else:
            args.append(0)                # n_prog = 0, finish = 0: no program does any work
    return args


def worker(configs, index: int, jobs: int) -> int:
    import torch
    K = _kernels()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    done, errors, t0 = 0, [], time.monotonic()
    for i, (config, kernel, sig, cx, warps) in enumerate(_specs(configs)):
        if i % jobs != index:
            continue
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        try:
            kernel[(1,)](*_args(kernel, sig, device), **cx, num_warps=warps, **K.COMPILE_OPTIONS)
            done += 1
        except Exception as exc:  # noqa: BLE001  (reported; the tests will hit it too)
            errors.append(f"{config} {name} {cx}: {exc!r}"[:300])
    if device == "cuda":
        torch.cuda.synchronize()
    print("ALSALS_WARM_WORKER=" + json.dumps({"index": index, "launched": done, "errors": errors,
                                              "seconds": round(time.monotonic() - t0, 1)}), flush=True)
    return 1 if errors else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 4)),
                    help="worker processes (default: the cores less 4, at most 12)")
    ap.add_argument("--configs", default="default,tiny", help="chunk configurations: default, tiny")
    ap.add_argument("--list", action="store_true", help="print the specializations and exit")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        ap.error(f"--configs: unknown {sorted(unknown)}")
    if args.worker is not None:
        return worker(configs, args.worker, args.jobs)
    if args.list:
        for config, kernel, _sig, cx, warps in _specs(configs):
            print(config, getattr(kernel, "__name__", None) or kernel.fn.__name__, cx, f"num_warps={warps}")
        return 0
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(i),
                               "--jobs", str(args.jobs), "--configs", ",".join(configs)],
                              env=env, stdout=subprocess.PIPE, text=True)
             for i in range(args.jobs)]
    launched, errors, rcs = 0, [], []
    for proc in procs:
        out, _ = proc.communicate()
        rcs.append(proc.returncode)
        for line in out.splitlines():
            if line.startswith("ALSALS_WARM_WORKER="):
                rec = json.loads(line.split("=", 1)[1])
                launched += rec["launched"]
                errors += rec["errors"]
            else:
                print(line)
    total = len(_specs(configs))
    summary = {"specializations": total, "launched": launched, "jobs": args.jobs, "configs": configs,
               "errors": errors[:20], "seconds": round(time.monotonic() - t0, 1)}
    print("ALSALS_WARM=" + json.dumps(summary), flush=True)
    return 0 if launched == total and not any(rcs) else 1


if __name__ == "__main__":
    sys.exit(main())
