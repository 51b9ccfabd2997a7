// Host emulation of the CUDA kernels (no GPU, no CUDA headers): csrc/kernels.cu compiled as C++
// with the CUDA built-ins replaced by host threads (one std::thread per CUDA thread, a barrier per
// block for __syncthreads and per warp for __shfl_down_sync; blocks run one after another, in an
// order the test chooses).  It runs the real kernels on tables and schedules laid out as the
// Python backend lays them out (backends/fused_tables.py: schedule, TableCol) and checks,
// against a plain per-element loop over the math header (alsals_math.h):
//   - the vector path and the scalar tail/misaligned path, every dtype, every step and move mode;
//   - fp32 partials + the last-program finisher (ticket): grad finisher, step finisher, sums
//     bit-identical whatever the block order, over one or several buckets (launches), the
//     ticket back at 0 after each pass, finish=false sums, and after a pass whose later launch failed;
//   - ctl[SKIP] (nothing written), a move gated on ctl[FALLBACK] or ctl[UNDO] (only_if), Dir::UPDATE
//     resolved from ctl[FALLBACK];
//   - an all-empty pass (one program with no work still runs the finisher);
//   - int64 element offsets past 2**31 (a table row whose chunk starts at element 2**31);
//   - the verdict kernel against alsals::verdict.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

// ---- the CUDA shim -----------------------------------------------------------------------------
#define ALSALS_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static  // one block runs at a time, so a static is the block's shared memory

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local Dim3 threadIdx, blockIdx;

struct BlockSync {
  explicit BlockSync(int threads) : block(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(std::make_unique<Warp>());
  }
  struct Warp {
    std::barrier<> bar{32};
    double buf[32];
  };
  std::barrier<> block;
  std::vector<std::unique_ptr<Warp>> warps;
};
static BlockSync* g_sync = nullptr;

static void __syncthreads() { g_sync->block.arrive_and_wait(); }
static void __threadfence() {}  // blocks run one after another: every write is visible

template <typename T>
static T __shfl_down_sync(unsigned, T v, int off) {
  const int lane = threadIdx.x & 31;
  BlockSync::Warp& w = *g_sync->warps[threadIdx.x >> 5];
  w.buf[lane] = double(v);
  w.bar.arrive_and_wait();
  const T r = lane + off < 32 ? T(w.buf[lane + off]) : v;
  w.bar.arrive_and_wait();
  return r;
}

static unsigned atomicAdd(unsigned* p, unsigned v) {  // only thread 0 of one block at a time
  const unsigned old = *p;
  *p = old + v;
  return old;
}
static float __ldcg(const float* p) { return *p; }
static double __longlong_as_double(long long x) {
  double d;
  std::memcpy(&d, &x, sizeof(d));
  return d;
}

#include "../kernels.cu"

using namespace alsals;

// One host thread per CUDA thread; the threads walk the blocks together in `order`, meeting at a
// barrier after each block (so the block's "shared memory" statics are free again).
template <class F>
static void run_grid(const std::vector<unsigned>& order, F&& body) {
  BlockSync sync(kPassThreads);
  g_sync = &sync;
  std::vector<std::thread> pool;
  pool.reserve(kPassThreads);
  for (int t = 0; t < kPassThreads; ++t)
    pool.emplace_back([&, t] {
      threadIdx.x = unsigned(t);
      for (unsigned b : order) {
        blockIdx.x = b;
        body();
        sync.block.arrive_and_wait();
      }
    });
  for (auto& th : pool) th.join();
  g_sync = nullptr;
}

static std::vector<unsigned> block_order(int64_t n, unsigned seed) {
  std::vector<unsigned> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0u);
  if (seed == 1) std::reverse(order.begin(), order.end());
  if (seed > 1) std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  return order;
}

// ---- the test -----------------------------------------------------------------------------------
static int failures = 0;
#define EXPECT(cond, ...)                                                              \
  do {                                                                                 \
    if (!(cond) && ++failures <= 30) {                                                 \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                        \
      std::fprintf(stderr, __VA_ARGS__);                                               \
      std::fprintf(stderr, "\n");                                                      \
    }                                                                                  \
  } while (0)

static int64_t f64_bits(double x) {
  int64_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
}

