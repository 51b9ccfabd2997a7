// PyTorch glue of the ALSALS CUDA backend (contract v2, backends/base.py): argument checks, the
// op registrations (torch.ops.alsals_fused.*) and the module's constants.  The kernels live in
// kernels.cu, which includes no torch header; this is the only file that does.
//
// Each op is one pass over a list of buckets: per bucket, a device table and schedule that the
// Python backend built once (backends/fused_tables.py); so a call converts a handful of tensors,
// not every parameter.  The tables hold raw addresses: the Python backend keeps the tensors they
// point to alive and refreshes the gradient column when gradients move.  Nothing here reads
// device memory on the host; all launches go to the current stream of ctl's device.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>
#include <vector>

#include "alsals_layout.h"
#include "passes.h"

namespace alsals {
namespace {

// Before a pass: an error already pending on this thread comes from earlier asynchronous work
// (another kernel, a copy), so it is reported as that, not as this pass's launch failing.
void check_no_pending_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "alsals_fused: a CUDA error from earlier asynchronous work was pending "
              "before launching ", what, " (not caused by this launch): ", cudaGetErrorString(err));
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "alsals_fused: launching ", what, " failed: ", cudaGetErrorString(err));
}

void check_ctl(const at::Tensor& ctl) {
  TORCH_CHECK_VALUE(ctl.is_cuda() && ctl.scalar_type() == at::kDouble && ctl.numel() == CTL_SIZE &&
                    ctl.is_contiguous(),
                    "alsals_fused: ctl must be a contiguous float64 CUDA tensor of ", CTL_SIZE,
                    " elements; got ", ctl.scalar_type(), " of shape ", ctl.sizes(), " on ", ctl.device());
}

void check_on(const at::Tensor& x, const at::Device& device, const char* name) {
  TORCH_CHECK_VALUE(x.device() == device, "alsals_fused: ", name, " is on ", x.device(),
                    "; ctl is on ", device);
}

int scalar_code(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    case at::kDouble: return kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "alsals_fused: ", name, " must be float32, float64, bfloat16 or float16; got ", t);
  }
  return -1;
}

void check_scalar_tensor(const at::Tensor& x, const at::Device& device, const char* name) {
  check_on(x, device, name);
  TORCH_CHECK_VALUE(x.numel() == 1, "alsals_fused: ", name, " must hold one element; got shape ", x.sizes());
}

// The buckets of one pass: per bucket its table, schedule and parameter storage type.
struct Buckets {
  std::vector<const int64_t*> tables;
  std::vector<const int32_t*> scheds;
  std::vector<int64_t> programs;
  std::vector<int> storages;
  int64_t total = 0;
};

Buckets gather(at::TensorList tables, at::TensorList scheds, c10::ArrayRef<int64_t> storages,
               const at::Device& device) {
  const size_t n = tables.size();
  TORCH_CHECK_VALUE(n > 0 && scheds.size() == n && storages.size() == n,
                    "alsals_fused: one table, schedule and storage code per bucket; got ", tables.size(), ", ",
                    scheds.size(), " and ", storages.size());
  Buckets b;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tables[i];
    const at::Tensor& s = scheds[i];
    check_on(t, device, "table");
    check_on(s, device, "sched");
    TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() == 2 && t.size(1) == TABLE_COLS && t.is_contiguous(),
                      "alsals_fused: table ", i, " must be a contiguous int64 [T, ", TABLE_COLS, "] tensor; got ",
                      t.scalar_type(), " ", t.sizes());
    TORCH_CHECK_VALUE(s.scalar_type() == at::kInt && s.dim() == 2 && s.size(1) == 2 && s.size(0) > 0 &&
                      s.is_contiguous(),
                      "alsals_fused: sched ", i, " must be a contiguous int32 [P >= 1, 2] tensor; got ",
                      s.scalar_type(), " ", s.sizes());
    TORCH_CHECK_VALUE(storages[i] == kFloat32 || storages[i] == kBFloat16 || storages[i] == kFloat16,
                      "alsals_fused: the CUDA kernels take float32, bfloat16 and float16 parameters "
                      "(storage codes 0, 1, 2); got code ", storages[i],
                      " (the optimizer routes float64 to the foreach backend)");
    b.tables.push_back(t.data_ptr<int64_t>());
    b.scheds.push_back(s.data_ptr<int32_t>());
    b.programs.push_back(s.size(0));
    b.storages.push_back(int(storages[i]));
    b.total += s.size(0);
  }
  TORCH_CHECK_VALUE(b.total <= INT32_MAX, "alsals_fused: ", b.total, " programs in one pass (at most 2**31-1)");
  return b;
}

