"""The CUDA backend: contract v2 (``base.py``) as hand-written CUDA kernels (``csrc/``, module
``alsals_fused._C``).

Design (one design with the Triton backend, in two languages): every bucket gets, once, a device
table (int64 ``[T, TABLE_COLS]``, columns ``TableCol``) and a schedule (int32 ``[P, 2]``: table
row and chunk index of each program; ``CHUNK`` elements per program).  Each pass is ONE call of
a ``torch.ops.alsals_fused`` op with those few tensors (not the parameter lists), which launches
one kernel per bucket (one per pass in the usual single-dtype case); the sums are fp32 partials
per chunk, added in float64 in a fixed order by the program that arrives last (a ticket), which
also runs the finisher, so the grad finisher, step finisher and verdict run on the device
without extra launches.  ``plan_launches`` says, on any machine, what the kernels will launch.

Caching: the tables live in ``bucket.cache["cuda"]`` (``host_table.HostTable``, the Triton
backend's class: one layout, one upload scheme); the gradient column is rewritten on the host (or
by the driver's native reader, through ``grad_sink``) and uploaded with one non-blocking copy
only when ``bucket.grads_version`` moved, i.e. when gradients freed by
``zero_grad(set_to_none=True)`` came back at other addresses.  The tables hold raw addresses: the
cache keeps params, moments and backups alive; gradients are read only inside a pass.

fp64 parameters are not handled by the kernels (``supports`` is False): the optimizer routes them
to foreach.  A bucket whose layout the kernels do not take (a gradient with other strides than
its parameter, a non-dense view) runs its passes on foreach.

Loading: ``import alsals_fused._C`` (built by ``pip install --no-build-isolation -e .``).  If it
is missing and ``ALSALS_FUSED_JIT=1``, it is compiled on first use with
``torch.utils.cpp_extension.load`` from the repository's ``csrc/`` (settings in
``csrc/build_settings.py``); a failed build is not retried in the same process.  Without
``ALSALS_FUSED_JIT=1`` a JIT build that finished earlier (torch's build folder, newer than every
source) is loaded as it is (``finished_jit_build``): the GPU suite turns JIT off after a cut build
phase, and an extension built before the cut stays usable.

``python -m alsals_fused.backends.cuda_backend --write-header`` regenerates
``csrc/alsals_layout.h`` (the constants of ``base.py`` for C++); ``--check-header`` checks it;
``--plan N`` prints ``plan_launches`` for N fp32 tensors of GPT-2-like sizes.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import struct
import threading
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, cast

import torch
from torch import Tensor

from .._source_tree import CSRC, build_settings, finished_jit_build
from .base import (
    CHUNK,
    CTL_SIZE,
    TABLE_COLS,
    VERDICT_SIZE,
    Bucket,
    Ctl,
    DecisionScalars,
    Dir,
    StepScalars,
    TableCol,
    Verdict,
)
from .host_table import HostTable

OPS = ("grad_pass", "step_pass", "move_pass", "verdict")
BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` in an environment with a CUDA "
              "build of torch and a CUDA toolkit, or set ALSALS_FUSED_JIT=1 to compile it on first use")

# Launch geometry of csrc/kernels.cu (checked against the built module: ext.THREADS).
THREADS = 256          # threads per program
VECTOR_BYTES = 16      # bytes per access on the vector path
_STORAGE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # passes.h ScalarCode
_ELEMENT_SIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}
_MAX_PROGRAMS = 2 ** 31 - 1
_SCRATCH = "cuda:scratch"   # bucket.cache key of a bucket list's partials and tickets

LAYOUT_HEADER = CSRC / "alsals_layout.h"


# ---- the layout header (base.py -> C++) ---------------------------------------------------
def _layout_body() -> List[str]:
    lines = [f"constexpr int CHUNK = {CHUNK};", f"constexpr int CTL_SIZE = {CTL_SIZE};",
             f"constexpr int VERDICT_SIZE = {VERDICT_SIZE};", f"constexpr int TABLE_COLS = {TABLE_COLS};"]
    for enum in (Ctl, Verdict, Dir, TableCol):
        members = " ".join(f"{m.name} = {int(m)}," for m in enum)
        lines.append(f"namespace {enum.__name__} {{ enum : int {{ {members} }}; }}")
    return lines


def layout_digest() -> str:
    return hashlib.sha256("\n".join(_layout_body()).encode()).hexdigest()[:16]


def layout_header() -> str:
    """The text of csrc/alsals_layout.h, generated from base.py."""
    return "\n".join([
        "// GENERATED from alsals_fused/backends/base.py by",
        "//   python -m alsals_fused.backends.cuda_backend --write-header",
        "// Do not edit: tests/test_cuda.py checks that it is current.  The names are base.py's",
        "// (Ctl::SCALE is Ctl.SCALE); LAYOUT_DIGEST lets the Python backend refuse a stale build.",
        "#pragma once",
        "",
        "namespace alsals {",
        *_layout_body(),
        f'constexpr const char* LAYOUT_DIGEST = "{layout_digest()}";',
        "}  // namespace alsals",
        "",
    ])


# ---- the launch planner (host only, runs anywhere) ------------------------------------------
def chunks_of(numel: int) -> int:
    return -(-int(numel) // CHUNK)


def build_schedule(numels: Sequence[int]) -> Tensor:
    """int32 [P, 2] (table row, chunk index) for one bucket, rows in tensor order; an all-empty
    bucket gets one row (-1, 0) (a program with no work, so the finishers still run)."""
    counts = torch.tensor([chunks_of(n) for n in numels], dtype=torch.int64)
    total = int(counts.sum()) if len(numels) else 0
    if total == 0:
        return torch.tensor([[-1, 0]], dtype=torch.int32)
    if total > _MAX_PROGRAMS:
        raise ValueError(f"{total} chunks of {CHUNK} elements: more programs than one launch holds")
    rows = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    chunk = torch.arange(total, dtype=torch.int64) - first[rows]
    return torch.stack([rows, chunk], 1).to(torch.int32)


def plan_launches(numels: Iterable[int], dtype: torch.dtype = torch.float32) -> Dict[str, object]:
    """What the extension launches for one bucket of tensors with these element counts.

    Host arithmetic only (no extension, no GPU).  Keys: ``tensors``, ``empty_tensors``,
    ``chunk``, ``chunks`` (per tensor), ``programs`` (grid of each pass), ``full_chunks`` and
    ``tail_chunks`` (vector path when aligned / scalar loop), ``launches`` and
    ``extension_calls`` per pass, ``partials`` per summing pass (fp32), ``table_bytes``,
    ``sched_bytes``, ``max_numel`` and ``int64_offsets`` (element offsets are int64, so tensors
    above 2**31 elements need no split), and the per-thread vector loop of each pass
    (``elements_per_access``, ``groups_per_thread``, ``loads_in_flight``: 16-byte accesses a
    thread issues before it uses the first).
    """
    numels = [int(n) for n in numels]
    if any(n < 0 for n in numels):
        raise ValueError("negative numel")
    if dtype not in _STORAGE:
        raise ValueError(f"the CUDA kernels take float32, bfloat16 and float16, not {dtype}")
    chunks = [chunks_of(n) for n in numels]
    total = sum(chunks)
    programs = max(1, total)
    if programs > _MAX_PROGRAMS:
        raise ValueError(f"{programs} programs exceed one launch's grid")
    esize = _ELEMENT_SIZE[dtype]
    vec = VECTOR_BYTES // esize                     # param elements per 16-byte access
    groups = CHUNK // (THREADS * vec)               # accesses per thread per tensor of params
    fp32_per_group = max(1, vec * 4 // VECTOR_BYTES)  # 16-byte accesses of m (or v) per group
    full = sum(n // CHUNK for n in numels)
    one = {"grad_pass": 1, "step_pass": 1, "move_pass": 1, "verdict": 1}
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "tensors": len(numels),
        "empty_tensors": sum(1 for n in numels if n == 0),
        "elements": sum(numels),
        "chunk": CHUNK,
        "chunks": chunks,
        "programs": programs,
        "full_chunks": full,
        "tail_chunks": total - full,
        "launches": dict(one),
        "extension_calls": dict(one),
        "partials": {"grad_pass": programs, "step_pass": 2 * programs},
        "table_bytes": 8 * TABLE_COLS * len(numels),
        "sched_bytes": 8 * programs,
        "max_numel": max(numels, default=0),
        "int64_offsets": True,
        "threads_per_program": THREADS,
        "vector_bytes": VECTOR_BYTES,
        "elements_per_access": vec,
        "groups_per_thread": groups,
        "loads_in_flight": {"grad_pass": groups,                                   # g
                            "step_pass": groups * (2 + 2 * fp32_per_group),        # g, w, m, v
                            "move_pass": groups * (2 + 2 * fp32_per_group)},       # v, w0, m|g
    }


def extension_calls_per_step(*, searching: bool, trials: int = 1, accepted: bool = True,
                             variant: str = "alsals") -> Dict[str, int]:
    """Extension calls (= kernel launches with one bucket) of one optimizer step as the v2
    driver issues the passes, and the device-to-host copies (one per trial).

    Not searching: grad_pass + step_pass.  Searching, k trials: grad_pass, step_pass, k
    verdicts, k-1 moves between trials, then for alsals the fallback fix-up move after the step
    pass (a no-op on the device without fallback; the accepted trial point is the update), for
    adam_sls/salsa the update from w0 once accepted; a step rejected after its trials restores
    w0 with one more move.  So alsals, first trial accepted: 4 calls + 1 copy = 5 device ops;
    each extra trial: 2 calls + 1 copy; not searching: 2 calls.
    """
    if not searching:
        calls = {"grad_pass": 1, "step_pass": 1, "move_pass": 0, "verdict": 0}
        calls["total"] = 2
        calls["d2h_copies"] = 0
        return calls
    if trials < 1:
        raise ValueError("a searching step makes at least one trial")
    moves = (trials - 1) + (1 if variant == "alsals" else 0) + \
        (0 if variant == "alsals" and accepted else 1)
    calls = {"grad_pass": 1, "step_pass": 1, "move_pass": moves, "verdict": trials}
    calls["total"] = sum(calls.values())
    calls["d2h_copies"] = trials
    return calls


# ---- loading the extension ----------------------------------------------------------------
_lock = threading.Lock()
_module = None
_load_error: Optional[str] = None
_loaded = False
_jit_failed: Optional[str] = None   # a failed JIT build is not retried in this process
JIT_NAME = "alsals_fused_jit_C"     # the JIT build's module name (and its build folder's)


def _jit_build():
    """Compile csrc/ with torch.utils.cpp_extension.load (ALSALS_FUSED_JIT=1)."""
    settings = build_settings()
    home = settings.ensure_cuda_home()
    import torch.utils.cpp_extension as cpp
    if home is not None and not settings.is_toolkit(Path(cpp.CUDA_HOME or "")):
        cpp.CUDA_HOME = str(home)   # cpp_extension was imported before with its own guess
    return cpp.load(name=JIT_NAME, verbose=bool(os.environ.get("ALSALS_FUSED_JIT_VERBOSE")),
                    **settings.jit_kwargs())


def _jit_depends() -> List[Path]:
    """The files a JIT build of the extension is made from (sources, headers, its settings)."""
    try:
        settings = build_settings()
    except ImportError:          # no source checkout: nothing to compare a build with
        return [CSRC / "build_settings.py"]
    return [CSRC / "build_settings.py", *(CSRC / n for n in (*settings.SOURCES, *settings.HEADERS))]


def _check_module(module) -> Optional[str]:
    missing = [op for op in OPS if not hasattr(torch.ops.alsals_fused, op)]
    if missing:
        return f"the extension loaded but does not register {missing}; rebuild it ({BUILD_HINT})"
    digest = getattr(module, "LAYOUT_DIGEST", None)
    if digest != layout_digest() or getattr(module, "THREADS", None) != THREADS:
        return ("the extension was built from another csrc/alsals_layout.h than base.py's layout "
                f"(digest {digest} vs {layout_digest()}); rebuild it ({BUILD_HINT})")
    return None


def load_extension():
    """The extension module, or None (the reason is in ``_load_error``).  Loaded once."""
    global _module, _load_error, _loaded, _jit_failed
    if _loaded:
        return _module
    with _lock:
        if _loaded:
            return _module
        try:
            try:
                _module = importlib.import_module("alsals_fused._C")
            except ImportError as exc:
                _load_error = f"the extension alsals_fused._C is not built ({exc}); {BUILD_HINT}"
                if os.environ.get("ALSALS_FUSED_JIT") != "1":
                    # a JIT build another process finished (e.g. before the GPU suite cut its
                    # build phase and turned JIT off) is used as it is
                    _module = finished_jit_build(JIT_NAME, _jit_depends())
                    if _module is not None:
                        _load_error = None
                elif _jit_failed is not None:
                    _load_error = _jit_failed
                else:
                    try:
                        _module = _jit_build()
                        _load_error = None
                    except BaseException as jit_exc:  # compiler missing, build error, interrupt
                        _jit_failed = (f"the extension alsals_fused._C is not built and the JIT "
                                       f"build (ALSALS_FUSED_JIT=1) failed: {jit_exc}; not "
                                       "retried in this process")
                        _load_error = _jit_failed
                        if not isinstance(jit_exc, Exception):
                            raise
            if _module is not None:
                problem = _check_module(_module)
                if problem is not None:
                    _load_error, _module = problem, None
        finally:
            _loaded = True
        return _module


def unavailable_reason(device) -> Optional[str]:
    """None when the extension loads and ``device`` is a CUDA device, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"the CUDA backend runs on CUDA GPUs only and the parameters are on {device}; "
                "use backend='foreach' (or 'auto') there")
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)"
    if load_extension() is None:
        return _load_error
    return None


