// Host emulation of the CUDA kernels (no GPU, no CUDA headers): csrc/kernels.cu compiled as C++
// with the CUDA built-ins replaced by host threads (one std::thread per CUDA thread, a barrier
// per block for __syncthreads and per warp for __shfl_down_sync).  It runs the real kernels on
// launch tables cut by the real for_each_launch and checks the plumbing: tile/segment mapping,
// the 16-byte vector path and the scalar tail, misaligned segments, tensors split across
// launches, per-block partials and their fixed-order cleanup, the ctrl flags (scale, skip,
// fallback, only_if_fallback) and the in-place moves, against a plain per-element loop.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
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
#define __shared__ static  // one block runs at a time, so a static is the block's shared memory

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim;

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

static double __shfl_down_sync(unsigned, double v, int off) {
  const int lane = threadIdx.x & 31;
  BlockSync::Warp& w = *g_sync->warps[threadIdx.x >> 5];
  w.buf[lane] = v;
  w.bar.arrive_and_wait();
  const double r = lane + off < 32 ? w.buf[lane + off] : v;
  w.bar.arrive_and_wait();
  return r;
}

#include "../kernels.cu"

using namespace alsals;

// One host thread per CUDA thread; the threads walk the blocks together, meeting at a barrier
// after each block (so the block's "shared memory" statics are free again).
template <class F>
static void run_grid(int blocks, int threads, F&& body) {
  blockDim.x = unsigned(threads);
  BlockSync sync(threads);
  g_sync = &sync;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx.x = unsigned(t);
      for (int b = 0; b < blocks; ++b) {
        blockIdx.x = unsigned(b);
        body();
        sync.block.arrive_and_wait();
      }
    });
  for (auto& th : pool) th.join();
  g_sync = nullptr;
}

// ---- the test -----------------------------------------------------------------------------------
static int failures = 0;
#define EXPECT(cond, ...)                                                              \
  do {                                                                                 \
    if (!(cond) && ++failures <= 20) {                                                 \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                        \
      std::fprintf(stderr, __VA_ARGS__);                                               \
      std::fprintf(stderr, "\n");                                                      \
    }                                                                                  \
  } while (0)

template <typename P>
struct HostBucket {
  // Each tensor lives at `offset` elements into its own buffer (offset 1: misaligned).
  std::vector<std::vector<P>> w, g, b;
  std::vector<std::vector<float>> m, v;
  std::vector<int64_t> numel;
  std::vector<float> wd;
  int offset = 0;

  HostBucket(const std::vector<int64_t>& sizes, int off, unsigned seed) : offset(off) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> N(0.f, 1.f);
    const float wds[] = {0.f, 0.01f, 0.1f};
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

  std::vector<Item> items(bool backups, const std::vector<float>* shrink = nullptr) {
    std::vector<Item> out;
    for (size_t i = 0; i < numel.size(); ++i) {
      Item it{};
      it.numel = numel[i];
      it.weight_decay = wd[i];
      it.shrink = shrink ? (*shrink)[i] : 1.0f;
      if (numel[i] > 0) {
        it.ptr[kListParam] = w[i].data() + offset;
        it.ptr[kListGrad] = g[i].data() + offset;
        it.ptr[kListExpAvg] = m[i].data() + offset;
        it.ptr[kListExpAvgSq] = v[i].data() + offset;
        it.ptr[kListBackup] = backups ? b[i].data() + offset : nullptr;
      }
      it.aligned = true;
      for (int l = 0; l < kNumLists; ++l)
        if (it.ptr[l] && reinterpret_cast<uintptr_t>(it.ptr[l]) % 16 != 0) it.aligned = false;
      out.push_back(it);
    }
    return out;
  }
};

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

template <typename P>
static const int64_t (&elem_sizes())[kNumLists] {
  static const int64_t s[kNumLists] = {int64_t(sizeof(P)), int64_t(sizeof(P)), 4, 4, int64_t(sizeof(P))};
  return s;
}

