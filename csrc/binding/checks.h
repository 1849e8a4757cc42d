// Validation of the operators' arguments (fastsam._C binding): TORCH_CHECK with text that says
// what to fix, before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>

#include <utility>
#include <vector>

#include "../kernels.h"
#include "text.h"

namespace fastsam {
namespace {  // this header is included by csrc/binding.cpp only

// An operator's list arguments, named (on the stack: an operator has at most eight).
using Lists = c10::SmallVector<std::pair<const char*, at::TensorList>, 8>;

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

// Whether a and b lay their elements out alike in memory: the same stride on every dim that has
// more than one element (a size-1 dim's stride says nothing about the layout).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Every list has as many tensors as the first (the parameters); tensor i of each list is
// dense and non-overlapping (any memory format: channels_last too) and laid out as parameter i,
// on the parameters' device, with parameter i's dtype and shape. The kernels walk each tensor's
// memory linearly, so element k of one is element k of every other.
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
      if (t.numel() == 0) continue;  // no memory to walk: any strides (the kernels skip it)
      TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), msg("fastsam.", op, ": ", name, "[",
                        i, "] is not dense (strides ", t.strides(), " for shape ", t.sizes(),
                        "); make it contiguous or use backend='torch'"));
      TORCH_CHECK_VALUE(same_layout(t, w[i]), msg("fastsam.", op, ": ", name, "[", i,
                        "] has strides ", t.strides(), " but ", w_name, "[", i, "] has ",
                        w[i].strides(), " (another memory format): give it its parameter's "
                        "layout (torch.empty_like(p) does) or use backend='torch'"));
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

void check_exponents(const char* op, double q) {
  TORCH_CHECK_VALUE(q >= 1.0, msg("fastsam.", op, ": q = ", q,
                                  " must be >= 1 (q is the dual of p > 1)"));
}

// A scratch tensor grows onto new storage instead of resizing its own: a CUDA graph captured
// with the old storage reads it at every replay, and fastsam/backends/native.py keeps it alive
// for that graph (a resize would free it under the graph).
void grow_scratch(const at::Tensor& scratch, int64_t numel) {
  scratch.set_(at::empty({numel}, scratch.options()));
}

// Scratch (fp64): [0, n) per-segment partials, [n, 2n) filter norms. Grown, never shrunk.
void check_scratch(const char* op, const at::Tensor& scratch, at::TensorList w, int64_t n,
                   bool grow) {
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
  check_scalar_tensor(op, "hp_device", hp, w, n);
  TORCH_CHECK_TYPE(hp.scalar_type() == at::kDouble,
                   msg("fastsam.", op, ": hp_device must be float64, got ", hp.scalar_type()));
}

c10::Device device_of(at::TensorList w, const at::Tensor& fallback) {
  return w.empty() ? fallback.device() : w[0].device();
}

template <class D>
void check_device(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().type() == D::type, msg("fastsam.", op, ": ", name, " is on ",
                    t.device(), "; this kernel takes ", c10::DeviceType(D::type), " tensors"));
}

}  // namespace
}  // namespace fastsam
