// CPU loops of the passes of docs/design.md §2: arithmetic only (validation and tables are in
// the binding, binding/). Each pass is one sweep over memory, segments split across threads with
// at::parallel_for; the per-element math is elementwise.h, shared with the CUDA kernels.
//
// Loops are written so gcc vectorises them without -ffast-math: reductions keep independent
// accumulators (lane_sum: a fixed order that depends on the segment length only, so the
// norm is bitwise the same for any thread count), and pointers of one sweep are __restrict__.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // _mm_stream_ps, _mm_sfence: SSE, present on every x86-64 CPU
#define FASTSAM_STREAMING_STORES 1
#endif

#include "dispatch.h"
#include "elementwise.h"
#include "kernels.h"

namespace fastsam {
namespace cpu {
namespace {

// Streaming stores (x86-64): a line written without being read first is not read for
// ownership, so a pass that writes a list it does not read moves 4 bytes per fp32 element
// fewer. Where they pay was measured on the ResNet-50 set (2 threads, the 2-core CI machine):
// pass B with w_old streamed 17 ms against 21 with plain stores, and GSAM's pass B with its
// kept g copied (streamed) after each segment 20 against 28, where a second streamed store in
// each block made it 4x slower and streaming w too (its lines were just read) 1.4x slower;
// restore 8.5 against 13.5 ms.
constexpr int kStreamBlock = 16;  // elements per block: 32-128 bytes, whole 16-byte stores

// Whether dst can take streamed blocks (16-byte aligned).
inline bool streamable(const void* dst) {
#ifdef FASTSAM_STREAMING_STORES
  return reinterpret_cast<std::uintptr_t>(dst) % 16 == 0;
#else
  return false;
#endif
}

// Streamed stores are weakly ordered: publish them before the sweep returns.
inline void stream_fence() {
#ifdef FASTSAM_STREAMING_STORES
  _mm_sfence();
#endif
}

// dst[0:kStreamBlock) = src[0:kStreamBlock), the bytes as they are (any storage dtype);
// streamable(dst).
template <typename S>
inline void stream_copy_block(S* dst, const S* src) {
#ifdef FASTSAM_STREAMING_STORES
  static_assert(kStreamBlock * sizeof(S) % 16 == 0, "whole 16-byte stores");
  auto* d = reinterpret_cast<__m128i*>(dst);
  const auto* from = reinterpret_cast<const __m128i*>(src);
  for (size_t k = 0; k < kStreamBlock * sizeof(S) / 16; ++k) {
    _mm_stream_si128(d + k, _mm_loadu_si128(from + k));
  }
#else
  std::memcpy(dst, src, kStreamBlock * sizeof(S));
#endif
}

// dst[0:n) = src[0:n), streamed where dst allows (restore, pass B's copies of a skipped step).
template <typename S>
void copy_streamed(S* __restrict__ dst, const S* __restrict__ src, int64_t n) {
  int64_t i = 0;
  if (streamable(dst)) {
    for (; i + kStreamBlock <= n; i += kStreamBlock) stream_copy_block(dst + i, src + i);
    stream_fence();
  }
  std::memcpy(dst + i, src + i, (n - i) * sizeof(S));
}

// dst[i] = value(i) for i in [0, n), value called once per i in order. The update passes write
// w without reading it (they read w_old): their fp32 stores stream (sgd pass on the ResNet-50
// set 29-30 GB/s).
template <typename S, typename F>
inline void write_all(S* dst, int64_t n, F&& value) {
  int64_t i = 0;
#ifdef FASTSAM_STREAMING_STORES
  if constexpr (std::is_same_v<S, float>) {
    if (streamable(dst)) {
      alignas(16) float block[kStreamBlock];
      for (; i + kStreamBlock <= n; i += kStreamBlock) {
        // Elements are independent (each list's i-th element is read and written by iteration
        // i only), which the compiler cannot prove through the lambda's captured pointers.
#pragma GCC ivdep
        for (int j = 0; j < kStreamBlock; ++j) block[j] = value(i + j);
        for (int j = 0; j < kStreamBlock; j += 4) {
          _mm_stream_ps(dst + i + j, _mm_load_ps(block + j));
        }
      }
      stream_fence();
    }
  }
#endif
#pragma GCC ivdep
  for (; i < n; ++i) dst[i] = value(i);
}

// Compute type: double for fp64 storage, float for fp32/fp16/bf16 (widened on load; c10's
// conversions round to nearest even on store).
template <typename S>
using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename F>
void with_storage(DType dtype, F&& f) {
  fastsam::with_storage<c10::Half, c10::BFloat16>(dtype, f);
}

struct Segment {
  int64_t tensor, start, len;
};

inline Segment segment(const Table& tab, int64_t s) {
  return {tab.seg[3 * s], tab.seg[3 * s + 1], tab.seg[3 * s + 2]};
}

template <typename S>
S* address(const Table& tab, int role, const Segment& seg) {
  return reinterpret_cast<S*>(tab.addr[role * tab.n_tensors + seg.tensor]) + seg.start;
}

// Below this many elements a sweep runs on the calling thread: starting and joining the
// other threads would cost more than the sweep (a table of many tiny tensors).
constexpr int64_t kParallelElements = 1 << 15;

// f(segment index) for every segment: the table's elements are split into one run of whole
// segments per thread, of (within a segment) equal element counts, unless the table holds fewer
// than kParallelElements elements (then all on the calling thread). Splitting by segment count
// instead gave one of two threads 55 % of the ResNet-50 set's elements (its early layers are
// many small tensors). The order of the norm's partial sums is per segment either way: the
// same bits for any thread count.
template <typename F>
void for_each_segment(const Table& tab, F&& f) {
  int64_t elements = 0;
  for (int64_t s = 0; s < tab.n_segments && elements < kParallelElements; ++s) {
    elements += tab.seg[3 * s + 2];
  }
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), tab.n_segments);
  if (elements < kParallelElements || parts < 2) {
    for (int64_t s = 0; s < tab.n_segments; ++s) f(s);
    return;
  }
  int64_t total = 0;
  for (int64_t s = 0; s < tab.n_segments; ++s) total += tab.seg[3 * s + 2];
  // Part p runs the segments whose first element, counted over the table, lies in
  // [p·total/parts, (p+1)·total/parts): each scans the table's lengths (no allocation).
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t lo = p * total / parts, hi = (p + 1) * total / parts;
      int64_t first = 0;
      for (int64_t s = 0; s < tab.n_segments && first < hi; ++s) {
        if (first >= lo) f(s);
        first += tab.seg[3 * s + 2];
      }
    }
  });
}

