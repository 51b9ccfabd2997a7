"""Triton kernels of the fused ALSALS passes (contract v2: ``alsals_fused/backends/base.py``).

Every element-wise pass is one launch per bucket (the tensors of one dtype).  Its operands reach
the kernel through two small device tables that the backend builds once per bucket and caches:

``table``  int64 [T, TABLE_COLS], one row per tensor, columns ``TableCol`` (base.py): the
           addresses of w, g, m, v, the w0 backup (0 when absent), numel, and the weight decay as
           the bit pattern of a float64.
``sched``  int32 [P, 2], one row per program: (tensor row, chunk index in that tensor).  A chunk
           is BLOCK * ITERS (= ``CHUNK``) contiguous elements; empty tensors get no chunk.  The
           first ``n_fast`` rows are full chunks of tensors whose every address is 16-byte
           aligned: those programs run the unmasked, 128-bit specialization of the chunk body
           (no mask, no alignment test, no masked copy inside it).  The rows after them (tails,
           misaligned views) are separate programs of the same launch, running the masked body.

The control values live in ``ctl`` (float64, slots ``Ctl``); the kernels address its slots,
the table's columns and the directions ``Dir`` through constexpr copies of base.py's enums
(``_C_*``, ``_T_*``, ``_DIR_*`` below): base.py is the one source of truth, no literal offsets.

Decisions on the device:
- ``grad_kernel``: per-chunk fp32 sums of g*g; its last program (a ticket, below) adds the
  partials of every bucket in a fixed order in float64 and runs the grad finisher (writes ctl
  SCALE, SKIP, FALLBACK, LOSS0, PENDING), or writes the plain sum (``finish`` = 1).
- ``step_kernel``: the fused ADAM step; when searching, per-chunk fp32 slope partials, and the
  last program runs the step finisher (SLOPE, SLOPE_GRAD, S_NEW, FALLBACK) or writes the sums.
- ``verdict_kernel``: the per-trial decision of the contract, in one program.

"Last program finishes" ticket (``_ticket_is_last``): each program writes its partials, then
``tl.debug_barrier()`` (bar.sync: every thread's partial store of this program happens before
the ticket), then one ``atomic_add(counter, 1, sem="acq_rel", scope="gpu")``.  The release half
makes this program's partial stores visible at gpu scope before its increment; the atomic
read-modify-writes of the counter form one release sequence, so the program that draws ticket
``n_grid - 1`` (acquire half) observes every other program's increment and hence, by
happens-before, every partial written before it.  Triton broadcasts the scalar atomic's result
through shared memory with a barrier, so every thread of the last program is ordered after the
acquire; the finisher's loads additionally use ``.cg`` (L2, not the SM's L1).  Partials of the
earlier launches of the same pass (other buckets) are complete by stream order.  The last
program then sums partials[0..n) in index order in float64 (the same order whichever program
came last: run-to-run reproducible) and resets the counter to 0 for the next launch, which is
stream-ordered after it.  Nothing reads a partial before every program has taken its ticket.

Scalars that change every step (eta, betas, eps, bias corrections) are fp32 arguments: Triton
specializes on integers and pointer alignment, never on float values, so they cause no
recompilation.  Float64 host scalars of the finishers and the verdict (smoothing, c*eta, the clip
norm) travel as the int64 bit patterns of the doubles (``*_bits``, not specialized on), because
a Python float argument is fp32 in Triton.  fp64 decision arithmetic uses correctly rounded,
never-contracted operations (libdevice ``*_rn``; plain IEEE ops in the CPU interpreter), so the
finishers and the verdict compute exactly what ``decisions.py`` computes with torch ops.
"""
from __future__ import annotations

import triton
import triton.language as tl

from alsals_fused.backends.base import CHUNK, CTL_SIZE, TABLE_COLS, Ctl, Dir, TableCol, Verdict

try:  # Triton >= 3.2
    from triton.language.extra import libdevice as _libdevice
except ImportError:  # pragma: no cover
    _libdevice = None


