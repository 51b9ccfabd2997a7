"""The contract every ALSALS backend implements (contract v2).

The line-search driver (``alsals_fused.optimizer``) owns the closure, RNG replay, host state
(eta, t, counters) and the search loop.  A backend owns the element-wise passes over the
parameters and the small device decisions that sit between them, over a *list of buckets* (all
buckets of one device that this backend runs; a bucket holds the tensors of one device and dtype).

The control vector ``ctl``
--------------------------
One float64 device vector of ``CTL_SIZE`` per optimizer, on the parameters' device, slots named
by ``Ctl``.  ``H``, ``S`` and ``PENDING`` persist across steps (they are optimizer state); the
other slots are rewritten every step.  ``UNDO`` is written by the driver alone, right before the
one move that reads it (the fp16 overflow guard), so it is never saved.  Nothing in a backend
reads ``ctl`` on the host unless the backend is meant to sync (the reference and foreach backends
may; see their docstrings).

Passes (``buckets`` is a list of ``Bucket``; ``hp`` a ``StepScalars``)
---------------------------------------------------------------------
``grad_pass(buckets, ctl, loss0, hp, *, finish=True) -> Optional[Tensor]``
    ``sumsq`` = sum of g*g over every bucket (fp32 per-chunk partials, fp64 fixed-order sum; an
    fp32 overflow counts as not finite).  ``finish=True``: runs the *grad finisher* on
    ``loss0`` (a 0-dim device tensor of any float dtype: the closure's loss as it returned it,
    or its float64 mean over the ranks; read as float64) and returns None::

        finite = isfinite(L0) & isfinite(sumsq)
        ctl[SCALE] = min(1, max_grad_norm / (sqrt(sumsq) + 1e-6)) if finite and max_grad_norm else 1
        ctl[SKIP] = !finite; ctl[PENDING] += ctl[SKIP]; ctl[FALLBACK] = 0; ctl[LOSS0] = L0

    ``finish=False``: returns the float64 0-dim ``sumsq`` and writes nothing (the driver's path
    for mixed backends or sharded parameters; it then calls ``decisions.finish_grad``).

``step_pass(buckets, hp, ctl, *, searching, write_backup, finish=True) -> Optional[Tensor]``
    The fused ADAM step with g read as ``g * ctl[SCALE]`` (SCALE rounded to the math type):
    ``m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g``; if ``write_backup`` copies w into
    ``bucket.backups``; writes ``w = cand(hp.eta, dir)`` with ``dir = Dir.MOMENTUM`` when not
    searching and ``hp.search_dir`` when searching.  Not searching: returns None.  Searching
    with ``finish=True``: runs the *step finisher* and returns None::

        ctl[SLOPE]      = sum(g * d(hp.search_dir))     # fixed-order fp64 sum of fp32 partials
        ctl[SLOPE_GRAD] = sum(g * g * p)                # (== SLOPE when search_dir is GRAD)
        ctl[S_NEW]      = hp.smoothing * ctl[S] + (1 - hp.smoothing) * ctl[SLOPE]
        ctl[FALLBACK]   = !ctl[SKIP] & (ctl[S_NEW] <= 0)

    Searching with ``finish=False``: returns float64[2] ``[SLOPE, SLOPE_GRAD]`` partial sums of
    these buckets and writes no ctl slot (driver then calls ``decisions.finish_slope``).
    ``ctl[SKIP]`` set: writes nothing at all (partials returned as zeros).

``update_pass(buckets, ctl, loss0, hp, *, searching, write_backup) -> None`` (optional)
    Exactly ``grad_pass(buckets, ctl, loss0, hp)`` then ``step_pass(buckets, hp, ctl,
    searching=searching, write_backup=write_backup)``, both finishing: the driver's call when all
    of a step's buckets run on this backend unsharded, so that the two passes cost one host call
    (the triton and cuda backends have it; the driver makes the two calls for one without it).

``move_pass(buckets, hp, ctl, *, src_eta, src_dir, dst_eta, dst_dir, from_backup, only_if=None)``
    Rewrites the params from ``cand(src_eta, src_dir)`` to ``cand(dst_eta, dst_dir)``;
    ``dst_eta == 0`` is the restore to w0.  ``from_backup`` reads w0 from the backups; otherwise
    (memory_efficient) the move is in place, ``w -= (dst_eta - src_eta) * (d + wd*w0)`` when the
    resolved directions agree, recovering ``w0 = (w + src_eta*d_src) / (1 - src_eta*wd)`` where
    needed.  ``Dir.UPDATE`` resolves on the device (GRAD if ctl[FALLBACK] else MOMENTUM).
    ``only_if`` (one of ``MOVE_CONDITIONS``, or None: unconditional) names the ctl slot that
    gates the move: ``Ctl.FALLBACK`` for the fix-up of a step that fell back, ``Ctl.UNDO`` for
    the restore of an fp16 candidate that is not finite; kernels take it as the slot index, -1
    for None (``condition_slot``).  A pass with nothing to do (ctl[SKIP] set, or ctl[only_if]
    == 0) returns before touching memory.

``verdict(ctl, loss_try, dp, out) -> None``
    The per-trial decision (``dp`` a ``DecisionScalars``; ``out`` float64[VERDICT_SIZE] on the
    device; ``loss_try`` a 0-dim device tensor of any float dtype, already averaged over ranks)::

        L0 = ctl[LOSS0]; L = float64(loss_try); diff = L0 - L
        fb = ctl[FALLBACK] != 0; finite = ctl[SKIP] == 0
        h_new = smoothing*ctl[H] + (1-smoothing)*diff
        ok = finite & isfinite(L) & ((L == L0) | (fb ? diff >= c*eta*ctl[SLOPE_GRAD]
                                                      : h_new >= c*eta*ctl[S_NEW]))
        out = [ok, finite, fb, L0, L, fb ? ctl[SLOPE_GRAD] : ctl[SLOPE], ctl[PENDING], h_new]
        ctl[PENDING] = 0
        if ok and not fb: ctl[H] = h_new; ctl[S] = ctl[S_NEW]

    ``decisions.verdict`` is the reference (torch ops); fused backends do it in one kernel.

Math (all passes): ``cand(eta, d) = w0 - eta * (d + wd * w0)`` in the math type (fp32; fp64 for
fp64 params) in exactly that order, ``p = 1 / (sqrt(v / bias_correction2) + eps)``,
``m_hat * p = (m / bias_correction1) / (sqrt(v / bias_correction2) + eps)`` and
``g * p = g / (sqrt(v / bias_correction2) + eps)``.  Fused backends match the reference within
fp32 rounding; they need not be bit-identical.

Host scalars (eta, bias corrections, ...) arrive in ``StepScalars``/``DecisionScalars`` and are
passed to kernels as arguments, never as compile-time constants.

Shared GPU constants: ``CHUNK`` elements per program/partial (partials fp32, one per chunk,
finished in fp64 in fixed order) and the per-tensor table layout ``TableCol`` (``TABLE_COLS``
int64 columns: pointers of w, g, m, v, backup (0 if none), numel, the weight decay's float64
bits, a spare column).
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor


class Ctl(enum.IntEnum):
    """Slots of the float64 device control vector ``ctl`` (see the module docstring)."""

    SCALE = 0       # clip coefficient (1.0 without clipping or when not finite)
    SKIP = 1        # 1.0: L0 or a gradient is not finite: no pass writes anything this step
    FALLBACK = 2    # 1.0: s_new <= 0: this step searches along g*p with the plain test
    LOSS0 = 3       # L0 as float64 (averaged over ranks)
    SLOPE = 4       # sum(g*d) along the nominal search direction
    SLOPE_GRAD = 5  # sum(g*g*p)
    S_NEW = 6       # smoothing*S + (1-smoothing)*SLOPE
    H = 7           # smoothed decrease (persistent)
    S = 8           # smoothed slope (persistent)
    PENDING = 9     # non-finite steps the host has not seen yet (persistent until a verdict)
    UNDO = 10       # 1.0: a written fp16 candidate is not finite: the guarded move goes back to w0


CTL_SIZE = 16  # slots 11..15 reserved

# The slots a move can be conditioned on (``move_pass(only_if=...)``).
MOVE_CONDITIONS = (Ctl.FALLBACK, Ctl.UNDO)


def condition_slot(only_if: Optional[Ctl]) -> int:
    """The ctl slot a move's ``only_if`` names, as the kernels take it: -1 for None."""
    if only_if is None:
        return -1
    if only_if not in MOVE_CONDITIONS:
        raise ValueError("move_pass: only_if is None or a slot of MOVE_CONDITIONS (Ctl.FALLBACK, "
                         f"Ctl.UNDO), not {only_if!r}")
    return int(only_if)


