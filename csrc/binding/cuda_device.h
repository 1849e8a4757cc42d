// The CUDA adapter of the operators (fastsam._C binding): device copies of the tables, cached
// and held for CUDA graphs, and the launches of csrc/cuda_kernels.cu on the current stream.
#pragma once

#ifdef FASTSAM_WITH_CUDA
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

#include "../kernels.h"
#include "tables.h"

namespace fastsam {
namespace {  // this header is included by csrc/binding.cpp only

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
               tab.eta.size() + tab.index.size();
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
      append(tab.index.data(), tab.index.size());
    }
    tables.device_blob = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
    tables.host_blob = host;
    const int64_t* base = tables.device_blob.data_ptr<int64_t>();
    for (size_t k = 0; k < tables.host.size(); ++k) {
      Table& v = tables.views[k];
      const int64_t* o = offsets.data() + 6 * k;
      v.seg = base + o[0];
      v.addr = base + o[1];
      v.mode = base + o[2];
      v.group = base + o[3];
      v.eta = reinterpret_cast<const double*>(base + o[4]);
      v.index = base + o[5];
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
  void norm_sum(const double* partials, int64_t n, const at::Tensor& out) const {
    cuda::sum_partials(partials, n, out.data_ptr(), out.scalar_type() == at::kDouble, stream);
  }
  void perturb(const Table& t, const PerturbArgs& a) const { cuda::perturb(t, a, stream); }
  void restore(const Table& t) const { cuda::restore(t, stream); }
  void nonfinite(const Table& t, float* found) const { cuda::nonfinite(t, found, stream); }
  void scale(const Table& t, const void* factor) const { cuda::scale(t, factor, stream); }
  void wsam_decoupled(const Table& t, const WsamArgs& a) const {
    cuda::wsam_decoupled(t, a, stream);
  }
  void sgd(const Table& t, const SgdArgs& a) const { cuda::sgd(t, a, stream); }
  void adam(const Table& t, const AdamArgs& a) const { cuda::adam(t, a, stream); }
  void gsam_partials(const Table& t, double* partials) const {
    cuda::gsam_partials(t, partials, stream);
  }
  void gsam_along(const double* partials, int64_t n, double eps, const at::Tensor& out) const {
    cuda::gsam_along(partials, n, eps, out.data_ptr(), out.scalar_type() == at::kDouble, stream);
  }
  void gsam_sums(const double* partials, int64_t n, const at::Tensor& out) const {
    cuda::gsam_sums(partials, n, out.data_ptr(), out.scalar_type() == at::kDouble, stream);
  }
  void stream_read(const float* x, int64_t n, at::Tensor& out) const {
    out.zero_();
    cuda::stream_read(x, n, out.data_ptr<double>(), stream);
  }
  void stream_fill(float* x, int64_t n, float value) const {
    cuda::stream_fill(x, n, value, stream);
  }
  void stream_triad(float* a, const float* b, const float* c, float s, int64_t n) const {
    cuda::stream_triad(a, b, c, s, n, stream);
  }
  void stream_update(float* a, const float* b, const float* c, float* d, float s,
                     int64_t n) const {
    cuda::stream_update(a, b, c, d, s, n, stream);
  }

  c10::Device device;
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
};

bool cuda_runnable_op(int64_t device) { return cuda::runnable(static_cast<int>(device)); }

}  // namespace
}  // namespace fastsam
#endif  // FASTSAM_WITH_CUDA