def _interpreting() -> bool:
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # noqa: BLE001  (older Triton: the environment variable)
        import os
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# -- constexpr copies of base.py's enums (the only place they are spelled for the kernels) ------
_C_SCALE = tl.constexpr(int(Ctl.SCALE))
_C_SKIP = tl.constexpr(int(Ctl.SKIP))
_C_FALLBACK = tl.constexpr(int(Ctl.FALLBACK))
_C_LOSS0 = tl.constexpr(int(Ctl.LOSS0))
_C_SLOPE = tl.constexpr(int(Ctl.SLOPE))
_C_SLOPE_GRAD = tl.constexpr(int(Ctl.SLOPE_GRAD))
_C_S_NEW = tl.constexpr(int(Ctl.S_NEW))
_C_H = tl.constexpr(int(Ctl.H))
_C_S = tl.constexpr(int(Ctl.S))
_C_PENDING = tl.constexpr(int(Ctl.PENDING))
_C_UNDO = tl.constexpr(int(Ctl.UNDO))    # the driver writes it; move_kernel gets it as only_if
_V_ACCEPT = tl.constexpr(int(Verdict.ACCEPT))
_V_FINITE = tl.constexpr(int(Verdict.FINITE))
_V_FALLBACK = tl.constexpr(int(Verdict.FALLBACK))
_V_LOSS0 = tl.constexpr(int(Verdict.LOSS0))
_V_LOSS_TRY = tl.constexpr(int(Verdict.LOSS_TRY))
_V_SLOPE_USED = tl.constexpr(int(Verdict.SLOPE_USED))
_V_PENDING = tl.constexpr(int(Verdict.PENDING))
_V_H_NEW = tl.constexpr(int(Verdict.H_NEW))
_T_W = tl.constexpr(int(TableCol.W))
_T_G = tl.constexpr(int(TableCol.G))
_T_M = tl.constexpr(int(TableCol.M))
_T_V = tl.constexpr(int(TableCol.V))
_T_BACKUP = tl.constexpr(int(TableCol.BACKUP))
_T_NUMEL = tl.constexpr(int(TableCol.NUMEL))
_T_WD_BITS = tl.constexpr(int(TableCol.WD_BITS))
_T_COLS = tl.constexpr(int(TABLE_COLS))
_DIR_MOMENTUM = tl.constexpr(int(Dir.MOMENTUM))
_DIR_GRAD = tl.constexpr(int(Dir.GRAD))
_DIR_UPDATE = tl.constexpr(int(Dir.UPDATE))
_EXACT_FP64 = tl.constexpr(not _interpreting() and _libdevice is not None)
assert CTL_SIZE > max(Ctl) and TABLE_COLS > max(TableCol)

# ``finish`` argument of grad_kernel/step_kernel (a run-time value: one compiled kernel serves
# every bucket of a multi-bucket pass; only the last launch finishes).
FINISH_NONE = 0      # write partials only (every launch of a pass but the last)
FINISH_SUM = 1       # the last program writes the fp64 sums to ``out`` (finish=False)
FINISH_CTL = 2       # the last program runs the finisher into ctl (finish=True)

