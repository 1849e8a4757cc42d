// CUDA kernels of the passes of docs/design.md §2: arithmetic only, no torch headers (the binding
// builds the tables, validates and picks the stream), so this file compiles with plain nvcc —
// the test suite does exactly that on machines without a GPU.
//
// One block per segment of the table (8192 elements, or one filter for filter-wise ASAM), any
// number of tensors per launch. Each thread moves kUnroll elements per iteration: all loads of
// an iteration are issued before any arithmetic, so every thread keeps several requests in
// flight. Offsets are int64 (tensors over 2^31 elements). Math in float (double for fp64
// storage), rounded once on store (round to nearest even). Reductions are deterministic: a
// fixed-shape tree per block, then one block sums the per-segment partials in order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "dispatch.h"
#include "elementwise.h"
#include "kernels.h"

namespace fastsam {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename S>
struct Storage {  // float, double: no conversion
  using A = S;
  static __device__ __forceinline__ A load(S x) { return x; }
  static __device__ __forceinline__ S store(A x) { return x; }
};
template <>
struct Storage<__half> {
  using A = float;
  static __device__ __forceinline__ A load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(A x) { return __float2half_rn(x); }
};
template <>
struct Storage<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ A load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(A x) { return __float2bfloat16_rn(x); }
};

template <typename F>
void with_storage(DType dtype, F&& f) {
  fastsam::with_storage<__half, __nv_bfloat16>(dtype, f);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastsam: launching the ") + what +
                             " kernel failed: " + cudaGetErrorString(err));
  }
}

struct Segment {
  int64_t tensor, start, len;
};

__device__ __forceinline__ Segment segment(const Table& tab) {
  const int64_t s = blockIdx.x;
  return {tab.seg[3 * s], tab.seg[3 * s + 1], tab.seg[3 * s + 2]};
}

template <typename S>
__device__ __forceinline__ S* address(const Table& tab, int role, const Segment& seg) {
  return reinterpret_cast<S*>(tab.addr[role * tab.n_tensors + seg.tensor]) + seg.start;
}

// Sum of one value per thread over the block, in a fixed tree order (deterministic).
// Every thread must call it; the result is valid in thread 0.
template <typename A>
__device__ A block_sum(A value) {
  __shared__ A shared[kThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
    __syncthreads();
  }
  const A total = shared[0];
  __syncthreads();  // shared may be reused by a second call
  return total;
}

// Calls body(i) for i in [0, n): kUnroll indices per thread per iteration.
template <typename F>
__device__ __forceinline__ void for_each(int64_t n, F&& body) {
  for (int64_t base = 0; base < n; base += int64_t(kThreads) * kUnroll) {
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = base + threadIdx.x + int64_t(k) * kThreads;
      if (i < n) body(i);
    }
  }
}

template <typename S, int QM, bool MOM>
__global__ void __launch_bounds__(kThreads) norm_kernel(Table tab, NormArgs a) {
  using A = typename Storage<S>::A;
  const Segment seg = segment(tab);
  const S* g = address<const S>(tab, kNormG, seg);
  const S* w = address<const S>(tab, kNormW, seg);
  const S* m = MOM ? address<const S>(tab, a.momentum_role, seg) : nullptr;
  const A sigma = MOM ? A(a.momentum[3 * tab.group[seg.tensor]]) : A(0);
  const int mode = static_cast<int>(tab.mode[seg.tensor]);
  const A eta = A(tab.eta[seg.tensor]);
  const A q = A(a.q);
  A acc_u = 0, acc_w = 0;
  for_each(seg.len, [&](int64_t i) {
    A gi = Storage<S>::load(g[i]);
    if (MOM) gi = friendly_direction(gi, Storage<S>::load(m[i]), sigma);  // FriendlySAM's d
    if (mode == kPlain || mode == kOuter) {  // kOuter: T applies after the normalisation
      acc_u += pow_q<QM>(fs_abs(gi), q);
    } else {
      const A wi = Storage<S>::load(w[i]);
      const A T = mode == kElement ? fs_abs(wi) + eta : A(1);  // filter T: applied below
      acc_u += pow_q<QM>(fs_abs(T * gi), q);
      acc_w += wi * wi;
    }
  });
  const A sum_u = block_sum(acc_u);
  const A sum_w = block_sum(acc_w);
  if (threadIdx.x == 0) {
    const A row_T = fs_sqrt(sum_w) + eta;
    a.partials[blockIdx.x] = double(mode == kFilter ? pow_q<QM>(row_T, q) * sum_u : sum_u);
    a.row_T[blockIdx.x] = mode == kFilter ? double(row_T) : 0.0;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) sum_kernel(const double* partials, int64_t n,
                                                       A* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += partials[i];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) *out = A(total);
}