// schedule of fused_tables.py: (row, chunk) per program, the full chunks of aligned tensors
// first, then tails and misaligned tensors' chunks, each in tensor order; (-1, 0) if empty.
static std::vector<int32_t> schedule(const std::vector<int64_t>& numels, bool aligned) {
  std::vector<int32_t> s;
  std::vector<int64_t> full(numels.size(), 0);
  for (size_t i = 0; i < numels.size(); ++i) {
    full[i] = aligned ? numels[i] / CHUNK : 0;
    for (int64_t c = 0; c < full[i]; ++c) {
      s.push_back(int32_t(i));
      s.push_back(int32_t(c));
    }
  }
  for (size_t i = 0; i < numels.size(); ++i)
    for (int64_t c = full[i]; c * CHUNK < numels[i]; ++c) {
      s.push_back(int32_t(i));
      s.push_back(int32_t(c));
    }
  if (s.empty()) s = {-1, 0};
  return s;
}

template <typename P>
struct HostBucket {
  // Each tensor lives at `offset` elements into its own buffer (offset 1: misaligned).
  std::vector<std::vector<P>> w, g, b;
  std::vector<std::vector<float>> m, v;
  std::vector<int64_t> numel;
  std::vector<double> wd;
  int offset = 0;
  std::vector<int64_t> table;
  std::vector<int32_t> sched;

  HostBucket(const std::vector<int64_t>& sizes, int off, unsigned seed) : offset(off) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> N(0.f, 1.f);
    const double wds[] = {0.0, 0.01, 0.1};
    for (size_t i = 0; i < sizes.size(); ++i) {
      const int64_t n = sizes[i];
      numel.push_back(n);
      wd.push_back(wds[i % 3]);
      w.emplace_back(n + off);
      g.emplace_back(n + off);
      b.emplace_back(n + off);
      m.emplace_back(n + off);
      v.emplace_back(n + off);
      for (int64_t j = 0; j < n; ++j) {
        w[i][j + off] = from_float<P>(N(rng));
        g[i][j + off] = from_float<P>(0.1f * N(rng));
        b[i][j + off] = from_float<P>(0.f);
        m[i][j + off] = 0.01f * N(rng);
        v[i][j + off] = 1e-3f * std::fabs(N(rng));
      }
    }
  }
  HostBucket(const HostBucket& o)
      : w(o.w), g(o.g), b(o.b), m(o.m), v(o.v), numel(o.numel), wd(o.wd), offset(o.offset) {}

  // The table as _Table builds it (TableCol columns; pointers of empty tensors are 0).
  void build(bool backups) {
    table.assign(numel.size() * TABLE_COLS, 0);
    for (size_t i = 0; i < numel.size(); ++i) {
      int64_t* row = &table[i * TABLE_COLS];
      if (numel[i] > 0) {
        row[TableCol::W] = int64_t(reinterpret_cast<uintptr_t>(w[i].data() + offset));
        row[TableCol::G] = int64_t(reinterpret_cast<uintptr_t>(g[i].data() + offset));
        row[TableCol::M] = int64_t(reinterpret_cast<uintptr_t>(m[i].data() + offset));
        row[TableCol::V] = int64_t(reinterpret_cast<uintptr_t>(v[i].data() + offset));
        row[TableCol::BACKUP] = backups ? int64_t(reinterpret_cast<uintptr_t>(b[i].data() + offset)) : 0;
      }
      row[TableCol::NUMEL] = numel[i];
      row[TableCol::WD_BITS] = f64_bits(wd[i]);
    }
    sched = schedule(numel, offset == 0);
  }
  int64_t programs() const { return int64_t(sched.size() / 2); }
};

template <typename P> constexpr int code_of();
template <> constexpr int code_of<float>() { return kFloat32; }
template <> constexpr int code_of<bf16_bits>() { return kBFloat16; }
template <> constexpr int code_of<fp16_bits>() { return kFloat16; }

template <typename P>
static bool same(const P& a, const P& b) { return std::memcmp(&a, &b, sizeof(P)) == 0; }

template <typename P>
static void expect_equal(const HostBucket<P>& a, const HostBucket<P>& b, const char* what) {
  for (size_t i = 0; i < a.numel.size(); ++i)
    for (int64_t j = 0; j < a.numel[i] + a.offset; ++j) {
      EXPECT(same(a.w[i][j], b.w[i][j]), "%s: w[%zu][%lld]", what, i, (long long)j);
      EXPECT(same(a.b[i][j], b.b[i][j]), "%s: backup[%zu][%lld]", what, i, (long long)j);
      EXPECT(same(a.m[i][j], b.m[i][j]), "%s: m[%zu][%lld]", what, i, (long long)j);
      EXPECT(same(a.v[i][j], b.v[i][j]), "%s: v[%zu][%lld]", what, i, (long long)j);
    }
}

