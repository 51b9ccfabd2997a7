"""Triton kernels of the fused ALSALS passes (the contract is ``alsals_fused/backends/base.py``).

Every pass is one launch over all tensors of a bucket.  Its operands reach the kernel through two
small device tables that the backend builds once and caches:

``table``  int64 [T, TABLE_COLS], one row per tensor: the addresses of w, g, m, v, the w0 backup
           (0 when absent), numel, and the weight decay as the bit pattern of a float64.
``sched``  int32 [P, 2], one row per program: (tensor row, chunk index in that tensor).  A chunk is
           BLOCK * ITERS contiguous elements; empty tensors get no chunk.

A program takes an unmasked, 16-byte-vectorized path when its chunk is full and every address it
touches is 16-byte aligned (the common case), and a masked scalar path for tails, misaligned
views and flagged (skipped) steps.  Element offsets are int64 (tensors above 2**31 elements).

Reductions are two-stage and run-to-run reproducible without atomics: each program writes its
partial sums, and ``finish_kernel`` adds them in a fixed order in float64.

Scalars that change every step (eta, betas, eps, bias corrections) are ordinary fp32 arguments:
Triton specializes on integers and pointer alignment, never on float values, so they cause no
recompilation and, unlike a small device buffer filled from pageable memory, no host sync.  The
device-decided flags (clip scale, skip, fallback) are read from ``ctrl`` inside the kernels.
Only dtypes, block sizes and variant/direction switches are compile-time constants.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Table columns: w, g, m, v, backup, numel, weight-decay bits, spare (rows stay 64 bytes).  The
# kernels index rows and ctrl (0 scale, 1 skip, 2 fallback: backends/base.py) with literals.
TABLE_COLS = 8

# Direction modes after host-side resolution of Dir (the fallback part stays on the device).
MODE_MOMENTUM = 0       # m_hat * p
MODE_GRAD = 1           # g * p
MODE_FALLBACK = 2       # g * p if ctrl[FALLBACK] else m_hat * p

# Launch configuration shared by the backend and the AOT tool.  1024 elements x 4 warps gives
# 8 elements per thread per tensor: two 128-bit accesses for fp32, one for 16-bit params.
BLOCK = 1024
ITERS = 4               # blocks per program: 4096-element chunks keep the partials buffer small
NUM_WARPS = 4
FINISH_BLOCK = 4096    # few loop trips even for ~100k partials
FINISH_WARPS = 8


# -- helpers ------------------------------------------------------------------------------------
# The element-wise math is written out inside one helper per chunk (not as small helper calls):
# Triton's CPU interpreter re-patches triton.language on every nested jit call, which made the
# tests ten times slower.  The formulas are spelled identically in every kernel so that the
# direction d is bit-identical between the step pass and the moves (memory_efficient relies on it):
#   1/p        = sqrt_rn(div_rn(v, bc2)) + eps             (eps outside the sqrt)
#   m_hat * p  = div_rn(div_rn(m, bc1), 1/p)
#   g * p      = div_rn(g, 1/p)
#   cand(eta)  = w0 - eta * (d + wd * w0)
# div_rn/sqrt_rn: IEEE rounding as torch; Triton's plain "/" is an approximate division on GPU.
@triton.jit
def _to_param(x, W_DTYPE: tl.constexpr):
    """fp32 -> parameter dtype, round to nearest even (as torch's copy_)."""
    if W_DTYPE == tl.bfloat16:
        # Explicit RTNE on the bits: identical on GPU and in the CPU interpreter, whose own
        # fp32->bf16 cast truncates.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        out = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        return out.to(tl.bfloat16, bitcast=True)
    elif W_DTYPE == tl.float32:
        return x
    else:
        return x.to(W_DTYPE)


@triton.jit
def _row(table, sched, pid):
    """(address of the tensor's table row, chunk index) of program ``pid``."""
    row = tl.load(sched + 2 * pid).to(tl.int64)
    chunk = tl.load(sched + 2 * pid + 1).to(tl.int64)
    return table + row * 8, chunk


# -- step pass ------------------------------------------------------------------------------------
@triton.jit
def _step_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, scale, wd, eta,
                beta1, beta2, one_minus_beta1, one_minus_beta2, eps, bias_correction1,
                bias_correction2, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                ITERS: tl.constexpr, SEARCHING: tl.constexpr, MOMENTUM_DIR: tl.constexpr,
                WRITE_BACKUP: tl.constexpr, MASKED: tl.constexpr):
    wp = w_addr.to(tl.pointer_type(W_DTYPE))
    gp = g_addr.to(tl.pointer_type(W_DTYPE))
    mp = m_addr.to(tl.pointer_type(tl.float32))
    vp = v_addr.to(tl.pointer_type(tl.float32))
    bp = b_addr.to(tl.pointer_type(W_DTYPE))
    if not MASKED:   # checked by the caller: lets the compiler emit 128-bit accesses
        wp = tl.multiple_of(wp, 16)
        gp = tl.multiple_of(gp, 16)
        mp = tl.multiple_of(mp, 16)
        vp = tl.multiple_of(vp, 16)
        bp = tl.multiple_of(bp, 16)
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gp = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            mask = offs < n
            other = 0.0
        else:
            mask = None
            other = None
        w_raw = tl.load(wp + offs, mask=mask, other=other)
        g = tl.load(gp + offs, mask=mask, other=other).to(tl.float32) * scale
        m = tl.load(mp + offs, mask=mask, other=other)
        v = tl.load(vp + offs, mask=mask, other=other)
        m = m * beta1 + one_minus_beta1 * g
        v = v * beta2 + one_minus_beta2 * g * g
        tl.store(mp + offs, m, mask=mask)
        tl.store(vp + offs, v, mask=mask)
        if WRITE_BACKUP:
            tl.store(bp + offs, w_raw, mask=mask)
        denom = tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps
        d_grad = tl.div_rn(g, denom)
        if MOMENTUM_DIR:
            d = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
        else:
            d = d_grad
        if SEARCHING:
            # Masked lanes read g = m = v = 0, so they add exactly 0.
            acc_d += g * d
            acc_gp += g * d_grad
        w0 = w_raw.to(tl.float32)
        w_new = w0 - eta * (d + wd * w0)
        tl.store(wp + offs, _to_param(w_new, W_DTYPE), mask=mask)
    return tl.sum(acc_d, axis=0), tl.sum(acc_gp, axis=0)