# Launch configuration shared by the backend and the AOT tool; BLOCK * ITERS == CHUNK (base.py).
# Chosen from the AOT compile's register counts (triton_kernels/NOTES.md): 512
# elements x 4 warps = 4 fp32 (one 128-bit access) per thread per tensor and iteration keeps the
# fp32 searching step kernel under 96 registers with no spills on sm_80/sm_90.
BLOCK = 512
ITERS = CHUNK // BLOCK
NUM_WARPS = 4
VERDICT_WARPS = 1
# Compile options of every launch (and of the AOT compile).  No FMA contraction: each fp32
# element-wise update (m*b1 + (1-b1)*g, w0 - eta*(d + wd*w0), ...) rounds after every operation
# as the CPU interpreter computes it, so what the interpreter tests check is what runs on the GPU
# (docs/algorithm.md section 5; the cost is in NOTES.md).
COMPILE_OPTIONS = {"enable_fp_fusion": False}
# The finishers' accumulator widths, in BLOCKs (``_sum_partials``): 2 * BLOCK = 1024 lanes, 8
# values per thread per round for the grad finisher, and for each of the step finisher's two
# sums, read together (one contiguous 2048-value load per round).  Wider accumulators raise the
# kernels' register counts (the whole pass's occupancy): 4 * BLOCK took the grad kernel from 40
# to 67 registers on sm_90, two rounds in flight to 48 (triton_kernels/NOTES.md).
SUM_LANES = {"grad": 2, "step": 2}
_GRAD_LANES = tl.constexpr(SUM_LANES["grad"])
_STEP_LANES = tl.constexpr(SUM_LANES["step"])
assert BLOCK * ITERS == CHUNK


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
def _f64(bits):
    """A float64 host scalar passed as the int64 bits of the double (interpreter: int32/uint32
    for small bit patterns, hence the widening first)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _mul64(a, b):
    if _EXACT_FP64:
        return _libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _add64(a, b):
    if _EXACT_FP64:
        return _libdevice.add_rn(a, b)
    else:
        return a + b


@triton.jit
def _div64(a, b):
    if _EXACT_FP64:
        return _libdevice.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt64(a):
    if _EXACT_FP64:
        return _libdevice.sqrt_rn(a)
    else:
        return tl.sqrt(a)


@triton.jit
def _isfinite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _row(table, sched, pid):
    """(address of the tensor's table row, chunk index) of program ``pid``."""
    row = tl.load(sched + 2 * pid).to(tl.int64)
    chunk = tl.load(sched + 2 * pid + 1).to(tl.int64)
    return table + row * _T_COLS, chunk


@triton.jit
def _ticket_is_last(counter, n_grid):
    """True in exactly one program of the launch: the one that draws the last ticket (the
    memory-ordering argument is in the module docstring)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    return ticket == n_grid - 1


@triton.jit
def _pairwise_sum(x, W: tl.constexpr):
    """Sum of the W (a power of two) values of ``x`` as a fixed pairwise tree: (x0+x1), (x2+x3),
    ... then the same over the halves, so the result does not depend on how ``tl.sum`` orders a
    reduction (each step adds exactly two values; ``sum_partials_emulated`` mirrors it)."""
    for i in tl.static_range(1, 32):
        if (W >> i) > 0:
            x = tl.sum(tl.reshape(x, [W >> i, 2]), axis=1)
    return tl.sum(x, axis=0)


@triton.jit
def _sum_partials(partials, n, W: tl.constexpr):
    """sum over i < n of partials[i] in float64, in a fixed order: lane j of a W-wide
    accumulator adds partials j, j + W, j + 2W, ... in turn, then ``_pairwise_sum`` adds the W
    lanes (``sum_partials_emulated``).  Only the last program of a pass runs this."""
    offs = tl.arange(0, W)
    acc = tl.zeros([W], dtype=tl.float64)
    start = 0
    while start < n:   # (a while loop: the interpreter cannot range() over an argument)
        idx = start + offs
        acc += tl.load(partials + idx, mask=idx < n, other=0.0, cache_modifier=".cg").to(tl.float64)
        start += W
    return _pairwise_sum(acc, W)


@triton.jit
def _sum_partial_pairs(partials, n, W: tl.constexpr):
    """(sum of partials[2i], sum of partials[2i + 1]) over i < n, each in ``_sum_partials``'s
    order with W lanes, from one contiguous load of 2W values per round (both sums of the step
    finisher in one loop)."""
    offs = tl.arange(0, 2 * W)
    acc0 = tl.zeros([W], dtype=tl.float64)
    acc1 = tl.zeros([W], dtype=tl.float64)
    start = 0
    while start < n:
        idx = 2 * start + offs
        x = tl.load(partials + idx, mask=idx < 2 * n, other=0.0, cache_modifier=".cg")
        x0, x1 = tl.split(tl.reshape(x, [W, 2]))
        acc0 += x0.to(tl.float64)
        acc1 += x1.to(tl.float64)
        start += W
    return _pairwise_sum(acc0, W), _pairwise_sum(acc1, W)


# -- gradient sum of squares + grad finisher ----------------------------------------------------
@triton.jit
def _sumsq_chunk(g_addr, start, n, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                 ITERS: tl.constexpr, MASKED: tl.constexpr):
    gp = g_addr.to(tl.pointer_type(W_DTYPE))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if MASKED:
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            g = tl.load(gp + offs, mask=offs < n, other=0.0).to(tl.float32)
            acc += g * g
    else:
        gp = tl.multiple_of(gp, 16)
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            g = tl.load(gp + offs).to(tl.float32)
            acc += g * g
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["part_off", "n_parts", "n_fast", "n_prog", "n_grid", "finish",
                               "clip", "max_norm_bits"])
def grad_kernel(table, sched, partials, counter, ctl, loss0, out, part_off, n_parts, n_fast,
                n_prog, n_grid, finish, clip, max_norm_bits: tl.int64, W_DTYPE: tl.constexpr,
                BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """partials[part_off + pid] = fp32 sum of g*g over the program's chunk (an fp32 overflow is
    inf: a non-finite gradient, as the reference).  ``finish`` != FINISH_NONE: the last program
    sums partials[0..n_parts) (every bucket of the pass) in fp64 and writes ``out`` (SUM) or
    runs the grad finisher (CTL) on ``loss0``, as ``decisions.finish_grad``: ``clip`` != 0 when
    there is a max_grad_norm (its float64 bits in ``max_norm_bits``)."""
    pid = tl.program_id(0)
    if pid < n_prog:
        row, chunk = _row(table, sched, pid)
        g_addr = tl.load(row + _T_G)
        n = tl.load(row + _T_NUMEL)
        start = chunk * (BLOCK * ITERS)
        if pid < n_fast:
            s = _sumsq_chunk(g_addr, start, n, W_DTYPE, BLOCK, ITERS, False)
        else:
            s = _sumsq_chunk(g_addr, start, n, W_DTYPE, BLOCK, ITERS, True)
        tl.store(partials + part_off + pid, s)
    if finish != 0:
        if _ticket_is_last(counter, n_grid):
            sumsq = _sum_partials(partials, n_parts, _GRAD_LANES * BLOCK)
            if finish == 1:
                tl.store(out, sumsq)
            else:
                l0 = tl.load(loss0).to(tl.float64)
                finite = _isfinite(l0) & _isfinite(sumsq)
                one = tl.full((), 1.0, tl.float64)
                # max_norm / (sqrt(sumsq) + 1e-6), as torch computes a scalar over a tensor:
                # reciprocal, then times the scalar; at most 1; 1 when not finite or no clip.
                denom = _add64(_sqrt64(sumsq), tl.full((), 1e-6, tl.float64))
                coef = _mul64(_div64(one, denom), _f64(max_norm_bits))
                coef = tl.where(coef > 1.0, one, coef)
                scale = tl.where(finite & (clip != 0), coef, one)
                skip = tl.where(finite, 0.0, 1.0).to(tl.float64)
                tl.store(ctl + _C_SCALE, scale)
                tl.store(ctl + _C_SKIP, skip)
                tl.store(ctl + _C_FALLBACK, tl.zeros((), tl.float64))
                tl.store(ctl + _C_LOSS0, l0)
                tl.store(ctl + _C_PENDING, _add64(tl.load(ctl + _C_PENDING), skip))
            tl.store(counter, 0)


# -- step pass + step finisher --------------------------------------------------------------------
@triton.jit
def _step_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, scale, wd, eta,
                beta1, beta2, one_minus_beta1, one_minus_beta2, eps, bias_correction1,
                bias_correction2, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                ITERS: tl.constexpr, SEARCHING: tl.constexpr, SEARCH_DIR: tl.constexpr,
                WRITE_BACKUP: tl.constexpr, MASKED: tl.constexpr):
    wp = w_addr.to(tl.pointer_type(W_DTYPE))
    gp = g_addr.to(tl.pointer_type(W_DTYPE))
    mp = m_addr.to(tl.pointer_type(tl.float32))
    vp = v_addr.to(tl.pointer_type(tl.float32))
    bp = b_addr.to(tl.pointer_type(W_DTYPE))
    if not MASKED:   # the schedule put only aligned full chunks here: 128-bit accesses
        wp = tl.multiple_of(wp, 16)
        gp = tl.multiple_of(gp, 16)
        mp = tl.multiple_of(mp, 16)
        vp = tl.multiple_of(vp, 16)
        bp = tl.multiple_of(bp, 16)
    # Not searching: SEARCH_DIR is MOMENTUM (step_constexprs), the candidate is along m_hat*p.
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gp = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            mask = offs < n
            w_raw = tl.load(wp + offs, mask=mask, other=0.0)
            g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32) * scale
            m = tl.load(mp + offs, mask=mask, other=0.0)
            v = tl.load(vp + offs, mask=mask, other=0.0)
        else:
            mask = None
            w_raw = tl.load(wp + offs)
            g = tl.load(gp + offs).to(tl.float32) * scale
            m = tl.load(mp + offs)
            v = tl.load(vp + offs)
        m = m * beta1 + one_minus_beta1 * g
        v = v * beta2 + one_minus_beta2 * g * g
        tl.store(mp + offs, m, mask=mask)
        tl.store(vp + offs, v, mask=mask)
        if WRITE_BACKUP:
            tl.store(bp + offs, w_raw, mask=mask)
        denom = tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps
        d_grad = tl.div_rn(g, denom)
        if SEARCH_DIR == _DIR_MOMENTUM:
            d = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
        else:
            d = d_grad
        if SEARCHING:
            # Masked lanes read g = m = v = 0, so they add exactly 0.
            acc_d += g * d
            if SEARCH_DIR == _DIR_MOMENTUM:
                acc_gp += g * d_grad
        w0 = w_raw.to(tl.float32)
        w_new = w0 - eta * (d + wd * w0)
        tl.store(wp + offs, _to_param(w_new, W_DTYPE), mask=mask)
    s_d = tl.sum(acc_d, axis=0)
    if SEARCH_DIR == _DIR_MOMENTUM:
        s_gp = tl.sum(acc_gp, axis=0)
    else:
        s_gp = s_d      # along g*p the slope is sum(g*g*p) itself
    return s_d, s_gp


@triton.jit(do_not_specialize=["part_off", "n_parts", "n_fast", "n_prog", "n_grid", "finish",
                               "smoothing_bits", "one_minus_smoothing_bits"])
def step_kernel(table, sched, ctl, partials, counter, out, part_off, n_parts, n_fast, n_prog,
                n_grid, finish, eta, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                bias_correction1, bias_correction2, smoothing_bits: tl.int64,
                one_minus_smoothing_bits: tl.int64, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                ITERS: tl.constexpr, SEARCHING: tl.constexpr, SEARCH_DIR: tl.constexpr,
                WRITE_BACKUP: tl.constexpr):
    """m, v absorb g*SCALE; optional w0 backup; w = cand(eta, d) along MOMENTUM (not searching)
    or SEARCH_DIR; when SEARCHING, partials[2*(part_off + pid) + {0, 1}] = fp32
    [sum(g*d), sum(g*g*p)] and, if ``finish``, the last program runs the step finisher (CTL) or
    writes the fp64 sums to ``out`` (SUM).  ctl[SKIP] set: no program touches memory, except
    program 0 of a finishing launch, which writes the finisher's result for zero sums."""
    pid = tl.program_id(0)
    live = tl.load(ctl + _C_SKIP) == 0.0
    if live:
        if pid < n_prog:
            row, chunk = _row(table, sched, pid)
            w_addr = tl.load(row + _T_W)
            g_addr = tl.load(row + _T_G)
            m_addr = tl.load(row + _T_M)
            v_addr = tl.load(row + _T_V)
            b_addr = tl.load(row + _T_BACKUP)
            n = tl.load(row + _T_NUMEL)
            wd = tl.load(row + _T_WD_BITS).to(tl.float64, bitcast=True).to(tl.float32)
            scale = tl.load(ctl + _C_SCALE).to(tl.float32)
            start = chunk * (BLOCK * ITERS)
            if pid < n_fast:
                s_d, s_gp = _step_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, scale,
                                        wd, eta, beta1, beta2, one_minus_beta1, one_minus_beta2,
                                        eps, bias_correction1, bias_correction2, W_DTYPE, BLOCK,
                                        ITERS, SEARCHING, SEARCH_DIR, WRITE_BACKUP, False)
            else:
                s_d, s_gp = _step_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, scale,
                                        wd, eta, beta1, beta2, one_minus_beta1, one_minus_beta2,
                                        eps, bias_correction1, bias_correction2, W_DTYPE, BLOCK,
                                        ITERS, SEARCHING, SEARCH_DIR, WRITE_BACKUP, True)
            if SEARCHING:
                tl.store(partials + 2 * (part_off + pid), s_d)
                tl.store(partials + 2 * (part_off + pid) + 1, s_gp)
    if SEARCHING:
        if finish != 0:
            if live:
                last = _ticket_is_last(counter, n_grid)
            else:
                last = pid == 0      # no partials this step: program 0 writes zero sums
            if last:
                slope = tl.zeros((), tl.float64)
                slope_grad = tl.zeros((), tl.float64)
                if live:
                    slope, slope_grad = _sum_partial_pairs(partials, n_parts, _STEP_LANES * BLOCK)
                    tl.store(counter, 0)
                if finish == 1:
                    tl.store(out, slope)
                    tl.store(out + 1, slope_grad)
                else:
                    # as decisions.finish_slope: S*smoothing + SLOPE*(1 - smoothing)
                    s_new = _add64(_mul64(tl.load(ctl + _C_S), _f64(smoothing_bits)),
                                   _mul64(slope, _f64(one_minus_smoothing_bits)))
                    tl.store(ctl + _C_SLOPE, slope)
                    tl.store(ctl + _C_SLOPE_GRAD, slope_grad)
                    tl.store(ctl + _C_S_NEW, s_new)
                    fallback = live & (s_new <= 0.0)
                    tl.store(ctl + _C_FALLBACK, tl.where(fallback, 1.0, 0.0).to(tl.float64))


