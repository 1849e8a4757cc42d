"""The ``cpu`` and ``cuda`` backends: the operators of the compiled extension ``fastsam._C``.

Each pass is one call of a ``torch.ops.fastsam`` operator over every tensor of the step
(the binding, csrc/binding.cpp and csrc/binding/, validates and builds the segment tables in
C++; csrc/cpu_kernels.cpp and csrc/cuda_kernels.cu do the arithmetic, with the per-element
formulas of csrc/elementwise.h; docs/design.md §3).

- ``cpu``: one sweep over memory per pass, segments of 32768 elements spread over the threads
  of ``torch.get_num_threads()``; the norm is summed per segment and then in segment order, so
  it is bitwise the same for any number of threads.
- ``cuda``: one launch per pass and storage dtype (plus one to sum the norm's partials), with
  the segment tables cached on the device and rebuilt only when an address or shape changes.

A step's steady state runs from the plan's tensors held in C++ (:class:`HeldLists`, the
methods of its ``HeldPlan``; fastsam/optimizers/_held.py): the same kernels, called with group
numbers and list names instead of Python lists.

The extension is optional (``FASTSAM_SKIP_BUILD=1``, or no compiler): its import error is kept
and shown when one of these backends is asked for.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..functional import (
    AdamHyper,
    Average,
    Backend,
    DecomposeGroup,
    GradientSource,
    Mask,
    PerturbationNorm,
    PerturbGroup,
    SGDHyper,
    accumulation_dtype,
    dual_exponent,
    mask_scalars,
    momentum_scalars,
)
from . import _constants
from ._constants import ConstantArrays, any_tensor, held_for_graphs

try:
    from .. import _C  # (importing registers torch.ops.fastsam.*)

    _IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # keep the reason: shown when the backend is asked for
    _IMPORT_ERROR = exc


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why native backend ``name`` ("cpu" or "cuda") cannot run on ``device`` (None: it can)."""
    if _IMPORT_ERROR is not None:
        return (
            f"the fastsam._C extension is not importable ({_IMPORT_ERROR!r}); reinstall with a "
            "C++ compiler: pip install --no-build-isolation ."
        )
    if device.type != name:
        return f"parameters are on {device.type}: the {name} backend takes {name} tensors"
    if name == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastsam::norm", "CUDA"
    ):
        return (
            "fastsam._C was built without CUDA kernels (the installed torch had no CUDA, or "
            "nvcc was not found when fastsam was built)"
        )
    if name == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if not torch.ops.fastsam.cuda_runnable(index):
            major, minor = torch.cuda.get_device_capability(index)
            return (
                f"fastsam._C has no CUDA kernels for this GPU (compute capability "
                f"{major}.{minor}); rebuild with FASTSAM_CUDA_ARCHS={major}.{minor}"
            )
    return None


# The list names of the held passes (csrc/binding/held.h), in each operator's list order.
_HELD_RESTORE = ["params", "w_old"]
_HELD_SGD = {  # by (momentum, averaging)
    (m, a): ["params", "grad", "w_old", "momentum_buffer" if m else "", "", "average" if a else ""]
    for m in (False, True) for a in (False, True)
}
_HELD_ADAM = {  # by (amsgrad, averaging)
    (ams, a): ["params", "grad", "w_old", "exp_avg", "exp_avg_sq",
               "max_exp_avg_sq" if ams else "", "", "average" if a else ""]
    for ams in (False, True) for a in (False, True)
}


_HELD_GSAM = ["grad", "first"]
# the place of an update's gradient source operand (first_grads) in its list names
_SGD_OPERAND, _ADAM_OPERAND = 4, 6


def _held_lists(names: list[str], w_old: str, source: HeldSource | None = None,
                slot: int = 0) -> list[str]:
    """An update's list names with ``w_old`` in the place of "w_old" ("params": a plain update
    from the weights as they are, each parameter its own w_old) and the operand of ``source``
    at ``slot``."""
    names = names if w_old == "w_old" else [w_old if n == "w_old" else n for n in names]
    if source is not None:
        names = names[:slot] + [source.operand] + names[slot + 1:]
    return names


def _flatten(groups: list[PerturbGroup]):
    """The per-group lists the perturbation operators take."""
    return (
        [p for g in groups for p in g.params],
        [t for g in groups for t in g.grads],
        [len(g.params) for g in groups],
        [g.scaling.mode for g in groups],
        [float(g.scaling.eta) for g in groups],
    )


