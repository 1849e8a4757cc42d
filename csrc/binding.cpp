// fastsam._C: the torch.library operators of the native backends (fastsam/backends/native.py).
//
// This file validates (every TORCH_CHECK names the operator, the list, the index and what was
// expected), builds the segment tables and dispatches to the kernel files; it does no
// arithmetic. Operators, in namespace `fastsam`, one per pass of DESIGN.md §2:
//
//   norm     S = Σ |T·g|^q over every tensor → out (0-d); per-segment partials and filter
//            norms go to `scratch` (fp64, grown when too small, reused by `perturb`)
//   perturb  w_old ← w; w ← w + e (rho per group, from `group_rhos`: float64, on the
//            parameters' device); skipped ← 1 if S is not finite; keep ← g when `keep` is
//            given (GSAM)
//   restore  w ← w_old
//   sgd      w ← SGD(w_old, g, momentum_buffer)           hp = [lr, momentum, dampening, wd]
//   adam     w ← Adam/AdamW(w_old, g, m, v, vmax)           hp as elementwise.h AdamScalars
//            (both: with `average`, the averaged weights follow the new w in the same pass,
//            fastsam.functional.Average; its weight is one more hp entry; with `skip`, a
//            one-element float32 flag read by the kernels, a non-zero flag makes them write
//            w ← w_old only; adam's `bias`, float64 (n, 2): per-tensor bias corrections)
//   gsam_along  out ← GSAM's along from ⟨g_first, g⟩, ‖g‖², ‖g_first‖² (one reduction;
//            partial sums in `scratch`, fp64, grown when too small)
//   gsam_sums   out[0:3] ← those three sums (sharded parameters all-reduce them first)
//
// sgd and adam take a gradient source optionally (fastsam.functional.GradientSource), by
// grad_mode: 1 first_grads with along and alpha, GSAM's (1 + alpha·along)·g − alpha·g_first;
// 2 first_grads, FreeSAM's stored gradients, used by the update and then replaced by g;
// 3 first_grads with along, LookSAM's g + along·u_v.
//
// The mutation annotations ("Tensor(a!)[]") tell the dispatcher and torch.compile which lists
// each operator writes. Kernels: CPU always; CUDA when built with FASTSAM_WITH_CUDA.
#include <Python.h>
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef FASTSAM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty_like.h>
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

// Error text, built without iostreams. c10::str formats numbers through std::ostream, and in an
// extension built by a toolchain that links part of libstdc++ into it (the lent H100 image's
// /opt/gcc, 2026-11-23) formatting an integer that way crashed the process (SIGSEGV in the
// num_put facet) instead of raising. TORCH_CHECK passes one std::string through untouched.
std::string text(const char* s) { return s; }
std::string text(const std::string& s) { return s; }
template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
std::string text(I v) {
  return std::to_string(v);
}
std::string text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}
std::string text(at::IntArrayRef values) {
  std::string out = "[";
  for (size_t k = 0; k < values.size(); ++k) out += (k ? ", " : "") + std::to_string(values[k]);
  return out + "]";
}
std::string text(c10::Device d) { return d.str(); }
std::string text(c10::DeviceType t) { return c10::DeviceTypeName(t, /*lower_case=*/true); }
std::string text(at::ScalarType t) { return c10::toString(t); }
std::string text(at::Layout l) {
  switch (l) {
    case at::kStrided: return "strided";
    case at::kSparse: return "sparse COO";
    case at::kSparseCsr: return "sparse CSR";
    default: return "layout " + std::to_string(static_cast<int>(l));
  }
}
template <class... A>
std::string msg(const A&... parts) {
  std::string out;
  ((out += text(parts)), ...);
  return out;
}

DType storage_code(const char* op, const char* what, size_t i, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, msg("fastsam.", op, ": ", what, "[", i, "] has dtype ",
                                  t.scalar_type(), "; the native backends take float32, float64, "
                                  "float16 and bfloat16"));
  }
}