# ---- per-bucket tables --------------------------------------------------------------------
def _dense(t: Tensor) -> bool:
    """True if ``t`` covers exactly numel consecutive elements of memory (any dim order)."""
    if t.numel() <= 1 or t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(x: Tensor, ref: Tensor) -> bool:
    if x.numel() <= 1 or (x.is_contiguous() and ref.is_contiguous()):
        return True
    def strides(t: Tensor) -> tuple:
        return tuple(st for s, st in zip(t.shape, t.stride(), strict=True) if s != 1)

    return _dense(x) and _dense(ref) and x.shape == ref.shape and strides(x) == strides(ref)


def _wd_bits(wd: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(wd)))[0]


class _Table:
    """The device table and schedule of one bucket (kept in ``bucket.cache['cuda']``)."""

    __slots__ = ("host_table", "table", "sched", "programs", "storage", "has_backups",
                 "grads_version", "usable", "why_not", "keep")

    def __init__(self, bucket: Bucket):
        self.grads_version = bucket.grads_version
        self.storage = _STORAGE.get(bucket.dtype, -1)
        self.has_backups = bool(bucket.backups)
        self.why_not = self._check(bucket)
        self.usable = self.why_not is None
        self.keep = (list(bucket.params), list(bucket.exp_avgs), list(bucket.exp_avg_sqs),
                     list(bucket.backups))
        numels = [p.numel() for p in bucket.params]
        rows = []
        for i, p in enumerate(bucket.params):
            row = [0] * TABLE_COLS
            if self.usable and numels[i]:
                row[TableCol.W] = p.data_ptr()
                row[TableCol.G] = bucket.grads[i].data_ptr()
                row[TableCol.M] = bucket.exp_avgs[i].data_ptr()
                row[TableCol.V] = bucket.exp_avg_sqs[i].data_ptr()
                row[TableCol.BACKUP] = bucket.backups[i].data_ptr() if self.has_backups else 0
            row[TableCol.NUMEL] = numels[i]
            row[TableCol.WD_BITS] = _wd_bits(bucket.weight_decays[i])
            rows.append(row)
        # The Triton backend's table class: one layout and one upload scheme for both backends.
        self.host_table = HostTable(rows, bucket.device)
        self.table = self.host_table.table
        sched = build_schedule(numels)
        self.programs = sched.shape[0]
        self.sched = _upload(sched, bucket.device)

    @staticmethod
    def _check(b: Bucket) -> Optional[str]:
        if b.dtype not in _STORAGE:
            return f"dtype {b.dtype}"
        n = len(b.params)
        for name in ("grads", "exp_avgs", "exp_avg_sqs", "weight_decays"):
            if len(getattr(b, name)) != n:
                return f"{len(getattr(b, name))} {name} for {n} params"
        if b.backups and len(b.backups) != n:
            return f"{len(b.backups)} backups for {n} params"
        for i, p in enumerate(b.params):
            if not _dense(p):
                return f"param {i} (shape {tuple(p.shape)}, strides {p.stride()}) is not dense"
            others = [("grad", b.grads[i], b.dtype), ("exp_avg", b.exp_avgs[i], torch.float32),
                      ("exp_avg_sq", b.exp_avg_sqs[i], torch.float32)]
            if b.backups:
                others.append(("backup", b.backups[i], b.dtype))
            for name, x, dt in others:
                if x.dtype != dt or x.numel() != p.numel() or x.device != p.device:
                    return f"{name} {i} is {x.dtype} with {x.numel()} elements on {x.device}"
                if not _same_layout(x, p):
                    return f"{name} {i} has strides {x.stride()}, its param {p.stride()}"
        return None

    def refresh_grads(self, bucket: Bucket) -> None:
        """The gradients came back at other addresses: rewrite the G column on the host (no
        torch op; already written when the driver's native reader filled ``grad_sink``), then
        one non-blocking upload."""
        self.grads_version = bucket.grads_version
        if not self.usable:
            return
        if bucket.native_grads:      # the native reader wrote the column and checked every layout
            self.host_table.upload()
            return
        grads = bucket.grads   # shape, dtype and device checked by the driver when they moved
        if len(grads) != len(bucket.params):
            self.usable, self.why_not = False, "the gradients no longer match the parameters"
            return
        if not all(map(Tensor.is_contiguous, grads)):   # fast path: contiguous grads (the common case)
            for i, (g, p) in enumerate(zip(grads, bucket.params, strict=True)):
                if g.numel() != p.numel() or not _same_layout(g, p):
                    self.usable = False
                    self.why_not = f"grad {i} has strides {g.stride()}, its param {p.stride()}"
                    return
        ptrs = bucket.grad_ptrs if len(bucket.grad_ptrs) == len(grads) else tuple(map(Tensor.data_ptr, grads))
        self.host_table.set_column(int(TableCol.G), ptrs)
        self.host_table.upload()


