// The operators of fastsam._C, each written once for every device adapter D (Cpu, Cuda): check
// the arguments, get the tables, run the kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <optional>

#include "../kernels.h"
#include "checks.h"
#include "tables.h"

namespace fastsam {
namespace {  // this header is included by csrc/binding.cpp only

// How a pass gets its segment tables: `check` before anything else, `tables` once the scalar
// arguments are checked, with `options()` giving the per-tensor options (an optional
// PerTensor; called only when tables are built). The list operators check every list and
// build the tables at each call (Fresh); the held operators reuse the tables of an earlier
// call over the same lists (binding/held.h HeldTables).
struct Fresh {
  void check(const char* op, const Lists& lists) const { check_lists(op, lists); }
  template <class D, class Options>
  TablesPtr tables(const char* op, const D& dev, const Lists& lists, Options&& options) const {
    const std::optional<PerTensor> per = options();
    return dev.tables(op, lists, per ? &*per : nullptr);
  }
};

std::optional<PerTensor> no_options() { return std::nullopt; }

// A pass without per-tensor options over `lists` (the parameters first): its tables from `src`
// on the parameters' device, and f(dev, table) for each; nothing without parameters. `tables`
// stays alive over the loop (the views point into it).
template <class D, class Src, class F>
void over_tables(const Src& src, const char* op, const Lists& lists, F&& f) {
  const at::TensorList params = lists.front().second;
  if (params.empty()) return;
  const D dev(params[0].device());
  const TablesPtr tables = src.template tables<D>(op, dev, lists, no_options);
  for (const Table& t : tables->views) f(dev, t);
}

// FriendlySAM's momentum of a norm or perturb call (kernels.h NormArgs.momentum): the lists
// join the call's lists (m, then m_next for perturb) and group_momentum, 3 float64 per group,
// must be on the parameters' device. Returns the per-group array, null without a momentum.
template <class D>
const double* momentum_args(const char* op, Lists& lists, at::TensorList momentum,
                            at::TensorList momentum_next, bool writes,
                            const std::optional<at::Tensor>& group_momentum, size_t n_groups) {
  if (momentum.empty() && momentum_next.empty() && !group_momentum.has_value()) return nullptr;
  TORCH_CHECK_VALUE(group_momentum.has_value(), msg("fastsam.", op,
                    ": momentum lists given without group_momentum"));
  TORCH_CHECK_VALUE(writes || momentum_next.empty(), msg("fastsam.", op,
                    ": takes no momentum_next"));
  lists.emplace_back("momentum", momentum);
  if (writes) lists.emplace_back("momentum_next", momentum_next);
  const at::Tensor& coefficients = *group_momentum;
  check_scalar_tensor(op, "group_momentum", coefficients, lists.front().second, 3 * n_groups);
  TORCH_CHECK_TYPE(coefficients.scalar_type() == at::kDouble, msg("fastsam.", op,
                   ": group_momentum must be float64, got ", coefficients.scalar_type()));
  check_device<D>(op, "group_momentum", coefficients);
  return coefficients.data_ptr<double>();
}

template <class D, class Src>
void norm_pass(const Src& src, at::TensorList params, at::TensorList grads,
               at::IntArrayRef group_sizes, at::IntArrayRef group_modes,
               at::ArrayRef<double> group_etas, double q, const at::Tensor& out,
               const at::Tensor& scratch,
               at::TensorList momentum, const std::optional<at::Tensor>& group_momentum) {
  Lists lists{{"params", params}, {"grads", grads}};
  const int momentum_role = static_cast<int>(lists.size());
  const double* coefficients = momentum_args<D>("norm", lists, momentum, {}, false,
                                                group_momentum, group_sizes.size());
  src.check("norm", lists);
  check_exponents("norm", q);
  check_norm_out("norm", "out", out, params);
  check_device<D>("norm", "out", out);
  const D dev(device_of(params, out));
  const TablesPtr tables = src.template tables<D>("norm", dev, lists, [&] {
    return std::optional<PerTensor>(
        expand_groups("norm", params, group_sizes, group_modes, group_etas));
  });
  const int64_t n = tables->n_segments;
  check_scratch("norm", scratch, params, n, /*grow=*/true);
  double* partials = scratch.data_ptr<double>();
  int64_t offset = 0;
  for (const Table& t : tables->views) {
    dev.norm_partials(t, {qmode_of(q), q, partials + offset, partials + n + offset,
                          coefficients, momentum_role});
    offset += t.n_segments;
  }
  dev.norm_sum(partials, n, out);
}

template <class D>
void norm_op(at::TensorList params, at::TensorList grads, at::IntArrayRef group_sizes,
             at::IntArrayRef group_modes, at::ArrayRef<double> group_etas, double q,
             at::Tensor& out, at::Tensor& scratch, at::TensorList momentum,
             const std::optional<at::Tensor>& group_momentum) {
  norm_pass<D>(Fresh{}, params, grads, group_sizes, group_modes, group_etas, q, out, scratch,
               momentum, group_momentum);
}

template <class D, class Src>
void perturb_pass(const Src& src, at::TensorList params, at::TensorList grads,
                  at::TensorList w_old, at::IntArrayRef group_sizes,
                  at::IntArrayRef group_modes, at::ArrayRef<double> group_etas,
                  const at::Tensor& group_rhos, const at::Tensor& norm_sum,
                  const at::Tensor& scratch, double q, double p, double eps,
                  const at::Tensor& skipped,
                  at::TensorList keep, at::TensorList momentum, at::TensorList momentum_next,
                  const std::optional<at::Tensor>& group_momentum,
                  const std::optional<at::Tensor>& group_mask, int64_t mask_key0,
                  int64_t mask_key1) {
  Lists lists{{"params", params}, {"grads", grads}, {"w_old", w_old}};
  if (!keep.empty()) lists.emplace_back("keep", keep);
  const int momentum_role = static_cast<int>(lists.size());
  const double* coefficients = momentum_args<D>("perturb", lists, momentum, momentum_next, true,
                                                group_momentum, group_sizes.size());
  TORCH_CHECK_VALUE(keep.empty() || coefficients == nullptr, msg("fastsam.perturb: keep and ",
                    "momentum together are not supported"));
  src.check("perturb", lists);
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
  const double* mask = nullptr;
  const double* mask_offset = nullptr;
  if (group_mask.has_value()) {  // ESAM (kernels.h PerturbArgs.mask, mask_offset)
    const int64_t n_groups = static_cast<int64_t>(group_sizes.size());
    const int64_t n_tensors = static_cast<int64_t>(params.size());
    check_scalar_tensor("perturb", "group_mask", *group_mask, params, n_groups);
    TORCH_CHECK_VALUE(group_mask->numel() == n_groups ||
                          group_mask->numel() == n_groups + n_tensors,
                      msg("fastsam.perturb: group_mask holds ", group_mask->numel(), " values: a ",
                          "threshold per group (", n_groups, "), then optionally an offset per ",
                          "tensor (", n_tensors, ")"));
    TORCH_CHECK_TYPE(group_mask->scalar_type() == at::kDouble, msg("fastsam.perturb: ",
                     "group_mask must be float64, got ", group_mask->scalar_type()));
    check_device<D>("perturb", "group_mask", *group_mask);
    for (const int64_t key : {mask_key0, mask_key1}) {
      TORCH_CHECK_VALUE(key >= 0 && key <= int64_t(UINT32_MAX), msg("fastsam.perturb: ",
                        "mask keys are 32-bit unsigned integers, got ", key));
    }
    mask = group_mask->data_ptr<double>();
    if (group_mask->numel() > n_groups) mask_offset = mask + n_groups;
  }
  const D dev(device_of(params, norm_sum));
  const TablesPtr tables = src.template tables<D>("perturb", dev, lists, [&] {
    return std::optional<PerTensor>(
        expand_groups("perturb", params, group_sizes, group_modes, group_etas));
  });
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
                   !keep.empty(),
                   coefficients,
                   momentum_role,
                   mask,
                   static_cast<uint32_t>(mask_key0),
                   static_cast<uint32_t>(mask_key1),
                   mask_offset};
  for (const Table& t : tables->views) {
    dev.perturb(t, args);
    args.row_T += t.n_segments;
  }
}

template <class D>
void perturb_op(at::TensorList params, at::TensorList grads, at::TensorList w_old,
                at::IntArrayRef group_sizes, at::IntArrayRef group_modes,
                at::ArrayRef<double> group_etas, const at::Tensor& group_rhos,
                const at::Tensor& norm_sum, const at::Tensor& scratch, double q, double p,
                double eps, at::Tensor& skipped, at::TensorList keep, at::TensorList momentum,
                at::TensorList momentum_next, const std::optional<at::Tensor>& group_momentum,
                const std::optional<at::Tensor>& group_mask, int64_t mask_key0,
                int64_t mask_key1) {
  perturb_pass<D>(Fresh{}, params, grads, w_old, group_sizes, group_modes, group_etas,
                  group_rhos, norm_sum, scratch, q, p, eps, skipped, keep, momentum,
                  momentum_next, group_momentum, group_mask, mask_key0, mask_key1);
}

template <class D, class Src>
void restore_pass(const Src& src, at::TensorList params, at::TensorList w_old) {
  const Lists lists{{"params", params}, {"w_old", w_old}};
  src.check("restore", lists);
  over_tables<D>(src, "restore", lists, [](const D& dev, const Table& t) { dev.restore(t); });
}

template <class D>
void restore_op(at::TensorList params, at::TensorList w_old) {
  restore_pass<D>(Fresh{}, params, w_old);
}

// skip_nonfinite's check: `found` (one float32 element) ← 1 when an element of `tensors` is
// inf or NaN, left as it is otherwise (a flag several calls add to, as torch's
// _amp_foreach_non_finite_check_and_unscale_ keeps one). Reads each element once, any dtype
// in one call; a held call leaves the gradients to its tables (`tensors` empty).
template <class D, class Src>
void nonfinite_pass(const Src& src, at::TensorList tensors, const at::Tensor& found) {
  const Lists lists{{"tensors", tensors}};
  src.check("nonfinite", lists);
  check_scalar_tensor("nonfinite", "found", found, tensors, 1);
  TORCH_CHECK_TYPE(found.scalar_type() == at::kFloat,
                   msg("fastsam.nonfinite: found must be float32, got ", found.scalar_type()));
  check_device<D>("nonfinite", "found", found);
  const D dev(device_of(tensors, found));
  const TablesPtr tables =
      src.template tables<D>("nonfinite", dev, lists, no_options);  // alive for the loop
  for (const Table& t : tables->views) dev.nonfinite(t, found.data_ptr<float>());
}

template <class D>
void nonfinite_op(at::TensorList tensors, at::Tensor& found) {
  nonfinite_pass<D>(Fresh{}, tensors, found);
}

// GradScaler's unscale: each tensor of `tensors` times the factor of its dtype in `factors`
// (one-element tensors, at most one per dtype: 1/scale rounded once to it), in place, as
// torch's mul_ by a 0-d tensor of the tensor's dtype computes it. A dtype without its factor is
// refused before anything is written. A held call leaves the gradients to its tables.
template <class D, class Src>
void scale_pass(const Src& src, at::TensorList tensors, at::TensorList factors) {
  const Lists lists{{"tensors", tensors}};
  src.check("scale", lists);
  TORCH_CHECK_VALUE(!factors.empty(), "fastsam.scale: needs the factor of each dtype, got none");
  const c10::Device device = device_of(tensors, factors.front());
  const void* factor_of[4] = {};  // by DType
  for (size_t i = 0; i < factors.size(); ++i) {
    const at::Tensor& f = factors[i];
    TORCH_CHECK_VALUE(f.defined() && f.numel() == 1 && f.device() == device,
                      msg("fastsam.scale: factors[", i, "] must be one value on ", device));
    check_device<D>("scale", "factors", f);
    factor_of[storage_code("scale", "factors", i, f)] = f.data_ptr();
  }
  const D dev(device);
  const TablesPtr tables = src.template tables<D>("scale", dev, lists, no_options);
  static constexpr const char* kNames[] = {"Float", "Double", "Half", "BFloat16"};
  for (const Table& t : tables->views) {
    TORCH_CHECK_VALUE(factor_of[t.dtype] != nullptr,
                      msg("fastsam.scale: no factor of dtype ", kNames[t.dtype]));
  }
  for (const Table& t : tables->views) dev.scale(t, factor_of[t.dtype]);
}

template <class D>
void scale_op(at::TensorList tensors, at::TensorList factors) {
  scale_pass<D>(Fresh{}, tensors, factors);
}

// The gradient source of an update (kernels.h GradMode `grad_mode`): appends first_grads to
// the lists for every mode but plain: GSAM's first gradients (with along and alpha), FreeSAM's
// stored gradients (which the update reads and then overwrites with g), or LookSAM's
// directions (with their coefficient in along).
template <class D>
DecomposeArgs gradient_source(const char* op, Lists& lists, at::TensorList first_grads,
                              const std::optional<at::Tensor>& along, double alpha,
                              int64_t grad_mode) {
  TORCH_CHECK_VALUE(grad_mode >= kGradPlain && grad_mode < kGradModes,
                    msg("fastsam.", op, ": grad_mode = ", grad_mode,
                        " (0 plain, 1 GSAM decomposition, 2 FreeSAM swap, 3 LookSAM correction)"));
  const int mode = static_cast<int>(grad_mode);
  if (mode == kGradPlain) {
    TORCH_CHECK_VALUE(first_grads.empty(),
                      msg("fastsam.", op, ": first_grads given with grad_mode 0 (plain)"));
    return {kGradPlain, 0, 0.0, nullptr, false, nullptr, false};
  }
  TORCH_CHECK_VALUE(!first_grads.empty(), msg("fastsam.", op, ": grad_mode ", grad_mode,
                                              " needs first_grads (the second gradient)"));
  lists.emplace_back("first_grads", first_grads);
  const int role = static_cast<int>(lists.size() - 1);
  if (mode == kGradSwap) return {kGradSwap, role, 0.0, nullptr, false, nullptr, false};
  TORCH_CHECK_VALUE(along.has_value(), msg("fastsam.", op, ": grad_mode ", grad_mode,
                                           " needs along (the coefficient, a 0-d tensor)"));
  check_norm_out(op, "along", *along, lists.front().second);
  check_device<D>(op, "along", *along);
  return {mode, role, alpha, along->data_ptr(), along->scalar_type() == at::kDouble, nullptr,
          false};
}

// max_grad_norm's clip coefficient (kernels.h DecomposeArgs.gain, WsamArgs.gain) into `gain`
// and `gain_fp64` when given.
template <class D>
void clip_gain(const char* op, const void*& gain, bool& gain_fp64,
               const std::optional<at::Tensor>& clip, at::TensorList params) {
  if (!clip.has_value()) return;
  check_norm_out(op, "clip", *clip, params);
  check_device<D>(op, "clip", *clip);
  gain = clip->data_ptr();
  gain_fp64 = clip->scalar_type() == at::kDouble;
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

// The scalars of an update (kernels.h SgdArgs): `hp` by value into `values`, and the device
// array `hp_device` (the same scalars, formed on the device) when given.
template <class D, size_t N>
const double* update_scalars(const char* op, at::ArrayRef<double> hp,
                             const std::optional<at::Tensor>& hp_device, at::TensorList params,
                             int64_t n, double (&values)[N]) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(hp.size()) == n && n <= static_cast<int64_t>(N),
                    msg("fastsam.", op, ": hp has ", hp.size(), " values, needs ", n));
  std::fill(values, values + N, 0.0);
  std::copy(hp.begin(), hp.end(), values);
  if (!hp_device.has_value()) return nullptr;
  check_hp(op, *hp_device, params, n);
  check_device<D>(op, "hp_device", *hp_device);
  return hp_device->data_ptr<double>();
}