// Every list has as many tensors as the first (the parameters); tensor i of each list is
// dense, contiguous, on the parameters' device, with parameter i's dtype and shape.
void check_lists(const char* op, const Lists& lists) {
  const auto& [w_name, w] = lists.front();
  for (const auto& [name, list] : lists) {
    TORCH_CHECK_VALUE(list.size() == w.size(), msg("fastsam.", op, ": ", name, " has ", list.size(),
                      " tensors but ", w_name, " has ", w.size()));
  }
  if (w.empty()) return;
  const c10::Device device = w[0].device();
  for (size_t i = 0; i < w.size(); ++i) {
    storage_code(op, w_name, i, w[i]);
    for (const auto& [name, list] : lists) {
      const at::Tensor& t = list[i];
      TORCH_CHECK_VALUE(t.defined(), msg("fastsam.", op, ": ", name, "[", i, "] is undefined"));
      TORCH_CHECK_VALUE(t.layout() == at::kStrided, msg("fastsam.", op, ": ", name, "[", i,
                        "] has layout ", t.layout(), "; only dense (strided) tensors"));
      TORCH_CHECK_VALUE(t.device() == device, msg("fastsam.", op, ": ", name, "[", i, "] is on ",
                        t.device(), " but ", w_name, "[0] is on ", device));
      TORCH_CHECK_TYPE(t.scalar_type() == w[i].scalar_type(),
                       msg("fastsam.", op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                           " but ", w_name, "[", i, "] has ", w[i].scalar_type()));
      TORCH_CHECK_VALUE(t.sizes() == w[i].sizes(), msg("fastsam.", op, ": ", name, "[", i,
                        "] has shape ", t.sizes(), " but ", w_name, "[", i, "] has ",
                        w[i].sizes()));
      TORCH_CHECK_VALUE(t.is_contiguous(), msg("fastsam.", op, ": ", name, "[", i,
                        "] is not contiguous (strides ", t.strides(),
                        "); make it contiguous or use backend='torch'"));
    }
  }
}

void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t,
                         const at::TensorList& w, int64_t min_numel) {
  TORCH_CHECK_VALUE(t.defined() && t.layout() == at::kStrided && t.is_contiguous(), msg("fastsam.",
                    op, ": ", name, " must be a dense contiguous tensor"));
  TORCH_CHECK_VALUE(t.numel() >= min_numel, msg("fastsam.", op, ": ", name, " has ", t.numel(),
                    " elements, needs ", min_numel));
  if (!w.empty()) {
    TORCH_CHECK_VALUE(t.device() == w[0].device(), msg("fastsam.", op, ": ", name, " is on ",
                      t.device(), " but the parameters are on ", w[0].device()));
  }
}

// Per-tensor options of the perturbation passes, from the per-group lists.
struct PerTensor {
  std::vector<int64_t> mode, group;
  std::vector<double> eta;
};

PerTensor expand_groups(const char* op, at::TensorList params, at::IntArrayRef sizes,
                        at::IntArrayRef modes, at::ArrayRef<double> etas) {
  TORCH_CHECK_VALUE(sizes.size() == modes.size() && sizes.size() == etas.size(), msg("fastsam.", op,
                    ": group_sizes, group_modes and group_etas differ in length (", sizes.size(),
                    ", ", modes.size(), ", ", etas.size(), ")"));
  PerTensor out;
  for (size_t k = 0; k < sizes.size(); ++k) {
    TORCH_CHECK_VALUE(modes[k] >= kPlain && modes[k] <= kOuter, msg("fastsam.", op,
                      ": group_modes[", k, "] = ", modes[k],
                      " (0 plain, 1 element, 2 filter, 3 outer)"));
    TORCH_CHECK_VALUE(sizes[k] >= 0, msg("fastsam.", op, ": group_sizes[", k, "] is negative"));
    for (int64_t j = 0; j < sizes[k]; ++j) {
      const size_t i = out.mode.size();
      TORCH_CHECK_VALUE(i < params.size(), msg("fastsam.", op, ": group_sizes add up to more than ",
                        params.size(), " tensors"));
      const bool filter_1d = modes[k] == kFilter && params[i].dim() < 2;  // 1-D: element-wise
      out.mode.push_back(filter_1d ? kElement : modes[k]);
      out.group.push_back(static_cast<int64_t>(k));
      out.eta.push_back(etas[k]);
    }
  }
  TORCH_CHECK_VALUE(out.mode.size() == params.size(),
                    msg("fastsam.", op, ": group_sizes add up to ", out.mode.size(),
                        " but there are ", params.size(), " tensors"));
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

int qmode_of(double q) { return q == 2.0 ? kQ2 : q == 1.0 ? kQ1 : kQAny; }

void check_exponents(const char* op, double q) {
  TORCH_CHECK_VALUE(q >= 1.0, msg("fastsam.", op, ": q = ", q,
                                  " must be >= 1 (q is the dual of p > 1)"));
}

// A scratch tensor grows onto new storage instead of resizing its own: a CUDA graph captured
// with the old storage reads it at every replay, and fastsam/backends/native.py keeps it alive
// for that graph (a resize would free it under the graph).
void grow_scratch(at::Tensor& scratch, int64_t numel) {
  scratch.set_(at::empty({numel}, scratch.options()));
}

// Scratch (fp64): [0, n) per-segment partials, [n, 2n) filter norms. Grown, never shrunk.
void check_scratch(const char* op, at::Tensor& scratch, at::TensorList w, int64_t n, bool grow) {
  check_scalar_tensor(op, "scratch", scratch, w, 0);
  TORCH_CHECK_TYPE(scratch.scalar_type() == at::kDouble, msg("fastsam.", op,
                   ": scratch must be float64, got ", scratch.scalar_type()));
  if (scratch.numel() < 2 * n) {
    TORCH_CHECK_VALUE(grow, msg("fastsam.", op, ": scratch holds ", scratch.numel(),
                      " values but these tensors need ", 2 * n,
                      "; call norm over the same tensors first"));
    grow_scratch(scratch, 2 * n);
  }
}

void check_norm_out(const char* op, const char* name, const at::Tensor& t, at::TensorList w,
                    int64_t numel = 1) {
  check_scalar_tensor(op, name, t, w, numel);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, msg("fastsam.",
                   op, ": ", name, " must be float32 or float64, got ", t.scalar_type()));
}

