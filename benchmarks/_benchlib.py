"""Shared pieces of the ALSALS benchmarks.

Configuration comes from the environment so that ``gpu_suite.py`` can drive pytest in phases:

``ALSALS_BENCH_DEVICE``  cuda | cpu (default: cuda when available)
``ALSALS_BENCH_SIZE``    tiny | small | full (default: full on a GPU, small on CPU, tiny in smoke)
``ALSALS_BENCH_SETS``    comma list of parameter-set families to run (gpt2, gpt2-mini, many-small,
                         gpt2-xl); default: every family of the size (gpt2-xl exists at full only)
``ALSALS_BENCH_SMOKE``   1: tiny sizes and only the tests marked ``smoke`` (CI, < 1 minute)
``ALSALS_BENCH_ROW_S``   seconds of timed rounds per benchmark row (default by size)
``ALSALS_BENCH_E2E_STEPS``  timed training steps per end-to-end row (default by size)
``ALSALS_BENCH_THREADS``  CPU intra-op threads (default 1: repeatable on shared machines)
``ALSALS_BENCH_JSONL``   append one JSON line per finished row to this file (partial results)
``ALSALS_BENCH_BATCH_S``  CUDA: seconds of calls per synchronization (default 0.025; 3..100 calls)
``ALSALS_BENCH_DEVICE_BATCHES``  CUDA: event-timed batches per row (default 3, median taken)

Timing.  CPU: one call per round, wall time (host and device are one).  CUDA: a round is many
calls and one synchronization, so a row's median is the *wall* time per call with its host work;
the same calls are then timed with CUDA events behind a spin kernel (the host enqueues ahead of
the device), the *device* time per call.  A row reports both and ``wall_over_device``: host
overhead is its own column, and bandwidth is computed from device time.

Byte counts are docs/algorithm.md section 7's, per fp32 parameter; "GB/s" below is always the *ideal*
byte count of the work divided by the measured (device) time (effective bandwidth), compared with a plain
device-to-device copy (CPU: memcpy) of the same number of elements timed in the same run.
"""
from __future__ import annotations

import gc
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from alsals_fused.examples.models import ByteGPT, lm_loss
from alsals_fused.examples.models import GPTConfig as ModelConfig

# -- bytes moved per fp32 parameter (docs/algorithm.md section 7) ------------------------------
BYTES_PER_PARAM = {
    "copy": 8,         # read src, write dst
    "adam": 28,        # fused ADAM: read g, m, v, w (16); write m, v, w (12)
    "grad_pass": 4,    # the non-finite / clipping pre-pass: read g
    "step_pass": 32,   # read g, m, v, w (16); write m, v, the w0 backup and the candidate (16)
    "accepted": 36,    # a step whose first trial is accepted: pre-pass (4) + step pass (32)
    "backtrack": 16,   # one extra trial: read w0, m, v; write w (12 with a stored direction)
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "no")