// Scratch of one pass (partials, tickets, out) as the Python backend allocates it.
struct Scratch {
  std::vector<float> partials;
  unsigned tickets[4] = {0, 0, 0, 0};
  double out[2] = {-7.0, -7.0};
  explicit Scratch(int64_t programs) : partials(size_t(2 * programs), std::nanf("")) {}
};

static PassArgs pass_args(double* ctl, Scratch& s, unsigned* ticket, int64_t total, bool finish) {
  PassArgs p{};
  p.ctl = ctl;
  p.partials = s.partials.data();
  p.ticket = ticket;
  p.out = finish ? nullptr : s.out;
  p.total_programs = total;
  p.finish = finish;
  return p;
}

static StepArgs step_args(bool searching, int search_dir, bool write_backup) {
  StepArgs s{};
  s.beta1 = 0.9f;
  s.one_minus_beta1 = float(1.0 - 0.9);
  s.beta2 = 0.999f;
  s.one_minus_beta2 = float(1.0 - 0.999);
  s.eps = 1e-8f;
  s.bias_correction1 = float(1.0 - std::pow(0.9, 3));
  s.bias_correction2 = float(1.0 - std::pow(0.999, 3));
  s.eta = 0.05f;
  s.smoothing = 0.99;
  s.searching = searching;
  s.search_dir = search_dir;
  s.write_backup = write_backup;
  return s;
}

// The step pass through the emulated kernel, one launch over one bucket.
template <typename P>
static void emulated_step(HostBucket<P>& hb, StepArgs a, double* ctl, Scratch& s, bool finish, unsigned order) {
  hb.build(a.write_backup);
  a.p = pass_args(ctl, s, &s.tickets[1], hb.programs(), finish);
  a.p.table = hb.table.data();
  a.p.sched = hb.sched.data();
  run_grid(block_order(hb.programs(), order), [&] { step_pass_kernel<P>(a); });
}

// The same step, element by element, with the math header's functions; sums in fp64.
template <typename P>
static void plain_step(HostBucket<P>& hb, const StepArgs& s, const double* ctl, double dots[2],
                       double* scale_of_dots = nullptr) {
  dots[0] = dots[1] = 0.0;
  double mag[2] = {0.0, 0.0};
  if (ctl[Ctl::SKIP] != 0.0) return;
  const int dir = s.searching ? resolve_dir(s.search_dir, ctl[Ctl::FALLBACK] != 0.0) : int(Dir::MOMENTUM);
  const float scale = float(ctl[Ctl::SCALE]);
  for (size_t i = 0; i < hb.numel.size(); ++i)
    for (int64_t j = hb.offset; j < hb.numel[i] + hb.offset; ++j) {
      const float g = to_float(hb.g[i][j]) * scale;
      adam_moments(g, hb.m[i][j], hb.v[i][j], s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2);
      const float denom = adam_denom(hb.v[i][j], s.bias_correction2, s.eps);
      const float dg = grad_direction(g, denom);
      const float d = direction(dir, g, hb.m[i][j], denom, s.bias_correction1);
      dots[0] += double(g * d);
      dots[1] += double(g * dg);
      mag[0] += std::fabs(double(g * d));
      mag[1] += std::fabs(double(g * dg));
      if (s.write_backup) hb.b[i][j] = hb.w[i][j];
      hb.w[i][j] = from_float<P>(candidate(to_float(hb.w[i][j]), s.eta, d, float(hb.wd[i])));
    }
  if (scale_of_dots) scale_of_dots[0] = mag[0], scale_of_dots[1] = mag[1];
}

static MoveArgs move_args(const StepArgs& s, int src_dir, double src_eta, int dst_dir, double dst_eta,
                          bool from_backup, int only_if) {
  MoveArgs a{};
  a.eps = s.eps;
  a.bias_correction1 = s.bias_correction1;
  a.bias_correction2 = s.bias_correction2;
  a.src_eta = float(src_eta);
  a.dst_eta = float(dst_eta);
  a.eta_delta = float(dst_eta - src_eta);
  a.src_eta64 = src_eta;
  a.src_dir = src_dir;
  a.dst_dir = dst_dir;
  a.from_backup = from_backup;
  a.only_if = only_if;
  return a;
}

