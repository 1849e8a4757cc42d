"""The eager steady state of a SAM step on the native backends (``cpu``, ``cuda``): the step
plan's tensors held in C++ (docs/design.md §5).

A step over Python lists costs host time per tensor: building the plan's key, reading the
gradients, and converting every list for every operator call (~0.2 us per tensor and list,
more for ``nn.Parameter``). Here the plan's parameters and the lists a step reads
(w_old, momentum buffers, Adam's moments and steps, averaged weights) are held by a
:class:`~fastsam.backends.native.HeldLists`, bound once per plan; a step checks that the plan
still holds (:meth:`StepPlanner.held <._plan.StepPlanner.held>`: the groups' parameters by
identity, the gradients and addresses in C++) and hands the ``held_*`` operators group numbers
and list names. Python's work per step is proportional to the number of parameter groups.

It takes the steps that are passes A, B and C and nothing else: the engine's hooks as
:class:`~._base.SharpnessAwareOptimizer` defines them (SAM, ASAM, interval SAM, AE-SAM and
ESAM, whose radius and mask the held pass B asks for) or with held forms of those a variant
overrides (``_held_hooks``: GSAM's and WSAM's kept g is the bound list "first", the
decomposition ``_held_sources``, GSAM's clip ``_held_update_clip`` from held reductions, WSAM's
decoupled term ``_held_after_update``; FriendlySAM's momentum ``_held_momentum``, its refusal
and commit; any other override takes the general path), a fused SGD/Adam/AdamW update, no
``capturable``, one native backend (not sharded), not under torch.compile. GradScaler's and
``skip_nonfinite``'s decisions are the general path's (:class:`~._skips.SkipPolicy`), over the
held gradients: the unscale and the inf/NaN check are the native ``scale`` and ``nonfinite``
passes over the plan's tables (torch's foreach operators, called from C++, when a gradient is
not laid out as its parameter). A plan is held after its first general step; an
update whose state is not all made yet (a parameter's first step, Adam steps that differ) takes
the general path for that group.
Averaging and ``max_grad_norm`` (its norm a held pass too) are folded in as in the general
path. The kernels and tensors are those of the general path: the numbers are the same bit for
bit (tests/test_held.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..backends.native import HeldGradients, NativeBackend
from ._plan import StepPlan
from ._update import adam_hyper, decoupled_weight_decay, sgd_hyper

if TYPE_CHECKING:
    from ..backends.native import HeldSource
    from ._base import SharpnessAwareOptimizer
    from ._core import FusedOptimizer


def _same_hook(opt: SharpnessAwareOptimizer | FusedOptimizer, name: str) -> bool:
    from ._base import SharpnessAwareOptimizer

    return getattr(type(opt), name, None) is getattr(SharpnessAwareOptimizer, name)


# The hooks a variant overrides when its step is more than passes A, B and C.
_HOOKS = ("_perturb_groups", "_first_buffers", "_before_update", "_after_update",
          "_update_clip")


def sam_steps_apply(opt: SharpnessAwareOptimizer) -> bool:
    """Whether ``opt``'s SAM steps (two passes) can step over held plans (module docstring)."""
    own = opt._held_hooks  # what the variant's held forms stand for (GSAM's, WSAM's)
    return (all(_same_hook(opt, name) or name in own for name in _HOOKS)
            and (not opt._keeps_first_grads or "_keeps_first_grads" in own))


def applies(opt: SharpnessAwareOptimizer) -> bool:
    """Whether ``opt``'s configuration can step over held plans: its SAM steps, or its steps
    between them (LookSAM's look-ahead steps, held while its SAM steps are not); the per-step
    conditions are checked by :class:`HeldSteps`."""
    return not opt._capturable and (sam_steps_apply(opt)
                                    or "_between_sam_steps" in opt._held_hooks)


# The hooks a held step calls that the base class defines as doing nothing (no masks, no
# momentum, always perturbing, no gradient sources, nothing after the update; no averaging
# left over without averages): called only where the optimizer's class overrides them
# (HeldSteps.overrides), a call less each at every step.
_NO_OP_HOOKS = ("_masks", "_held_momentum", "_perturbs", "_held_sources", "_held_after_update",
                "_held_average_rest")

# The base optimizer's state lists a held update reads (bound from the state dicts).
_MOMENTUM = ("momentum_buffer",)
_ADAM = ("exp_avg", "exp_avg_sq", "step")
_AMSGRAD = _ADAM + ("max_exp_avg_sq",)

# A plain update's gradient source per group of a plan (None: the plain gradient), given
# max_grad_norm's coefficient of the update (or None).
PlainSources = Callable[[StepPlan, "Tensor | None"], "list[HeldSource | None]"]


def with_params(plan: StepPlan) -> list[int]:
    """The groups of ``plan`` with parameters (those a held call over the plan goes over),
    listed once per plan (not to be changed)."""
    groups = plan.with_params
    if groups is None:
        groups = plan.with_params = [i for i, ps in enumerate(plan.params) if ps]
    return groups


