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
partials, counters and tables are allocated when a bucket list is first seen, and each finishing pass
variant's launch list (kernel, grid, arguments, constexprs) is built once and reused with only
the per-step values (the loss, the step's scalars) spliced in.

Nothing here reads a device value on the host.  Tables and schedules are the CUDA backend's too
(``fused_tables.BucketTable``, cached per bucket in ``bucket.cache``): when the driver bumps
``bucket.grads_version`` only the grad column is rewritten (and uploaded with one non-blocking
copy); with unchanged addresses a pass does no table work at all.

Layouts: a parameter may be non-contiguous if it is dense (e.g. channels_last or transposed) and
its grad, moments and backup share its strides: the kernels then walk its storage in memory
order.  Anything else (``fused_tables.unfusable_reason``) the driver runs on foreach; handed
such a bucket directly, the backend raises a ValueError naming the tensor's shape and strides.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import (
    CTL_SIZE,
    TABLE_COLS,
    VERDICT_SIZE,
    Bucket,
    Ctl,
    DecisionScalars,
    Dir,
    StepScalars,
    TableCol,
    condition_slot,
)
from .fused_tables import (
    FUSED_DTYPES,
    BucketTable,
    float_bits,
    list_scratch,
    same_device,
    schedules_built,
    unfusable_reason,
)


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


_LOSS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CALLS_MAX = 32   # launch lists kept per list (a max_grad_norm changed every step makes new ones)


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


