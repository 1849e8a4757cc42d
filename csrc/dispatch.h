// Host-side helpers that turn run-time choices (storage dtype, flags, q) into template
// arguments of the kernel loops; shared by cpu_kernels.cpp and cuda_kernels.cu. No torch
// headers.
#pragma once

#include <type_traits>
#include <utility>

#include "elementwise.h"
#include "kernels.h"

namespace fastsam {

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<S>{}) with S the storage type of `dtype`; each device names its 16-bit types.
template <typename Half, typename BFloat16, typename F>
void with_storage(DType dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(Tag<float>{});
    case kFloat64: return f(Tag<double>{});
    case kFloat16: return f(Tag<Half>{});
    case kBFloat16: return f(Tag<BFloat16>{});
  }
}

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// f(has_momentum, fresh, nesterov) as compile-time booleans, over the combinations an SGD
// update reaches: without momentum there is no buffer to start fresh and no Nesterov step
// (elementwise.h sgd reads FRESH and NESTEROV only under HAS_MOMENTUM; torch.optim.SGD refuses
// nesterov without momentum), so every such call runs the (false, false, false) kernel.
// 5 instantiations instead of 8.
template <typename F>
void with_sgd_flags(bool has_momentum, bool fresh, bool nesterov, F&& f) {
  if (!has_momentum) return f(std::false_type{}, std::false_type{}, std::false_type{});
  with_bool(fresh, [&](auto fr) {
    with_bool(nesterov, [&](auto n) { f(std::true_type{}, fr, n); });
  });
}

// f(integral_constant<int, PerturbExtra>) for what a perturb pass writes besides w_old and w.
template <typename F>
void with_extra(const PerturbArgs& a, F&& f) {
  if (a.momentum != nullptr) return f(std::integral_constant<int, kExtraMomentum>{});
  if (a.keep) return f(std::integral_constant<int, kExtraKeep>{});
  return f(std::integral_constant<int, kExtraNone>{});
}

template <typename F>
void with_qmode(int qmode, F&& f) {
  switch (qmode) {
    case kQ2: return f(std::integral_constant<int, kQ2>{});
    case kQ1: return f(std::integral_constant<int, kQ1>{});
    default: return f(std::integral_constant<int, kQAny>{});
  }
}

// f(integral_constant<int, mode>) for each GradMode of kernels.h below kGradModes, so a new mode
// needs no case here (an out-of-range mode is refused by the binding before any dispatch).
template <int M = kGradPlain, typename F>
void with_grad_mode(int mode, F&& f) {
  if constexpr (M < kGradModes) {
    if (mode == M) return f(std::integral_constant<int, M>{});
    return with_grad_mode<M + 1>(mode, std::forward<F>(f));
  } else {
    return f(std::integral_constant<int, kGradPlain>{});
  }
}

}  // namespace fastsam