// The arguments every update shares (kernels.h SgdArgs, AdamArgs): scalars, gradient source,
// averaging, skip flag.
template <class D, class Args>
Args update_args(const char* op, at::ArrayRef<double> hp,
                 const std::optional<at::Tensor>& hp_device, at::TensorList params,
                 int64_t n_scalars, const DecomposeArgs& decompose, int avg_role, bool maximize,
                 const std::optional<at::Tensor>& skip) {
  Args args{};
  args.hp = update_scalars<D>(op, hp, hp_device, params, n_scalars, args.values);
  args.maximize = maximize;
  args.decompose = decompose;
  args.average_role = avg_role;
  args.skip = skip_flag<D>(op, skip, params);
  return args;
}

template <class D, class Src>
void sgd_pass(const Src& src, at::TensorList params, at::TensorList grads, at::TensorList w_old,
              at::TensorList momentum_buffers, at::ArrayRef<double> hp,
              const std::optional<at::Tensor>& hp_device, bool nesterov, bool maximize,
              bool fresh, at::TensorList first_grads, const std::optional<at::Tensor>& along,
              double alpha, int64_t grad_mode, at::TensorList average,
              const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& clip) {
  const bool has_momentum = !momentum_buffers.empty();
  Lists lists{{"params", params}, {"grads", grads}, {"w_old", w_old}};
  if (has_momentum) lists.emplace_back("momentum_buffers", momentum_buffers);
  DecomposeArgs decompose =
      gradient_source<D>("sgd", lists, first_grads, along, alpha, grad_mode);
  clip_gain<D>("sgd", decompose.gain, decompose.gain_fp64, clip, params);
  const int avg_role = average_role(lists, average);
  src.check("sgd", lists);
  SgdArgs args = update_args<D, SgdArgs>("sgd", hp, hp_device, params,
                                         avg_role < 0 ? 4 : kSgdAverageWeight + 1, decompose,
                                         avg_role, maximize, skip);
  args.has_momentum = has_momentum;
  args.fresh = fresh;
  args.nesterov = nesterov;
  over_tables<D>(src, "sgd", lists, [&](const D& dev, const Table& t) { dev.sgd(t, args); });
}

