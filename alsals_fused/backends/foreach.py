"""The foreach backend: the reference's math as ``torch._foreach_*`` multi-tensor ops.

This is the CPU path (and the GPU fallback when neither Triton nor the CUDA extension is present):
no per-tensor Python loop on the hot path; each op below covers every tensor of the bucket.  It
applies the same element-wise operations in the same order as the reference, so on CPU it agrees
with it to the last bit except for the order of the fp64 slope sums.

Like the reference it reads ``ctl`` (clip scale, skip, fallback and a move's condition) on the
host, once per pass: free on CPU; on CUDA that is one small sync per pass, which the fused
backends avoid.  The decisions (finishers, verdict) are ``decisions.py``'s, shared with the
reference.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import decisions
from .base import Bucket, Ctl, DecisionScalars, Dir, StepScalars, condition_slot, math_dtype
from .reference import resolve

# What torch._foreach_* take and return: the out-of-place ops return tuples.
TensorList = Union[List[Tensor], Tuple[Tensor, ...]]


def _in_math_dtype(tensors: List[Tensor], mt: torch.dtype) -> List[Tensor]:
    """fp32 (or fp64) views of the tensors: themselves if already so, else upcast copies."""
    if not tensors or tensors[0].dtype == mt:
        return list(tensors)
    out = [torch.empty_like(t, dtype=mt) for t in tensors]
    torch._foreach_copy_(out, tensors)
    return out


def _scaled_grads(bucket: Bucket, scale: float, mt: torch.dtype) -> TensorList:
    grads = _in_math_dtype(bucket.grads, mt)
    # g * 1.0 == g exactly, so the multiply is only worth a pass when clipping bites.
    return grads if scale == 1.0 else torch._foreach_mul(grads, scale)


def _denominators(v: List[Tensor], hp: StepScalars) -> TensorList:
    denom = torch._foreach_div(v, hp.bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, hp.eps)                       # 1/p; eps outside the sqrt
    return denom


def _direction(direction: Dir, g: Optional[TensorList], m: List[Tensor], denom: TensorList,
               hp: StepScalars) -> TensorList:
    """m_hat * p or g * p (``g`` may be None when ``direction`` is MOMENTUM: it is not read)."""
    if direction is Dir.MOMENTUM:
        d = torch._foreach_div(m, hp.bias_correction1)       # m_hat
        torch._foreach_div_(d, denom)                        # m_hat * p
        return d
    assert g is not None, "the direction g * p needs the gradients"
    return torch._foreach_div(g, denom)                      # g * p


def _decay_step(w0: TensorList, eta: float, d: TensorList, wds: List[float]) -> TensorList:
    """eta*(d + wd*w0), op for op as the reference computes it."""
    if any(wds):
        step = torch._foreach_mul(w0, wds)
        torch._foreach_add_(step, d)
        torch._foreach_mul_(step, eta)
        return step
    return torch._foreach_mul(d, eta)


def _write_candidate(params: List[Tensor], w0: List[Tensor], eta: float, d: TensorList,
                     wds: List[float]) -> None:
    """params = w0 - eta*(d + wd*w0); in place when w0 *is* params (fp32/fp64, no backup read)."""
    step = _decay_step(w0, eta, d, wds)
    if w0[0] is params[0]:
        torch._foreach_sub_(params, step)
    else:
        torch._foreach_copy_(params, torch._foreach_sub(w0, step))


def _flat_sums(products: Sequence[TensorList]) -> Tensor:
    """float64[len(products)]: the sum of each list of tensors, in two ops (cat, then one fp64
    reduction per row) instead of one sum per tensor; torch has no _foreach_sum."""
    n = sum(t.numel() for t in products[0])
    flat = torch.cat([t.reshape(-1) for row in products for t in row])
    return flat.view(len(products), n).sum(dim=1, dtype=torch.float64)


# On CPU a foreach op is a C++ loop over the tensors, and each op here leaves a temporary the size
# of its inputs: over a whole bucket those are tens of MB, allocated and page-faulted every pass.
# Sub-groups of about this many elements keep the temporaries cache-sized and reused.
CPU_GROUP_NUMEL = 1 << 18


def _ranges(bucket: Bucket) -> List[tuple]:
    """Index ranges of the cache-sized sub-groups (cached on the bucket: its params are fixed)."""
    ranges = bucket.cache.get("foreach")
    if ranges is None:
        ranges, start, size = [], 0, 0
        for i, p in enumerate(bucket.params):
            if size and size + p.numel() > CPU_GROUP_NUMEL:
                ranges.append((start, i))
                start, size = i, 0
            size += p.numel()
        ranges.append((start, len(bucket.params)))
        bucket.cache["foreach"] = ranges
    return ranges


def _groups(buckets: Sequence[Bucket]) -> List[Bucket]:
    """Each bucket itself on a GPU (one launch per op); cache-sized sub-buckets on CPU."""
    out = []
    for bucket in buckets:
        if not bucket.params:
            continue
        if bucket.device.type != "cpu":
            out.append(bucket)
            continue
        ranges = _ranges(bucket)
        out.extend([bucket] if len(ranges) == 1 else [_slice(bucket, lo, hi) for lo, hi in ranges])
    return out


def _slice(b: Bucket, lo: int, hi: int) -> Bucket:
    return Bucket(device=b.device, dtype=b.dtype, params=b.params[lo:hi], grads=b.grads[lo:hi],
                  exp_avgs=b.exp_avgs[lo:hi], exp_avg_sqs=b.exp_avg_sqs[lo:hi],
                  backups=b.backups[lo:hi], weight_decays=b.weight_decays[lo:hi])


class ForeachBackend:
    name = "foreach"

    def grad_pass(self, buckets: Sequence[Bucket], ctl: Tensor, loss0: Tensor, hp: StepScalars, *,
                  finish: bool = True) -> Optional[Tensor]:
        norms = [n for b in buckets if b.grads
                 for n in torch._foreach_norm(b.grads, 2, dtype=math_dtype(b.dtype))]
        if norms:
            per_tensor = torch.stack(norms).to(torch.float64)
            total = per_tensor.dot(per_tensor)                  # sum of the per-tensor squares
        else:
            total = torch.zeros((), dtype=torch.float64, device=ctl.device)
        if not finish:
            return total
        decisions.finish_grad(ctl, total, loss0, hp.max_grad_norm)
        return None

    def step_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, searching: bool,
                  write_backup: bool, finish: bool = True) -> Optional[Tensor]:
        scale, skip = ctl[Ctl.SCALE:Ctl.SKIP + 1].tolist()
        sums: Optional[Tensor] = None
        if not skip:
            for group in _groups(buckets):
                part = self._step_group(group, hp, scale, searching, write_backup)
                if part is not None:              # None when not searching
                    sums = part if sums is None else sums.add_(part)
        if not searching:
            return None
        if sums is None:
            sums = torch.zeros(2, dtype=torch.float64, device=ctl.device)
        if not finish:
            return sums
        decisions.finish_slope(ctl, sums, hp.smoothing)
        return None

    def _step_group(self, bucket: Bucket, hp: StepScalars, scale: float, searching: bool,
                    write_backup: bool) -> Optional[Tensor]:
        mt = math_dtype(bucket.dtype)
        g = _scaled_grads(bucket, scale, mt)
        m, v = bucket.exp_avgs, bucket.exp_avg_sqs
        torch._foreach_mul_(m, hp.beta1)
        torch._foreach_add_(m, g, alpha=1 - hp.beta1)
        torch._foreach_mul_(v, hp.beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - hp.beta2)
        if write_backup:
            torch._foreach_copy_(bucket.backups, bucket.params)
        denom = _denominators(v, hp)
        direction = hp.search_dir if searching else Dir.MOMENTUM
        d = _direction(direction, g, m, denom, hp)
        _write_candidate(bucket.params, _in_math_dtype(bucket.params, mt), hp.eta, d,
                         bucket.weight_decays)
        if not searching:
            return None
        # The slopes: sum(g*d_search) and sum(g*g*p) (the same sum when d_search is g*p);
        # d is not needed any more, so it holds g*d.
        torch._foreach_mul_(d, g)
        if direction is Dir.GRAD:
            return _flat_sums([d]).repeat(2)
        gd_grad = _direction(Dir.GRAD, g, m, denom, hp)
        torch._foreach_mul_(gd_grad, g)
        return _flat_sums([d, gd_grad])

    def move_pass(self, buckets: Sequence[Bucket], hp: StepScalars, ctl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if: Optional[Ctl] = None) -> None:
        gate = condition_slot(only_if)
        flags = ctl.tolist()                                # one read: the slots below
        scale, skip, fallback = flags[Ctl.SCALE], flags[Ctl.SKIP], flags[Ctl.FALLBACK]
        if skip or (gate >= 0 and not flags[gate]):
            return                                          # nothing to do
        src_dir, dst_dir = resolve(src_dir, bool(fallback)), resolve(dst_dir, bool(fallback))
        for group in _groups(buckets):
            self._move_group(group, hp, scale, src_eta, src_dir, dst_eta, dst_dir, from_backup)

    def _move_group(self, bucket: Bucket, hp: StepScalars, scale: float, src_eta: float,
                    src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool) -> None:
        mt = math_dtype(bucket.dtype)
        uses_grad = dst_dir is Dir.GRAD or (not from_backup and src_dir is Dir.GRAD)
        g = _scaled_grads(bucket, scale, mt) if uses_grad else None
        m, wds = bucket.exp_avgs, bucket.weight_decays
        denom = _denominators(bucket.exp_avg_sqs, hp)
        d_dst = _direction(dst_dir, g, m, denom, hp)
        if from_backup:
            _write_candidate(bucket.params, _in_math_dtype(bucket.backups, mt), dst_eta, d_dst, wds)
            return
        # memory_efficient (fp32/fp64 only, so params are already in the math dtype): no copy of
        # w0 exists; recover it as (w + src_eta*d_src) / (1 - src_eta*wd).
        w = bucket.params
        d_src = d_dst if src_dir is dst_dir else _direction(src_dir, g, m, denom, hp)
        w0 = torch._foreach_mul(d_src, src_eta)
        torch._foreach_add_(w0, w)
        if any(wds):
            torch._foreach_div_(w0, [1 - src_eta * wd for wd in wds])
        if src_dir is dst_dir:        # the in-place move of docs/algorithm.md §7: w -= (dst - src)*(d + wd*w0)
            torch._foreach_sub_(w, _decay_step(w0, dst_eta - src_eta, d_dst, wds))
        else:
            torch._foreach_copy_(w, torch._foreach_sub(w0, _decay_step(w0, dst_eta, d_dst, wds)))

    def verdict(self, ctl: Tensor, loss_try: Tensor, dp: DecisionScalars, out: Tensor) -> None:
        decisions.verdict(ctl, loss_try, dp, out)
