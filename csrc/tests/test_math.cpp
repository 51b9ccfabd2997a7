// Host-only test of csrc/alsals_math.h (no CUDA needed): the header's functions against
// straightforward formulas, and the bf16/fp16 conversions against exhaustive decoding and a
// brute-force nearest-even search.  Run by ctest (see CMakeLists.txt).
#include "alsals_math.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using namespace alsals;

static int failures = 0;
#define EXPECT(cond, ...)                                         \
  do {                                                            \
    if (!(cond)) {                                                \
      if (++failures <= 20) {                                     \
        std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
        std::fprintf(stderr, __VA_ARGS__);                        \
        std::fprintf(stderr, "\n");                               \
      }                                                           \
    }                                                             \
  } while (0)

static bool same_bits(float a, float b) { return float_as_bits(a) == float_as_bits(b); }

// Value of an fp16 bit pattern by its definition: (-1)^s * 2^(e-15) * (1 + m/1024), or
// subnormal (-1)^s * 2^-14 * (m/1024).
static double fp16_value(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v;
  if (e == 0) v = std::ldexp(double(m) / 1024.0, -14);
  else if (e == 31) v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else v = std::ldexp(1.0 + double(m) / 1024.0, e - 15);
  return s ? -v : v;
}

static void test_fp16() {
  // Decoding: every pattern.
  for (uint32_t h = 0; h < 65536; ++h) {
    const double want = fp16_value(uint16_t(h));
    const float got = fp16_to_float(uint16_t(h));
    if (std::isnan(want)) EXPECT(std::isnan(got), "fp16 %04x should decode to NaN", h);
    else EXPECT(double(got) == want && std::signbit(got) == std::signbit(want), "fp16 %04x -> %g, want %g", h,
                double(got), want);
  }
  // Round trip: every finite half survives float -> half unchanged.
  for (uint32_t h = 0; h < 65536; ++h) {
    if (((h >> 10) & 31) == 31 && (h & 1023)) continue;  // NaN payloads are canonicalized
    EXPECT(float_to_fp16(fp16_to_float(uint16_t(h))) == h, "fp16 round trip %04x", h);
  }
  // Narrowing: the nearest half, ties to even, found by brute force over the positive halves.
  std::vector<double> pos;  // values of 0x0000..0x7c00 (inf last), increasing
  for (uint32_t h = 0; h <= 0x7c00; ++h) pos.push_back(fp16_value(uint16_t(h)));
  const double overflow = 65520.0;  // halfway from 65504 to 2^16: rounds (to even) to inf
  auto nearest = [&](double x) -> uint16_t {  // x >= 0, finite
    if (x >= overflow) return 0x7c00;
    size_t lo = 0, hi = 0x7bff;  // largest finite with value <= x
    while (lo < hi) {
      const size_t mid = (lo + hi + 1) / 2;
      if (pos[mid] <= x) lo = mid; else hi = mid - 1;
    }
    if (lo == 0x7bff) return 0x7bff;  // in [max_half, overflow): rounds down to the largest half
    const double below = pos[lo], above = pos[lo + 1];
    if (x - below < above - x) return uint16_t(lo);
    if (x - below > above - x) return uint16_t(lo + 1);
    return uint16_t((lo & 1) ? lo + 1 : lo);
  };
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> bits;
  std::vector<float> samples;
  for (int i = 0; i < 400000; ++i) {
    // Floats spread over the half range (exponents 2^-30 .. 2^17) plus exact midpoints.
    const uint32_t e = 97 + bits(rng) % 48;
    samples.push_back(bits_as_float((e << 23) | (bits(rng) & 0x7fffffu)));
  }
  for (uint32_t h = 0; h < 0x7bff; ++h) samples.push_back(float((pos[h] + pos[h + 1]) / 2));  // ties
  samples.push_back(65519.99f);
  samples.push_back(65520.0f);
  samples.push_back(1e-10f);
  samples.push_back(std::numeric_limits<float>::denorm_min());
  for (float x : samples) {
    const uint16_t want = nearest(double(x));
    EXPECT(float_to_fp16(x) == want, "float_to_fp16(%.9g) = %04x, want %04x", double(x), float_to_fp16(x), want);
    EXPECT(float_to_fp16(-x) == (want | 0x8000), "float_to_fp16(%.9g) sign", -double(x));
  }
  EXPECT(float_to_fp16(std::numeric_limits<float>::infinity()) == 0x7c00, "fp16 inf");
  EXPECT((float_to_fp16(std::numeric_limits<float>::quiet_NaN()) & 0x7fff) > 0x7c00, "fp16 NaN");
}