# -- move pass ------------------------------------------------------------------------------------
# Run-time flags (fallback-resolved directions, which operands are needed) are uniform per
# program, so they select code with scalar ifs rather than per-element masks or selects.
@triton.jit
def _move_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, need_g, need_m, src_grad,
                dst_grad, same_dir, scale, wd, one_minus_src_wd, src_eta, dst_eta, delta_eta, eps,
                bias_correction1, bias_correction2, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                ITERS: tl.constexpr, FROM_BACKUP: tl.constexpr, SRC_DIR: tl.constexpr,
                DST_DIR: tl.constexpr, MASKED: tl.constexpr):
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
        if DST_DIR == _DIR_MOMENTUM:
            d_dst = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
        elif DST_DIR == _DIR_GRAD:
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
            if SRC_DIR == DST_DIR:
                d_src = d_dst
            elif SRC_DIR == _DIR_MOMENTUM:
                d_src = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
            elif SRC_DIR == _DIR_GRAD:
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


@triton.jit(do_not_specialize=["n_fast", "n_prog", "only_if"])
def move_kernel(table, sched, ctl, n_fast, n_prog, only_if, src_eta, dst_eta, delta_eta,
                eps, bias_correction1, bias_correction2, W_DTYPE: tl.constexpr,
                BLOCK: tl.constexpr, ITERS: tl.constexpr, FROM_BACKUP: tl.constexpr,
                SRC_DIR: tl.constexpr, DST_DIR: tl.constexpr):
    """w: cand(src_eta, SRC_DIR) -> cand(dst_eta, DST_DIR); Dir.UPDATE resolved here from
    ctl[FALLBACK].  ``only_if``: the ctl slot that gates the move (base.MOVE_CONDITIONS), -1 for
    none.  Nothing to do (ctl[SKIP], or ctl[only_if] == 0): every program returns after reading
    ctl[SKIP], ctl[FALLBACK] and ctl[only_if]."""
    pid = tl.program_id(0)
    not_skip = tl.load(ctl + _C_SKIP) == 0.0
    fallback = tl.load(ctl + _C_FALLBACK) != 0.0
    gate = tl.load(ctl + only_if, mask=only_if >= 0, other=1.0) != 0.0
    live = not_skip & gate & (pid < n_prog)
    if live:
        row, chunk = _row(table, sched, pid)
        w_addr = tl.load(row + _T_W)
        g_addr = tl.load(row + _T_G)
        m_addr = tl.load(row + _T_M)
        v_addr = tl.load(row + _T_V)
        b_addr = tl.load(row + _T_BACKUP)
        n = tl.load(row + _T_NUMEL)
        wd64 = tl.load(row + _T_WD_BITS).to(tl.float64, bitcast=True)
        wd = wd64.to(tl.float32)
        # 1 - src_eta*wd in float64, rounded once (as the reference's host arithmetic).
        one_minus_src_wd = (1.0 - tl.cast(src_eta, tl.float64) * wd64).to(tl.float32)
        scale = tl.load(ctl + _C_SCALE).to(tl.float32)
        # Resolved directions (True: g*p).  MOMENTUM and GRAD fold to constants at compile time.
        dst_grad = (fallback | (DST_DIR == _DIR_GRAD)) & (DST_DIR != _DIR_MOMENTUM)
        src_grad = (fallback | (SRC_DIR == _DIR_GRAD)) & (SRC_DIR != _DIR_MOMENTUM)
        if FROM_BACKUP:
            need_g = dst_grad
            need_m = dst_grad == 0
        else:
            need_g = dst_grad | src_grad
            need_m = (dst_grad == 0) | (src_grad == 0)
        same_dir = src_grad == dst_grad
        start = chunk * (BLOCK * ITERS)
        if pid < n_fast:
            _move_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, need_g, need_m,
                        src_grad, dst_grad, same_dir, scale, wd, one_minus_src_wd, src_eta,
                        dst_eta, delta_eta, eps, bias_correction1, bias_correction2, W_DTYPE,
                        BLOCK, ITERS, FROM_BACKUP, SRC_DIR, DST_DIR, False)
        else:
            _move_chunk(w_addr, g_addr, m_addr, v_addr, b_addr, start, n, need_g, need_m,
                        src_grad, dst_grad, same_dir, scale, wd, one_minus_src_wd, src_eta,
                        dst_eta, delta_eta, eps, bias_correction1, bias_correction2, W_DTYPE,
                        BLOCK, ITERS, FROM_BACKUP, SRC_DIR, DST_DIR, True)