// A reduction reads its segment as kRuns equal runs at once, each into kRunLanes accumulators
// of its own: one core's reads go faster over several streams than over one (a read-only sweep
// of the ResNet-50 set on the 2-core CI machine: 4 runs 4.1-4.7 ms against 5.2-6.2 for one;
// 8 runs no faster). Elementwise passes keep one stream: more streams of streamed stores
// were 1.2-5x slower.
constexpr int kRuns = 4, kRunLanes = 8;

// Σ term(i) over [0, n): run k covers [k·r, (k+1)·r) with r = n rounded down to a multiple of
// kRuns·kRunLanes, divided by kRuns; element k·r + i goes to accumulator k·kRunLanes + i %
// kRunLanes; the accumulators are added in order, then the tail (fewer than kRuns·kRunLanes
// elements, from kRuns·r) one by one. The order depends on n only. Written so that gcc keeps
// the accumulators in vector registers: the tail indexing them made it spill them every block,
// and a loop over the runs made it shuffle elements into place.
template <typename A, typename F>
A lane_sum(int64_t n, F&& term) {
  static_assert(kRuns == 4, "one line per run below");
  constexpr int kAll = kRuns * kRunLanes;
  if (n < kAll) {  // no whole block: the tail alone, in the same order (the lanes add up to +0)
    A total = 0;   // (tiny tensors: adding 32 zero lanes in order cost more than their sum)
    for (int64_t i = 0; i < n; ++i) total += term(i);
    return total;
  }
  A lanes[kAll] = {};
  const int64_t run = n / kAll * kRunLanes;
  for (int64_t i = 0; i < run; i += kRunLanes) {
    A t[kAll];
    for (int j = 0; j < kRunLanes; ++j) {
      t[j] = term(i + j);
      t[kRunLanes + j] = term(run + i + j);
      t[2 * kRunLanes + j] = term(2 * run + i + j);
      t[3 * kRunLanes + j] = term(3 * run + i + j);
    }
    for (int j = 0; j < kAll; ++j) lanes[j] += t[j];
  }
  A total = 0;
  for (int j = 0; j < kAll; ++j) total += lanes[j];
  for (int64_t i = kRuns * run; i < n; ++i) total += term(i);
  return total;
}

