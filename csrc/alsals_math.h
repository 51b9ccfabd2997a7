// The element-wise math of ALSALS (docs/algorithm.md section 1, backends/base.py), shared by every
// kernel and by the host-only unit test (csrc/tests/test_math.cpp).
//
// Everything here is a __host__ __device__ inline function of plain scalars: no torch, no CUDA
// runtime.  Compiled by a host compiler (no __CUDACC__) the qualifiers vanish, which is what lets
// ctest check the formulas without a GPU.  All math is fp32; parameters are stored as fp32, bf16
// or fp16 and converted with round-to-nearest-even.  The order of operations follows base.py:
//   m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
//   denom = sqrt(v / bc2) + eps          (1/p; eps outside the sqrt)
//   MOMENTUM: d = (m / bc1) / denom ;  GRAD: d = g / denom
//   cand(eta, d) = w0 - eta * (d + wd * w0)
// and the device decisions of contract v2 (grad finisher, step finisher, verdict) in float64,
// operation for operation as backends/base.py and backends/decisions.py write them.
#pragma once

#include <stdint.h>
#include <math.h>
#if !defined(__CUDA_ARCH__)
#include <string.h>
#endif

#include "alsals_layout.h"  // CHUNK, Ctl, Verdict, Dir, TableCol: generated from base.py

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define ALSALS_HD __host__ __device__ __forceinline__
#else
#define ALSALS_HD inline
#endif

namespace alsals {

// Dir::UPDATE -> GRAD or MOMENTUM once the device fallback flag is known.
ALSALS_HD int resolve_dir(int dir, bool fallback) {
  return dir == Dir::UPDATE ? (fallback ? int(Dir::GRAD) : int(Dir::MOMENTUM)) : dir;
}

// ---- storage types --------------------------------------------------------------------------
// 16-bit storage is kept as raw bits so that this header needs no CUDA type on the host.
struct bf16_bits { uint16_t x; };
struct fp16_bits { uint16_t x; };

ALSALS_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

ALSALS_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// bf16 is the top half of an fp32: widening is a shift; narrowing rounds to nearest even
// (NaN becomes the canonical quiet NaN 0x7FC0, as torch does on the CPU).
ALSALS_HD float bf16_to_float(uint16_t h) { return bits_as_float(uint32_t(h) << 16); }

ALSALS_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE binary16.  On the device the conversion instructions do it; the host versions (the same
// round-to-nearest-even) exist for the unit test and any host caller.
ALSALS_HD float fp16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_as_float(sign | 0x7f800000u | (mant << 13));
  return bits_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

ALSALS_HD uint16_t float_to_fp16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = float_as_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                 // normal half (>= 2^-14)
    a += 0x0fffu + ((a >> 13) & 1u);                      // round the 13 dropped bits to even
    return uint16_t(sign | ((a - (112u << 23)) >> 13));
  }
  const uint32_t e = a >> 23;                             // subnormal half: units of 2^-24
  if (e < 102) return uint16_t(sign);                     // below 2^-25: rounds to zero
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;                        // 14..24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return uint16_t(sign | q);
#endif
}

// to_float / from_float over the three storage types.
ALSALS_HD float to_float(float x) { return x; }
ALSALS_HD float to_float(bf16_bits x) { return bf16_to_float(x.x); }
ALSALS_HD float to_float(fp16_bits x) { return fp16_to_float(x.x); }

template <typename S> ALSALS_HD S from_float(float x);
template <> ALSALS_HD float from_float<float>(float x) { return x; }
template <> ALSALS_HD bf16_bits from_float<bf16_bits>(float x) { return bf16_bits{float_to_bf16(x)}; }
template <> ALSALS_HD fp16_bits from_float<fp16_bits>(float x) { return fp16_bits{float_to_fp16(x)}; }

// ---- the ADAM direction and the candidate -------------------------------------------------
ALSALS_HD void adam_moments(float g, float& m, float& v, float beta1, float one_minus_beta1,
                            float beta2, float one_minus_beta2) {
  m = m * beta1 + one_minus_beta1 * g;
  v = v * beta2 + one_minus_beta2 * g * g;
}

// 1/p = sqrt(v / bias_correction2) + eps
ALSALS_HD float adam_denom(float v, float bias_correction2, float eps) {
  return sqrtf(v / bias_correction2) + eps;
}

// m_hat * p
ALSALS_HD float momentum_direction(float m, float bias_correction1, float denom) {
  return (m / bias_correction1) / denom;
}

// g * p
ALSALS_HD float grad_direction(float g, float denom) { return g / denom; }

// d for a resolved direction (Dir::MOMENTUM or Dir::GRAD).
ALSALS_HD float direction(int dir, float g, float m, float denom, float bias_correction1) {
  return dir == Dir::MOMENTUM ? momentum_direction(m, bias_correction1, denom) : grad_direction(g, denom);
}