template <typename P>
static void emulated_move(HostBucket<P>& hb, MoveArgs a, double* ctl, unsigned order) {
  hb.build(a.from_backup);
  Scratch s(hb.programs());
  a.p = pass_args(ctl, s, nullptr, hb.programs(), true);
  a.p.partials = nullptr;
  a.p.table = hb.table.data();
  a.p.sched = hb.sched.data();
  run_grid(block_order(hb.programs(), order), [&] { move_pass_kernel<P>(a); });
}

template <typename P>
static void plain_move(HostBucket<P>& hb, const MoveArgs& s, const double* ctl) {
  if (ctl[Ctl::SKIP] != 0.0 || (s.only_if >= 0 && ctl[s.only_if] == 0.0)) return;
  const bool fallback = ctl[Ctl::FALLBACK] != 0.0;
  const int src = resolve_dir(s.src_dir, fallback), dst = resolve_dir(s.dst_dir, fallback);
  const float scale = float(ctl[Ctl::SCALE]);
  for (size_t i = 0; i < hb.numel.size(); ++i)
    for (int64_t j = hb.offset; j < hb.numel[i] + hb.offset; ++j) {
      const float g = to_float(hb.g[i][j]) * scale;
      const float denom = adam_denom(hb.v[i][j], s.bias_correction2, s.eps);
      auto dir = [&](int d) { return direction(d, g, hb.m[i][j], denom, s.bias_correction1); };
      const float wd = float(hb.wd[i]);
      float out;
      if (s.from_backup) {
        out = candidate(to_float(hb.b[i][j]), s.dst_eta, dir(dst), wd);
      } else {
        const float w = to_float(hb.w[i][j]);
        const float shrink = hb.wd[i] != 0.0 ? float(1.0 - s.src_eta64 * hb.wd[i]) : 1.0f;
        const float w0 = recover_w0(w, s.src_eta, dir(src), shrink);
        out = src == dst ? move_in_place(w, s.eta_delta, dir(dst), wd, w0) : candidate(w0, s.dst_eta, dir(dst), wd);
      }
      hb.w[i][j] = from_float<P>(out);
    }
}

static void fresh_ctl(double* ctl, double scale = 1.0, double skip = 0.0, double fallback = 0.0) {
  for (int k = 0; k < CTL_SIZE; ++k) ctl[k] = 0.0;
  ctl[Ctl::SCALE] = scale;
  ctl[Ctl::SKIP] = skip;
  ctl[Ctl::FALLBACK] = fallback;
  ctl[Ctl::S] = -0.25;  // a previous smoothed slope, so S_NEW is not just (1-smoothing)*SLOPE
  ctl[Ctl::H] = 0.125;
}

static bool close_rel(double a, double b, double rel) { return std::fabs(a - b) <= rel * std::fabs(b) + 1e-30; }

