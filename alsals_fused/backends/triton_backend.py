"""The Triton backend (contract v2, ``base.py``): fused multi-tensor passes and device decisions.

Kernels live in ``alsals_fused.triton_kernels`` (see its docstring for the table/schedule layout
and the "last program finishes" ticket).  Per step, for one bucket:

- ``grad_pass``: one ``grad_kernel`` launch (sum of g*g; its last program runs the grad
  finisher into ``ctl``: no separate finisher launch).
- ``step_pass``: one ``step_kernel`` launch (ADAM step, backup, candidate; when searching its
  last program runs the step finisher into ``ctl``).
- ``move_pass``: one ``move_kernel`` launch (skip/fallback/UPDATE decided on the device; a pass
  with nothing to do returns in every program after reading two ctl slots).
- ``verdict``: one ``verdict_kernel`` launch (one program).

With several buckets (dtypes) a pass launches once per bucket and only the last launch
finishes (its last program adds every bucket's partials: the earlier launches are complete by
stream order).  Every launch goes through ``TritonBackend._launch`` (one place to count or stub
launches; ``benchmarks/hot_path.py`` replaces it) and no torch operation runs on the hot path:
partials, counters and tables are allocated when a plan is built, and each finishing pass
variant's launch list (kernel, grid, arguments, constexprs) is built once and reused with only
the per-step values (the loss, the step's scalars) spliced in.

Nothing here reads a device value on the host.  Tables are cached per bucket in
``bucket.cache`` (a bucket's tensors other than its grads are fixed for its lifetime, base.py);
when the driver bumps ``bucket.grads_version`` only the grad column is rewritten: on the host
table through ctypes (no torch op), or not at all when the driver's native reader (``host_ext``,
through ``grad_sink``) has written it in place, then one non-blocking copy to the device from a
pinned staging buffer that is reused only once its previous copy has completed (a CUDA event
query, not a sync).  With unchanged addresses a pass does no table work at all.

Layouts: a parameter may be non-contiguous if it is dense (e.g. channels_last or transposed) and
its grad, moments and backup share its strides: the kernels then walk its storage in memory
order.  Anything else (overlapping or gapped views) is rejected with a ValueError naming the
tensor's shape and strides.
"""
from __future__ import annotations

import operator
import os
import struct
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import CTL_SIZE, TABLE_COLS, VERDICT_SIZE, Bucket, DecisionScalars, Dir, StepScalars, TableCol
from .host_table import HostTable as _HostTable


def _import_kernels():
    """``alsals_fused.triton_kernels``; from a source checkout (no install) it is the top-level
    ``triton_kernels/`` folder, which setup.py maps to that name."""
    import importlib
    import importlib.util
    import sys
    name = "alsals_fused.triton_kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "triton_kernels")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    if spec is None:
        raise ImportError(f"{name} is not installed and {folder} does not exist")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


try:
    import triton  # noqa: F401
    _tk = _import_kernels()
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # triton missing (or too old): unavailable_reason says so
    _tk = None
    _IMPORT_ERROR = str(exc)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: torch.device("cuda") != torch.device("cuda:0") as objects,
    though a bucket built on the former holds tensors that report the latter."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or (a.index is not None and b.index is not None):
        return a == b
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_LOSS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CACHE_SIZE = 8   # multi-bucket list plans kept per backend (several optimizers)
_CALLS_MAX = 32   # launch lists kept per list plan (a max_grad_norm changed every step makes new ones)
_SCHEDULES = 0    # program schedules built by any bucket plan (see _BucketPlan._schedule)
_G = int(TableCol.G)
_data_ptr = Tensor.data_ptr
_uid = operator.attrgetter("uid")
_is_contiguous = Tensor.is_contiguous
_MISALIGNED = (15).__and__          # address -> nonzero unless 16-byte aligned
_pack_d = struct.Struct("<d").pack
_unpack_q = struct.Struct("<q").unpack