class Verdict(enum.IntEnum):
    """Slots of the float64 verdict vector, written once per trial and read by the host once."""

    ACCEPT = 0
    FINITE = 1
    FALLBACK = 2
    LOSS0 = 3
    LOSS_TRY = 4
    SLOPE_USED = 5
    PENDING = 6
    H_NEW = 7


VERDICT_SIZE = 8

# What step() raises under CUDA graph capture (the driver checks once per step, before any work).
GRAPH_CAPTURE_HELP = (
    "ALSALS.step() cannot run under CUDA graph capture: eta, the bias corrections and the line "
    "search are host decisions passed to the kernels as arguments, and a searching step reads a "
    "small verdict from the device once per trial, so a captured step would replay this step's "
    "eta and bias corrections on every replay (or fail at its first read).  Supported: capture or "
    "compile the model's forward and backward (torch.cuda.make_graphed_callables, torch.compile) "
    "and call opt.step() outside the capture, with a closure that calls the graphed model.")


class Dir(enum.IntEnum):
    """Directions a candidate is built along; kernels use these values as-is."""

    MOMENTUM = 0  # m_hat * p
    GRAD = 1      # g * p
    UPDATE = 2    # GRAD if ctl[FALLBACK] else MOMENTUM (resolved on the device)


class TableCol(enum.IntEnum):
    """Columns of the per-tensor int64 table the GPU backends build (one row per tensor)."""

    W = 0
    G = 1
    M = 2
    V = 3
    BACKUP = 4    # 0 when the bucket has no backups (memory_efficient)
    NUMEL = 5
    WD_BITS = 6   # the weight decay as the bits of a float64
    SPARE = 7