template <class D>
void sgd_op(at::TensorList params, at::TensorList grads, at::TensorList w_old,
            at::TensorList momentum_buffers, at::ArrayRef<double> hp,
            const std::optional<at::Tensor>& hp_device, bool nesterov, bool maximize,
            bool fresh, at::TensorList first_grads, const std::optional<at::Tensor>& along,
            double alpha, int64_t grad_mode, at::TensorList average,
            const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& clip) {
  sgd_pass<D>(Fresh{}, params, grads, w_old, momentum_buffers, hp, hp_device, nesterov, maximize,
              fresh, first_grads, along, alpha, grad_mode, average, skip, clip);
}

template <class D, class Src>
void adam_pass(const Src& src, at::TensorList params, at::TensorList grads, at::TensorList w_old,
               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::ArrayRef<double> hp,
               const std::optional<at::Tensor>& hp_device, bool decoupled, bool amsgrad,
               bool maximize, at::TensorList first_grads, const std::optional<at::Tensor>& along,
               double alpha, int64_t grad_mode, at::TensorList average,
               const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& clip) {
  Lists lists{{"params", params},
              {"grads", grads},
              {"w_old", w_old},
              {"exp_avgs", exp_avgs},
              {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) lists.emplace_back("max_exp_avg_sqs", max_exp_avg_sqs);
  DecomposeArgs decompose =
      gradient_source<D>("adam", lists, first_grads, along, alpha, grad_mode);
  clip_gain<D>("adam", decompose.gain, decompose.gain_fp64, clip, params);
  const int avg_role = average_role(lists, average);
  src.check("adam", lists);
  AdamArgs args = update_args<D, AdamArgs>("adam", hp, hp_device, params,
                                           avg_role < 0 ? 8 : kAdamAverageWeight + 1, decompose,
                                           avg_role, maximize, skip);
  args.decoupled = decoupled;
  args.amsgrad = amsgrad;
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
  args.bias = bias.has_value() ? bias->data_ptr<double>() : nullptr;
  const D dev(params[0].device());
  const TablesPtr tables = src.template tables<D>("adam", dev, lists, [&] {
    return positions;
  });  // alive for the loop
  for (const Table& t : tables->views) dev.adam(t, args);
}

template <class D>
void adam_op(at::TensorList params, at::TensorList grads, at::TensorList w_old,
             at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
             at::ArrayRef<double> hp, const std::optional<at::Tensor>& hp_device,
             bool decoupled, bool amsgrad, bool maximize,
             at::TensorList first_grads, const std::optional<at::Tensor>& along, double alpha,
             int64_t grad_mode, at::TensorList average, const std::optional<at::Tensor>& skip,
             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& clip) {
  adam_pass<D>(Fresh{}, params, grads, w_old, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hp,
               hp_device, decoupled, amsgrad, maximize, first_grads, along, alpha, grad_mode,
               average, skip, bias, clip);
}

// WSAM's decoupled term (kernels.h WsamArgs): first ← first − clip·g, w ← w + alpha·first.
template <class D, class Src>
void wsam_decoupled_pass(const Src& src, at::TensorList params, at::TensorList first,
                         at::TensorList grads, double alpha,
                         const std::optional<at::Tensor>& clip) {
  const Lists lists{{"params", params}, {"first", first}, {"grads", grads}};
  src.check("wsam_decoupled", lists);
  WsamArgs args{alpha, nullptr, false};
  clip_gain<D>("wsam_decoupled", args.gain, args.gain_fp64, clip, params);
  over_tables<D>(src, "wsam_decoupled", lists,
                 [&](const D& dev, const Table& t) { dev.wsam_decoupled(t, args); });
}

template <class D>
void wsam_decoupled_op(at::TensorList params, at::TensorList first, at::TensorList grads,
                       double alpha, const std::optional<at::Tensor>& clip) {
  wsam_decoupled_pass<D>(Fresh{}, params, first, grads, alpha, clip);
}

// GSAM's reduction: along (sums = false: out is one element) or the three sums (out has 3).
// The out and scratch checks read first_grads (laid out as grads: the table source checks it),
// which a held call gives where it leaves the gradients to its tables (held.h HeldTables).
template <class D, class Src>
void gsam_reduce(const Src& src, const char* op, at::TensorList grads,
                 at::TensorList first_grads, double eps, bool sums, const at::Tensor& out,
                 const at::Tensor& scratch) {
  const Lists lists{{"grads", grads}, {"first_grads", first_grads}};
  src.check(op, lists);
  check_norm_out(op, "out", out, first_grads, sums ? 3 : 1);
  check_device<D>(op, "out", out);
  check_scalar_tensor(op, "scratch", scratch, first_grads, 0);
  TORCH_CHECK_TYPE(scratch.scalar_type() == at::kDouble, msg("fastsam.", op,
                   ": scratch must be float64, got ", scratch.scalar_type()));
  const D dev(device_of(first_grads, out));
  const TablesPtr tables = src.template tables<D>(op, dev, lists, no_options);
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
  gsam_reduce<D>(Fresh{}, "gsam_along", grads, first_grads, eps, false, out, scratch);
}

template <class D>
void gsam_sums_op(at::TensorList grads, at::TensorList first_grads, at::Tensor& out,
                  at::Tensor& scratch) {
  gsam_reduce<D>(Fresh{}, "gsam_sums", grads, first_grads, 0.0, true, out, scratch);
}

// The benchmark's streaming kernels (kernels.h): contiguous fp32 arrays, each of the first
// one's size and device (a device of D's kind).
struct StreamArray {
  const char* name;
  const at::Tensor& t;
};

template <class D>
void check_stream_arrays(const char* op, std::initializer_list<StreamArray> arrays) {
  const StreamArray& first = *arrays.begin();
  for (const StreamArray& a : arrays) {
    const at::Tensor& t = a.t;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat,
                     msg("fastsam.", op, ": ", a.name, " must be float32, got ", t.scalar_type()));
    TORCH_CHECK_VALUE(t.is_contiguous(), msg("fastsam.", op, ": ", a.name, " must be contiguous"));
    TORCH_CHECK_VALUE(t.numel() == first.t.numel() && t.device() == first.t.device(),
                      msg("fastsam.", op, ": ", a.name, " has ", t.numel(), " elements on ",
                          t.device(), ", the first array ", first.t.numel(), " on ",
                          first.t.device()));
  }
  check_device<D>(op, first.name, first.t);
}