# -- the per-trial verdict ------------------------------------------------------------------------
@triton.jit(do_not_specialize=["c_eta_bits", "smoothing_bits", "one_minus_smoothing_bits"])
def verdict_kernel(ctl, loss_try, out, c_eta_bits: tl.int64, smoothing_bits: tl.int64,
                   one_minus_smoothing_bits: tl.int64):
    """The contract's per-trial decision (base.py), one program, written as
    ``decisions.verdict`` computes it (same operations, same rounding)::

        L = float64(loss_try); diff = L0 - L; h_new = H*smoothing + diff*(1-smoothing)
        test = (fb ? diff : h_new) >= (fb ? SLOPE_GRAD : S_NEW) * (c*eta)
        ok = (test | L == L0) & (diff - diff + SKIP == 0)   # not skipped and diff finite
        out = [ok, SKIP == 0, FALLBACK, L0, L, fb ? SLOPE_GRAD : SLOPE, PENDING, h_new]
        ctl[PENDING] = 0; if ok and not fb: H = h_new, S = S_NEW
    """
    lt = tl.load(loss_try).to(tl.float64)
    l0 = tl.load(ctl + _C_LOSS0)
    skip = tl.load(ctl + _C_SKIP)
    fb_raw = tl.load(ctl + _C_FALLBACK)
    fb = fb_raw != 0.0
    slope_grad = tl.load(ctl + _C_SLOPE_GRAD)
    diff = l0 - lt
    h_new = _add64(_mul64(tl.load(ctl + _C_H), _f64(smoothing_bits)),
                   _mul64(diff, _f64(one_minus_smoothing_bits)))
    lhs = tl.where(fb, diff, h_new)
    rhs = _mul64(tl.where(fb, slope_grad, tl.load(ctl + _C_S_NEW)), _f64(c_eta_bits))
    ok = ((lhs >= rhs) | (lt == l0)) & (_add64(diff - diff, skip) == 0.0)
    one = tl.full((), 1.0, tl.float64)
    zero = tl.zeros((), tl.float64)
    tl.store(out + _V_ACCEPT, tl.where(ok, one, zero))
    tl.store(out + _V_FINITE, tl.where(skip == 0.0, one, zero))
    tl.store(out + _V_FALLBACK, fb_raw)
    tl.store(out + _V_LOSS0, l0)
    tl.store(out + _V_LOSS_TRY, lt)
    tl.store(out + _V_SLOPE_USED, tl.where(fb, slope_grad, tl.load(ctl + _C_SLOPE)))
    tl.store(out + _V_PENDING, tl.load(ctl + _C_PENDING))
    tl.store(out + _V_H_NEW, h_new)
    tl.store(ctl + _C_PENDING, zero)
    if ok & (fb_raw == 0.0):
        tl.store(ctl + _C_H, h_new)
        tl.store(ctl + _C_S, tl.load(ctl + _C_S_NEW))