// The shared scratch of the summing passes: fp32 partials and the tickets.
void check_scratch(const at::Tensor& partials, const at::Tensor& tickets, const at::Device& device,
                   int64_t needed) {
  check_on(partials, device, "partials");
  check_on(tickets, device, "tickets");
  TORCH_CHECK_VALUE(partials.scalar_type() == at::kFloat && partials.is_contiguous() && partials.numel() >= needed,
                    "alsals_fused: partials must be a contiguous float32 tensor of at least ", needed,
                    " elements; got ", partials.scalar_type(), " ", partials.sizes());
  TORCH_CHECK_VALUE(tickets.scalar_type() == at::kInt && tickets.is_contiguous() && tickets.numel() >= 2,
                    "alsals_fused: tickets must be a contiguous int32 tensor of at least 2 zeros");
}

double* check_out(const c10::optional<at::Tensor>& out, bool finish, int64_t width, const at::Device& device) {
  if (finish) return nullptr;
  TORCH_CHECK_VALUE(out.has_value() && out->scalar_type() == at::kDouble && out->numel() == width &&
                    out->is_contiguous(),
                    "alsals_fused: finish=False needs out, a contiguous float64 tensor of ", width, " elements");
  check_on(*out, device, "out");
  return out->data_ptr<double>();
}

PassArgs pass_args(const Buckets& b, const at::Tensor& ctl, float* partials, unsigned int* ticket, double* out,
                   bool finish) {
  PassArgs p{};
  p.ctl = ctl.data_ptr<double>();
  p.partials = partials;
  p.ticket = ticket;
  p.out = out;
  p.total_programs = b.total;
  p.finish = finish ? 1 : 0;
  return p;
}

// The launches of one pass, one per bucket (launch_buckets: the ticket is reset if one fails).
template <typename Args, typename Launch>
void launch_pass(const Buckets& b, Args& a, Launch launch, cudaStream_t stream, const char* what) {
  check_no_pending_error(what);
  const BucketLaunches r = launch_buckets(
      b.tables.size(),
      [&](size_t i) {
        a.p.table = b.tables[i];
        a.p.sched = b.scheds[i];
        const cudaError_t err = launch(a, b.programs[i], b.storages[i], stream);
        a.p.program_base += b.programs[i];
        return err;
      },
      [&] {
        if (a.p.ticket != nullptr) (void)reset_ticket(a.p.ticket, stream);
      });
  check_launch(r.err, what);
}

// ---- the ops --------------------------------------------------------------------------------
void grad_pass(at::TensorList tables, at::TensorList scheds, c10::ArrayRef<int64_t> storages,
               at::Tensor& partials, at::Tensor& tickets, at::Tensor& ctl, const at::Tensor& loss0,
               double max_grad_norm, bool finish, const c10::optional<at::Tensor>& out) {
  check_ctl(ctl);
  const at::Device device = ctl.device();
  const Buckets b = gather(tables, scheds, storages, device);
  check_scratch(partials, tickets, device, b.total);
  check_scalar_tensor(loss0, device, "loss0");
  double* out_ptr = check_out(out, finish, 1, device);
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  GradArgs a{};
  a.p = pass_args(b, ctl, partials.data_ptr<float>(), reinterpret_cast<unsigned int*>(tickets.data_ptr<int32_t>()),
                  out_ptr, finish);
  a.loss0 = loss0.data_ptr();
  a.loss_code = scalar_code(loss0.scalar_type(), "loss0");
  a.max_grad_norm = max_grad_norm;
  launch_pass(b, a, launch_grad_pass, stream, "grad_pass_kernel");
}

