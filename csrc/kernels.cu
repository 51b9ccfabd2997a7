// The ALSALS CUDA kernels: gradient sum of squares, step pass, move pass, and the deterministic
// cleanup that sums per-block partials.  Only CUDA and our small headers are included here (no
// torch headers: they would make this file take minutes to compile).
//
// Every kernel handles one tile (kChunk elements of one segment, see launch_table.h) per block.
// On an aligned segment each thread moves 16 bytes of the parameter type per iteration (VEC =
// 16 / sizeof(param) elements; the fp32 moments then move in one or two 16-byte accesses) and a
// scalar loop does the tail; an unaligned segment (a view with an odd storage offset) takes the
// scalar loop throughout.  Device flags come from ctrl in device memory; host scalars by value.
// ALSALS_HOST_EMULATION: compiled as plain C++ by csrc/tests/test_emulated_kernels.cpp, which
// supplies threadIdx, __syncthreads, __shfl_down_sync... and runs the kernels on host threads.
#if !defined(ALSALS_HOST_EMULATION)
#include <cuda_runtime.h>
#endif
#include <stdint.h>

#include "alsals_math.h"
#include "launch_table.h"

namespace alsals {
namespace {

// ---- vector access ------------------------------------------------------------------------
// N elements of T at p; when N*sizeof(T) is a multiple of 16 (the aligned path) as 16-byte
// accesses, else element by element.  The 16-byte unit is a struct of T (not a uint4), so the
// accesses stay within the aliasing rules.
template <typename T>
struct alignas(16) Pack16 { T v[16 / sizeof(T)]; };

template <typename T, int N>
__device__ __forceinline__ void load(T (&r)[N], const T* p) {
  constexpr int kPer = int(16 / sizeof(T));
  if constexpr (N % kPer == 0) {
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      const Pack16<T> pk = reinterpret_cast<const Pack16<T>*>(p)[c];
#pragma unroll
      for (int k = 0; k < kPer; ++k) r[c * kPer + k] = pk.v[k];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) r[i] = p[i];
  }
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const T (&r)[N]) {
  constexpr int kPer = int(16 / sizeof(T));
  if constexpr (N % kPer == 0) {
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      Pack16<T> pk;
#pragma unroll
      for (int k = 0; k < kPer; ++k) pk.v[k] = r[c * kPer + k];
      reinterpret_cast<Pack16<T>*>(p)[c] = pk;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = r[i];
  }
}

// ---- block -> (segment, tile) ---------------------------------------------------------------
struct Tile {
  int seg;
  int64_t start;  // first element of the tile inside the segment
  int count;      // elements in the tile (<= kChunk)
};

__device__ __forceinline__ Tile find_tile(const LaunchTable& t) {
  const int b = blockIdx.x;
  int lo = 0, hi = t.n_segments - 1;  // largest seg with first_block[seg] <= b
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (t.first_block[mid] <= b) lo = mid; else hi = mid - 1;
  }
  Tile tile;
  tile.seg = lo;
  tile.start = int64_t(b - t.first_block[lo]) * kChunk;
  const int64_t left = t.numel[lo] - tile.start;
  tile.count = left < kChunk ? int(left) : kChunk;
  return tile;
}

// Runs op.template run<N>(i) over the tile: VEC-wide on aligned segments, then the scalar tail.
template <int VEC, typename Op>
__device__ __forceinline__ void for_tile(const Tile& tile, bool aligned, Op& op) {
  int scalar_from = 0;
  if (aligned) {
    const int nvec = tile.count / VEC;
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) op.template run<VEC>(tile.start + int64_t(j) * VEC);
    scalar_from = nvec * VEC;
  }
  for (int j = scalar_from + threadIdx.x; j < tile.count; j += blockDim.x) op.template run<1>(tile.start + j);
}

