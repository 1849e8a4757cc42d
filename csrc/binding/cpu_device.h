// The CPU adapter of the operators (fastsam._C binding): tables in host memory, the loops of
// csrc/cpu_kernels.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>

#include "../kernels.h"
#include "tables.h"

namespace fastsam {
namespace {  // this header is included by csrc/binding.cpp only

// A one-element float32 or float64 tensor (the reductions' outputs, checked so before) set
// to `v`: one store, where a dispatched fill_ costs ~800 instructions a call.
inline void store_value(const at::Tensor& out, double v) {
  if (out.scalar_type() == at::kDouble) {
    *out.data_ptr<double>() = v;
  } else {
    *out.data_ptr<float>() = static_cast<float>(v);
  }
}

// Each device runs the passes through the same few calls: `Cpu` and `Cuda` below.
struct Cpu {
  static constexpr c10::DeviceType type = c10::DeviceType::CPU;

  explicit Cpu(c10::Device) {}
  TablesPtr tables(const char*, const Lists& lists, const PerTensor* options) const {
    return host_tables(lists, options, kCpuChunk);
  }
  void norm_partials(const Table& t, const NormArgs& a) const { cpu::norm_partials(t, a); }
  void norm_sum(const double* partials, int64_t n, const at::Tensor& out) const {
    store_value(out, cpu::sum_partials(partials, n));
  }
  void perturb(const Table& t, const PerturbArgs& a) const { cpu::perturb(t, a); }
  void restore(const Table& t) const { cpu::restore(t); }
  void nonfinite(const Table& t, float* found) const { cpu::nonfinite(t, found); }
  void scale(const Table& t, const void* factor) const { cpu::scale(t, factor); }
  void wsam_decoupled(const Table& t, const WsamArgs& a) const { cpu::wsam_decoupled(t, a); }
  void sgd(const Table& t, const SgdArgs& a) const { cpu::sgd(t, a); }
  void adam(const Table& t, const AdamArgs& a) const { cpu::adam(t, a); }
  void gsam_partials(const Table& t, double* partials) const { cpu::gsam_partials(t, partials); }
  void gsam_along(const double* partials, int64_t n, double eps, const at::Tensor& out) const {
    store_value(out, cpu::gsam_along(partials, n, eps));
  }
  void gsam_sums(const double* partials, int64_t n, const at::Tensor& out) const {
    double sums[3];
    cpu::gsam_sums(partials, n, sums);
    if (out.scalar_type() == at::kDouble) {
      std::copy(sums, sums + 3, out.data_ptr<double>());
    } else {
      std::copy(sums, sums + 3, out.data_ptr<float>());
    }
  }
  void stream_read(const float* x, int64_t n, at::Tensor& out) const {
    out.fill_(cpu::stream_read(x, n));
  }
  void stream_fill(float* x, int64_t n, float value) const { cpu::stream_fill(x, n, value); }
  void stream_triad(float* a, const float* b, const float* c, float s, int64_t n) const {
    cpu::stream_triad(a, b, c, s, n);
  }
  void stream_update(float* a, const float* b, const float* c, float* d, float s,
                     int64_t n) const {
    cpu::stream_update(a, b, c, d, s, n);
  }
};

}  // namespace
}  // namespace fastsam