TABLE_COLS = 8
CHUNK = 4096   # elements per program / per fp32 partial, for both GPU backends


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math type of a parameter dtype, which is also its moments' dtype (docs/algorithm.md
    section 1): fp32 for 16- and 32-bit parameters, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_ctl(device) -> Tensor:
    """A zeroed control vector on ``device`` (h = s = 0, no pending skips)."""
    return torch.zeros(CTL_SIZE, dtype=torch.float64, device=device)


class StepScalars(NamedTuple):
    """Host scalars of one step; passed as kernel arguments, never baked in at compile time.

    (A NamedTuple: immutable like a frozen dataclass at a tenth of its construction cost, which
    the driver pays every step.)"""

    eta: float                # step size of the candidate the pass writes
    beta1: float
    beta2: float
    eps: float
    bias_correction1: float   # 1 - beta1**t
    bias_correction2: float   # 1 - beta2**t
    smoothing: float          # the EMA factor of h and s (used by the step finisher)
    search_dir: Dir           # Dir.MOMENTUM for alsals, Dir.GRAD for adam_sls and salsa
    max_grad_norm: Optional[float] = None   # used by the grad finisher (None: no clipping)


class DecisionScalars(NamedTuple):
    """Host scalars of one trial's verdict."""

    eta: float     # the trial's step size
    c: float       # Armijo constant
    smoothing: float   # the EMA factor of h and s (StepScalars.smoothing; Hyper.smoothing)


_bucket_ids = itertools.count(1)


@dataclass(eq=False)
class Bucket:
    """The tensors of one (device, dtype): parallel lists, one entry per parameter with a grad.

    Identity: a bucket lives as long as the driver's parameter plan.  ``uid`` is unique per
    process and never reused; every list except ``grads`` stays the same for the bucket's
    lifetime (any change to the params' storage, dtype, device or the set of params with grads
    makes a new plan with new buckets).  ``grads`` is refilled by the driver at the start of
    each step and emptied after it (so that freed gradients are not kept alive), and
    ``grad_ptrs`` holds their addresses (read once by the driver: a backend that needs them uses
    these instead of walking the list again); ``grads_version`` is incremented whenever a
    gradient came back at another address, so a backend that caches gradient pointers refreshes
    them only then.  ``cache`` is free for backends (key it by backend name); the driver never
    touches it.
    """

    device: torch.device
    dtype: torch.dtype
    params: List[Tensor] = field(default_factory=list)
    grads: List[Tensor] = field(default_factory=list)
    exp_avgs: List[Tensor] = field(default_factory=list)      # m: fp32 (fp64 for fp64 params)
    exp_avg_sqs: List[Tensor] = field(default_factory=list)   # v: same dtype as m
    backups: List[Tensor] = field(default_factory=list)       # w0 copies; empty if memory_efficient
    weight_decays: List[float] = field(default_factory=list)  # the owning group's weight_decay
    uid: int = field(default_factory=lambda: next(_bucket_ids))
    grad_ptrs: Tuple[int, ...] = ()
    grads_version: int = 0
    cache: Dict[str, Any] = field(default_factory=dict)
    # True while the driver's native reader (host_ext) has written this step's gradient
    # addresses straight into the backend's ``grad_sink`` and checked their layouts; ``grads``
    # and ``grad_ptrs`` are then empty.  ``grads_misaligned``: some address is not 16-byte aligned.
    native_grads: bool = False
    grads_misaligned: bool = False

    def __post_init__(self) -> None:
        if self.grads and not self.grad_ptrs:
            self.grad_ptrs = tuple(g.data_ptr() for g in self.grads)

    def replace_grads(self, grads: List[Tensor]) -> None:
        """New gradient tensors, as the driver installs them when they moved (for tools and
        tests; the driver's per-step path sets the three fields itself)."""
        self.grads = list(grads)
        self.grad_ptrs = tuple(g.data_ptr() for g in self.grads)
        self.grads_version += 1
        self.native_grads = False


class Backend(Protocol):
    name: str

    def grad_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                  finish: bool = True) -> Optional[Tensor]: ...

    def step_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, searching: bool,
                  write_backup: bool, finish: bool = True) -> Optional[Tensor]: ...

    def move_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if: Optional[Ctl] = None) -> None: ...

    def verdict(self, ctl: Tensor, loss_try: Tensor, dp: DecisionScalars, out: Tensor) -> None: ...

    # Optional: ``update_pass`` (the module docstring).
    # Optional: ``grad_sink(bucket) -> Optional[Tuple[Tensor, int]]``, a contiguous int64 host
    # table and the column in which row i holds the address of the bucket's i-th gradient.  A
    # backend that has one lets the driver's native reader write the addresses there every step
    # (``Bucket.native_grads``) instead of filling ``bucket.grads``.


class BackendUnavailable(RuntimeError):
    """Raised when a backend was asked for by name but cannot run here; the message says why."""