// Fixed-order block sum (warp shuffles, then the warps' results in order): deterministic.
template <int WIDTH>
__device__ __forceinline__ void block_sum(double (&acc)[WIDTH], double (&shared)[WIDTH][32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < WIDTH; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[k] += __shfl_down_sync(0xffffffffu, acc[k], off);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < WIDTH; ++k) shared[k][warp] = acc[k];
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int k = 0; k < WIDTH; ++k) {
      acc[k] = lane < nwarps ? shared[k][lane] : 0.0;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[k] += __shfl_down_sync(0xffffffffu, acc[k], off);
    }
  }
}

template <typename P>
struct VecOf { static constexpr int value = int(16 / sizeof(P)); };

// ---- grad_sumsq: per-block sum of g*g, squares in fp32, sums in fp64 --------------------------
// Squaring in fp32 (as the step pass does for v) makes any |g| whose square overflows fp32 show
// up as inf here, so the step is skipped before v could absorb an inf.
template <typename P>
struct SumsqOp {
  const P* g;
  double acc;
  template <int N>
  __device__ __forceinline__ void run(int64_t i) {
    alignas(16) P r[N];
    load(r, g + i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float x = to_float(r[k]);
      acc += double(x * x);
    }
  }
};

template <typename P>
__global__ void __launch_bounds__(kBlockThreads) grad_sumsq_kernel(const LaunchTable t, const PassScalars s) {
  __shared__ double shared[1][32];
  const Tile tile = find_tile(t);
  SumsqOp<P> op{static_cast<const P*>(t.ptr[kListGrad][tile.seg]), 0.0};
  for_tile<VecOf<P>::value>(tile, t.aligned[tile.seg], op);
  double acc[1] = {op.acc};
  block_sum<1>(acc, shared);
  if (threadIdx.x == 0) s.partials[t.partial_base + blockIdx.x] = acc[0];
}

// ---- step pass ------------------------------------------------------------------------------
template <typename P>
struct StepOp {
  P* w;
  const P* g;
  float* m;
  float* v;
  P* backup;
  float scale, wd;
  const PassScalars* s;
  bool momentum_dir;  // MOMENTUM when not searching, else the nominal search direction
  double dot_nominal, dot_grad;

  template <int N>
  __device__ __forceinline__ void run(int64_t i) {
    alignas(16) P wr[N];
    alignas(16) P gr[N];
    alignas(16) float mr[N];
    alignas(16) float vr[N];
    load(gr, g + i);
    load(mr, m + i);
    load(vr, v + i);
    load(wr, w + i);
    alignas(16) P out[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float gf = to_float(gr[k]) * scale;
      adam_moments(gf, mr[k], vr[k], s->beta1, s->one_minus_beta1, s->beta2, s->one_minus_beta2);
      const float denom = adam_denom(vr[k], s->bias_correction2, s->eps);
      const float d_grad = grad_direction(gf, denom);
      const float d = momentum_dir ? momentum_direction(mr[k], s->bias_correction1, denom) : d_grad;
      if (s->searching) {
        dot_nominal += double(gf * d);
        dot_grad += double(gf * d_grad);
      }
      out[k] = from_float<P>(candidate(to_float(wr[k]), s->eta, d, wd));
    }
    store(m + i, mr);
    store(v + i, vr);
    if (s->write_backup) store(backup + i, wr);
    store(w + i, out);
  }
};

