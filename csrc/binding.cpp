// fastsam._C: the torch.library operators of the native backends (fastsam/backends/native.py).
//
// This file registers the operators; by role, the binding is: binding/text.h (error text),
// binding/checks.h (validation: every TORCH_CHECK names the operator, the list, the index and
// what was expected), binding/tables.h (segment tables), binding/cpu_device.h and
// binding/cuda_device.h (the device adapters), binding/ops.h (the operators, written once for
// both devices). No arithmetic: that is in the kernel files. Operators, in namespace `fastsam`,
// one per pass of docs/design.md §2:
//
//   norm     S = Σ |T·g|^q over every tensor → out (0-d); per-segment partials and filter
//            norms go to `scratch` (fp64, grown when too small, reused by `perturb`)
//   perturb  w_old ← w; w ← w + e (rho per group, from `group_rhos`: float64, on the
//            parameters' device); skipped ← 1 if S is not finite; keep ← g when `keep` is
//            given (GSAM)
//            (norm and perturb: with `momentum`, FriendlySAM's m, both follow d = g − sigma·m
//            and perturb writes momentum_next ← lmbda·m + gain·g; `group_momentum`: float64
//            [sigma, lmbda, gain] per group, on the parameters' device; with `group_mask`,
//            ESAM's: only the elements whose draw of the stream (mask_key0, mask_key1, the
//            tensor's position) falls below their group's threshold move, kernels.h PerturbArgs)
//   restore  w ← w_old
//   nonfinite  found ← 1 when an element of the tensors is inf or NaN (skip_nonfinite's check;
//            found: one float32 element, left as it is otherwise)
//   scale    each tensor times the factor of its dtype (GradScaler's unscale; `factors`: one
//            value per dtype, 1/scale rounded to it), as torch's mul_ rounds it
//   sgd      w ← SGD(w_old, g, momentum_buffer)           hp = [lr, momentum, dampening, wd]
//   adam     w ← Adam/AdamW(w_old, g, m, v, vmax)           hp as elementwise.h AdamScalars
//            (both: with `average`, the averaged weights follow the new w in the same pass,
//            fastsam.functional.Average; its weight is one more hp entry. hp is given by
//            value (a float list, carried by the launch: nothing is uploaded); `hp_device`,
//            when given, is the same list as a float64 tensor on the parameters' device, read
//            there instead (values formed on the device, a tensor lr); with `skip`, a
//            one-element float32 flag read by the kernels, a non-zero flag makes them write
//            w ← w_old only; adam's `bias`, float64 (n, 2): per-tensor bias corrections)
//   wsam_decoupled  first ← first − clip·g, then w ← w + alpha·first (WSAM's decoupled term
//            after its update; `clip`: max_grad_norm's coefficient, 0-d, optional)
//   gsam_along  out ← GSAM's along from ⟨g_first, g⟩, ‖g‖², ‖g_first‖² (one reduction;
//            partial sums in `scratch`, fp64, grown when too small)
//   gsam_sums   out[0:3] ← those three sums (sharded parameters all-reduce them first)
//   stream_read, stream_fill, stream_triad, stream_update: the benchmark's streaming kernels
//            (kernels.h)
//
// fastsam._C.HeldPlan (binding/held.h, binding/held_python.h), a step plan's tensors held in
// C++, runs norm, perturb, restore, sgd and adam as methods: each takes the groups of the call
// and a name per list argument, and the other arguments as the operator it stands for. They are the eager
// steady state of the native backends; torch.compile traces the list operators. refresh:
// whether the plan still holds; increment_steps: Adam's CPU steps + 1 when they agree; gsam:
// GSAM's reduction; check_nonfinite and scale: skip_nonfinite's check and GradScaler's
// unscale over the plan's gradients (the nonfinite and scale operators); wsam_decoupled:
// WSAM's decoupled term over the plan's lists.
//
// sgd and adam take a gradient source optionally (fastsam.functional.GradientSource), by
// grad_mode: 1 first_grads with along and alpha, GSAM's (1 + alpha·along)·g − alpha·g_first;
// 2 first_grads, FreeSAM's stored gradients, used by the update and then replaced by g;
// 3 first_grads with along, LookSAM's g + along·u_v. `clip` (0-d, max_grad_norm's coefficient)
// multiplies g before any of these (FreeSAM stores the product).
//
// The mutation annotations ("Tensor(a!)[]") tell the dispatcher and torch.compile which lists
// each operator writes. Kernels: CPU always; CUDA when built with FASTSAM_WITH_CUDA.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <ATen/ops/sqrt.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cmath>
#include <initializer_list>