void check_hp(const char* op, const at::Tensor& hp, at::TensorList w, int64_t n) {
  check_scalar_tensor(op, "hp", hp, w, n);
  TORCH_CHECK_TYPE(hp.scalar_type() == at::kDouble,
                   msg("fastsam.", op, ": hp must be float64, got ", hp.scalar_type()));
}

// The tables of one operator call as the kernels read them, plus what keeps them alive.
struct Tables {
  std::vector<HostTable> host;
  std::vector<Table> views;  // host pointers (CPU) or device pointers (CUDA)
  int64_t n_segments = 0;
  at::Tensor device_blob;    // CUDA: every table's arrays in one int64 device tensor
  at::Tensor host_blob;      // CUDA: its pinned source (a captured upload reads it at replay)
};
using TablesPtr = std::shared_ptr<Tables>;

TablesPtr host_tables(const Lists& lists, const PerTensor* options, int64_t chunk) {
  auto out = std::make_shared<Tables>();
  out->host = build_tables(lists, options, chunk);
  for (const auto& tab : out->host) {
    out->views.push_back(tab.view());
    out->n_segments += tab.n_segments();
  }
  return out;
}

// Each device runs the passes through the same few calls: `Cpu` and `Cuda` below.
struct Cpu {
  static constexpr c10::DeviceType type = c10::DeviceType::CPU;

  explicit Cpu(c10::Device) {}
  TablesPtr tables(const char*, const Lists& lists, const PerTensor* options) const {
    return host_tables(lists, options, kCpuChunk);
  }
  void norm_partials(const Table& t, const NormArgs& a) const { cpu::norm_partials(t, a); }
  void norm_sum(const double* partials, int64_t n, at::Tensor& out) const {
    out.fill_(cpu::sum_partials(partials, n));
  }
  void perturb(const Table& t, const PerturbArgs& a) const { cpu::perturb(t, a); }
  void restore(const Table& t) const { cpu::restore(t); }
  void sgd(const Table& t, const SgdArgs& a) const { cpu::sgd(t, a); }
  void adam(const Table& t, const AdamArgs& a) const { cpu::adam(t, a); }
  void gsam_partials(const Table& t, double* partials) const { cpu::gsam_partials(t, partials); }
  void gsam_along(const double* partials, int64_t n, double eps, at::Tensor& out) const {
    out.fill_(cpu::gsam_along(partials, n, eps));
  }
  void gsam_sums(const double* partials, int64_t n, at::Tensor& out) const {
    double sums[3];
    cpu::gsam_sums(partials, n, sums);
    if (out.scalar_type() == at::kDouble) {
      std::copy(sums, sums + 3, out.data_ptr<double>());
    } else {
      std::copy(sums, sums + 3, out.data_ptr<float>());
    }
  }
};

