// The interface between the binding (binding.cpp, binding/: validation, tables, dispatch) and the
// kernel files (cpu_kernels.cpp, cuda_kernels.cu: arithmetic only). No torch headers.
//
// A launch covers the tensors of one storage dtype through a *segment table*: segment s is
// elements [start, start + len) of tensor `tensor`, and tensor t's base address for role r
// (w, g, w_old, state...) is addr[r * n_tensors + t]. For the CPU the tables live in host
// memory; for CUDA every pointer in a Table is a device pointer.
#pragma once

#include <cstdint>

namespace fastsam {

enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Table {
  DType dtype;
  int64_t n_tensors;
  int64_t n_segments;
  const int64_t* seg;    // 3 per segment: tensor, start, len
  const int64_t* addr;   // role-major base addresses
  const int64_t* mode;   // per tensor (perturbation passes): Mode of elementwise.h
  const double* eta;     // per tensor: ASAM eta
  const int64_t* group;  // per tensor: index into the per-group rho array
  const int64_t* index;  // per tensor: its position in the caller's lists (ESAM's mask)
};

// Roles, in the order the binding fills addr.
enum NormRole : int { kNormW = 0, kNormG = 1 };
enum RestoreRole : int { kRestoreW = 0, kRestoreOld = 1 };
enum PerturbRole : int { kPertW = 0, kPertG = 1, kPertOld = 2, kPertKeep = 3 };
enum SgdRole : int { kSgdW = 0, kSgdG = 1, kSgdOld = 2, kSgdBuf = 3 };
enum AdamRole : int { kAdamW = 0, kAdamG = 1, kAdamOld = 2, kAdamM = 3, kAdamV = 4, kAdamVmax = 5 };
enum GsamRole : int { kGsamAdv = 0, kGsamFirst = 1 };
enum CheckRole : int { kCheckX = 0 };
enum ScaleRole : int { kScaleX = 0 };
enum WsamRole : int { kWsamW = 0, kWsamFirst = 1, kWsamG = 2 };

// FriendlySAM (fastsam.functional.Momentum): with `momentum` (3 per group: sigma, lmbda, gain),
// the norm and the perturbation follow d = g − sigma·m, m at role `momentum_role`, and the
// perturb pass writes m_next = lmbda·m + gain·g at role `momentum_role + 1` (m_next = m when the
// norm is not finite). momentum == nullptr: no momentum.
struct NormArgs {
  int qmode;
  double q;
  double* partials;  // one per segment, in table order (written)
  double* row_T;     // one per segment: the filter norm + eta of filter segments (written)
  const double* momentum;
  int momentum_role;
};

struct PerturbArgs {
  int qmode;
  double q, inv_p, eps;
  const double* rho;      // per group
  const double* row_T;    // as written by the norm pass over the same table
  const void* norm_sum;   // 0-d, float or double (norm_fp64)
  bool norm_fp64;
  float* skipped;         // 0-d: 1 when norm_sum is not finite (w untouched), else 0
  bool keep;              // also keep ← g (role kPertKeep): GSAM's first gradient
  const double* momentum; // FriendlySAM's, as in NormArgs (not with keep)
  int momentum_role;
  // ESAM's stochastic weight perturbation (elementwise.h mask_draw): when `mask` is not null,
  // element i of the tensor at position Table.index[t] keeps its e where
  // mask_draw(mask_stream(mask_key0, mask_key1, position), i + offset) < mask[group] (the
  // group's threshold, ceil(keep·2^32)) and is not moved elsewhere (w_old ← w still written);
  // offset = mask_offset[position] (a shard's first element in its whole tensor, an exact
  // float64), 0 when mask_offset is null.
  const double* mask;
  uint32_t mask_key0, mask_key1;
  const double* mask_offset;
};

// What the perturb pass writes beside w_old and w (a template argument of its loops): nothing,
// the copy of g (PerturbArgs.keep) or the next momentum (PerturbArgs.momentum).
enum PerturbExtra : int { kExtraNone = 0, kExtraKeep = 1, kExtraMomentum = 2 };

// The gradient an update uses (fastsam.functional.GradientSource), `mode`:
//   kGradPlain      g
//   kGradDecompose  GSAM's (1 + alpha·along)·g − alpha·g_first, g_first at role `first_role`
//   kGradSwap       FreeSAM's stored gradient at role `first_role`, which then receives g
//   kGradCorrect    LookSAM's g + along·u_v, u_v at role `first_role`
// kGradModes counts them: the binding's range check and dispatch.h follow it.
enum GradMode : int {
  kGradPlain = 0,
  kGradDecompose = 1,
  kGradSwap = 2,
  kGradCorrect = 3,
  kGradModes
};

struct DecomposeArgs {
  int mode;
  int first_role;
  double alpha;
  // kGradDecompose, kGradCorrect: 0-d, float or double (along_fp64); device memory for CUDA
  const void* along;
  bool along_fp64;
  // max_grad_norm's clip coefficient, multiplying g before any formula above (FreeSAM stores
  // the product): 0-d, float or double (gain_fp64), device memory for CUDA; null: 1.
  const void* gain;
  bool gain_fp64;
};

// Weight averaging after an update (fastsam.functional.Average): the averaged weights are at
// role `average_role` (-1: no averaging) and the weight is the hp entry after the optimizer's.
//
// Sync-free updates (the optimizers' capturable=True): `skip`, when not null, is a float flag
// (device memory for CUDA) read by the kernels: non-zero → w ← w_old and nothing else is
// written (no state, no stored gradient, no average). Adam's `bias`, when not null, holds
// [lr/(1-β1^t), sqrt(1-β2^t)] per tensor, at 2·Table.group[t] (the tensor's position in the
// caller's lists), in place of hp[5] and hp[6].
//
// The scalars (hp) travel by value: `values` holds the host's numbers, and a CUDA launch
// carries them as kernel arguments, so a step with new values (an lr schedule, Adam's bias
// corrections, the SWA weight) uploads and allocates nothing. `hp`, when not null, points at
// the same scalars in device memory instead (values formed on the device: a tensor lr).
// Kernels read `scalars(a)`.
constexpr int kSgdAverageWeight = 4;
constexpr int kAdamAverageWeight = 8;

struct SgdArgs {
  const double* hp;
  double values[kSgdAverageWeight + 1];  // [lr, momentum, dampening, weight_decay, avg weight]
  bool has_momentum, fresh, nesterov, maximize;
  DecomposeArgs decompose;
  int average_role;
  const float* skip;
};

struct AdamArgs {
  const double* hp;
  // [lr, β1, β2, eps, wd, lr/(1-β1^t), sqrt(1-β2^t), 1 - lr·wd, averaging weight]
  double values[kAdamAverageWeight + 1];
  bool decoupled, amsgrad, maximize;
  DecomposeArgs decompose;
  int average_role;
  const float* skip;
  const double* bias;
};

// WSAM's decoupled term after its update (fastsam.WSAM, decouple=True), one pass: the kept
// first gradient becomes first − c·g (stored), then w ← w + alpha·first; c is max_grad_norm's
// clip coefficient, `gain` (0-d, float or double by gain_fp64, device memory for CUDA), 1 when
// null.
struct WsamArgs {
  double alpha;
  const void* gain;
  bool gain_fp64;
};

#if defined(__CUDACC__)
#define FASTSAM_HOST_DEVICE __host__ __device__
#else
#define FASTSAM_HOST_DEVICE
#endif

// The scalars a launch reads (above): device memory when given, else the values it carries.
template <class Args>
FASTSAM_HOST_DEVICE inline const double* scalars(const Args& a) {
  return a.hp != nullptr ? a.hp : a.values;
}

// The benchmark's streaming kernels (fastsam/bench/measure.py: the bytes-moved floor), over
// one contiguous fp32 array each: a read-only reduction (Σ x into a double), a store-only fill,
// a triad a = b + s·c, and the update's shape (SGD momentum's pass: three lists read, one
// written in place, one written without being read): d ← s·d + c, a ← b − s·d; written the
// way the passes write (stores that skip the cache where the passes' do).

namespace cpu {
double stream_read(const float* x, int64_t n);
void stream_fill(float* x, int64_t n, float value);
void stream_triad(float* a, const float* b, const float* c, float s, int64_t n);
void stream_update(float* a, const float* b, const float* c, float* d, float s, int64_t n);
void norm_partials(const Table& t, const NormArgs& a);
// Σ partials[0:n] in index order.
double sum_partials(const double* partials, int64_t n);
void perturb(const Table& t, const PerturbArgs& a);
void restore(const Table& t);
// *found ← 1 when an element of the table is inf or NaN (left as it was otherwise): the
// skip_nonfinite check, reading each element once.
void nonfinite(const Table& t, float* found);
// x ← x·factor (GradScaler's unscale), `factor` one value of the table's storage type: the
// product of the two widened values, rounded once (torch's own mul_ by a 0-d tensor).
void scale(const Table& t, const void* factor);
void wsam_decoupled(const Table& t, const WsamArgs& a);
void sgd(const Table& t, const SgdArgs& a);
void adam(const Table& t, const AdamArgs& a);
// GSAM's reduction: partials[3s + {0, 1, 2}] = Σ over segment s of g_first·g, g², g_first².
void gsam_partials(const Table& t, double* partials);
// The sums of n partial triples in index order → along (elementwise.h gsam_along).
double gsam_along(const double* partials, int64_t n, double eps);
// The same three sums themselves → sums[0:3].
void gsam_sums(const double* partials, int64_t n, double* sums);
}  // namespace cpu

namespace cuda {
// Every function queues its kernels on `stream` (a cudaStream_t) and returns at once.
// stream_read adds Σ x to *out (a double in device memory; zero it first).
void stream_read(const float* x, int64_t n, double* out, void* stream);
void stream_fill(float* x, int64_t n, float value, void* stream);
void stream_triad(float* a, const float* b, const float* c, float s, int64_t n, void* stream);
void stream_update(float* a, const float* b, const float* c, float* d, float s, int64_t n,
                   void* stream);
void norm_partials(const Table& t, const NormArgs& a, void* stream);
// out = Σ partials[0:n] in a fixed order (one block), stored as float or double.
void sum_partials(const double* partials, int64_t n, void* out, bool out_fp64, void* stream);
void perturb(const Table& t, const PerturbArgs& a, void* stream);
void restore(const Table& t, void* stream);
void nonfinite(const Table& t, float* found, void* stream);
void scale(const Table& t, const void* factor, void* stream);
void wsam_decoupled(const Table& t, const WsamArgs& a, void* stream);
void sgd(const Table& t, const SgdArgs& a, void* stream);
void adam(const Table& t, const AdamArgs& a, void* stream);
void gsam_partials(const Table& t, double* partials, void* stream);
// out = along from the n partial triples summed in a fixed order (one block).
void gsam_along(const double* partials, int64_t n, double eps, void* out, bool out_fp64,
                void* stream);
// out[0:3] = the three sums themselves (same order).
void gsam_sums(const double* partials, int64_t n, void* out, bool out_fp64, void* stream);
// Whether these kernels have an image (machine code or PTX) that `device` can run: false when
// the extension was built for other architectures (FASTSAM_CUDA_ARCHS) or there is no device.
bool runnable(int device);
}  // namespace cuda

}  // namespace fastsam