#include "binding/checks.h"
#include "binding/cpu_device.h"
#include "binding/cuda_device.h"
#include "binding/held.h"
#include "binding/held_python.h"
#include "binding/ops.h"
#include "binding/tables.h"
#include "binding/text.h"

TORCH_LIBRARY(fastsam, m) {
  m.def(
      "norm(Tensor[] params, Tensor[] grads, int[] group_sizes, int[] group_modes, "
      "float[] group_etas, float q, Tensor(a!) out, Tensor(b!) scratch, "
      "Tensor[] momentum, Tensor? group_momentum=None) -> ()");
  m.def(
      "perturb(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] w_old, int[] group_sizes, "
      "int[] group_modes, float[] group_etas, Tensor group_rhos, Tensor norm_sum, "
      "Tensor scratch, float q, float p, float eps, Tensor(c!) skipped, "
      "Tensor(d!)[] keep, Tensor[] momentum, Tensor(e!)[] momentum_next, "
      "Tensor? group_momentum=None, Tensor? group_mask=None, int mask_key0=0, "
      "int mask_key1=0) -> ()");
  m.def("restore(Tensor(a!)[] params, Tensor[] w_old) -> ()");
  m.def("nonfinite(Tensor[] tensors, Tensor(a!) found) -> ()");
  m.def("scale(Tensor(a!)[] tensors, Tensor[] factors) -> ()");
  m.def(
      "sgd(Tensor(a!)[] params, Tensor[] grads, Tensor[] w_old, Tensor(b!)[] momentum_buffers, "
      "float[] hp, Tensor? hp_device, bool nesterov, bool maximize, bool fresh, "
      "Tensor(c!)[] first_grads, "
      "Tensor? along, float alpha, int grad_mode, Tensor(d!)[] average, Tensor? skip=None, "
      "Tensor? clip=None) -> ()");
  m.def(
      "adam(Tensor(a!)[] params, Tensor[] grads, Tensor[] w_old, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, float[] hp, Tensor? hp_device, "
      "bool decoupled, "
      "bool amsgrad, bool maximize, Tensor(e!)[] first_grads, Tensor? along, "
      "float alpha, int grad_mode, Tensor(f!)[] average, Tensor? skip=None, Tensor? bias=None, "
      "Tensor? clip=None) -> ()");
  m.def(
      "wsam_decoupled(Tensor(a!)[] params, Tensor(b!)[] first, Tensor[] grads, float alpha, "
      "Tensor? clip=None) -> ()");
  m.def(
      "gsam_along(Tensor[] grads, Tensor[] first_grads, float eps, Tensor(a!) out, "
      "Tensor(b!) scratch) -> ()");
  m.def(
      "gsam_sums(Tensor[] grads, Tensor[] first_grads, Tensor(a!) out, Tensor(b!) scratch) "
      "-> ()");
  // The benchmark's streaming kernels (fastsam/bench/measure.py, the bytes-moved floor).
  m.def("stream_read(Tensor x, Tensor(a!) out) -> ()");
  m.def("stream_fill(Tensor(a!) x, float value) -> ()");
  m.def("stream_triad(Tensor(a!) a, Tensor b, Tensor c, float s) -> ()");
  m.def("stream_update(Tensor(a!) a, Tensor b, Tensor c, Tensor(b!) d, float s) -> ()");
#ifdef FASTSAM_WITH_CUDA
  // Whether the CUDA kernels can run on device `device` (built for its architecture).
  m.def("cuda_runnable(int device) -> bool", &fastsam::cuda_runnable_op);
#endif
}

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("norm", &fastsam::norm_op<fastsam::Cpu>);
  m.impl("perturb", &fastsam::perturb_op<fastsam::Cpu>);
  m.impl("restore", &fastsam::restore_op<fastsam::Cpu>);
  m.impl("nonfinite", &fastsam::nonfinite_op<fastsam::Cpu>);
  m.impl("scale", &fastsam::scale_op<fastsam::Cpu>);
  m.impl("sgd", &fastsam::sgd_op<fastsam::Cpu>);
  m.impl("adam", &fastsam::adam_op<fastsam::Cpu>);
  m.impl("wsam_decoupled", &fastsam::wsam_decoupled_op<fastsam::Cpu>);
  m.impl("gsam_along", &fastsam::gsam_along_op<fastsam::Cpu>);
  m.impl("gsam_sums", &fastsam::gsam_sums_op<fastsam::Cpu>);
  m.impl("stream_read", &fastsam::stream_read_op<fastsam::Cpu>);
  m.impl("stream_fill", &fastsam::stream_fill_op<fastsam::Cpu>);
  m.impl("stream_triad", &fastsam::stream_triad_op<fastsam::Cpu>);
  m.impl("stream_update", &fastsam::stream_update_op<fastsam::Cpu>);
}