@triton.jit
def step_kernel(table, sched, ctrl, partials, eta, beta1, beta2, one_minus_beta1,
                one_minus_beta2, eps, bias_correction1, bias_correction2,
                W_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                SEARCHING: tl.constexpr, MOMENTUM_DIR: tl.constexpr, WRITE_BACKUP: tl.constexpr):
    """m, v absorb g*scale; optional w0 backup; w = cand(eta, d); partial slopes if SEARCHING."""
    pid = tl.program_id(0)
    row, chunk = _row(table, sched, pid)
    w_addr = tl.load(row + 0)
    g_addr = tl.load(row + 1)
    m_addr = tl.load(row + 2)
    v_addr = tl.load(row + 3)
    b_addr = tl.load(row + 4)
    n = tl.load(row + 5)
    wd = tl.load(row + 6).to(tl.float64, bitcast=True).to(tl.float32)
    scale = tl.load(ctrl + 0)
    live = tl.load(ctrl + 1) == 0.0
    start = chunk * (BLOCK * ITERS)
    addrs = w_addr | g_addr | m_addr | v_addr
    if WRITE_BACKUP:
        addrs = addrs | b_addr
    fast = live & (start + BLOCK * ITERS <= n) & ((addrs & 15) == 0)
    # A skipped step masks every element (n -> 0) on the slow path: nothing read or written.
    n = tl.where(live, n, 0)
    if fast:
        s_d, s_gp = _step_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, scale,
                                wd, eta, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                                bias_correction1, bias_correction2, W_DTYPE, BLOCK, ITERS,
                                SEARCHING, MOMENTUM_DIR, WRITE_BACKUP, False)
    else:
        s_d, s_gp = _step_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, scale,
                                wd, eta, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                                bias_correction1, bias_correction2, W_DTYPE, BLOCK, ITERS,
                                SEARCHING, MOMENTUM_DIR, WRITE_BACKUP, True)
    if SEARCHING:
        tl.store(partials + 2 * pid, s_d)
        tl.store(partials + 2 * pid + 1, s_gp)