template <typename S, int QM, int EXTRA>
__global__ void __launch_bounds__(kThreads) perturb_kernel(Table tab, PerturbArgs a) {
  using A = typename Storage<S>::A;
  constexpr bool KEEP = EXTRA == kExtraKeep, MOM = EXTRA == kExtraMomentum;
  const Segment seg = segment(tab);
  const A norm_sum = a.norm_fp64 ? A(*static_cast<const double*>(a.norm_sum))
                                 : A(*static_cast<const float*>(a.norm_sum));
  const bool ok = finite(norm_sum);
  const A scale =
      ok ? A(a.rho[tab.group[seg.tensor]]) * inverse_denominator<QM>(norm_sum, A(a.inv_p), A(a.eps))
         : A(0);
  const int mode = static_cast<int>(tab.mode[seg.tensor]);
  const A eta = A(tab.eta[seg.tensor]);
  const A row_T = A(a.row_T[blockIdx.x]);
  const A q = A(a.q);
  S* w = address<S>(tab, kPertW, seg);
  const S* g = address<const S>(tab, kPertG, seg);
  S* old = address<S>(tab, kPertOld, seg);
  S* keep = KEEP ? address<S>(tab, kPertKeep, seg) : nullptr;
  const S* m = MOM ? address<const S>(tab, a.momentum_role, seg) : nullptr;
  S* m_next = MOM ? address<S>(tab, a.momentum_role + 1, seg) : nullptr;
  const double* mom = MOM ? a.momentum + 3 * tab.group[seg.tensor] : nullptr;
  const A sigma = MOM ? A(mom[0]) : A(0), lmbda = MOM ? A(mom[1]) : A(0);
  const A gain = MOM ? A(mom[2]) : A(0);
  const MaskStream stream = a.mask != nullptr
                                ? mask_stream(a.mask_key0, a.mask_key1, tab.index[seg.tensor])
                                : MaskStream{0, 0};
  const uint64_t threshold =
      a.mask != nullptr ? static_cast<uint64_t>(a.mask[tab.group[seg.tensor]]) : 0;
  const int64_t first =
      seg.start + (a.mask != nullptr && a.mask_offset != nullptr
                       ? static_cast<int64_t>(a.mask_offset[tab.index[seg.tensor]])
                       : 0);  // the mask's index of element 0
  for_each(seg.len, [&](int64_t i) {
    const S w_raw = w[i];
    const S g_raw = g[i];
    old[i] = w_raw;  // exact copy: the restore is bit-exact
    if (KEEP) keep[i] = g_raw;
    A d = Storage<S>::load(g_raw);
    if (MOM) {  // FriendlySAM: e follows g − sigma·m; m_next = m for a non-finite norm
      const S m_raw = m[i];
      const A mi = Storage<S>::load(m_raw);
      m_next[i] = ok ? Storage<S>::store(friendly_momentum(mi, d, lmbda, gain)) : m_raw;
      d = friendly_direction(d, mi, sigma);
    }
    // ESAM: an element its mask leaves out keeps w (a uniform branch when there is no mask)
    const bool moves = a.mask == nullptr || uint64_t(mask_draw(stream, first + i)) < threshold;
    if (ok && moves) {
      const A wi = Storage<S>::load(w_raw);
      const A T = mode == kElement ? fs_abs(wi) + eta : mode == kFilter ? row_T : A(1);
      const A outer = mode == kOuter ? fs_abs(wi) + eta : A(1);
      w[i] = Storage<S>::store(wi + scale * outer * direction<QM>(T, d, q));
    }
  });
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.skipped = ok ? 0.0f : 1.0f;
}

