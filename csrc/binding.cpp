// fastsam._C: the torch.library operators of the native backends (fastsam/backends/native.py).
//
// This file validates (every TORCH_CHECK names the operator, the list, the index and what was
// expected), builds the segment tables and dispatches to the kernel files; it does no
// arithmetic. Operators, in namespace `fastsam`, one per pass of DESIGN.md §2:
//
//   norm     S = Σ |T·g|^q over every tensor → out (0-d); per-segment partials and filter
//            norms go to `scratch` (fp64, grown when too small, reused by `perturb`)
//   perturb  w_old ← w; w ← w + e (rho per group); skipped ← 1 if S is not finite
//   restore  w ← w_old
//   sgd      w ← SGD(w_old, g, momentum_buffer)           hp = [lr, momentum, dampening, wd]
//   adam     w ← Adam/AdamW(w_old, g, m, v, vmax)           hp as elementwise.h AdamScalars
//
// The mutation annotations ("Tensor(a!)[]") tell the dispatcher and torch.compile which lists
// each operator writes. Kernels: CPU always; CUDA when built with FASTSAM_WITH_CUDA.
#include <Python.h>
#include <torch/library.h>

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#ifdef FASTSAM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <list>
#include <mutex>
#endif

#include "elementwise.h"
#include "kernels.h"

namespace fastsam {
namespace {

// Elements per segment of the element-wise passes. CPU: 32768 (128 KiB of fp32 per stream,
// a few segments per thread even for small models). CUDA: one 8192-element segment per
// block, as the Triton backend (bench/results/triton-tuning-*).
constexpr int64_t kCpuChunk = 1 << 15;
constexpr int64_t kCudaChunk = 1 << 13;

using Lists = std::vector<std::pair<const char*, at::TensorList>>;

DType storage_code(const char* op, const char* what, size_t i, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "fastsam.", op, ": ", what, "[", i, "] has dtype ", t.scalar_type(),
                       "; the native backends take float32, float64, float16 and bfloat16");
  }
}

// Every list has as many tensors as the first (the parameters); tensor i of each list is
// dense, contiguous, on the parameters' device, with parameter i's dtype and shape.
void check_lists(const char* op, const Lists& lists) {
  const auto& [w_name, w] = lists.front();
  for (const auto& [name, list] : lists) {
    TORCH_CHECK_VALUE(list.size() == w.size(), "fastsam.", op, ": ", name, " has ", list.size(),
                      " tensors but ", w_name, " has ", w.size());
  }
  if (w.empty()) return;
  const c10::Device device = w[0].device();
  for (size_t i = 0; i < w.size(); ++i) {
    storage_code(op, w_name, i, w[i]);
    for (const auto& [name, list] : lists) {
      const at::Tensor& t = list[i];
      TORCH_CHECK_VALUE(t.defined(), "fastsam.", op, ": ", name, "[", i, "] is undefined");
      TORCH_CHECK_VALUE(t.layout() == at::kStrided, "fastsam.", op, ": ", name, "[", i,
                        "] has layout ", t.layout(), "; only dense (strided) tensors");
      TORCH_CHECK_VALUE(t.device() == device, "fastsam.", op, ": ", name, "[", i, "] is on ",
                        t.device(), " but ", w_name, "[0] is on ", device);
      TORCH_CHECK_TYPE(t.scalar_type() == w[i].scalar_type(), "fastsam.", op, ": ", name, "[", i,
                       "] has dtype ", t.scalar_type(), " but ", w_name, "[", i, "] has ",
                       w[i].scalar_type());
      TORCH_CHECK_VALUE(t.sizes() == w[i].sizes(), "fastsam.", op, ": ", name, "[", i,
                        "] has shape ", t.sizes(), " but ", w_name, "[", i, "] has ",
                        w[i].sizes());
      TORCH_CHECK_VALUE(t.is_contiguous(), "fastsam.", op, ": ", name, "[", i,
                        "] is not contiguous (strides ", t.strides(),
                        "); make it contiguous or use backend='torch'");
    }
  }
}

