// fastsam._C.HeldPlan: the Python type of a held plan (binding/held.h), a plain CPython type
// whose methods take their arguments by METH_FASTCALL and convert them here, in a few
// nanoseconds each. A step calls these methods several times; through a TorchScript custom
// class or pybind11 the same calls cost 2-11 us each, most of it converting lists of names,
// groups and numbers (measured: docs/benchmarks.md, the host's work). Each method is a
// function of binding/held.h taking the plan first; `method<F>` reads the Python arguments
// into F's parameter types (below: int, float, bool, str, Tensor, Optional[Tensor] and lists
// of int, float, str or Tensor) and turns C++ errors into Python's (torch's
// HANDLE_TH_ERRORS: c10::ValueError → ValueError, c10::TypeError → TypeError).
#pragma once

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "held.h"
#include "text.h"

namespace fastsam {
namespace {  // this header is included by csrc/binding.cpp only

// A dict's version tag (PEP 509): a new value at every change of the dict, the same while it
// is unchanged (Python 3.10 to 3.13; deprecated in 3.12, gone in 3.14, where dicts are walked).
#if PY_VERSION_HEX < 0x030E0000
#define FASTSAM_DICT_VERSIONS 1
inline uint64_t dict_version(PyObject* dict) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag;
#pragma GCC diagnostic pop
}
#endif

// The state entries a plan's lists were bound from (HeldPlan.bind_entries): each parameter's
// state dict, and per list name bound from it the object found under the name, all
// referenced here. A held update first asks unchanged(): a dict whose entry is now another
// object (a state tensor replaced in its dict, `state[p]["exp_avg"] = t`, or removed) fails
// it, and the caller binds the lists afresh from the dicts. A dict whose version tag is the
// one last seen is unchanged (a load per dict: 2 us for 2000 dicts); another is walked, its
// items against its entries (~25 ns per dict of Adam's state; every dict on Python 3.14).
// Used with the GIL held only: the plan's Python object is its only owner.
class Entries {
 public:
  Entries() = default;
  Entries(const Entries&) = delete;
  Entries& operator=(const Entries&) = delete;
  ~Entries() { clear(); }

  // Keeps `dict[key] is value` (the entry of list `name`; one entry per dict and name).
  void record(PyObject* dict, const std::string& name, PyObject* key, PyObject* value) {
    auto [it, made] = index_.try_emplace(dict, dicts_.size());
    if (made) {
      Py_INCREF(dict);
      dicts_.push_back({dict, 0, {}});
    }
    Dict& d = dicts_[it->second];
    d.version = version_of(dict);
    for (Entry& e : d.entries) {
      if (e.name == name) {  // (bound again: the object now)
        Py_INCREF(value);
        Py_DECREF(e.value);
        e.value = value;
        return;
      }
    }
    Py_INCREF(key);
    Py_INCREF(value);
    d.entries.push_back({name, key, value});
    if (std::find(names_.begin(), names_.end(), name) == names_.end()) names_.push_back(name);
  }

  // Whether every kept entry still holds its object (a dict found changed but with its
  // entries intact is unchanged, its version tag kept).
  bool unchanged() {
    for (Dict& d : dicts_) {
#ifdef FASTSAM_DICT_VERSIONS
      if (dict_version(d.dict) == d.version) continue;
#endif
      if (!holds(d)) return false;
      d.version = version_of(d.dict);
    }
    return true;
  }

  // The names of the lists kept here.
  const std::vector<std::string>& names() const { return names_; }

  void clear() {
    for (Dict& d : dicts_) {
      for (Entry& e : d.entries) {
        Py_DECREF(e.key);
        Py_DECREF(e.value);
      }
      Py_DECREF(d.dict);
    }
    dicts_.clear();
    index_.clear();
    names_.clear();
  }

 private:
  struct Entry {
    std::string name;
    PyObject* key;
    PyObject* value;
  };
  struct Dict {
    PyObject* dict;
    uint64_t version;  // its version tag when last found holding its entries (0 without)
    std::vector<Entry> entries;
  };