template <typename S>
__global__ void __launch_bounds__(kThreads) restore_kernel(Table tab) {
  const Segment seg = segment(tab);
  S* w = address<S>(tab, kRestoreW, seg);
  const S* old = address<const S>(tab, kRestoreOld, seg);
  for_each(seg.len, [&](int64_t i) { w[i] = old[i]; });
}

// *found ← 1 when an element of the segment is inf or NaN (every thread that sees one stores
// the same value).
template <typename S>
__global__ void __launch_bounds__(kThreads) nonfinite_kernel(Table tab, float* found) {
  using A = typename Storage<S>::A;
  const Segment seg = segment(tab);
  const S* x = address<const S>(tab, kCheckX, seg);
  bool bad = false;
  for_each(seg.len, [&](int64_t i) {
    const A v = Storage<S>::load(x[i]);
    bad |= !(v - v == A(0));
  });
  if (bad) *found = 1.0f;
}

template <typename S>
__global__ void __launch_bounds__(kThreads) scale_kernel(Table tab, const S* factor) {
  using A = typename Storage<S>::A;
  const Segment seg = segment(tab);
  S* x = address<S>(tab, kScaleX, seg);
  const A f = Storage<S>::load(*factor);
  for_each(seg.len, [&](int64_t i) { x[i] = Storage<S>::store(Storage<S>::load(x[i]) * f); });
}

template <typename S>
__global__ void __launch_bounds__(kThreads) wsam_decoupled_kernel(Table tab, WsamArgs a) {
  using A = typename Storage<S>::A;
  const Segment seg = segment(tab);
  S* w = address<S>(tab, kWsamW, seg);
  S* first = address<S>(tab, kWsamFirst, seg);
  const S* g = address<const S>(tab, kWsamG, seg);
  const A c = a.gain == nullptr ? A(1)
              : a.gain_fp64     ? A(*static_cast<const double*>(a.gain))
                                : A(*static_cast<const float*>(a.gain));
  const A alpha = A(a.alpha);
  for_each(seg.len, [&](int64_t i) {
    const S d = Storage<S>::store(Storage<S>::load(first[i]) - c * Storage<S>::load(g[i]));
    first[i] = d;
    w[i] = Storage<S>::store(Storage<S>::load(w[i]) + alpha * Storage<S>::load(d));
  });
}

// The per-block scalars of update_gradient: 1 + alpha·along (along read on the device; along
// itself for LookSAM's correction), alpha, and the sign.
template <typename A>
struct GradientScalars {
  A coefficient, alpha, sign, gain;  // gain: max_grad_norm's clip coefficient (1 without)
};

template <int GM, typename A>
__device__ __forceinline__ GradientScalars<A> gradient_scalars(const DecomposeArgs& d,
                                                               bool maximize) {
  const A sign = maximize ? A(-1) : A(1);
  const A gain = d.gain == nullptr ? A(1)
                 : d.gain_fp64    ? A(*static_cast<const double*>(d.gain))
                                  : A(*static_cast<const float*>(d.gain));
  if (GM != kGradDecompose && GM != kGradCorrect) return {A(1), A(0), sign, gain};
  const A along = d.along_fp64 ? A(*static_cast<const double*>(d.along))
                               : A(*static_cast<const float*>(d.along));
  if (GM == kGradCorrect) return {along, A(0), sign, gain};
  return {A(1) + A(d.alpha) * along, A(d.alpha), sign, gain};
}