void step_pass(at::TensorList tables, at::TensorList scheds, c10::ArrayRef<int64_t> storages, at::Tensor& partials,
               at::Tensor& tickets, at::Tensor& ctl, double eta, double beta1, double beta2, double eps,
               double bias_correction1, double bias_correction2, double smoothing, int64_t search_dir,
               bool searching, bool write_backup, bool finish, const c10::optional<at::Tensor>& out) {
  check_ctl(ctl);
  TORCH_CHECK_VALUE(search_dir == Dir::MOMENTUM || search_dir == Dir::GRAD || search_dir == Dir::UPDATE,
                    "alsals_fused: search_dir is a Dir (0 MOMENTUM, 1 GRAD, 2 UPDATE); got ", search_dir);
  const at::Device device = ctl.device();
  const Buckets b = gather(tables, scheds, storages, device);
  check_scratch(partials, tickets, device, searching ? 2 * b.total : 0);
  double* out_ptr = searching ? check_out(out, finish, 2, device) : nullptr;
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  StepArgs a{};
  a.p = pass_args(b, ctl, partials.data_ptr<float>(),
                  reinterpret_cast<unsigned int*>(tickets.data_ptr<int32_t>()) + 1, out_ptr, finish);
  a.beta1 = float(beta1);
  a.one_minus_beta1 = float(1.0 - beta1);
  a.beta2 = float(beta2);
  a.one_minus_beta2 = float(1.0 - beta2);
  a.eps = float(eps);
  a.bias_correction1 = float(bias_correction1);
  a.bias_correction2 = float(bias_correction2);
  a.eta = float(eta);
  a.smoothing = smoothing;
  a.searching = searching;
  a.search_dir = int32_t(search_dir);
  a.write_backup = write_backup;
  launch_pass(b, a, launch_step_pass, stream, "step_pass_kernel");
}

void move_pass(at::TensorList tables, at::TensorList scheds, c10::ArrayRef<int64_t> storages, const at::Tensor& ctl,
               double eps, double bias_correction1, double bias_correction2, double src_eta, int64_t src_dir,
               double dst_eta, int64_t dst_dir, bool from_backup, int64_t only_if) {
  check_ctl(ctl);
  auto valid = [](int64_t d) { return d == Dir::MOMENTUM || d == Dir::GRAD || d == Dir::UPDATE; };
  TORCH_CHECK_VALUE(valid(src_dir) && valid(dst_dir),
                    "alsals_fused: directions are Dir values (0 MOMENTUM, 1 GRAD, 2 UPDATE); got ", src_dir,
                    " and ", dst_dir);
  TORCH_CHECK_VALUE(only_if == -1 || only_if == Ctl::FALLBACK || only_if == Ctl::UNDO,
                    "alsals_fused: only_if is the ctl slot that gates the move (", int(Ctl::FALLBACK),
                    " FALLBACK, ", int(Ctl::UNDO), " UNDO) or -1 for none; got ", only_if);
  const at::Device device = ctl.device();
  const Buckets b = gather(tables, scheds, storages, device);
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  MoveArgs a{};
  a.p = pass_args(b, ctl, nullptr, nullptr, nullptr, false);
  a.eps = float(eps);
  a.bias_correction1 = float(bias_correction1);
  a.bias_correction2 = float(bias_correction2);
  a.src_eta = float(src_eta);
  a.dst_eta = float(dst_eta);
  a.eta_delta = float(dst_eta - src_eta);
  a.src_eta64 = src_eta;
  a.src_dir = int32_t(src_dir);
  a.dst_dir = int32_t(dst_dir);
  a.from_backup = from_backup;
  a.only_if = int32_t(only_if);
  launch_pass(b, a, launch_move_pass, stream, "move_pass_kernel");
}