// cand(eta, d) = w0 - eta * (d + wd * w0)
ALSALS_HD float candidate(float w0, float eta, float d, float wd) { return w0 - eta * (d + wd * w0); }

// memory_efficient: w0 from w = cand(src_eta, d_src); shrink = 1 - src_eta*wd (computed in double
// on the host, 1 when wd == 0, so the division is exact then).
ALSALS_HD float recover_w0(float w, float src_eta, float d_src, float shrink) {
  return (w + src_eta * d_src) / shrink;
}

// memory_efficient, same direction: w -= (dst_eta - src_eta) * (d + wd * w0); eta_delta is
// dst_eta - src_eta computed in double on the host.
ALSALS_HD float move_in_place(float w, float eta_delta, float d, float wd, float w0) {
  return w - eta_delta * (d + wd * w0);
}

// ---- the device decisions (float64) --------------------------------------------------------
// Each operation rounds on its own (no fused multiply-add), as torch computes decisions.py.
ALSALS_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
ALSALS_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
ALSALS_HD double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
ALSALS_HD bool finite64(double x) { return x - x == 0.0; }  // false for inf and NaN

// Grad finisher: sumsq over every bucket, L0 (averaged over ranks); max_grad_norm < 0: no
// clipping (decisions.finish_grad's None).
ALSALS_HD void finish_grad(double* ctl, double sumsq, double loss0, double max_grad_norm) {
  const bool finite = finite64(loss0) && finite64(sumsq);
  double scale = 1.0;
  if (finite && max_grad_norm >= 0.0) {
    // max_grad_norm / (sqrt(sumsq) + 1e-6) as torch evaluates it in decisions.py
    // (float / Tensor is Tensor.reciprocal() * float), so both give the same bits.
    const double coef = mul_rn(1.0 / add_rn(sqrt(sumsq), 1e-6), max_grad_norm);
    scale = coef < 1.0 ? coef : 1.0;
  }
  const double skip = finite ? 0.0 : 1.0;
  ctl[Ctl::SCALE] = scale;
  ctl[Ctl::SKIP] = skip;
  ctl[Ctl::PENDING] = add_rn(ctl[Ctl::PENDING], skip);
  ctl[Ctl::FALLBACK] = 0.0;
  ctl[Ctl::LOSS0] = loss0;
}

// Step finisher (searching steps): the two slopes, the smoothed slope and the fallback flag.
ALSALS_HD void finish_step(double* ctl, double slope, double slope_grad, double smoothing) {
  ctl[Ctl::SLOPE] = slope;
  ctl[Ctl::SLOPE_GRAD] = slope_grad;
  const double s_new = add_rn(mul_rn(smoothing, ctl[Ctl::S]), mul_rn(sub_rn(1.0, smoothing), slope));
  ctl[Ctl::S_NEW] = s_new;
  ctl[Ctl::FALLBACK] = (ctl[Ctl::SKIP] == 0.0 && s_new <= 0.0) ? 1.0 : 0.0;
}

// The per-trial decision (base.py, verdict): writes out[VERDICT_SIZE], updates H, S, PENDING.
ALSALS_HD void verdict(double* ctl, double loss_try, double eta, double c, double smoothing, double* out) {
  const double l0 = ctl[Ctl::LOSS0], l = loss_try, diff = sub_rn(l0, l);
  const bool fb = ctl[Ctl::FALLBACK] != 0.0, finite = ctl[Ctl::SKIP] == 0.0;
  const double h_new = add_rn(mul_rn(smoothing, ctl[Ctl::H]), mul_rn(sub_rn(1.0, smoothing), diff));
  const double ce = mul_rn(c, eta);
  const bool armijo = fb ? diff >= mul_rn(ce, ctl[Ctl::SLOPE_GRAD]) : h_new >= mul_rn(ce, ctl[Ctl::S_NEW]);
  const bool ok = finite && finite64(l) && (l == l0 || armijo);
  out[Verdict::ACCEPT] = ok ? 1.0 : 0.0;
  out[Verdict::FINITE] = finite ? 1.0 : 0.0;
  out[Verdict::FALLBACK] = fb ? 1.0 : 0.0;
  out[Verdict::LOSS0] = l0;
  out[Verdict::LOSS_TRY] = l;
  out[Verdict::SLOPE_USED] = fb ? ctl[Ctl::SLOPE_GRAD] : ctl[Ctl::SLOPE];
  out[Verdict::PENDING] = ctl[Ctl::PENDING];
  out[Verdict::H_NEW] = h_new;
  ctl[Ctl::PENDING] = 0.0;
  if (ok && !fb) {
    ctl[Ctl::H] = h_new;
    ctl[Ctl::S] = ctl[Ctl::S_NEW];
  }
}

}  // namespace alsals