// A skipped update (kernels.h SgdArgs.skip, a flag in device memory, the same for every
// block): w ← w_old, nothing else written. Returns whether it was skipped.
template <typename S>
__device__ __forceinline__ bool skipped_update(const float* skip, S* w, const S* old,
                                               int64_t n) {
  if (skip == nullptr || *skip == 0.0f) return false;
  for_each(n, [&](int64_t i) { w[i] = old[i]; });
  return true;
}

template <typename S, bool HAS_MOMENTUM, bool FRESH, bool NESTEROV, int GM>
__global__ void __launch_bounds__(kThreads) sgd_kernel(Table tab, SgdArgs a) {
  using A = typename Storage<S>::A;
  const Segment seg = segment(tab);
  S* w = address<S>(tab, kSgdW, seg);
  const S* old = address<const S>(tab, kSgdOld, seg);  // may be w itself (not perturbed)
  if (skipped_update(a.skip, w, old, seg.len)) return;
  const S* g = address<const S>(tab, kSgdG, seg);
  S* first = GM != kGradPlain ? address<S>(tab, a.decompose.first_role, seg) : nullptr;
  S* buf = HAS_MOMENTUM ? address<S>(tab, kSgdBuf, seg) : nullptr;
  S* avg = a.average_role >= 0 ? address<S>(tab, a.average_role, seg) : nullptr;
  const double* hp = scalars(a);
  const A lr = A(hp[0]), momentum = A(hp[1]), dampening = A(hp[2]);
  const A weight_decay = A(hp[3]);
  const A avg_weight = avg ? A(hp[kSgdAverageWeight]) : A(0);
  const GradientScalars<A> k = gradient_scalars<GM, A>(a.decompose, a.maximize);
  const bool unclipped = k.gain == A(1);  // FreeSAM stores g itself, bit for bit
  for_each(seg.len, [&](int64_t i) {
    A b = (HAS_MOMENTUM && !FRESH) ? Storage<S>::load(buf[i]) : A(0);
    const S g_raw = g[i];
    const A g_in = Storage<S>::load(g_raw) * k.gain;  // clipped (max_grad_norm)
    const A d = update_gradient<GM>(g_in,
                                    GM != kGradPlain ? Storage<S>::load(first[i]) : A(0),
                                    k.coefficient, k.alpha, k.sign);
    if (GM == kGradSwap) first[i] = unclipped ? g_raw : Storage<S>::store(g_in);
    const A updated = fastsam::sgd<HAS_MOMENTUM, FRESH, NESTEROV>(
        Storage<S>::load(old[i]), d, b, lr, momentum, dampening, weight_decay);
    if (HAS_MOMENTUM) buf[i] = Storage<S>::store(b);
    const S out = Storage<S>::store(updated);
    w[i] = out;
    if (avg) {
      avg[i] = Storage<S>::store(
          average(Storage<S>::load(avg[i]), Storage<S>::load(out), avg_weight));
    }
  });
}

