"""The optimizer's hot path on the host: device operations and host microseconds per step.

    python benchmarks/hot_path.py --json          # the last line of output is a JSON list
    python benchmarks/hot_path.py --variant alsals_plateau --json     # another variant's rows

The measurement behind the hot-path targets, runnable on a CPU.  For every backend whose host
code can run here (reference and foreach for real; triton with its kernel launches stubbed through
the ``TritonBackend._launch`` hook; cuda from its host-side launch description), at GPT-2 small's tensor
count (148 tensors, GPT-2's layout at d=32) and GPT-2 XL's (580 tensors, d=16):

- ``ops_searching_step`` (``--variant``, default ``ALSALS()``'s; first trial accepted), ``ops_extra_trial`` and
  ``ops_nonsearching_step``: aten operations dispatched during ``opt.step()`` outside the closure
  and its backward (a ``TorchDispatchMode``; view, alias, detach and profiler record_function
  operations excluded), plus the backend's own kernel launches, plus every device-to-host read
  (``.item()``/``.tolist()``/... of a non-pinned tensor, one each; on CUDA the verdict's copy to
  its pinned buffer is the aten copy).  No clipping, no ``buffers=``, one process.
- ``host_us_searching_step``/``host_us_nonsearching_step``: median over ``--steps`` (>= 200)
  steps of the wall time of ``opt.step()`` minus the closure and its backward, with fresh
  gradients every step (``zero_grad(set_to_none=True)``).  The harness keeps the loss step()
  returns, as a training loop does (``loss = opt.step(closure)``), so the closure's spent autograd
  graph is released where the loop drops it, not inside the timed step (step() returns the
  closure's loss as torch's optimizers do; releasing that graph costs about 45 us at 148 tensors
  and 200 us at 580 here, the price of the user's graph rather than of the optimizer).  For
  reference and foreach on a CPU this includes the passes' arithmetic (host and device are one);
  for triton the launches are stubbed, so it is the host work alone (the time the stubs spend
  filling what the kernels would write, in torch ops on the CPU, is device work in a real run
  and is subtracted).  The stub replaces ``kernel[grid](...)`` itself, so these figures leave
  out Triton's own per-launch Python cost on a GPU (its JIT launcher binds the arguments,
  computes the specialization key and looks up the compiled kernel in Python at every launch:
  4 launches per searching step, 2 per non-searching one); not measured here (no GPU).
  For ``alsals_plateau`` the rows are its steps between plateau tests; a step that tests (every
  10th once 50 losses are kept) adds one stack and one read, which the medians leave out
  (``tests/test_plateau.py`` counts them).
- ``host_us_harness_floor``: the same measurement of an optimizer whose ``step()`` only runs
  the closure (with grad enabled) and its backward: the harness's own share of the host rows
  (its closure and backward wrappers, the call into ``step()``), which they include (it is not
  subtracted; it is reported so that the optimizer's part can be read off).
- ``host_us_tensor_reads`` (triton rows): the median time of the per-tensor reads alone (params'
  addresses, grads, grads' addresses and shapes) in Python, right after the same backward: what
  the plan's gradient read costs without the C++ host helper.  ``grad_reads`` says which read the
  rows used: "native" (``alsals_fused._host``, built by ``pip install --no-build-isolation -e .``)
  or "python" (not built, or ``ALSALS_FUSED_PYTHON_READS=1``).

Trial losses are chosen by the harness so the control path is the one measured: the gradient
forward's loss has a real quadratic's gradient and the value minus the number of gradient
forwards so far (a loss that keeps falling, so alsals_plateau's plateau test never ends its
searches); a trial returns L0 - 1e12 (accepted) or nan (rejected).  With
stubbed launches, the stub fills what the kernels would have written (``decisions.py`` on the
same tensors, with counting paused), so the driver takes the same path as in a real run.
"""
from __future__ import annotations

import argparse
import collections
import json
import operator
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch

# The harness's tensors are on the CPU, where the Triton backend's host code runs under the
# interpreter: as a script also on a GPU machine (imported by a test there, its triton rows skip).
if __name__ == "__main__" or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from alsals_fused import ALSALS  # noqa: E402
from alsals_fused.backends import available_backends  # noqa: E402
from alsals_fused.config import DEFAULT_VARIANT, VARIANTS  # noqa: E402

KEYS = ("backend", "tensors", "ops_searching_step", "ops_extra_trial", "ops_nonsearching_step",
        "host_us_searching_step", "host_us_nonsearching_step")
EXCLUDED = {"detach", "alias", "lift_fresh", "_local_scalar_dense", "view", "_unsafe_view",
            "_record_function_enter_new", "_record_function_exit"}
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
COUNTER: list = [None]   # the active OpCounter (None: not counting), read by the launch stubs
STUB_FILL_S = [0.0]      # seconds the stubs spent filling what the kernels would write
SETS = {148: dict(n_layer=12, d=32, vocab=256, ctx=32), 580: dict(n_layer=48, d=16, vocab=128, ctx=16)}


def gpt2_shapes(n_layer: int, d: int, vocab: int, ctx: int) -> List[tuple]:
    """GPT-2's parameter layout: wte, wpe, 12 tensors per block, the final LayerNorm."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
                   (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


class OpCounter(TorchDispatchMode):
    """Counts aten operations (not views/aliases) and device-to-host reads while not paused."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.reads = 0
        self.launches = 0
        self.paused = 0
        self.names: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if not self.paused and not getattr(func, "is_view", False) and name not in EXCLUDED:
            self.ops += 1
            self.names[name] += 1
        return out

    @property
    def total(self) -> int:
        return self.ops + self.reads + self.launches

    @contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    @contextmanager
    def counting_reads(self):
        originals = {n: getattr(torch.Tensor, n) for n in READS}

        def wrap(orig):
            def read(t, *a, **k):
                with self.pause():
                    host = t.is_pinned()
                    if not self.paused - 1 and not host:
                        self.reads += 1
                        self.names["<device-to-host read>"] += 1
                    return orig(t, *a, **k)
            return read
        for n, f in originals.items():
            setattr(torch.Tensor, n, wrap(f))
        try:
            yield
        finally:
            for n, f in originals.items():
                setattr(torch.Tensor, n, f)


class Harness:
    """Parameters at the given shapes and a quadratic loss; the closure and backward are timed
    (to be subtracted) and paused in the counter; trial losses follow ``self.plan``."""

    def __init__(self, backend: str, shapes: List[tuple], counter_box: list, **kw):
        gen = torch.Generator().manual_seed(0)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        self.opt = ALSALS(self.params, backend=backend, **kw)
        self.box = counter_box                  # [OpCounter or None], shared with the stubs
        self.plan: List[bool] = []
        self.user_s = 0.0
        self.l0 = 0.0
        self.loss = None
        self.gradient_forwards = 0

    def user(self, fn: Callable):
        """Run closure/backward work: paused in the counter, its time subtracted."""
        t0 = time.perf_counter()
        counter = self.box[0]
        try:
            if counter is None:
                return fn()
            with counter.pause():
                return fn()
        finally:
            self.user_s += time.perf_counter() - t0

    def closure(self):
        def body():
            if torch.is_grad_enabled():
                self.gradient_forwards += 1
                quadratic = 0.5 * sum((p * p).sum() for p in self.params)
                loss = quadratic - quadratic.detach() - float(self.gradient_forwards)
                self.l0 = float(loss.detach())
                return loss
            ok = self.plan.pop(0) if self.plan else True
            return torch.tensor(self.l0 - 1e12 if ok else float("nan"))
        return self.user(body)

    def step(self, plan=()) -> float:
        """One step; returns the seconds spent outside the closure and its backward."""
        self.plan = list(plan)
        self.opt.zero_grad(set_to_none=True)
        self.loss = None        # as a loop rebinding `loss`: the last step's spent graph goes here
        self.user_s = 0.0
        STUB_FILL_S[0] = 0.0
        t0 = time.perf_counter()
        self.loss = self.opt.step(self.closure)
        return time.perf_counter() - t0 - self.user_s - STUB_FILL_S[0]