void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t,
                         const at::TensorList& w, int64_t min_numel) {
  TORCH_CHECK_VALUE(t.defined() && t.layout() == at::kStrided && t.is_contiguous(), "fastsam.",
                    op, ": ", name, " must be a dense contiguous tensor");
  TORCH_CHECK_VALUE(t.numel() >= min_numel, "fastsam.", op, ": ", name, " has ", t.numel(),
                    " elements, needs ", min_numel);
  if (!w.empty()) {
    TORCH_CHECK_VALUE(t.device() == w[0].device(), "fastsam.", op, ": ", name, " is on ",
                      t.device(), " but the parameters are on ", w[0].device());
  }
}

// Per-tensor options of the perturbation passes, from the per-group lists.
struct PerTensor {
  std::vector<int64_t> mode, group;
  std::vector<double> eta;
};

PerTensor expand_groups(const char* op, at::TensorList params, at::IntArrayRef sizes,
                        at::IntArrayRef modes, at::ArrayRef<double> etas) {
  TORCH_CHECK_VALUE(sizes.size() == modes.size() && sizes.size() == etas.size(), "fastsam.", op,
                    ": group_sizes, group_modes and group_etas differ in length (", sizes.size(),
                    ", ", modes.size(), ", ", etas.size(), ")");
  PerTensor out;
  for (size_t k = 0; k < sizes.size(); ++k) {
    TORCH_CHECK_VALUE(modes[k] >= kPlain && modes[k] <= kFilter, "fastsam.", op,
                      ": group_modes[", k, "] = ", modes[k], " (0 plain, 1 element, 2 filter)");
    TORCH_CHECK_VALUE(sizes[k] >= 0, "fastsam.", op, ": group_sizes[", k, "] is negative");
    for (int64_t j = 0; j < sizes[k]; ++j) {
      const size_t i = out.mode.size();
      TORCH_CHECK_VALUE(i < params.size(), "fastsam.", op, ": group_sizes add up to more than ",
                        params.size(), " tensors");
      const bool filter_1d = modes[k] == kFilter && params[i].dim() < 2;  // 1-D: element-wise
      out.mode.push_back(filter_1d ? kElement : modes[k]);
      out.group.push_back(static_cast<int64_t>(k));
      out.eta.push_back(etas[k]);
    }
  }
  TORCH_CHECK_VALUE(out.mode.size() == params.size(), "fastsam.", op, ": group_sizes add up to ",
                    out.mode.size(), " but there are ", params.size(), " tensors");
  return out;
}

// The segment table of one launch (one storage dtype), in host memory.
struct HostTable {
  DType dtype;
  std::vector<size_t> index;  // position of each table tensor in the caller's lists
  std::vector<int64_t> seg, addr, mode, group;
  std::vector<double> eta;

  int64_t n_segments() const { return static_cast<int64_t>(seg.size() / 3); }
  Table view() const {
    return {dtype,       static_cast<int64_t>(index.size()), n_segments(), seg.data(),
            addr.data(), mode.data(),                        eta.data(),   group.data()};
  }
};

// Non-empty tensors split by dtype (one table each, in order of first appearance), cut into
// `chunk`-element segments; a filter-mode tensor is cut into its filters (rows along dim 0).
std::vector<HostTable> build_tables(const Lists& lists, const PerTensor* options, int64_t chunk) {
  std::vector<HostTable> tables;
  at::TensorList w = lists.front().second;
  for (size_t i = 0; i < w.size(); ++i) {
    const int64_t n = w[i].numel();
    if (n == 0) continue;
    const DType dtype = storage_code("table", "params", i, w[i]);
    HostTable* tab = nullptr;
    for (auto& candidate : tables) {
      if (candidate.dtype == dtype) tab = &candidate;
    }
    if (tab == nullptr) tab = &tables.emplace_back(HostTable{dtype});
    const int64_t t = static_cast<int64_t>(tab->index.size());
    tab->index.push_back(i);
    const int64_t mode = options ? options->mode[i] : kPlain;
    const int64_t len = mode == kFilter ? n / w[i].size(0) : chunk;
    for (int64_t start = 0; start < n; start += len) {
      tab->seg.insert(tab->seg.end(), {t, start, std::min(len, n - start)});
    }
    if (options) {
      tab->mode.push_back(mode);
      tab->group.push_back(options->group[i]);
      tab->eta.push_back(options->eta[i]);
    }
  }
  for (auto& tab : tables) {
    const size_t n = tab.index.size();
    tab.addr.resize(lists.size() * n);
    for (size_t r = 0; r < lists.size(); ++r) {
      for (size_t k = 0; k < n; ++k) {
        tab.addr[r * n + k] = reinterpret_cast<int64_t>(lists[r].second[tab.index[k]].data_ptr());
      }
    }
  }
  return tables;
}