def _kept(groups: list[PerturbGroup]) -> list[Tensor]:
    """The keep_grads of every group flattened (empty when no group keeps its gradients)."""
    given = [g.keep_grads is not None for g in groups if g.params]
    if not any(given):
        return []
    if not all(given):
        raise ValueError("keep_grads must be given for every group or for none")
    return [t for g in groups for t in g.keep_grads]


def _momentum(groups: list[PerturbGroup], device: torch.device,
              constants: ConstantArrays) -> tuple:
    """The momentum arguments of the perturb operator (m, m_next, the per-group array of
    :func:`~fastsam.functional.momentum_scalars`; the norm operator takes the first and last):
    empty lists and None when no group has a momentum."""
    scalars = momentum_scalars(groups)
    if scalars is None:
        return [], [], None
    return ([t for g in groups for t in g.momentum.current],
            [t for g in groups for t in g.momentum.next], constants(scalars, device))


def _source(source: GradientSource | None) -> tuple:
    """The trailing (first_grads, along, alpha, grad_mode) arguments of the sgd and adam
    operators: the source's own kernel encoding (grad_mode 0: the plain gradient)."""
    if source is None:
        return [], None, 0.0, 0
    return source.operand, source.scalar, source.coefficient, source.mode


def _averaging(hyper_scalars: tuple, average: Average | None) -> tuple[tuple, list[Tensor]]:
    """The hp values and the trailing ``average`` list of the sgd and adam operators: the
    averaging weight is one more hp entry (csrc/kernels.h)."""
    if average is None:
        return hyper_scalars, []
    return hyper_scalars + (average.weight,), average.buffers


class HeldLists:
    """A step plan's tensors held in C++ (``fastsam._C.HeldPlan``, csrc/binding/held.h):
    the plan's parameters (their gradients are read there, at each call) and the lists
    bound to it by name, per group. Made once per plan; a list is bound once (the plan's w_old
    buffers, momentum buffers, Adam's moments and steps, averaged weights)."""

    def __init__(self, params: list[list[Tensor]], idle: list[Tensor]) -> None:
        self.plan = _C.HeldPlan(
            [p for ps in params for p in ps], [len(ps) for ps in params], idle)
        # what is bound, mirrored here: a lookup without a call into C++
        self.bound: set[tuple[str, int]] = set()
        self.entry_names: set[str] = set()  # the lists bound from state entries
        # per group, the tuple of state list names a caller found all bound (by identity;
        # forgotten with the entries): HeldSteps._bind_state's check, a lookup a group
        self.state_bound: dict[int, tuple[str, ...]] = {}
        self.state_changes = -1  # the state mapping's changes when they were bound
        self.device = next(p for ps in params for p in ps).device
        # the dtype of the norm's accumulation (fastsam.functional.accumulation_dtype)
        self.accumulation = accumulation_dtype([p for ps in params for p in ps])
        self.dtypes = list(dict.fromkeys(p.dtype for ps in params for p in ps))
        # the backend's norm output and scratch for this plan's passes (NativeBackend.
        # _held_norm), looked up once: a held step is never captured (capturable takes the
        # list operators)
        self.buffers: tuple[Tensor, Tensor] | None = None
        self.gsam_buffers: dict[str, tuple[Tensor, Tensor]] = {}  # GSAM's, by output name
        # The calls of every step, the plan's own methods (no Python frame in between):
        # holds(param_groups): None when ``param_groups`` are not the groups bound by
        # bind_groups (other parameters, by identity, or perturb values); else whether the
        # plan still holds (csrc/binding/held.h HeldPlan::refresh), and when it does the
        # gradients are read for this step call, until release() drops them (binding/
        # held_python.h Groups). entries_unchanged(): whether each state entry a list was
        # bound from by bind_entries still holds that tensor (a dict's version tag, a walk of
        # its items when it changed): False when one was replaced or removed.
        self.holds = self.plan.holds
        self.release = self.plan.release
        self.entries_unchanged = self.plan.entries_unchanged

    def bind(self, name: str, group: int, tensors: list[Tensor]) -> None:
        """List ``name`` of group ``group`` (a tensor per parameter of the group, in order)."""
        self.plan.bind(name, group, tensors)
        self.bound.add((name, group))

    def bind_entries(self, name: str, group: int, dicts: list[dict]) -> bool:
        """List ``name`` of group ``group`` from the parameters' state dicts (each one's
        ``dict[name]``), their entries kept for ``entries_unchanged``; False, with nothing
        bound, when a dict holds no tensor under ``name``."""
        if not self.plan.bind_entries(name, group, dicts):
            return False
        self.bound.add((name, group))
        self.entry_names.add(name)
        return True

    def unbind_entries(self) -> None:
        """Forget the lists :meth:`bind_entries` bound (to be bound afresh)."""
        self.plan.unbind_entries()
        self.bound = {(name, group) for name, group in self.bound
                      if name not in self.entry_names}
        self.entry_names.clear()
        self.state_bound.clear()

    def bind_groups(self, members: list, perturbs: tuple) -> None:
        """The param groups the plan was made for: per group, its parameters (kept by
        identity, in order) and its "perturb" value."""
        self.plan.bind_groups(members, perturbs)

    def increment_steps(self, group: int) -> float | None:
        """Adam's steps of ``group`` (bound as "step") + 1, and their new value, when they all
        hold one value; else None, with nothing changed."""
        value = self.plan.increment_steps("step", [group])
        return None if value < 0 else value


