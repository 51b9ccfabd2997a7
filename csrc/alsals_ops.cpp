// PyTorch glue of the ALSALS CUDA backend: argument checks, the multi-tensor launch tables, the
// op registrations (torch.ops.alsals_fused.*) and a few Python helpers.  The kernels live in
// kernels.cu, which includes no torch header; this is the only file that does.
//
// Nothing here reads device memory on the host: the device flags (ctrl) are read by the kernels,
// outputs and scratch come from the caching allocator, and all launches go to the current stream
// of the tensors' device (under a device guard).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "alsals_math.h"
#include "launch_table.h"

namespace alsals {
namespace {

// Blocks per launch; a test hook lowers it to exercise tensors split across launches.
int64_t g_max_blocks_per_launch = int64_t(1) << 30;

int storage_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "alsals_fused: the CUDA backend supports float32, bfloat16 and float16 "
                       "parameters, got ", t, " (the optimizer routes float64 to the foreach backend)");
  }
  return -1;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "alsals_fused: launching ", what, " failed: ", cudaGetErrorString(err));
}

// Same element order in memory: both dense (no gaps, no overlap) with equal strides.  Other
// layouts raise NotImplementedError, which the Python backend answers by using foreach.
void check_layout(const at::Tensor& x, const at::Tensor& ref, const char* list, size_t i) {
  // Both contiguous (strides of size-1 dims may differ), or both dense in the same order.
  const bool ok = (x.is_contiguous() && ref.is_contiguous()) ||
                  (x.is_non_overlapping_and_dense() && ref.is_non_overlapping_and_dense() &&
                   x.strides() == ref.strides());
  TORCH_CHECK_NOT_IMPLEMENTED(ok,
      "alsals_fused: ", list, "[", i, "] is not dense with the same strides as its parameter "
      "(shape ", x.sizes(), ", strides ", x.strides(), " vs ", ref.strides(), "); the CUDA kernels "
      "need that layout");
}

void check_ctrl(const at::Tensor& ctrl, const at::Device& device) {
  TORCH_CHECK_VALUE(ctrl.device() == device && ctrl.scalar_type() == at::kFloat && ctrl.numel() == 3 &&
                    ctrl.is_contiguous(),
                    "alsals_fused: ctrl must be a contiguous float32 tensor of 3 elements on ", device,
                    "; got ", ctrl.scalar_type(), " of shape ", ctrl.sizes(), " on ", ctrl.device());
}

// Checks one bucket (one device and dtype) and returns its items.  `lists` says which of
// grads/m/v/backups are read.
struct BucketArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, backups;
  c10::ArrayRef<double> weight_decays;
  bool use_grads = false, use_moments = false, use_backups = false, use_weight_decays = false;
};

std::vector<Item> gather(const BucketArgs& a, const at::Tensor* ctrl, at::Device* device_out,
                         int* storage_out, int64_t (&elem_size)[kNumLists]) {
  const at::TensorList& lead = a.use_moments || !a.use_grads ? a.params : a.grads;
  TORCH_CHECK_VALUE(!lead.empty(), "alsals_fused: empty tensor list");
  const size_t n = lead.size();
  auto same_len = [&](at::TensorList l, bool used, const char* name) {
    TORCH_CHECK_VALUE(!used || l.size() == n, "alsals_fused: ", name, " has ", l.size(),
                      " tensors, expected ", n);
  };
  same_len(a.grads, a.use_grads, "grads");
  same_len(a.exp_avgs, a.use_moments, "exp_avgs");
  same_len(a.exp_avg_sqs, a.use_moments, "exp_avg_sqs");
  same_len(a.backups, a.use_backups, "backups");
  TORCH_CHECK_VALUE(!a.use_weight_decays || a.weight_decays.size() == n, "alsals_fused: weight_decays has ",
                    a.weight_decays.size(), " entries, expected ", n);

  const at::Tensor& first = lead[0];
  const at::Device device = first.device();
  TORCH_CHECK_VALUE(device.is_cuda(), "alsals_fused: the CUDA backend needs CUDA tensors; got one on ", device);
  const at::ScalarType dtype = first.scalar_type();
  const int storage = storage_of(dtype);
  if (ctrl) check_ctrl(*ctrl, device);

  const int64_t psize = int64_t(c10::elementSize(dtype));
  const int64_t sizes[kNumLists] = {psize, psize, 4, 4, psize};
  std::copy(sizes, sizes + kNumLists, elem_size);

  std::vector<Item> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = lead[i];
    TORCH_CHECK_VALUE(ref.device() == device && ref.scalar_type() == dtype,
                      "alsals_fused: a bucket holds tensors of one device and dtype; tensor ", i, " is ",
                      ref.scalar_type(), " on ", ref.device(), ", tensor 0 is ", dtype, " on ", device);
    Item it{};
    it.numel = ref.numel();
    it.weight_decay = a.use_weight_decays ? float(a.weight_decays[i]) : 0.0f;
    it.shrink = 1.0f;
    auto take = [&](at::TensorList l, int list, at::ScalarType want, const char* name) {
      const at::Tensor& x = l[i];
      TORCH_CHECK_VALUE(x.device() == device && x.scalar_type() == want && x.numel() == it.numel,
                        "alsals_fused: ", name, "[", i, "] must be ", want, " on ", device, " with ", it.numel,
                        " elements; got ", x.scalar_type(), " on ", x.device(), " with ", x.numel());
      if (it.numel > 0) check_layout(x, ref, name, i);
      it.ptr[list] = it.numel > 0 ? x.data_ptr() : nullptr;
    };
    if (a.use_moments || !a.use_grads) take(a.params, kListParam, dtype, "params");
    if (a.use_grads) take(a.grads, kListGrad, dtype, "grads");
    if (a.use_moments) {
      take(a.exp_avgs, kListExpAvg, at::kFloat, "exp_avgs");
      take(a.exp_avg_sqs, kListExpAvgSq, at::kFloat, "exp_avg_sqs");
    }
    if (a.use_backups) take(a.backups, kListBackup, dtype, "backups");
    it.aligned = true;
    for (int l = 0; l < kNumLists; ++l)
      if (it.ptr[l] && reinterpret_cast<uintptr_t>(it.ptr[l]) % 16 != 0) it.aligned = false;
    items.push_back(it);
  }
  *device_out = device;
  *storage_out = storage;
  return items;
}

