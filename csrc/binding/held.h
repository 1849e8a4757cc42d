// A step plan's tensors held in C++ (fastsam._C binding; docs/design.md §5): the parameters of
// a plan (their gradients are read here, at each call), and the lists bound to the plan once (w_old,
// momentum buffers, Adam's moments, ...), so that a steady-state step hands the operators
// group numbers and list names instead of Python lists of tensors. Converting a Python list
// costs ~0.2 us per tensor at every call; reading a gradient here costs a few ns.
//
// Python sees `HeldPlan` as fastsam._C.HeldPlan (binding/held_python.h, a plain CPython type:
// its calls convert their arguments in nanoseconds); its pass methods (norm, perturb,
// restore, sgd, adam, gsam: held_* below) take the groups of the call and, per list argument
// of the operator they stand for, the name of a bound list ("" for an empty list; "params";
// "grad": the parameters' gradients now) and run that operator (binding/ops.h) on the lists
// it resolves.
#pragma once

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <c10/util/SmallVector.h>
#include <c10/util/intrusive_ptr.h>

#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cpu_device.h"
#include "cuda_device.h"
#include "ops.h"
#include "text.h"

namespace fastsam {
namespace {  // this header is included by csrc/binding.cpp only

// A tensor's address without data_ptr()'s checks (for tensors checked dense and strided
// before; a moved one fails the comparison with the address kept).
inline const void* address_of(const c10::TensorImpl* impl) {
  return static_cast<const char*>(impl->storage().data()) +
         impl->storage_offset() * static_cast<int64_t>(impl->itemsize());
}
inline const void* address_of(const at::Tensor& t) { return address_of(t.unsafeGetTensorImpl()); }

// Sizes or strides equal (an inline loop: these are a few numbers).
inline bool same_dims(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k) {
    if (a[k] != b[k]) return false;
  }
  return true;
}

// The arguments of a held call as read from Python (binding/held_python.h FromPython): on the
// stack for the few groups and names of a call (no allocation per call); a name views the
// Python str it was read from, alive for the call.
using Ints = c10::SmallVector<int64_t, 8>;
using Doubles = c10::SmallVector<double, 12>;
using Names = c10::SmallVector<std::string_view, 8>;

// The tensors of one list argument of a held call: a view of the plan's own storage, or
// (the gradients, groups that are not consecutive) a vector of this call's.
struct Resolved {
  std::vector<at::Tensor> owned;
  at::TensorList view;
};

class HeldPlan : public c10::intrusive_ptr_target {
 public:
  // params: the plan's parameters, group after group (group g has group_sizes[g]); idle: the
  // other parameters of the optimizer (no gradient when the plan was made).
  HeldPlan(std::vector<at::Tensor> params, std::vector<int64_t> group_sizes,
           std::vector<at::Tensor> idle)
      : params_(std::move(params)), idle_(std::move(idle)) {
    starts_.push_back(0);
    for (int64_t n : group_sizes) {
      TORCH_CHECK_VALUE(n >= 0, "fastsam.HeldPlan: a negative group size");
      starts_.push_back(starts_.back() + n);
    }
    TORCH_CHECK_VALUE(starts_.back() == static_cast<int64_t>(params_.size()),
                      msg("fastsam.HeldPlan: group sizes add up to ", starts_.back(), ", there are ",
                          params_.size(), " parameters"));
    for (const at::Tensor& p : params_) {
      TORCH_CHECK_VALUE(p.device() == params_.front().device(),
                        msg("fastsam.HeldPlan: parameters on ", params_.front().device(), " and ",
                            p.device(), " (a plan's parameters are on one device)"));
      addresses_.push_back(p.data_ptr());
      dtypes_.push_back(p.dtype());
      dims_.push_back(p.dim());
      dims_.insert(dims_.end(), p.sizes().begin(), p.sizes().end());
      dims_.insert(dims_.end(), p.strides().begin(), p.strides().end());
    }
  }