static void test_bf16() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_float(uint16_t(h));
    const uint32_t expect_bits = h << 16;
    EXPECT(float_as_bits(f) == expect_bits, "bf16 %04x widen", h);
    const bool nan = ((h >> 7) & 0xff) == 0xff && (h & 0x7f);
    if (!nan) EXPECT(float_to_bf16(f) == h, "bf16 round trip %04x", h);
    else EXPECT(float_to_bf16(f) == 0x7fc0, "bf16 NaN -> 0x7fc0");
  }
  // Narrowing against its definition: the nearer of the two neighbours, ties to the even one.
  std::mt19937 rng(99);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 1000000; ++i) {
    uint32_t u = bits(rng);
    if (i % 7 == 0) u = (u & 0xffff0000u) | 0x8000u;  // exact ties
    const float x = bits_as_float(u);
    if (std::isnan(x)) continue;
    const uint16_t lo = uint16_t(u >> 16), hi = uint16_t(lo + 1);
    const double dx = double(x);
    const double vlo = double(bf16_to_float(lo));
    const double vhi = ((hi & 0x7fff) >= 0x7f80) ? (std::signbit(x) ? -1.0 : 1.0) * std::ldexp(1.0, 128)
                                                 : double(bf16_to_float(hi));
    uint16_t want;
    const double elo = std::fabs(dx - vlo), ehi = std::fabs(vhi - dx);
    if (elo < ehi) want = lo;
    else if (elo > ehi) want = hi;
    else want = (lo & 1) ? hi : lo;
    if ((u & 0x7f800000u) == 0x7f800000u) want = lo;  // inf stays inf
    EXPECT(float_to_bf16(x) == want, "float_to_bf16(%08x) = %04x, want %04x", u, float_to_bf16(x), want);
  }
}

static void test_direction_math() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> U(-3.0f, 3.0f);
  const float b1 = 0.9f, b2 = 0.999f, omb1 = float(1.0 - 0.9), omb2 = float(1.0 - 0.999), eps = 1e-8f;
  for (int t = 1; t <= 50; ++t) {
    const float bc1 = float(1.0 - std::pow(0.9, t)), bc2 = float(1.0 - std::pow(0.999, t));
    for (int i = 0; i < 2000; ++i) {
      const float g = U(rng), m0 = U(rng) * 0.1f, v0 = std::fabs(U(rng)) * 0.01f;
      float m = m0, v = v0;
      adam_moments(g, m, v, b1, omb1, b2, omb2);
      // Straightforward formulas in double, compared within a few fp32 ulps.
      const double md = double(b1) * m0 + double(omb1) * g;
      const double vd = double(b2) * v0 + double(omb2) * g * g;
      const double mscale = std::fabs(double(b1) * m0) + std::fabs(double(omb1) * g);  // terms may cancel
      EXPECT(std::fabs(m - md) <= 4e-7 * mscale, "m %g vs %g", double(m), md);
      EXPECT(std::fabs(v - vd) <= 4e-7 * (std::fabs(vd) + 1e-12), "v %g vs %g", double(v), vd);
      const float denom = adam_denom(v, bc2, eps);
      const double denom_d = std::sqrt(double(v) / bc2) + eps;
      EXPECT(std::fabs(denom - denom_d) <= 3e-7 * denom_d, "denom");
      const double dm = (double(m) / bc1) / denom_d, dg = double(g) / denom_d;
      EXPECT(std::fabs(momentum_direction(m, bc1, denom) - dm) <= 1e-6 * (std::fabs(dm) + 1e-6), "m_hat*p");
      EXPECT(std::fabs(grad_direction(g, denom) - dg) <= 1e-6 * (std::fabs(dg) + 1e-6), "g*p");
      EXPECT(same_bits(direction(Dir::MOMENTUM, g, m, denom, bc1), momentum_direction(m, bc1, denom)), "dir M");
      EXPECT(same_bits(direction(Dir::GRAD, g, m, denom, bc1), grad_direction(g, denom)), "dir G");
      // The exact fp32 expressions of base.py, operation for operation.
      EXPECT(same_bits(adam_denom(v, bc2, eps), sqrtf(v / bc2) + eps), "denom bits");
      const float w0 = U(rng), eta = 0.01f * (1 + i % 7), wd = (i % 3) * 0.05f;
      const float d = momentum_direction(m, bc1, denom);
      const float c = candidate(w0, eta, d, wd);
      EXPECT(same_bits(c, w0 - eta * (d + wd * w0)), "candidate bits");
      const double cd = double(w0) - double(eta) * (double(d) + double(wd) * w0);
      const double cscale = std::fabs(w0) + eta * (std::fabs(d) + wd * std::fabs(w0));  // terms may cancel
      EXPECT(std::fabs(c - cd) <= 4e-7 * cscale, "candidate value %g vs %g", double(c), cd);
      // memory_efficient: recovering w0 from the candidate and moving in place.
      const float shrink = wd != 0 ? float(1.0 - double(eta) * wd) : 1.0f;
      const float w0r = recover_w0(c, eta, d, shrink);
      EXPECT(std::fabs(w0r - w0) <= 1e-5f * (std::fabs(w0) + 1.0f), "recover_w0 %g vs %g", double(w0r), double(w0));
      const float eta2 = eta * 0.9f;
      const float moved = move_in_place(c, float(double(eta2) - eta), d, wd, w0r);
      const float direct = candidate(w0, eta2, d, wd);
      EXPECT(std::fabs(moved - direct) <= 1e-5f * (std::fabs(direct) + 1.0f), "move_in_place");
      const float restored = move_in_place(c, -eta, d, wd, w0r);
      EXPECT(std::fabs(restored - w0) <= 1e-5f * (std::fabs(w0) + 1.0f), "restore in place");
    }
  }
}