template <typename S, int QM, bool MOM>
void norm_segment(const Table& tab, const NormArgs& a, int64_t s) {
  using A = Acc<S>;
  const Segment seg = segment(tab, s);
  const S* __restrict__ g = address<const S>(tab, kNormG, seg);
  const S* __restrict__ w = address<const S>(tab, kNormW, seg);
  const S* __restrict__ m = MOM ? address<const S>(tab, a.momentum_role, seg) : nullptr;
  const A sigma = MOM ? A(a.momentum[3 * tab.group[seg.tensor]]) : A(0);
  // The direction the perturbation follows: g, or FriendlySAM's d = g − sigma·m.
  auto d = [&](int64_t i) {
    if constexpr (MOM) return friendly_direction(A(g[i]), A(m[i]), sigma);
    return A(g[i]);
  };
  const A q = A(a.q);
  const A eta = A(tab.eta[seg.tensor]);
  double partial = 0.0, row_T = 0.0;
  switch (tab.mode[seg.tensor]) {
    case kPlain:
    case kOuter:  // T multiplies e after the normalisation: the norm is over g
      partial = lane_sum<A>(seg.len, [&](int64_t i) { return pow_q<QM>(fs_abs(d(i)), q); });
      break;
    case kElement:
      partial = lane_sum<A>(seg.len, [&](int64_t i) {
        return pow_q<QM>(fs_abs((fs_abs(A(w[i])) + eta) * d(i)), q);
      });
      break;
    default: {  // kFilter: the segment is one filter; T = ‖w[i]‖₂ + eta is constant over it
      const A sq = lane_sum<A>(seg.len, [&](int64_t i) { return A(w[i]) * A(w[i]); });
      const A gq = lane_sum<A>(seg.len, [&](int64_t i) { return pow_q<QM>(fs_abs(d(i)), q); });
      const A T = fs_sqrt(sq) + eta;
      partial = pow_q<QM>(T, q) * gq;
      row_T = T;
    }
  }
  a.partials[s] = partial;
  a.row_T[s] = row_T;
}

// `yes ? a : b` as bit operations on the storage bits (exact, signed zeros and all): GCC
// vectorises this where it turns the conditional store of a select into a branch.
template <typename S>
inline S blend(bool yes, S a, S b) {
  using Bits = std::conditional_t<sizeof(S) == 8, uint64_t,
                                  std::conditional_t<sizeof(S) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(Bits) == sizeof(S), "storage of 2, 4 or 8 bytes");
  Bits x, y;
  std::memcpy(&x, &a, sizeof x);
  std::memcpy(&y, &b, sizeof y);
  const Bits all = static_cast<Bits>(-static_cast<Bits>(yes));
  const Bits bits = static_cast<Bits>((x & all) | (y & ~all));
  S out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

