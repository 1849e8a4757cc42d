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

#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "held.h"
#include "text.h"

namespace fastsam {
namespace {  // this header is included by csrc/binding.cpp only

struct PyHeld {
  PyObject_HEAD
  Held plan;
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

template <>
struct FromPython<std::string> {
  static std::string read(PyObject* o, size_t index) {
    if (!PyUnicode_Check(o)) wrong_argument(index, "a str", o);
    Py_ssize_t size = 0;
    const char* text = PyUnicode_AsUTF8AndSize(o, &size);
    if (text == nullptr) {
      PyErr_Clear();
      wrong_argument(index, "a UTF-8 str", o);
    }
    return std::string(text, static_cast<size_t>(size));
  }
};

template <>
struct FromPython<at::Tensor> {
  static at::Tensor read(PyObject* o, size_t index) {
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

template <class T>
struct FromPython<std::vector<T>> {
  static std::vector<T> read(PyObject* o, size_t index) {
    const bool list = PyList_Check(o);
    if (!list && !PyTuple_Check(o)) wrong_argument(index, "a list or tuple", o);
    const Py_ssize_t n = list ? PyList_GET_SIZE(o) : PyTuple_GET_SIZE(o);
    std::vector<T> out;
    out.reserve(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      out.push_back(FromPython<T>::read(list ? PyList_GET_ITEM(o, i) : PyTuple_GET_ITEM(o, i),
                                        index));
    }
    return out;
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
double held_increment_steps(const Held& plan, std::string name, std::vector<int64_t> groups) {
  return plan->increment_steps(name, groups);
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
  return self;
  END_HANDLE_TH_ERRORS
}

void held_dealloc(PyObject* self) {
  reinterpret_cast<PyHeld*>(self)->plan.~Held();
  Py_TYPE(self)->tp_free(self);
}

#define FASTSAM_HELD_METHOD(name, f, doc)                                                    \
  {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&method<&f>)),        \
   METH_FASTCALL, doc}

PyMethodDef held_methods[] = {
    FASTSAM_HELD_METHOD("bind", held_bind, "bind(name, group, tensors): a list of a group"),
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
