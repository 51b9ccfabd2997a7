"""The reference backend: one tensor at a time, in plain PyTorch, to be read beside docs/algorithm.md.

It is the oracle every other backend is tested against, so it favours the obvious over the fast:
each quantity is computed in the math type (fp32, or fp64 for fp64 parameters) with the formula
of docs/algorithm.md, in the order that ``base.py`` fixes.  It reads the flags in ``ctl`` on the
host (free on CPU, one sync each on CUDA): clarity beats speed here.  The decisions between the
passes (finishers, verdict) are ``decisions.py``'s, shared with the foreach backend.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import decisions
from .base import Bucket, Ctl, DecisionScalars, Dir, StepScalars, condition_slot, math_dtype


def resolve(direction: Dir, fallback: bool) -> Dir:
    """Dir.UPDATE -> GRAD if the step fell back, else MOMENTUM; the others are themselves."""
    if direction is Dir.UPDATE:
        return Dir.GRAD if fallback else Dir.MOMENTUM
    return direction


def _device(buckets: Sequence[Bucket], ctl: Tensor) -> torch.device:
    return buckets[0].device if buckets else ctl.device


class ReferenceBackend:
    name = "reference"

    # -- the direction d, recomputed from the stored moments ------------------------------------
    @staticmethod
    def _direction(direction: Dir, g: Tensor, m: Tensor, v: Tensor, hp: StepScalars) -> Tensor:
        denom = (v / hp.bias_correction2).sqrt() + hp.eps      # 1/p; eps outside the sqrt
        if direction is Dir.MOMENTUM:
            return (m / hp.bias_correction1) / denom             # m_hat * p
        return g / denom                                         # g * p

    @staticmethod
    def _candidate(w0: Tensor, eta: float, d: Tensor, wd: float) -> Tensor:
        return w0 - eta * (d + wd * w0)                          # cand(eta) = w0 - eta*(d + wd*w0)

    # -- the passes -----------------------------------------------------------------------------
    def grad_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                  finish: bool = True) -> Optional[Tensor]:
        # Per-tensor sums of squares in the math type (as the fused kernels accumulate), added
        # in fp64; an overflow to inf counts as a non-finite gradient.
        total = torch.zeros((), dtype=torch.float64, device=_device(buckets, ctl))
        for bucket in buckets:
            for g in bucket.grads:
                total += g.to(math_dtype(g.dtype)).square().sum().double()
        if not finish:
            return total
        decisions.finish_grad(ctl, total, loss0, hp.max_grad_norm)
        return None

    def step_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, searching: bool,
                  write_backup: bool, finish: bool = True) -> Optional[Tensor]:
        sums = torch.zeros(2, dtype=torch.float64, device=_device(buckets, ctl))
        scale, skip = ctl[Ctl.SCALE].item(), ctl[Ctl.SKIP].item()
        if not skip:                                            # non-finite loss or gradient
            for bucket in buckets:
                self._step_bucket(bucket, hp, scale, searching, write_backup, sums)
        if not searching:
            return None
        if not finish:
            return sums
        decisions.finish_slope(ctl, sums, hp.smoothing)
        return None

    def _step_bucket(self, bucket: Bucket, hp: StepScalars, scale: float, searching: bool,
                     write_backup: bool, sums: Tensor) -> None:
        direction = hp.search_dir if searching else Dir.MOMENTUM
        for i, w in enumerate(bucket.params):
            mt = math_dtype(w.dtype)
            g = bucket.grads[i].to(mt) * scale
            m, v = bucket.exp_avgs[i], bucket.exp_avg_sqs[i]
            m.mul_(hp.beta1).add_(g, alpha=1 - hp.beta1)        # m = b1*m + (1-b1)*g
            v.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)  # v = b2*v + (1-b2)*g*g
            w0 = w.to(mt)
            if write_backup:
                bucket.backups[i].copy_(w)
            d = self._direction(direction, g, m, v, hp)
            if searching:
                d_grad = self._direction(Dir.GRAD, g, m, v, hp)
                sums[0] += (g * d).double().sum()                # slope along the search direction
                sums[1] += (g * d_grad).double().sum()           # sum(g*g*p), the fallback slope
            w.copy_(self._candidate(w0, hp.eta, d, bucket.weight_decays[i]))

    def move_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if: Optional[Ctl] = None) -> None:
        gate = condition_slot(only_if)
        if ctl[Ctl.SKIP].item() or (gate >= 0 and not ctl[gate].item()):
            return                                          # nothing to do
        scale, fallback = ctl[Ctl.SCALE].item(), ctl[Ctl.FALLBACK].item()
        src_dir, dst_dir = resolve(src_dir, bool(fallback)), resolve(dst_dir, bool(fallback))
        for bucket in buckets:
            self._move_bucket(bucket, hp, scale, src_eta, src_dir, dst_eta, dst_dir, from_backup)

    def _move_bucket(self, bucket: Bucket, hp: StepScalars, scale: float, src_eta: float,
                     src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool) -> None:
        for i, w in enumerate(bucket.params):
            mt = math_dtype(w.dtype)
            g = bucket.grads[i].to(mt) * scale
            m, v = bucket.exp_avgs[i], bucket.exp_avg_sqs[i]
            wd = bucket.weight_decays[i]
            d_dst = self._direction(dst_dir, g, m, v, hp)
            if from_backup:
                w.copy_(self._candidate(bucket.backups[i].to(mt), dst_eta, d_dst, wd))
                continue
            # memory_efficient: no copy of w0 exists; undo the source step in place.
            d_src = self._direction(src_dir, g, m, v, hp)
            w_cur = w.to(mt)
            w0 = (w_cur + src_eta * d_src) / (1 - src_eta * wd) if wd else w_cur + src_eta * d_src
            if src_dir is dst_dir:
                w.copy_(w_cur - (dst_eta - src_eta) * (d_dst + wd * w0))
            else:
                w.copy_(self._candidate(w0, dst_eta, d_dst, wd))

    def verdict(self, ctl: Tensor, loss_try: Tensor, dp: DecisionScalars, out: Tensor) -> None:
        decisions.verdict(ctl, loss_try, dp, out)
