// The ALSALS CUDA kernels of contract v2 (backends/base.py): grad pass, step pass, move pass and
// verdict.  Only CUDA and our small headers are included here (no torch headers: they would make
// this file take minutes to compile).
//
// One program (CUDA block of kPassThreads threads) handles one chunk of CHUNK elements of one
// tensor, found through the schedule (passes.h).  A full chunk whose addresses are all 16-byte
// aligned takes the vector path: each thread moves 16 bytes of the parameter type per access
// (VEC = 16 / sizeof(param) elements; the fp32 moments then take one or two 16-byte accesses) and
// issues every load of its share of the chunk before the first use (fp32: 16 accesses of 16
// bytes in flight per thread).  Tails and misaligned views take a scalar loop.
//
// Sums: each program writes fp32 partials (fixed-order block reduction); the program that
// arrives last at the pass's ticket (__threadfence + atomicAdd, the CUDA "threadFenceReduction"
// pattern) adds every partial in float64 in a fixed order and runs the finisher (alsals_math.h),
// so a pass and its finisher are one launch and the result does not depend on block order.
//
// ALSALS_HOST_EMULATION: compiled as plain C++ by csrc/tests/test_emulated_kernels.cpp, which
// supplies threadIdx, __syncthreads, __shfl_down_sync, atomicAdd... and runs blocks on host threads.
#if !defined(ALSALS_HOST_EMULATION)
#include <cuda_runtime.h>
#endif
#include <stdint.h>

#include "alsals_math.h"
#include "passes.h"

namespace alsals {
namespace {

constexpr int kThreads = kPassThreads;
constexpr int kWarps = kThreads / 32;

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

template <typename P>
struct VecOf { static constexpr int value = int(16 / sizeof(P)); };

// ---- program -> (tensor row, chunk) ----------------------------------------------------------
struct Chunk {
  const int64_t* row;  // the tensor's table row; null for a program with no work
  int64_t start;       // first element of the chunk in the tensor (int64)
  int count;           // elements in the chunk (<= CHUNK)
};

__device__ __forceinline__ Chunk find_chunk(const PassArgs& p) {
  Chunk c{nullptr, 0, 0};
  const int32_t r = p.sched[2 * int64_t(blockIdx.x)];
  if (r < 0) return c;
  c.row = p.table + int64_t(r) * TABLE_COLS;
  c.start = int64_t(p.sched[2 * int64_t(blockIdx.x) + 1]) * CHUNK;
  const int64_t left = c.row[TableCol::NUMEL] - c.start;
  c.count = left < CHUNK ? int(left) : CHUNK;
  return c;
}

template <typename T>
__device__ __forceinline__ T* col_ptr(const int64_t* row, int col) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(row[col]));
}

__device__ __forceinline__ double col_f64(const int64_t* row, int col) {
  return __longlong_as_double(static_cast<long long>(row[col]));
}

__device__ __forceinline__ bool aligned16(uintptr_t a) { return (a & 15u) == 0; }

// Runs op.template run<N, G>(first, stride) over the chunk.  Vector path (full, aligned chunk):
// each thread takes GROUPS groups of VEC elements, group k at element (k*kThreads + tid)*VEC,
// all of them in one call so their loads are in flight together.  Else the scalar loop.
template <int VEC, typename Op>
__device__ __forceinline__ void for_chunk(const Chunk& c, bool aligned, Op& op) {
  constexpr int kGroups = CHUNK / (kThreads * VEC);
  if (aligned && c.count == CHUNK) {
    op.template run<VEC, kGroups>(c.start + int64_t(threadIdx.x) * VEC, int64_t(kThreads) * VEC);
    return;
  }
  // unroll 1: unrolled, this loop made ptxas spill 16 bytes in the fp16 step kernel for sm_80
#pragma unroll 1
  for (int j = threadIdx.x; j < c.count; j += kThreads) op.template run<1, 1>(c.start + j, 0);
}