  static uint64_t version_of(PyObject* dict) {
#ifdef FASTSAM_DICT_VERSIONS
    return dict_version(dict);
#else
    (void)dict;
    return 0;
#endif
  }

  // One walk over the dict's items (a state dict has a few): each entry is found when an
  // item holds its object under its name.
  static bool holds(const Dict& d) {
    Py_ssize_t pos = 0;
    PyObject* key = nullptr;
    PyObject* value = nullptr;
    size_t found = 0;
    while (PyDict_Next(d.dict, &pos, &key, &value)) {
      for (const Entry& e : d.entries) {
        if (value == e.value) {
          found += key == e.key || (PyUnicode_Check(key) && PyUnicode_Compare(key, e.key) == 0);
          break;
        }
      }
    }
    return found == d.entries.size();
  }

  std::vector<Dict> dicts_;
  std::unordered_map<PyObject*, size_t> index_;  // dict → its place in dicts_
  std::vector<std::string> names_;
};

// The param groups a plan was made for (HeldPlan.bind_groups): per group, its parameters'
// Python objects and its "perturb" value, referenced here. At each step call, holds() first
// asks same(): the optimizer's param groups now have these parameters (identity, in order) and
// perturb values (==), in one C loop over the groups (the Python loop it replaces cost ~1.5 us
// a call). Used with the GIL held only.
class Groups {
 public:
  Groups() = default;
  Groups(const Groups&) = delete;
  Groups& operator=(const Groups&) = delete;
  ~Groups() { clear(); }

