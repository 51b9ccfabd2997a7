"""The Triton backend: each pass is one fused launch over every tensor of a bucket.

Kernels live in ``alsals_fused.triton_kernels`` (see its docstring for the table/schedule layout).
This module builds the per-bucket device tables, caches them, and launches:

- ``grad_sumsq``: ``grad_sumsq_kernel`` (fp32 partials) + ``finish_kernel`` (fp64 sum).
- ``step_pass``: ``step_kernel`` (+ ``finish_kernel`` when searching: fp32 partials -> fp64 [2]).
- ``move_pass``: ``move_kernel`` (one launch; skip/fallback decided on the device).

Nothing here reads a device value on the host: SEARCH/UPDATE, the skip flag and
``only_if_fallback`` are resolved inside the kernels from ``ctrl``.  Tables are keyed on the
tensors' data_ptr, numel and dtype (never id()), rebuilt when any of them changes (grads freed by
``zero_grad(set_to_none=True)`` usually come back at the same addresses), and uploaded from pinned
memory with a non-blocking copy, so a rebuild does not sync either.

Layouts: a parameter may be non-contiguous if it is dense (e.g. channels_last or transposed) and
its grad, moments and backup share its strides: the kernels then walk its storage in memory
order.  Anything else (overlapping or gapped views) is rejected with a ValueError naming the
tensor's shape and strides.
"""
from __future__ import annotations

import os
import struct
from collections import OrderedDict
from contextlib import nullcontext
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .base import CTRL_SIZE, Bucket, Dir, StepScalars


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
_CACHE_SIZE = 8   # tables kept per backend (several optimizers, or grads that move around)


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


def _direction_mode(direction: Dir, hp: StepScalars) -> int:
    """Dir -> kernel mode; the part that depends on ctrl[FALLBACK] stays for the device."""
    if direction is Dir.MOMENTUM:
        return _tk.MODE_MOMENTUM
    if direction is Dir.GRAD:
        return _tk.MODE_GRAD
    if direction is Dir.SEARCH:
        return _tk.MODE_FALLBACK if hp.momentum_search else _tk.MODE_GRAD
    return _tk.MODE_FALLBACK      # UPDATE


class _Plan:
    """The device tables of one set of tensors."""

    __slots__ = ("table", "sched", "programs", "has_backups")

    def __init__(self, table: Tensor, sched: Tensor, programs: int, has_backups: bool):
        self.table, self.sched, self.programs, self.has_backups = table, sched, programs, has_backups