template <typename S, int QM, int EXTRA, bool MASK>
#ifdef __GNUC__
__attribute__((always_inline))  // also into masked_segment_avx2, compiled for AVX2 there
#endif
inline void perturb_segment(const Table& tab, const PerturbArgs& a, bool ok, Acc<S> inv_denom,
                            int64_t s) {
  using A = Acc<S>;
  constexpr bool KEEP = EXTRA == kExtraKeep, MOM = EXTRA == kExtraMomentum;
  const Segment seg = segment(tab, s);
  S* __restrict__ w = address<S>(tab, kPertW, seg);
  const S* __restrict__ g = address<const S>(tab, kPertG, seg);
  S* __restrict__ old = address<S>(tab, kPertOld, seg);
  S* __restrict__ keep = KEEP ? address<S>(tab, kPertKeep, seg) : nullptr;
  const S* __restrict__ m = MOM ? address<const S>(tab, a.momentum_role, seg) : nullptr;
  S* __restrict__ m_next = MOM ? address<S>(tab, a.momentum_role + 1, seg) : nullptr;
  if (!ok) {  // non-finite norm: no perturbation, w stays bit-identical (and m: m_next = m)
    copy_streamed(old, w, seg.len);
    if (KEEP) copy_streamed(keep, g, seg.len);
    if (MOM) copy_streamed(m_next, m, seg.len);
    return;
  }
  const double* mom = MOM ? a.momentum + 3 * tab.group[seg.tensor] : nullptr;
  const A sigma = MOM ? A(mom[0]) : A(0), lmbda = MOM ? A(mom[1]) : A(0);
  const A gain = MOM ? A(mom[2]) : A(0);
  const A scale = A(a.rho[tab.group[seg.tensor]]) * inv_denom;
  const A q = A(a.q);
  const A eta = A(tab.eta[seg.tensor]);
  const A row_T = A(a.row_T[s]);
  const int mode = static_cast<int>(tab.mode[seg.tensor]);
  // ESAM: the tensor's mask stream and its group's threshold (elementwise.h mask_draw).
  const MaskStream stream =
      MASK ? mask_stream(a.mask_key0, a.mask_key1, tab.index[seg.tensor]) : MaskStream{0, 0};
  // draw < threshold as draw <= threshold - 1 (threshold >= 1): a 32-bit compare
  const uint32_t last = MASK ? static_cast<uint32_t>(a.mask[tab.group[seg.tensor]] - 1.0) : 0;
  const int64_t first = seg.start + (MASK && a.mask_offset != nullptr
                                         ? static_cast<int64_t>(a.mask_offset[tab.index[seg.tensor]])
                                         : 0);  // the mask's index of element 0
  // The new w of element i (m_next's element written on the way).
  auto moved = [&](int64_t i, auto step) {
    const S wi = w[i];
    const S gi = g[i];
    A di = A(gi);
    if constexpr (MOM) {
      const A mi = A(m[i]);
      di = friendly_direction(A(gi), mi, sigma);
      m_next[i] = S(friendly_momentum(mi, A(gi), lmbda, gain));
    }
    const S out = S(A(wi) + scale * step(A(wi), di));
    if constexpr (MASK) return blend(mask_draw(stream, first + i) <= last, out, wi);
    return out;
  };
  // Block by block: w_old streamed, then w rewritten in place with plain stores (its lines
  // are in cache from that read); GSAM's kept g streamed after the blocks (streaming stores,
  // above). One loop per mode (the mode is fixed per tensor), so each loop vectorises.
  auto sweep = [&](auto step) {
    int64_t i = 0;
    if (streamable(old)) {
      for (; i + kStreamBlock <= seg.len; i += kStreamBlock) {
        stream_copy_block(old + i, w + i);
#pragma GCC ivdep
        for (int j = 0; j < kStreamBlock; ++j) w[i + j] = moved(i + j, step);
      }
      stream_fence();
      if (KEEP) copy_streamed(keep, g, i);
    }
    for (; i < seg.len; ++i) {
      const S out = moved(i, step);
      old[i] = w[i];
      if (KEEP) keep[i] = g[i];
      w[i] = out;
    }
  };
  switch (mode) {
    case kPlain:
      sweep([&](A, A gi) { return direction<QM>(A(1), gi, q); });
      break;
    case kElement:
      sweep([&](A wi, A gi) { return direction<QM>(fs_abs(wi) + eta, gi, q); });
      break;
    case kFilter:
      sweep([&](A, A gi) { return direction<QM>(row_T, gi, q); });
      break;
    default:  // kOuter
      sweep([&](A wi, A gi) { return (fs_abs(wi) + eta) * direction<QM>(A(1), gi, q); });
  }
}

#if defined(FASTSAM_STREAMING_STORES) && defined(__GNUC__)
// ESAM's masked sweep hashes every element (elementwise.h mask_draw: 32-bit multiplies, which
// the x86-64 baseline's SSE2 lacks, so its baseline loop runs at about half the memory's rate):
// compiled for AVX2 too, and taken where the CPU has it. The same arithmetic: the same bits.
#define FASTSAM_AVX2_MASK 1
template <typename S, int QM, int EXTRA>
__attribute__((target("avx2"))) void masked_segment_avx2(const Table& tab, const PerturbArgs& a,
                                                         bool ok, Acc<S> inv_denom, int64_t s) {
  perturb_segment<S, QM, EXTRA, true>(tab, a, ok, inv_denom, s);
}

// FASTSAM_CPU_BASELINE=1 keeps the baseline loop (tests/test_esam.py runs it that way).
bool has_avx2() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && std::getenv("FASTSAM_CPU_BASELINE") == nullptr;
  return yes;
}
#endif

// The per-launch scalars of update_gradient: 1 + alpha·along (along for LookSAM's correction),
// alpha, and the sign.
template <typename A>
struct GradientScalars {
  A coefficient, alpha, sign, gain;  // gain: max_grad_norm's clip coefficient (1 without)
};

template <typename A>
GradientScalars<A> gradient_scalars(const DecomposeArgs& d, bool maximize) {
  const A sign = maximize ? A(-1) : A(1);
  const A gain = d.gain == nullptr ? A(1)
                 : d.gain_fp64    ? A(*static_cast<const double*>(d.gain))
                                  : A(*static_cast<const float*>(d.gain));
  if (d.mode != kGradDecompose && d.mode != kGradCorrect) return {A(1), A(0), sign, gain};
  const A along = d.along_fp64 ? A(*static_cast<const double*>(d.along))
                               : A(*static_cast<const float*>(d.along));
  if (d.mode == kGradCorrect) return {along, A(0), sign, gain};
  return {A(1) + A(d.alpha) * along, A(d.alpha), sign, gain};
}