  // Whether the plan still holds: each of its parameters has a dense gradient and the address,
  // dtype, shape and strides it had when the plan was made (a `p.data = p.data[:k]` keeps the
  // address: the kept tables would read k's gradient past its end), and no idle parameter has
  // gained a gradient (false: the caller makes a new plan). When it holds and every gradient
  // is laid out as its parameter (dtype, device, shape, strides: the passes' check, made here
  // once per step call), their addresses are kept for the passes of this step call, until
  // release(): the passes then rewrite their tables' gradient rows from them, without reading
  // a gradient again. No gradient is referenced here between steps.
  // (TensorImpl::grad() reads the gradient without Tensor::grad()'s hooks, which warn about
  // non-leaf tensors: a plan's parameters are leaves.)
  bool refresh() {
    release();
    for (const at::Tensor& p : idle_) {
      if (p.unsafeGetTensorImpl()->grad().defined()) return false;
    }
    grad_addresses_.resize(params_.size());
    // every parameter's device (checked when the plan was made; one moved has another address)
    const c10::Device device = params_.empty() ? c10::Device(c10::kCPU) : params_[0].device();
    bool laid_out = true;
    const int64_t* dims = dims_.data();  // (each parameter's: rank, sizes, strides)
    for (size_t i = 0; i < params_.size(); ++i) {
      const c10::TensorImpl* p = params_[i].unsafeGetTensorImpl();
      const c10::IntArrayRef sizes = p->sizes(), strides = p->strides();
      const int64_t rank = *dims++;
      const bool same = p->dtype() == dtypes_[i] && same_dims(sizes, {dims, dims + rank}) &&
                        same_dims(strides, {dims + rank, dims + 2 * rank});
      dims += 2 * rank;
      const at::Tensor& g = p->grad();
      if (!same || !g.defined() || g.layout() != at::kStrided || address_of(p) != addresses_[i]) {
        return false;
      }
      const c10::TensorImpl* q = g.unsafeGetTensorImpl();
      laid_out = laid_out && q->dtype() == dtypes_[i] && q->device() == device &&
                 same_dims(q->sizes(), sizes) && same_dims(q->strides(), strides);
      grad_addresses_[i] = laid_out ? reinterpret_cast<int64_t>(address_of(q)) : 0;
    }
    grads_read_ = laid_out;
    return true;
  }

  // Forgets the gradient addresses refresh() kept (the caller's step call is over).
  void release() { grads_read_ = false; }

  // The gradient addresses refresh() kept for this step call (null: none; the passes read
  // and check the gradients themselves).
  const int64_t* grad_addresses() const { return grads_read_ ? grad_addresses_.data() : nullptr; }

  // Plan positions of the tensors of a call over `groups`, in the call's list order.
  std::vector<int64_t> positions(at::IntArrayRef groups) const {
    std::vector<int64_t> out;
    for (int64_t g : groups) {
      check_group(g);
      for (int64_t i = starts_[g]; i < starts_[g + 1]; ++i) out.push_back(i);
    }
    return out;
  }

  // List `name` of group `group`: one tensor per parameter of the group, in its order. Calls
  // made before over the list rebuild their tables at their next use (the addresses changed).
  void bind(const std::string& name, int64_t group, std::vector<at::Tensor> tensors) {
    TORCH_CHECK_VALUE(name != "params" && name != "grad" && !name.empty(),
                      msg("fastsam.HeldPlan.bind: '", name, "' is not a name to bind"));
    check_group(group);
    TORCH_CHECK_VALUE(static_cast<int64_t>(tensors.size()) == size(group),
                      msg("fastsam.HeldPlan.bind: ", tensors.size(), " tensors for group ", group,
                          " of ", size(group), " parameters"));
    auto& list = lists_[name];
    if (list.tensors.empty()) {
      list.tensors.resize(params_.size());
      list.bound.assign(starts_.size() - 1, false);
    }
    std::move(tensors.begin(), tensors.end(), list.tensors.begin() + starts_[group]);
    list.bound[group] = true;
    calls_.clear();  // (binding is once per plan and list: every call builds afresh after it)
  }

  // Forgets list `name` (every group; nothing if it is not bound): the calls over it build
  // afresh once it is bound again.
  void unbind(const std::string& name) {
    if (lists_.erase(name) != 0) calls_.clear();
  }