#ifdef FASTSAM_WITH_CUDA
// Device copies of the tables, cached: an entry is reused while every address, size, dtype
// and per-tensor option of the call is unchanged, so a steady-state step uploads nothing.
// An entry used while the stream is being captured into a CUDA graph is held for good: the
// graph's kernels read its device copy (and a captured upload its pinned host copy) at every
// replay, long after the cache may have evicted it.
class DeviceTableCache {
 public:
  TablesPtr get(const char* op, const Lists& lists, const PerTensor* options, c10::Device device,
                cudaStream_t stream) {
    std::vector<int64_t> key = make_key(op, lists, options, device);
    std::lock_guard<std::mutex> lock(mutex_);
    TablesPtr tables;
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->first == key) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        tables = entries_.front().second;
        break;
      }
    }
    if (!tables) {
      tables = host_tables(lists, options, kCudaChunk);
      upload(*tables, device);
      entries_.emplace_front(std::move(key), tables);
      if (entries_.size() > kCapacity) entries_.pop_back();
    }
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) == cudaSuccess &&
        status != cudaStreamCaptureStatusNone &&
        std::find(held_.begin(), held_.end(), tables) == held_.end()) {
      held_.push_back(tables);
    }
    return tables;
  }

 private:
  static constexpr size_t kCapacity = 64;

  static std::vector<int64_t> make_key(const char* op, const Lists& lists,
                                       const PerTensor* options, c10::Device device) {
    at::TensorList w = lists.front().second;
    std::vector<int64_t> key{reinterpret_cast<int64_t>(op), device.index(),
                             static_cast<int64_t>(lists.size()),
                             static_cast<int64_t>(w.size())};
    key.reserve(key.size() + w.size() * (lists.size() + 6));
    for (size_t i = 0; i < w.size(); ++i) {
      key.push_back(w[i].numel());
      key.push_back(static_cast<int64_t>(w[i].scalar_type()));
      key.push_back(w[i].dim() > 0 ? w[i].size(0) : 1);
      if (options) {
        int64_t eta_bits;
        std::memcpy(&eta_bits, &options->eta[i], sizeof eta_bits);
        key.insert(key.end(), {options->mode[i], options->group[i], eta_bits});
      }
      for (const auto& [name, list] : lists) {
        key.push_back(reinterpret_cast<int64_t>(list[i].data_ptr()));
      }
    }
    return key;
  }

  // One pinned host buffer holding every table's arrays, copied to the device without
  // waiting; views are re-pointed at the device copy.
  static void upload(Tables& tables, c10::Device device) {
    int64_t total = 0;
    for (const auto& tab : tables.host) {
      total += tab.seg.size() + tab.addr.size() + tab.mode.size() + tab.group.size() +
               tab.eta.size();
    }
    at::Tensor host =
        at::empty({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* cursor = host.data_ptr<int64_t>();
    std::vector<int64_t> offsets;
    auto append = [&](const void* data, size_t count) {
      offsets.push_back(cursor - host.data_ptr<int64_t>());
      std::memcpy(cursor, data, count * sizeof(int64_t));
      cursor += count;
    };
    for (const auto& tab : tables.host) {
      append(tab.seg.data(), tab.seg.size());
      append(tab.addr.data(), tab.addr.size());
      append(tab.mode.data(), tab.mode.size());
      append(tab.group.data(), tab.group.size());
      append(tab.eta.data(), tab.eta.size());  // doubles, bit for bit
    }
    tables.device_blob = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
    tables.host_blob = host;
    const int64_t* base = tables.device_blob.data_ptr<int64_t>();
    for (size_t k = 0; k < tables.host.size(); ++k) {
      Table& v = tables.views[k];
      const int64_t* o = offsets.data() + 5 * k;
      v.seg = base + o[0];
      v.addr = base + o[1];
      v.mode = base + o[2];
      v.group = base + o[3];
      v.eta = reinterpret_cast<const double*>(base + o[4]);
    }
  }

  std::mutex mutex_;
  std::list<std::pair<std::vector<int64_t>, TablesPtr>> entries_;
  std::vector<TablesPtr> held_;  // used during a capture: never released
};

struct Cuda {
  static constexpr c10::DeviceType type = c10::DeviceType::CUDA;

  explicit Cuda(c10::Device device)
      : device(device), guard(device), stream(c10::cuda::getCurrentCUDAStream().stream()) {}
  TablesPtr tables(const char* op, const Lists& lists, const PerTensor* options) const {
    static DeviceTableCache cache;
    return cache.get(op, lists, options, device, stream);
  }
  void norm_partials(const Table& t, const NormArgs& a) const {
    cuda::norm_partials(t, a, stream);
  }
  void norm_sum(const double* partials, int64_t n, at::Tensor& out) const {
    cuda::sum_partials(partials, n, out.data_ptr(), out.scalar_type() == at::kDouble, stream);
  }
  void perturb(const Table& t, const PerturbArgs& a) const { cuda::perturb(t, a, stream); }
  void restore(const Table& t) const { cuda::restore(t, stream); }
  void sgd(const Table& t, const SgdArgs& a) const { cuda::sgd(t, a, stream); }
  void adam(const Table& t, const AdamArgs& a) const { cuda::adam(t, a, stream); }
  void gsam_partials(const Table& t, double* partials) const {
    cuda::gsam_partials(t, partials, stream);
  }
  void gsam_along(const double* partials, int64_t n, double eps, at::Tensor& out) const {
    cuda::gsam_along(partials, n, eps, out.data_ptr(), out.scalar_type() == at::kDouble, stream);
  }
  void gsam_sums(const double* partials, int64_t n, at::Tensor& out) const {
    cuda::gsam_sums(partials, n, out.data_ptr(), out.scalar_type() == at::kDouble, stream);
  }

  c10::Device device;
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
};
#endif  // FASTSAM_WITH_CUDA

c10::Device device_of(at::TensorList w, const at::Tensor& fallback) {
  return w.empty() ? fallback.device() : w[0].device();
}

template <class D>
void check_device(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().type() == D::type, msg("fastsam.", op, ": ", name, " is on ",
                    t.device(), "; this kernel takes ", c10::DeviceType(D::type), " tensors"));
}