// AVG (the averaged weights follow w, SgdArgs.average_role) is a template argument: a run-time
// test in the loop kept it from vectorising (ResNet-50 set: 114 vs 62 ms per SAM step).
template <typename S, bool HAS_MOMENTUM, bool FRESH, bool NESTEROV, int GM, bool AVG>
void sgd_segment(const Table& tab, const SgdArgs& a, const GradientScalars<Acc<S>>& k,
                 int64_t s) {
  using A = Acc<S>;
  const Segment seg = segment(tab, s);
  // w_old may be w itself (a parameter that was not perturbed): no __restrict__ on those two.
  S* w = address<S>(tab, kSgdW, seg);
  const S* old = address<const S>(tab, kSgdOld, seg);
  const S* __restrict__ g = address<const S>(tab, kSgdG, seg);
  S* __restrict__ first = GM != kGradPlain ? address<S>(tab, a.decompose.first_role, seg) : nullptr;
  S* __restrict__ buf = HAS_MOMENTUM ? address<S>(tab, kSgdBuf, seg) : nullptr;
  S* __restrict__ avg = AVG ? address<S>(tab, a.average_role, seg) : nullptr;
  const double* hp = scalars(a);
  const A lr = A(hp[0]), momentum = A(hp[1]), dampening = A(hp[2]);
  const A weight_decay = A(hp[3]);
  const A avg_weight = AVG ? A(hp[kSgdAverageWeight]) : A(0);
  write_all(w, seg.len, [&](int64_t i) {
    A b = (HAS_MOMENTUM && !FRESH) ? A(buf[i]) : A(0);
    const A g_in = A(g[i]) * k.gain;  // clipped (max_grad_norm); FreeSAM stores the product
    const A d = update_gradient<GM>(g_in, GM != kGradPlain ? A(first[i]) : A(0),
                                    k.coefficient, k.alpha, k.sign);
    if (GM == kGradSwap) first[i] = S(g_in);
    const A updated = fastsam::sgd<HAS_MOMENTUM, FRESH, NESTEROV>(A(old[i]), d, b, lr, momentum,
                                                                  dampening, weight_decay);
    if (HAS_MOMENTUM) buf[i] = S(b);
    const S out = S(updated);
    if constexpr (AVG) avg[i] = S(average(A(avg[i]), A(out), avg_weight));
    return out;
  });
}

template <typename S, bool DECOUPLED, bool AMSGRAD, int GM, bool AVG>
void adam_segment(const Table& tab, const AdamArgs& a, const GradientScalars<Acc<S>>& gk,
                  int64_t s) {
  using A = Acc<S>;
  const Segment seg = segment(tab, s);
  S* w = address<S>(tab, kAdamW, seg);
  const S* old = address<const S>(tab, kAdamOld, seg);
  const S* __restrict__ g = address<const S>(tab, kAdamG, seg);
  S* __restrict__ first = GM != kGradPlain ? address<S>(tab, a.decompose.first_role, seg) : nullptr;
  S* __restrict__ m = address<S>(tab, kAdamM, seg);
  S* __restrict__ v = address<S>(tab, kAdamV, seg);
  S* __restrict__ vmax = AMSGRAD ? address<S>(tab, kAdamVmax, seg) : nullptr;
  S* __restrict__ avg = AVG ? address<S>(tab, a.average_role, seg) : nullptr;
  // Bias corrections: the launch's (hp[5], hp[6]) or this tensor's row of a.bias.
  const double* hp = scalars(a);
  const double* bias = a.bias ? a.bias + 2 * tab.group[seg.tensor] : hp + 5;
  const AdamScalars<A> k{A(hp[1]), A(hp[2]), A(hp[3]), A(hp[4]),
                         A(bias[0]), A(bias[1]), A(hp[7])};
  const A avg_weight = AVG ? A(hp[kAdamAverageWeight]) : A(0);
  write_all(w, seg.len, [&](int64_t i) {
    A mi = A(m[i]), vi = A(v[i]), vmaxi = AMSGRAD ? A(vmax[i]) : A(0);
    const A g_in = A(g[i]) * gk.gain;  // clipped (max_grad_norm); FreeSAM stores the product
    const A gi = update_gradient<GM>(g_in, GM != kGradPlain ? A(first[i]) : A(0),
                                     gk.coefficient, gk.alpha, gk.sign);
    if (GM == kGradSwap) first[i] = S(g_in);
    const A updated = fastsam::adam<DECOUPLED, AMSGRAD>(A(old[i]), gi, mi, vi, vmaxi, k);
    m[i] = S(mi);
    v[i] = S(vi);
    if (AMSGRAD) vmax[i] = S(vmaxi);
    const S out = S(updated);
    if constexpr (AVG) avg[i] = S(average(A(avg[i]), A(out), avg_weight));
    return out;
  });
}