static void test_resolve() {
  for (int fb = 0; fb < 2; ++fb) {
    EXPECT(resolve_dir(Dir::MOMENTUM, fb) == Dir::MOMENTUM, "MOMENTUM stays");
    EXPECT(resolve_dir(Dir::GRAD, fb) == Dir::GRAD, "GRAD stays");
    EXPECT(resolve_dir(Dir::UPDATE, fb) == (fb ? Dir::GRAD : Dir::MOMENTUM), "UPDATE");
  }
}

// The decisions against base.py's formulas written out again (as decisions.py computes them).
static bool same64(double a, double b) { return std::memcmp(&a, &b, sizeof(a)) == 0 || (a != a && b != b); }

static void test_decisions() {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  // Grad finisher.
  const double sumsqs[] = {0.0, 0.25, 4.0, 1e30, inf, nan};
  const double losses[] = {2.0, -1.0, inf, nan};
  const double norms[] = {-1.0, 0.0, 0.5, 1e9};
  for (double sumsq : sumsqs)
    for (double l0 : losses)
      for (double mgn : norms) {
        double ctl[CTL_SIZE] = {};
        ctl[Ctl::PENDING] = 2.0;
        ctl[Ctl::FALLBACK] = 1.0;
        ctl[Ctl::H] = 0.5;
        finish_grad(ctl, sumsq, l0, mgn);
        const bool finite = std::isfinite(l0) && std::isfinite(sumsq);
        const double scale = finite && mgn >= 0 ? std::min(1.0, (1.0 / (std::sqrt(sumsq) + 1e-6)) * mgn) : 1.0;
        EXPECT(same64(ctl[Ctl::SCALE], scale), "finish_grad SCALE %g (sumsq %g, L0 %g, mgn %g)", ctl[Ctl::SCALE],
               sumsq, l0, mgn);
        EXPECT(ctl[Ctl::SKIP] == (finite ? 0.0 : 1.0) && ctl[Ctl::PENDING] == (finite ? 2.0 : 3.0), "SKIP/PENDING");
        EXPECT(ctl[Ctl::FALLBACK] == 0.0 && same64(ctl[Ctl::LOSS0], l0) && ctl[Ctl::H] == 0.5, "FALLBACK/LOSS0/H");
      }
  // Step finisher.
  const double slopes[] = {0.3, -0.3, 0.0, 1e-300, nan};
  for (double slope : slopes)
    for (double s_old : {0.0, 0.2, -0.5})
      for (double smoothing : {0.0, 0.99})
        for (int skip = 0; skip < 2; ++skip) {
          double ctl[CTL_SIZE] = {};
          ctl[Ctl::S] = s_old;
          ctl[Ctl::SKIP] = skip;
          finish_step(ctl, slope, 0.7, smoothing);
          const double s_new = smoothing * s_old + (1 - smoothing) * slope;
          EXPECT(ctl[Ctl::SLOPE] == slope || slope != slope, "SLOPE");
          EXPECT(ctl[Ctl::SLOPE_GRAD] == 0.7 && same64(ctl[Ctl::S_NEW], s_new), "S_NEW %g vs %g", ctl[Ctl::S_NEW], s_new);
          EXPECT(ctl[Ctl::FALLBACK] == ((!skip && s_new <= 0) ? 1.0 : 0.0), "FALLBACK");
          EXPECT(ctl[Ctl::S] == s_old, "S unchanged by the step finisher");
        }
  // Verdict: every branch (accept by Armijo, by L == L0, reject, not finite, skipped, fallback).
  const double tries[] = {1.0, 0.99, 0.999999, 1.2, nan, inf, -inf};
  for (double l : tries)
    for (int fb = 0; fb < 2; ++fb)
      for (int skip = 0; skip < 2; ++skip)
        for (double smoothing : {0.0, 0.99}) {
          double ctl[CTL_SIZE] = {}, out[VERDICT_SIZE];
          ctl[Ctl::LOSS0] = 1.0;
          ctl[Ctl::FALLBACK] = fb;
          ctl[Ctl::SKIP] = skip;
          ctl[Ctl::SLOPE] = 0.3;
          ctl[Ctl::SLOPE_GRAD] = 0.4;
          ctl[Ctl::S_NEW] = 0.2;
          ctl[Ctl::H] = 0.01;
          ctl[Ctl::S] = 0.1;
          ctl[Ctl::PENDING] = 1.0;
          const double eta = 0.05, c = 0.5;
          verdict(ctl, l, eta, c, smoothing, out);
          const double diff = 1.0 - l, h_new = 0.01 * smoothing + diff * (1 - smoothing);
          const bool test = fb ? diff >= 0.4 * (c * eta) : h_new >= 0.2 * (c * eta);
          const bool ok = !skip && std::isfinite(l) && (l == 1.0 || test);
          EXPECT(out[Verdict::ACCEPT] == (ok ? 1.0 : 0.0), "ACCEPT (L %g fb %d skip %d smoothing %g)", l, fb, skip,
                 smoothing);
          EXPECT(out[Verdict::FINITE] == (skip ? 0.0 : 1.0) && out[Verdict::FALLBACK] == fb, "FINITE/FALLBACK");
          EXPECT(out[Verdict::LOSS0] == 1.0 && same64(out[Verdict::LOSS_TRY], l), "losses");
          EXPECT(out[Verdict::SLOPE_USED] == (fb ? 0.4 : 0.3) && out[Verdict::PENDING] == 1.0, "SLOPE_USED/PENDING");
          EXPECT(same64(out[Verdict::H_NEW], h_new), "H_NEW %g vs %g", out[Verdict::H_NEW], h_new);
          EXPECT(ctl[Ctl::PENDING] == 0.0, "PENDING consumed");
          const bool commit = ok && !fb;
          EXPECT(same64(ctl[Ctl::H], commit ? h_new : 0.01) && ctl[Ctl::S] == (commit ? 0.2 : 0.1), "H/S commit");
        }
  // The accepted-at-equality guard with a slope that would reject.
  double ctl[CTL_SIZE] = {}, out[VERDICT_SIZE];
  ctl[Ctl::LOSS0] = 0.5;
  ctl[Ctl::S_NEW] = 1e9;
  verdict(ctl, 0.5, 1.0, 0.5, 0.99, out);
  EXPECT(out[Verdict::ACCEPT] == 1.0, "L == L0 is accepted");
}

static void test_storage() {
  EXPECT(to_float(from_float<bf16_bits>(1.5f)) == 1.5f, "bf16 1.5");
  EXPECT(to_float(from_float<fp16_bits>(-2.25f)) == -2.25f, "fp16 -2.25");
  EXPECT(to_float(from_float<float>(0.1f)) == 0.1f, "float identity");
  EXPECT(from_float<bf16_bits>(1.00390625f).x == 0x3f80, "bf16 tie to even (down)");
  EXPECT(from_float<bf16_bits>(1.01171875f).x == 0x3f82, "bf16 tie to even (up)");
  EXPECT(sizeof(bf16_bits) == 2 && sizeof(fp16_bits) == 2, "16-bit storage is 2 bytes");
}

int main() {
  test_fp16();
  test_bf16();
  test_direction_math();
  test_resolve();
  test_decisions();
  test_storage();
  if (failures) {
    std::printf("alsals_math_test: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("alsals_math_test: all checks passed\n");
  return 0;
}
