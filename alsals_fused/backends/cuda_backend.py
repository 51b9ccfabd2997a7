"""The CUDA backend: contract v2 (``base.py``) as hand-written CUDA kernels (``csrc/``, module
``alsals_fused._C``).

Design (one design with the Triton backend, in two languages): every bucket gets, once, a
``fused_tables.BucketTable`` (the Triton backend's class): a device table (int64
``[T, TABLE_COLS]``, columns ``TableCol``) and a schedule (int32 ``[P, 2]``: table row and chunk
index of each program; ``CHUNK`` elements per program).  Each pass is ONE call of
a ``torch.ops.alsals_fused`` op with those few tensors (not the parameter lists), which launches
one kernel per bucket (one per pass in the usual single-dtype case); the sums are fp32 partials
per chunk, added in float64 in a fixed order by the program that arrives last (a ticket), which
also runs the finisher, so the grad finisher, step finisher and verdict run on the device
without extra launches.  ``cuda_tools.describe_launches`` says, on any machine, what the kernels
will launch.

Caching: the tables live in ``bucket.cache["cuda"]``; the gradient column is rewritten on the host (or
by the driver's native reader, through ``grad_sink``) and uploaded with one non-blocking copy
only when ``bucket.grads_version`` moved, i.e. when gradients freed by
``zero_grad(set_to_none=True)`` came back at other addresses.  The tables hold raw addresses: the
bucket that holds them keeps params, moments and backups alive; gradients are read only inside a
pass.

What the kernels do not take (fp64 parameters, a non-dense view, a gradient with other strides
than its parameter: ``fused_tables.unfusable_reason``) the driver runs on foreach; handed such a
bucket directly, the backend raises ValueError.

Loading: ``import alsals_fused._C`` (built by ``pip install --no-build-isolation -e .``).  If it
is missing and ``ALSALS_FUSED_JIT=1``, it is compiled on first use with
``torch.utils.cpp_extension.load`` from the repository's ``csrc/`` (settings in
``csrc/build_settings.py``); a failed build is not retried in the same process.  Without
``ALSALS_FUSED_JIT=1`` a JIT build that finished earlier (torch's build folder, newer than every
source) is loaded as it is (``finished_jit_build``): the GPU suite turns JIT off after a cut build
phase, and an extension built before the cut stays usable.

The header generator, the launch description and the command line are in ``cuda_tools.py``.
"""
from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .._source_tree import CSRC, build_settings, finished_jit_build
from .base import CHUNK, Bucket, Ctl, DecisionScalars, Dir, StepScalars, TableCol, condition_slot
from .cuda_tools import THREADS, layout_digest
from .fused_tables import BucketTable, list_scratch, unfusable_reason