  // The tensors of list `name` over `groups`, concatenated ("" gives an empty list).
  Resolved resolve(std::string_view name, at::IntArrayRef groups) const {
    Resolved out;
    if (name.empty()) return out;
    for (int64_t g : groups) check_group(g);
    if (name == "grad") {
      for (int64_t g : groups) {
        for (int64_t i = starts_[g]; i < starts_[g + 1]; ++i) {
          const at::Tensor& grad = params_[i].grad();
          TORCH_CHECK_VALUE(grad.defined(), msg("fastsam.HeldPlan: parameter ", i, " of the plan "
                            "has no gradient (refresh() first)"));
          out.owned.push_back(grad);
        }
      }
      out.view = out.owned;
      return out;
    }
    const std::vector<at::Tensor>* all = &params_;
    if (name != "params") {
      auto it = lists_.find(std::string(name));  // (a short name: no allocation)
      TORCH_CHECK_VALUE(it != lists_.end(), msg("fastsam.HeldPlan: no list '", name, "'"));
      for (int64_t g : groups) {
        TORCH_CHECK_VALUE(it->second.bound[g],
                          msg("fastsam.HeldPlan: list '", name, "' is not bound for group ", g));
      }
      all = &it->second.tensors;
    }
    bool consecutive = true;
    for (size_t k = 1; k < groups.size(); ++k) consecutive &= groups[k] == groups[k - 1] + 1;
    if (consecutive && !groups.empty()) {
      const int64_t begin = starts_[groups.front()], end = starts_[groups.back() + 1];
      out.view = at::TensorList(all->data() + begin, end - begin);
      return out;
    }
    for (int64_t g : groups) {
      out.owned.insert(out.owned.end(), all->begin() + starts_[g], all->begin() + starts_[g + 1]);
    }
    out.view = out.owned;
    return out;
  }

  // Per group of `groups`, its number of parameters (the group_sizes of an operator).
  Ints sizes(at::IntArrayRef groups) const {
    Ints out;
    for (int64_t g : groups) {
      check_group(g);
      out.push_back(size(g));
    }
    return out;
  }

  // Adam's CPU step tensors of list `name` over `groups` (float32, 0-d): when they all hold
  // one value, add 1 to each and return the new value; else change nothing and return -1
  // (the caller takes the per-value path).
  double increment_steps(std::string_view name, at::IntArrayRef groups) const {
    const Resolved steps = resolve(name, groups);
    if (steps.view.empty()) return -1.0;
    // One checked read per tensor (the first one's twice; every tensor checked before anything
    // is decided), then the writes through addresses that need no second check.
    auto read = [](const at::Tensor& s) {
      const c10::TensorImpl* t = s.unsafeGetTensorImpl();
      TORCH_CHECK_VALUE(t->dtype() == caffe2::TypeMeta::Make<float>() && t->is_cpu() &&
                            t->numel() == 1 && t->layout() == at::kStrided,
                        "fastsam.HeldPlan: a step tensor is not one float32 value on the CPU");
      return *static_cast<const float*>(address_of(t));
    };
    const float value = read(steps.view.front());
    bool agree = true;
    for (const at::Tensor& s : steps.view) agree = read(s) == value && agree;
    if (!agree) return -1.0;
    for (const at::Tensor& s : steps.view) {
      const c10::TensorImpl* impl = s.unsafeGetTensorImpl();
      static_cast<float*>(impl->storage().mutable_data())[impl->storage_offset()] = value + 1.0f;
    }
    return static_cast<double>(value + 1.0f);
  }

  const at::Tensor& first_param() const {
    TORCH_CHECK_VALUE(!params_.empty(), "fastsam.HeldPlan: the plan has no parameters");
    return params_.front();
  }

  // What an earlier call over the same lists made (HeldTables): the tables (their gradient
  // rows rewritten at each call), the per-tensor options, and the address of every tensor of
  // the other lists, which must not have moved.
  struct Call {
    TablesPtr tables;
    std::optional<PerTensor> options;
    std::vector<const void*> fixed;
    std::vector<int64_t> positions;  // the plan positions of its tensors (made at first use)
  };
  std::unordered_map<std::string, Call>& calls() { return calls_; }

  // The buffer a held call forms its key in (HeldCall): its capacity kept, no allocation per
  // call. One call at a time uses it (the calls of a plan run one after another, under the
  // GIL; `key_in_use` asserts it).
  std::string& key_buffer() { return key_buffer_; }
  bool key_in_use = false;

 private:
  struct List {
    std::vector<at::Tensor> tensors;
    std::vector<bool> bound;  // per group
  };