// ------------------------------------------------------------------------------------------
// The operators, each written once for every device.

template <class D>
void norm_op(at::TensorList params, at::TensorList grads, at::IntArrayRef group_sizes,
             at::IntArrayRef group_modes, at::ArrayRef<double> group_etas, double q,
             at::Tensor& out, at::Tensor& scratch) {
  const Lists lists{{"params", params}, {"grads", grads}};
  check_lists("norm", lists);
  check_exponents("norm", q);
  check_norm_out("norm", "out", out, params);
  check_device<D>("norm", "out", out);
  const PerTensor options = expand_groups("norm", params, group_sizes, group_modes, group_etas);
  const D dev(device_of(params, out));
  const TablesPtr tables = dev.tables("norm", lists, &options);
  const int64_t n = tables->n_segments;
  check_scratch("norm", scratch, params, n, /*grow=*/true);
  double* partials = scratch.data_ptr<double>();
  int64_t offset = 0;
  for (const Table& t : tables->views) {
    dev.norm_partials(t, {qmode_of(q), q, partials + offset, partials + n + offset});
    offset += t.n_segments;
  }
  dev.norm_sum(partials, n, out);
}

template <class D>
void perturb_op(at::TensorList params, at::TensorList grads, at::TensorList w_old,
                at::IntArrayRef group_sizes, at::IntArrayRef group_modes,
                at::ArrayRef<double> group_etas, const at::Tensor& group_rhos,
                const at::Tensor& norm_sum, const at::Tensor& scratch, double q, double p,
                double eps, at::Tensor& skipped, at::TensorList keep) {
  Lists lists{{"params", params}, {"grads", grads}, {"w_old", w_old}};
  if (!keep.empty()) lists.emplace_back("keep", keep);
  check_lists("perturb", lists);
  check_exponents("perturb", q);
  check_norm_out("perturb", "norm_sum", norm_sum, params);
  check_device<D>("perturb", "norm_sum", norm_sum);
  check_scalar_tensor("perturb", "skipped", skipped, params, 1);
  TORCH_CHECK_TYPE(skipped.scalar_type() == at::kFloat,
                   msg("fastsam.perturb: skipped must be float32"));
  check_scalar_tensor("perturb", "group_rhos", group_rhos, params, group_sizes.size());
  TORCH_CHECK_TYPE(group_rhos.scalar_type() == at::kDouble, msg("fastsam.perturb: group_rhos ",
                   "must be float64, got ", group_rhos.scalar_type()));
  check_device<D>("perturb", "group_rhos", group_rhos);
  const PerTensor options =
      expand_groups("perturb", params, group_sizes, group_modes, group_etas);
  const D dev(device_of(params, norm_sum));
  const TablesPtr tables = dev.tables("perturb", lists, &options);
  const int64_t n = tables->n_segments;
  at::Tensor scratch_ = scratch;
  check_scratch("perturb", scratch_, params, n, /*grow=*/false);
  if (n == 0) {
    skipped.zero_();  // nothing to perturb (a norm over nothing is 0: finite)
    return;
  }
  PerturbArgs args{qmode_of(q),
                   q,
                   std::isinf(p) ? 0.0 : 1.0 / p,
                   eps,
                   group_rhos.data_ptr<double>(),
                   scratch.data_ptr<double>() + n,
                   norm_sum.data_ptr(),
                   norm_sum.scalar_type() == at::kDouble,
                   skipped.data_ptr<float>(),
                   !keep.empty()};
  for (const Table& t : tables->views) {
    dev.perturb(t, args);
    args.row_T += t.n_segments;
  }
}