OPS = ("grad_pass", "step_pass", "move_pass", "verdict")
BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` in an environment with a CUDA "
              "build of torch and a CUDA toolkit, or set ALSALS_FUSED_JIT=1 to compile it on first use")

_STORAGE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # passes.h ScalarCode
_SCRATCH = "cuda:scratch"   # bucket.cache key of a bucket list's partials and tickets


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


# ---- the backend --------------------------------------------------------------------------
class CudaBackend:
    name = "cuda"

    def __init__(self):
        if load_extension() is None:
            from .base import BackendUnavailable
            raise BackendUnavailable(f"ALSALS backend='cuda': {_load_error}")
        self._ops = torch.ops.alsals_fused
        self._no_buckets: dict = {}   # the scratch of a pass over no bucket (never launched)
        self.table_builds = 0    # telemetry for tests
        self.grad_refreshes = 0

    @staticmethod
    def unfusable_reason(bucket: Bucket) -> Optional[str]:
        """Why the kernels cannot take ``bucket`` (``fused_tables.unfusable_reason``), or None:
        the driver runs such a bucket on foreach (``ALSALS._backend_for``)."""
        return unfusable_reason(bucket)

    def _table(self, b: Bucket) -> BucketTable:
        t = b.cache.get("cuda")
        if t is None:
            t = b.cache["cuda"] = BucketTable(b, CHUNK, "cuda")
            self.table_builds += 1
        return t

    def grad_sink(self, bucket: Bucket):
        """The host table and column of the bucket's gradient addresses (base.py, Backend)."""
        if not bucket.params:
            return None
        return self._table(bucket).rows.host, int(TableCol.G)

    def _tables(self, buckets: Sequence[Bucket]) -> List[BucketTable]:
        """The buckets' tables (built or refreshed as needed)."""
        tables = []
        for b in buckets:
            t = b.cache.get("cuda")
            if t is None:
                t = self._table(b)
            elif t.grads_version != b.grads_version:
                t.refresh_grads(b)
                self.grad_refreshes += 1
            tables.append(t)
        return tables

    @staticmethod
    def _args(tables: List[BucketTable]):
        return [t.table for t in tables], [t.sched for t in tables], [_STORAGE[t.dtype] for t in tables]

    def _scratch_for(self, buckets: Sequence[Bucket], tables: List[BucketTable], device: torch.device):
        """fp32 partials (2 per program) and the tickets (grad, step) of one list of buckets
        (``fused_tables.list_scratch``: allocated once, per list, never freed under a kernel)."""
        def make(dev: torch.device):
            programs = max(1, sum(t.programs for t in tables))
            return (torch.empty(2 * programs, dtype=torch.float32, device=dev),
                    torch.zeros(2, dtype=torch.int32, device=dev))
        return list_scratch(buckets, _SCRATCH, self._no_buckets, device, make)

    # -- the passes ----------------------------------------------------------------------------
    def grad_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                  finish: bool = True) -> Optional[Tensor]:
        return self._grad_op(buckets, self._tables(buckets), ctl, loss0, hp, finish)

    def step_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, searching: bool,
                  write_backup: bool, finish: bool = True) -> Optional[Tensor]:
        return self._step_op(buckets, self._tables(buckets), hp, ctl, searching, write_backup, finish)

    def update_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                    searching: bool, write_backup: bool) -> None:
        """grad_pass then step_pass, both finishing (base.py), on one table lookup."""
        tables = self._tables(buckets)
        self._grad_op(buckets, tables, ctl, loss0, hp, True)
        self._step_op(buckets, tables, hp, ctl, searching, write_backup, True)

    def _grad_op(self, buckets: Sequence[Bucket], tables: List[BucketTable], ctl: Tensor, loss0: Tensor,
                 hp: StepScalars, finish: bool) -> Optional[Tensor]:
        partials, tickets = self._scratch_for(buckets, tables, ctl.device)
        out = None if finish else torch.empty((), dtype=torch.float64, device=ctl.device)
        max_norm = -1.0 if hp.max_grad_norm is None else float(hp.max_grad_norm)
        self._ops.grad_pass(*self._args(tables), partials, tickets, ctl, loss0, max_norm, finish, out)
        return out

    def _step_op(self, buckets: Sequence[Bucket], tables: List[BucketTable], hp: StepScalars, ctl: Tensor,
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
                  only_if: Optional[Ctl] = None) -> None:
        tables = self._tables(buckets)
        if from_backup and not all(t.has_backups for t in tables):
            raise ValueError("ALSALS cuda backend: from_backup=True for a bucket without backups")
        self._ops.move_pass(*self._args(tables), ctl, hp.eps, hp.bias_correction1,
                            hp.bias_correction2, float(src_eta), int(src_dir), float(dst_eta),
                            int(dst_dir), from_backup, condition_slot(only_if))
        return None

    def verdict(self, ctl: Tensor, loss_try: Tensor, dp: DecisionScalars, out: Tensor) -> None:
        self._ops.verdict(ctl, loss_try, dp.eta, dp.c, dp.smoothing, out)