def sum_partials_emulated(values, lanes: int) -> float:
    """What ``_sum_partials`` (and each sum of ``_sum_partial_pairs``) computes for the fp32
    ``values`` with ``lanes`` lanes (``SUM_LANES[pass] * BLOCK``), in its order, on the host:
    lane j adds values j, j + lanes, ... in turn from 0.0, then the pairwise tree over the lanes;
    every addition is one IEEE fp64 add."""
    import numpy as np
    x = np.asarray(values, dtype=np.float32).astype(np.float64)
    padded = np.zeros(max(1, -(-len(x) // lanes)) * lanes)
    padded[:len(x)] = x
    acc = np.zeros(lanes)
    for row in padded.reshape(-1, lanes):
        acc = acc + row
    while len(acc) > 1:
        acc = acc[0::2] + acc[1::2]
    return float(acc[0])


KERNELS = (grad_kernel, step_kernel, move_kernel, verdict_kernel)
# The kernels whose outputs the driver's control path depends on, and what they write: a launch
# stub (benchmarks/hot_path.py) fills these the way the kernel would.  grad/step finish only in
# the launch whose ``finish`` argument is not FINISH_NONE.
FINISHERS = {"grad_kernel": "grad", "step_kernel": "step", "verdict_kernel": "verdict"}

# -- every specialization the backend can launch (the AOT tool compiles exactly these) ------------
PARAM_DTYPES = ("fp32", "bf16", "fp16")
LOSS_DTYPES = ("fp32", "fp64", "bf16", "fp16")   # loss0 and loss_try: any float dtype (base.py)
_TL_DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def grad_constexprs(dtype: str, block: int = BLOCK, iters: int = ITERS) -> dict:
    return dict(W_DTYPE=_TL_DTYPES[dtype], BLOCK=block, ITERS=iters)


def step_constexprs(dtype: str, searching: bool, search_dir: int, write_backup: bool,
                    block: int = BLOCK, iters: int = ITERS) -> dict:
    # Not searching always writes along the momentum direction (base.py): one specialization.
    if search_dir not in (Dir.MOMENTUM, Dir.GRAD):
        raise ValueError(f"step pass: search_dir must be Dir.MOMENTUM or Dir.GRAD, not {search_dir!r}")
    return dict(W_DTYPE=_TL_DTYPES[dtype], BLOCK=block, ITERS=iters, SEARCHING=bool(searching),
                SEARCH_DIR=int(search_dir) if searching else int(Dir.MOMENTUM),
                WRITE_BACKUP=bool(write_backup))


def move_constexprs(dtype: str, from_backup: bool, src_dir: int, dst_dir: int,
                    block: int = BLOCK, iters: int = ITERS) -> dict:
    # The source direction only matters for in-place moves.
    return dict(W_DTYPE=_TL_DTYPES[dtype], BLOCK=block, ITERS=iters, FROM_BACKUP=bool(from_backup),
                SRC_DIR=int(Dir.MOMENTUM) if from_backup else int(src_dir), DST_DIR=int(dst_dir))


def _grad_sig(loss_dtype: str) -> dict:
    # The loss arrives as the closure returned it (no conversion op on the hot path).
    return {"table": "*i64", "sched": "*i32", "partials": "*fp32", "counter": "*i32",
            "ctl": "*fp64", "loss0": f"*{loss_dtype}", "out": "*fp64",
            **{name: "i32" for name in ("part_off", "n_parts", "n_fast", "n_prog", "n_grid",
                                        "finish", "clip")},
            "max_norm_bits": "i64"}
_STEP_SIG = {"table": "*i64", "sched": "*i32", "ctl": "*fp64", "partials": "*fp32",
             "counter": "*i32", "out": "*fp64",
             **{name: "i32" for name in ("part_off", "n_parts", "n_fast", "n_prog", "n_grid",
                                         "finish")},
             **{name: "fp32" for name in ("eta", "beta1", "beta2", "one_minus_beta1",
                                          "one_minus_beta2", "eps", "bias_correction1",
                                          "bias_correction2")},
             "smoothing_bits": "i64", "one_minus_smoothing_bits": "i64"}
_MOVE_SIG = {"table": "*i64", "sched": "*i32", "ctl": "*fp64", "n_fast": "i32", "n_prog": "i32",
             "only_if": "i32",
             **{name: "fp32" for name in ("src_eta", "dst_eta", "delta_eta", "eps",
                                          "bias_correction1", "bias_correction2")}}


def _verdict_sig(loss_dtype: str) -> dict:
    return {"ctl": "*fp64", "loss_try": f"*{loss_dtype}", "out": "*fp64", "c_eta_bits": "i64",
            "smoothing_bits": "i64", "one_minus_smoothing_bits": "i64"}


def specializations():
    """[(kernel, runtime-argument signature, constexprs, num_warps)] for every launch variant."""
    specs = []
    dirs = (Dir.MOMENTUM, Dir.GRAD, Dir.UPDATE)
    for dt in PARAM_DTYPES:
        for lt in LOSS_DTYPES:
            specs.append((grad_kernel, _grad_sig(lt), grad_constexprs(dt), NUM_WARPS))
        for searching, search_dir in ((False, Dir.MOMENTUM), (True, Dir.MOMENTUM),
                                      (True, Dir.GRAD)):
            for backup in (False, True):
                specs.append((step_kernel, _STEP_SIG,
                              step_constexprs(dt, searching, search_dir, backup), NUM_WARPS))
        for dst in dirs:
            specs.append((move_kernel, _MOVE_SIG, move_constexprs(dt, True, Dir.MOMENTUM, dst),
                          NUM_WARPS))
        if dt == "fp32":    # in-place moves: memory_efficient, fp32 only
            for src in dirs:
                for dst in dirs:
                    specs.append((move_kernel, _MOVE_SIG, move_constexprs(dt, False, src, dst),
                                  NUM_WARPS))
    for lt in LOSS_DTYPES:
        specs.append((verdict_kernel, _verdict_sig(lt), {}, VERDICT_WARPS))
    return specs