  int64_t size(int64_t group) const { return starts_[group + 1] - starts_[group]; }
  void check_group(int64_t group) const {
    TORCH_CHECK_VALUE(group >= 0 && group + 1 < static_cast<int64_t>(starts_.size()),
                      msg("fastsam.HeldPlan: group ", group, " of ", starts_.size() - 1));
  }

  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> idle_;
  std::vector<int64_t> starts_;
  std::vector<const void*> addresses_;
  std::vector<caffe2::TypeMeta> dtypes_;  // the parameters' when the plan was made
  std::vector<int64_t> dims_;  // per parameter, when the plan was made: rank, sizes, strides
  std::vector<int64_t> grad_addresses_;  // kept by refresh(), until release()
  bool grads_read_ = false;
  std::unordered_map<std::string, List> lists_;
  std::unordered_map<std::string, Call> calls_;
  std::string key_buffer_;
};

using Held = c10::intrusive_ptr<HeldPlan>;

// The table source of a held call (ops.h Fresh): the first call with a key checks every list
// and builds the tables; later ones check that no tensor but the gradients moved and, on the
// CPU, rewrite the gradient rows of the kept tables. The gradients: when refresh() kept their
// addresses for this step call (laid out as their parameters), the call's gradient list stays
// empty ("lazy") and the rows are rewritten from those addresses, no gradient read again; else
// they are read and checked here. A moved tensor makes the call build afresh. On CUDA the
// device adapter's own cache serves the tables (it uploads when an address changed).
class HeldTables {
 public:
  // Per list the operator builds (the non-empty names, in order), as bits: the gradients, the
  // parameters, the plan's private w_old (at most 32 lists).
  struct Rows {
    uint32_t grad = 0, params = 0, priv = 0;
    size_t count = 0;
  };

  // `key` (the plan's key buffer) and `groups` live for the call.
  HeldTables(HeldPlan& plan, const std::string& key, Rows rows, at::IntArrayRef groups,
             bool lazy)
      : plan_(plan), key_(key), rows_(rows), groups_(groups), lazy_(lazy) {}

  void check(const char*, const Lists&) const {}
  bool lazy() const { return lazy_; }

  template <class D, class Options>
  TablesPtr tables(const char* op, const D& dev, const Lists& lists, Options&& options) const {
    TORCH_INTERNAL_ASSERT(lists.size() == rows_.count, "fastsam: held lists out of step");
    auto& calls = plan_.calls();
    auto it = calls.find(key_);
    if (it != calls.end() && fixed_unmoved(lists, it->second.fixed)) {
      HeldPlan::Call& call = it->second;
      if constexpr (std::is_same_v<D, Cpu>) {
        if (lazy_) {
          if (call.positions.empty()) call.positions = plan_.positions(groups_);
          for (HostTable& tab : call.tables->host) rewrite_grads(tab, call.positions);
          return call.tables;
        }
        for (size_t r = 0; r < lists.size(); ++r) {
          if (is_grad(r) && !laid_out_as(lists.front().second, lists[r].second)) {
            check_lists(op, {lists.front(), lists[r]});  // the exact check (and its message)
          }
        }
        for (HostTable& tab : call.tables->host) rewrite_grads(tab, lists);
        return call.tables;
      } else {
        Resolved grads;
        const Lists full = with_grads(lists, grads);
        for (size_t r = 0; r < full.size(); ++r) {
          if (is_grad(r) && !laid_out_as(full.front().second, full[r].second)) {
            check_lists(op, {full.front(), full[r]});
          }
        }
        return dev.tables(op, full, call.options ? &*call.options : nullptr);
      }
    }
    Resolved grads;
    const Lists full = with_grads(lists, grads);
    check_lists(op, full);
    HeldPlan::Call call{nullptr, options(), {}, {}};
    for (size_t r = 0; r < full.size(); ++r) {
      if (is_grad(r) || is_private(r)) continue;
      for (const at::Tensor& t : full[r].second) call.fixed.push_back(address_of(t));
    }
    call.tables = dev.tables(op, full, call.options ? &*call.options : nullptr);
    TablesPtr out = call.tables;
    calls[key_] = std::move(call);
    return out;
  }

 private:
  // `lists` with the gradients read into `grads` when the call left them lazy.
  Lists with_grads(const Lists& lists, Resolved& grads) const {
    Lists full = lists;
    if (!lazy_) return full;
    grads = plan_.resolve("grad", groups_);
    for (size_t r = 0; r < full.size(); ++r) {
      if (is_grad(r)) full[r].second = grads.view;
    }
    return full;
  }