template <typename P>
static void test_step_and_moves(const char* name) {
  const std::vector<int64_t> sizes = {0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 13, 5, 0, 3};
  for (int off : {0, 1}) {
    for (int variant = 0; variant < 4; ++variant) {
      // 0: alsals search (MOMENTUM), 1: adam_sls search (GRAD), 2: memory_efficient search with
      // clipping, 3: not searching.
      const bool searching = variant != 3, backup = variant != 2;
      const int search_dir = variant == 1 ? int(Dir::GRAD) : int(Dir::MOMENTUM);
      double ctl_a[CTL_SIZE], ctl_b[CTL_SIZE], ctl_c[CTL_SIZE];
      fresh_ctl(ctl_a, variant == 2 ? 0.5 : 1.0);
      fresh_ctl(ctl_b, variant == 2 ? 0.5 : 1.0);
      fresh_ctl(ctl_c, variant == 2 ? 0.5 : 1.0);
      HostBucket<P> a(sizes, off, 11 + variant), b = a, c = a;
      const StepArgs s = step_args(searching, search_dir, backup);
      Scratch sa(a.programs() + 64), sc(a.programs() + 64);
      a.build(backup);
      emulated_step(a, s, ctl_a, sa, true, 0);
      double dots[2], mag[2];
      plain_step(b, s, ctl_b, dots, mag);
      expect_equal(a, b, name);
      EXPECT(sa.tickets[1] == 0, "%s: step ticket left at %u", name, sa.tickets[1]);
      if (searching) {
        // fp32 partials of fp32 products: within 2e-6 of the sum of the magnitudes
        EXPECT(std::fabs(ctl_a[Ctl::SLOPE] - dots[0]) <= 2e-6 * mag[0], "%s SLOPE %.17g vs %.17g", name,
               ctl_a[Ctl::SLOPE], dots[0]);
        EXPECT(std::fabs(ctl_a[Ctl::SLOPE_GRAD] - dots[1]) <= 2e-6 * mag[1], "%s SLOPE_GRAD %.17g vs %.17g", name,
               ctl_a[Ctl::SLOPE_GRAD], dots[1]);
        if (search_dir == Dir::GRAD) EXPECT(ctl_a[Ctl::SLOPE] == ctl_a[Ctl::SLOPE_GRAD], "%s: GRAD slopes differ", name);
        double want[CTL_SIZE];
        std::memcpy(want, ctl_b, sizeof(want));
        finish_step(want, ctl_a[Ctl::SLOPE], ctl_a[Ctl::SLOPE_GRAD], s.smoothing);
        for (int k = 0; k < CTL_SIZE; ++k) EXPECT(same(want[k], ctl_a[k]), "%s: step finisher ctl[%d]", name, k);
      } else {
        for (int k = 0; k < CTL_SIZE; ++k) EXPECT(same(ctl_b[k], ctl_a[k]), "%s: non-searching step wrote ctl[%d]", name, k);
      }
      // Another block order (a different program arrives last): the same bits; finish=false
      // returns the same sums and leaves ctl alone.
      emulated_step(c, s, ctl_c, sc, !searching ? true : false, 7);
      expect_equal(a, c, "block order");
      if (searching) {
        EXPECT(sc.out[0] == ctl_a[Ctl::SLOPE] && sc.out[1] == ctl_a[Ctl::SLOPE_GRAD],
               "%s: sums depend on the block order (%.17g %.17g vs %.17g %.17g)", name, sc.out[0], sc.out[1],
               ctl_a[Ctl::SLOPE], ctl_a[Ctl::SLOPE_GRAD]);
        EXPECT(ctl_c[Ctl::SLOPE] == 0.0 && ctl_c[Ctl::S_NEW] == 0.0, "%s: finish=false wrote ctl", name);
      }

      // Moves from the state the step left (backup path; in place for fp32 only).
      // only_if: the gating ctl slot, -1 for none.  Each move runs with FALLBACK and UNDO set to
      // opposite values, both ways round, so a move that read the wrong slot would differ.
      struct Move { int src_dir; double src_f; int dst_dir; double dst_f; int only_if; };
      const Move moves[] = {{Dir::MOMENTUM, 1.0, Dir::UPDATE, 1.0, Ctl::FALLBACK},  // the fallback fix-up
                            {Dir::UPDATE, 1.0, Dir::UPDATE, 0.9, -1},              // backtrack
                            {Dir::UPDATE, 1.0, Dir::UPDATE, 0.0, -1},              // restore to w0
                            {Dir::GRAD, 1.0, Dir::UPDATE, 1.0, -1},                // adam_sls: update from w0
                            {Dir::GRAD, 1.0, Dir::MOMENTUM, 0.5, -1},
                            {Dir::MOMENTUM, 1.0, Dir::MOMENTUM, 0.0, Ctl::UNDO},   // fp16 guard, no search
                            {Dir::UPDATE, 1.0, Dir::UPDATE, 0.0, Ctl::UNDO}};      // fp16 guard, adam_sls
      for (const Move& mv : moves)
        for (int fb = 0; fb < 2; ++fb) {
          if (!backup && sizeof(P) != 4) continue;
          HostBucket<P> x = a, y = a;
          const MoveArgs ms =
              move_args(s, mv.src_dir, s.eta * mv.src_f, mv.dst_dir, s.eta * mv.dst_f, backup, mv.only_if);
          double mctl[CTL_SIZE];
          fresh_ctl(mctl, variant == 2 ? 0.5 : 1.0, 0.0, fb);
          mctl[Ctl::UNDO] = fb ? 0.0 : 1.0;
          emulated_move(x, ms, mctl, fb ? 1 : 0);
          plain_move(y, ms, mctl);
          expect_equal(x, y, "move");
          if (mv.only_if >= 0 && mctl[mv.only_if] == 0.0) expect_equal(x, a, "a move whose gate is 0 wrote something");
          if (&mv == moves + 1 && fb) {
            double skip_ctl[CTL_SIZE];
            fresh_ctl(skip_ctl, 1.0, 1.0, 1.0);
            HostBucket<P> z = a;
            emulated_move(z, ms, skip_ctl, 0);
            expect_equal(z, a, "skipped move wrote something");
          }
        }
    }
    // Skip: no parameter or moment written; the finisher runs on zero sums (as the reference
    // does); finish=false: zero sums.
    HostBucket<P> a(sizes, off, 5), before = a;
    double ctl[CTL_SIZE], ctl0[CTL_SIZE];
    fresh_ctl(ctl, 1.0, 1.0);
    std::memcpy(ctl0, ctl, sizeof(ctl));
    Scratch s(a.programs() + 64);
    emulated_step(a, step_args(true, Dir::MOMENTUM, true), ctl, s, true, 3);
    expect_equal(a, before, "skipped step wrote something");
    finish_step(ctl0, 0.0, 0.0, step_args(true, Dir::MOMENTUM, true).smoothing);
    for (int k = 0; k < CTL_SIZE; ++k) EXPECT(same(ctl[k], ctl0[k]), "skipped step: ctl[%d]", k);
    EXPECT(ctl[Ctl::FALLBACK] == 0.0 && ctl[Ctl::SLOPE] == 0.0, "skipped step: no fallback, zero slope");
    emulated_step(a, step_args(true, Dir::MOMENTUM, true), ctl, s, false, 0);
    EXPECT(s.out[0] == 0.0 && s.out[1] == 0.0, "skipped step, finish=false: sums %g %g", s.out[0], s.out[1]);
    expect_equal(a, before, "skipped step wrote something");
  }
}

