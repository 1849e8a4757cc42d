// The segment tables of a launch (fastsam._C binding): per-tensor options from the per-group
// lists, tensors split by storage dtype and cut into segments, in host memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../elementwise.h"
#include "../kernels.h"
#include "checks.h"

namespace fastsam {
namespace {  // this header is included by csrc/binding.cpp only

// Elements per segment of the element-wise passes. CPU: 32768 (128 KiB of fp32 per stream,
// a few segments per thread even for small models). CUDA: one 8192-element segment per
// block, as the Triton backend (bench/results/triton-tuning-*).
constexpr int64_t kCpuChunk = 1 << 15;
constexpr int64_t kCudaChunk = 1 << 13;

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
      // Filter-wise: filter j is the j-th block of numel/size(0) elements in memory, so dim 0
      // must be outermost (it is in contiguous and channels_last layouts).
      const at::Tensor& p = params[i];
      TORCH_CHECK_VALUE(modes[k] != kFilter || filter_1d || p.size(0) <= 1 || p.numel() == 0 ||
                            p.stride(0) * p.size(0) == p.numel(),
                        msg("fastsam.", op, ": params[", i, "] has strides ", p.strides(),
                            " for shape ", p.sizes(), ": filter-wise ASAM needs each filter (a "
                            "slice along dim 0) contiguous in memory, dim 0 outermost"));
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
  std::vector<int64_t> index;  // position of each table tensor in the caller's lists
  std::vector<int64_t> seg, addr, mode, group;
  std::vector<double> eta;

  int64_t n_segments() const { return static_cast<int64_t>(seg.size() / 3); }
  Table view() const {
    return {dtype,       static_cast<int64_t>(index.size()), n_segments(), seg.data(),
            addr.data(), mode.data(),                        eta.data(),   group.data(),
            index.data()};
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
    tab->index.push_back(static_cast<int64_t>(i));
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

}  // namespace
}  // namespace fastsam