class HeldSource(NamedTuple):
    """A gradient source of a held update (pass C reads it instead of the plain gradient):
    ``source`` as the list operators take it, its operand a list bound to the plan under the
    name ``operand`` (GSAM's decomposition: "first", the kept first-pass gradients)."""

    operand: str
    source: GradientSource


class HeldGradients:
    """The gradients of ``groups`` of a held plan as the skip decision reads and unscales them
    (fastsam.optimizers._skips.Gradients; the check and the unscale one ``nonfinite`` and one
    ``scale`` pass over the plan's tables, in C++: csrc/binding/held.h);
    ``kept``: the name of the bound list of first-pass gradients unscaled with them (GSAM's),
    or None."""

    def __init__(self, held: HeldLists, groups: list[int], kept: str | None = None) -> None:
        self.held, self.groups, self.device = held, groups, held.device
        self.names = ["grad"] if kept is None else ["grad", kept]

    def check_nonfinite(self, found: Tensor, one: Tensor) -> None:
        self.held.plan.check_nonfinite(self.groups, found, one)

    def scale(self, factor: Callable[[torch.device, torch.dtype], Tensor]) -> None:
        self.held.plan.scale(self.groups, self.names,
                             [factor(self.device, dtype) for dtype in self.held.dtypes])

    def any_over_shards(self, found: Tensor) -> Tensor:
        return found  # (a held plan is never sharded)