// A skipped update (SgdArgs.skip set): w ← w_old (role `old`), nothing else written. The flag
// is in host memory here: the CPU reads it without waiting for anything.
bool skipped_update(const Table& t, const float* skip, int old) {
  static_assert(kSgdW == 0 && kAdamW == 0, "w is role 0 of every update");
  if (skip == nullptr || *skip == 0.0f) return false;
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    for_each_segment(t, [&](int64_t s) {
      const Segment seg = segment(t, s);
      std::memmove(address<S>(t, 0, seg), address<const S>(t, old, seg), seg.len * sizeof(S));
    });
  });
  return true;
}

}  // namespace

void norm_partials(const Table& t, const NormArgs& a) {
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    with_qmode(a.qmode, [&](auto qm) {
      with_bool(a.momentum != nullptr, [&](auto mom) {
        for_each_segment(t, [&](int64_t s) {
          norm_segment<S, decltype(qm)::value, decltype(mom)::value>(t, a, s);
        });
      });
    });
  });
}

namespace {
// GSAM's three sums over one segment in one sweep, laid out as lane_sum's with two runs (each
// run reads two lists: four streams, as a norm reads): run k covers [k·r, (k+1)·r) with r =
// len rounded down to a multiple of 2·kRunLanes, halved; element k·r + i goes to accumulator
// k·kRunLanes + i % kRunLanes of each sum; the accumulators are added in order, then the tail
// element by element. gcc's code for the plain loop shuffled every element into place (the
// pass at 2.4-2.9x its floor on the ResNet-50 set): for fp32 on x86-64 the lanes are written
// out as SSE vectors, the same multiplies and adds in the same order, hence the same bits.
template <typename S>
void gsam_segment(const S* __restrict__ adv, const S* __restrict__ first, int64_t len,
                  double* out) {
  using A = Acc<S>;
  constexpr int kRunsHere = 2, kAll = kRunsHere * kRunLanes;
  A inner[kAll] = {}, adv_sq[kAll] = {}, first_sq[kAll] = {};
  const int64_t run = len / kAll * kRunLanes;
  // Element e into one accumulator of each sum (the products in A, the sums in T: A for the
  // lanes, double for the tail).
  auto accumulate = [&](auto& in, auto& aa, auto& ff, int64_t e) {
    const A a = A(adv[e]), f = A(first[e]);
    in += f * a;
    aa += a * a;
    ff += f * f;
  };
  bool done = false;
#ifdef FASTSAM_STREAMING_STORES
  if constexpr (std::is_same_v<S, float>) {
    static_assert(kRunLanes == 8, "two SSE vectors per run and sum");
    constexpr int kVectors = kAll / 4;  // vector v holds accumulators 4v .. 4v+3
    __m128 in[kVectors], aa[kVectors], ff[kVectors];
    for (int v = 0; v < kVectors; ++v) in[v] = aa[v] = ff[v] = _mm_setzero_ps();
    for (int64_t i = 0; i < run; i += kRunLanes) {
      for (int v = 0; v < kVectors; ++v) {
        const int64_t e = (v / 2) * run + i + 4 * (v % 2);
        const __m128 a = _mm_loadu_ps(adv + e), f = _mm_loadu_ps(first + e);
        in[v] = _mm_add_ps(in[v], _mm_mul_ps(f, a));
        aa[v] = _mm_add_ps(aa[v], _mm_mul_ps(a, a));
        ff[v] = _mm_add_ps(ff[v], _mm_mul_ps(f, f));
      }
    }
    for (int v = 0; v < kVectors; ++v) {
      _mm_storeu_ps(inner + 4 * v, in[v]);
      _mm_storeu_ps(adv_sq + 4 * v, aa[v]);
      _mm_storeu_ps(first_sq + 4 * v, ff[v]);
    }
    done = true;
  }
#endif
  if (!done) {
    for (int64_t i = 0; i < run; i += kRunLanes) {
      for (int k = 0; k < kRunsHere; ++k) {
        for (int j = 0; j < kRunLanes; ++j) {
          const int lane = k * kRunLanes + j;
          accumulate(inner[lane], adv_sq[lane], first_sq[lane], k * run + i + j);
        }
      }
    }
  }
  out[0] = out[1] = out[2] = 0.0;
  for (int j = 0; j < kAll; ++j) {
    out[0] += inner[j];
    out[1] += adv_sq[j];
    out[2] += first_sq[j];
  }
  for (int64_t e = kRunsHere * run; e < len; ++e) accumulate(out[0], out[1], out[2], e);
}
}  // namespace