static void sum_partials(const std::vector<double>& partials, int64_t blocks, int width, const float* ctrl,
                         double* out) {
  run_grid(1, kCleanupThreads, [&] {
    if (width == 1) sum_partials_kernel<1>(partials.data(), blocks, ctrl, out);
    else sum_partials_kernel<2>(partials.data(), blocks, ctrl, out);
  });
}

// The step pass through the emulated kernels; returns the two dots.
template <typename P>
static void emulated_step(HostBucket<P>& hb, const PassScalars& base, const float* ctrl, int64_t max_blocks,
                          double dots[2]) {
  std::vector<Item> items = hb.items(base.write_backup);
  const int64_t blocks = total_blocks(items);
  std::vector<double> partials(2 * blocks + 2, -1.0);
  PassScalars s = base;
  s.ctrl = ctrl;
  s.partials = partials.data();
  for_each_launch(items, elem_sizes<P>(), max_blocks, [&](const LaunchTable& t) {
    run_grid(t.first_block[t.n_segments], kBlockThreads, [&] { step_pass_kernel<P>(t, s); });
  });
  dots[0] = dots[1] = 0.0;
  if (base.searching) sum_partials(partials, blocks, 2, ctrl, dots);
}

// The same step, element by element, as base.py writes it.
template <typename P>
static void plain_step(HostBucket<P>& hb, const PassScalars& s, const float* ctrl, double dots[2]) {
  dots[0] = dots[1] = 0.0;
  if (ctrl[kSkip] != 0.f) return;
  const bool momentum = !s.searching || s.momentum_search;
  for (size_t i = 0; i < hb.numel.size(); ++i)
    for (int64_t j = hb.offset; j < hb.numel[i] + hb.offset; ++j) {
      const float g = to_float(hb.g[i][j]) * ctrl[kGradScale];
      float& m = hb.m[i][j];
      float& v = hb.v[i][j];
      m = m * s.beta1 + s.one_minus_beta1 * g;
      v = v * s.beta2 + s.one_minus_beta2 * g * g;
      const float denom = sqrtf(v / s.bias_correction2) + s.eps;
      const float dg = g / denom, dm = (m / s.bias_correction1) / denom;
      const float d = momentum ? dm : dg;
      dots[0] += double(g * d);
      dots[1] += double(g * dg);
      const float w0 = to_float(hb.w[i][j]);
      if (s.write_backup) hb.b[i][j] = hb.w[i][j];
      hb.w[i][j] = from_float<P>(w0 - s.eta * (d + hb.wd[i] * w0));
    }
}

template <typename P>
static void emulated_move(HostBucket<P>& hb, const PassScalars& base, const float* ctrl, int64_t max_blocks) {
  std::vector<float> shrink;
  for (float wd : hb.wd) shrink.push_back(wd != 0.f ? float(1.0 - double(base.src_eta) * wd) : 1.0f);
  std::vector<Item> items = hb.items(base.from_backup, &shrink);
  PassScalars s = base;
  s.ctrl = ctrl;
  for_each_launch(items, elem_sizes<P>(), max_blocks, [&](const LaunchTable& t) {
    run_grid(t.first_block[t.n_segments], kBlockThreads, [&] { move_pass_kernel<P>(t, s); });
  });
}