  // Keeps `members` (per group, a sequence of parameters) and `perturbs` (per group, a value).
  // False with a Python error set when they are not sequences of as many groups.
  bool set(PyObject* members, PyObject* perturbs) {
    clear();
    PyObject* ms = PySequence_Fast(members, "fastsam.HeldPlan.bind_groups: members");
    if (ms == nullptr) return false;
    PyObject* ps = PySequence_Fast(perturbs, "fastsam.HeldPlan.bind_groups: perturbs");
    if (ps == nullptr) {
      Py_DECREF(ms);
      return false;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(ms);
    bool ok = PySequence_Fast_GET_SIZE(ps) == n;
    if (!ok) PyErr_SetString(PyExc_ValueError, "fastsam.HeldPlan.bind_groups: as many members "
                             "as perturbs");
    for (Py_ssize_t g = 0; ok && g < n; ++g) {
      PyObject* group = PySequence_Fast(PySequence_Fast_GET_ITEM(ms, g),
                                        "fastsam.HeldPlan.bind_groups: a group's members");
      ok = group != nullptr;
      if (!ok) break;
      std::vector<PyObject*> items(PySequence_Fast_ITEMS(group),
                                   PySequence_Fast_ITEMS(group) + PySequence_Fast_GET_SIZE(group));
      for (PyObject* item : items) Py_INCREF(item);
      params_.push_back(std::move(items));
      PyObject* perturb = PySequence_Fast_GET_ITEM(ps, g);
      Py_INCREF(perturb);
      perturbs_.push_back(perturb);
      Py_DECREF(group);
    }
    Py_DECREF(ms);
    Py_DECREF(ps);
    if (!ok) clear();
    return ok;
  }

  // 1 when `param_groups` (the optimizer's list of group dicts) has the kept groups: the same
  // parameter objects in order (in a list or tuple) and perturb values equal to the kept ones
  // (a missing "perturb" is True); 0 when it does not; -1 with a Python error set.
  int same(PyObject* param_groups) const {
    if (!PyList_Check(param_groups) ||
        PyList_GET_SIZE(param_groups) != static_cast<Py_ssize_t>(params_.size())) {
      return 0;
    }
    if (params_key() == nullptr || perturb_key() == nullptr) return -1;  // (out of memory)
    for (size_t g = 0; g < params_.size(); ++g) {
      PyObject* group = PyList_GET_ITEM(param_groups, static_cast<Py_ssize_t>(g));
      if (!PyDict_Check(group)) return 0;
      PyObject* params = PyDict_GetItemWithError(group, params_key());
      if (params == nullptr) return PyErr_Occurred() ? -1 : 0;
      if (!PyList_Check(params) && !PyTuple_Check(params)) return 0;
      if (PySequence_Fast_GET_SIZE(params) != static_cast<Py_ssize_t>(params_[g].size())) {
        return 0;
      }
      PyObject* const* items = PySequence_Fast_ITEMS(params);  // (a list's or a tuple's)
      for (size_t k = 0; k < params_[g].size(); ++k) {
        if (items[k] != params_[g][k]) return 0;
      }
      PyObject* perturb = PyDict_GetItemWithError(group, perturb_key());
      if (perturb == nullptr && PyErr_Occurred()) return -1;
      const int equal = PyObject_RichCompareBool(perturb == nullptr ? Py_True : perturb,
                                                 perturbs_[g], Py_EQ);
      if (equal != 1) return equal;
    }
    return 1;
  }

  void clear() {
    for (std::vector<PyObject*>& items : params_) {
      for (PyObject* item : items) Py_DECREF(item);
    }
    for (PyObject* perturb : perturbs_) Py_DECREF(perturb);
    params_.clear();
    perturbs_.clear();
  }

 private:
  // The keys read from a group dict as interned strs, made at the first call (a dict lookup
  // of an interned key compares pointers first); never freed.
  static PyObject* params_key() {
    static PyObject* const text = PyUnicode_InternFromString("params");
    return text;
  }
  static PyObject* perturb_key() {
    static PyObject* const text = PyUnicode_InternFromString("perturb");
    return text;
  }

  std::vector<std::vector<PyObject*>> params_;
  std::vector<PyObject*> perturbs_;
};

struct PyHeld {
  PyObject_HEAD
  Held plan;
  Entries entries;
  Groups groups;
};

// One argument, read as type T (`index` names it in errors).
template <class T>
struct FromPython;

[[noreturn]] void wrong_argument(size_t index, const char* expected, PyObject* got) {
  TORCH_CHECK_TYPE(false, msg("fastsam.HeldPlan: argument ", index, " must be ", expected,
                              ", got ", Py_TYPE(got)->tp_name));
}

template <>
struct FromPython<int64_t> {
  static int64_t read(PyObject* o, size_t index) {
    if (!PyLong_Check(o)) wrong_argument(index, "an int", o);
    const long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      TORCH_CHECK_VALUE(false, msg("fastsam.HeldPlan: argument ", index, " is out of range"));
    }
    return static_cast<int64_t>(v);
  }
};

template <>
struct FromPython<double> {
  static double read(PyObject* o, size_t index) {
    if (PyFloat_Check(o)) return PyFloat_AS_DOUBLE(o);
    if (!PyLong_Check(o)) wrong_argument(index, "a number", o);
    const double v = PyLong_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      TORCH_CHECK_VALUE(false, msg("fastsam.HeldPlan: argument ", index, " is out of range"));
    }
    return v;
  }
};

template <>
struct FromPython<bool> {
  static bool read(PyObject* o, size_t index) {
    if (!PyBool_Check(o)) wrong_argument(index, "a bool", o);
    return o == Py_True;
  }
};

// A view of the str's UTF-8 text, kept by the str (the call's argument: alive for the call).
template <>
struct FromPython<std::string_view> {
  static std::string_view read(PyObject* o, size_t index) {
    if (!PyUnicode_Check(o)) wrong_argument(index, "a str", o);
    Py_ssize_t size = 0;
    const char* text = PyUnicode_AsUTF8AndSize(o, &size);
    if (text == nullptr) {
      PyErr_Clear();
      wrong_argument(index, "a UTF-8 str", o);
    }
    return std::string_view(text, static_cast<size_t>(size));
  }
};