  // Whether the tensors of the lists but the gradients are where they were when the tables
  // were built. The parameters' addresses need no second look when refresh() checked them in
  // this step call (lazy); w_old is fastsam's own (the plan's buffers, which nothing else can
  // reach and nothing moves while the plan lives), never looked at again.
  bool fixed_unmoved(const Lists& lists, const std::vector<const void*>& fixed) const {
    size_t k = 0;
    for (size_t r = 0; r < lists.size(); ++r) {
      if (is_grad(r) || is_private(r)) continue;
      if (lazy_ && is_params(r)) {
        k += lists[r].second.size();
        if (k > fixed.size()) return false;
        continue;
      }
      for (const at::Tensor& t : lists[r].second) {
        if (k == fixed.size() || fixed[k++] != address_of(t)) return false;
      }
    }
    return k == fixed.size();
  }

  // Whether every tensor of `b` has the dtype, device, shape and strides of its tensor of `a`
  // (those of `a` checked dense before): check_lists's fast case, without its messages.
  static bool laid_out_as(at::TensorList a, at::TensorList b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
      const c10::TensorImpl* x = a[i].unsafeGetTensorImpl();
      const c10::TensorImpl* y = b[i].unsafeGetTensorImpl();
      if (y->dtype() != x->dtype() || y->device() != x->device() ||
          !same_dims(y->sizes(), x->sizes()) || !same_dims(y->strides(), x->strides()) ||
          y->layout() != at::kStrided) {
        return false;
      }
    }
    return true;
  }

  void rewrite_grads(HostTable& tab, const Lists& lists) const {
    const size_t n = tab.index.size();
    for (size_t r = 0; r < lists.size(); ++r) {
      if (!is_grad(r)) continue;
      for (size_t k = 0; k < n; ++k) {
        tab.addr[r * n + k] = reinterpret_cast<int64_t>(lists[r].second[tab.index[k]].data_ptr());
      }
    }
  }

  // From the addresses refresh() kept: `positions[i]`, the plan position of the call's tensor i.
  void rewrite_grads(HostTable& tab, const std::vector<int64_t>& positions) const {
    const int64_t* addresses = plan_.grad_addresses();
    const size_t n = tab.index.size();
    for (size_t r = 0; r < rows_.count; ++r) {
      if (!is_grad(r)) continue;
      for (size_t k = 0; k < n; ++k) tab.addr[r * n + k] = addresses[positions[tab.index[k]]];
    }
  }

  bool is_grad(size_t r) const { return (rows_.grad >> r) & 1u; }
  bool is_params(size_t r) const { return (rows_.params >> r) & 1u; }
  bool is_private(size_t r) const { return (rows_.priv >> r) & 1u; }

  HeldPlan& plan_;
  const std::string& key_;
  Rows rows_;
  at::IntArrayRef groups_;
  bool lazy_;
};

// Runs `f(D*)` with the device adapter type of the plan's parameters.
template <class F>
void on_plan_device(const Held& plan, F&& f) {
  const at::Tensor& p = plan->first_param();
#ifdef FASTSAM_WITH_CUDA
  if (p.is_cuda()) return f(static_cast<Cuda*>(nullptr));
#endif
  TORCH_CHECK_VALUE(p.is_cpu(), msg("fastsam: a held plan's parameters are on ", p.device(),
                                    "; this build runs held plans on the CPU and CUDA only"));
  f(static_cast<Cpu*>(nullptr));
}

// A word's bytes appended to a key.
inline void append_word(std::string& key, int64_t word) {
  key.append(reinterpret_cast<const char*>(&word), sizeof(word));
}

// A plan's key buffer, in use by one held call for as long as this lives.
class KeyLease {
 public:
  explicit KeyLease(HeldPlan& plan) : plan_(plan) {
    TORCH_INTERNAL_ASSERT(!plan.key_in_use, "fastsam: two held calls at once on one plan");
    plan.key_in_use = true;
  }
  ~KeyLease() { plan_.key_in_use = false; }
  KeyLease(const KeyLease&) = delete;
  KeyLease& operator=(const KeyLease&) = delete;

 private:
  HeldPlan& plan_;
};