template <typename P>
__global__ void __launch_bounds__(kBlockThreads) step_pass_kernel(const LaunchTable t, const PassScalars s) {
  __shared__ double shared[2][32];
  if (s.ctrl[kSkip] != 0.0f) return;  // non-finite loss or gradient: write nothing
  const Tile tile = find_tile(t);
  const int seg = tile.seg;
  StepOp<P> op{static_cast<P*>(t.ptr[kListParam][seg]), static_cast<const P*>(t.ptr[kListGrad][seg]),
               static_cast<float*>(t.ptr[kListExpAvg][seg]), static_cast<float*>(t.ptr[kListExpAvgSq][seg]),
               static_cast<P*>(t.ptr[kListBackup][seg]), s.ctrl[kGradScale], t.weight_decay[seg], &s,
               !s.searching || bool(s.momentum_search), 0.0, 0.0};
  for_tile<VecOf<P>::value>(tile, t.aligned[seg], op);
  if (!s.searching) return;
  double acc[2] = {op.dot_nominal, op.dot_grad};
  block_sum<2>(acc, shared);
  if (threadIdx.x == 0) {
    double* out = s.partials + 2 * (t.partial_base + blockIdx.x);
    out[0] = acc[0];
    out[1] = acc[1];
  }
}

// ---- move pass ------------------------------------------------------------------------------
// InPlace (memory_efficient) and from-backup moves are separate instantiations: each keeps only
// its own state live (the branch is uniform per launch anyway).
template <typename P, bool InPlace>
struct MoveOp {
  P* w;
  const P* g;
  const float* m;
  const float* v;
  const P* backup;  // from-backup moves only
  float scale, wd, shrink;
  int src_dir, dst_dir;
  bool need_g, need_m;
  const PassScalars* s;

  template <int N>
  __device__ __forceinline__ void run(int64_t i) {
    alignas(16) float mr[N] = {};  // read only when need_m / need_g; zeroed to keep that visible
    alignas(16) float vr[N];
    alignas(16) P gr[N] = {};
    alignas(16) P wr[N];
    load(vr, v + i);
    if (need_m) load(mr, m + i);
    if (need_g) load(gr, g + i);
    load(wr, (InPlace ? w : backup) + i);
    alignas(16) P out[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float gf = need_g ? to_float(gr[k]) * scale : 0.0f;
      const float mf = need_m ? mr[k] : 0.0f;
      const float denom = adam_denom(vr[k], s->bias_correction2, s->eps);
      const float d_dst = direction(dst_dir, gf, mf, denom, s->bias_correction1);
      const float x = to_float(wr[k]);
      float w_new;
      if constexpr (!InPlace) {
        w_new = candidate(x, s->dst_eta, d_dst, wd);
      } else {
        const float d_src = src_dir == dst_dir ? d_dst : direction(src_dir, gf, mf, denom, s->bias_correction1);
        const float w0 = recover_w0(x, s->src_eta, d_src, shrink);
        w_new = src_dir == dst_dir ? move_in_place(x, s->eta_delta, d_dst, wd, w0)
                                   : candidate(w0, s->dst_eta, d_dst, wd);
      }
      out[k] = from_float<P>(w_new);
    }
    store(w + i, out);
  }
};

template <typename P, bool InPlace>
__device__ __forceinline__ void move_tile(const LaunchTable& t, const PassScalars& s, const Tile& tile,
                                          bool fallback) {
  const int seg = tile.seg;
  const int src = resolve_direction(s.src_dir, fallback, s.momentum_search);
  const int dst = resolve_direction(s.dst_dir, fallback, s.momentum_search);
  MoveOp<P, InPlace> op;
  op.w = static_cast<P*>(t.ptr[kListParam][seg]);
  op.g = static_cast<const P*>(t.ptr[kListGrad][seg]);
  op.m = static_cast<const float*>(t.ptr[kListExpAvg][seg]);
  op.v = static_cast<const float*>(t.ptr[kListExpAvgSq][seg]);
  op.backup = InPlace ? nullptr : static_cast<const P*>(t.ptr[kListBackup][seg]);
  op.scale = s.ctrl[kGradScale];
  op.wd = t.weight_decay[seg];
  op.shrink = t.shrink[seg];
  op.src_dir = src;
  op.dst_dir = dst;
  op.need_g = dst == kGrad || (InPlace && src == kGrad);
  op.need_m = dst == kMomentum || (InPlace && src == kMomentum);
  op.s = &s;
  for_tile<VecOf<P>::value>(tile, t.aligned[seg], op);
}

