// Per-element arithmetic of every pass, shared by the CPU (cpu_kernels.cpp) and CUDA
// (cuda_kernels.cu) loops so the two backends compute the same formulas in the same order.
// No torch headers: values arrive widened to the compute type A (float, or double for fp64
// storage); the callers load and store the storage dtype.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define FASTSAM_HD __host__ __device__ __forceinline__
#else
#define FASTSAM_HD inline
#endif

namespace fastsam {

// Per-tensor operator code of the ASAM scaling T (fastsam.functional.Scaling). kOuter: T = 1
// in the norm, and e multiplied by |w| + eta (Adaptive-GSAM).
enum Mode : int { kPlain = 0, kElement = 1, kFilter = 2, kOuter = 3 };
// Dual exponent q of the perturbation: q = 2 (p = 2), q = 1 (p = inf), anything else.
enum QMode : int { kQ2 = 0, kQ1 = 1, kQAny = 2 };

FASTSAM_HD float fs_exp2(float x) { return exp2f(x); }
FASTSAM_HD double fs_exp2(double x) { return exp2(x); }
FASTSAM_HD float fs_log2(float x) { return log2f(x); }
FASTSAM_HD double fs_log2(double x) { return log2(x); }
FASTSAM_HD float fs_sqrt(float x) { return sqrtf(x); }
FASTSAM_HD double fs_sqrt(double x) { return sqrt(x); }
FASTSAM_HD float fs_abs(float x) { return fabsf(x); }
FASTSAM_HD double fs_abs(double x) { return fabs(x); }

// x^q for x >= 0 (0^q = 0 for q > 0: exp2(q * -inf) = 0).
template <int QM, typename A>
FASTSAM_HD A pow_q(A x, A q) {
  if (QM == kQ2) return x * x;
  if (QM == kQ1) return x;
  return fs_exp2(q * fs_log2(x));
}

// T·sign(u)·|u|^(q-1) with u = T·g: the direction of e before the scale ρ / (S^(1/p) + eps).
template <int QM, typename A>
FASTSAM_HD A direction(A T, A g, A q) {
  const A u = T * g;
  if (QM == kQ2) return T * u;
  const A sign = A(u > A(0)) - A(u < A(0));
  if (QM == kQ1) return T * sign;
  return T * sign * fs_exp2((q - A(1)) * fs_log2(fs_abs(u)));
}

// FriendlySAM (kernels.h NormArgs.momentum): the direction the perturbation follows,
// d = g − sigma·m, and the next momentum lmbda·m + gain·g.
template <typename A>
FASTSAM_HD A friendly_direction(A g, A m, A sigma) {
  return g - sigma * m;
}
template <typename A>
FASTSAM_HD A friendly_momentum(A m, A g, A lmbda, A gain) {
  return lmbda * m + gain * g;
}

// ESAM's Bernoulli mask (kernels.h PerturbArgs.mask), a counter-based draw that every backend
// computes the same way (fastsam.functional.Mask gives the definition; the Triton and torch
// backends follow it in their own arithmetic). mix32 is a 32-bit integer finaliser (xor-shift,
// multiply by an odd constant, twice: the constants of the "lowbias32" hash); all arithmetic
// wraps modulo 2^32.
FASTSAM_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// The two words of the stream of the tensor at `position` in this step (key0, key1).
struct MaskStream {
  uint32_t b, c;
};
FASTSAM_HD MaskStream mask_stream(uint32_t key0, uint32_t key1, int64_t position) {
  const uint32_t b = mix32(key0 ^ mix32(static_cast<uint32_t>(position)));
  return {b, mix32(key1 ^ b)};
}

// The draw of element i (its index in the tensor's storage order), uniform on [0, 2^32).
FASTSAM_HD uint32_t mask_draw(MaskStream s, int64_t i) {
  const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(i >> 32);
  return mix32(mix32(lo + s.b) ^ (s.c + hi));
}

// S is finite (neither inf nor NaN).
template <typename A>
FASTSAM_HD bool finite(A s) {
  return s == s && fs_abs(s) < A(INFINITY);
}

// 1 / (S^(1/p) + eps), 1 for p = inf (the sign perturbation has no denominator).
template <int QM, typename A>
FASTSAM_HD A inverse_denominator(A S, A inv_p, A eps) {
  if (QM == kQ1) return A(1);
  if (QM == kQ2) return A(1) / (fs_sqrt(S) + eps);
  return A(1) / (fs_exp2(fs_log2(S) * inv_p) + eps);
}

// GSAM (fastsam.functional.Backend.gsam_along): from the sums ⟨g_first, g⟩, ‖g‖², ‖g_first‖²,
// along = cos·‖g_first‖ / (‖g‖ + eps) with cos = ⟨g_first, g⟩ / (‖g‖·‖g_first‖ + eps).
template <typename A>
FASTSAM_HD A gsam_along(A inner, A adv_sq, A first_sq, A eps) {
  const A adv_norm = fs_sqrt(adv_sq), first_norm = fs_sqrt(first_sq);
  const A cosine = inner / (adv_norm * first_norm + eps);
  return cosine * first_norm / (adv_norm + eps);
}

// The gradient an update uses (GradMode of kernels.h), `first` the value at first_role: g;
// GSAM's (1 + alpha·along)·g − alpha·g_first (coefficient = 1 + alpha·along); FreeSAM's
// stored gradient `first` (the caller stores g there); or LookSAM's g + along·u_v
// (coefficient = along). Times sign = −1 when maximizing (exact).
template <int GM, typename A>
FASTSAM_HD A update_gradient(A g, A first, A coefficient, A alpha, A sign) {
  if (GM == 1) g = coefficient * g - alpha * first;
  if (GM == 2) g = first;
  if (GM == 3) g = g + coefficient * first;
  return sign * g;
}

// torch.optim.SGD on one element (fastsam.functional.Backend.restore_sgd), from w_old, with d
// the signed gradient (update_gradient). hp = [lr, momentum, dampening, weight_decay]; buf is
// read unless FRESH and written back.
template <bool HAS_MOMENTUM, bool FRESH, bool NESTEROV, typename A>
FASTSAM_HD A sgd(A w, A d, A& buf, A lr, A momentum, A dampening, A weight_decay) {
  d = d + weight_decay * w;
  if (HAS_MOMENTUM) {
    buf = FRESH ? d : momentum * buf + (A(1) - dampening) * d;  // first step: buf = d
    d = NESTEROV ? d + momentum * buf : buf;
  }
  return w - lr * d;
}

// Weight averaging (fastsam.functional.Average) of the stored new weight w: w itself when
// weight is 1 (the first average: an exact copy), avg itself when weight is 0 (capturable: an
// update the schedule does not average), else avg + weight·(w − avg).
template <typename A>
FASTSAM_HD A average(A avg, A w, A weight) {
  return weight == A(1) ? w : weight == A(0) ? avg : avg + weight * (w - avg);
}

// The scalars of torch.optim.Adam/AdamW as the launchers pass them:
// hp = [lr, β1, β2, eps, weight_decay, lr/(1-β1^t), sqrt(1-β2^t), 1 - lr·weight_decay].
template <typename A>
struct AdamScalars {
  A beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt, decay;
};

// torch.optim.Adam/AdamW on one element, from w_old, with g the signed gradient
// (update_gradient). m, v, vmax are read and written back.
template <bool DECOUPLED, bool AMSGRAD, typename A>
FASTSAM_HD A adam(A w, A g, A& m, A& v, A& vmax, const AdamScalars<A>& s) {
  if (DECOUPLED) {
    w = w * s.decay;
  } else {
    g = g + s.weight_decay * w;
  }
  m = m + (A(1) - s.beta1) * (g - m);  // lerp(m, g, 1 - β1)
  v = s.beta2 * v + (A(1) - s.beta2) * g * g;
  A second = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;
    second = vmax;
  }
  const A denom = fs_sqrt(second) / s.bias_correction2_sqrt + s.eps;
  return w - s.step_size * m / denom;
}

}  // namespace fastsam