DEVICE = torch.device(os.environ.get("ALSALS_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
SMOKE = _flag("ALSALS_BENCH_SMOKE")
SIZE = os.environ.get("ALSALS_BENCH_SIZE") or ("tiny" if SMOKE else
                                               ("full" if DEVICE.type == "cuda" else "small"))
if SIZE not in ("tiny", "small", "full"):
    raise ValueError(f"ALSALS_BENCH_SIZE={SIZE!r}: choose tiny, small or full")
ROW_SECONDS = float(os.environ.get("ALSALS_BENCH_ROW_S")
                    or {"tiny": 0.05, "small": 0.5, "full": 0.4}[SIZE])
MIN_ROUNDS = {"tiny": 2, "small": 3, "full": 5}[SIZE]
# CPU: one intra-op thread by default.  On a shared or small machine (CI), OpenMP threads that
# spin-wait for a busy core make timings swing by 10-100x; one thread is slower but repeatable.
CPU_THREADS = int(os.environ.get("ALSALS_BENCH_THREADS") or 1)
if DEVICE.type == "cpu":
    torch.set_num_threads(CPU_THREADS)
MAX_ROUNDS = 200
IS_CUDA = DEVICE.type == "cuda"


# -- a GPT-2-shaped model (its parameter list is also the "gpt2" parameter sets) ---------------
@dataclass(frozen=True)
class GPTConfig:
    """Compact spec of the package's own GPT (alsals_fused.examples.models) at GPT-2's layout."""
    vocab: int
    ctx: int
    d: int
    layers: int
    heads: int

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab, context=self.ctx, n_layer=self.layers,
                           n_head=self.heads, d_model=self.d, dropout=0.0, tie_weights=True)


class GPT(nn.Module):
    """The demo's ByteGPT at these shapes: GPT-2's parameters (token and position tables, 12
    tensors per block, the final LayerNorm; head tied to the token table).  Returns the loss."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.net = ByteGPT(cfg.model_config())

    def forward(self, idx, targets):
        return lm_loss(self.net(idx), targets)


def gpt_shapes(cfg: GPTConfig) -> List[Tuple[int, ...]]:
    with torch.device("meta"):
        return [tuple(p.shape) for p in GPT(cfg).parameters()]


def many_small_shapes(count: int, max_numel: int, seed: int = 0) -> List[Tuple[int, ...]]:
    """``count`` 1-D tensors of 1..max_numel elements, log-uniform, seeded."""
    rng = random.Random(seed)
    top = math.log(max_numel)
    return [(max(1, min(max_numel, int(round(math.exp(rng.uniform(0.0, top)))))),)
            for _ in range(count)]


GPT2_SMALL = GPTConfig(vocab=50257, ctx=1024, d=768, layers=12, heads=12)     # 124M, 148 tensors
GPT2_XL = GPTConfig(vocab=50257, ctx=1024, d=1600, layers=48, heads=25)       # 1.56B, 580 tensors

# family -> (label prefix, shape spec) per size; a spec is a GPTConfig or (count, max_numel).
_SETS = {
    "full": {
        "gpt2": ("gpt2-small", GPT2_SMALL),
        "gpt2-mini": ("gpt2-mini", GPTConfig(4096, 256, 256, 2, 4)),
        "many-small": ("many-small-2000", (2000, 65536)),
        "gpt2-xl": ("gpt2-xl", GPT2_XL),
    },
    "small": {   # CPU: capped at ~10M parameters
        "gpt2": ("gpt2-small-scaled", GPTConfig(8192, 256, 192, 12, 4)),
        "gpt2-mini": ("gpt2-mini", GPTConfig(4096, 256, 256, 2, 4)),
        "many-small": ("many-small-2000", (2000, 16384)),
    },
    "tiny": {
        "gpt2": ("gpt2-tiny", GPTConfig(512, 64, 32, 12, 2)),
        "gpt2-mini": ("gpt2-mini-tiny", GPTConfig(256, 32, 32, 2, 2)),
        "many-small": ("many-small-200", (200, 4096)),
    },
}

# End-to-end model and batch per size: (config, batch, seq_len, warmup steps, timed steps).
E2E = {
    "full": (GPT2_SMALL, 8, 1024, 12, 40),
    "small": (GPTConfig(2048, 128, 128, 4, 4), 8, 128, 11, 20),
    "tiny": (GPTConfig(256, 32, 32, 2, 2), 4, 32, 11, 5),
}


def human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


@dataclass(frozen=True)
class SetSpec:
    family: str
    label: str               # e.g. gpt2-small-124M
    shapes: Tuple[Tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def set_specs() -> List[SetSpec]:
    wanted = [f.strip() for f in os.environ.get("ALSALS_BENCH_SETS", "").split(",") if f.strip()]
    table = _SETS[SIZE]
    if SMOKE and not wanted:
        wanted = ["gpt2"]
    known = {f for sizes in _SETS.values() for f in sizes}
    unknown = [f for f in wanted if f not in known]
    if unknown:   # families defined at other sizes only (gpt2-xl below full) are left out quietly
        raise ValueError(f"ALSALS_BENCH_SETS: {unknown} not among {sorted(known)}")
    out = []
    for family, (prefix, spec) in table.items():
        if wanted and family not in wanted:
            continue
        shapes = gpt_shapes(spec) if isinstance(spec, GPTConfig) else many_small_shapes(*spec)
        n = sum(math.prod(s) for s in shapes)
        out.append(SetSpec(family, f"{prefix}-{human(n)}", tuple(shapes)))
    return out


# -- materialized parameter sets (one alive at a time: the 1.5B set needs the memory) ----------
class ParamSet:
    """Parameters with fixed random gradients; every row builds its own optimizer state on them."""

    def __init__(self, spec: SetSpec, seed: int = 0):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.spec = spec
        self.params: List[nn.Parameter] = []
        for shape in spec.shapes:
            p = nn.Parameter(torch.randn(shape, device=DEVICE, generator=gen) * 0.02)
            p.grad = torch.randn(shape, device=DEVICE, generator=gen) * 1e-2
            self.params.append(p)

    @property
    def numel(self) -> int:
        return self.spec.numel


_live: Dict[str, ParamSet] = {}


def param_set(spec: SetSpec) -> ParamSet:
    if spec.label not in _live:
        _live.clear()
        free_memory()
        _live[spec.label] = ParamSet(spec)
    return _live[spec.label]


def free_memory() -> None:
    gc.collect()
    if IS_CUDA:
        torch.cuda.empty_cache()


# -- timing -------------------------------------------------------------------------------------
def sync() -> None:
    if IS_CUDA:
        torch.cuda.synchronize()


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """fn followed by a device sync, so that wall time covers the kernels it queued."""
    def run():
        fn()
        sync()
    return run


def run_rows(benchmark, fn: Callable[[], object], *, warmup: int = 2, budget_s: Optional[float] = None):
    """benchmark.pedantic with a round count that fits ROW_SECONDS (after ``warmup`` calls).

    CPU: one call per round (host and device are one).  CUDA: a round is ``calls_per_sync`` calls
    and one synchronization (``stats_of`` divides by it: wall time per call, host work included),
    then ``device_seconds`` times the same calls with CUDA events; both land in extra_info
    (``wall_s``, ``device_s``, ``wall_over_device``, ``calls_per_sync``)."""
    target = synced(fn)
    t = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        target()
        t = time.perf_counter() - start
    budget = ROW_SECONDS if budget_s is None else budget_s
    calls = calls_per_sync(t) if IS_CUDA else 1
    if calls > 1:
        def batch():
            for _ in range(calls):
                fn()
            sync()
        target = batch
    rounds = int(max(MIN_ROUNDS, min(MAX_ROUNDS, budget / max(t * calls, 1e-6))))
    benchmark.extra_info["calls_per_sync"] = calls
    result = benchmark.pedantic(target, rounds=rounds, warmup_rounds=0, iterations=1)
    if IS_CUDA:
        s = stats_of(benchmark)
        wall = s["median"] if s else t
        dev = device_seconds(fn, calls, wall)
        benchmark.extra_info.update(timing_info(wall, dev))
    return result


# Calls per synchronization on CUDA: enough that a batch takes BATCH_S (one sync and the host's
# wake-up are then a small share of it), within [CALLS_MIN, CALLS_MAX].
BATCH_S = float(os.environ.get("ALSALS_BENCH_BATCH_S") or 0.025)
CALLS_MIN, CALLS_MAX = 3, 100
DEVICE_BATCHES = int(os.environ.get("ALSALS_BENCH_DEVICE_BATCHES") or 3)


def calls_per_sync(seconds_per_call: float) -> int:
    return int(max(CALLS_MIN, min(CALLS_MAX, math.ceil(BATCH_S / max(seconds_per_call, 1e-7)))))


_spin_rate: List[float] = []   # torch.cuda._sleep cycles per second on this device


def _spin(seconds: float) -> None:
    """Queue a spin kernel of about ``seconds`` on the current stream (nothing where unsupported),
    so that the host can enqueue the timed calls while the device is still busy with it."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None or seconds <= 0:
        return
    if not _spin_rate:
        cycles = 2_000_000
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sleep(cycles)
        a.record()
        sleep(cycles)
        b.record()
        b.synchronize()
        _spin_rate.append(cycles / max(a.elapsed_time(b) / 1e3, 1e-6))
    sleep(int(min(seconds, 2.0) * _spin_rate[0]))


def device_seconds(fn: Callable[[], object], calls: int, wall_per_call: float,
                   batches: Optional[int] = None) -> Optional[float]:
    """Device time per call: the CUDA-event span of ``calls`` back-to-back calls / calls, median
    of ``batches``.  A spin kernel queued ahead of the start event (as long as the calls take on
    the host) lets the host enqueue them before the device reaches them, so the span is device
    work without host gaps.  A call that reads from the device (``.item()``, the verdict) makes
    the host wait there: its host work after the read stays in the span (device ~ wall)."""
    if not IS_CUDA:
        return None
    spans = []
    for _ in range(batches or DEVICE_BATCHES):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync()
        _spin(1.25 * wall_per_call * calls + 1e-3)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        spans.append(start.elapsed_time(end) / 1e3 / calls)
    spans.sort()
    return spans[len(spans) // 2]


def busy_seconds(fn: Callable[[], object], calls: int) -> Optional[float]:
    """Device busy time per call: the summed durations of the kernels and copies that ``calls``
    back-to-back calls ran (torch.profiler through CUPTI; one stream, so they do not overlap), or
    None off CUDA or when the profiler saw no device activity.  Unlike ``device_seconds``'s event
    span it leaves out the device's idle time while the host works after a read (the verdict),
    so rows that read and rows that do not compare as work."""
    if not IS_CUDA:
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    # Device events except record_function ranges' device-side spans (torch.optim's
    # "Optimizer.step#Adam.step" would count Adam's kernels twice), as torch's own totals do.
    total_us = sum(e.time_range.elapsed_us() for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    return total_us / 1e6 / calls if total_us > 0 else None


def busy_info(fn: Callable[[], object], calls: int = 5) -> dict:
    """extra_info fields: ``busy_s`` (``busy_seconds``), or ``busy_error`` if the profiler failed
    (a benchmark column, not worth a failed row)."""
    try:
        return {"busy_s": busy_seconds(fn, calls)}
    except Exception as exc:  # noqa: BLE001
        return {"busy_s": None, "busy_error": repr(exc)[:200]}


def timing_info(wall: Optional[float], device: Optional[float]) -> dict:
    """extra_info fields: wall and device seconds per call, their ratio and the host's share."""
    info = {"wall_s": wall, "device_s": device}
    if wall and device:
        info.update(wall_over_device=round(wall / device, 3),
                    host_overhead_s=max(0.0, wall - device))
    return info


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median seconds per call: device time on CUDA (CUDA events), wall time on CPU."""
    target = synced(fn)
    target()
    if IS_CUDA:
        start = time.perf_counter()
        target()
        return device_seconds(fn, max(3, reps), time.perf_counter() - start) or 0.0
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        target()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def stats_of(benchmark) -> Optional[dict]:
    """min/median/mean/stddev/rounds of a finished pytest-benchmark row (None when disabled), in
    seconds per call (a CUDA round of ``calls_per_sync`` calls is divided by it)."""
    meta = getattr(benchmark, "stats", None)
    s = getattr(meta, "stats", None) if meta else None
    if not s or not getattr(s, "data", None):
        return None
    calls = max(1, int(getattr(benchmark, "extra_info", {}).get("calls_per_sync") or 1))
    return {"min": s.min / calls, "median": s.median / calls, "mean": s.mean / calls,
            "stddev": s.stddev / calls, "rounds": s.rounds, "calls_per_round": calls}


def time_for_bandwidth(benchmark) -> Optional[float]:
    """Seconds per call that bandwidth is computed from: device time on CUDA (host work is its
    own column), the median wall time on CPU."""
    dev = getattr(benchmark, "extra_info", {}).get("device_s")
    if dev:
        return dev
    s = stats_of(benchmark)
    return s["median"] if s else None


# copy bandwidth per set label, GB/s: the reference every other row's GB/s is compared with.
_copy_gbps: Dict[str, float] = {}


def copy_buffers(numel: int) -> Tuple[torch.Tensor, torch.Tensor]:
    src = torch.randn(numel, device=DEVICE)
    return src, torch.empty_like(src)


def record_copy(label: str, numel: int, seconds: float) -> float:
    gbps = BYTES_PER_PARAM["copy"] * numel / seconds / 1e9
    _copy_gbps[label] = gbps
    return gbps


def copy_gbps(spec: SetSpec) -> float:
    """The copy row's bandwidth if it ran in this session, else a quick measurement now."""
    if spec.label not in _copy_gbps:
        src, dst = copy_buffers(spec.numel)
        record_copy(spec.label, spec.numel, median_time(lambda: dst.copy_(src), 10))
        del src, dst
    return _copy_gbps[spec.label]


def bandwidth_info(spec: SetSpec, kind: str, seconds: Optional[float]) -> dict:
    """extra_info fields: the ideal bytes of ``kind``, GB/s achieved and its fraction of copy."""
    per_param = BYTES_PER_PARAM[kind]
    info = {"bytes_per_param": per_param, "bytes_kind": kind}
    if seconds:
        gbps = per_param * spec.numel / seconds / 1e9
        ref = copy_gbps(spec)
        info.update(gbps=round(gbps, 2), copy_gbps=round(ref, 2), frac_copy=round(gbps / ref, 4))
    return info


# -- counters -----------------------------------------------------------------------------------
def count_syncs(fn: Callable[[], object], steps: int) -> Optional[float]:
    """Host syncs per call of fn on CUDA (torch's sync debug mode, warnings captured); None on CPU."""
    if not IS_CUDA:
        return None
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    n = sum("synchroniz" in str(w.message).lower() for w in caught)
    return n / steps


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def state_bytes_per_param(opt, numel: int) -> float:
    """Persistent optimizer memory per parameter: its state tensors plus ALSALS's w0 backups."""
    total = sum(tensor_bytes(s) for s in opt.state.values())
    total += tensor_bytes(list(getattr(opt, "_backups", {}).values()))
    return round(total / numel, 3)
