"""The reference backend: one tensor at a time, in plain PyTorch, to be read beside ALGORITHM.md.

It is the oracle every other backend is tested against, so it favours the obvious over the fast:
each quantity is computed in the math type (fp32, or fp64 for fp64 parameters) with the formula
of the specification, in the order that ``base.py`` fixes.  It reads the device flags in ``ctrl``
on the host (free on CPU, one sync each on CUDA): clarity beats speed here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Bucket, Dir, StepScalars


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class ReferenceBackend:
    name = "reference"

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

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

    def grad_sumsq(self, bucket: Bucket) -> Tensor:
        # Per-tensor sums of squares in the math type (as the fused kernels accumulate), added
        # in fp64; an overflow to inf counts as a non-finite gradient.
        total = torch.zeros((), dtype=torch.float64, device=bucket.device)
        for g in bucket.grads:
            total += g.to(math_dtype(g.dtype)).square().sum().double()
        return total

    def step_pass(self, bucket: Bucket, hp: StepScalars, ctrl: Tensor, *, searching: bool,
                  write_backup: bool) -> Optional[Tensor]:
        dots = torch.zeros(2, dtype=torch.float64, device=bucket.device) if searching else None
        scale, skip, _ = ctrl.tolist()
        if skip:                                                 # non-finite loss or gradient
            return dots
        direction = hp.nominal_search if searching else Dir.MOMENTUM
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
                dots[0] += (g * d).double().sum()                # slope along the nominal direction
                dots[1] += (g * d_grad).double().sum()           # sum(g*g*p), the fallback slope
            w.copy_(self._candidate(w0, hp.eta, d, bucket.weight_decays[i]))
        return dots

    def move_pass(self, bucket: Bucket, hp: StepScalars, ctrl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if_fallback: bool = False) -> None:
        scale, skip, fallback = ctrl.tolist()
        if skip or (only_if_fallback and not fallback):
            return
        src_dir, dst_dir = hp.resolve(src_dir, bool(fallback)), hp.resolve(dst_dir, bool(fallback))
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