#ifdef FASTSAM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastsam, CUDA, m) {
  m.impl("norm", &fastsam::norm_op<fastsam::Cuda>);
  m.impl("perturb", &fastsam::perturb_op<fastsam::Cuda>);
  m.impl("restore", &fastsam::restore_op<fastsam::Cuda>);
  m.impl("nonfinite", &fastsam::nonfinite_op<fastsam::Cuda>);
  m.impl("scale", &fastsam::scale_op<fastsam::Cuda>);
  m.impl("sgd", &fastsam::sgd_op<fastsam::Cuda>);
  m.impl("adam", &fastsam::adam_op<fastsam::Cuda>);
  m.impl("wsam_decoupled", &fastsam::wsam_decoupled_op<fastsam::Cuda>);
  m.impl("gsam_along", &fastsam::gsam_along_op<fastsam::Cuda>);
  m.impl("gsam_sums", &fastsam::gsam_sums_op<fastsam::Cuda>);
  m.impl("stream_read", &fastsam::stream_read_op<fastsam::Cuda>);
  m.impl("stream_fill", &fastsam::stream_fill_op<fastsam::Cuda>);
  m.impl("stream_triad", &fastsam::stream_triad_op<fastsam::Cuda>);
  m.impl("stream_update", &fastsam::stream_update_op<fastsam::Cuda>);
}
#endif