template <typename P>
static void plain_move(HostBucket<P>& hb, const PassScalars& s, const float* ctrl) {
  const bool fallback = ctrl[kFallback] != 0.f;
  if (ctrl[kSkip] != 0.f || (s.only_if_fallback && !fallback)) return;
  const int src = resolve_direction(s.src_dir, fallback, s.momentum_search);
  const int dst = resolve_direction(s.dst_dir, fallback, s.momentum_search);
  for (size_t i = 0; i < hb.numel.size(); ++i)
    for (int64_t j = hb.offset; j < hb.numel[i] + hb.offset; ++j) {
      const float g = to_float(hb.g[i][j]) * ctrl[kGradScale];
      const float denom = sqrtf(hb.v[i][j] / s.bias_correction2) + s.eps;
      auto dir = [&](int d) { return d == kMomentum ? (hb.m[i][j] / s.bias_correction1) / denom : g / denom; };
      const float wd = hb.wd[i];
      float out;
      if (s.from_backup) {
        const float w0 = to_float(hb.b[i][j]);
        out = w0 - s.dst_eta * (dir(dst) + wd * w0);
      } else {
        const float w = to_float(hb.w[i][j]);
        const float shrink = wd != 0.f ? float(1.0 - double(s.src_eta) * wd) : 1.0f;
        const float w0 = (w + s.src_eta * dir(src)) / shrink;
        out = src == dst ? w - s.eta_delta * (dir(dst) + wd * w0) : w0 - s.dst_eta * (dir(dst) + wd * w0);
      }
      hb.w[i][j] = from_float<P>(out);
    }
}

static PassScalars step_scalars(bool searching, bool momentum_search, bool write_backup) {
  PassScalars s{};
  s.beta1 = 0.9f;
  s.one_minus_beta1 = float(1.0 - 0.9);
  s.beta2 = 0.999f;
  s.one_minus_beta2 = float(1.0 - 0.999);
  s.eps = 1e-8f;
  s.bias_correction1 = float(1.0 - std::pow(0.9, 3));
  s.bias_correction2 = float(1.0 - std::pow(0.999, 3));
  s.eta = 0.05f;
  s.searching = searching;
  s.momentum_search = momentum_search;
  s.write_backup = write_backup;
  return s;
}

