"""The tables, schedules and layout rule of both fused GPU backends (Triton and CUDA).

One design, one builder: every bucket gets a ``BucketTable`` (in ``bucket.cache``), which holds

- its table: int64 ``[T, TABLE_COLS]`` (``base.TableCol`` columns, one row per tensor: raw
  addresses, numel, weight decay as float64 bits), a CPU ``HostTable`` with its device copy;
- its schedule: int32 ``[P, 2]`` (table row, chunk index) per program, aligned full chunks first
  (``n_fast`` programs: every address 16-byte aligned and ``chunk`` elements, the kernels' vector
  or unmasked path), then tails and misaligned tensors' chunks, each group in tensor order.  An
  all-empty bucket has one row ``(-1, 0)`` and ``n_prog == 0`` (the CUDA op launches that one
  program with no work so its finishers still run; the Triton backend launches nothing for it).
  The order of the programs is the order in which the last program adds the fp32 partials
  (deterministic: it depends only on the addresses' alignment and the sizes).

``unfusable_reason`` is the one rule for what the fused kernels cannot take (a dtype other than
fp32/bf16/fp16, a non-dense view, a gradient, moment or backup in another dtype, device or layout
than its parameter).  The driver asks it once per (device, dtype) bucket when it builds its plan
and runs such a bucket on foreach (``ALSALS._backend_for``); the backends call
``check_bucket``, which raises with the same sentence, so a bucket handed to them directly is
refused, never silently run elsewhere.

Nothing here runs on the hot path except ``BucketTable.refresh_grads``, which runs only when the
driver bumped ``bucket.grads_version`` (gradients at new addresses) and is a few C-level maps.
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor

from .base import TABLE_COLS, Bucket, TableCol
from .host_table import HostTable

# The parameter dtypes the fused kernels take (moments are fp32 for all three), with the names
# the Triton kernels' specializations use.
FUSED_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MAX_PROGRAMS = 2 ** 31 - 1          # one launch's grid
_G = int(TableCol.G)
_is_contiguous = Tensor.is_contiguous
_MISALIGNED = (15).__and__          # address -> nonzero unless 16-byte aligned
_pack_d = struct.Struct("<d").pack
_unpack_q = struct.Struct("<q").unpack

# Schedules built so far by any table (cached launch lists hold schedules: a user of a table
# compares this count to know whether one may have changed).  A list, mutated in place, so that
# importers read the current value.
schedules_built = [0]
_T = TypeVar("_T")


def float_bits(x: float) -> int:
    """The int64 bit pattern of a float64 (how fp64 host scalars reach the kernels)."""
    return _unpack_q(_pack_d(x))[0]


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: torch.device("cuda") != torch.device("cuda:0") as objects,
    though a bucket built on the former holds tensors that report the latter."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or (a.index is not None and b.index is not None):
        return a == b
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def _strides(t: Tensor) -> tuple:
    """The strides that matter (size-1 dims carry arbitrary strides)."""
    return tuple(st for s, st in zip(t.shape, t.stride()) if s != 1)


def dense(t: Tensor) -> bool:
    """True if ``t`` covers exactly numel consecutive elements of memory (any dim order)."""
    if t.numel() <= 1 or t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def like_problem(i: int, p: Tensor, what: str, t: Tensor, dtype: torch.dtype) -> Optional[str]:
    """Why tensor ``t`` (the ``what`` of parameter ``i``) cannot be walked with ``p``, or None."""
    if t.dtype != dtype or t.device != p.device or t.shape != p.shape:
        return (f"the {what} of parameter {i} is {t.dtype} {tuple(t.shape)} on {t.device}; "
                f"expected {dtype} {tuple(p.shape)} on {p.device}")
    if t.numel() > 1 and _strides(t) != _strides(p):
        return (f"parameter {i} of shape {tuple(p.shape)} has strides {p.stride()} but its {what} "
                f"has strides {t.stride()}; the fused kernels need one memory layout for both")
    return None


def unfusable_reason(bucket: Bucket) -> Optional[str]:
    """Why the fused kernels cannot take ``bucket`` (the sentence says which tensor), or None."""
    if bucket.dtype not in FUSED_DTYPES:
        return f"the fused kernels take float32, bfloat16 and float16 parameters, not {bucket.dtype}"
    n = len(bucket.params)
    lists: Dict[str, Sequence[object]] = {"exp_avgs": bucket.exp_avgs, "exp_avg_sqs": bucket.exp_avg_sqs,
             "weight_decays": bucket.weight_decays}
    if bucket.grads:
        lists["grads"] = bucket.grads
    if bucket.backups:
        lists["backups"] = bucket.backups
    for name, lst in lists.items():
        if len(lst) != n:
            return f"the bucket has {n} params but {len(lst)} {name}"
    for i, p in enumerate(bucket.params):
        if p.dtype != bucket.dtype or not same_device(p.device, bucket.device):
            return (f"parameter {i} is {p.dtype} on {p.device}, its bucket is {bucket.dtype} on "
                    f"{bucket.device}")
        if not dense(p):
            return (f"parameter {i} of shape {tuple(p.shape)} has strides {p.stride()}, which do "
                    "not cover its elements densely (an overlapping or strided view)")
        others = [("exp_avg", bucket.exp_avgs[i], torch.float32),
                  ("exp_avg_sq", bucket.exp_avg_sqs[i], torch.float32)]
        if bucket.grads:
            others.append(("grad", bucket.grads[i], bucket.dtype))
        if bucket.backups:
            others.append(("backup", bucket.backups[i], bucket.dtype))
        for what, t, dtype in others:
            problem = like_problem(i, p, what, t, dtype)
            if problem is not None:
                return problem
    return None


def check_bucket(bucket: Bucket, who: str) -> None:
    """ValueError naming the problem if the fused kernels cannot take ``bucket``."""
    problem = unfusable_reason(bucket)
    if problem is not None:
        raise ValueError(f"ALSALS {who} backend: {problem} (the driver runs such parameters on "
                         "foreach; call the backend only with buckets it can take)")


def schedule(numels: Sequence[int], aligned: Sequence[bool], chunk: int) -> Tuple[Tensor, int, int]:
    """(sched int32 [max(1, P), 2] on the CPU, n_fast, P): the module docstring's order, from
    Python ints only (nothing read from a device)."""
    counts = [-(-int(n) // chunk) for n in numels]
    full = [int(n) // chunk if ok else 0 for n, ok in zip(numels, aligned)]
    n_prog, n_fast = sum(counts), sum(full)
    if n_prog > MAX_PROGRAMS:
        raise ValueError(f"ALSALS: {n_prog} chunks of {chunk} elements in one bucket: more programs "
                         "than one launch holds")
    if n_prog == 0:
        return torch.tensor([[-1, 0]], dtype=torch.int32), 0, 0
    pairs = [(row, c) for row, f in enumerate(full) for c in range(f)]
    pairs += [(row, c) for row, (f, n) in enumerate(zip(full, counts)) for c in range(f, n)]
    return torch.tensor(pairs, dtype=torch.int32), n_fast, n_prog


class BucketTable:
    """The table and schedule of one bucket (module docstring); built once per bucket, with only
    the grad column (and the schedule, if an alignment changed) rewritten afterwards."""

    __slots__ = ("rows", "table", "sched", "n_fast", "n_prog", "programs", "dtype", "has_backups",
                 "numels", "chunk", "device", "contiguous", "others_aligned", "aligned",
                 "all_aligned", "grads_version", "who")

    def __init__(self, bucket: Bucket, chunk: int, who: str):
        check_bucket(bucket, who)
        self.who = who
        self.chunk = chunk
        self.device = bucket.device
        self.dtype = bucket.dtype
        self.has_backups = bool(bucket.backups) or not bucket.params   # (nothing to back up)
        self.numels = [p.numel() for p in bucket.params]
        self.contiguous = all(map(_is_contiguous, bucket.params))
        rows, self.others_aligned = [], []
        for i, p in enumerate(bucket.params):
            row = [0] * TABLE_COLS
            row[TableCol.W] = p.data_ptr()
            row[TableCol.M] = bucket.exp_avgs[i].data_ptr()
            row[TableCol.V] = bucket.exp_avg_sqs[i].data_ptr()
            row[TableCol.BACKUP] = bucket.backups[i].data_ptr() if bucket.backups else 0
            row[TableCol.G] = bucket.grads[i].data_ptr() if bucket.grads else 0
            row[TableCol.NUMEL] = self.numels[i]
            row[TableCol.WD_BITS] = float_bits(float(bucket.weight_decays[i]))
            self.others_aligned.append(not any(map(_MISALIGNED, (
                row[TableCol.W], row[TableCol.M], row[TableCol.V], row[TableCol.BACKUP]))))
            rows.append(row)
        self.rows = HostTable(rows, bucket.device)
        self.table = self.rows.table          # what the kernels read (the host table on the CPU)
        # built outside a pass (no grads yet): the first pass with grads fills the column
        self.grads_version = bucket.grads_version if (bucket.grads or not bucket.params) else -1
        self.aligned: Optional[List[bool]] = None
        self.sched = self.rows.table          # (set by _schedule)
        self.n_fast = self.n_prog = self.programs = 0
        self.all_aligned = False
        self._schedule([r[TableCol.G] for r in rows])

    def _schedule(self, grad_ptrs: Sequence[int]) -> None:
        """(Re)build the schedule if an alignment changed.  Host values only."""
        aligned = [a and not g & 15 for a, g in zip(self.others_aligned, grad_ptrs)]
        if aligned == self.aligned:
            return
        schedules_built[0] += 1
        sched, self.n_fast, self.n_prog = schedule(self.numels, aligned, self.chunk)
        if self.device.type == "cuda":
            sched = sched.pin_memory().to(self.device, non_blocking=True)
        self.sched, self.programs, self.aligned = sched, sched.shape[0], aligned
        self.all_aligned = all(aligned)

    def refresh_grads(self, bucket: Bucket) -> None:
        """The driver bumped grads_version: rewrite the grad column (and the schedule if an
        alignment changed); nothing else.  Kept to a few C-level maps over the list (it may run
        every step: with set_to_none the allocator can hand grads back at permuted addresses):
        the addresses are the driver's ``bucket.grad_ptrs``; shape, dtype and device are the
        driver's check (autograd guarantees them for .grad), and so is the layout (a gradient
        in another layout than at the plan's build makes the driver rebuild its plan); the check
        here is one is_contiguous() per grad when every param is contiguous."""
        if bucket.native_grads:
            # The driver's native reader wrote the column and checked every layout (host_ext).
            self.rows.upload()
            if not (self.all_aligned and not bucket.grads_misaligned):
                self._schedule(self.rows.column(_G, len(self.numels)))
            self.grads_version = bucket.grads_version
            return
        grads = bucket.grads
        if len(grads) != len(self.numels):
            raise ValueError(f"ALSALS {self.who} backend: bucket has {len(self.numels)} params but "
                             f"{len(grads)} grads (grads are read during a pass only)")
        if not (self.contiguous and all(map(_is_contiguous, grads))):
            for i, (p, g) in enumerate(zip(bucket.params, grads)):
                problem = like_problem(i, p, "grad", g, self.dtype)
                if problem is not None:
                    raise ValueError(f"ALSALS {self.who} backend: {problem}")
        ptrs = bucket.grad_ptrs
        if len(ptrs) != len(grads):
            raise ValueError(f"ALSALS {self.who} backend: bucket.grad_ptrs must hold the addresses "
                             "of bucket.grads (Bucket.replace_grads sets both)")
        self.rows.set_column(_G, ptrs)
        self.rows.upload()
        if not (self.all_aligned and not any(map(_MISALIGNED, ptrs))):
            self._schedule(ptrs)
        self.grads_version = bucket.grads_version


def list_scratch(buckets: Sequence[Bucket], key: str, no_buckets: Dict[Any, _T], device: torch.device,
                 make: Callable[[torch.device], _T]) -> _T:
    """``make(device)`` for one list of buckets, made once and kept in the list's first bucket's
    cache (a pass's partials and tickets, its launch lists): it lives as long as the driver's
    plan that holds the buckets, so two optimizers or two lists of one optimizer never share it
    (each may step on its own stream) and nothing is freed or regrown under a kernel that may
    still use it.  A list of no buckets (tests) keeps its object in ``no_buckets``."""
    if not buckets:
        held = no_buckets.get(device)
        if held is None:
            held = no_buckets[device] = make(device)
        return held
    cache = buckets[0].cache
    if len(buckets) > 1:
        key = key + ":" + ",".join([str(b.uid) for b in buckets])
    held = cache.get(key)
    if held is None:
        held = cache[key] = make(buckets[0].device)
    return held