def _bits(x: float) -> int:
    """The int64 bit pattern of a float64 (how fp64 host scalars reach the kernels)."""
    return _unpack_q(_pack_d(x))[0]


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_tk.step_kernel, InterpretedFunction)


def unavailable_reason(device) -> Optional[str]:
    """None if the Triton backend can run on ``device``, else why not."""
    if _tk is None:
        return (f"the triton package is not importable ({_IMPORT_ERROR}); "
                "install it with `pip install triton`")
    device = torch.device(device)
    if device.type == "cuda":
        if _interpreted():
            return ("TRITON_INTERPRET=1 is set, so the Triton kernels run in the CPU interpreter; "
                    "unset it to run them on the GPU")
        return None
    if device.type == "cpu":
        if _interpreted():
            return None
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return ("TRITON_INTERPRET was set after triton was imported; set it before the first "
                    "import of triton to use the CPU interpreter")
        return ("it needs a CUDA GPU (or TRITON_INTERPRET=1, set before importing triton, to run "
                "its kernels in the slow CPU interpreter)")
    return f"it needs a CUDA GPU, not a {device.type} device"


def _layout(t: Tensor) -> tuple:
    """The strides that matter (size-1 dims carry arbitrary strides)."""
    return tuple(st for s, st in zip(t.shape, t.stride()) if s != 1)