// A copy of the str's text (a name kept beyond the call).
template <>
struct FromPython<std::string> {
  static std::string read(PyObject* o, size_t index) {
    return std::string(FromPython<std::string_view>::read(o, index));
  }
};

template <>
struct FromPython<at::Tensor> {
  // (the argument's own tensor: a copy would take a reference through the interpreter)
  static const at::Tensor& read(PyObject* o, size_t index) {
    if (!THPVariable_Check(o)) wrong_argument(index, "a Tensor", o);
    return THPVariable_Unpack(o);
  }
};

template <>
struct FromPython<std::optional<at::Tensor>> {
  static std::optional<at::Tensor> read(PyObject* o, size_t index) {
    if (o == Py_None) return std::nullopt;
    return FromPython<at::Tensor>::read(o, index);
  }
};

// A list or tuple, item by item, into a std::vector or a c10::SmallVector (Ints, Doubles,
// Names: on the stack for a call's few items).
template <class Vector>
Vector read_sequence(PyObject* o, size_t index) {
  using T = typename Vector::value_type;
  if (!PyList_Check(o) && !PyTuple_Check(o)) wrong_argument(index, "a list or tuple", o);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  PyObject* const* items = PySequence_Fast_ITEMS(o);
  Vector out;
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out.push_back(FromPython<T>::read(items[i], index));
  return out;
}

template <class T>
struct FromPython<std::vector<T>> {
  static std::vector<T> read(PyObject* o, size_t index) {
    return read_sequence<std::vector<T>>(o, index);
  }
};

template <class T, unsigned N>
struct FromPython<c10::SmallVector<T, N>> {
  static c10::SmallVector<T, N> read(PyObject* o, size_t index) {
    return read_sequence<c10::SmallVector<T, N>>(o, index);
  }
};

PyObject* to_python(bool v) { return PyBool_FromLong(v); }
PyObject* to_python(double v) { return PyFloat_FromDouble(v); }

template <class R, class... Ts, size_t... I>
PyObject* call_with(R (*f)(const Held&, Ts...), const Held& plan, PyObject* const* args,
                    std::index_sequence<I...>) {
  if constexpr (std::is_void_v<R>) {
    f(plan, FromPython<std::decay_t<Ts>>::read(args[I], I)...);
    Py_RETURN_NONE;
  } else {
    return to_python(f(plan, FromPython<std::decay_t<Ts>>::read(args[I], I)...));
  }
}

template <class R, class... Ts>
PyObject* call(R (*f)(const Held&, Ts...), PyObject* self, PyObject* const* args,
               Py_ssize_t nargs) {
  TORCH_CHECK_TYPE(nargs == static_cast<Py_ssize_t>(sizeof...(Ts)),
                   msg("fastsam.HeldPlan: takes ", sizeof...(Ts), " arguments, got ", nargs));
  return call_with(f, reinterpret_cast<PyHeld*>(self)->plan, args,
                   std::index_sequence_for<Ts...>{});
}

// A METH_FASTCALL method calling F (a function of the plan, binding/held.h).
template <auto F>
PyObject* method(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return call(F, self, args, nargs);
  END_HANDLE_TH_ERRORS
}

// HeldPlan's own methods as functions of the plan.
void held_bind(const Held& plan, std::string name, int64_t group, std::vector<at::Tensor> ts) {
  plan->bind(name, group, std::move(ts));
}
bool held_refresh(const Held& plan) { return plan->refresh(); }
void held_release(const Held& plan) { plan->release(); }
double held_increment_steps(const Held& plan, std::string_view name, const Ints& groups) {
  return plan->increment_steps(name, groups);
}

