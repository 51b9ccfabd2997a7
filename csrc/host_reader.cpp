// alsals_fused._host: the per-step host work of the driver in C++: the parameter plan's gradient
// read (GradReader), the integration checks' gradient marks (GradMarks) and the CPU
// random-number snapshots of the line search (CpuRngState).
//
// Every step the plan must learn where this step's gradients are (with set_to_none they are new
// tensors) and that nothing it relies on changed: each parameter's storage, shape and layout,
// and each gradient's existence, shape, dtype, device and layout.  In Python that is several
// torch method calls per tensor plus a Python object created for every gradient, about 0.8 us
// per tensor right after a backward (benchmarks/hot_path.py); here it is a pointer walk over
// the tensors (0.1-0.3 us per tensor on cold caches), and no Python object is created.
//
// GradReader(params, dest_address, dest_stride) records each parameter's address, sizes,
// strides, dtype and device.  read() checks them against the parameters' current state and
// writes each gradient's address into dest[i * dest_stride] (a host table column the backend
// owns: the grad column of the Triton and CUDA backends' host table); it returns
//   -1  something differs, or a gradient is missing or not a dense tensor: the caller runs its
//       Python path, which reports the problem or rebuilds the plan (dest may be partly
//       rewritten, always with current gradient addresses);
//   bit 0 set: at least one address differed from dest's (the column was rewritten);
//   bit 1 set: some gradient address is not 16-byte aligned.
// The parameters are held as Python objects and unpacked at every read, so a parameter whose
// tensor was swapped (torch.utils.swap_tensors, as nn.Module.to may do) is seen as it is now.
// Right after a backward the tensors' metadata is out of cache, and each parameter is a chain of
// dependent loads (Python object, TensorImpl, autograd meta, gradient TensorImpl, storages): a
// plain walk pays every cache miss in turn, about 5x the same walk on warm caches here.  read()
// therefore first walks the lists one level of that chain at a time, prefetching the next
// level, so that the misses of all tensors are in flight together.
//
// GradMarks(params) watches a few parameters' gradients for the integration checks (a backward
// run outside step(), or inside the closure): record() notes which gradient tensor each holds
// and its version counter (a weak reference: a gradient set to None is freed as usual);
// changed() returns 1 if some parameter holds a gradient that is not the recorded one or was
// written in place since (or nothing was recorded yet), 0 if every gradient is as recorded, -1
// if no parameter has a gradient.  The same answers as the Python marks in
// integrations/_api.py, in one call instead of a Python loop three times per step.
//
// CpuRngState: a reusable snapshot of the default CPU generator (the Mersenne Twister engine and
// the cached normal samples, everything torch.get_rng_state() encodes), copied in place under
// the generator's mutex.  torch.get_rng_state() allocates a 5 KB tensor instead, and the first
// allocation of that size after zero_grad() or a backward pays glibc's consolidation of the many
// small chunks they freed (about 20 us at 148 tensors and 80 us at 580 here, twice per searching
// step); capture() and restore() allocate nothing.
//
// Torch's own headers only: no CUDA, no kernel code.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

namespace py = pybind11;

namespace {

// Strides that matter: size-1 dimensions may carry any stride (as Python's _layout).
bool same_layout(c10::IntArrayRef sizes, c10::IntArrayRef strides, c10::IntArrayRef expected) {
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] != 1 && strides[d] != expected[d]) return false;
  }
  return true;
}

// The parameters a helper watches, as Python tensors with a reference each (so that a swapped
// tensor is seen as it is now).  Every element is checked before any reference is taken, so a
// refused list holds none; released by Python's destructor, with the GIL held.
class HeldTensors {
 public:
  HeldTensors(const py::list& params, const char* owner) {
    for (const auto& handle : params) {
      TORCH_CHECK_TYPE(THPVariable_Check(handle.ptr()), owner, ": params must be tensors");
    }
    for (const auto& handle : params) {
      Py_INCREF(handle.ptr());
      objects_.push_back(handle.ptr());
    }
  }
  HeldTensors(const HeldTensors&) = delete;
  HeldTensors& operator=(const HeldTensors&) = delete;
  ~HeldTensors() {
    for (PyObject* obj : objects_) Py_DECREF(obj);
  }