int64_t total_segments(const std::vector<HostTable>& tables) {
  int64_t n = 0;
  for (const auto& tab : tables) n += tab.n_segments();
  return n;
}

int qmode_of(double q) { return q == 2.0 ? kQ2 : q == 1.0 ? kQ1 : kQAny; }

void check_exponents(const char* op, double q) {
  TORCH_CHECK_VALUE(q >= 1.0, "fastsam.", op, ": q = ", q, " must be >= 1 (q is the dual of p > 1)");
}

// Scratch (fp64): [0, n) per-segment partials, [n, 2n) filter norms. Grown, never shrunk.
void check_scratch(const char* op, at::Tensor& scratch, at::TensorList w, int64_t n, bool grow) {
  check_scalar_tensor(op, "scratch", scratch, w, 0);
  TORCH_CHECK_TYPE(scratch.scalar_type() == at::kDouble, "fastsam.", op,
                   ": scratch must be float64, got ", scratch.scalar_type());
  if (scratch.numel() < 2 * n) {
    TORCH_CHECK_VALUE(grow, "fastsam.", op, ": scratch holds ", scratch.numel(),
                      " values but these tensors need ", 2 * n,
                      "; call norm over the same tensors first");
    scratch.resize_({2 * n});
  }
}

void check_norm_out(const char* op, const char* name, const at::Tensor& t, at::TensorList w) {
  check_scalar_tensor(op, name, t, w, 1);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastsam.",
                   op, ": ", name, " must be float32 or float64, got ", t.scalar_type());
}

void check_hp(const char* op, const at::Tensor& hp, at::TensorList w, int64_t n) {
  check_scalar_tensor(op, "hp", hp, w, n);
  TORCH_CHECK_TYPE(hp.scalar_type() == at::kDouble, "fastsam.", op, ": hp must be float64, got ",
                   hp.scalar_type());
}

// ------------------------------------------------------------------------------------------
// CPU

void norm_cpu(at::TensorList params, at::TensorList grads, at::IntArrayRef group_sizes,
              at::IntArrayRef group_modes, at::ArrayRef<double> group_etas, double q,
              at::Tensor& out, at::Tensor& scratch) {
  const Lists lists{{"params", params}, {"grads", grads}};
  check_lists("norm", lists);
  check_exponents("norm", q);
  check_norm_out("norm", "out", out, params);
  const PerTensor options = expand_groups("norm", params, group_sizes, group_modes, group_etas);
  const auto tables = build_tables(lists, &options, kCpuChunk);
  const int64_t n = total_segments(tables);
  check_scratch("norm", scratch, params, n, /*grow=*/true);
  double* partials = scratch.data_ptr<double>();
  int64_t offset = 0;
  for (const auto& tab : tables) {
    cpu::norm_partials(tab.view(), {qmode_of(q), q, partials + offset, partials + n + offset});
    offset += tab.n_segments();
  }
  out.fill_(cpu::sum_partials(partials, n));
}

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList w_old,
                 at::IntArrayRef group_sizes, at::IntArrayRef group_modes,
                 at::ArrayRef<double> group_etas, at::ArrayRef<double> group_rhos,
                 const at::Tensor& norm_sum, const at::Tensor& scratch, double q, double p,
                 double eps, at::Tensor& skipped) {
  const Lists lists{{"params", params}, {"grads", grads}, {"w_old", w_old}};
  check_lists("perturb", lists);
  check_exponents("perturb", q);
  check_norm_out("perturb", "norm_sum", norm_sum, params);
  check_scalar_tensor("perturb", "skipped", skipped, params, 1);
  TORCH_CHECK_TYPE(skipped.scalar_type() == at::kFloat, "fastsam.perturb: skipped must be float32");
  TORCH_CHECK_VALUE(group_rhos.size() == group_sizes.size(), "fastsam.perturb: ",
                    group_rhos.size(), " rho values for ", group_sizes.size(), " groups");
  const PerTensor options =
      expand_groups("perturb", params, group_sizes, group_modes, group_etas);
  const auto tables = build_tables(lists, &options, kCpuChunk);
  const int64_t n = total_segments(tables);
  at::Tensor scratch_ = scratch;
  check_scratch("perturb", scratch_, params, n, /*grow=*/false);
  const double* row_T = scratch.data_ptr<double>() + n;
  PerturbArgs args{qmode_of(q),
                   q,
                   std::isinf(p) ? 0.0 : 1.0 / p,
                   eps,
                   group_rhos.data(),
                   row_T,
                   norm_sum.data_ptr(),
                   norm_sum.scalar_type() == at::kDouble,
                   skipped.data_ptr<float>()};
  *args.skipped = 0.0f;  // no tensors: nothing skipped; each launch below sets it
  for (const auto& tab : tables) {
    args.row_T = row_T;
    cpu::perturb(tab.view(), args);
    row_T += tab.n_segments();
  }
}