def _pinned(t: Tensor) -> Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


def _upload(t: Tensor, device: torch.device) -> Tensor:
    return _pinned(t).to(device, non_blocking=True)


# ---- the backend --------------------------------------------------------------------------
class CudaBackend:
    name = "cuda"

    def __init__(self):
        if load_extension() is None:
            from .base import BackendUnavailable
            raise BackendUnavailable(f"ALSALS backend='cuda': {_load_error}")
        self._ops = torch.ops.alsals_fused
        self._foreach = None
        self.table_builds = 0    # telemetry for tests
        self.grad_refreshes = 0

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return torch.device(device).type == "cuda" and dtype in _STORAGE

    def _fallback(self):
        if self._foreach is None:
            from .foreach import ForeachBackend
            self._foreach = ForeachBackend()
        return self._foreach

    def _table(self, b: Bucket) -> _Table:
        t = b.cache.get("cuda")
        if t is None:
            t = b.cache["cuda"] = _Table(b)
            self.table_builds += 1
        return t

    def grad_sink(self, bucket: Bucket):
        """The host table and column of the bucket's gradient addresses (base.py, Backend);
        None for a bucket this backend hands to foreach (which reads ``bucket.grads``)."""
        if not bucket.params:
            return None
        t = self._table(bucket)
        return (t.host_table.host, int(TableCol.G)) if t.usable else None

    def _fallback_for(self, buckets: Sequence[Bucket]):
        """foreach for buckets whose table is unusable.  A table can turn unusable after the
        driver chose native reads for it; foreach then needs the grads as tensors."""
        for b in buckets:
            if b.native_grads and not b.grads:
                # the reader has just checked that every one of them exists
                b.grads = [cast(Tensor, p.grad) for p in b.params]
        return self._fallback()

    def _tables(self, buckets: Sequence[Bucket]) -> Optional[List[_Table]]:
        """The buckets' tables (built or refreshed as needed), or None: run this pass on foreach."""
        tables = []
        for b in buckets:
            t = b.cache.get("cuda")
            if t is None:
                t = self._table(b)
            elif t.grads_version != b.grads_version:
                t.refresh_grads(b)
                self.grad_refreshes += 1
            if not t.usable:
                return None
            tables.append(t)
        return tables

    def _args(self, tables: List[_Table]):
        return [t.table for t in tables], [t.sched for t in tables], [t.storage for t in tables]

    @staticmethod
    def _scratch_for(buckets: Sequence[Bucket], tables: List[_Table], device: torch.device):
        """fp32 partials (2 per program) and the tickets of one list of buckets, allocated once
        and kept in its first bucket's cache (as long as the optimizer's plan): two optimizers,
        or one optimizer's passes over two lists, never share them (each may step on its own
        stream), and nothing is ever freed or regrown under a kernel still using it."""
        if not buckets:          # (no launch reads them: the op refuses an empty list)
            return (torch.empty(2, dtype=torch.float32, device=device),
                    torch.zeros(2, dtype=torch.int32, device=device))
        cache = buckets[0].cache
        key = _SCRATCH if len(buckets) == 1 else _SCRATCH + ":" + ",".join(str(b.uid) for b in buckets)
        held = cache.get(key)
        if held is None:
            programs = sum(t.programs for t in tables)
            held = cache[key] = (torch.empty(2 * programs, dtype=torch.float32, device=device),
                                 torch.zeros(2, dtype=torch.int32, device=device))   # grad, step
        return held

    # -- the passes ----------------------------------------------------------------------------
    def grad_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                  finish: bool = True) -> Optional[Tensor]:
        tables = self._tables(buckets)
        if tables is None:
            return self._fallback_for(buckets).grad_pass(buckets, ctl, loss0, hp, finish=finish)
        return self._grad_op(buckets, tables, ctl, loss0, hp, finish)

    def step_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, searching: bool,
                  write_backup: bool, finish: bool = True) -> Optional[Tensor]:
        tables = self._tables(buckets)
        if tables is None:
            return self._fallback_for(buckets).step_pass(buckets, hp, ctl, searching=searching,
                                              write_backup=write_backup, finish=finish)
        return self._step_op(buckets, tables, hp, ctl, searching, write_backup, finish)

    def update_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                    searching: bool, write_backup: bool) -> None:
        """grad_pass then step_pass, both finishing (base.py), on one table lookup."""
        tables = self._tables(buckets)
        if tables is None:
            fallback = self._fallback_for(buckets)
            fallback.grad_pass(buckets, ctl, loss0, hp)
            fallback.step_pass(buckets, hp, ctl, searching=searching, write_backup=write_backup)
            return
        self._grad_op(buckets, tables, ctl, loss0, hp, True)
        self._step_op(buckets, tables, hp, ctl, searching, write_backup, True)

    def _grad_op(self, buckets: Sequence[Bucket], tables: List[_Table], ctl: Tensor, loss0: Tensor,
                 hp: StepScalars, finish: bool) -> Optional[Tensor]:
        partials, tickets = self._scratch_for(buckets, tables, ctl.device)
        out = None if finish else torch.empty((), dtype=torch.float64, device=ctl.device)
        max_norm = -1.0 if hp.max_grad_norm is None else float(hp.max_grad_norm)
        self._ops.grad_pass(*self._args(tables), partials, tickets, ctl, loss0, max_norm, finish, out)
        return out

    def _step_op(self, buckets: Sequence[Bucket], tables: List[_Table], hp: StepScalars, ctl: Tensor,
                 searching: bool, write_backup: bool, finish: bool) -> Optional[Tensor]:
        if write_backup and not all(t.has_backups for t in tables):
            raise ValueError("ALSALS cuda backend: write_backup=True for a bucket without backups")
        partials, tickets = self._scratch_for(buckets, tables, ctl.device)
        out = torch.empty(2, dtype=torch.float64, device=ctl.device) if searching and not finish else None
        self._ops.step_pass(*self._args(tables), partials, tickets, ctl, hp.eta, hp.beta1, hp.beta2,
                            hp.eps, hp.bias_correction1, hp.bias_correction2, hp.smoothing,
                            int(hp.search_dir), searching, write_backup, finish, out)
        return out

    def move_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if_fallback: bool = False) -> None:
        tables = self._tables(buckets)
        if tables is None:
            return self._fallback_for(buckets).move_pass(buckets, hp, ctl, src_eta=src_eta, src_dir=src_dir,
                                              dst_eta=dst_eta, dst_dir=dst_dir,
                                              from_backup=from_backup, only_if_fallback=only_if_fallback)
        if from_backup and not all(t.has_backups for t in tables):
            raise ValueError("ALSALS cuda backend: from_backup=True for a bucket without backups")
        self._ops.move_pass(*self._args(tables), ctl, hp.eps, hp.bias_correction1,
                            hp.bias_correction2, float(src_eta), int(src_dir), float(dst_eta),
                            int(dst_dir), from_backup, only_if_fallback)
        return None

    def verdict(self, ctl: Tensor, loss_try: Tensor, dp: DecisionScalars, out: Tensor) -> None:
        self._ops.verdict(ctl, loss_try, dp.eta, dp.c, dp.beta3, out)