class NativeBackend(Backend):
    def __init__(self, name: str) -> None:
        self.name = name
        self._constants = ConstantArrays()
        self._scratch: dict[tuple, Tensor] = {}

    def _buffer(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        """A persistent buffer per (name, device, dtype); the operators grow ``scratch`` onto
        new storage (a captured graph keeps the old one: its storage is held)."""
        key = (name, device, dtype)
        buf = self._scratch.get(key)
        if buf is None:
            shape = {"norm": (), "along": (), "gsam_sums": (3,)}.get(name, (0,))
            buf = self._scratch[key] = torch.zeros(shape, dtype=dtype, device=device)
        if _constants.capturing():  # (the storage object is made only then)
            held_for_graphs(buf.untyped_storage())
        return buf

    def _scalars(self, values: tuple, device: torch.device) -> tuple[list, Tensor | None]:
        """An update's scalars as the operators take them: the numbers by value (carried by
        the launch, nothing uploaded), and when a value is a tensor (an lr given as one) also
        the device array the kernels read instead (csrc/kernels.h SgdArgs)."""
        if not any_tensor(values):
            return list(values), None
        numbers = [0.0 if isinstance(v, Tensor) else v for v in values]
        return numbers, self._constants(values, device)

    def _held_scalars(self, hyper: SGDHyper | AdamHyper, average: Average | None,
                      source: HeldSource | None, held: HeldLists) -> tuple:
        """The scalar arguments of a held update: its hp numbers and their device array (as
        :meth:`_scalars`, the averaging weight one more entry), then the (along, alpha,
        grad_mode) of ``source`` (its operand goes by name; None: the plain gradient)."""
        scalars = hyper.kernel_scalars
        if average is not None:
            scalars, _ = _averaging(scalars, average)
        # (_C.any_tensor: any_tensor's loop in C, which torch.compile cannot trace: a held step
        # is never traced. The tuple as it is: it reads as a list does.)
        hp, hp_device = ((scalars, None) if not _C.any_tensor(scalars)
                         else self._scalars(scalars, held.device))
        if source is None:
            return hp, hp_device, None, 0.0, 0
        return hp, hp_device, source.source.scalar, source.source.coefficient, source.source.mode

    def perturbation_norm(self, groups: list[PerturbGroup], q: float) -> PerturbationNorm:
        flat = _flatten(groups)
        params, grads, sizes, modes, etas = flat
        device = params[0].device
        # fp64 parameters get an fp64 norm; everything else accumulates in fp32.
        out = self._buffer("norm", device, accumulation_dtype(params))
        scratch = self._buffer("scratch", device, torch.float64)
        momentum, _, scalars = mom = _momentum(groups, device, self._constants)
        torch.ops.fastsam.norm(params, grads, sizes, modes, etas, q, out, scratch, momentum,
                               scalars)
        # prepared: the flattened lists and momentum arguments; the filter norms stay in
        # ``scratch`` for perturb
        return PerturbationNorm(out, groups, (flat, mom))

    def perturb(self, norm: PerturbationNorm, p: float, eps: float, skipped: Tensor) -> None:
        # Reads the filter norms that perturbation_norm left in ``scratch`` for these groups
        # (the engine calls the two in a row), with the lists it flattened.
        groups, norm_sum = norm.groups, norm.total
        (params, grads, sizes, modes, etas), momentum = norm.prepared
        w_old = [t for g in groups for t in g.w_old]
        rhos = self._constants(tuple(g.rho for g in groups), params[0].device)
        keep = _kept(groups)
        scratch = self._buffer("scratch", params[0].device, torch.float64)
        q = dual_exponent(p)
        mask = mask_scalars(groups)  # ESAM's: thresholds per group (constant), the step's key
        thresholds, key = (None, (0, 0)) if mask is None else (
            self._constants(mask[0], params[0].device), mask[1])
        torch.ops.fastsam.perturb(
            params, grads, w_old, sizes, modes, etas, rhos, norm_sum, scratch, q, p, eps, skipped,
            keep, *momentum, thresholds, *key,
        )

    def restore(self, params: list[Tensor], w_old: list[Tensor]) -> None:
        if params:
            torch.ops.fastsam.restore(params, w_old)

    def clip_coefficient(self, square_sum: Tensor, max_norm: float, out: Tensor) -> bool:
        # (CUDA: torch's operators, queued on the stream; under torch.compile: traced)
        if not out.is_cpu or torch.compiler.is_compiling():
            return False
        _C.clip_coefficient(square_sum, max_norm, out)
        return True

    def restore_sgd(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        w_old: list[Tensor],
        momentum_buffers: list[Tensor],
        hyper: SGDHyper,
        fresh_buffers: bool,
        source: GradientSource | None = None,
        average: Average | None = None,
    ) -> None:
        if not params:
            return
        scalars, averaged = _averaging(hyper.kernel_scalars, average)
        hp, hp_device = self._scalars(scalars, params[0].device)
        buffers = momentum_buffers if hyper.momentum != 0 else []
        torch.ops.fastsam.sgd(
            params, grads, w_old, buffers, hp, hp_device, hyper.nesterov, hyper.maximize,
            fresh_buffers,
            *_source(source), averaged, hyper.skip, hyper.clip,
        )

    def restore_adam(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        w_old: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        hyper: AdamHyper,
        source: GradientSource | None = None,
        average: Average | None = None,
    ) -> None:
        if not params:
            return
        scalars, averaged = _averaging(hyper.kernel_scalars, average)
        hp, hp_device = self._scalars(scalars, params[0].device)
        torch.ops.fastsam.adam(
            params, grads, w_old, exp_avgs, exp_avg_sqs,
            max_exp_avg_sqs if hyper.amsgrad else [], hp, hp_device,
            hyper.decoupled, hyper.amsgrad, hyper.maximize, *_source(source), averaged,
            hyper.skip, hyper.bias, hyper.clip,
        )

    # ------------------------------------------------- the steady state over a held plan
    def hold(self, params: list[list[Tensor]], idle: list[Tensor]) -> HeldLists:
        """The plan of ``params`` (per group) held in C++; ``idle``: the other parameters."""
        return HeldLists(params, idle)

    def held_perturb(self, held: HeldLists, groups: list[int], scalings: list,
                     rhos: tuple, q: float, p: float, eps: float, skipped: Tensor,
                     perturbs: Callable[[Tensor], bool] | None = None,
                     masks: list[Mask | None] | None = None, keep: str = "",
                     names: tuple[str, str] = ("grad", "w_old"),
                     momentum: tuple[str, str, tuple] | None = None) -> bool:
        """Passes A and B over ``groups`` of ``held`` (their params, gradients and w_old): as
        :meth:`perturbation_norm` then :meth:`perturb` (``q``: the dual exponent of ``p``),
        ``scalings``, ``rhos`` and ESAM's ``masks`` (one per group, every one or none a Mask,
        with one key) per group.
        ``perturbs(S)``, given: whether pass B follows pass A (False returned: it did not).
        ``keep``: the bound list pass B copies g into (GSAM's "first"), or "". ``names``: the
        lists in the places of g and w_old (MSAM's momentum and "weights"). ``momentum``:
        FriendlySAM's (the bound lists m and m_next, and the per-group scalars of
        :func:`~fastsam.functional.momentum_scalars`), or None."""
        modes, etas = [], []
        for s in scalings:  # (one loop: comprehensions cost a call each, at every step)
            modes.append(s.mode)
            etas.append(float(s.eta))
        m = m_next = ""
        coefficients = None
        if momentum is not None:
            m, m_next, scalars = momentum
            coefficients = self._constants(scalars, held.device)
        out, scratch = self._held_norm(held, groups, modes, etas, q, names[0], m, coefficients)
        if perturbs is not None and not perturbs(out):
            return False
        thresholds, key0, key1 = None, 0, 0
        if masks is not None and masks[0] is not None:
            thresholds = self._constants(tuple(m.threshold for m in masks), held.device)
            key0, key1 = masks[0].key
        # lists: params, grads, w_old, keep, momentum, momentum_next (binding/held.h)
        held.plan.perturb(groups, ("params", names[0], names[1], keep, m, m_next), modes, etas,
                          self._constants(rhos, held.device), out, scratch, q, p, eps, skipped,
                          coefficients, thresholds, key0, key1)
        return True

    def held_norm(self, held: HeldLists, groups: list[int]) -> Tensor:
        """‖g‖₂² over ``groups`` of ``held`` (pass A with no scaling: max_grad_norm's norm, as
        :meth:`perturbation_norm` over those groups with q = 2), in the kept norm buffer."""
        return self._held_norm(held, groups, [0] * len(groups), [0.0] * len(groups), 2.0)[0]

    def _held_norm(self, held: HeldLists, groups: list[int], modes: list[int],
                   etas: list[float], q: float, grad: str = "grad", momentum: str = "",
                   coefficients: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pass A over ``groups`` of ``held`` (over the list ``grad`` in the place of g; with
        FriendlySAM's bound ``momentum`` list and its per-group ``coefficients``): the kept norm
        buffer and the scratch holding the filter norms pass B reads."""
        if held.buffers is None:
            held.buffers = (self._buffer("norm", held.device, held.accumulation),
                            self._buffer("scratch", held.device, torch.float64))
        out, scratch = held.buffers
        held.plan.norm(groups, ("params", grad, momentum), modes, etas, q, out, scratch,
                       coefficients)
        return out, scratch

    def held_restore(self, held: HeldLists, groups: list[int]) -> None:
        """The parameters of ``groups`` of ``held`` back to their w_old, as :meth:`restore`."""
        held.plan.restore(groups, _HELD_RESTORE)

    def held_sgd(self, held: HeldLists, group: int, hyper: SGDHyper,
                 average: Average | None, w_old: str = "w_old",
                 source: HeldSource | None = None) -> None:
        """Pass C with SGD over group ``group`` of ``held`` (w_old, "momentum_buffer" and
        "average" bound as the update needs them), as :meth:`restore_sgd`; ``w_old``
        "params": a plain update from the weights as they are; ``source``: what it reads
        instead of the plain gradient."""
        hp, hp_device, along, alpha, mode = self._held_scalars(hyper, average, source, held)
        lists = _HELD_SGD[hyper.momentum != 0, average is not None]
        if w_old != "w_old" or source is not None:
            lists = _held_lists(lists, w_old, source, _SGD_OPERAND)
        held.plan.sgd((group,), lists, hp, hp_device, hyper.nesterov, hyper.maximize, False,
                      along, alpha, mode, hyper.skip, hyper.clip)

    def held_adam(self, held: HeldLists, group: int, hyper: AdamHyper,
                  average: Average | None, w_old: str = "w_old",
                  source: HeldSource | None = None) -> None:
        """Pass C with Adam/AdamW over group ``group`` of ``held`` (w_old, "exp_avg",
        "exp_avg_sq", "max_exp_avg_sq" with amsgrad and "average" bound), as
        :meth:`restore_adam`; ``w_old`` and ``source`` as in :meth:`held_sgd`."""
        hp, hp_device, along, alpha, mode = self._held_scalars(hyper, average, source, held)
        lists = _HELD_ADAM[hyper.amsgrad, average is not None]
        if w_old != "w_old" or source is not None:
            lists = _held_lists(lists, w_old, source, _ADAM_OPERAND)
        held.plan.adam((group,), lists, hp, hp_device, hyper.decoupled, hyper.amsgrad,
                       hyper.maximize, along, alpha, mode, hyper.skip, hyper.clip)

    def wsam_decoupled(self, params: list[Tensor], first: list[Tensor], grads: list[Tensor],
                       alpha: float, clip: Tensor | None = None) -> None:
        torch.ops.fastsam.wsam_decoupled(params, first, grads, alpha, clip)

    def held_wsam_decoupled(self, held: HeldLists, groups: list[int], alpha: float,
                            clip: Tensor | None = None) -> None:
        """:meth:`wsam_decoupled` over ``groups`` of ``held``: its parameters, the bound list
        "first" (WSAM's kept g) and the gradients."""
        held.plan.wsam_decoupled(groups, ["params", "first", "grad"], alpha, clip)

    def held_gsam_along(self, held: HeldLists, groups: list[int], eps: float) -> Tensor:
        """GSAM's along over ``groups`` of ``held`` (the gradients and the kept "first"), as
        :meth:`gsam_along`, in the same kept buffer."""
        return self._held_gsam(held, groups, "along", eps)

    def held_gsam_sums(self, held: HeldLists, groups: list[int]) -> Tensor:
        """GSAM's three sums over ``groups`` of ``held``, as :meth:`gsam_sums`."""
        return self._held_gsam(held, groups, "gsam_sums", 0.0)

    def _held_gsam(self, held: HeldLists, groups: list[int], out_name: str,
                   eps: float) -> Tensor:
        buffers = held.gsam_buffers.get(out_name)
        if buffers is None:  # (looked up once per plan, as held.buffers)
            buffers = held.gsam_buffers[out_name] = (
                self._buffer(out_name, held.device, held.accumulation),
                self._buffer("gsam_scratch", held.device, torch.float64))
        out, scratch = buffers
        held.plan.gsam(groups, _HELD_GSAM, eps, out_name == "gsam_sums", out, scratch)
        return out

    def gsam_along(self, groups: list[DecomposeGroup], eps: float) -> Tensor:
        adv, first, out, scratch = self._gsam_args(groups, "along")
        torch.ops.fastsam.gsam_along(adv, first, eps, out, scratch)
        return out

    def gsam_sums(self, groups: list[DecomposeGroup]) -> Tensor:
        adv, first, out, scratch = self._gsam_args(groups, "gsam_sums")
        torch.ops.fastsam.gsam_sums(adv, first, out, scratch)
        return out

    def _gsam_args(self, groups: list[DecomposeGroup], out_name: str) -> tuple:
        """The lists of GSAM's reduction, its output buffer (fp64 when a gradient is) and the
        scratch of its partial sums."""
        adv = [t for g in groups for t in g.grads]
        first = [t for g in groups for t in g.first_grads]
        device = adv[0].device if adv else torch.device("cpu")
        out = self._buffer(out_name, device, accumulation_dtype(adv))
        return adv, first, out, self._buffer("gsam_scratch", device, torch.float64)