// bind_entries(name, group, dicts): binds list `name` of `group` to the tensors the dicts (one
// per parameter of the group, in order) hold under `name`, and keeps the entries (Entries);
// False, with nothing bound, when a dict has no tensor there (the caller makes the state).
PyObject* held_bind_entries(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, msg("fastsam.HeldPlan.bind_entries: takes 3 arguments, got ",
                                   nargs));
  PyHeld* held = reinterpret_cast<PyHeld*>(self);
  const std::string name = FromPython<std::string>::read(args[0], 0);
  const int64_t group = FromPython<int64_t>::read(args[1], 1);
  PyObject* key = args[0];
  if (!PyList_Check(args[2])) wrong_argument(2, "a list", args[2]);
  const Py_ssize_t n = PyList_GET_SIZE(args[2]);
  std::vector<PyObject*> dicts, values;
  std::vector<at::Tensor> tensors;
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* dict = PyList_GET_ITEM(args[2], k);
    if (!PyDict_Check(dict)) wrong_argument(2, "a list of dicts", dict);
    PyObject* value = PyDict_GetItemWithError(dict, key);
    if (value == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_FALSE;
    }
    if (!THPVariable_Check(value)) Py_RETURN_FALSE;
    dicts.push_back(dict);
    values.push_back(value);
    tensors.push_back(THPVariable_Unpack(value));
  }
  held->plan->bind(name, group, std::move(tensors));
  for (size_t k = 0; k < dicts.size(); ++k) held->entries.record(dicts[k], name, key, values[k]);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// entries_unchanged(): whether every entry bind_entries kept still holds its tensor.
PyObject* held_entries_unchanged(PyObject* self, PyObject* const*, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 0, "fastsam.HeldPlan.entries_unchanged: takes no arguments");
  return PyBool_FromLong(reinterpret_cast<PyHeld*>(self)->entries.unchanged());
  END_HANDLE_TH_ERRORS
}

// unbind_entries(): forgets the lists bound by bind_entries (every group) and their entries.
PyObject* held_unbind_entries(PyObject* self, PyObject* const*, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 0, "fastsam.HeldPlan.unbind_entries: takes no arguments");
  PyHeld* held = reinterpret_cast<PyHeld*>(self);
  for (const std::string& name : held->entries.names()) held->plan->unbind(name);
  held->entries.clear();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// bind_groups(members, perturbs): the param groups the plan was made for (Groups).
PyObject* held_bind_groups(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2, msg("fastsam.HeldPlan.bind_groups: takes 2 arguments, got ",
                                   nargs));
  if (!reinterpret_cast<PyHeld*>(self)->groups.set(args[0], args[1])) return nullptr;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// holds(param_groups): None when the optimizer's param groups are not those bound by
// bind_groups; else refresh(): whether the plan still holds (True: the gradients are read for
// this step call, until release()).
PyObject* held_holds(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 1, msg("fastsam.HeldPlan.holds: takes 1 argument, got ", nargs));
  PyHeld* held = reinterpret_cast<PyHeld*>(self);
  const int same = held->groups.same(args[0]);
  if (same < 0) return nullptr;
  if (same == 0) Py_RETURN_NONE;
  return PyBool_FromLong(held->plan->refresh());
  END_HANDLE_TH_ERRORS
}

// HeldPlan(params, group_sizes, idle)
PyObject* held_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(kwargs == nullptr || PyDict_Size(kwargs) == 0,
                   "fastsam.HeldPlan takes no keyword arguments");
  TORCH_CHECK_TYPE(PyTuple_GET_SIZE(args) == 3,
                   "fastsam.HeldPlan takes (params, group_sizes, idle)");
  Held plan = c10::make_intrusive<HeldPlan>(
      FromPython<std::vector<at::Tensor>>::read(PyTuple_GET_ITEM(args, 0), 0),
      FromPython<std::vector<int64_t>>::read(PyTuple_GET_ITEM(args, 1), 1),
      FromPython<std::vector<at::Tensor>>::read(PyTuple_GET_ITEM(args, 2), 2));
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  new (&reinterpret_cast<PyHeld*>(self)->plan) Held(std::move(plan));
  new (&reinterpret_cast<PyHeld*>(self)->entries) Entries();
  new (&reinterpret_cast<PyHeld*>(self)->groups) Groups();
  return self;
  END_HANDLE_TH_ERRORS
}