# ---- command line -------------------------------------------------------------------------
def _gpt2_like_numels(n: int) -> List[int]:
    """n tensor sizes shaped like GPT-2's (embeddings, 12 per block: ln, attn, mlp, biases)."""
    d = 768
    block = [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
    sizes = [50257 * d, 1024 * d]
    while len(sizes) < n - 2:
        sizes += block
    return (sizes[: n - 2] + [d, d])[:n]


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import json
    parser = argparse.ArgumentParser(prog="python -m alsals_fused.backends.cuda_backend")
    parser.add_argument("--write-header", action="store_true", help=f"regenerate {LAYOUT_HEADER}")
    parser.add_argument("--check-header", action="store_true", help="exit 1 if the header is stale")
    parser.add_argument("--plan", type=int, metavar="N", help="plan_launches for N GPT-2-like fp32 tensors")
    args = parser.parse_args(argv)
    if args.write_header:
        LAYOUT_HEADER.write_text(layout_header())
        print(f"wrote {LAYOUT_HEADER}")
    if args.check_header:
        current = LAYOUT_HEADER.read_text() if LAYOUT_HEADER.is_file() else ""
        if current != layout_header():
            print(f"{LAYOUT_HEADER} is stale: run python -m alsals_fused.backends.cuda_backend --write-header")
            return 1
        print(f"{LAYOUT_HEADER} is current")
    if args.plan:
        plan = plan_launches(_gpt2_like_numels(args.plan))
        plan.pop("chunks")
        print(json.dumps(plan, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