// ---- reductions -----------------------------------------------------------------------------
// Fixed-order block sums (warp shuffles, then the warps' results in order): the result is in
// thread 0 and does not depend on timing.
template <typename T, int W>
__device__ __forceinline__ void block_sum(T (&acc)[W], T (&shared)[W][kWarps]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < W; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[k] += __shfl_down_sync(0xffffffffu, acc[k], off);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < W; ++k) shared[k][warp] = acc[k];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < W; ++k) {
      acc[k] = lane < kWarps ? shared[k][lane] : T(0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[k] += __shfl_down_sync(0xffffffffu, acc[k], off);
    }
  }
}

// Thread 0 stores the program's W fp32 partials; returns true in every thread of the program
// that arrived last at the ticket (all partials of the pass are then visible to it).
template <int W>
__device__ __forceinline__ bool store_partials_and_arrive(const PassArgs& p, const float (&sum)[W]) {
  __shared__ int last;
  if (threadIdx.x == 0) {
    const int64_t slot = p.program_base + blockIdx.x;
#pragma unroll
    for (int k = 0; k < W; ++k) p.partials[W * slot + k] = sum[k];
    __threadfence();  // the partials reach device scope before the ticket moves
    const unsigned int ticket = atomicAdd(p.ticket, 1u);
    last = ticket == unsigned(p.total_programs - 1);
  }
  __syncthreads();
  return last != 0;
}

// The last program: every partial of the pass in float64, thread t adding t, t+kThreads, ...
// in order, then the fixed-order block sum.  Result in thread 0, which also resets the ticket.
template <int W>
__device__ __forceinline__ void finish_sums(const PassArgs& p, double (&out)[W]) {
  __shared__ double shared[W][kWarps];
  __threadfence();
#pragma unroll
  for (int k = 0; k < W; ++k) out[k] = 0.0;
  // unroll 8: eight independent L2 loads in flight per thread (the sum's order stays fixed)
#pragma unroll 8
  for (int64_t i = threadIdx.x; i < p.total_programs; i += kThreads)
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] += double(__ldcg(p.partials + W * i + k));  // L2: other blocks' writes
  block_sum<double, W>(out, shared);
  if (threadIdx.x == 0) *p.ticket = 0u;
}

__device__ __forceinline__ double load_scalar(const void* x, int code) {
  switch (code) {
    case kFloat64: return *static_cast<const double*>(x);
    case kFloat32: return double(*static_cast<const float*>(x));
    case kBFloat16: return double(bf16_to_float(*static_cast<const uint16_t*>(x)));
    case kFloat16: return double(fp16_to_float(*static_cast<const uint16_t*>(x)));
    default: return __longlong_as_double(0x7ff8000000000000LL);  // NaN: the glue checks codes
  }
}

__device__ __forceinline__ float square_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, x);  // rounded before the sum: an fp32 overflow shows up as inf
#else
  return x * x;
#endif
}

// ---- grad pass: sum of g*g (fp32 squares and partials) + grad finisher ----------------------
template <typename P>
struct SumsqOp {
  const P* __restrict__ g;
  float acc;
  template <int N, int G>
  __device__ __forceinline__ void run(int64_t first, int64_t stride) {
    P r[G][N];
#pragma unroll
    for (int k = 0; k < G; ++k) load(r[k], g + first + k * stride);
#pragma unroll
    for (int k = 0; k < G; ++k)
#pragma unroll
      for (int i = 0; i < N; ++i) acc += square_rn(to_float(r[k][i]));
  }
};

template <typename P>
__global__ void __launch_bounds__(kThreads) grad_pass_kernel(const GradArgs a) {
  __shared__ float shared[1][kWarps];
  const Chunk c = find_chunk(a.p);
  SumsqOp<P> op{nullptr, 0.0f};
  if (c.row) {
    op.g = col_ptr<const P>(c.row, TableCol::G);
    for_chunk<VecOf<P>::value>(c, aligned16(uintptr_t(op.g)), op);
  }
  float sum[1] = {op.acc};
  block_sum<float, 1>(sum, shared);
  if (!store_partials_and_arrive<1>(a.p, sum)) return;
  double total[1];
  finish_sums<1>(a.p, total);
  if (threadIdx.x != 0) return;
  if (a.p.finish) finish_grad(a.p.ctl, total[0], load_scalar(a.loss0, a.loss_code), a.max_grad_norm);
  else a.p.out[0] = total[0];
}