  size_t size() const { return objects_.size(); }
  const PyObject* object(size_t i) const { return objects_[i]; }
  const at::Tensor& operator[](size_t i) const { return THPVariable_Unpack(objects_[i]); }

 private:
  std::vector<PyObject*> objects_;
};

// Metadata of one object: a TensorImpl spans several cache lines (sizes, strides, storage,
// autograd meta); the other objects on the chain are read in their first lines.
template <int Lines>
inline void prefetch_lines(const void* address) {
  const char* base = static_cast<const char*>(address);
  for (int line = 0; line < Lines; ++line) __builtin_prefetch(base + 64 * line);
}

class GradReader {
 public:
  GradReader(const py::list& params, int64_t dest_address, int64_t dest_stride)
      : params_(checked_dense(params), "GradReader"), dest_(reinterpret_cast<int64_t*>(dest_address)),
        dest_stride_(dest_stride) {
    TORCH_CHECK_VALUE(dest_address != 0 && dest_address % alignof(int64_t) == 0,
                      "GradReader: dest_address must be an aligned int64 address");
    TORCH_CHECK_VALUE(dest_stride >= 1, "GradReader: dest_stride must be at least 1");
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i];
      addresses_.push_back(p.data_ptr());
      shape_start_.push_back(shapes_.size());
      shapes_.insert(shapes_.end(), p.sizes().begin(), p.sizes().end());
      shapes_.insert(shapes_.end(), p.strides().begin(), p.strides().end());
      dtypes_.push_back(p.scalar_type());
      devices_.push_back(p.device());
    }
    shape_start_.push_back(shapes_.size());
  }

  int64_t read() {
    prefetch_chains();
    bool changed = false;
    bool misaligned = false;
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i];
      const size_t ndim = (shape_start_[i + 1] - shape_start_[i]) / 2;   // as recorded
      const int64_t* shape = shapes_.data() + shape_start_[i];
      const c10::IntArrayRef sizes(shape, ndim), strides(shape + ndim, ndim);
      if (!p.has_storage() || p.data_ptr() != addresses_[i] || p.sizes() != sizes ||
          !same_layout(p.sizes(), p.strides(), strides)) {
        return -1;
      }
      const at::Tensor& g = p.unsafeGetTensorImpl()->grad();   // (p.grad() also asks is_leaf())
      if (!g.defined() || g.layout() != at::kStrided || !g.has_storage() || g.sizes() != p.sizes() ||
          g.scalar_type() != dtypes_[i] || g.device() != devices_[i] ||
          !same_layout(g.sizes(), g.strides(), strides)) {
        return -1;
      }
      const auto address = reinterpret_cast<int64_t>(g.data_ptr());
      int64_t& slot = dest_[static_cast<int64_t>(i) * dest_stride_];
      if (slot != address) {
        slot = address;
        changed = true;
      }
      misaligned |= (address & 15) != 0;
    }
    return (changed ? 1 : 0) | (misaligned ? 2 : 0);
  }

  size_t size() const { return params_.size(); }

 private:
  // Level by level (see the file's comment): its loads only find the next level's addresses to
  // prefetch; the checks in read() rely on none of them.
  void prefetch_chains() {
    const size_t n = params_.size();
    for (size_t i = 0; i < n; ++i) prefetch_lines<1>(params_.object(i));
    for (size_t i = 0; i < n; ++i) {
      c10::TensorImpl* impl = params_[i].unsafeGetTensorImpl();
      impls_[i] = impl;
      prefetch_lines<4>(impl);
    }
    for (size_t i = 0; i < n; ++i) {
      const c10::TensorImpl* impl = impls_[i];
      c10::AutogradMetaInterface* meta = impl->autograd_meta();
      metas_[i] = meta;
      if (meta != nullptr) prefetch_lines<2>(meta);
      if (const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl()) prefetch_lines<1>(storage);
    }
    for (size_t i = 0; i < n; ++i) {
      c10::AutogradMetaInterface* meta = metas_[i];
      impls_[i] = meta != nullptr ? meta->grad().unsafeGetTensorImpl() : nullptr;
      if (impls_[i] != nullptr) prefetch_lines<4>(impls_[i]);
    }
    for (size_t i = 0; i < n; ++i) {
      const c10::TensorImpl* grad = impls_[i];
      if (grad == nullptr) continue;
      if (const c10::StorageImpl* storage = grad->unsafe_storage().unsafeGetStorageImpl()) prefetch_lines<1>(storage);
    }
  }

  static const py::list& checked_dense(const py::list& params) {
    for (const auto& handle : params) {
      PyObject* obj = handle.ptr();
      TORCH_CHECK_TYPE(THPVariable_Check(obj), "GradReader: params must be tensors");
      const at::Tensor& p = THPVariable_Unpack(obj);
      TORCH_CHECK_VALUE(p.layout() == at::kStrided && p.has_storage(),
                        "GradReader: params must be dense tensors with storage");
    }
    return params;
  }

  HeldTensors params_;
  std::vector<const void*> addresses_;
  // Each parameter's sizes then strides, in one array (one stream of reads, no per-tensor
  // allocation to miss on); parameter i's start at shape_start_[i], and one start past the end.
  std::vector<int64_t> shapes_;
  std::vector<size_t> shape_start_;
  std::vector<at::ScalarType> dtypes_;
  std::vector<at::Device> devices_;
  int64_t* dest_;
  int64_t dest_stride_;
  std::vector<c10::TensorImpl*> impls_ = std::vector<c10::TensorImpl*>(params_.size());   // prefetch scratch
  std::vector<c10::AutogradMetaInterface*> metas_ = std::vector<c10::AutogradMetaInterface*>(params_.size());
};