// The lists of one held call, resolved in the order of `names`, and its table source: keyed
// by the operator, the names, the groups and what else its tables depend on (`extra`: the
// per-group scaling options, amsgrad), formed in the plan's key buffer. Nothing allocated on
// the heap in the steady state but the gradients' list when a call reads them itself.
struct HeldCall {
 private:
  KeyLease lease_;  // (first: released last, and when a later member's construction throws)

 public:
  c10::SmallVector<Resolved, 8> lists;
  HeldTables tables;

  template <class Extra = void (*)(std::string&)>
  HeldCall(const Held& plan, const char* op, at::IntArrayRef groups, const Names& names,
           size_t count, Extra extra = [](std::string&) {})
      : lease_(*plan),
        tables(*plan, key_of(*plan, op, groups, names, extra), rows_of(names), groups,
               plan->grad_addresses() != nullptr) {
    TORCH_CHECK_VALUE(names.size() == count, msg("fastsam.", op, ": ", names.size(),
                                                 " list names, needs ", count));
    for (std::string_view name : names) {
      // lazy: the gradients stay unread (HeldTables reads them only to build tables)
      lists.push_back(tables.lazy() && name == "grad" ? Resolved{} : plan->resolve(name, groups));
    }
  }
  at::TensorList operator[](size_t i) const { return lists[i].view; }

 private:
  // The key in the plan's buffer (binary: lengths, then bytes; the groups' numbers as words).
  template <class Extra>
  static const std::string& key_of(HeldPlan& plan, const char* op, at::IntArrayRef groups,
                                   const Names& names, Extra& extra) {
    std::string& key = plan.key_buffer();
    key.assign(op);
    append_word(key, static_cast<int64_t>(names.size()));
    for (std::string_view name : names) {
      append_word(key, static_cast<int64_t>(name.size()));
      key.append(name.data(), name.size());
    }
    append_word(key, static_cast<int64_t>(groups.size()));
    for (int64_t g : groups) append_word(key, g);
    extra(key);
    return key;
  }
  static HeldTables::Rows rows_of(const Names& names) {
    HeldTables::Rows rows;
    for (std::string_view n : names) {
      if (n.empty()) continue;
      TORCH_INTERNAL_ASSERT(rows.count < 32, "fastsam: too many lists in a held call");
      const uint32_t bit = 1u << rows.count++;
      if (n == "grad") rows.grad |= bit;
      if (n == "params") rows.params |= bit;
      if (n == "w_old") rows.priv |= bit;
    }
    return rows;
  }
};

// The per-group scaling options, as part of a call's key (the tables' per-tensor options).
auto options_key(at::IntArrayRef modes, at::ArrayRef<double> etas) {
  return [modes, etas](std::string& key) {
    append_word(key, static_cast<int64_t>(modes.size()));
    for (int64_t m : modes) append_word(key, m);
    for (double e : etas) key.append(reinterpret_cast<const char*>(&e), sizeof(e));
  };
}

// The passes over a held plan, methods of fastsam._C.HeldPlan (binding/held_python.h): each
// as the operator of binding/ops.h it stands for, the list arguments given by name. Not
// dispatched operators, so each records a profiler event of its own (FASTSAM_HELD_EVENT).

// A held call's profiler event `name`, begun only while the profiler (or another observer)
// listens, as the dispatcher does for the operators: RecordFunction's plain constructor (the
// RECORD_FUNCTION macro) gathers the callbacks at every call (~150 instructions) to find none.
#define FASTSAM_HELD_EVENT(name)                                                        \
  std::optional<at::RecordFunction> held_event;                                         \
  if (auto callbacks = at::getStepCallbacksUnlessEmpty(at::RecordScope::FUNCTION)) {    \
    held_event.emplace(std::move(*callbacks));                                          \
    if (held_event->needsInputs()) {                                                    \
      held_event->before(name, c10::ArrayRef<const c10::IValue>{});                     \
    } else {                                                                            \
      held_event->before(name);                                                         \
    }                                                                                   \
  }

// lists: params, grads, momentum
void held_norm(const Held& plan, const Ints& groups, const Names& lists,
               const Ints& group_modes, const Doubles& group_etas, double q,
               const at::Tensor& out, const at::Tensor& scratch,
               std::optional<at::Tensor> group_momentum) {
  FASTSAM_HELD_EVENT("fastsam::held_norm");
  const HeldCall l(plan, "norm", groups, lists, 3, options_key(group_modes, group_etas));
  const Ints sizes = plan->sizes(groups);
  on_plan_device(plan, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    norm_pass<D>(l.tables, l[0], l[1], sizes, group_modes, group_etas, q, out, scratch, l[2],
                 group_momentum);
  });
}