void held_dealloc(PyObject* self) {
  reinterpret_cast<PyHeld*>(self)->groups.~Groups();
  reinterpret_cast<PyHeld*>(self)->entries.~Entries();
  reinterpret_cast<PyHeld*>(self)->plan.~Held();
  Py_TYPE(self)->tp_free(self);
}

#define FASTSAM_HELD_METHOD(name, f, doc)                                                    \
  {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&method<&f>)),        \
   METH_FASTCALL, doc}

PyMethodDef held_methods[] = {
    FASTSAM_HELD_METHOD("bind", held_bind, "bind(name, group, tensors): a list of a group"),
    {"bind_entries", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
         &held_bind_entries)), METH_FASTCALL,
     "bind_entries(name, group, dicts): a group's list from its state dicts, kept checked"},
    {"entries_unchanged", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
         &held_entries_unchanged)), METH_FASTCALL,
     "Whether the state entries bind_entries read still hold their tensors"},
    {"unbind_entries", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
         &held_unbind_entries)), METH_FASTCALL,
     "Forget the lists bind_entries bound"},
    {"bind_groups", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
         &held_bind_groups)), METH_FASTCALL,
     "bind_groups(members, perturbs): the param groups the plan was made for"},
    {"holds", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&held_holds)),
     METH_FASTCALL,
     "holds(param_groups): None when they are not the bound groups, else refresh()"},
    FASTSAM_HELD_METHOD("refresh", held_refresh, "Whether the plan still holds (reads grads)"),
    FASTSAM_HELD_METHOD("release", held_release, "Forget the gradients refresh() read"),
    FASTSAM_HELD_METHOD("increment_steps", held_increment_steps,
                        "increment_steps(name, groups): Adam's steps + 1 when they agree"),
    FASTSAM_HELD_METHOD("norm", held_norm, "Pass A over groups (the norm operator)"),
    FASTSAM_HELD_METHOD("perturb", held_perturb, "Pass B over groups (the perturb operator)"),
    FASTSAM_HELD_METHOD("restore", held_restore, "w <- w_old over groups"),
    FASTSAM_HELD_METHOD("sgd", held_sgd, "Pass C with SGD (the sgd operator)"),
    FASTSAM_HELD_METHOD("adam", held_adam, "Pass C with Adam/AdamW (the adam operator)"),
    FASTSAM_HELD_METHOD("gsam", held_gsam, "GSAM's reduction over groups"),
    FASTSAM_HELD_METHOD("scale", held_scale, "GradScaler's unscale of named lists"),
    FASTSAM_HELD_METHOD("wsam_decoupled", held_wsam_decoupled,
                        "WSAM's decoupled term (the wsam_decoupled operator)"),
    FASTSAM_HELD_METHOD("check_nonfinite", held_check_nonfinite,
                        "skip_nonfinite's check of the gradients"),
    {nullptr, nullptr, 0, nullptr},
};

#undef FASTSAM_HELD_METHOD

PyTypeObject held_type = [] {
  PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
  t.tp_name = "fastsam._C.HeldPlan";
  t.tp_basicsize = sizeof(PyHeld);
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = "HeldPlan(params, group_sizes, idle): a step plan's tensors held in C++ "
             "(csrc/binding/held.h)";
  t.tp_new = held_new;
  t.tp_dealloc = held_dealloc;
  t.tp_methods = held_methods;
  return t;
}();

// Adds the type to `module` (its init); false with a Python error set.
bool add_held_type(PyObject* module) {
  if (PyType_Ready(&held_type) < 0) return false;
  Py_INCREF(&held_type);
  if (PyModule_AddObject(module, "HeldPlan", reinterpret_cast<PyObject*>(&held_type)) < 0) {
    Py_DECREF(&held_type);
    return false;
  }
  return true;
}

}  // namespace
}  // namespace fastsam
