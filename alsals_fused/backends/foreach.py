"""The foreach backend: the reference's math as ``torch._foreach_*`` multi-tensor ops.

This is the CPU path (and the GPU fallback when neither Triton nor the CUDA extension is present):
no per-tensor Python loop on the hot path; each op below covers every tensor of the bucket.  It
applies the same element-wise operations in the same order as the reference, so on CPU it agrees
with it to the last bit except for the order of the fp64 slope sums.

Like the reference it reads the skip and fallback flags of ``ctrl`` on the host: free on CPU; on
CUDA that is one small sync per pass, which the fused backends avoid.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .base import FALLBACK, GRAD_SCALE, SKIP, Bucket, Dir, StepScalars
from .reference import math_dtype

def _in_math_dtype(tensors: List[Tensor], mt: torch.dtype) -> List[Tensor]:
    """fp32 (or fp64) views of the tensors: themselves if already so, else upcast copies."""
    if not tensors or tensors[0].dtype == mt:
        return list(tensors)
    out = [torch.empty_like(t, dtype=mt) for t in tensors]
    torch._foreach_copy_(out, tensors)
    return out


def _scaled_grads(bucket: Bucket, ctrl: Tensor, mt: torch.dtype) -> List[Tensor]:
    grads = _in_math_dtype(bucket.grads, mt)
    # The clip coefficient stays a device tensor: multiplying by it needs no host read.
    return torch._foreach_mul(grads, ctrl[GRAD_SCALE].to(mt))


def _direction(direction: Dir, g: List[Tensor], m: List[Tensor], v: List[Tensor],
               hp: StepScalars) -> List[Tensor]:
    denom = torch._foreach_div(v, hp.bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, hp.eps)                       # 1/p; eps outside the sqrt
    if direction is Dir.MOMENTUM:
        d = torch._foreach_div(m, hp.bias_correction1)       # m_hat
        torch._foreach_div_(d, denom)                        # m_hat * p
        return d
    return torch._foreach_div(g, denom)                      # g * p


def _candidate(w0: List[Tensor], eta: float, d: List[Tensor], wds: List[float]) -> List[Tensor]:
    """w0 - eta*(d + wd*w0), op for op as the reference computes it."""
    if any(wds):
        step = torch._foreach_mul(w0, wds)
        torch._foreach_add_(step, d)
    else:
        step = d
    step = torch._foreach_mul(step, eta)
    return torch._foreach_sub(w0, step)


def _flat_sum(tensors: List[Tensor]) -> Tensor:
    """One fp64 sum over all elements of all tensors (a single reduction launch)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.cat([t.reshape(-1) for t in tensors]).sum(dtype=torch.float64)


class ForeachBackend:
    name = "foreach"

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def grad_sumsq(self, bucket: Bucket) -> Tensor:
        norms = torch._foreach_norm(_in_math_dtype(bucket.grads, torch.float64))
        return torch.stack(norms).square().sum()

    def step_pass(self, bucket: Bucket, hp: StepScalars, ctrl: Tensor, *, searching: bool,
                  write_backup: bool) -> Optional[Tensor]:
        dots = torch.zeros(2, dtype=torch.float64, device=bucket.device) if searching else None
        if bool(ctrl[SKIP]) or not bucket.params:
            return dots
        mt = math_dtype(bucket.dtype)
        g = _scaled_grads(bucket, ctrl, mt)
        m, v = bucket.exp_avgs, bucket.exp_avg_sqs
        torch._foreach_mul_(m, hp.beta1)
        torch._foreach_add_(m, g, alpha=1 - hp.beta1)
        torch._foreach_mul_(v, hp.beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - hp.beta2)
        if write_backup:
            torch._foreach_copy_(bucket.backups, bucket.params)
        direction = hp.nominal_search if searching else Dir.MOMENTUM
        d = _direction(direction, g, m, v, hp)
        if searching:
            dots[0] = _flat_sum(torch._foreach_mul(g, d)).to(bucket.device)
            d_grad = d if direction is Dir.GRAD else _direction(Dir.GRAD, g, m, v, hp)
            dots[1] = _flat_sum(torch._foreach_mul(g, d_grad)).to(bucket.device)
        w0 = _in_math_dtype(bucket.params, mt)
        torch._foreach_copy_(bucket.params, _candidate(w0, hp.eta, d, bucket.weight_decays))
        return dots

    def move_pass(self, bucket: Bucket, hp: StepScalars, ctrl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if_fallback: bool = False) -> None:
        fallback = bool(ctrl[FALLBACK])
        if bool(ctrl[SKIP]) or (only_if_fallback and not fallback) or not bucket.params:
            return
        mt = math_dtype(bucket.dtype)
        src_dir, dst_dir = hp.resolve(src_dir, fallback), hp.resolve(dst_dir, fallback)
        uses_grad = dst_dir is Dir.GRAD or (not from_backup and src_dir is Dir.GRAD)
        g = _scaled_grads(bucket, ctrl, mt) if uses_grad else None
        m, v, wds = bucket.exp_avgs, bucket.exp_avg_sqs, bucket.weight_decays
        d_dst = _direction(dst_dir, g, m, v, hp)
        if from_backup:
            w0 = _in_math_dtype(bucket.backups, mt)
            torch._foreach_copy_(bucket.params, _candidate(w0, dst_eta, d_dst, wds))
            return
        # memory_efficient (fp32/fp64 only, so params are already in the math dtype).
        w = bucket.params
        d_src = d_dst if src_dir is dst_dir else _direction(src_dir, g, m, v, hp)
        w0 = torch._foreach_mul(d_src, src_eta)
        torch._foreach_add_(w0, w)                              # w + src_eta*d_src
        if any(wds):
            torch._foreach_div_(w0, [1 - src_eta * wd for wd in wds])
        if src_dir is dst_dir:
            delta = torch._foreach_mul(w0, wds) if any(wds) else None
            if delta is not None:
                torch._foreach_add_(delta, d_dst)
            else:
                delta = d_dst
            torch._foreach_sub_(w, torch._foreach_mul(delta, dst_eta - src_eta))
        else:
            torch._foreach_copy_(w, _candidate(w0, dst_eta, d_dst, wds))