// The grad pass over several buckets (one launch each, one ticket): sumsq, the grad finisher.
struct GradRun {
  double ctl[CTL_SIZE];
  double out = -1.0;
  unsigned ticket = 0;
};

template <typename A, typename B>
static void emulated_grad(HostBucket<A>& x, HostBucket<B>& y, double loss0, double max_norm, bool finish,
                          unsigned order, GradRun& r) {
  x.build(false);
  y.build(false);
  const int64_t total = x.programs() + y.programs();
  Scratch s(total);
  GradArgs a{};
  a.p = pass_args(r.ctl, s, &r.ticket, total, finish);
  a.p.out = finish ? nullptr : &r.out;
  a.loss0 = &loss0;
  a.loss_code = kFloat64;
  a.max_grad_norm = max_norm;
  a.p.table = x.table.data();
  a.p.sched = x.sched.data();
  run_grid(block_order(x.programs(), order), [&] { grad_pass_kernel<A>(a); });
  EXPECT(r.ticket == unsigned(x.programs()), "grad ticket after the first launch: %u", r.ticket);
  a.p.program_base = x.programs();
  a.p.table = y.table.data();
  a.p.sched = y.sched.data();
  run_grid(block_order(y.programs(), order), [&] { grad_pass_kernel<B>(a); });
  EXPECT(r.ticket == 0, "grad ticket left at %u", r.ticket);
}

template <typename P>
static double plain_sumsq(const HostBucket<P>& hb) {
  double want = 0;
  for (size_t i = 0; i < hb.numel.size(); ++i)
    for (int64_t j = 0; j < hb.numel[i]; ++j) {
      const float x = to_float(hb.g[i][j + hb.offset]);
      want += double(x * x);
    }
  return want;
}