// ---- the ops --------------------------------------------------------------------------------
at::Tensor grad_sumsq(at::TensorList grads) {
  BucketArgs a;
  a.grads = grads;
  a.use_grads = true;
  at::Device device = at::kCPU;
  int storage = 0;
  int64_t elem_size[kNumLists];
  std::vector<Item> items = gather(a, nullptr, &device, &storage, elem_size);
  const c10::cuda::CUDAGuard guard(device);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  const int64_t blocks = total_blocks(items);
  if (blocks == 0) return at::zeros({}, f64);
  at::Tensor partials = at::empty({blocks}, f64);
  at::Tensor out = at::empty({}, f64);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  PassScalars s{};
  s.partials = partials.data_ptr<double>();
  for_each_launch(items, elem_size, g_max_blocks_per_launch, [&](const LaunchTable& t) {
    check_launch(launch_grad_sumsq(t, s, storage, stream), "grad_sumsq_kernel");
  });
  check_launch(launch_sum_partials(partials.data_ptr<double>(), blocks, 1, nullptr, out.data_ptr<double>(), stream),
               "sum_partials_kernel");
  return out;
}

at::Tensor step_pass(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList backups, c10::ArrayRef<double> weight_decays,
                     const at::Tensor& ctrl, double eta, double beta1, double beta2, double eps,
                     double bias_correction1, double bias_correction2, bool momentum_search, bool searching,
                     bool write_backup) {
  BucketArgs a{params, grads, exp_avgs, exp_avg_sqs, backups, weight_decays};
  a.use_grads = a.use_moments = a.use_weight_decays = true;
  a.use_backups = write_backup;
  at::Device device = at::kCPU;
  int storage = 0;
  int64_t elem_size[kNumLists];
  std::vector<Item> items = gather(a, &ctrl, &device, &storage, elem_size);
  const c10::cuda::CUDAGuard guard(device);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  const int64_t blocks = total_blocks(items);
  at::Tensor dots = searching ? (blocks == 0 ? at::zeros({2}, f64) : at::empty({2}, f64)) : at::empty({0}, f64);
  if (blocks == 0) return dots;
  at::Tensor partials = searching ? at::empty({2 * blocks}, f64) : at::Tensor();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();

  PassScalars s{};
  s.ctrl = ctrl.data_ptr<float>();
  s.partials = searching ? partials.data_ptr<double>() : nullptr;
  s.beta1 = float(beta1);
  s.one_minus_beta1 = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.eps = float(eps);
  s.bias_correction1 = float(bias_correction1);
  s.bias_correction2 = float(bias_correction2);
  s.eta = float(eta);
  s.momentum_search = momentum_search;
  s.searching = searching;
  s.write_backup = write_backup;
  for_each_launch(items, elem_size, g_max_blocks_per_launch, [&](const LaunchTable& t) {
    check_launch(launch_step_pass(t, s, storage, stream), "step_pass_kernel");
  });
  if (searching)
    check_launch(launch_sum_partials(s.partials, blocks, 2, s.ctrl, dots.data_ptr<double>(), stream),
                 "sum_partials_kernel");
  return dots;
}

