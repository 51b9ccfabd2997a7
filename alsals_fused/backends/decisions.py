"""The device decisions of contract v2 (``base.py``) in plain torch ops: the reference.

Three pure functions over the control vector ``ctl`` (float64, slots ``Ctl``), each writing its
results in place and reading nothing on the host:

- ``finish_grad``: after the gradient-norm reduction: clip scale, skip flag, pending skips, L0;
- ``finish_slope``: after the step pass's slope sums: SLOPE, SLOPE_GRAD, S_NEW, FALLBACK;
- ``verdict``: once per trial: the accept test (with the equality guard of docs/algorithm.md §1.3), the
  telemetry the host reads in one copy, and the commit of h and s.

The reference and foreach backends call them directly; so does the driver when the sums come
from several backends or shards.  The fused backends implement the same functions in a kernel
and are tested against these.  Each line says what it computes; the ops are chosen to be few
(every op is a kernel launch on a GPU) without obscuring the formula of ``base.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Ctl, DecisionScalars, Verdict


def finish_grad(ctl: Tensor, sumsq: Tensor, loss0: Tensor, max_grad_norm: Optional[float]) -> None:
    """The grad finisher: SCALE, SKIP, PENDING += SKIP, FALLBACK = 0, LOSS0 = L0."""
    probe = loss0 - loss0 + (sumsq - sumsq)            # 0 if L0 and sumsq are finite, else nan
    skip = probe != 0
    ctl[Ctl.LOSS0].copy_(loss0)
    ctl[Ctl.SKIP].copy_(skip)
    ctl[Ctl.PENDING].add_(ctl[Ctl.SKIP])
    ctl[Ctl.FALLBACK].zero_()
    if max_grad_norm is None:
        ctl[Ctl.SCALE].fill_(1.0)
    else:  # as clip_grad_norm_: max_norm / (norm + 1e-6), at most 1; 1 when not finite
        scale = (max_grad_norm / (sumsq.sqrt() + 1e-6)).clamp_(max=1.0)
        ctl[Ctl.SCALE].copy_(scale.masked_fill_(skip, 1.0))


def finish_slope(ctl: Tensor, sums: Tensor, smoothing: float) -> None:
    """The step finisher: sums = float64[2] [sum(g*d_search), sum(g*g*p)] over every bucket."""
    ctl[Ctl.SLOPE:Ctl.SLOPE_GRAD + 1].copy_(sums)
    s_new = ctl[Ctl.S_NEW]
    torch.add(ctl[Ctl.S] * smoothing, ctl[Ctl.SLOPE] * (1 - smoothing), out=s_new)
    # FALLBACK = !SKIP & (S_NEW <= 0); SKIP is 0 or 1, so max(S_NEW, SKIP) <= 0 says both.
    ctl[Ctl.FALLBACK].copy_(torch.maximum(s_new, ctl[Ctl.SKIP]) <= 0)


def verdict(ctl: Tensor, loss_try: Tensor, dp: DecisionScalars, out: Tensor) -> None:
    """One trial's decision (``base.py``): writes ``out`` (``Verdict`` slots), commits h and s."""
    loss = out[Verdict.LOSS_TRY]
    loss.copy_(loss_try)                                          # L = float64(loss_try)
    loss0 = ctl[Ctl.LOSS0]
    diff = loss0 - loss
    h_new = out[Verdict.H_NEW]
    torch.add(ctl[Ctl.H] * dp.smoothing, diff * (1 - dp.smoothing), out=h_new)
    fb = ctl[Ctl.FALLBACK] != 0
    # [SLOPE_USED, the test's slope] = fb ? [SLOPE_GRAD, SLOPE_GRAD] : [SLOPE, S_NEW]
    slopes = torch.where(fb, ctl[Ctl.SLOPE_GRAD], ctl[Ctl.SLOPE:Ctl.S_NEW + 1:2])
    test = torch.where(fb, diff, h_new) >= slopes[1] * (dp.c * dp.eta)
    # accept: not skipped, L finite, and (L == L0 (spec guard 1) or the Armijo test)
    # (diff - diff + SKIP) is 0 exactly when diff is finite and the step was not skipped
    ok = (test | (loss == loss0)) & ((diff - diff + ctl[Ctl.SKIP]) == 0)
    out[Verdict.ACCEPT].copy_(ok)
    torch.eq(ctl[Ctl.SKIP], 0, out=out[Verdict.FINITE])
    out[Verdict.FALLBACK:Verdict.LOSS0 + 1].copy_(ctl[Ctl.FALLBACK:Ctl.LOSS0 + 1])
    out[Verdict.SLOPE_USED].copy_(slopes[0])
    out[Verdict.PENDING].copy_(ctl[Ctl.PENDING])
    ctl[Ctl.PENDING].zero_()
    commit = ok > fb                                              # ok and not fallback
    torch.where(commit, h_new, ctl[Ctl.H], out=ctl[Ctl.H])
    torch.where(commit, ctl[Ctl.S_NEW], ctl[Ctl.S], out=ctl[Ctl.S])