static void test_grad_pass() {
  const std::vector<int64_t> sizes = {0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 13, 3};
  for (int off : {0, 1}) {
    HostBucket<float> x(sizes, off, 21);
    HostBucket<bf16_bits> y({5, CHUNK + 3, 0}, off, 22);
    const double want = plain_sumsq(x) + plain_sumsq(y);
    for (double max_norm : {-1.0, 0.5, 1e6}) {
      GradRun r, r2, r3;
      fresh_ctl(r.ctl);
      r.ctl[Ctl::FALLBACK] = 1.0;  // reset by the finisher
      r.ctl[Ctl::PENDING] = 2.0;
      std::memcpy(r2.ctl, r.ctl, sizeof(r.ctl));
      std::memcpy(r3.ctl, r.ctl, sizeof(r.ctl));
      emulated_grad(x, y, 1.75, max_norm, true, 0, r);
      emulated_grad(x, y, 1.75, max_norm, false, 3, r2);
      EXPECT(close_rel(r2.out, want, 2e-6), "sumsq %.17g vs %.17g", r2.out, want);
      for (int k = 0; k < CTL_SIZE; ++k) EXPECT(same(r2.ctl[k], r3.ctl[k]), "finish=false wrote ctl[%d]", k);
      finish_grad(r3.ctl, r2.out, 1.75, max_norm);  // the finisher on the other order's sum: same bits
      for (int k = 0; k < CTL_SIZE; ++k) EXPECT(same(r.ctl[k], r3.ctl[k]), "grad finisher ctl[%d]", k);
      EXPECT(r.ctl[Ctl::SKIP] == 0.0 && r.ctl[Ctl::FALLBACK] == 0.0 && r.ctl[Ctl::PENDING] == 2.0 &&
             r.ctl[Ctl::LOSS0] == 1.75, "grad finisher flags");
      if (max_norm == 0.5) EXPECT(r.ctl[Ctl::SCALE] < 1.0, "clipping: scale %g", r.ctl[Ctl::SCALE]);
      else EXPECT(r.ctl[Ctl::SCALE] == 1.0, "no clipping: scale %g", r.ctl[Ctl::SCALE]);
    }
    // A gradient whose square overflows fp32, and a non-finite loss: skip, pending + 1.
    for (int which = 0; which < 2; ++which) {
      HostBucket<float> big = x;
      if (which == 0) big.g[6][off + CHUNK + 5] = 3e19f;
      GradRun r;
      fresh_ctl(r.ctl);
      r.ctl[Ctl::PENDING] = 1.0;
      emulated_grad(big, y, which == 1 ? std::nan("") : 2.0, 0.5, true, 1, r);
      EXPECT(r.ctl[Ctl::SKIP] == 1.0 && r.ctl[Ctl::PENDING] == 2.0 && r.ctl[Ctl::SCALE] == 1.0,
             "non-finite (%d): skip %g pending %g scale %g", which, r.ctl[Ctl::SKIP], r.ctl[Ctl::PENDING],
             r.ctl[Ctl::SCALE]);
    }
  }
  // All-empty buckets: one program with no work; the finisher still runs.
  HostBucket<float> e({0, 0}, 0, 1);
  HostBucket<fp16_bits> e2({0}, 0, 2);
  GradRun r;
  fresh_ctl(r.ctl, 0.3, 1.0, 1.0);
  emulated_grad(e, e2, 0.5, 1.0, true, 0, r);
  EXPECT(r.ctl[Ctl::SKIP] == 0.0 && r.ctl[Ctl::SCALE] == 1.0 && r.ctl[Ctl::LOSS0] == 0.5 &&
         r.ctl[Ctl::FALLBACK] == 0.0, "empty grad pass: finisher did not run");
}

// A pass whose second launch fails after the first one ran: that launch drew tickets and no last
// program reset the counter.  launch_buckets (passes.h, what the ops call) resets it on the
// stream, so the next pass still finds its last program and runs the finisher.
static void test_failed_launch_resets_ticket() {
  HostBucket<float> x({CHUNK + 5, 7}, 0, 31);
  HostBucket<float> y({9}, 0, 32);
  x.build(false);
  y.build(false);
  HostBucket<float>* buckets[2] = {&x, &y};
  const int64_t total = x.programs() + y.programs();
  Scratch s(total);
  GradRun r;
  fresh_ctl(r.ctl);
  double loss0 = 1.0;
  GradArgs a{};
  a.p = pass_args(r.ctl, s, &r.ticket, total, true);
  a.loss0 = &loss0;
  a.loss_code = kFloat64;
  a.max_grad_norm = -1.0;
  int resets = 0;
  const BucketLaunches res = launch_buckets(
      2,
      [&](size_t i) -> cudaError_t {
        if (i == 1) return cudaError_t(700);  // the second bucket's launch fails
        a.p.table = buckets[i]->table.data();
        a.p.sched = buckets[i]->sched.data();
        run_grid(block_order(buckets[i]->programs(), 0), [&] { grad_pass_kernel<float>(a); });
        a.p.program_base += buckets[i]->programs();
        return cudaError_t(0);
      },
      [&] {
        ++resets;
        r.ticket = 0;  // what reset_ticket queues on the stream
      });
  EXPECT(res.err == cudaError_t(700) && res.failed == 1, "launch_buckets: error %d at bucket %zu", int(res.err),
         res.failed);
  EXPECT(resets == 1 && r.ticket == 0, "failed launch: %d resets, ticket left at %u", resets, r.ticket);
  // The next pass over the same scratch: its last program finishes (emulated_grad checks the ticket).
  r.ctl[Ctl::LOSS0] = -1.0;
  emulated_grad(x, y, 2.5, -1.0, true, 1, r);
  EXPECT(r.ctl[Ctl::LOSS0] == 2.5, "the pass after a failed launch did not run its finisher");
  // A first launch that fails queued nothing: no reset.
  resets = 0;
  const BucketLaunches first = launch_buckets(2, [](size_t) { return cudaError_t(1); }, [&] { ++resets; });
  EXPECT(first.failed == 0 && resets == 0, "first launch failed: %d resets", resets);
}