@contextmanager
def backward_excluded(harness_box: list):
    original = torch.Tensor.backward

    def backward(self, *a, **k):
        return harness_box[0].user(lambda: original(self, *a, **k))
    torch.Tensor.backward = backward
    try:
        yield
    finally:
        torch.Tensor.backward = original


def count(h: Harness, plan) -> OpCounter:
    counter = OpCounter()
    h.box[0] = counter
    try:
        with counter.counting_reads(), counter:
            h.step(plan)
    finally:
        h.box[0] = None
    return counter


# -- launch stubs ------------------------------------------------------------------------------

def stub_triton(counter_box: list, setattr=setattr) -> Optional[str]:
    """Replace the Triton backend's launches by a counter; None, or why it cannot be done.

    ``setattr`` may be pytest's ``monkeypatch.setattr`` (so a test can undo the stubs)."""
    reason = available_backends("cpu")["triton"]        # Harness builds its tensors on the CPU
    if reason is not None:
        return f"the triton backend is unavailable here: {reason}"
    from alsals_fused.backends import decisions, triton_backend
    cls = triton_backend.TritonBackend
    if not hasattr(cls, "_launch"):
        return "TritonBackend has no _launch hook yet (contract v2 backend not merged)"

    def launch(self, kernel, grid, *args, **kwargs):
        counter = counter_box[0]
        if counter is not None and not counter.paused:
            counter.launches += 1
            counter.names[f"<launch {getattr(getattr(kernel, 'fn', kernel), '__name__', kernel)}>"] += 1
        return None

    def filled(method_name: str, fill: Callable):
        original = getattr(cls, method_name)

        def wrapper(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            counter = counter_box[0]
            t0 = time.perf_counter()
            if counter is None:
                fill(*args, **kwargs)
            else:
                with counter.pause():
                    fill(*args, **kwargs)
            STUB_FILL_S[0] += time.perf_counter() - t0   # stands in for device work: not host time
            return result
        return wrapper

    def fill_grad(buckets, ctl, loss0, hp, *, finish=True):
        if finish:   # what the grad finisher writes, for a finite gradient of norm 1
            decisions.finish_grad(ctl, torch.ones((), dtype=torch.float64, device=ctl.device),
                                  loss0, hp.max_grad_norm)

    def fill_step(buckets, hp, ctl, *, searching, write_backup, finish=True):
        if searching and finish:   # a descent slope: no fallback
            decisions.finish_slope(ctl, torch.ones(2, dtype=torch.float64, device=ctl.device),
                                   hp.smoothing)

    def fill_update(buckets, ctl, loss0, hp, *, searching, write_backup):
        fill_grad(buckets, ctl, loss0, hp)
        fill_step(buckets, hp, ctl, searching=searching, write_backup=write_backup)

    def fill_verdict(ctl, loss_try, dp, out):
        decisions.verdict(ctl, loss_try, dp, out)

    setattr(cls, "_launch", launch)
    setattr(cls, "grad_pass", filled("grad_pass", fill_grad))
    setattr(cls, "step_pass", filled("step_pass", fill_step))
    setattr(cls, "update_pass", filled("update_pass", fill_update))
    setattr(cls, "verdict", filled("verdict", fill_verdict))
    return None


def cuda_row(tensors: int, variant: str = DEFAULT_VARIANT) -> Dict:
    """The cuda backend's launch description: launches per pass and extension calls per step (its
    torch ops on the host and its host time need the extension, i.e. a GPU)."""
    row = {k: None for k in KEYS}
    row.update(backend="cuda", tensors=tensors, variant=variant)
    try:
        from alsals_fused.backends import cuda_tools
    except Exception as exc:  # noqa: BLE001 (any import failure is reported, not raised)
        row["note"] = f"cuda_tools not importable: {exc}"
        return row
    numels = [int(torch.Size(s).numel()) for s in gpt2_shapes(**SETS[tensors])]
    described = cuda_tools.describe_launches(numels, torch.float32)
    launches = described.get("launches") if isinstance(described, dict) else None
    row["launches_per_pass"] = launches
    row["programs"] = described.get("programs") if isinstance(described, dict) else None
    per_step = cuda_tools.extension_calls_per_step
    row["extension_calls_searching_step"] = per_step(searching=True, trials=1, variant=variant)
    row["extension_calls_nonsearching_step"] = per_step(searching=False, variant=variant)
    if isinstance(launches, dict):
        def n(name):
            v = launches.get(name)
            return None if v is None else int(v)
        g, s, m, v = n("grad_pass"), n("step_pass"), n("move_pass"), n("verdict")
        if None not in (g, s, m, v):
            # grad pass, step pass, the fallback fix-up move, the verdict, the verdict's D2H copy
            row["ops_searching_step"] = g + s + m + v + 1
            row["ops_extra_trial"] = m + v + 1
            row["ops_nonsearching_step"] = g + s
    row["note"] = ("launches from cuda_tools.describe_launches (no torch ops counted: needs the extension); "
                   "host time needs a GPU")
    return row


# -- rows --------------------------------------------------------------------------------------

def op_counts(backend: str, shapes: List[tuple], **kw) -> Dict:
    """Device operations of a searching step (first trial accepted), of an extra trial and of a
    non-searching step, with the counted op names (no timing: usable from tests)."""
    hbox: list = [None]
    with backward_excluded(hbox):
        h = hbox[0] = Harness(backend, shapes, COUNTER, line_search_every=1, **kw)
        for _ in range(3):
            h.step([True])
        one = count(h, [True])
        two = count(h, [False, True])
        assert h.opt.last_step.trials == 2, h.opt.last_step
        h = hbox[0] = Harness(backend, shapes, COUNTER, line_search_every=10 ** 9, **kw)
        for _ in range(3):
            h.step([True])
        assert not h.opt.last_step.searched
        zero = count(h, [])
    return {"variant": h.opt.hyper.variant,
            "ops_searching_step": one.total, "ops_extra_trial": two.total - one.total,
            "ops_nonsearching_step": zero.total,
            "detail": {"searching": dict(one.names), "extra_trial": dict(two.names - one.names),
                       "nonsearching": dict(zero.names)}}


def median_step_us(h: Harness, steps: int) -> float:
    """Median host microseconds of ``steps`` steps of ``h`` (each trial accepted), after 3 warm-up steps."""
    for _ in range(3):
        h.step([True])
    return round(statistics.median(h.step([True]) for _ in range(steps)) * 1e6, 1)


def host_times(backend: str, shapes: List[tuple], steps: int, **kw) -> Dict:
    """Median host microseconds per searching and per non-searching step (every timed step
    checked to be of its kind: alsals_plateau stops searching after its first drop)."""
    hbox: list = [None]
    out = {}
    with backward_excluded(hbox):
        for key, every in (("host_us_searching_step", 1), ("host_us_nonsearching_step", 10 ** 9)):
            h = hbox[0] = Harness(backend, shapes, COUNTER, line_search_every=every, **kw)
            out[key] = median_step_us(h, steps)
            searches = h.opt.counters["searches"]
            expected = steps + 3 if every == 1 else 1       # the first step searches
            assert searches == expected, (key, searches, expected)
    return out


class _ClosureOnly(torch.optim.Optimizer):
    """The harness floor: step() runs the closure and its backward, nothing else."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure):
        grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        try:
            loss = closure()
        finally:
            torch.set_grad_enabled(grad_mode)
        loss.backward()
        return loss
    step.hooked = True        # not wrapped by torch's profiling hook (ALSALS.step is not either)


def harness_floor(shapes: List[tuple], steps: int) -> float:
    """Median host microseconds of a step of ``_ClosureOnly`` in the same harness (measured for
    every row, right after it: the machine's speed drifts between rows)."""
    hbox: list = [None]
    with backward_excluded(hbox):
        h = hbox[0] = Harness("foreach", shapes, COUNTER)
        h.opt = _ClosureOnly(h.params)
        return median_step_us(h, steps)


def reads_floor(shapes: List[tuple], steps: int) -> float:
    """Median host microseconds of the per-tensor reads any step of the persistent plan makes,
    timed alone right after the same backward: the params' addresses (a storage that moved),
    their grads, the grads' addresses and shapes (the reads ``_Plan.refresh_grads`` makes; each
    is one torch method call per tensor, and the first ones after a backward run on cold caches).
    This is the part of the host time that is proportional to the tensor count in Python."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    data_ptr, shape = torch.Tensor.data_ptr, operator.attrgetter("shape")
    ptrs, shapes_now = tuple(map(data_ptr, params)), [p.shape for p in params]
    times = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = 0.5 * sum((p * p).sum() for p in params)
        loss.backward()
        t0 = time.perf_counter()
        same = tuple(map(data_ptr, params)) == ptrs
        grads = [p.grad for p in params]
        grad_ptrs = tuple(map(data_ptr, grads))
        same = same and list(map(shape, grads)) == shapes_now and len(grad_ptrs) == len(params)
        times.append(time.perf_counter() - t0)
        assert same
        del grads, loss
    return round(statistics.median(times) * 1e6, 1)


def measure(backend: str, tensors: int, steps: int, variant: str = DEFAULT_VARIANT) -> Dict:
    shapes = gpt2_shapes(**SETS[tensors])
    row: Dict = {"backend": backend, "tensors": tensors}
    counts = op_counts(backend, shapes, variant=variant)      # names the variant it ran
    row.update(counts)
    row.update(host_times(backend, shapes, steps, variant=variant))
    row["host_us_harness_floor"] = harness_floor(shapes, steps)
    if backend == "triton":
        from alsals_fused import host_ext
        row["host_us_tensor_reads"] = reads_floor(shapes, steps)
        row["grad_reads"] = host_ext.status()     # native (C++ host helper) or python
        row.setdefault("note", "grad reads: " + row["grad_reads"].split(" (")[0])
    row["detail"] = row.pop("detail")
    return row


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="end with the rows as one JSON line")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per row (>= 200 for the issue)")
    parser.add_argument("--backends", default="reference,foreach,triton,cuda")
    parser.add_argument("--tensors", default="148,580")
    parser.add_argument("--detail", action="store_true", help="print the counted op names per row")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=VARIANTS,
                        help="the variant measured, with its defaults (default: ALSALS()'s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: List[Dict] = []
    for backend in args.backends.split(","):
        for tensors in (int(t) for t in args.tensors.split(",")):
            if backend == "cuda":
                rows.append(cuda_row(tensors, args.variant))
                continue
            if backend == "triton":
                why = stub_triton(COUNTER)
                if why is not None:
                    rows.append(dict({k: None for k in KEYS}, backend="triton", tensors=tensors,
                                     variant=args.variant, note=why))
                    continue
            rows.append(measure(backend, tensors, args.steps, args.variant))
    cols = KEYS + ("host_us_harness_floor", "host_us_tensor_reads")
    print(f"variant: {args.variant}")
    print("| " + " | ".join(cols) + " | note |")
    print("|" + "---|" * (len(cols) + 1))
    for r in rows:
        print("| " + " | ".join("-" if r.get(k) is None else str(r[k]) for k in cols) + f" | {r.get('note', '')} |")
        if args.detail and "detail" in r:
            print(f"    {r['backend']} {r['tensors']}: {r['detail']}")
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "detail"} for r in rows]))
    return rows


if __name__ == "__main__":
    main()