def _dense(t: Tensor) -> bool:
    """True if ``t`` covers exactly numel consecutive elements of memory (any dim order)."""
    if t.numel() <= 1 or t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _BucketPlan:
    """The device tables of one bucket (cached in ``bucket.cache``)."""

    __slots__ = ("dtype_name", "has_backups", "numels", "others_aligned", "aligned", "table",
                 "sched", "n_fast", "n_prog", "grads_version", "chunk", "device", "contiguous",
                 "all_aligned")

    def __init__(self, backend: "TritonBackend", bucket: Bucket):
        backend._validate(bucket)
        self.chunk = backend.chunk
        self.device = bucket.device
        self.dtype_name = _DTYPE_NAMES[bucket.dtype]
        self.has_backups = bool(bucket.backups) or not bucket.params   # (nothing to back up)
        self.numels = [p.numel() for p in bucket.params]
        self.contiguous = all(map(_is_contiguous, bucket.params))
        rows, self.others_aligned = [], []
        for i, p in enumerate(bucket.params):
            others = [p.data_ptr(), bucket.exp_avgs[i].data_ptr(), bucket.exp_avg_sqs[i].data_ptr()]
            backup = bucket.backups[i].data_ptr() if self.has_backups else 0
            others.append(backup)
            self.others_aligned.append(all(a % 16 == 0 for a in others))
            row = [0] * TABLE_COLS
            row[TableCol.W], row[TableCol.M], row[TableCol.V] = others[0], others[1], others[2]
            row[TableCol.BACKUP] = backup
            row[TableCol.G] = bucket.grads[i].data_ptr() if bucket.grads else 0
            row[TableCol.NUMEL] = self.numels[i]
            row[TableCol.WD_BITS] = _bits(float(bucket.weight_decays[i]))
            rows.append(row)
        self.table = _HostTable(rows, bucket.device)
        # built outside a pass (no grads yet): the first pass with grads fills the column
        self.grads_version = bucket.grads_version if (bucket.grads or not bucket.params) else -1
        self.aligned: Optional[List[bool]] = None
        self.sched: Optional[Tensor] = None
        self._schedule([r[TableCol.G] for r in rows])
        backend.table_builds += 1

    def _schedule(self, grad_ptrs: List[int]) -> None:
        """Programs: aligned full chunks first (the unmasked specialization), then tails and
        misaligned tensors' chunks (masked).  Python ints only: nothing read from a device.
        A new schedule bumps ``_SCHEDULES`` (cached launch lists hold schedules; a bucket plan
        is shared by every backend instance with the same chunking, so the count is global)."""
        global _SCHEDULES
        aligned = [a and g % 16 == 0 for a, g in zip(self.others_aligned, grad_ptrs)]
        if aligned == self.aligned:
            return
        _SCHEDULES += 1
        chunk = self.chunk
        fast: List[Tuple[int, int]] = []
        slow: List[Tuple[int, int]] = []
        for row, (n, ok) in enumerate(zip(self.numels, aligned)):
            full = n // chunk if ok else 0
            count = -(-n // chunk)
            if count >= 2 ** 31:
                raise ValueError("ALSALS triton backend: a tensor has more than 2**31 chunks")
            fast.extend((row, c) for c in range(full))
            slow.extend((row, c) for c in range(full, count))
        pairs = fast + slow
        sched = torch.tensor(pairs if pairs else [(0, 0)], dtype=torch.int32).reshape(-1, 2)
        if self.device.type == "cuda":
            sched = sched.pin_memory().to(self.device, non_blocking=True)
        self.sched, self.n_fast, self.n_prog, self.aligned = sched, len(fast), len(pairs), aligned
        self.all_aligned = all(aligned)

    def refresh_grads(self, backend: "TritonBackend", bucket: Bucket) -> None:
        """The driver bumped grads_version: rewrite the grad column (and the schedule if an
        alignment changed); nothing else.  Kept to a few C-level maps over the list (it may run
        every step: with set_to_none the allocator can hand grads back at permuted addresses):
        the addresses are the driver's ``bucket.grad_ptrs``; shape, dtype and device are the
        driver's check (autograd guarantees them for .grad); the layout check here is one
        is_contiguous() per grad when every param is contiguous."""
        if bucket.native_grads:
            # The driver's native reader wrote the column and checked every layout (host_ext).
            self.table.upload()
            if not (self.all_aligned and not bucket.grads_misaligned):
                self._schedule(self.table.column(_G, len(self.numels)))
            self.grads_version = bucket.grads_version
            backend.grad_refreshes += 1
            return
        grads = bucket.grads
        if len(grads) != len(self.numels):
            raise ValueError(f"ALSALS triton backend: bucket has {len(self.numels)} params but "
                             f"{len(grads)} grads (grads are read during a pass only)")
        if not (self.contiguous and all(map(_is_contiguous, grads))):
            for i, (p, g) in enumerate(zip(bucket.params, grads)):
                backend._check_like(i, p, "grad", g, bucket.dtype)
        ptrs = bucket.grad_ptrs
        if len(ptrs) != len(grads):
            raise ValueError("ALSALS triton backend: bucket.grad_ptrs must hold the addresses of "
                             "bucket.grads (Bucket.replace_grads sets both)")
        self.table.set_column(_G, ptrs)
        self.table.upload()
        if not (self.all_aligned and not any(map(_MISALIGNED, ptrs))):
            self._schedule(list(ptrs))
        self.grads_version = bucket.grads_version
        backend.grad_refreshes += 1


class _ListPlan:
    """What a pass over one list of buckets needs: the buckets' plans, where each bucket's
    partials start, the shared partials buffer and ticket counters (allocated once), and the
    passes' launch lists (``calls``: one per pass variant, see ``TritonBackend._run``)."""

    __slots__ = ("plans", "offsets", "work", "n_parts", "partials", "counters", "dummy_table",
                 "dummy_sched", "device", "cuda_index", "ctl", "calls", "calls_schedules")

    def __init__(self, backend: "TritonBackend", buckets: Sequence[Bucket], device: torch.device):
        self.plans = [backend._bucket_plan(b) for b in buckets]
        self.offsets, total = [], 0
        for bp in self.plans:
            self.offsets.append(total)
            total += bp.n_prog
        self.n_parts = total
        # (plan, partials offset) of the buckets with elements (a bucket's program count is fixed)
        self.work = [(bp, off) for bp, off in zip(self.plans, self.offsets) if bp.n_prog]
        self.device = device
        self.partials = torch.empty(2 * max(1, total), dtype=torch.float32, device=device)
        self.counters = torch.zeros(2, dtype=torch.int32, device=device)   # grad, step tickets
        self.dummy_table = torch.zeros(TABLE_COLS, dtype=torch.int64, device=device)
        self.dummy_sched = torch.zeros(2, dtype=torch.int32, device=device)
        self.cuda_index = device.index if device.type == "cuda" else None
        self.ctl: Optional[Tensor] = None           # the last ctl checked against this plan
        self.calls: Dict[tuple, List[tuple]] = {}
        self.calls_schedules = -1                   # _SCHEDULES when calls were built


class TritonBackend:
    """Contract v2 on Triton kernels.

    Launch hook: every kernel launch is ``self._launch(kernel, grid, *args, **meta)``, with the
    arguments in the kernel's order (``kernel.arg_names``; ``describe_launch`` maps them to names
    and says whether the launch writes ctl/out: a stub must fill what the kernel would)."""

    name = "triton"

    def __init__(self, block: Optional[int] = None, iters: Optional[int] = None):
        # block/iters exist for tests (small chunks exercise the multi-program paths cheaply).
        if _tk is None:
            raise ImportError(f"the Triton backend needs triton ({_IMPORT_ERROR})")
        self.block = block or _tk.BLOCK
        self.iters = iters or (_tk.ITERS if block is None else 1)
        self.chunk = self.block * self.iters
        self._cache_key = f"triton:{self.block}x{self.iters}"
        self._list_key = self._cache_key + ":list"
        self._step_fixed: tuple = (None,)   # (beta1, beta2, eps, smoothing) and their kernel arguments
        self._lists: "OrderedDict[tuple, _ListPlan]" = OrderedDict()
        self._cx: Dict[tuple, dict] = {}
        self._verdict_on: Tuple[Optional[Tensor], Optional[int]] = (None, None)   # (ctl, CUDA index)
        self._verdict_meta = dict(num_warps=_tk.VERDICT_WARPS, **_tk.COMPILE_OPTIONS)
        self.table_builds = 0     # telemetry for tests: bucket tables built
        self.grad_refreshes = 0   # grad columns rewritten after a grads_version bump

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype in _DTYPE_NAMES and unavailable_reason(device) is None

    # -- the launch hook ------------------------------------------------------------------------
    def _launch(self, kernel, grid, *args, **meta) -> None:
        kernel[grid](*args, **meta)

    @staticmethod
    def describe_launch(kernel, args: tuple, meta: dict) -> dict:
        """For launch stubs: ``{"kernel": name, "role": None | "grad" | "step" | "verdict",
        "args": {name: value}}``.  role "grad"/"step": the launch's last program runs that
        finisher (``args["finish"]`` is FINISH_CTL: ctl written as decisions.finish_grad /
        finish_slope would; FINISH_SUM: the fp64 sums written to ``args["out"]``).  role
        "verdict": ``decisions.verdict`` into ``args["out"]`` and ctl.  fp64 scalars are in the
        ``*_bits`` arguments (``struct.unpack('<d', struct.pack('<q', bits))``)."""
        fn = getattr(kernel, "fn", kernel)
        name = getattr(fn, "__name__", str(fn))
        names = list(kernel.arg_names)
        named = dict(zip(names, args))
        role = _tk.FINISHERS.get(name)
        if role in ("grad", "step") and named.get("finish", 0) == _tk.FINISH_NONE:
            role = None
        if role == "step" and not meta.get("SEARCHING", False):
            role = None
        return {"kernel": name, "role": role, "args": named}

    # -- plans --------------------------------------------------------------------------------
    def _bucket_plan(self, bucket: Bucket) -> _BucketPlan:
        bp = bucket.cache.get(self._cache_key)
        if bp is None:
            bp = _BucketPlan(self, bucket)
            bucket.cache[self._cache_key] = bp
        return bp

    def _plan(self, buckets: Sequence[Bucket], ctl: Tensor) -> _ListPlan:
        if len(buckets) == 1:
            # The usual list (one dtype): its plan lives in the bucket's cache, found without
            # building a key, and as long as the bucket.
            lp = buckets[0].cache.get(self._list_key)
            if lp is None:
                lp = buckets[0].cache[self._list_key] = _ListPlan(self, buckets, buckets[0].device)
        else:
            lp = self._lists.get(tuple(map(_uid, buckets)))
            if lp is None:
                device = buckets[0].device if buckets else ctl.device
                lp = _ListPlan(self, buckets, device)
                self._lists[tuple(map(_uid, buckets))] = lp
                if len(self._lists) > _CACHE_SIZE:
                    self._lists.popitem(last=False)
        if lp.ctl is not ctl:
            self._check_ctl(ctl, lp.device)
            lp.ctl = ctl
            lp.calls.clear()
        for bp, b in zip(lp.plans, buckets):
            if bp.grads_version != b.grads_version:
                bp.refresh_grads(self, b)
        if lp.calls_schedules != _SCHEDULES or len(lp.calls) > _CALLS_MAX:
            lp.calls.clear()                        # a bucket's program schedule changed
            lp.calls_schedules = _SCHEDULES
        return lp

    def layout_problem(self, bucket: Bucket) -> Optional[str]:
        """Why the kernels cannot take ``bucket``'s tensors (a non-dense view, a gradient or
        moment in another layout than its parameter), or None; the driver runs such a bucket on
        foreach (``ALSALS._backend_for``)."""
        try:
            self._validate(bucket)
        except ValueError as exc:
            return str(exc).removeprefix("ALSALS triton backend: ")
        return None

    def _check_like(self, i: int, p: Tensor, what: str, t: Tensor, dtype: torch.dtype) -> None:
        if t.dtype != dtype or t.device != p.device or t.shape != p.shape:
            raise ValueError(
                f"ALSALS triton backend: the {what} of parameter {i} is {t.dtype} "
                f"{tuple(t.shape)} on {t.device}; expected {dtype} {tuple(p.shape)} on {p.device}")
        if t.numel() > 1 and _layout(t) != _layout(p):
            raise ValueError(
                f"ALSALS triton backend: parameter {i} of shape {tuple(p.shape)} has strides "
                f"{p.stride()} but its {what} has strides {t.stride()}; the fused kernels need "
                "one memory layout for both (or use backend='foreach')")

    def _validate(self, bucket: Bucket) -> None:
        n = len(bucket.params)
        lists: Dict[str, Sequence[object]] = {"exp_avgs": bucket.exp_avgs, "exp_avg_sqs": bucket.exp_avg_sqs,
                 "weight_decays": bucket.weight_decays}
        if bucket.grads:
            lists["grads"] = bucket.grads
        if bucket.backups:
            lists["backups"] = bucket.backups
        for name, lst in lists.items():
            if len(lst) != n:
                raise ValueError(f"ALSALS triton backend: bucket has {n} params but {len(lst)} {name}")
        if bucket.dtype not in _DTYPE_NAMES:
            raise ValueError(f"ALSALS triton backend: unsupported dtype {bucket.dtype}")
        for i, p in enumerate(bucket.params):
            if p.dtype != bucket.dtype or not _same_device(p.device, bucket.device):
                raise ValueError(f"ALSALS triton backend: parameter {i} is {p.dtype} on {p.device}, "
                                 f"its bucket is {bucket.dtype} on {bucket.device}")
            if not _dense(p):
                raise ValueError(
                    f"ALSALS triton backend: parameter {i} of shape {tuple(p.shape)} has strides "
                    f"{p.stride()}, which do not cover its elements densely (an overlapping or "
                    "strided view); pass a contiguous parameter (or use backend='foreach')")
            others = [("exp_avg", bucket.exp_avgs[i], torch.float32),
                      ("exp_avg_sq", bucket.exp_avg_sqs[i], torch.float32)]
            if bucket.grads:
                others.append(("grad", bucket.grads[i], bucket.dtype))
            if bucket.backups:
                others.append(("backup", bucket.backups[i], bucket.dtype))
            for what, t, dtype in others:
                self._check_like(i, p, what, t, dtype)

    @staticmethod
    def _check_ctl(ctl: Tensor, device: torch.device) -> None:
        if ctl.dtype != torch.float64 or ctl.numel() != CTL_SIZE \
                or not _same_device(ctl.device, device) or not ctl.is_contiguous():
            raise ValueError(f"ALSALS triton backend: ctl must be a contiguous float64 tensor of "
                             f"{CTL_SIZE} on {device}; got {ctl.dtype} {tuple(ctl.shape)} on "
                             f"{ctl.device}")

    # -- launch lists ---------------------------------------------------------------------------
    # A pass is a list of launches whose arguments are fixed for the plan's lifetime except the
    # per-step values (the loss, the step's scalars): each entry is (kernel, grid, head, tail,
    # meta) and launches as kernel[grid](*head, *per_step, *tail, **meta).  The finishing passes'
    # lists are built once per pass variant and list plan (``_ListPlan.calls``), so such a pass
    # costs one loop of launches on the host; the partial passes of the generic path
    # (finish=False) write fresh ``out`` tensors and build theirs per call.
    def _run(self, lp: _ListPlan, calls: List[tuple], per_step: tuple) -> None:
        self._launch_on(lp.cuda_index, calls, per_step)

    def _launch_on(self, cuda_index: Optional[int], calls: Sequence[tuple], per_step: tuple) -> None:
        """Every launch of the passes and the verdict: on CUDA device ``cuda_index`` (Triton
        launches on the current device, which may be another one), through ``_launch``."""
        launch = self._launch
        if cuda_index is not None and cuda_index != torch.cuda.current_device():
            with torch.cuda.device(cuda_index):
                for kernel, grid, head, tail, meta in calls:
                    launch(kernel, grid, *head, *per_step, *tail, **meta)
            return
        for kernel, grid, head, tail, meta in calls:
            launch(kernel, grid, *head, *per_step, *tail, **meta)

    def _constexprs(self, kind: str, *key) -> dict:
        cx = self._cx.get((kind,) + key)
        if cx is None:
            make = {"grad": _tk.kernels.grad_constexprs, "step": _tk.kernels.step_constexprs,
                    "move": _tk.kernels.move_constexprs}[kind]
            cx = dict(make(*key, block=self.block, iters=self.iters), num_warps=_tk.NUM_WARPS,
                      **_tk.COMPILE_OPTIONS)
            self._cx[(kind,) + key] = cx
        return cx

    def grad_sink(self, bucket: Bucket) -> Optional[Tuple[Tensor, int]]:
        """The host table and column of the bucket's gradient addresses (base.py, Backend)."""
        if not bucket.params:
            return None
        return self._bucket_plan(bucket).table.host, _G

    # -- the passes ---------------------------------------------------------------------------
    def grad_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                  finish: bool = True) -> Optional[Tensor]:
        lp = self._plan(buckets, ctl)
        if finish:
            self._run(lp, self._finishing_grad_calls(lp, ctl, hp), (loss0,))
            return None
        clip, norm_bits = self._clip_args(hp)
        out = torch.empty((), dtype=torch.float64, device=lp.device)
        self._run(lp, self._grad_calls(lp, out, _tk.FINISH_SUM, clip, norm_bits), (loss0,))
        return out

    def _grad_calls(self, lp: _ListPlan, out: Tensor, mode: int, clip: bool, norm_bits: int) -> List[tuple]:
        """grad_kernel(table, sched, partials, counters, ctl, loss0, out, ...) per bucket."""
        ctl, kernel, work = lp.ctl, _tk.grad_kernel, lp.work
        if not work:   # nothing to sum: one program runs the finisher on sumsq = 0
            return [(kernel, (1,), (lp.dummy_table, lp.dummy_sched, lp.partials, lp.counters, ctl),
                     (out, 0, 0, 0, 0, 1, mode, int(clip), norm_bits), self._constexprs("grad", "fp32"))]
        last = len(work) - 1
        return [(kernel, (bp.n_prog,), (bp.table.table, bp.sched, lp.partials, lp.counters, ctl),
                 (out, off, lp.n_parts, bp.n_fast, bp.n_prog, bp.n_prog,
                  mode if k == last else _tk.FINISH_NONE, int(clip), norm_bits),
                 self._constexprs("grad", bp.dtype_name))
                for k, (bp, off) in enumerate(work)]

    def step_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, searching: bool,
                  write_backup: bool, finish: bool = True) -> Optional[Tensor]:
        lp = self._plan(buckets, ctl)
        if searching and not finish:
            out = torch.empty(2, dtype=torch.float64, device=lp.device)
            self._run(lp, self._step_calls(lp, out, _tk.FINISH_SUM, True, hp.search_dir, write_backup),
                      self._step_scalars(hp))
            return out
        self._run(lp, self._finishing_step_calls(lp, ctl, hp, searching, write_backup), self._step_scalars(hp))
        return None

    def update_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                    searching: bool, write_backup: bool) -> None:
        """grad_pass then step_pass, both finishing (base.py), on one plan lookup."""
        lp = self._plan(buckets, ctl)
        self._run(lp, self._finishing_grad_calls(lp, ctl, hp), (loss0,))
        self._run(lp, self._finishing_step_calls(lp, ctl, hp, searching, write_backup), self._step_scalars(hp))

    @staticmethod
    def _clip_args(hp: StepScalars) -> Tuple[bool, int]:
        """The grad kernel's clip flag and max_grad_norm as float64 bits (0 without clipping)."""
        max_norm = hp.max_grad_norm
        return (False, 0) if max_norm is None else (True, _bits(float(max_norm)))

    def _finishing_grad_calls(self, lp: _ListPlan, ctl: Tensor, hp: StepScalars) -> List[tuple]:
        clip, norm_bits = self._clip_args(hp)
        key = ("grad", clip, norm_bits)
        calls = lp.calls.get(key)
        if calls is None:
            calls = lp.calls[key] = self._grad_calls(lp, ctl, _tk.FINISH_CTL, clip, norm_bits)
        return calls

    def _finishing_step_calls(self, lp: _ListPlan, ctl: Tensor, hp: StepScalars, searching: bool,
                              write_backup: bool) -> List[tuple]:
        search_dir = hp.search_dir if searching else Dir.MOMENTUM
        key = ("step", bool(searching), search_dir, bool(write_backup))
        calls = lp.calls.get(key)
        if calls is None:
            mode = _tk.FINISH_CTL if searching else _tk.FINISH_NONE
            calls = lp.calls[key] = self._step_calls(lp, ctl, mode, bool(searching), search_dir,
                                                     bool(write_backup))
        return calls

    def _step_scalars(self, hp: StepScalars) -> tuple:
        """The step kernel's per-step scalar arguments, in its order."""
        hyper_key = (hp.beta1, hp.beta2, hp.eps, hp.smoothing)
        fixed = self._step_fixed
        if fixed[0] != hyper_key:         # the step's constants change only with the hyperparameters
            b1, b2, b3 = float(hp.beta1), float(hp.beta2), float(hp.smoothing)
            fixed = self._step_fixed = (hyper_key, (b1, b2, 1 - b1, 1 - b2, float(hp.eps)),
                                        (_bits(b3), _bits(1 - b3)))
        return (float(hp.eta), *fixed[1], float(hp.bias_correction1), float(hp.bias_correction2),
                *fixed[2])

    def _step_calls(self, lp: _ListPlan, out: Tensor, mode: int, searching: bool, search_dir: Dir,
                    write_backup: bool) -> List[tuple]:
        """step_kernel(table, sched, ctl, partials, counters, out, ..., *scalars) per bucket."""
        if write_backup and not all(bp.has_backups for bp in lp.plans):
            raise ValueError("ALSALS triton backend: write_backup=True but the bucket has no backups")
        ctl, kernel, work = lp.ctl, _tk.step_kernel, lp.work
        if not work:
            if not searching:
                return []
            # no elements: one program finishes on zero sums
            return [(kernel, (1,), (lp.dummy_table, lp.dummy_sched, ctl, lp.partials, lp.counters, out,
                                    0, 0, 0, 0, 1, mode), (),
                     self._constexprs("step", "fp32", True, search_dir, False))]
        last = len(work) - 1
        return [(kernel, (bp.n_prog,), (bp.table.table, bp.sched, ctl, lp.partials, lp.counters, out,
                                        off, lp.n_parts, bp.n_fast, bp.n_prog, bp.n_prog,
                                        mode if k == last else _tk.FINISH_NONE), (),
                 self._constexprs("step", bp.dtype_name, searching, search_dir, write_backup))
                for k, (bp, off) in enumerate(work)]

    def move_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if_fallback: bool = False) -> None:
        lp = self._plan(buckets, ctl)
        # (Dir members and their int values make the same key: IntEnum hashes as int)
        key = ("move", bool(from_backup), src_dir, dst_dir, bool(only_if_fallback))
        calls = lp.calls.get(key)
        if calls is None:
            calls = lp.calls[key] = self._move_calls(lp, bool(from_backup), Dir(src_dir), Dir(dst_dir),
                                                     bool(only_if_fallback))
        self._run(lp, calls, (float(src_eta), float(dst_eta), float(dst_eta - src_eta), float(hp.eps),
                              float(hp.bias_correction1), float(hp.bias_correction2)))

    def _move_calls(self, lp: _ListPlan, from_backup: bool, src_dir: Dir, dst_dir: Dir,
                    only_if_fallback: bool) -> List[tuple]:
        """move_kernel(table, sched, ctl, n_fast, n_prog, only_if_fallback, *scalars) per bucket."""
        if from_backup and not all(bp.has_backups for bp in lp.plans):
            raise ValueError("ALSALS triton backend: from_backup=True but the bucket has no backups")
        if not from_backup and any(bp.dtype_name != "fp32" for bp in lp.plans):
            raise ValueError("ALSALS triton backend: in-place moves (memory_efficient=True) need "
                             "fp32 parameters; got "
                             + ", ".join(bp.dtype_name for bp in lp.plans if bp.dtype_name != "fp32"))
        return [(_tk.move_kernel, (bp.n_prog,), (bp.table.table, bp.sched, lp.ctl, bp.n_fast, bp.n_prog,
                                                 int(only_if_fallback)), (),
                 self._constexprs("move", bp.dtype_name, from_backup, src_dir, dst_dir))
                for bp in lp.plans if bp.n_prog]

    def verdict(self, ctl: Tensor, loss_try: Tensor, dp: DecisionScalars, out: Tensor) -> None:
        b3 = float(dp.beta3)
        held = self._verdict_on
        if held[0] is not ctl:       # the device of the ctl seen last (one per optimizer)
            device = ctl.device
            held = self._verdict_on = (ctl, device.index if device.type == "cuda" else None)
        self._launch_on(held[1], ((_tk.verdict_kernel, (1,), (ctl, loss_try, out), (), self._verdict_meta),),
                        (_bits(float(dp.c) * float(dp.eta)), _bits(b3), _bits(1 - b3)))


__all__ = ["TritonBackend", "unavailable_reason", "VERDICT_SIZE"]