template <typename S, bool DECOUPLED, bool AMSGRAD, int GM>
__global__ void __launch_bounds__(kThreads) adam_kernel(Table tab, AdamArgs a) {
  using A = typename Storage<S>::A;
  const Segment seg = segment(tab);
  S* w = address<S>(tab, kAdamW, seg);
  const S* old = address<const S>(tab, kAdamOld, seg);
  if (skipped_update(a.skip, w, old, seg.len)) return;
  const S* g = address<const S>(tab, kAdamG, seg);
  S* first = GM != kGradPlain ? address<S>(tab, a.decompose.first_role, seg) : nullptr;
  const GradientScalars<A> gk = gradient_scalars<GM, A>(a.decompose, a.maximize);
  const bool unclipped = gk.gain == A(1);  // FreeSAM stores g itself, bit for bit
  S* m = address<S>(tab, kAdamM, seg);
  S* v = address<S>(tab, kAdamV, seg);
  S* vmax = AMSGRAD ? address<S>(tab, kAdamVmax, seg) : nullptr;
  S* avg = a.average_role >= 0 ? address<S>(tab, a.average_role, seg) : nullptr;
  // Bias corrections: the launch's (hp[5], hp[6]) or this tensor's row of a.bias.
  const double* hp = scalars(a);
  const double* bias = a.bias ? a.bias + 2 * tab.group[seg.tensor] : hp + 5;
  const AdamScalars<A> k{A(hp[1]), A(hp[2]), A(hp[3]), A(hp[4]),
                         A(bias[0]), A(bias[1]), A(hp[7])};
  const A avg_weight = avg ? A(hp[kAdamAverageWeight]) : A(0);
  for_each(seg.len, [&](int64_t i) {
    A mi = Storage<S>::load(m[i]), vi = Storage<S>::load(v[i]);
    A vmaxi = AMSGRAD ? Storage<S>::load(vmax[i]) : A(0);
    const S g_raw = g[i];
    const A g_in = Storage<S>::load(g_raw) * gk.gain;  // clipped (max_grad_norm)
    const A gi = update_gradient<GM>(g_in,
                                     GM != kGradPlain ? Storage<S>::load(first[i]) : A(0),
                                     gk.coefficient, gk.alpha, gk.sign);
    if (GM == kGradSwap) first[i] = unclipped ? g_raw : Storage<S>::store(g_in);
    const A updated =
        fastsam::adam<DECOUPLED, AMSGRAD>(Storage<S>::load(old[i]), gi, mi, vi, vmaxi, k);
    m[i] = Storage<S>::store(mi);
    v[i] = Storage<S>::store(vi);
    if (AMSGRAD) vmax[i] = Storage<S>::store(vmaxi);
    const S out = Storage<S>::store(updated);
    w[i] = out;
    if (avg) {
      avg[i] = Storage<S>::store(
          average(Storage<S>::load(avg[i]), Storage<S>::load(out), avg_weight));
    }
  });
}

template <typename S>
__global__ void __launch_bounds__(kThreads) gsam_partials_kernel(Table tab, double* partials) {
  using A = typename Storage<S>::A;
  const Segment seg = segment(tab);
  const S* adv = address<const S>(tab, kGsamAdv, seg);
  const S* first = address<const S>(tab, kGsamFirst, seg);
  A inner = 0, adv_sq = 0, first_sq = 0;
  for_each(seg.len, [&](int64_t i) {
    const A a = Storage<S>::load(adv[i]), f = Storage<S>::load(first[i]);
    inner += f * a;
    adv_sq += a * a;
    first_sq += f * f;
  });
  const A sums[3] = {block_sum(inner), block_sum(adv_sq), block_sum(first_sq)};
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) partials[3 * int64_t(blockIdx.x) + k] = double(sums[k]);
  }
}

// kSums: out[0:3] = the three sums; else *out = along.
template <bool kSums, typename A>
__global__ void __launch_bounds__(kThreads) gsam_along_kernel(const double* partials, int64_t n,
                                                              double eps, A* out) {
  double acc[3] = {0.0, 0.0, 0.0};
  for (int64_t s = threadIdx.x; s < n; s += kThreads) {
    for (int k = 0; k < 3; ++k) acc[k] += partials[3 * s + k];
  }
  const double inner = block_sum(acc[0]);
  const double adv_sq = block_sum(acc[1]);
  const double first_sq = block_sum(acc[2]);
  if (threadIdx.x != 0) return;
  if (kSums) {
    out[0] = A(inner);
    out[1] = A(adv_sq);
    out[2] = A(first_sq);
  } else {
    *out = A(fastsam::gsam_along(inner, adv_sq, first_sq, eps));
  }
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace

void norm_partials(const Table& t, const NormArgs& a, void* stream) {
  if (t.n_segments == 0) return;
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    with_qmode(a.qmode, [&](auto qm) {
      with_bool(a.momentum != nullptr, [&](auto mom) {
        norm_kernel<S, decltype(qm)::value, decltype(mom)::value>
            <<<t.n_segments, kThreads, 0, as_stream(stream)>>>(t, a);
      });
    });
  });
  check_launch("norm");
}