template <typename P>
__global__ void __launch_bounds__(kBlockThreads) move_pass_kernel(const LaunchTable t, const PassScalars s) {
  if (s.ctrl[kSkip] != 0.0f) return;
  const bool fallback = s.ctrl[kFallback] != 0.0f;
  if (s.only_if_fallback && !fallback) return;
  const Tile tile = find_tile(t);
  if (s.from_backup) move_tile<P, false>(t, s, tile, fallback);
  else move_tile<P, true>(t, s, tile, fallback);
}

// ---- cleanup: the partials in a fixed order, in fp64 ----------------------------------------
template <int WIDTH>
__global__ void __launch_bounds__(kCleanupThreads)
sum_partials_kernel(const double* partials, int64_t n_blocks, const float* ctrl, double* out) {
  __shared__ double shared[WIDTH][32];
  double acc[WIDTH];
#pragma unroll
  for (int k = 0; k < WIDTH; ++k) acc[k] = 0.0;
  const bool skip = ctrl != nullptr && ctrl[kSkip] != 0.0f;
  if (!skip) {
    for (int64_t b = threadIdx.x; b < n_blocks; b += blockDim.x)
#pragma unroll
      for (int k = 0; k < WIDTH; ++k) acc[k] += partials[b * WIDTH + k];
  }
  block_sum<WIDTH>(acc, shared);
  if (threadIdx.x == 0)
#pragma unroll
    for (int k = 0; k < WIDTH; ++k) out[k] = acc[k];
}

}  // namespace

#if !defined(ALSALS_HOST_EMULATION)
// ---- launchers ------------------------------------------------------------------------------
#define ALSALS_DISPATCH(KERNEL, storage, grid, stream, ...)                                   \
  switch (storage) {                                                                        \
    case kFloat32: KERNEL<float><<<grid, kBlockThreads, 0, stream>>>(__VA_ARGS__); break;   \
    case kBFloat16: KERNEL<bf16_bits><<<grid, kBlockThreads, 0, stream>>>(__VA_ARGS__); break; \
    case kFloat16: KERNEL<fp16_bits><<<grid, kBlockThreads, 0, stream>>>(__VA_ARGS__); break; \
    default: return cudaErrorInvalidValue;                                                  \
  }

cudaError_t launch_grad_sumsq(const LaunchTable& t, const PassScalars& s, int storage, cudaStream_t stream) {
  const unsigned grid = unsigned(t.first_block[t.n_segments]);
  ALSALS_DISPATCH(grad_sumsq_kernel, storage, grid, stream, t, s)
  return cudaGetLastError();
}

cudaError_t launch_step_pass(const LaunchTable& t, const PassScalars& s, int storage, cudaStream_t stream) {
  const unsigned grid = unsigned(t.first_block[t.n_segments]);
  ALSALS_DISPATCH(step_pass_kernel, storage, grid, stream, t, s)
  return cudaGetLastError();
}

cudaError_t launch_move_pass(const LaunchTable& t, const PassScalars& s, int storage, cudaStream_t stream) {
  const unsigned grid = unsigned(t.first_block[t.n_segments]);
  ALSALS_DISPATCH(move_pass_kernel, storage, grid, stream, t, s)
  return cudaGetLastError();
}

cudaError_t launch_sum_partials(const double* partials, int64_t n_blocks, int width, const float* ctrl,
                                double* out, cudaStream_t stream) {
  if (width == 1) sum_partials_kernel<1><<<1, kCleanupThreads, 0, stream>>>(partials, n_blocks, ctrl, out);
  else if (width == 2) sum_partials_kernel<2><<<1, kCleanupThreads, 0, stream>>>(partials, n_blocks, ctrl, out);
  else return cudaErrorInvalidValue;
  return cudaGetLastError();
}
#endif  // !ALSALS_HOST_EMULATION

}  // namespace alsals