double sum_partials(const double* partials, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += partials[i];
  return total;
}

void perturb(const Table& t, const PerturbArgs& a) {
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using A = Acc<S>;
    const A S_sum = a.norm_fp64 ? A(*static_cast<const double*>(a.norm_sum))
                                : A(*static_cast<const float*>(a.norm_sum));
    const bool ok = finite(S_sum);
    with_qmode(a.qmode, [&](auto qm) {
      constexpr int QM = decltype(qm)::value;
      const A inv_denom = inverse_denominator<QM>(S_sum, A(a.inv_p), A(a.eps));
      with_extra(a, [&](auto extra) {
        constexpr int EXTRA = decltype(extra)::value;
#ifdef FASTSAM_AVX2_MASK
        if (a.mask != nullptr && has_avx2()) {
          for_each_segment(t, [&](int64_t s) {
            masked_segment_avx2<S, QM, EXTRA>(t, a, ok, inv_denom, s);
          });
          return;
        }
#endif
        with_bool(a.mask != nullptr, [&](auto mask) {
          for_each_segment(t, [&](int64_t s) {
            perturb_segment<S, QM, EXTRA, decltype(mask)::value>(t, a, ok, inv_denom, s);
          });
        });
      });
    });
    *a.skipped = ok ? 0.0f : 1.0f;
  });
}

void restore(const Table& t) {
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    for_each_segment(t, [&](int64_t s) {
      const Segment seg = segment(t, s);
      copy_streamed(address<S>(t, kRestoreW, seg), address<const S>(t, kRestoreOld, seg),
                    seg.len);
    });
  });
}

// x − x is 0 for every finite x and NaN for inf and NaN, and a NaN stays NaN through a sum:
// one lane_sum per segment (vectorised, no branch per element) is 0 exactly when the segment
// is finite. Segments after the first non-finite one are not read.
void nonfinite(const Table& t, float* found) {
  std::atomic<bool> any{false};
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using A = Acc<S>;
    for_each_segment(t, [&](int64_t s) {
      if (any.load(std::memory_order_relaxed)) return;
      const Segment seg = segment(t, s);
      const S* __restrict__ x = address<const S>(t, kCheckX, seg);
      const A sum = lane_sum<A>(seg.len, [&](int64_t i) {
        const A v = A(x[i]);
        return v - v;
      });
      if (!(sum == A(0))) any.store(true, std::memory_order_relaxed);
    });
  });
  if (any.load()) *found = 1.0f;
}

void scale(const Table& t, const void* factor) {
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using A = Acc<S>;
    const A f = A(*static_cast<const S*>(factor));
    for_each_segment(t, [&](int64_t s) {
      const Segment seg = segment(t, s);
      S* __restrict__ x = address<S>(t, kScaleX, seg);
      for (int64_t i = 0; i < seg.len; ++i) x[i] = S(A(x[i]) * f);
    });
  });
}

void wsam_decoupled(const Table& t, const WsamArgs& a) {
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using A = Acc<S>;
    const A c = a.gain == nullptr ? A(1)
                : a.gain_fp64     ? A(*static_cast<const double*>(a.gain))
                                  : A(*static_cast<const float*>(a.gain));
    const A alpha = A(a.alpha);
    for_each_segment(t, [&](int64_t s) {
      const Segment seg = segment(t, s);
      S* __restrict__ w = address<S>(t, kWsamW, seg);
      S* __restrict__ first = address<S>(t, kWsamFirst, seg);
      const S* __restrict__ g = address<const S>(t, kWsamG, seg);
#pragma GCC ivdep
      for (int64_t i = 0; i < seg.len; ++i) {
        const S d = S(A(first[i]) - c * A(g[i]));
        first[i] = d;
        w[i] = S(A(w[i]) + alpha * A(d));
      }
    });
  });
}