void sum_partials(const double* partials, int64_t n, void* out, bool out_fp64, void* stream) {
  if (out_fp64) {
    sum_kernel<<<1, kThreads, 0, as_stream(stream)>>>(partials, n, static_cast<double*>(out));
  } else {
    sum_kernel<<<1, kThreads, 0, as_stream(stream)>>>(partials, n, static_cast<float*>(out));
  }
  check_launch("norm sum");
}

void perturb(const Table& t, const PerturbArgs& a, void* stream) {
  if (t.n_segments == 0) return;
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    with_qmode(a.qmode, [&](auto qm) {
      with_extra(a, [&](auto extra) {
        perturb_kernel<S, decltype(qm)::value, decltype(extra)::value>
            <<<t.n_segments, kThreads, 0, as_stream(stream)>>>(t, a);
      });
    });
  });
  check_launch("perturb");
}

// launch(Tag<S>) for the table's storage type S (nothing for an empty table), then the
// launch checked: the passes whose kernel has no other template argument.
template <typename F>
void launch_by_storage(const Table& t, const char* what, F&& launch) {
  if (t.n_segments == 0) return;
  with_storage(t.dtype, launch);
  check_launch(what);
}

void restore(const Table& t, void* stream) {
  launch_by_storage(t, "restore", [&](auto tag) {
    restore_kernel<typename decltype(tag)::type>
        <<<t.n_segments, kThreads, 0, as_stream(stream)>>>(t);
  });
}

void nonfinite(const Table& t, float* found, void* stream) {
  launch_by_storage(t, "nonfinite", [&](auto tag) {
    nonfinite_kernel<typename decltype(tag)::type>
        <<<t.n_segments, kThreads, 0, as_stream(stream)>>>(t, found);
  });
}

void scale(const Table& t, const void* factor, void* stream) {
  launch_by_storage(t, "scale", [&](auto tag) {
    using S = typename decltype(tag)::type;
    scale_kernel<S>
        <<<t.n_segments, kThreads, 0, as_stream(stream)>>>(t, static_cast<const S*>(factor));
  });
}

void wsam_decoupled(const Table& t, const WsamArgs& a, void* stream) {
  launch_by_storage(t, "wsam_decoupled", [&](auto tag) {
    wsam_decoupled_kernel<typename decltype(tag)::type>
        <<<t.n_segments, kThreads, 0, as_stream(stream)>>>(t, a);
  });
}

void sgd(const Table& t, const SgdArgs& a, void* stream) {
  if (t.n_segments == 0) return;
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    with_sgd_flags(a.has_momentum, a.fresh, a.nesterov, [&](auto m, auto f, auto n) {
      with_grad_mode(a.decompose.mode, [&](auto x) {
        sgd_kernel<S, decltype(m)::value, decltype(f)::value, decltype(n)::value,
                   decltype(x)::value>
            <<<t.n_segments, kThreads, 0, as_stream(stream)>>>(t, a);
      });
    });
  });
  check_launch("sgd");
}

void adam(const Table& t, const AdamArgs& a, void* stream) {
  if (t.n_segments == 0) return;
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    with_bool(a.decoupled, [&](auto d) {
      with_bool(a.amsgrad, [&](auto ams) {
        with_grad_mode(a.decompose.mode, [&](auto x) {
          adam_kernel<S, decltype(d)::value, decltype(ams)::value, decltype(x)::value>
              <<<t.n_segments, kThreads, 0, as_stream(stream)>>>(t, a);
        });
      });
    });
  });
  check_launch("adam");
}