template <class D>
void stream_read_op(const at::Tensor& x, at::Tensor& out) {
  check_stream_arrays<D>("stream_read", {{"x", x}});
  TORCH_CHECK_TYPE(out.scalar_type() == at::kDouble && out.numel() == 1 &&
                       out.device() == x.device(),
                   msg("fastsam.stream_read: out must be one float64 element on ", x.device()));
  const D dev(x.device());
  dev.stream_read(x.data_ptr<float>(), x.numel(), out);
}

template <class D>
void stream_fill_op(at::Tensor& x, double value) {
  check_stream_arrays<D>("stream_fill", {{"x", x}});
  const D dev(x.device());
  dev.stream_fill(x.data_ptr<float>(), x.numel(), static_cast<float>(value));
}

template <class D>
void stream_triad_op(at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double s) {
  check_stream_arrays<D>("stream_triad", {{"a", a}, {"b", b}, {"c", c}});
  const D dev(a.device());
  dev.stream_triad(a.data_ptr<float>(), b.data_ptr<float>(), c.data_ptr<float>(),
                   static_cast<float>(s), a.numel());
}

template <class D>
void stream_update_op(at::Tensor& a, const at::Tensor& b, const at::Tensor& c, at::Tensor& d,
                      double s) {
  check_stream_arrays<D>("stream_update", {{"a", a}, {"b", b}, {"c", c}, {"d", d}});
  const D dev(a.device());
  dev.stream_update(a.data_ptr<float>(), b.data_ptr<float>(), c.data_ptr<float>(),
                    d.data_ptr<float>(), static_cast<float>(s), a.numel());
}

}  // namespace
}  // namespace fastsam