class GradMarks {
 public:
  explicit GradMarks(const py::list& params) : params_(params, "GradMarks") {}

  void record() {
    std::vector<Mark> marks;              // swapped in whole: a throw (e.g. an inference-mode
    marks.reserve(params_.size());        // gradient has no version counter) keeps the old record
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& g = params_[i].grad();
      if (g.defined()) {
        const int64_t version = g._version();
        marks.push_back({c10::weak_intrusive_ptr<c10::TensorImpl>(g.getIntrusivePtr()), version});
      } else {
        marks.push_back({std::nullopt, 0});
      }
    }
    marks_.swap(marks);
    recorded_ = true;
  }

  int64_t changed() const {
    bool any_grad = false;
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& g = params_[i].grad();
      if (!g.defined()) continue;              // set to None since: nothing can accumulate into it
      any_grad = true;
      if (!recorded_) return 1;
      const Mark& mark = marks_[i];
      if (!mark.grad) return 1;                // no gradient when recorded
      const auto held = mark.grad->lock();
      if (!held || held.get() != g.unsafeGetTensorImpl() || g._version() != mark.version) return 1;
    }
    return any_grad ? 0 : -1;
  }

 private:
  struct Mark {
    std::optional<c10::weak_intrusive_ptr<c10::TensorImpl>> grad;
    int64_t version;
  };
  HeldTensors params_;
  std::vector<Mark> marks_;
  bool recorded_ = false;
};

class CpuRngState {
 public:
  void capture() {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    auto* impl = at::check_generator<at::CPUGeneratorImpl>(gen);
    engine_ = impl->engine();
    float_sample_ = impl->next_float_normal_sample();
    double_sample_ = impl->next_double_normal_sample();
    captured_ = true;
  }

  void restore() const {
    TORCH_CHECK(captured_, "CpuRngState: restore() before capture()");
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    auto* impl = at::check_generator<at::CPUGeneratorImpl>(gen);
    impl->set_engine(engine_);
    impl->set_next_float_normal_sample(float_sample_);
    impl->set_next_double_normal_sample(double_sample_);
  }

 private:
  at::mt19937 engine_;
  std::optional<float> float_sample_;
  std::optional<double> double_sample_;
  bool captured_ = false;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "alsals_fused host helpers: the plan's per-step gradient read, gradient marks, CPU RNG snapshots";
  py::class_<GradReader>(m, "GradReader")
      .def(py::init<const py::list&, int64_t, int64_t>(), py::arg("params"), py::arg("dest_address"),
           py::arg("dest_stride"))
      .def("read", &GradReader::read)
      .def("__len__", &GradReader::size);
  py::class_<GradMarks>(m, "GradMarks")
      .def(py::init<const py::list&>(), py::arg("params"))
      .def("record", &GradMarks::record)
      .def("changed", &GradMarks::changed);
  py::class_<CpuRngState>(m, "CpuRngState")
      .def(py::init<>())
      .def("capture", &CpuRngState::capture)
      .def("restore", &CpuRngState::restore);
}