class _ListLaunches:
    """What a pass over one list of buckets needs: the buckets' tables, where each bucket's
    partials start, the list's partials buffer and ticket counters (allocated once, as long as
    the list's first bucket: never freed under a kernel another stream still runs), and the
    passes' launch lists (``calls``: one per pass variant, see ``TritonBackend._run``)."""

    __slots__ = ("tables", "offsets", "work", "n_parts", "partials", "counters", "dummy_table",
                 "dummy_sched", "device", "cuda_index", "ctl", "calls", "calls_schedules")

    def __init__(self, backend: "TritonBackend", buckets: Sequence[Bucket], device: torch.device):
        self.tables = [backend._table(b) for b in buckets]
        self.offsets, total = [], 0
        for bt in self.tables:
            self.offsets.append(total)
            total += bt.n_prog
        self.n_parts = total
        # (table, partials offset) of the buckets with elements (a bucket's program count is fixed)
        self.work = [(bt, off) for bt, off in zip(self.tables, self.offsets) if bt.n_prog]
        self.device = device
        self.partials = torch.empty(2 * max(1, total), dtype=torch.float32, device=device)
        self.counters = torch.zeros(2, dtype=torch.int32, device=device)   # grad, step tickets
        self.dummy_table = torch.zeros(TABLE_COLS, dtype=torch.int64, device=device)
        self.dummy_sched = torch.zeros(2, dtype=torch.int32, device=device)
        self.cuda_index = device.index if device.type == "cuda" else None
        self.ctl: Optional[Tensor] = None           # the last ctl checked against this list
        self.calls: Dict[tuple, List[tuple]] = {}
        self.calls_schedules = -1                   # schedules_built when calls were built


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
        self._empty_lists: Dict[torch.device, _ListLaunches] = {}   # (tests: passes over no bucket)
        self._cx: Dict[tuple, dict] = {}
        self._verdict_on: Tuple[Optional[Tensor], Optional[int]] = (None, None)   # (ctl, CUDA index)
        self._verdict_meta = dict(num_warps=_tk.VERDICT_WARPS, **_tk.COMPILE_OPTIONS)
        self.table_builds = 0     # telemetry for tests: bucket tables built
        self.grad_refreshes = 0   # grad columns rewritten after a grads_version bump

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

    # -- tables and launch lists --------------------------------------------------------------
    def _table(self, bucket: Bucket) -> BucketTable:
        bt = bucket.cache.get(self._cache_key)
        if bt is None:
            bt = bucket.cache[self._cache_key] = BucketTable(bucket, self.chunk, "triton")
            self.table_builds += 1
        return bt

    def _launches(self, buckets: Sequence[Bucket], ctl: Tensor) -> _ListLaunches:
        if len(buckets) == 1:
            # The usual list (one dtype): found without building a key.
            ll = buckets[0].cache.get(self._list_key)
            if ll is None:
                ll = buckets[0].cache[self._list_key] = _ListLaunches(self, buckets, buckets[0].device)
        else:
            ll = list_scratch(buckets, self._list_key, self._empty_lists, ctl.device,
                              lambda device: _ListLaunches(self, buckets, device))
        if ll.ctl is not ctl:
            self._check_ctl(ctl, ll.device)
            ll.ctl = ctl
            ll.calls.clear()
        for bt, b in zip(ll.tables, buckets):
            if bt.grads_version != b.grads_version:
                bt.refresh_grads(b)
                self.grad_refreshes += 1
        if ll.calls_schedules != schedules_built[0] or len(ll.calls) > _CALLS_MAX:
            ll.calls.clear()                        # a bucket's program schedule changed
            ll.calls_schedules = schedules_built[0]
        return ll

    @staticmethod
    def unfusable_reason(bucket: Bucket) -> Optional[str]:
        """Why the kernels cannot take ``bucket`` (``fused_tables.unfusable_reason``), or None:
        the driver runs such a bucket on foreach (``ALSALS._backend_for``)."""
        return unfusable_reason(bucket)

    @staticmethod
    def _check_ctl(ctl: Tensor, device: torch.device) -> None:
        if ctl.dtype != torch.float64 or ctl.numel() != CTL_SIZE \
                or not same_device(ctl.device, device) or not ctl.is_contiguous():
            raise ValueError(f"ALSALS triton backend: ctl must be a contiguous float64 tensor of "
                             f"{CTL_SIZE} on {device}; got {ctl.dtype} {tuple(ctl.shape)} on "
                             f"{ctl.device}")

    # -- launch lists ---------------------------------------------------------------------------
    # A pass is a list of launches whose arguments are fixed for the list's lifetime except the
    # per-step values (the loss, the step's scalars): each entry is (kernel, grid, head, tail,
    # meta) and launches as kernel[grid](*head, *per_step, *tail, **meta).  The finishing passes'
    # lists are built once per pass variant and bucket list (``_ListLaunches.calls``), so such a pass
    # costs one loop of launches on the host; the partial passes of the generic path
    # (finish=False) write fresh ``out`` tensors and build theirs per call.
    def _run(self, ll: _ListLaunches, calls: List[tuple], per_step: tuple) -> None:
        self._launch_on(ll.cuda_index, calls, per_step)

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
        return self._table(bucket).rows.host, int(TableCol.G)

    # -- the passes ---------------------------------------------------------------------------
    def grad_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                  finish: bool = True) -> Optional[Tensor]:
        ll = self._launches(buckets, ctl)
        if finish:
            self._run(ll, self._finishing_grad_calls(ll, ctl, hp), (loss0,))
            return None
        clip, norm_bits = self._clip_args(hp)
        out = torch.empty((), dtype=torch.float64, device=ll.device)
        self._run(ll, self._grad_calls(ll, out, _tk.FINISH_SUM, clip, norm_bits), (loss0,))
        return out

    def _grad_calls(self, ll: _ListLaunches, out: Tensor, mode: int, clip: bool, norm_bits: int) -> List[tuple]:
        """grad_kernel(table, sched, partials, counters, ctl, loss0, out, ...) per bucket."""
        ctl, kernel, work = ll.ctl, _tk.grad_kernel, ll.work
        if not work:   # nothing to sum: one program runs the finisher on sumsq = 0
            return [(kernel, (1,), (ll.dummy_table, ll.dummy_sched, ll.partials, ll.counters, ctl),
                     (out, 0, 0, 0, 0, 1, mode, int(clip), norm_bits), self._constexprs("grad", "fp32"))]
        last = len(work) - 1
        return [(kernel, (bt.n_prog,), (bt.table, bt.sched, ll.partials, ll.counters, ctl),
                 (out, off, ll.n_parts, bt.n_fast, bt.n_prog, bt.n_prog,
                  mode if k == last else _tk.FINISH_NONE, int(clip), norm_bits),
                 self._constexprs("grad", FUSED_DTYPES[bt.dtype]))
                for k, (bt, off) in enumerate(work)]

    def step_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, searching: bool,
                  write_backup: bool, finish: bool = True) -> Optional[Tensor]:
        ll = self._launches(buckets, ctl)
        if searching and not finish:
            out = torch.empty(2, dtype=torch.float64, device=ll.device)
            self._run(ll, self._step_calls(ll, out, _tk.FINISH_SUM, True, hp.search_dir, write_backup),
                      self._step_args(hp))
            return out
        self._run(ll, self._finishing_step_calls(ll, ctl, hp, searching, write_backup), self._step_args(hp))
        return None

    def update_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                    searching: bool, write_backup: bool) -> None:
        """grad_pass then step_pass, both finishing (base.py), on one lookup of the list."""
        ll = self._launches(buckets, ctl)
        self._run(ll, self._finishing_grad_calls(ll, ctl, hp), (loss0,))
        self._run(ll, self._finishing_step_calls(ll, ctl, hp, searching, write_backup), self._step_args(hp))

    @staticmethod
    def _clip_args(hp: StepScalars) -> Tuple[bool, int]:
        """The grad kernel's clip flag and max_grad_norm as float64 bits (0 without clipping)."""
        max_norm = hp.max_grad_norm
        return (False, 0) if max_norm is None else (True, float_bits(float(max_norm)))

    def _finishing_grad_calls(self, ll: _ListLaunches, ctl: Tensor, hp: StepScalars) -> List[tuple]:
        clip, norm_bits = self._clip_args(hp)
        key = ("grad", clip, norm_bits)
        calls = ll.calls.get(key)
        if calls is None:
            calls = ll.calls[key] = self._grad_calls(ll, ctl, _tk.FINISH_CTL, clip, norm_bits)
        return calls

    def _finishing_step_calls(self, ll: _ListLaunches, ctl: Tensor, hp: StepScalars, searching: bool,
                              write_backup: bool) -> List[tuple]:
        search_dir = hp.search_dir if searching else Dir.MOMENTUM
        key = ("step", bool(searching), search_dir, bool(write_backup))
        calls = ll.calls.get(key)
        if calls is None:
            mode = _tk.FINISH_CTL if searching else _tk.FINISH_NONE
            calls = ll.calls[key] = self._step_calls(ll, ctl, mode, bool(searching), search_dir,
                                                     bool(write_backup))
        return calls

    def _step_args(self, hp: StepScalars) -> tuple:
        """The step kernel's per-step scalar arguments, in its order."""
        hyper_key = (hp.beta1, hp.beta2, hp.eps, hp.smoothing)
        fixed = self._step_fixed
        if fixed[0] != hyper_key:         # the step's constants change only with the hyperparameters
            b1, b2, smoothing = float(hp.beta1), float(hp.beta2), float(hp.smoothing)
            fixed = self._step_fixed = (hyper_key, (b1, b2, 1 - b1, 1 - b2, float(hp.eps)),
                                        (float_bits(smoothing), float_bits(1 - smoothing)))
        return (float(hp.eta), *fixed[1], float(hp.bias_correction1), float(hp.bias_correction2),
                *fixed[2])

    def _step_calls(self, ll: _ListLaunches, out: Tensor, mode: int, searching: bool, search_dir: Dir,
                    write_backup: bool) -> List[tuple]:
        """step_kernel(table, sched, ctl, partials, counters, out, ..., *scalars) per bucket."""
        if write_backup and not all(bt.has_backups for bt in ll.tables):
            raise ValueError("ALSALS triton backend: write_backup=True but the bucket has no backups")
        ctl, kernel, work = ll.ctl, _tk.step_kernel, ll.work
        if not work:
            if not searching:
                return []
            # no elements: one program finishes on zero sums
            return [(kernel, (1,), (ll.dummy_table, ll.dummy_sched, ctl, ll.partials, ll.counters, out,
                                    0, 0, 0, 0, 1, mode), (),
                     self._constexprs("step", "fp32", True, search_dir, False))]
        last = len(work) - 1
        return [(kernel, (bt.n_prog,), (bt.table, bt.sched, ctl, ll.partials, ll.counters, out,
                                        off, ll.n_parts, bt.n_fast, bt.n_prog, bt.n_prog,
                                        mode if k == last else _tk.FINISH_NONE), (),
                 self._constexprs("step", FUSED_DTYPES[bt.dtype], searching, search_dir, write_backup))
                for k, (bt, off) in enumerate(work)]

    def move_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if: Optional[Ctl] = None) -> None:
        ll = self._launches(buckets, ctl)
        # (Dir and Ctl members and their int values make the same key: IntEnum hashes as int)
        key = ("move", bool(from_backup), src_dir, dst_dir, only_if)
        calls = ll.calls.get(key)
        if calls is None:
            calls = ll.calls[key] = self._move_calls(ll, bool(from_backup), Dir(src_dir), Dir(dst_dir),
                                                     condition_slot(only_if))
        self._run(ll, calls, (float(src_eta), float(dst_eta), float(dst_eta - src_eta), float(hp.eps),
                              float(hp.bias_correction1), float(hp.bias_correction2)))

    def _move_calls(self, ll: _ListLaunches, from_backup: bool, src_dir: Dir, dst_dir: Dir,
                    only_if: int) -> List[tuple]:
        """move_kernel(table, sched, ctl, n_fast, n_prog, only_if, *scalars) per bucket."""
        if from_backup and not all(bt.has_backups for bt in ll.tables):
            raise ValueError("ALSALS triton backend: from_backup=True but the bucket has no backups")
        if not from_backup and any(FUSED_DTYPES[bt.dtype] != "fp32" for bt in ll.tables):
            raise ValueError("ALSALS triton backend: in-place moves (memory_efficient=True) need "
                             "fp32 parameters; got "
                             + ", ".join(FUSED_DTYPES[bt.dtype] for bt in ll.tables
                                         if bt.dtype != torch.float32))
        return [(_tk.move_kernel, (bt.n_prog,), (bt.table, bt.sched, ll.ctl, bt.n_fast, bt.n_prog,
                                                 only_if), (),
                 self._constexprs("move", FUSED_DTYPES[bt.dtype], from_backup, src_dir, dst_dir))
                for bt in ll.tables if bt.n_prog]

    def verdict(self, ctl: Tensor, loss_try: Tensor, dp: DecisionScalars, out: Tensor) -> None:
        smoothing = float(dp.smoothing)
        held = self._verdict_on
        if held[0] is not ctl:       # the device of the ctl seen last (one per optimizer)
            device = ctl.device
            held = self._verdict_on = (ctl, device.index if device.type == "cuda" else None)
        self._launch_on(held[1], ((_tk.verdict_kernel, (1,), (ctl, loss_try, out), (), self._verdict_meta),),
                        (float_bits(float(dp.c) * float(dp.eta)), float_bits(smoothing),
                         float_bits(1 - smoothing)))


__all__ = ["TritonBackend", "unavailable_reason", "VERDICT_SIZE"]