// lists: params, grads, w_old, keep, momentum, momentum_next
void held_perturb(const Held& plan, const Ints& groups, const Names& lists,
                  const Ints& group_modes, const Doubles& group_etas,
                  const at::Tensor& group_rhos, const at::Tensor& norm_sum,
                  const at::Tensor& scratch, double q, double p, double eps,
                  const at::Tensor& skipped,
                  std::optional<at::Tensor> group_momentum, std::optional<at::Tensor> group_mask,
                  int64_t mask_key0, int64_t mask_key1) {
  FASTSAM_HELD_EVENT("fastsam::held_perturb");
  const HeldCall l(plan, "perturb", groups, lists, 6, options_key(group_modes, group_etas));
  const Ints sizes = plan->sizes(groups);
  on_plan_device(plan, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    perturb_pass<D>(l.tables, l[0], l[1], l[2], sizes, group_modes, group_etas, group_rhos,
                    norm_sum, scratch, q, p, eps, skipped, l[3], l[4], l[5], group_momentum,
                    group_mask, mask_key0, mask_key1);
  });
}

// lists: params, w_old
void held_restore(const Held& plan, const Ints& groups, const Names& lists) {
  FASTSAM_HELD_EVENT("fastsam::held_restore");
  const HeldCall l(plan, "restore", groups, lists, 2);
  on_plan_device(plan, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    restore_pass<D>(l.tables, l[0], l[1]);
  });
}

// lists: params, grads, w_old, momentum_buffers, first_grads, average
void held_sgd(const Held& plan, const Ints& groups, const Names& lists,
              const Doubles& hp, std::optional<at::Tensor> hp_device, bool nesterov,
              bool maximize, bool fresh, std::optional<at::Tensor> along, double alpha,
              int64_t grad_mode, std::optional<at::Tensor> skip, std::optional<at::Tensor> clip) {
  FASTSAM_HELD_EVENT("fastsam::held_sgd");
  const HeldCall l(plan, "sgd", groups, lists, 6);
  on_plan_device(plan, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    sgd_pass<D>(l.tables, l[0], l[1], l[2], l[3], hp, hp_device, nesterov, maximize, fresh,
                l[4], along, alpha, grad_mode, l[5], skip, clip);
  });
}

// lists: params, grads, w_old, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, first_grads, average
// (no per-tensor bias corrections: those are capturable's, which takes the list operators)
void held_adam(const Held& plan, const Ints& groups, const Names& lists,
               const Doubles& hp, std::optional<at::Tensor> hp_device, bool decoupled,
               bool amsgrad, bool maximize, std::optional<at::Tensor> along, double alpha,
               int64_t grad_mode, std::optional<at::Tensor> skip,
               std::optional<at::Tensor> clip) {
  FASTSAM_HELD_EVENT("fastsam::held_adam");
  const HeldCall l(plan, "adam", groups, lists, 8,
                   [amsgrad](std::string& key) { key += amsgrad ? 'a' : '-'; });
  on_plan_device(plan, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    adam_pass<D>(l.tables, l[0], l[1], l[2], l[3], l[4], l[5], hp, hp_device, decoupled, amsgrad,
                 maximize, l[6], along, alpha, grad_mode, l[7], skip, std::nullopt, clip);
  });
}

// lists: grads, first_grads (GSAM's reduction: `sums`, the three sums, else along). The
// gradients left to the tables when refresh() kept their addresses (laid out as their
// parameters, as the kept first gradients are); else read and checked at each call.
void held_gsam(const Held& plan, const Ints& groups, const Names& lists,
               double eps, bool sums, const at::Tensor& out, const at::Tensor& scratch) {
  FASTSAM_HELD_EVENT("fastsam::held_gsam");
  const char* op = sums ? "gsam_sums" : "gsam_along";
  const HeldCall l(plan, op, groups, lists, 2);
  on_plan_device(plan, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    if (l.tables.lazy()) {
      gsam_reduce<D>(l.tables, op, l[0], l[1], eps, sums, out, scratch);
    } else {
      gsam_reduce<D>(Fresh{}, op, l[0], l[1], eps, sums, out, scratch);
    }
  });
}