void sgd(const Table& t, const SgdArgs& a) {
  if (skipped_update(t, a.skip, kSgdOld)) return;
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    const auto k = gradient_scalars<Acc<S>>(a.decompose, a.maximize);
    with_sgd_flags(a.has_momentum, a.fresh, a.nesterov, [&](auto m, auto f, auto n) {
      with_grad_mode(a.decompose.mode, [&](auto x) {
        with_bool(a.average_role >= 0, [&](auto avg) {
          for_each_segment(t, [&](int64_t s) {
            sgd_segment<S, decltype(m)::value, decltype(f)::value, decltype(n)::value,
                        decltype(x)::value, decltype(avg)::value>(t, a, k, s);
          });
        });
      });
    });
  });
}

void adam(const Table& t, const AdamArgs& a) {
  if (skipped_update(t, a.skip, kAdamOld)) return;
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    const auto k = gradient_scalars<Acc<S>>(a.decompose, a.maximize);
    with_bool(a.decoupled, [&](auto d) {
      with_bool(a.amsgrad, [&](auto ams) {
        with_grad_mode(a.decompose.mode, [&](auto x) {
          with_bool(a.average_role >= 0, [&](auto avg) {
            for_each_segment(t, [&](int64_t s) {
              adam_segment<S, decltype(d)::value, decltype(ams)::value, decltype(x)::value,
                           decltype(avg)::value>(t, a, k, s);
            });
          });
        });
      });
    });
  });
}

void gsam_partials(const Table& t, double* partials) {
  with_storage(t.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    for_each_segment(t, [&](int64_t s) {
      const Segment seg = segment(t, s);
      gsam_segment(address<const S>(t, kGsamAdv, seg), address<const S>(t, kGsamFirst, seg),
                   seg.len, partials + 3 * s);
    });
  });
}

void gsam_sums(const double* partials, int64_t n, double* sums) {
  sums[0] = sums[1] = sums[2] = 0.0;
  for (int64_t s = 0; s < n; ++s) {
    for (int k = 0; k < 3; ++k) sums[k] += partials[3 * s + k];
  }
}

double gsam_along(const double* partials, int64_t n, double eps) {
  double sums[3];
  gsam_sums(partials, n, sums);
  return fastsam::gsam_along(sums[0], sums[1], sums[2], eps);
}

// ---------------------------------------------------------------- streaming (the floor)
namespace {
constexpr int64_t kStreamChunk = 1 << 16;

template <typename F>
void for_each_chunk(int64_t n, F&& f) {
  at::parallel_for(0, (n + kStreamChunk - 1) / kStreamChunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      f(c * kStreamChunk, std::min(kStreamChunk, n - c * kStreamChunk));
    }
  });
}
}  // namespace

// The read rate of the floor: the reductions' loop (lane_sum: four runs at once) over each
// thread's share of x, one range per thread (runs as long as they can be: runs within 64K-element
// chunks read the ResNet-50 set's 25.6M elements ~10 % slower, and GSAM's sums, two lists of
// two runs each, outran them).
double stream_read(const float* x, int64_t n) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                               n / kStreamChunk));
  std::vector<double> partial(static_cast<size_t>(parts), 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t lo = p * n / parts, hi = (p + 1) * n / parts;
      const float* __restrict__ q = x + lo;
      partial[p] = lane_sum<float>(hi - lo, [&](int64_t i) { return q[i]; });
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

void stream_fill(float* x, int64_t n, float value) {
  for_each_chunk(n, [&](int64_t start, int64_t len) {
    write_all(x + start, len, [&](int64_t) { return value; });
  });
}

void stream_triad(float* a, const float* b, const float* c, float s, int64_t n) {
  for_each_chunk(n, [&](int64_t start, int64_t len) {
    const float* __restrict__ bb = b + start;
    const float* __restrict__ cc = c + start;
    write_all(a + start, len, [&](int64_t i) { return bb[i] + s * cc[i]; });
  });
}

// The update's shape, looped as sgd_segment loops: a written through write_all (streamed), d
// read and written in place. (s is copied: a store to d through a reference to s would keep
// gcc from vectorising, as it might change s.)
void stream_update(float* a, const float* b, const float* c, float* d, float s, int64_t n) {
  for_each_chunk(n, [&](int64_t start, int64_t len) {
    const float* __restrict__ bb = b + start;
    const float* __restrict__ cc = c + start;
    float* __restrict__ dd = d + start;
    const float k = s;
    write_all(a + start, len, [&](int64_t i) {
      const float di = k * dd[i] + cc[i];
      dd[i] = di;
      return bb[i] - k * di;
    });
  });
}

}  // namespace cpu
}  // namespace fastsam