// ---- step pass: ADAM moments, backup, candidate, slopes + step finisher -----------------------
template <typename P>
struct StepOp {
  P* __restrict__ w;
  const P* __restrict__ g;
  float* __restrict__ m;
  float* __restrict__ v;
  P* __restrict__ backup;
  float scale, wd;
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction1, bias_correction2, eta;
  bool momentum_dir, searching, write_backup;
  float dot_search, dot_grad;

  template <int N, int G>
  __device__ __forceinline__ void run(int64_t first, int64_t stride) {
    P wr[G][N], gr[G][N];
    float mr[G][N], vr[G][N];
#pragma unroll
    for (int k = 0; k < G; ++k) {  // every load of this thread's share before the first use
      load(gr[k], g + first + k * stride);
      load(mr[k], m + first + k * stride);
      load(vr[k], v + first + k * stride);
      load(wr[k], w + first + k * stride);
    }
#pragma unroll
    for (int k = 0; k < G; ++k) {
      P out[N];
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float gf = to_float(gr[k][i]) * scale;
        adam_moments(gf, mr[k][i], vr[k][i], beta1, one_minus_beta1, beta2, one_minus_beta2);
        const float denom = adam_denom(vr[k][i], bias_correction2, eps);
        const float d_grad = grad_direction(gf, denom);
        const float d = momentum_dir ? momentum_direction(mr[k][i], bias_correction1, denom) : d_grad;
        if (searching) {
          dot_search += gf * d;
          dot_grad += gf * d_grad;
        }
        out[i] = from_float<P>(candidate(to_float(wr[k][i]), eta, d, wd));
      }
      const int64_t at = first + k * stride;
      store(m + at, mr[k]);
      store(v + at, vr[k]);
      if (write_backup) store(backup + at, wr[k]);
      store(w + at, out);
    }
  }
};

template <typename P>
__global__ void __launch_bounds__(kThreads) step_pass_kernel(const StepArgs a) {
  __shared__ float shared[2][kWarps];
  const double* ctl = a.p.ctl;
  if (ctl[Ctl::SKIP] != 0.0) {  // non-finite loss or gradient: no parameter or moment is written
    // The sums are zero; as in the reference, the finisher still runs on them (SLOPE = 0,
    // S_NEW = smoothing*S, FALLBACK = 0), written by one thread of the pass's first program.
    if (a.searching && a.p.program_base == 0 && blockIdx.x == 0 && threadIdx.x == 0) {
      if (a.p.finish) finish_step(a.p.ctl, 0.0, 0.0, a.smoothing);
      else a.p.out[0] = a.p.out[1] = 0.0;
    }
    return;
  }
  const Chunk c = find_chunk(a.p);
  const int dir = a.searching ? resolve_dir(a.search_dir, ctl[Ctl::FALLBACK] != 0.0) : int(Dir::MOMENTUM);
  StepOp<P> op{};
  op.beta1 = a.beta1;
  op.one_minus_beta1 = a.one_minus_beta1;
  op.beta2 = a.beta2;
  op.one_minus_beta2 = a.one_minus_beta2;
  op.eps = a.eps;
  op.bias_correction1 = a.bias_correction1;
  op.bias_correction2 = a.bias_correction2;
  op.eta = a.eta;
  op.momentum_dir = dir == Dir::MOMENTUM;
  op.searching = a.searching != 0;
  op.write_backup = a.write_backup != 0;
  op.dot_search = op.dot_grad = 0.0f;
  if (c.row) {
    op.w = col_ptr<P>(c.row, TableCol::W);
    op.g = col_ptr<const P>(c.row, TableCol::G);
    op.m = col_ptr<float>(c.row, TableCol::M);
    op.v = col_ptr<float>(c.row, TableCol::V);
    op.backup = op.write_backup ? col_ptr<P>(c.row, TableCol::BACKUP) : nullptr;
    op.scale = float(ctl[Ctl::SCALE]);
    op.wd = float(col_f64(c.row, TableCol::WD_BITS));
    const uintptr_t any = uintptr_t(op.w) | uintptr_t(op.g) | uintptr_t(op.m) | uintptr_t(op.v) |
                          uintptr_t(op.backup);
    for_chunk<VecOf<P>::value>(c, aligned16(any), op);
  }
  if (!a.searching) return;
  float sum[2] = {op.dot_search, op.dot_grad};
  block_sum<float, 2>(sum, shared);
  if (!store_partials_and_arrive<2>(a.p, sum)) return;
  double total[2];
  finish_sums<2>(a.p, total);
  if (threadIdx.x != 0) return;
  if (a.p.finish) {
    finish_step(a.p.ctl, total[0], total[1], a.smoothing);
  } else {
    a.p.out[0] = total[0];
    a.p.out[1] = total[1];
  }
}