void verdict(at::Tensor& ctl, const at::Tensor& loss_try, double eta, double c, double smoothing, at::Tensor& out) {
  check_ctl(ctl);
  const at::Device device = ctl.device();
  check_scalar_tensor(loss_try, device, "loss_try");
  check_on(out, device, "out");
  TORCH_CHECK_VALUE(out.scalar_type() == at::kDouble && out.numel() == VERDICT_SIZE && out.is_contiguous(),
                    "alsals_fused: out must be a contiguous float64 tensor of ", VERDICT_SIZE, " elements");
  const c10::cuda::CUDAGuard guard(device);
  VerdictArgs a{};
  a.ctl = ctl.data_ptr<double>();
  a.loss_try = loss_try.data_ptr();
  a.loss_code = scalar_code(loss_try.scalar_type(), "loss_try");
  a.eta = eta;
  a.c = c;
  a.smoothing = smoothing;
  a.out = out.data_ptr<double>();
  check_no_pending_error("verdict_kernel");
  check_launch(launch_verdict(a, at::cuda::getCurrentCUDAStream(device.index()).stream()), "verdict_kernel");
}

}  // namespace
}  // namespace alsals

// Schemas: what the kernels write through ctl, the scratch and out carries alias annotations;
// the parameters and moments are written through the tables' addresses (not visible to graph
// tools: these ops are for eager use by the optimizer).
TORCH_LIBRARY(alsals_fused, m) {
  m.def("grad_pass(Tensor[] tables, Tensor[] scheds, int[] storages, Tensor(a!) partials, Tensor(b!) tickets, "
        "Tensor(c!) ctl, Tensor loss0, float max_grad_norm, bool finish, Tensor(d!)? out) -> ()");
  m.def("step_pass(Tensor[] tables, Tensor[] scheds, int[] storages, Tensor(a!) partials, Tensor(b!) tickets, "
        "Tensor(c!) ctl, float eta, float beta1, float beta2, float eps, float bias_correction1, "
        "float bias_correction2, float smoothing, int search_dir, bool searching, bool write_backup, bool finish, "
        "Tensor(d!)? out) -> ()");
  m.def("move_pass(Tensor[] tables, Tensor[] scheds, int[] storages, Tensor ctl, float eps, float bias_correction1, "
        "float bias_correction2, float src_eta, int src_dir, float dst_eta, int dst_dir, bool from_backup, "
        "int only_if) -> ()");
  m.def("verdict(Tensor(a!) ctl, Tensor loss_try, float eta, float c, float smoothing, Tensor(b!) out) -> ()");
}

TORCH_LIBRARY_IMPL(alsals_fused, CUDA, m) {
  m.impl("grad_pass", &alsals::grad_pass);
  m.impl("step_pass", &alsals::step_pass);
  m.impl("move_pass", &alsals::move_pass);
  m.impl("verdict", &alsals::verdict);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ALSALS fused CUDA passes; the ops are torch.ops.alsals_fused.{grad_pass,step_pass,move_pass,verdict}";
  m.def("registered_ops", []() { return std::vector<std::string>{"grad_pass", "step_pass", "move_pass", "verdict"}; },
        "Names of the ops this module registers under torch.ops.alsals_fused");
  // The layout compiled in (csrc/alsals_layout.h, generated from base.py): the backend checks it.
  m.attr("CHUNK") = alsals::CHUNK;
  m.attr("CTL_SIZE") = alsals::CTL_SIZE;
  m.attr("VERDICT_SIZE") = alsals::VERDICT_SIZE;
  m.attr("TABLE_COLS") = alsals::TABLE_COLS;
  m.attr("LAYOUT_DIGEST") = std::string(alsals::LAYOUT_DIGEST);
  m.attr("THREADS") = alsals::kPassThreads;
}