// lists: params, first (WSAM's kept g), grads
void held_wsam_decoupled(const Held& plan, const Ints& groups, const Names& lists,
                         double alpha,
                         std::optional<at::Tensor> clip) {
  FASTSAM_HELD_EVENT("fastsam::held_wsam_decoupled");
  const HeldCall l(plan, "wsam_decoupled", groups, lists, 3);
  on_plan_device(plan, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    wsam_decoupled_pass<D>(l.tables, l[0], l[1], l[2], alpha, clip);
  });
}

// The tensors of `tensors` in one list per dtype, in the order the dtypes first appear (the
// foreach operators below take one dtype per call, as the general path groups them).
std::vector<std::vector<at::Tensor>> by_dtype(at::TensorList tensors) {
  std::vector<std::vector<at::Tensor>> out;
  std::vector<at::ScalarType> dtypes;
  for (const at::Tensor& t : tensors) {
    size_t k = 0;
    while (k < dtypes.size() && dtypes[k] != t.scalar_type()) ++k;
    if (k == dtypes.size()) {
      dtypes.push_back(t.scalar_type());
      out.emplace_back();
    }
    out[k].push_back(t);
  }
  return out;
}

// GradScaler's unscale (SkipPolicy.decide over lists): each tensor of lists `names` ("grad";
// GSAM's kept first gradients) over `groups` times the 0-d factor of its dtype in `factors`
// (1/scale rounded once to it). The scale operator's pass over the plan's tables when refresh()
// kept the gradients' addresses; else torch's _foreach_mul_ per dtype, which takes any strides.
void held_scale(const Held& plan, const Ints& groups, const Names& names,
                std::vector<at::Tensor> factors) {
  FASTSAM_HELD_EVENT("fastsam::held_scale");
  if (plan->grad_addresses() != nullptr) {
    for (const at::Tensor& f : factors) {
      check_scalar_tensor("scale", "factors", f, {plan->first_param()}, 1);
    }
    for (std::string_view name : names) {
      const HeldCall l(plan, "scale", groups, {name}, 1);
      on_plan_device(plan, [&](auto* tag) {
        using D = std::remove_pointer_t<decltype(tag)>;
        scale_pass<D>(l.tables, l[0], factors);
      });
    }
    return;
  }
  for (std::string_view name : names) {
    for (const std::vector<at::Tensor>& tensors : by_dtype(plan->resolve(name, groups).view)) {
      const at::ScalarType dtype = tensors.front().scalar_type();
      const at::Tensor* factor = nullptr;
      for (const at::Tensor& f : factors) {
        if (f.scalar_type() == dtype) factor = &f;
      }
      TORCH_CHECK_VALUE(factor != nullptr, msg("fastsam.HeldPlan.scale: no factor of dtype ",
                                               dtype, " (a tensor of '", name, "' has it)"));
      at::_foreach_mul_(tensors, *factor);
    }
  }
}

// skip_nonfinite's check over the gradients of `groups`: `found` (one float32 element) set to 1
// when one holds inf/NaN. The nonfinite operator's pass over its tables when refresh() kept the
// gradients' addresses (each laid out as its parameter: dense, checked); else torch's GradScaler
// kernel per dtype (_amp_foreach_non_finite_check_and_unscale_, `one` the factor: 1), which
// takes any strides.
void held_check_nonfinite(const Held& plan, const Ints& groups, const at::Tensor& found,
                          const at::Tensor& one) {
  FASTSAM_HELD_EVENT("fastsam::held_check_nonfinite");
  check_scalar_tensor("nonfinite", "found", found, {plan->first_param()}, 1);
  if (plan->grad_addresses() != nullptr) {
    const HeldCall l(plan, "nonfinite", groups, {"grad"}, 1);
    on_plan_device(plan, [&](auto* tag) {
      using D = std::remove_pointer_t<decltype(tag)>;
      nonfinite_pass<D>(l.tables, l[0], found);
    });
    return;
  }
  at::Tensor flag = found;  // (the operator takes a mutable reference: the same tensor)
  for (const std::vector<at::Tensor>& grads : by_dtype(plan->resolve("grad", groups).view)) {
    at::_amp_foreach_non_finite_check_and_unscale_(grads, flag, one);
  }
}

}  // namespace
}  // namespace fastsam