// ---- move pass ------------------------------------------------------------------------------
// InPlace (memory_efficient) and from-backup moves are separate instantiations: each keeps only
// its own state live (the branch is uniform per launch anyway).
template <typename P, bool InPlace>
struct MoveOp {
  P* __restrict__ w;
  const P* __restrict__ g;
  const float* __restrict__ m;
  const float* __restrict__ v;
  const P* __restrict__ backup;  // from-backup moves only
  float scale, wd, shrink;
  int src_dir, dst_dir;
  bool need_g, need_m;
  const MoveArgs* s;

  template <int N, int G>
  __device__ __forceinline__ void run(int64_t first, int64_t stride) {
    float mr[G][N] = {};  // read only when need_m / need_g; zeroed to keep that visible
    float vr[G][N];
    P gr[G][N] = {};
    P wr[G][N];
#pragma unroll
    for (int k = 0; k < G; ++k) {
      const int64_t at = first + k * stride;
      load(vr[k], v + at);
      if (need_m) load(mr[k], m + at);
      if (need_g) load(gr[k], g + at);
      load(wr[k], (InPlace ? w : backup) + at);
    }
#pragma unroll
    for (int k = 0; k < G; ++k) {
      P out[N];
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float gf = need_g ? to_float(gr[k][i]) * scale : 0.0f;
        const float mf = need_m ? mr[k][i] : 0.0f;
        const float denom = adam_denom(vr[k][i], s->bias_correction2, s->eps);
        const float d_dst = direction(dst_dir, gf, mf, denom, s->bias_correction1);
        const float x = to_float(wr[k][i]);
        float w_new;
        if constexpr (!InPlace) {
          w_new = candidate(x, s->dst_eta, d_dst, wd);
        } else {
          const float d_src = src_dir == dst_dir ? d_dst : direction(src_dir, gf, mf, denom, s->bias_correction1);
          const float w0 = recover_w0(x, s->src_eta, d_src, shrink);
          w_new = src_dir == dst_dir ? move_in_place(x, s->eta_delta, d_dst, wd, w0)
                                     : candidate(w0, s->dst_eta, d_dst, wd);
        }
        out[i] = from_float<P>(w_new);
      }
      store(w + first + k * stride, out);
    }
  }
};