class HeldSteps:
    """The first and second steps of ``opt`` over held plans, when they apply (each returns
    False, having changed nothing, when the general path must take the step); FreeSAM's and
    MSAM's one-pass steps (:meth:`plain`)."""

    def __init__(self, opt: SharpnessAwareOptimizer | FusedOptimizer, sam_steps: bool) -> None:
        self.opt = opt
        self.sam_steps = sam_steps  # first and second steps held too (not LookSAM's, FreeSAM's)
        self.skipped = False  # whether the last held update was skipped (inf/NaN, GradScaler)
        # (FreeSAM and MSAM, no SharpnessAwareOptimizer, lack the SAM steps' hooks: counted
        # as overridden, never called, as their steps are no SAM steps)
        self.overrides = frozenset(name for name in _NO_OP_HOOKS if not _same_hook(opt, name))

    def _backend(self, plan: StepPlan) -> NativeBackend | None:
        if plan.device is None or torch.compiler.is_compiling():
            return None
        backend = self.opt._backend_for(plan.device)
        return backend if isinstance(backend, NativeBackend) else None

    def adopt(self, plan: StepPlan) -> None:
        """After a general step over ``plan``: hold it in C++ for the next steps (once)."""
        if plan.held is not None or plan.has_complex:
            return
        backend = self._backend(plan)
        if backend is None:
            return
        plan.held = backend.hold(plan.params, plan.idle)
        plan.held.bind_groups([group["params"] for group in self.opt.param_groups],
                              plan.key[3])
        # GSAM's and WSAM's kept g (persistent, made once)
        keeps = getattr(self.opt, "_keeps_first_grads", False)  # (FreeSAM keeps none)
        firsts = self.opt._first_buffers(plan) if keeps else None
        for i, w_old in enumerate(plan.w_old):
            if plan.params[i]:
                plan.held.bind("w_old", i, w_old)
                if firsts is not None:
                    plan.held.bind("first", i, firsts[i])

    def current(self) -> StepPlan | None:
        """The held plan of this step, its gradients read until its ``held.release()``; or None
        (the general path makes one)."""
        if torch.compiler.is_compiling():
            return None
        opt = self.opt
        if opt.base_optimizer.state is not opt.state:  # loaded behind our back: general path
            return None
        return opt._planner.held(opt.param_groups)

    def perturb(self) -> StepPlan | bool | None:
        """Passes A and B over the held plan; False: pass A made, the optimizer decided on a
        plain step instead (``_perturbs``: AE-SAM); None (nothing done) without one."""
        plan = self.current() if self.sam_steps else None
        if plan is None:
            return None
        try:
            return self._perturb(plan)
        finally:
            plan.held.release()

    def _perturb(self, plan: StepPlan) -> StepPlan | bool | None:
        opt = self.opt
        groups = plan.perturbing
        if groups is None:  # (the groups' "perturb" flags are the plan's: listed once)
            groups = plan.perturbing = [i for i in with_params(plan)
                                        if opt.param_groups[i].get("perturb", True)]
        flag = opt._skips.perturb_flag(plan.device)
        if not groups:
            flag.zero_()  # nothing perturbed: nothing to skip
            return plan
        overrides = self.overrides
        momentum = opt._held_momentum(plan, groups) if "_held_momentum" in overrides else None
        if momentum is False:  # (FriendlySAM's first steps of some parameters)
            return None
        scalings, rhos = [], []
        for i in groups:  # (one loop: comprehensions cost a call each, at every step)
            group = opt.param_groups[i]
            scalings.append(opt._scaling(group))
            rhos.append(opt._rho(group))
        perturbed = opt._backend_for(plan.device).held_perturb(
            plan.held, groups, scalings, tuple(rhos), opt._q, opt._p, opt._eps, flag,
            opt._perturbs if "_perturbs" in overrides else None,
            opt._masks([opt.param_groups[i] for i in groups]) if "_masks" in overrides else None,
            "first" if opt._keeps_first_grads else "",
            momentum=momentum,
        )
        return plan if perturbed else False

    def update(self, perturbed: StepPlan) -> bool:
        """Pass C (restore + base update) over the held plan ``perturbed`` of the first step;
        False, with nothing done, when the general path must take it."""
        if perturbed.held is None or not self.sam_steps:
            return False
        current = self.current()  # (as _over_current, without a closure: at every step)
        if current is None:
            return False
        try:
            return current is perturbed and self._update(perturbed, "w_old")
        finally:
            current.held.release()

    def plain(self, sources: PlainSources | None = None, w_old: str = "params") -> bool:
        """A plain update over the held plan (the steps between SAM steps of interval SAM and
        AE-SAM; FreeSAM's steps): pass C with each parameter its own w_old, as the general
        path's ``_update_in_place``, with the gradient sources ``sources(plan)`` gives per group
        (FreeSAM's swap, LookSAM's correction), given, from the bound list ``w_old`` (MSAM's
        "weights"; "params": the weights as they are); False, with nothing done, when the
        general path must take it. :attr:`skipped` tells whether the update was skipped."""
        return self._over_current(lambda current: self._update(current, w_old, sources))

    def _over_current(self, update: Callable[[StepPlan], bool]) -> bool:
        """``update(plan)`` over the held plan of this step call (its gradients read until it
        returns); False, with nothing done, without a held plan: the general path takes the
        update."""
        current = self.current()
        if current is None:
            return False
        try:
            return update(current)
        finally:
            current.held.release()

    def _update(self, perturbed: StepPlan, w_old: str,
                plain_sources: PlainSources | None = None) -> bool:
        """Pass C over ``perturbed``, restoring from the list ``w_old`` ("params": a plain
        update from the weights as they are)."""
        opt = self.opt
        kind = opt._eager_update_kind(perturbed)
        if kind is None or not self._bind_state(perturbed, kind):
            return False
        backend = opt._backend_for(perturbed.device)
        held = perturbed.held
        after_perturb = w_old == "w_old"
        self.skipped = self._skipped(perturbed, backend, after_perturb)
        if self.skipped:
            return True
        if after_perturb:  # the hooks of a SAM step's update (GSAM's decomposition)
            clip = opt._held_update_clip(perturbed, backend)
            sources = (opt._held_sources(perturbed, backend, clip)
                       if "_held_sources" in self.overrides else None)
        else:
            clip = self.clip(perturbed, backend)
            sources = plain_sources(perturbed, clip) if plain_sources is not None else None
        averages = opt._averager.count_update(perturbed)
        for i in with_params(perturbed):
            group = opt.param_groups[i]
            average = averages[i] if averages else None
            source = sources[i] if sources else None
            if average is not None and ("average", i) not in held.bound:
                held.bind("average", i, average.buffers)
            if kind == "sgd":
                backend.held_sgd(held, i, sgd_hyper(group, None, clip), average, w_old, source)
                continue
            step = held.increment_steps(i)
            decoupled = decoupled_weight_decay(opt.base_optimizer, group)
            if step is not None:
                backend.held_adam(held, i, adam_hyper(group, decoupled, step, None, clip),
                                  average, w_old, source)
                continue
            # steps that differ (parameters that joined late): the per-value general update
            params = perturbed.params[i]
            opt._fused.adam(backend, group, decoupled, params, [p.grad for p in params],
                            params if w_old == "params" else perturbed.w_old[i],
                            opt._planner.states(perturbed, opt.state)[i],
                            source.source if source else None, average, None, clip)
        if after_perturb and "_held_after_update" in self.overrides:
            opt._held_after_update(perturbed, backend, clip)
        if averages or "_held_average_rest" in self.overrides:
            opt._held_average_rest(perturbed, averages)
        return True

    def clip(self, plan: StepPlan, backend: NativeBackend) -> Tensor | None:
        """max_grad_norm's coefficient for an update over ``plan`` (None without it), as
        ``_clip_coefficient`` forms it: ‖g‖² a held norm pass over the groups with params."""
        opt = self.opt
        if opt.max_grad_norm is None:
            return None
        return opt._clip_from(backend.held_norm(plan.held, with_params(plan)), backend)

    def _skipped(self, plan: StepPlan, backend: NativeBackend, after_perturb: bool) -> bool:
        """GradScaler's and ``skip_nonfinite``'s decision over the held gradients, as the
        general path's ``_skip_update`` makes it (the gradients unscaled in place under a
        scaler): True when the update is skipped, the perturbed weights restored
        (``after_perturb``)."""
        opt = self.opt
        kept = "first" if after_perturb and opt._keeps_first_grads else None  # unscaled too
        if not opt._decide_skip(lambda: HeldGradients(plan.held, with_params(plan), kept),
                                plan.device, after_perturb):
            return False
        if after_perturb:  # the weights back, but those of groups never moved (own w_old)
            moved = [i for i in with_params(plan) if plan.w_old[i][0] is not plan.params[i][0]]
            if moved:
                backend.held_restore(plan.held, moved)
        return True

    def _bind_state(self, plan: StepPlan, kind: str) -> bool:
        """Bind the base optimizer's state lists of every group the update reads, from the
        parameters' state dicts; False when a group's state is not all made (the general path
        makes it). Bound once, and afresh after a parameter's dict was set or removed
        (``StateMapping.changes``) or an entry in one replaced (checked at every update)."""
        held = plan.held
        changes = self.opt.state.changes
        if held.entry_names and (held.state_changes != changes
                                 or not held.entries_unchanged()):
            held.unbind_entries()
        states = None
        param_groups = self.opt.param_groups
        for i in with_params(plan):
            group = param_groups[i]
            if kind == "sgd":
                names = _MOMENTUM if group["momentum"] != 0 else ()
            else:
                names = _AMSGRAD if group["amsgrad"] else _ADAM
            if held.state_bound.get(i) is names:  # (all bound: a lookup, not one per name)
                continue
            for name in names:
                if (name, i) in held.bound:
                    continue
                if states is None:
                    states = self.opt._planner.states(plan, self.opt.state)
                if not held.bind_entries(name, i, states[i]):
                    return False
            held.state_bound[i] = names
        held.state_changes = self.opt.state.changes  # (after: lookups may make dicts)
        if kind == "sgd" and self.opt._fused.cohorts:
            return False
        return True