void move_pass(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList backups, c10::ArrayRef<double> weight_decays, const at::Tensor& ctrl, double eps,
               double bias_correction1, double bias_correction2, bool momentum_search, double src_eta,
               int64_t src_dir, double dst_eta, int64_t dst_dir, bool from_backup, bool only_if_fallback) {
  TORCH_CHECK_VALUE(src_dir >= kMomentum && src_dir <= kUpdate && dst_dir >= kMomentum && dst_dir <= kUpdate,
                    "alsals_fused: directions are 0..3 (MOMENTUM, GRAD, SEARCH, UPDATE); got ", src_dir,
                    " and ", dst_dir);
  BucketArgs a{params, grads, exp_avgs, exp_avg_sqs, backups, weight_decays};
  a.use_grads = a.use_moments = a.use_weight_decays = true;
  a.use_backups = from_backup;
  at::Device device = at::kCPU;
  int storage = 0;
  int64_t elem_size[kNumLists];
  std::vector<Item> items = gather(a, &ctrl, &device, &storage, elem_size);
  if (!from_backup)  // in place: w0 = (w + src_eta*d_src) / (1 - src_eta*wd), the divisor in double
    for (size_t i = 0; i < items.size(); ++i)
      items[i].shrink = weight_decays[i] != 0.0 ? float(1.0 - src_eta * weight_decays[i]) : 1.0f;
  const c10::cuda::CUDAGuard guard(device);
  if (total_blocks(items) == 0) return;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();

  PassScalars s{};
  s.ctrl = ctrl.data_ptr<float>();
  s.eps = float(eps);
  s.bias_correction1 = float(bias_correction1);
  s.bias_correction2 = float(bias_correction2);
  s.src_eta = float(src_eta);
  s.dst_eta = float(dst_eta);
  s.eta_delta = float(dst_eta - src_eta);
  s.src_dir = int32_t(src_dir);
  s.dst_dir = int32_t(dst_dir);
  s.momentum_search = momentum_search;
  s.from_backup = from_backup;
  s.only_if_fallback = only_if_fallback;
  for_each_launch(items, elem_size, g_max_blocks_per_launch, [&](const LaunchTable& t) {
    check_launch(launch_move_pass(t, s, storage, stream), "move_pass_kernel");
  });
}

}  // namespace
}  // namespace alsals

// Schemas: mutated lists carry alias annotations so that graph tools know what is written.
TORCH_LIBRARY(alsals_fused, m) {
  m.def("grad_sumsq(Tensor[] grads) -> Tensor");
  m.def("step_pass(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] backups, float[] weight_decays, Tensor ctrl, float eta, float beta1, float beta2, "
        "float eps, float bias_correction1, float bias_correction2, bool momentum_search, bool searching, "
        "bool write_backup) -> Tensor");
  m.def("move_pass(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
        "Tensor[] backups, float[] weight_decays, Tensor ctrl, float eps, float bias_correction1, "
        "float bias_correction2, bool momentum_search, float src_eta, int src_dir, float dst_eta, int dst_dir, "
        "bool from_backup, bool only_if_fallback) -> ()");
}

TORCH_LIBRARY_IMPL(alsals_fused, CUDA, m) {
  m.impl("grad_sumsq", &alsals::grad_sumsq);
  m.impl("step_pass", &alsals::step_pass);
  m.impl("move_pass", &alsals::move_pass);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ALSALS fused CUDA passes; the ops are torch.ops.alsals_fused.{grad_sumsq,step_pass,move_pass}";
  m.def("registered_ops", []() { return std::vector<std::string>{"grad_sumsq", "step_pass", "move_pass"}; },
        "Names of the ops this module registers under torch.ops.alsals_fused");
  m.def("kernel_names", []() {
    return std::vector<std::string>(std::begin(alsals::kKernelNames), std::end(alsals::kKernelNames));
  });
  m.attr("CHUNK") = alsals::kChunk;
  m.attr("MAX_SEGMENTS") = alsals::kMaxSegments;
  m.def("_set_max_blocks_per_launch", [](int64_t n) {
    const int64_t old = alsals::g_max_blocks_per_launch;
    alsals::g_max_blocks_per_launch = n;
    return old;
  }, "Test hook: blocks per launch (returns the previous value); small values split tensors across launches");
}