namespace {

// clip_coefficient(square_sum, max_norm, out): out ← min(1, max_norm / (sqrt(square_sum) +
// 1e-6)), max_grad_norm's coefficient as torch.nn.utils.clip_grad_norm_ forms it, in the dtype
// of the one-element CPU tensors square_sum and out (float32 or float64), rounded as torch's
// operators round it step by step: torch's own sqrt (on the CPU not always the correctly
// rounded one), then + and / correctly rounded in that dtype, 1e-6 and max_norm rounded to it
// first; NaN stays NaN. One dispatch (the sqrt) where the optimizer's torch operators (sqrt,
// add, div, minimum and their operands' fills) made seven.
template <class T>
void clip_coefficient_as(double max_norm, const at::Tensor& out) {
  const T coefficient = static_cast<T>(max_norm) / (*out.data_ptr<T>() + static_cast<T>(1e-6));
  *out.data_ptr<T>() = std::isnan(coefficient) || coefficient < T(1) ? coefficient : T(1);
}

PyObject* clip_coefficient(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3 && THPVariable_Check(args[0]) && PyFloat_Check(args[1]) &&
                       THPVariable_Check(args[2]),
                   "fastsam._C.clip_coefficient takes (square_sum: Tensor, max_norm: float, "
                   "out: Tensor)");
  const at::Tensor& square_sum = THPVariable_Unpack(args[0]);
  const at::Tensor& out = THPVariable_Unpack(args[2]);  // (written through its data)
  for (const at::Tensor* t : {&square_sum, &out}) {
    TORCH_CHECK_VALUE(t->is_cpu() && t->numel() == 1 && t->layout() == at::kStrided,
                      fastsam::msg("fastsam._C.clip_coefficient: a one-element CPU tensor, got ",
                                   t->numel(), " elements on ", t->device()));
  }
  TORCH_CHECK_TYPE(square_sum.scalar_type() == out.scalar_type() &&
                       (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble),
                   fastsam::msg("fastsam._C.clip_coefficient: float32 or float64 tensors of one "
                                "dtype, got ", square_sum.scalar_type(), " and ",
                                out.scalar_type()));
  const double max_norm = PyFloat_AS_DOUBLE(args[1]);
  {
    at::Tensor root = out;  // (sqrt_out takes a mutable reference: the same tensor)
    at::sqrt_out(root, square_sum);
  }
  if (out.scalar_type() == at::kDouble) {
    clip_coefficient_as<double>(max_norm, out);
  } else {
    clip_coefficient_as<float>(max_norm, out);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// any_tensor(values): whether an item of the list or tuple `values` is a tensor (the others are
// numbers), as fastsam/backends/_constants.py any_tensor tells it: exact floats, ints and
// bools are numbers, anything else is asked isinstance(item, torch.Tensor). Its loop in C,
// for the held steps (never traced: torch.compile cannot see into this): one call (~0.05 us)
// where the Python loop costs 0.2-0.3 us.
PyObject* any_tensor(PyObject*, PyObject* values) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(values) && !PyTuple_Check(values)) {
    PyErr_SetString(PyExc_TypeError, "fastsam._C.any_tensor takes a list or tuple");
    return nullptr;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(values);
  PyObject* const* items = PySequence_Fast_ITEMS(values);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (PyFloat_CheckExact(item) || PyLong_CheckExact(item) || PyBool_Check(item)) continue;
    if (THPVariable_Check(item)) Py_RETURN_TRUE;  // (isinstance: a custom check may raise)
  }
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

// layout_key(lists): what the Triton launchers' cached tables depend on, as (hash, bytes):
// the bytes hold the number of lists and their lengths, every tensor's address and dtype, and
// the sizes and strides of the first list's tensors (the parameters); the hash is of those
// words (Python's own hash of the bytes would read them again at every lookup). One C loop
// over the tensors; the same key formed in Python (a data_ptr() call per tensor through map)
// costs several times as much (fastsam/backends/triton.py _layout_key).
PyObject* layout_key(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 1 || !PyTuple_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "fastsam._C.layout_key takes a tuple of lists of tensors");
    return nullptr;
  }
  PyObject* lists = args[0];
  const Py_ssize_t n_lists = PyTuple_GET_SIZE(lists);
  std::vector<int64_t> key{static_cast<int64_t>(n_lists)};
  if (n_lists > 0 && PyList_Check(PyTuple_GET_ITEM(lists, 0))) {  // 2 words a tensor, 8 more
    key.reserve(static_cast<size_t>(PyList_GET_SIZE(PyTuple_GET_ITEM(lists, 0))) *  // for w
                (2 * static_cast<size_t>(n_lists) + 8) + static_cast<size_t>(n_lists) + 1);
  }
  for (Py_ssize_t r = 0; r < n_lists; ++r) {
    PyObject* list = PyTuple_GET_ITEM(lists, r);
    if (!PyList_Check(list)) {
      PyErr_SetString(PyExc_TypeError, "fastsam._C.layout_key: every item must be a list");
      return nullptr;
    }
    const Py_ssize_t n = PyList_GET_SIZE(list);
    key.push_back(static_cast<int64_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyList_GET_ITEM(list, i);
      if (!THPVariable_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "fastsam._C.layout_key: the lists must hold tensors");
        return nullptr;
      }
      const at::Tensor& t = THPVariable_Unpack(item);
      if (!t.has_storage()) {  // a wrapper (DTensor, a fake tensor): no address to key on
        PyErr_SetString(PyExc_ValueError, "fastsam._C.layout_key: a tensor without storage");
        return nullptr;
      }
      key.push_back(reinterpret_cast<int64_t>(t.unsafeGetTensorImpl()->data()));
      key.push_back(static_cast<int64_t>(t.scalar_type()));
      if (r == 0) {
        key.push_back(t.dim());
        for (const int64_t size : t.sizes()) key.push_back(size);
        for (const int64_t stride : t.strides()) key.push_back(stride);
      }
    }
  }
  uint64_t hash = 0xcbf29ce484222325ull;  // FNV-1a's offset basis, over 64-bit words
  for (const int64_t word : key) hash = (hash ^ static_cast<uint64_t>(word)) * 0x100000001b3ull;
  PyObject* bytes = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(key.data()),
                                              static_cast<Py_ssize_t>(key.size() * sizeof(int64_t)));
  if (bytes == nullptr) return nullptr;
  PyObject* number = PyLong_FromUnsignedLongLong(hash);
  if (number == nullptr) {
    Py_DECREF(bytes);
    return nullptr;
  }
  PyObject* pair = PyTuple_New(2);
  if (pair == nullptr) {
    Py_DECREF(bytes);
    Py_DECREF(number);
    return nullptr;
  }
  PyTuple_SET_ITEM(pair, 0, number);  // (steals the references)
  PyTuple_SET_ITEM(pair, 1, bytes);
  return pair;
}

PyMethodDef methods[] = {
    {"clip_coefficient",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(clip_coefficient)),
     METH_FASTCALL, "clip_coefficient(square_sum, max_norm, out): max_grad_norm's coefficient"},
    {"any_tensor", any_tensor, METH_O,
     "any_tensor(values): whether an item of a list or tuple is a tensor (the others numbers)"},
    {"layout_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(layout_key)),
     METH_FASTCALL, "(hash, bytes): the Triton launchers' table key of lists of tensors."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// The extension module: importing fastsam._C registers the operators above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastsam's native operators", -1,
                               methods};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (!fastsam::add_held_type(m)) {  // fastsam._C.HeldPlan (binding/held_python.h)
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