void gsam_partials(const Table& t, double* partials, void* stream) {
  launch_by_storage(t, "gsam partials", [&](auto tag) {
    gsam_partials_kernel<typename decltype(tag)::type>
        <<<t.n_segments, kThreads, 0, as_stream(stream)>>>(t, partials);
  });
}

namespace {
template <bool kSums>
void gsam_combine(const double* partials, int64_t n, double eps, void* out, bool out_fp64,
                  void* stream) {
  if (out_fp64) {
    gsam_along_kernel<kSums><<<1, kThreads, 0, as_stream(stream)>>>(partials, n, eps,
                                                                    static_cast<double*>(out));
  } else {
    gsam_along_kernel<kSums><<<1, kThreads, 0, as_stream(stream)>>>(partials, n, eps,
                                                                    static_cast<float*>(out));
  }
  check_launch(kSums ? "gsam sums" : "gsam along");
}
}  // namespace

void gsam_along(const double* partials, int64_t n, double eps, void* out, bool out_fp64,
                void* stream) {
  gsam_combine<false>(partials, n, eps, out, out_fp64, stream);
}

void gsam_sums(const double* partials, int64_t n, void* out, bool out_fp64, void* stream) {
  gsam_combine<true>(partials, n, 0.0, out, out_fp64, stream);
}

// ---------------------------------------------------------------- streaming (the floor)
namespace {
constexpr int kStreamBlocks = 1024;

__global__ void __launch_bounds__(kThreads) stream_read_kernel(const float* x, int64_t n,
                                                               double* out) {
  __shared__ double block_sum[kThreads];
  double sum = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    sum += __ldcs(x + i);  // streamed: read once, not kept in L2
  }
  block_sum[threadIdx.x] = sum;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) block_sum[threadIdx.x] += block_sum[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(out, block_sum[0]);
}

__global__ void __launch_bounds__(kThreads) stream_fill_kernel(float* x, int64_t n, float value) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    __stcs(x + i, value);
  }
}

__global__ void __launch_bounds__(kThreads) stream_triad_kernel(float* a, const float* b,
                                                                const float* c, float s,
                                                                int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    __stcs(a + i, __ldcs(b + i) + s * __ldcs(c + i));
  }
}

__global__ void __launch_bounds__(kThreads) stream_update_kernel(float* a, const float* b,
                                                                 const float* c, float* d,
                                                                 float s, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float di = s * __ldcs(d + i) + __ldcs(c + i);
    __stcs(d + i, di);
    __stcs(a + i, __ldcs(b + i) - s * di);
  }
}

int stream_blocks(int64_t n) {
  const int64_t needed = (n + kThreads - 1) / kThreads;
  return static_cast<int>(needed < kStreamBlocks ? (needed > 0 ? needed : 1) : kStreamBlocks);
}
}  // namespace

void stream_read(const float* x, int64_t n, double* out, void* stream) {
  stream_read_kernel<<<stream_blocks(n), kThreads, 0, as_stream(stream)>>>(x, n, out);
  check_launch("stream read");
}

void stream_fill(float* x, int64_t n, float value, void* stream) {
  stream_fill_kernel<<<stream_blocks(n), kThreads, 0, as_stream(stream)>>>(x, n, value);
  check_launch("stream fill");
}

void stream_triad(float* a, const float* b, const float* c, float s, int64_t n, void* stream) {
  stream_triad_kernel<<<stream_blocks(n), kThreads, 0, as_stream(stream)>>>(a, b, c, s, n);
  check_launch("stream triad");
}

void stream_update(float* a, const float* b, const float* c, float* d, float s, int64_t n,
                   void* stream) {
  stream_update_kernel<<<stream_blocks(n), kThreads, 0, as_stream(stream)>>>(a, b, c, d, s, n);
  check_launch("stream update");
}

bool runnable(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();  // leave no sticky error for the next launch check
    return false;
  }
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, restore_kernel<float>);
  cudaGetLastError();
  cudaSetDevice(previous);
  return err == cudaSuccess;
}

}  // namespace cuda
}  // namespace fastsam