# -- move pass ------------------------------------------------------------------------------------
# Run-time flags (fallback-resolved directions, which operands are needed) are uniform per
# program, so they select code with scalar ifs rather than per-element masks or selects.
@triton.jit
def _move_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, need_g, need_m, src_grad,
                dst_grad, same_dir, scale, wd, one_minus_src_wd, src_eta, dst_eta, delta_eta, eps,
                bias_correction1, bias_correction2, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                ITERS: tl.constexpr, FROM_BACKUP: tl.constexpr, SRC_MODE: tl.constexpr,
                DST_MODE: tl.constexpr, MASKED: tl.constexpr):
    wp = w_addr.to(tl.pointer_type(W_DTYPE))
    gp = g_addr.to(tl.pointer_type(W_DTYPE))
    mp = m_addr.to(tl.pointer_type(tl.float32))
    vp = v_addr.to(tl.pointer_type(tl.float32))
    bp = b_addr.to(tl.pointer_type(W_DTYPE))
    if not MASKED:
        wp = tl.multiple_of(wp, 16)
        gp = tl.multiple_of(gp, 16)
        mp = tl.multiple_of(mp, 16)
        vp = tl.multiple_of(vp, 16)
        bp = tl.multiple_of(bp, 16)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            mask = offs < n
            other = 0.0
        else:
            mask = None
            other = None
        # g and m are read only when the resolved directions need them.
        if need_g:
            g = tl.load(gp + offs, mask=mask, other=other).to(tl.float32) * scale
        else:
            g = tl.zeros([BLOCK], dtype=tl.float32)
        if need_m:
            m = tl.load(mp + offs, mask=mask, other=other)
        else:
            m = tl.zeros([BLOCK], dtype=tl.float32)
        v = tl.load(vp + offs, mask=mask, other=other)
        denom = tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps
        if DST_MODE == 0:
            d_dst = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
        elif DST_MODE == 1:
            d_dst = tl.div_rn(g, denom)
        elif dst_grad:
            d_dst = tl.div_rn(g, denom)
        else:
            d_dst = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
        if FROM_BACKUP:
            w0 = tl.load(bp + offs, mask=mask, other=other).to(tl.float32)
            w_new = w0 - dst_eta * (d_dst + wd * w0)
        else:
            # memory_efficient (fp32 only): undo the source step in place.
            w = tl.load(wp + offs, mask=mask, other=other)
            if SRC_MODE == DST_MODE:
                d_src = d_dst
            elif SRC_MODE == 0:
                d_src = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
            elif SRC_MODE == 1:
                d_src = tl.div_rn(g, denom)
            elif src_grad:
                d_src = tl.div_rn(g, denom)
            else:
                d_src = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
            w0 = tl.div_rn(w + src_eta * d_src, one_minus_src_wd)
            if same_dir:
                w_new = w - delta_eta * (d_dst + wd * w0)
            else:
                w_new = w0 - dst_eta * (d_dst + wd * w0)
        tl.store(wp + offs, _to_param(w_new, W_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["only_if_fallback"])
def move_kernel(table, sched, ctrl, only_if_fallback, src_eta, dst_eta, delta_eta, eps,
                bias_correction1, bias_correction2, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                ITERS: tl.constexpr, FROM_BACKUP: tl.constexpr, SRC_MODE: tl.constexpr,
                DST_MODE: tl.constexpr):
    """w: cand(src_eta, src) -> cand(dst_eta, dst); directions resolved here from ctrl."""
    pid = tl.program_id(0)
    row, chunk = _row(table, sched, pid)
    w_addr = tl.load(row + 0)
    g_addr = tl.load(row + 1)
    m_addr = tl.load(row + 2)
    v_addr = tl.load(row + 3)
    b_addr = tl.load(row + 4)
    n = tl.load(row + 5)
    wd64 = tl.load(row + 6).to(tl.float64, bitcast=True)
    wd = wd64.to(tl.float32)
    # 1 - src_eta*wd in float64, rounded once (as the reference's host arithmetic).
    one_minus_src_wd = (1.0 - tl.cast(src_eta, tl.float64) * wd64).to(tl.float32)
    scale = tl.load(ctrl + 0)
    fallback = tl.load(ctrl + 2) != 0.0
    live = (tl.load(ctrl + 1) == 0.0) & ((only_if_fallback == 0) | fallback)
    # Resolved directions (True: g*p).  Modes 0 and 1 fold to constants at compile time.
    dst_grad = (fallback | (DST_MODE == 1)) & (DST_MODE != 0)
    src_grad = (fallback | (SRC_MODE == 1)) & (SRC_MODE != 0)
    if FROM_BACKUP:
        need_g = dst_grad
        need_m = dst_grad == 0
    else:
        need_g = dst_grad | src_grad
        need_m = (dst_grad == 0) | (src_grad == 0)
    same_dir = src_grad == dst_grad
    start = chunk * (BLOCK * ITERS)
    addrs = w_addr | g_addr | m_addr | v_addr | b_addr
    fast = live & (start + BLOCK * ITERS <= n) & ((addrs & 15) == 0)
    n = tl.where(live, n, 0)   # not live: the slow path masks every element
    if fast:
        _move_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, need_g, need_m, src_grad,
                    dst_grad, same_dir, scale, wd, one_minus_src_wd, src_eta, dst_eta, delta_eta,
                    eps, bias_correction1, bias_correction2, W_DTYPE, BLOCK, ITERS, FROM_BACKUP,
                    SRC_MODE, DST_MODE, False)
    else:
        _move_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, need_g, need_m, src_grad,
                    dst_grad, same_dir, scale, wd, one_minus_src_wd, src_eta, dst_eta, delta_eta,
                    eps, bias_correction1, bias_correction2, W_DTYPE, BLOCK, ITERS, FROM_BACKUP,
                    SRC_MODE, DST_MODE, True)