void restore_cpu(at::TensorList params, at::TensorList w_old) {
  const Lists lists{{"params", params}, {"w_old", w_old}};
  check_lists("restore", lists);
  for (const auto& tab : build_tables(lists, nullptr, kCpuChunk)) cpu::restore(tab.view());
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList w_old,
             at::TensorList momentum_buffers, const at::Tensor& hp, bool nesterov, bool maximize,
             bool fresh) {
  const bool has_momentum = !momentum_buffers.empty();
  Lists lists{{"params", params}, {"grads", grads}, {"w_old", w_old}};
  if (has_momentum) lists.emplace_back("momentum_buffers", momentum_buffers);
  check_lists("sgd", lists);
  check_hp("sgd", hp, params, 4);
  TORCH_CHECK_VALUE(hp.device().is_cpu(), "fastsam.sgd: hp must be on the cpu for cpu tensors");
  const SgdArgs args{hp.data_ptr<double>(), has_momentum, fresh, nesterov, maximize};
  for (const auto& tab : build_tables(lists, nullptr, kCpuChunk)) cpu::sgd(tab.view(), args);
}

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList w_old,
              at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              const at::Tensor& hp, bool decoupled, bool amsgrad, bool maximize) {
  Lists lists{{"params", params},
              {"grads", grads},
              {"w_old", w_old},
              {"exp_avgs", exp_avgs},
              {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) lists.emplace_back("max_exp_avg_sqs", max_exp_avg_sqs);
  check_lists("adam", lists);
  check_hp("adam", hp, params, 8);
  TORCH_CHECK_VALUE(hp.device().is_cpu(), "fastsam.adam: hp must be on the cpu for cpu tensors");
  const AdamArgs args{hp.data_ptr<double>(), decoupled, amsgrad, maximize};
  for (const auto& tab : build_tables(lists, nullptr, kCpuChunk)) cpu::adam(tab.view(), args);
}

}  // namespace
}  // namespace fastsam

TORCH_LIBRARY(fastsam, m) {
  m.def(
      "norm(Tensor[] params, Tensor[] grads, int[] group_sizes, int[] group_modes, "
      "float[] group_etas, float q, Tensor(a!) out, Tensor(b!) scratch) -> ()");
  m.def(
      "perturb(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] w_old, int[] group_sizes, "
      "int[] group_modes, float[] group_etas, float[] group_rhos, Tensor norm_sum, "
      "Tensor scratch, float q, float p, float eps, Tensor(c!) skipped) -> ()");
  m.def("restore(Tensor(a!)[] params, Tensor[] w_old) -> ()");
  m.def(
      "sgd(Tensor(a!)[] params, Tensor[] grads, Tensor[] w_old, Tensor(b!)[] momentum_buffers, "
      "Tensor hp, bool nesterov, bool maximize, bool fresh) -> ()");
  m.def(
      "adam(Tensor(a!)[] params, Tensor[] grads, Tensor[] w_old, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor hp, bool decoupled, "
      "bool amsgrad, bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("norm", &fastsam::norm_cpu);
  m.impl("perturb", &fastsam::perturb_cpu);
  m.impl("restore", &fastsam::restore_cpu);
  m.impl("sgd", &fastsam::sgd_cpu);
  m.impl("adam", &fastsam::adam_cpu);
}

// A plain extension module: importing fastsam._C registers the operators above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastsam's native operators", -1,
                               nullptr};
  return PyModule_Create(&module);
}