// int64 offsets: a tensor of 2**31 + 100 elements whose last chunk (index 2**31 / CHUNK) is the
// only one scheduled; its base pointer is placed 2**31 elements before a small buffer, so the
// chunk's elements are that buffer.  (Only the addresses of that chunk are ever formed.)
static void test_int64_offsets() {
  const int64_t big = (int64_t(1) << 31) + 100, start = int64_t(1) << 31;
  std::vector<float> w(100, 1.0f), g(100, 0.5f), m(100, 0.0f), v(100, 0.0f);
  auto base = [&](std::vector<float>& x) {
    return int64_t(reinterpret_cast<uintptr_t>(x.data())) - start * int64_t(sizeof(float));
  };
  std::vector<int64_t> table(TABLE_COLS, 0);
  table[TableCol::W] = base(w);
  table[TableCol::G] = base(g);
  table[TableCol::M] = base(m);
  table[TableCol::V] = base(v);
  table[TableCol::NUMEL] = big;
  table[TableCol::WD_BITS] = f64_bits(0.0);
  const std::vector<int32_t> sched = {0, int32_t(start / CHUNK)};
  double ctl[CTL_SIZE];
  fresh_ctl(ctl);
  Scratch s(1);
  StepArgs a = step_args(true, Dir::GRAD, false);
  a.p = pass_args(ctl, s, &s.tickets[1], 1, true);
  a.p.table = table.data();
  a.p.sched = sched.data();
  run_grid({0}, [&] { step_pass_kernel<float>(a); });
  float m1 = 0.f, v1 = 0.f;
  adam_moments(0.5f, m1, v1, a.beta1, a.one_minus_beta1, a.beta2, a.one_minus_beta2);
  const float d = grad_direction(0.5f, adam_denom(v1, a.bias_correction2, a.eps));
  for (int i = 0; i < 100; ++i) EXPECT(same(w[i], candidate(1.0f, a.eta, d, 0.f)) && same(m[i], m1), "int64 offset [%d]", i);
  EXPECT(close_rel(ctl[Ctl::SLOPE], 100.0 * double(0.5f * d), 1e-6), "int64 offset slope %g", ctl[Ctl::SLOPE]);
}

static void test_verdict_kernel() {
  const double losses[] = {1.0, 0.9, 1.1, std::nan(""), INFINITY};
  for (double loss : losses)
    for (int fb = 0; fb < 2; ++fb)
      for (int skip = 0; skip < 2; ++skip) {
        double ctl[CTL_SIZE], want_ctl[CTL_SIZE], out[VERDICT_SIZE], want[VERDICT_SIZE];
        fresh_ctl(ctl, 1.0, skip, fb);
        ctl[Ctl::LOSS0] = 1.0;
        ctl[Ctl::SLOPE] = 0.3;
        ctl[Ctl::SLOPE_GRAD] = 0.4;
        ctl[Ctl::S_NEW] = 0.2;
        ctl[Ctl::PENDING] = 3.0;
        std::memcpy(want_ctl, ctl, sizeof(ctl));
        const float loss32 = float(loss);
        VerdictArgs a{ctl, &loss32, kFloat32, 0.1, 0.5, 0.99, out};
        run_grid({0}, [&] { verdict_kernel(a); });
        verdict(want_ctl, double(loss32), 0.1, 0.5, 0.99, want);
        for (int k = 0; k < VERDICT_SIZE; ++k)
          EXPECT(same(out[k], want[k]) || (std::isnan(out[k]) && std::isnan(want[k])), "verdict out[%d]", k);
        for (int k = 0; k < CTL_SIZE; ++k) EXPECT(same(ctl[k], want_ctl[k]), "verdict ctl[%d]", k);
      }
}

int main() {
  test_step_and_moves<float>("fp32");
  test_step_and_moves<bf16_bits>("bf16");
  test_step_and_moves<fp16_bits>("fp16");
  test_grad_pass();
  test_failed_launch_resets_ticket();
  test_int64_offsets();
  test_verdict_kernel();
  if (failures) {
    std::printf("alsals_emulated_kernels_test: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("alsals_emulated_kernels_test: all checks passed\n");
  return 0;
}