template <class D>
void restore_op(at::TensorList params, at::TensorList w_old) {
  const Lists lists{{"params", params}, {"w_old", w_old}};
  check_lists("restore", lists);
  if (params.empty()) return;
  const D dev(params[0].device());
  const TablesPtr tables = dev.tables("restore", lists, nullptr);  // alive for the loop
  for (const Table& t : tables->views) dev.restore(t);
}

// The gradient source of an update (kernels.h GradMode `grad_mode`): appends first_grads to
// the lists for every mode but plain: GSAM's first gradients (with along and alpha), FreeSAM's
// stored gradients (which the update reads and then overwrites with g), or LookSAM's
// directions (with their coefficient in along).
template <class D>
DecomposeArgs gradient_source(const char* op, Lists& lists, at::TensorList first_grads,
                              const std::optional<at::Tensor>& along, double alpha,
                              int64_t grad_mode) {
  TORCH_CHECK_VALUE(grad_mode >= kGradPlain && grad_mode <= kGradCorrect,
                    msg("fastsam.", op, ": grad_mode = ", grad_mode,
                        " (0 plain, 1 GSAM decomposition, 2 FreeSAM swap, 3 LookSAM correction)"));
  const int mode = static_cast<int>(grad_mode);
  if (mode == kGradPlain) {
    TORCH_CHECK_VALUE(first_grads.empty(),
                      msg("fastsam.", op, ": first_grads given with grad_mode 0 (plain)"));
    return {kGradPlain, 0, 0.0, nullptr, false};
  }
  TORCH_CHECK_VALUE(!first_grads.empty(), msg("fastsam.", op, ": grad_mode ", grad_mode,
                                              " needs first_grads (the second gradient)"));
  lists.emplace_back("first_grads", first_grads);
  const int role = static_cast<int>(lists.size() - 1);
  if (mode == kGradSwap) return {kGradSwap, role, 0.0, nullptr, false};
  TORCH_CHECK_VALUE(along.has_value(), msg("fastsam.", op, ": grad_mode ", grad_mode,
                                           " needs along (the coefficient, a 0-d tensor)"));
  check_norm_out(op, "along", *along, lists.front().second);
  check_device<D>(op, "along", *along);
  return {mode, role, alpha, along->data_ptr(), along->scalar_type() == at::kDouble};
}

// The role of the averaged weights (kernels.h SgdArgs), appended to the lists when given.
int average_role(Lists& lists, at::TensorList average) {
  if (average.empty()) return -1;
  lists.emplace_back("average", average);
  return static_cast<int>(lists.size() - 1);
}

// The skip flag of a sync-free update (kernels.h SgdArgs.skip): null when not given.
template <class D>
const float* skip_flag(const char* op, const std::optional<at::Tensor>& skip,
                       at::TensorList params) {
  if (!skip.has_value()) return nullptr;
  check_scalar_tensor(op, "skip", *skip, params, 1);
  check_device<D>(op, "skip", *skip);
  TORCH_CHECK_TYPE(skip->scalar_type() == at::kFloat,
                   msg("fastsam.", op, ": skip must be float32, got ", skip->scalar_type()));
  return skip->data_ptr<float>();
}

