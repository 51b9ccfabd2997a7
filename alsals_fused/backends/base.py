"""The contract every ALSALS backend implements.

The line-search driver (``alsals_fused.optimizer``) owns everything that is not element-wise:
the closure, RNG replay, the accept test, host state and telemetry.  A backend owns the three
element-wise passes over the parameters, for one *bucket* (the tensors of one device and dtype):

``grad_sumsq(bucket)``
    sum of g*g over the bucket as a 0-dim float64 tensor on the bucket's device (inf/nan when a
    gradient is not finite).  Drives gradient clipping and the non-finite pre-pass.

``step_pass(bucket, hp, ctrl, searching, write_backup)``
    The fused ADAM step: m, v absorb g (times ``ctrl[GRAD_SCALE]``); if ``write_backup``, copies
    w0 into ``bucket.backups``; writes ``w = cand(hp.eta, dir)`` with ``dir`` = the variant's
    *nominal* search direction when searching (momentum for alsals, gradient otherwise) or
    MOMENTUM when not.  Searching returns a float64 tensor ``[sum(g*d_nominal), sum(g*g*p)]``;
    not searching returns None.  When ``ctrl[SKIP]`` is set it writes nothing at all.

``move_pass(bucket, hp, ctrl, src_eta, src_dir, dst_eta, dst_dir, from_backup, only_if_fallback)``
    Rewrites the parameters from ``cand(src_eta, src_dir)`` to ``cand(dst_eta, dst_dir)``; with
    ``dst_eta == 0`` that is the restore to w0.  ``from_backup`` reads w0 from the backups;
    otherwise (memory_efficient) the move is done in place, w -= (dst_eta - src_eta) * (d + wd*w0)
    when the directions agree, recovering w0 = (w + src_eta*d_src) / (1 - src_eta*wd) where needed.
    ``only_if_fallback`` makes the pass a no-op unless ``ctrl[FALLBACK]`` is set.  When
    ``ctrl[SKIP]`` is set it writes nothing.

with ``cand(eta, d) = w0 - eta * (d + wd * w0)`` computed in the math type (fp32, fp64 for fp64
params) in exactly that order, ``p = 1 / (sqrt(v / bias_correction2) + eps)``,
``m_hat * p = (m / bias_correction1) / (sqrt(v / bias_correction2) + eps)`` and
``g * p = g / (sqrt(v / bias_correction2) + eps)``.  Fused backends match these within fp32
rounding; they need not be bit-identical to the reference.

Scalars that change every step reach the passes in two ways: host values in ``StepScalars``
(eta, bias corrections: decided on the host, so they cost no read) and device values in
``ctrl``, a float32 tensor of 3 on the bucket's device (gradient scale from clipping, the skip
flag from the non-finite pre-pass, the non-descent fallback flag: decided on the device, so a
backend must not read them on the host if it is meant to be sync-free).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional, Protocol

import torch
from torch import Tensor

# Indices into the per-step device control tensor ``ctrl`` (float32, 3 elements).
GRAD_SCALE = 0  # clip coefficient applied to every gradient read (1.0 without clipping)
SKIP = 1        # 1.0: the loss or a gradient is not finite: no pass writes anything this step
FALLBACK = 2    # 1.0: the smoothed slope is not a descent slope: search along g*p instead
CTRL_SIZE = 3


class Dir(enum.IntEnum):
    """Directions a candidate can be built along (resolved per step, on the device)."""

    MOMENTUM = 0  # m_hat * p
    GRAD = 1      # g * p
    SEARCH = 2    # GRAD if ctrl[FALLBACK] else (MOMENTUM if hp.momentum_search else GRAD)
    UPDATE = 3    # GRAD if ctrl[FALLBACK] else MOMENTUM


@dataclass(frozen=True)
class StepScalars:
    """Host scalars of one step; passed as kernel arguments, never baked in at compile time."""

    eta: float                # step size of the candidate the pass writes
    beta1: float
    beta2: float
    eps: float
    bias_correction1: float   # 1 - beta1**t
    bias_correction2: float   # 1 - beta2**t
    momentum_search: bool     # alsals searches along m_hat*p; adam_sls and salsa along g*p

    def resolve(self, direction: Dir, fallback: bool) -> Dir:
        """SEARCH/UPDATE -> MOMENTUM/GRAD for a known fallback flag (host-side helper)."""
        if direction is Dir.SEARCH:
            return Dir.GRAD if (fallback or not self.momentum_search) else Dir.MOMENTUM
        if direction is Dir.UPDATE:
            return Dir.GRAD if fallback else Dir.MOMENTUM
        return direction

    @property
    def nominal_search(self) -> Dir:
        """The search direction the step pass writes before the fallback flag is known."""
        return Dir.MOMENTUM if self.momentum_search else Dir.GRAD


@dataclass
class Bucket:
    """The tensors of one (device, dtype): parallel lists, one entry per parameter with a grad."""

    device: torch.device
    dtype: torch.dtype
    params: List[Tensor] = field(default_factory=list)
    grads: List[Tensor] = field(default_factory=list)
    exp_avgs: List[Tensor] = field(default_factory=list)      # m: fp32 (fp64 for fp64 params)
    exp_avg_sqs: List[Tensor] = field(default_factory=list)   # v: same dtype as m
    backups: List[Tensor] = field(default_factory=list)       # w0 copies; empty if memory_efficient
    weight_decays: List[float] = field(default_factory=list)  # the owning group's weight_decay

    def __len__(self) -> int:
        return len(self.params)


class Backend(Protocol):
    name: str

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool: ...

    def grad_sumsq(self, bucket: Bucket) -> Tensor: ...

    def step_pass(self, bucket: Bucket, hp: StepScalars, ctrl: Tensor, *, searching: bool,
                  write_backup: bool) -> Optional[Tensor]: ...

    def move_pass(self, bucket: Bucket, hp: StepScalars, ctrl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if_fallback: bool = False) -> None: ...


class BackendUnavailable(RuntimeError):
    """Raised when a backend was asked for by name but cannot run here; the message says why."""