class TritonBackend:
    name = "triton"

    def __init__(self, block: Optional[int] = None, iters: Optional[int] = None):
        # block/iters exist for tests (small chunks exercise the multi-program paths cheaply).
        if _tk is None:
            raise ImportError(f"the Triton backend needs triton ({_IMPORT_ERROR})")
        self.block = block or _tk.BLOCK
        self.iters = iters or _tk.ITERS
        self.chunk = self.block * self.iters
        self._plans: "OrderedDict[tuple, _Plan]" = OrderedDict()
        self._scheds: "OrderedDict[tuple, Tuple[Tensor, int]]" = OrderedDict()
        self.table_builds = 0     # telemetry for tests: how often a table was (re)built

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype in _DTYPE_NAMES and unavailable_reason(device) is None

    # -- tables -------------------------------------------------------------------------------
    def _plan(self, bucket: Bucket) -> _Plan:
        # Checked on every pass, so kept cheap (C-level map over the lists).
        ptr, backups = Tensor.data_ptr, bucket.backups
        numels = tuple(map(Tensor.numel, bucket.params))
        key = (bucket.device, bucket.dtype, len(backups), tuple(map(ptr, bucket.params)),
               tuple(map(ptr, bucket.grads)), tuple(map(ptr, bucket.exp_avgs)),
               tuple(map(ptr, bucket.exp_avg_sqs)), tuple(map(ptr, backups)), numels,
               tuple(bucket.weight_decays))
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = self._build(bucket, numels)
        self._plans[key] = plan
        if len(self._plans) > _CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def _validate(self, bucket: Bucket) -> None:
        n = len(bucket.params)
        lists = {"grads": bucket.grads, "exp_avgs": bucket.exp_avgs,
                 "exp_avg_sqs": bucket.exp_avg_sqs, "weight_decays": bucket.weight_decays}
        if bucket.backups:
            lists["backups"] = bucket.backups
        for name, lst in lists.items():
            if len(lst) != n:
                raise ValueError(f"ALSALS triton backend: bucket has {n} params but {len(lst)} {name}")
        if bucket.dtype not in _DTYPE_NAMES:
            raise ValueError(f"ALSALS triton backend: unsupported dtype {bucket.dtype}")
        for i, p in enumerate(bucket.params):
            others = [("grad", bucket.grads[i], bucket.dtype),
                      ("exp_avg", bucket.exp_avgs[i], torch.float32),
                      ("exp_avg_sq", bucket.exp_avg_sqs[i], torch.float32)]
            if bucket.backups:
                others.append(("backup", bucket.backups[i], bucket.dtype))
            if p.dtype != bucket.dtype or not _same_device(p.device, bucket.device):
                raise ValueError(f"ALSALS triton backend: parameter {i} is {p.dtype} on {p.device}, "
                                 f"its bucket is {bucket.dtype} on {bucket.device}")
            if not _dense(p):
                raise ValueError(
                    f"ALSALS triton backend: parameter {i} of shape {tuple(p.shape)} has strides "
                    f"{p.stride()}, which do not cover its elements densely (an overlapping or "
                    "strided view); pass a contiguous parameter (or use backend='foreach')")
            for what, t, dtype in others:
                if t.dtype != dtype or t.device != p.device or t.shape != p.shape:
                    raise ValueError(
                        f"ALSALS triton backend: the {what} of parameter {i} is {t.dtype} "
                        f"{tuple(t.shape)} on {t.device}; expected {dtype} {tuple(p.shape)} on "
                        f"{p.device}")
                if t.numel() > 1 and _layout(t) != _layout(p):
                    raise ValueError(
                        f"ALSALS triton backend: parameter {i} of shape {tuple(p.shape)} has "
                        f"strides {p.stride()} but its {what} has strides {t.stride()}; the fused "
                        "kernels need one memory layout for both (or use backend='foreach')")

    def _upload(self, host: Tensor, device: torch.device) -> Tensor:
        if device.type != "cuda":
            return host
        # Pinned staging + non_blocking: no host sync; torch's pinned caching allocator does not
        # hand the staging block out again before the copy has completed.
        return host.pin_memory().to(device, non_blocking=True)

    def _schedule(self, numels: tuple, device: torch.device) -> Tuple[Tensor, int]:
        key = (device, self.chunk, numels)
        hit = self._scheds.get(key)
        if hit is not None:
            self._scheds.move_to_end(key)
            return hit
        # Python ints only: no tensor is read back on the host, even here.
        counts = [-(-n // self.chunk) for n in numels]
        if counts and max(counts) >= 2 ** 31:
            raise ValueError("ALSALS triton backend: a tensor has more than 2**31 chunks")
        pairs = [(row, c) for row, count in enumerate(counts) for c in range(count)]
        programs = len(pairs)
        sched = torch.tensor(pairs, dtype=torch.int32).reshape(programs, 2)
        hit = (self._upload(sched, device), programs)
        self._scheds[key] = hit
        if len(self._scheds) > _CACHE_SIZE:
            self._scheds.popitem(last=False)
        return hit

    def _build(self, bucket: Bucket, numels: tuple) -> _Plan:
        self._validate(bucket)
        has_backups = bool(bucket.backups)
        rows: List[List[int]] = []
        for i, p in enumerate(bucket.params):
            wd_bits = struct.unpack("<q", struct.pack("<d", float(bucket.weight_decays[i])))[0]
            rows.append([p.data_ptr(), bucket.grads[i].data_ptr(), bucket.exp_avgs[i].data_ptr(),
                         bucket.exp_avg_sqs[i].data_ptr(),
                         bucket.backups[i].data_ptr() if has_backups else 0,
                         p.numel(), wd_bits, 0])
        host = torch.tensor(rows, dtype=torch.int64).reshape(-1, _tk.TABLE_COLS)
        table = self._upload(host, bucket.device)
        sched, programs = self._schedule(numels, bucket.device)
        self.table_builds += 1
        return _Plan(table, sched, programs, has_backups)

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _device_ctx(device: torch.device):
        if device.type == "cuda" and device.index is not None \
                and device.index != torch.cuda.current_device():
            return torch.cuda.device(device)
        return nullcontext()

    @staticmethod
    def _check_ctrl(ctrl: Tensor, device: torch.device) -> None:
        if ctrl.dtype != torch.float32 or ctrl.numel() != CTRL_SIZE or not _same_device(ctrl.device, device) \
                or not ctrl.is_contiguous():
            raise ValueError(f"ALSALS triton backend: ctrl must be a contiguous float32 tensor of "
                             f"{CTRL_SIZE} on {device}; got {ctrl.dtype} {tuple(ctrl.shape)} on "
                             f"{ctrl.device}")

    def _finish(self, partials: Tensor, out: Tensor, n: int, k: int) -> None:
        cx = _tk.kernels.finish_constexprs(k)
        _tk.finish_kernel[(1,)](partials, out, n, num_warps=_tk.FINISH_WARPS, **cx)

    # -- the passes ---------------------------------------------------------------------------
    def grad_sumsq(self, bucket: Bucket) -> Tensor:
        if not bucket.params:
            return torch.zeros((), dtype=torch.float64, device=bucket.device)
        plan = self._plan(bucket)
        if plan.programs == 0:
            return torch.zeros((), dtype=torch.float64, device=bucket.device)
        out = torch.empty((), dtype=torch.float64, device=bucket.device)   # the finisher fills it
        partials = torch.empty(plan.programs, dtype=torch.float32, device=bucket.device)
        cx = _tk.kernels.sumsq_constexprs(_DTYPE_NAMES[bucket.dtype], self.block, self.iters)
        with self._device_ctx(bucket.device):
            _tk.grad_sumsq_kernel[(plan.programs,)](plan.table, plan.sched, partials,
                                                    num_warps=_tk.NUM_WARPS, **cx)
            self._finish(partials, out, plan.programs, 1)
        return out

    def step_pass(self, bucket: Bucket, hp: StepScalars, ctrl: Tensor, *, searching: bool,
                  write_backup: bool) -> Optional[Tensor]:
        def zeros():
            return torch.zeros(2, dtype=torch.float64, device=bucket.device) if searching else None

        if not bucket.params:
            return zeros()
        self._check_ctrl(ctrl, bucket.device)
        plan = self._plan(bucket)
        if write_backup and not plan.has_backups:
            raise ValueError("ALSALS triton backend: write_backup=True but the bucket has no backups")
        if plan.programs == 0:
            return zeros()
        # [sum(g*d_nominal), sum(g*g*p)], written by the finisher (zeros when ctrl[SKIP] is set)
        dots = torch.empty(2, dtype=torch.float64, device=bucket.device) if searching else None
        partials = torch.empty((plan.programs if searching else 1, 2), dtype=torch.float32,
                               device=bucket.device)
        cx = _tk.kernels.step_constexprs(_DTYPE_NAMES[bucket.dtype], searching,
                                         hp.momentum_search, write_backup, self.block, self.iters)
        with self._device_ctx(bucket.device):
            # Per-step scalars go in as fp32 arguments: not specialized on, so no recompilation.
            _tk.step_kernel[(plan.programs,)](
                plan.table, plan.sched, ctrl, partials, float(hp.eta), float(hp.beta1),
                float(hp.beta2), float(1 - hp.beta1), float(1 - hp.beta2), float(hp.eps),
                float(hp.bias_correction1), float(hp.bias_correction2),
                num_warps=_tk.NUM_WARPS, **cx)
            if searching:
                self._finish(partials, dots, plan.programs, 2)
        return dots

    def move_pass(self, bucket: Bucket, hp: StepScalars, ctrl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if_fallback: bool = False) -> None:
        if not bucket.params:
            return
        self._check_ctrl(ctrl, bucket.device)
        plan = self._plan(bucket)
        if from_backup and not plan.has_backups:
            raise ValueError("ALSALS triton backend: from_backup=True but the bucket has no backups")
        if not from_backup and bucket.dtype != torch.float32:
            raise ValueError("ALSALS triton backend: in-place moves (memory_efficient=True) need "
                             f"fp32 parameters; got {bucket.dtype}")
        if plan.programs == 0:
            return
        cx = _tk.kernels.move_constexprs(_DTYPE_NAMES[bucket.dtype], from_backup,
                                         _direction_mode(src_dir, hp), _direction_mode(dst_dir, hp),
                                         self.block, self.iters)
        with self._device_ctx(bucket.device):
            _tk.move_kernel[(plan.programs,)](
                plan.table, plan.sched, ctrl, int(bool(only_if_fallback)), float(src_eta),
                float(dst_eta), float(dst_eta - src_eta), float(hp.eps),
                float(hp.bias_correction1), float(hp.bias_correction2),
                num_warps=_tk.NUM_WARPS, **cx)