template <class D>
void sgd_op(at::TensorList params, at::TensorList grads, at::TensorList w_old,
            at::TensorList momentum_buffers, const at::Tensor& hp, bool nesterov, bool maximize,
            bool fresh, at::TensorList first_grads, const std::optional<at::Tensor>& along,
            double alpha, int64_t grad_mode, at::TensorList average,
            const std::optional<at::Tensor>& skip) {
  const bool has_momentum = !momentum_buffers.empty();
  Lists lists{{"params", params}, {"grads", grads}, {"w_old", w_old}};
  if (has_momentum) lists.emplace_back("momentum_buffers", momentum_buffers);
  const DecomposeArgs decompose =
      gradient_source<D>("sgd", lists, first_grads, along, alpha, grad_mode);
  const int avg_role = average_role(lists, average);
  check_lists("sgd", lists);
  check_hp("sgd", hp, params, avg_role < 0 ? 4 : kSgdAverageWeight + 1);
  check_device<D>("sgd", "hp", hp);
  if (params.empty()) return;
  const D dev(params[0].device());
  const SgdArgs args{hp.data_ptr<double>(), has_momentum, fresh,    nesterov,
                     maximize,              decompose,    avg_role, skip_flag<D>("sgd", skip, params)};
  const TablesPtr tables = dev.tables("sgd", lists, nullptr);  // alive for the loop
  for (const Table& t : tables->views) dev.sgd(t, args);
}

template <class D>
void adam_op(at::TensorList params, at::TensorList grads, at::TensorList w_old,
             at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
             const at::Tensor& hp, bool decoupled, bool amsgrad, bool maximize,
             at::TensorList first_grads, const std::optional<at::Tensor>& along, double alpha,
             int64_t grad_mode, at::TensorList average, const std::optional<at::Tensor>& skip,
             const std::optional<at::Tensor>& bias) {
  Lists lists{{"params", params},
              {"grads", grads},
              {"w_old", w_old},
              {"exp_avgs", exp_avgs},
              {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) lists.emplace_back("max_exp_avg_sqs", max_exp_avg_sqs);
  const DecomposeArgs decompose =
      gradient_source<D>("adam", lists, first_grads, along, alpha, grad_mode);
  const int avg_role = average_role(lists, average);
  check_lists("adam", lists);
  check_hp("adam", hp, params, avg_role < 0 ? 8 : kAdamAverageWeight + 1);
  check_device<D>("adam", "hp", hp);
  const float* skip_ptr = skip_flag<D>("adam", skip, params);
  // Per-tensor bias corrections: each table tensor's position in the lists rides in its
  // `group` entry (kernels.h AdamArgs.bias).
  std::optional<PerTensor> positions;
  if (bias.has_value()) {
    check_scalar_tensor("adam", "bias", *bias, params, 2 * static_cast<int64_t>(params.size()));
    check_device<D>("adam", "bias", *bias);
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kDouble,
                     msg("fastsam.adam: bias must be float64, got ", bias->scalar_type()));
    positions.emplace();
    for (size_t i = 0; i < params.size(); ++i) {
      positions->mode.push_back(kPlain);
      positions->group.push_back(static_cast<int64_t>(i));
      positions->eta.push_back(0.0);
    }
  }
  if (params.empty()) return;
  const D dev(params[0].device());
  const AdamArgs args{hp.data_ptr<double>(), decoupled, amsgrad, maximize, decompose, avg_role,
                      skip_ptr, bias.has_value() ? bias->data_ptr<double>() : nullptr};
  const TablesPtr tables =
      dev.tables("adam", lists, positions ? &*positions : nullptr);  // alive for the loop
  for (const Table& t : tables->views) dev.adam(t, args);
}

// GSAM's reduction: along (sums = false: out is one element) or the three sums (out has 3).
template <class D>
void gsam_reduce(const char* op, at::TensorList grads, at::TensorList first_grads, double eps,
                 bool sums, at::Tensor& out, at::Tensor& scratch) {
  const Lists lists{{"grads", grads}, {"first_grads", first_grads}};
  check_lists(op, lists);
  check_norm_out(op, "out", out, grads, sums ? 3 : 1);
  check_device<D>(op, "out", out);
  check_scalar_tensor(op, "scratch", scratch, grads, 0);
  TORCH_CHECK_TYPE(scratch.scalar_type() == at::kDouble, msg("fastsam.", op,
                   ": scratch must be float64, got ", scratch.scalar_type()));
  const D dev(device_of(grads, out));
  const TablesPtr tables = dev.tables(op, lists, nullptr);
  const int64_t n = tables->n_segments;
  if (scratch.numel() < 3 * n) grow_scratch(scratch, 3 * n);
  double* partials = scratch.data_ptr<double>();
  int64_t offset = 0;
  for (const Table& t : tables->views) {
    dev.gsam_partials(t, partials + 3 * offset);
    offset += t.n_segments;
  }
  if (sums) {
    dev.gsam_sums(partials, n, out);
  } else {
    dev.gsam_along(partials, n, eps, out);
  }
}