template <typename P>
static void test_dtype(const char* name) {
  const std::vector<int64_t> sizes = {0, 1, 7, kChunk - 1, kChunk, kChunk + 1, 2 * kChunk + 13, 5, 0, 3};
  for (int off : {0, 1}) {
    for (int variant = 0; variant < 4; ++variant) {
      const bool searching = variant != 3, momentum = variant != 1, backup = variant != 2;
      const float ctrl[3] = {variant == 2 ? 0.5f : 1.0f, 0.f, 0.f};
      HostBucket<P> a(sizes, off, 11 + variant), b(sizes, off, 11 + variant);
      const PassScalars s = step_scalars(searching, momentum, backup);
      double da[2], db[2];
      emulated_step(a, s, ctrl, int64_t(1) << 30, da);
      plain_step(b, s, ctrl, db);
      expect_equal(a, b, name);
      if (searching)
        for (int k = 0; k < 2; ++k)
          EXPECT(std::fabs(da[k] - db[k]) <= 1e-12 * std::fabs(db[k]), "%s dots[%d] %.17g vs %.17g", name, k,
                 da[k], db[k]);
      // Splitting tensors across launches changes neither the writes nor the sums' bits.
      HostBucket<P> c(sizes, off, 11 + variant);
      double dc[2];
      emulated_step(c, s, ctrl, 3, dc);
      expect_equal(a, c, "split launches");
      EXPECT(da[0] == dc[0] && da[1] == dc[1], "%s: dots depend on the launch split", name);

      // Moves from the state the step left (backup path; in place for fp32 only).
      struct Move { int src_dir; float src_f; int dst_dir; float dst_f; int only; };
      const Move moves[] = {{kMomentum, 1.f, kSearch, 1.f, 1}, {kSearch, 1.f, kSearch, 0.9f, 0},
                            {kSearch, 1.f, kSearch, 0.f, 0}, {kSearch, 1.f, kUpdate, 1.f, 0},
                            {kGrad, 1.f, kMomentum, 0.5f, 0}};
      for (const Move& mv : moves)
        for (int fb = 0; fb < 2; ++fb) {
          if (!backup && sizeof(P) != 4) continue;
          HostBucket<P> x = a, y = a;
          PassScalars ms = s;
          ms.from_backup = backup;
          ms.only_if_fallback = mv.only;
          ms.src_dir = mv.src_dir;
          ms.dst_dir = mv.dst_dir;
          ms.src_eta = s.eta * mv.src_f;
          ms.dst_eta = s.eta * mv.dst_f;
          ms.eta_delta = float(double(ms.dst_eta) - double(ms.src_eta));
          const float mctrl[3] = {ctrl[0], 0.f, float(fb)};
          emulated_move(x, ms, mctrl, fb ? 2 : int64_t(1) << 30);
          plain_move(y, ms, mctrl);
          expect_equal(x, y, "move");
          if (&mv == moves + 1 && fb) {
            const float skip_ctrl[3] = {1.f, 1.f, 1.f};
            HostBucket<P> z = a;
            emulated_move(z, ms, skip_ctrl, int64_t(1) << 30);
            expect_equal(z, a, "skipped move wrote something");
          }
        }
    }
    // Skip: nothing written, zero sums.
    HostBucket<P> a(sizes, off, 5), before(sizes, off, 5);
    const float skip_ctrl[3] = {1.f, 1.f, 0.f};
    double d[2] = {1, 1};
    emulated_step(a, step_scalars(true, true, true), skip_ctrl, int64_t(1) << 30, d);
    expect_equal(a, before, "skipped step wrote something");
    EXPECT(d[0] == 0.0 && d[1] == 0.0, "skipped step: dots %g %g", d[0], d[1]);
    // grad_sumsq.
    std::vector<Item> items;
    for (size_t i = 0; i < a.numel.size(); ++i) {
      Item it{};
      it.numel = a.numel[i];
      if (it.numel) it.ptr[kListGrad] = a.g[i].data() + off;
      it.aligned = !it.ptr[kListGrad] || reinterpret_cast<uintptr_t>(it.ptr[kListGrad]) % 16 == 0;
      items.push_back(it);
    }
    const int64_t blocks = total_blocks(items);
    std::vector<double> partials(blocks);
    PassScalars s{};
    s.partials = partials.data();
    for_each_launch(items, elem_sizes<P>(), 2, [&](const LaunchTable& t) {
      run_grid(t.first_block[t.n_segments], kBlockThreads, [&] { grad_sumsq_kernel<P>(t, s); });
    });
    double got = 0, want = 0;
    sum_partials(partials, blocks, 1, nullptr, &got);
    for (size_t i = 0; i < a.numel.size(); ++i)
      for (int64_t j = 0; j < a.numel[i]; ++j) {
        const float x = to_float(a.g[i][j + off]);
        want += double(x * x);
      }
    EXPECT(std::fabs(got - want) <= 1e-12 * want, "%s grad_sumsq %.17g vs %.17g", name, got, want);
  }
}

static void test_many_segments() {
  std::vector<int64_t> sizes;
  for (int i = 0; i < 3 * kMaxSegments + 5; ++i) sizes.push_back(1 + (i * 37) % 300);
  HostBucket<float> a(sizes, 0, 3), b(sizes, 0, 3);
  const float ctrl[3] = {1.f, 0.f, 0.f};
  const PassScalars s = step_scalars(true, true, true);
  double da[2], db[2];
  emulated_step(a, s, ctrl, int64_t(1) << 30, da);
  plain_step(b, s, ctrl, db);
  expect_equal(a, b, "many segments");
  EXPECT(std::fabs(da[0] - db[0]) <= 1e-12 * std::fabs(db[0]), "many segments dots");
}

int main() {
  test_dtype<float>("fp32");
  test_dtype<bf16_bits>("bf16");
  test_dtype<fp16_bits>("fp16");
  test_many_segments();
  if (failures) {
    std::printf("alsals_emulated_kernels_test: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("alsals_emulated_kernels_test: all checks passed\n");
  return 0;
}
