// The kernel arguments and launchers of the CUDA passes, shared by kernels.cu, the torch glue
// (alsals_ops.cpp) and the host emulation test (csrc/tests/test_emulated_kernels.cpp).
//
// One design with the Triton backend (backends/base.py, triton_kernels/kernels.py):
//   table  int64 [T, TABLE_COLS], one row per tensor (TableCol: w, g, m, v, backup, numel,
//          the weight decay's float64 bits, spare), built once per bucket by the Python backend;
//   sched  int32 [P, 2], one row per program: (table row, chunk index in that tensor).  A chunk
//          is CHUNK elements; empty tensors get no program; a row of -1 is a program with no
//          work (an all-empty pass still runs one program, so its finisher runs).
// A pass over several buckets (one per dtype) is one launch per bucket; the launches share one
// partials buffer (offset by program_base) and one ticket, so the very last program of the pass
// runs the finisher: the fp64 sum of every partial in a fixed order, whichever program was last.
// Element offsets are int64 (tensors above 2**31 elements).
#pragma once

#include <stdint.h>

#if defined(ALSALS_HOST_EMULATION)
typedef int cudaError_t;  // the host emulation test needs no CUDA headers
typedef void* cudaStream_t;
#else
#include <cuda_runtime_api.h>
#endif

#include "alsals_layout.h"

namespace alsals {

constexpr int kPassThreads = 256;                 // threads per program (CUDA block)
static_assert(CHUNK % (kPassThreads * 8) == 0, "a chunk is whole 16-byte groups per thread");

// Element types (parameters, and the loss tensors the finishers read).
enum ScalarCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// Common to the three passes; one per launch (bucket).
struct PassArgs {
  const int64_t* table;     // [T, TABLE_COLS]
  const int32_t* sched;     // [programs, 2]
  double* ctl;              // [CTL_SIZE]
  float* partials;          // [width * total_programs], fp32, one (or two) per program
  unsigned int* ticket;     // 0 between passes; the last program of the pass resets it
  double* out;              // finish == 0: the sums go here (float64[width]); else null
  int64_t program_base;     // programs of this pass's earlier launches
  int64_t total_programs;   // programs of all launches of this pass
  int32_t finish;           // 1: the finisher writes ctl
};

struct GradArgs {
  PassArgs p;
  const void* loss0;        // 0-dim device tensor (L0)
  int32_t loss_code;        // ScalarCode of loss0
  double max_grad_norm;     // < 0: no clipping
};

struct StepArgs {
  PassArgs p;
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction1, bias_correction2;
  float eta;
  double smoothing;         // the EMA factor of h and s, for the step finisher
  int32_t searching, search_dir, write_backup;
};

struct MoveArgs {
  PassArgs p;
  float eps, bias_correction1, bias_correction2;
  float src_eta, dst_eta, eta_delta;   // eta_delta = dst_eta - src_eta, in double on the host
  double src_eta64;                    // for 1 - src_eta*wd, in double on the device
  int32_t src_dir, dst_dir, from_backup;
  int32_t only_if;                     // the ctl slot that gates the move (Ctl::FALLBACK or Ctl::UNDO), -1: none
};

struct VerdictArgs {
  double* ctl;
  const void* loss_try;
  int32_t loss_code;
  double eta, c, smoothing;
  double* out;              // [VERDICT_SIZE]
};

// Launchers (kernels.cu): `programs` = rows of this launch's sched; storage = ScalarCode of the
// bucket's params.  They return the launch status (cudaGetLastError) and never synchronize.
cudaError_t launch_grad_pass(const GradArgs& a, int64_t programs, int storage, cudaStream_t stream);
cudaError_t launch_step_pass(const StepArgs& a, int64_t programs, int storage, cudaStream_t stream);
cudaError_t launch_move_pass(const MoveArgs& a, int64_t programs, int storage, cudaStream_t stream);
cudaError_t launch_verdict(const VerdictArgs& a, cudaStream_t stream);
// Queues ticket = 0 on the stream (the error path of launch_buckets).
cudaError_t reset_ticket(unsigned int* ticket, cudaStream_t stream);

// One pass: `launch(i)` launches bucket i, in order.  Every launch of a pass draws from the same
// ticket, so a launch that fails after earlier ones were queued leaves their tickets drawn with
// no last program to reset the counter, and every later pass would misidentify its last program.
// On an error the ticket is therefore reset on the stream, ordered after the launches already
// queued (`reset()`), before the error is returned.  Returns the first error (0 if none) and
// the index of the bucket whose launch failed.
struct BucketLaunches {
  cudaError_t err;
  size_t failed;
};
template <typename Launch, typename Reset>
BucketLaunches launch_buckets(size_t n, Launch&& launch, Reset&& reset) {
  for (size_t i = 0; i < n; ++i) {
    const cudaError_t err = launch(i);
    if (err != cudaError_t(0)) {
      if (i > 0) reset();
      return {err, i};
    }
  }
  return {cudaError_t(0), n};
}

}  // namespace alsals
