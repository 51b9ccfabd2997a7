// The multi-tensor launch metadata shared by the kernels (.cu) and the host glue (.cpp).
//
// Design: the tensors of a bucket are cut into tiles of kChunk elements; one CUDA block handles
// one tile.  A launch covers up to kMaxSegments "segments" (a tensor, or a run of whole tiles of
// one, with its pointers already advanced to the segment start), passed by value in the kernel
// arguments (so no host-to-device copy and no sync).  first_block[] is the prefix sum of the
// segments' tile counts; a block finds its segment by binary search over it.  Sizes and offsets
// are int64; empty tensors never become segments.  Segments start on tile boundaries, so a
// segment is "aligned" (16-byte vector path) iff all its base pointers are 16-byte aligned.
// Per-block partial sums go to partials[partial_base + blockIdx.x], so every block of every
// launch of one call owns a fixed slot, and the cleanup kernel sums them in a fixed order.
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#if defined(ALSALS_HOST_EMULATION)
typedef int cudaError_t;  // the host emulation test needs no CUDA headers
typedef void* cudaStream_t;
#else
#include <cuda_runtime_api.h>
#endif

namespace alsals {

constexpr int kChunk = 8192;         // elements per block (tile)
constexpr int kBlockThreads = 256;
constexpr int kMaxSegments = 48;     // keeps the kernel arguments well under 4 KiB
constexpr int kCleanupThreads = 512;

// The lists a pass may touch (unused ones are null).
enum List : int { kListParam = 0, kListGrad = 1, kListExpAvg = 2, kListExpAvgSq = 3, kListBackup = 4, kNumLists = 5 };

struct LaunchTable {
  void* ptr[kNumLists][kMaxSegments];
  int64_t numel[kMaxSegments];
  int32_t first_block[kMaxSegments + 1];
  float weight_decay[kMaxSegments];
  float shrink[kMaxSegments];        // move pass, in place: 1 - src_eta*wd (host, in double)
  uint8_t aligned[kMaxSegments];
  int32_t n_segments;
  int64_t partial_base;
};

// Host scalars of one pass, by value.  ctrl and partials are device pointers.
struct PassScalars {
  const float* ctrl;       // [GRAD_SCALE, SKIP, FALLBACK]
  double* partials;        // step: 2 per block (searching only); sumsq: 1 per block
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float eps, bias_correction1, bias_correction2;
  float eta;               // step pass: the candidate's eta
  float src_eta, dst_eta, eta_delta;  // move pass; eta_delta = dst_eta - src_eta (double on host)
  int32_t src_dir, dst_dir;
  int32_t momentum_search, searching, write_backup, from_backup, only_if_fallback;
};

static_assert(sizeof(LaunchTable) + sizeof(PassScalars) < 4000, "kernel arguments must stay < 4 KiB");

// Storage type codes for the launchers.
enum StorageType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// ---- host side: cutting a bucket into launch tables (plain C++, used by alsals_ops.cpp and the
// host emulation test) ----------------------------------------------------------------------
// One tensor of the bucket: its element count and base pointers per list (null: unused).
struct Item {
  int64_t numel;
  void* ptr[kNumLists];
  float weight_decay;
  float shrink;
  bool aligned;
};

inline int64_t tiles_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

inline int64_t total_blocks(const std::vector<Item>& items) {
  int64_t n = 0;
  for (const Item& it : items) n += tiles_of(it.numel);
  return n;
}

// Cuts the items into launch tables (<= kMaxSegments segments and <= max_blocks_per_launch
// blocks each) and calls launch(table) for each.  A tensor bigger than the block budget is split
// at tile boundaries (so alignment is kept); empty tensors are skipped.
template <class Launch>
void for_each_launch(const std::vector<Item>& items, const int64_t (&elem_size)[kNumLists],
                     int64_t max_blocks_per_launch, Launch&& launch) {
  LaunchTable t;
  memset(&t, 0, sizeof(t));
  int64_t base = 0, blocks = 0;
  int n = 0;
  const int64_t cap = std::max<int64_t>(1, std::min<int64_t>(max_blocks_per_launch, INT32_MAX));
  auto flush = [&]() {
    if (n == 0) return;
    t.n_segments = n;
    t.first_block[n] = int32_t(blocks);
    t.partial_base = base;
    launch(t);
    base += blocks;
    blocks = 0;
    n = 0;
  };
  for (const Item& it : items) {
    const int64_t tiles = tiles_of(it.numel);
    for (int64_t tile0 = 0; tile0 < tiles;) {
      if (n == kMaxSegments || blocks == cap) flush();
      const int64_t take = std::min(tiles - tile0, cap - blocks);
      const int64_t offset = tile0 * kChunk;
      for (int l = 0; l < kNumLists; ++l)
        t.ptr[l][n] = it.ptr[l] ? static_cast<char*>(it.ptr[l]) + offset * elem_size[l] : nullptr;
      t.numel[n] = std::min(take * kChunk, it.numel - offset);
      t.first_block[n] = int32_t(blocks);
      t.weight_decay[n] = it.weight_decay;
      t.shrink[n] = it.shrink;
      t.aligned[n] = it.aligned ? 1 : 0;
      blocks += take;
      tile0 += take;
      ++n;
    }
  }
  flush();
}

// Launchers (csrc/kernels.cu).  grid = table.first_block[n_segments] blocks; they return the
// launch status (cudaGetLastError) and never synchronize.
cudaError_t launch_grad_sumsq(const LaunchTable& table, const PassScalars& s, int storage,
                              cudaStream_t stream);
cudaError_t launch_step_pass(const LaunchTable& table, const PassScalars& s, int storage,
                             cudaStream_t stream);
cudaError_t launch_move_pass(const LaunchTable& table, const PassScalars& s, int storage,
                             cudaStream_t stream);
// Sums n_blocks partials of `width` components (block-major) in a fixed order, in fp64, into
// out[width].  With ctrl non-null and ctrl[SKIP] set, writes zeros.
cudaError_t launch_sum_partials(const double* partials, int64_t n_blocks, int width,
                                const float* ctrl, double* out, cudaStream_t stream);

// Names of the kernels, for the resource-usage report of the CI script.
const char* const kKernelNames[] = {"grad_sumsq_kernel", "step_pass_kernel", "move_pass_kernel",
                                    "sum_partials_kernel"};

}  // namespace alsals