# -- gradient sum of squares ----------------------------------------------------------------------
@triton.jit
def _sumsq_chunk(g_addr, start, n, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                 ITERS: tl.constexpr, MASKED: tl.constexpr):
    gp = g_addr.to(tl.pointer_type(W_DTYPE))
    if not MASKED:
        gp = tl.multiple_of(gp, 16)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            g = tl.load(gp + offs, mask=offs < n, other=0.0).to(tl.float32)
        else:
            g = tl.load(gp + offs).to(tl.float32)
        acc += g * g
    return tl.sum(acc, axis=0)


@triton.jit
def grad_sumsq_kernel(table, sched, partials, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                      ITERS: tl.constexpr):
    """Per-program sum of g*g, accumulated in fp32 (the math type, as the reference: an overflow
    to inf reads as a non-finite gradient); the finisher adds the partials in fp64."""
    pid = tl.program_id(0)
    row, chunk = _row(table, sched, pid)
    g_addr = tl.load(row + 1)
    n = tl.load(row + 5)
    start = chunk * (BLOCK * ITERS)
    if (start + BLOCK * ITERS <= n) & ((g_addr & 15) == 0):
        s = _sumsq_chunk(g_addr, start, n, W_DTYPE, BLOCK, ITERS, False)
    else:
        s = _sumsq_chunk(g_addr, start, n, W_DTYPE, BLOCK, ITERS, True)
    tl.store(partials + pid, s)