template <class D>
void gsam_along_op(at::TensorList grads, at::TensorList first_grads, double eps, at::Tensor& out,
                   at::Tensor& scratch) {
  gsam_reduce<D>("gsam_along", grads, first_grads, eps, false, out, scratch);
}

template <class D>
void gsam_sums_op(at::TensorList grads, at::TensorList first_grads, at::Tensor& out,
                  at::Tensor& scratch) {
  gsam_reduce<D>("gsam_sums", grads, first_grads, 0.0, true, out, scratch);
}

#ifdef FASTSAM_WITH_CUDA
bool cuda_runnable_op(int64_t device) { return cuda::runnable(static_cast<int>(device)); }
#endif

}  // namespace
}  // namespace fastsam

TORCH_LIBRARY(fastsam, m) {
  m.def(
      "norm(Tensor[] params, Tensor[] grads, int[] group_sizes, int[] group_modes, "
      "float[] group_etas, float q, Tensor(a!) out, Tensor(b!) scratch) -> ()");
  m.def(
      "perturb(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] w_old, int[] group_sizes, "
      "int[] group_modes, float[] group_etas, Tensor group_rhos, Tensor norm_sum, "
      "Tensor scratch, float q, float p, float eps, Tensor(c!) skipped, "
      "Tensor(d!)[] keep) -> ()");
  m.def("restore(Tensor(a!)[] params, Tensor[] w_old) -> ()");
  m.def(
      "sgd(Tensor(a!)[] params, Tensor[] grads, Tensor[] w_old, Tensor(b!)[] momentum_buffers, "
      "Tensor hp, bool nesterov, bool maximize, bool fresh, Tensor(c!)[] first_grads, "
      "Tensor? along, float alpha, int grad_mode, Tensor(d!)[] average, Tensor? skip=None) -> ()");
  m.def(
      "adam(Tensor(a!)[] params, Tensor[] grads, Tensor[] w_old, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor hp, bool decoupled, "
      "bool amsgrad, bool maximize, Tensor(e!)[] first_grads, Tensor? along, "
      "float alpha, int grad_mode, Tensor(f!)[] average, Tensor? skip=None, Tensor? bias=None) -> ()");
  m.def(
      "gsam_along(Tensor[] grads, Tensor[] first_grads, float eps, Tensor(a!) out, "
      "Tensor(b!) scratch) -> ()");
  m.def(
      "gsam_sums(Tensor[] grads, Tensor[] first_grads, Tensor(a!) out, Tensor(b!) scratch) "
      "-> ()");
#ifdef FASTSAM_WITH_CUDA
  // Whether the CUDA kernels can run on device `device` (built for its architecture).
  m.def("cuda_runnable(int device) -> bool", &fastsam::cuda_runnable_op);
#endif
}

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("norm", &fastsam::norm_op<fastsam::Cpu>);
  m.impl("perturb", &fastsam::perturb_op<fastsam::Cpu>);
  m.impl("restore", &fastsam::restore_op<fastsam::Cpu>);
  m.impl("sgd", &fastsam::sgd_op<fastsam::Cpu>);
  m.impl("adam", &fastsam::adam_op<fastsam::Cpu>);
  m.impl("gsam_along", &fastsam::gsam_along_op<fastsam::Cpu>);
  m.impl("gsam_sums", &fastsam::gsam_sums_op<fastsam::Cpu>);
}

#ifdef FASTSAM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastsam, CUDA, m) {
  m.impl("norm", &fastsam::norm_op<fastsam::Cuda>);
  m.impl("perturb", &fastsam::perturb_op<fastsam::Cuda>);
  m.impl("restore", &fastsam::restore_op<fastsam::Cuda>);
  m.impl("sgd", &fastsam::sgd_op<fastsam::Cuda>);
  m.impl("adam", &fastsam::adam_op<fastsam::Cuda>);
  m.impl("gsam_along", &fastsam::gsam_along_op<fastsam::Cuda>);
  m.impl("gsam_sums", &fastsam::gsam_sums_op<fastsam::Cuda>);
}
#endif

// A plain extension module: importing fastsam._C registers the operators above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastsam's native operators", -1,
                               nullptr};
  return PyModule_Create(&module);
}