template <typename P, bool InPlace>
__device__ __forceinline__ void move_chunk(const MoveArgs& a, const Chunk& c, int src, int dst) {
  MoveOp<P, InPlace> op;
  op.w = col_ptr<P>(c.row, TableCol::W);
  op.g = col_ptr<const P>(c.row, TableCol::G);
  op.m = col_ptr<const float>(c.row, TableCol::M);
  op.v = col_ptr<const float>(c.row, TableCol::V);
  op.backup = InPlace ? nullptr : col_ptr<const P>(c.row, TableCol::BACKUP);
  op.scale = float(a.p.ctl[Ctl::SCALE]);
  const double wd = col_f64(c.row, TableCol::WD_BITS);
  op.wd = float(wd);
  // in place: w0 = (w + src_eta*d_src) / (1 - src_eta*wd), the divisor in double (1 when wd == 0)
  op.shrink = wd != 0.0 ? float(1.0 - a.src_eta64 * wd) : 1.0f;
  op.src_dir = src;
  op.dst_dir = dst;
  op.need_g = dst == Dir::GRAD || (InPlace && src == Dir::GRAD);
  op.need_m = dst == Dir::MOMENTUM || (InPlace && src == Dir::MOMENTUM);
  op.s = &a;
  uintptr_t any = uintptr_t(op.w) | uintptr_t(op.v) | uintptr_t(op.backup);
  if (op.need_g) any |= uintptr_t(op.g);
  if (op.need_m) any |= uintptr_t(op.m);
  for_chunk<VecOf<P>::value>(c, aligned16(any), op);
}

template <typename P>
__global__ void __launch_bounds__(kThreads) move_pass_kernel(const MoveArgs a) {
  const double* ctl = a.p.ctl;
  // Nothing to do (skipped step, or the gating slot is 0): return before touching memory.
  if (ctl[Ctl::SKIP] != 0.0 || (a.only_if >= 0 && ctl[a.only_if] == 0.0)) return;
  const bool fallback = ctl[Ctl::FALLBACK] != 0.0;
  const Chunk c = find_chunk(a.p);
  if (!c.row) return;
  const int src = resolve_dir(a.src_dir, fallback), dst = resolve_dir(a.dst_dir, fallback);
  if (a.from_backup) move_chunk<P, false>(a, c, src, dst);
  else move_chunk<P, true>(a, c, src, dst);
}

// ---- verdict: the per-trial decision, one thread --------------------------------------------
__global__ void verdict_kernel(const VerdictArgs a) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  verdict(a.ctl, load_scalar(a.loss_try, a.loss_code), a.eta, a.c, a.smoothing, a.out);
}

}  // namespace

#if !defined(ALSALS_HOST_EMULATION)
// ---- launchers ------------------------------------------------------------------------------
#define ALSALS_DISPATCH(KERNEL, storage, grid, stream, args)                                     \
  switch (storage) {                                                                           \
    case kFloat32: KERNEL<float><<<grid, kThreads, 0, stream>>>(args); break;                  \
    case kBFloat16: KERNEL<bf16_bits><<<grid, kThreads, 0, stream>>>(args); break;             \
    case kFloat16: KERNEL<fp16_bits><<<grid, kThreads, 0, stream>>>(args); break;              \
    default: return cudaErrorInvalidValue;                                                     \
  }

cudaError_t launch_grad_pass(const GradArgs& a, int64_t programs, int storage, cudaStream_t stream) {
  if (programs <= 0 || programs > INT32_MAX) return cudaErrorInvalidValue;
  ALSALS_DISPATCH(grad_pass_kernel, storage, unsigned(programs), stream, a)
  return cudaGetLastError();
}

cudaError_t launch_step_pass(const StepArgs& a, int64_t programs, int storage, cudaStream_t stream) {
  if (programs <= 0 || programs > INT32_MAX) return cudaErrorInvalidValue;
  ALSALS_DISPATCH(step_pass_kernel, storage, unsigned(programs), stream, a)
  return cudaGetLastError();
}

cudaError_t launch_move_pass(const MoveArgs& a, int64_t programs, int storage, cudaStream_t stream) {
  if (programs <= 0 || programs > INT32_MAX) return cudaErrorInvalidValue;
  ALSALS_DISPATCH(move_pass_kernel, storage, unsigned(programs), stream, a)
  return cudaGetLastError();
}

cudaError_t launch_verdict(const VerdictArgs& a, cudaStream_t stream) {
  verdict_kernel<<<1, 32, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t reset_ticket(unsigned int* ticket, cudaStream_t stream) {
  return cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream);
}
#endif  // !ALSALS_HOST_EMULATION

}  // namespace alsals