# -- reduction finisher ---------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n"])
def finish_kernel(partials, out, n, K: tl.constexpr, BLOCK: tl.constexpr):
    """out[k] = sum over i < n of partials[i, k] in float64, in a fixed order (one program)."""
    for k in tl.static_range(K):
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        start = 0
        while start < n:   # (a while loop: the interpreter cannot range() over an argument)
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(partials + offs * K + k, mask=offs < n, other=0.0).to(tl.float64)
            start += BLOCK
        tl.store(out + k, tl.sum(acc, axis=0))


KERNELS = (step_kernel, move_kernel, grad_sumsq_kernel, finish_kernel)

# -- every specialization the backend can launch (the AOT tool compiles exactly these) ------------
PARAM_DTYPES = ("fp32", "bf16", "fp16")
_TL_DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def step_constexprs(dtype: str, searching: bool, momentum_dir: bool, write_backup: bool,
                    block: int = BLOCK, iters: int = ITERS) -> dict:
    # Not searching always writes along the momentum direction (base.py).
    return dict(W_DTYPE=_TL_DTYPES[dtype], BLOCK=block, ITERS=iters, SEARCHING=bool(searching),
                MOMENTUM_DIR=bool(momentum_dir or not searching), WRITE_BACKUP=bool(write_backup))


def move_constexprs(dtype: str, from_backup: bool, src_mode: int, dst_mode: int,
                    block: int = BLOCK, iters: int = ITERS) -> dict:
    # The source direction only matters for in-place moves.
    return dict(W_DTYPE=_TL_DTYPES[dtype], BLOCK=block, ITERS=iters, FROM_BACKUP=bool(from_backup),
                SRC_MODE=MODE_MOMENTUM if from_backup else int(src_mode), DST_MODE=int(dst_mode))


def sumsq_constexprs(dtype: str, block: int = BLOCK, iters: int = ITERS) -> dict:
    return dict(W_DTYPE=_TL_DTYPES[dtype], BLOCK=block, ITERS=iters)


def finish_constexprs(k: int) -> dict:
    return dict(K=k, BLOCK=FINISH_BLOCK)


_STEP_SIG = {"table": "*i64", "sched": "*i32", "ctrl": "*fp32", "partials": "*fp32",
             **{name: "fp32" for name in ("eta", "beta1", "beta2", "one_minus_beta1",
                                          "one_minus_beta2", "eps", "bias_correction1",
                                          "bias_correction2")}}
_MOVE_SIG = {"table": "*i64", "sched": "*i32", "ctrl": "*fp32", "only_if_fallback": "i32",
             **{name: "fp32" for name in ("src_eta", "dst_eta", "delta_eta", "eps",
                                          "bias_correction1", "bias_correction2")}}
_SUMSQ_SIG = {"table": "*i64", "sched": "*i32", "partials": "*fp32"}


def specializations():
    """[(kernel, runtime-argument signature, constexprs, num_warps)] for every launch variant."""
    specs = []
    modes = (MODE_MOMENTUM, MODE_GRAD, MODE_FALLBACK)
    for dt in PARAM_DTYPES:
        for searching, momentum_dir in ((False, True), (True, True), (True, False)):
            for backup in (False, True):
                specs.append((step_kernel, _STEP_SIG,
                              step_constexprs(dt, searching, momentum_dir, backup), NUM_WARPS))
        for dst in modes:
            specs.append((move_kernel, _MOVE_SIG, move_constexprs(dt, True, 0, dst), NUM_WARPS))
        if dt == "fp32":    # in-place moves: memory_efficient, fp32 only
            for src in modes:
                for dst in modes:
                    specs.append((move_kernel, _MOVE_SIG, move_constexprs(dt, False, src, dst),
                                  NUM_WARPS))
        specs.append((grad_sumsq_kernel, _SUMSQ_SIG, sumsq_constexprs(dt), NUM_WARPS))
    for k in (2, 1):
        specs.append((finish_kernel, {"partials": "*fp32", "out": "*fp64", "n": "i32"},
                      finish_constexprs(k), FINISH_WARPS))
    return specs
