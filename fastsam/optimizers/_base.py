"""The two-step engine shared by every fastsam optimizer.

The classes here hold no arithmetic: they collect tensors, keep torch.optim's state layout, and
call the passes of :mod:`fastsam.functional` on the selected backend.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import repeat
from operator import attrgetter, is_not
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..averaging import Schedule, averaging_schedule
from ..backends import select_backend
from ..backends.sharded import ShardedBackend, shard_groups
from ..functional import (
    AdamHyper,
    Average,
    Backend,
    Decomposition,
    GradientSource,
    PerturbGroup,
    Scaling,
    SGDHyper,
    adam_bias_corrections,
    dual_exponent,
    foreach_average,
)

AVERAGE_KEY = "averaged_weights"  # per-parameter state entry of the averaged copy
# Each param group of a state dict carries the optimizer's counters under this key: a state
# dict's groups and per-parameter states are all that torch.distributed.checkpoint keeps.
COUNTERS_KEY = "fastsam_counters"
# The base optimizers whose update is fused with the restore (exact classes: a subclass may
# change step()).
_FUSED_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}


@dataclass
class _StepPlan:
    """Per group, the parameters that have a gradient and their persistent w_old buffers.

    Collecting these costs a few microseconds per tensor in Python (tensor-keyed lookups,
    device checks), so a plan is reused for as long as its key holds: the same parameters have
    gradients, at the same addresses (a ``p.data = ...`` swap changes the address), with the
    same param groups. Gradient tensors themselves are read afresh every step.
    """

    key: tuple
    params: list[list[Tensor]]
    w_old: list[list[Tensor]]
    positions: list[list[int]]  # where each group's params sit in the flat parameter list
    device: torch.device | None
    has_complex: bool
    idle: list[Tensor]  # parameters without a gradient this step (averaged on their own)
    states: list[list[dict]] | None = None  # per-parameter state dicts, looked up once
    averaged: list[list[Tensor]] | None = None  # per group, the averaged copies (once)
    first: list[list[Tensor]] | None = None  # per group, the kept first gradients (once)
    idle_averaged: list[Tensor] | None = None

    def grads(self, flat_grads: list) -> list[list[Tensor]]:
        """Per group, the gradients of the plan's parameters, taken from this step's flat list."""
        out = []
        for positions, params in zip(self.positions, self.params):
            grads = list(map(flat_grads.__getitem__, positions))
            if any(map(_is_sparse, grads)):
                bad = next(p for p, g in zip(params, grads) if g.is_sparse)
                raise RuntimeError(
                    f"fastsam does not support sparse gradients (parameter of shape "
                    f"{tuple(bad.shape)}); use a dense gradient or a sparse-aware optimizer"
                )
            out.append(grads)
        return out


_grad = attrgetter("grad")
_is_sparse = attrgetter("is_sparse")


def _lr(lr: float | Tensor) -> float | Tensor:
    """A number as float; a tensor as is: the backends read it on the device, and quantities
    derived from it (lr/(1 - β1^t), 1 - lr·wd) are tensor ops in its dtype, as in torch.optim."""
    return lr.detach() if isinstance(lr, Tensor) else float(lr)


def _rho(rho: float | Tensor) -> float | Tensor:
    """A number as float; a one-element tensor as a 0-d view of it: the backends read it on
    the device (a device tensor rho changed in place between steps is never read by the
    host)."""
    return rho.detach().reshape(()) if isinstance(rho, Tensor) else float(rho)


def _canonical(device: torch.device) -> torch.device:
    """``cuda`` and ``cuda:0`` (the current device) are one device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_finite_nonnegative(name: str, value: Any) -> float:
    """Validate a hyper-parameter that must be a finite number >= 0 (NaN fails)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_rho(value: Any) -> None:
    """Validate a group's rho: a finite number >= 0, or a one-element floating-point tensor
    holding one (its value is read once here, when the group is added or loaded; what is
    written into it later goes to the kernels unread)."""
    if isinstance(value, Tensor):
        if not value.is_floating_point() or value.numel() != 1:
            raise TypeError(
                "rho must be a number or a one-element floating-point tensor, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}"
            )
        if value.requires_grad:
            raise ValueError("a tensor rho must not require grad (rho is not differentiated)")
        value = value.item()
    check_finite_nonnegative("rho", value)


def persistent_buffer(store: dict[Tensor, Tensor], p: Tensor, copy: bool = False) -> Tensor:
    """``store[p]``: a buffer shaped like ``p``, allocated once and kept across steps
    (re-allocated only if ``p`` changed shape, dtype or device); ``copy``: a new buffer starts
    as a copy of ``p`` rather than uninitialised."""
    buf = store.get(p)
    if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
        buf = torch.empty_like(p, memory_format=torch.preserve_format)
        if copy:
            buf.copy_(p.detach())
        store[p] = buf
    return buf


def _keep_option_tensors(groups: list[dict[str, Any]], live: list[dict[str, Tensor]]) -> None:
    """After a load, a group option that was a tensor (lr, rho) keeps that tensor, with the
    loaded value copied into it (torch.optim would put the loaded object in its place): a CUDA
    graph captured over it, or a schedule writing into it, still drives the group."""
    for group, tensors in zip(groups, live):
        for key, mine in tensors.items():
            loaded = group.get(key)
            if isinstance(loaded, Tensor) and loaded.numel() == mine.numel():
                mine.copy_(loaded.reshape(mine.shape))
            elif isinstance(loaded, (int, float)) and not isinstance(loaded, bool):
                mine.fill_(loaded)
            else:
                continue  # another kind of value: the loaded one stands
            group[key] = mine


class SharpnessAwareOptimizer(Optimizer):
    """Base class: first step (perturb), second step (restore + base update), closure step.

    Subclasses pass their per-group defaults and implement :meth:`_check_group` (validation of
    one group's options) and :meth:`_scaling` (the ASAM operator of one group).
    """

    _keeps_w_old = True  # a persistent w_old buffer per parameter (FreeSAM needs none)
    _keeps_first_grads = False  # GSAM, LookSAM: the perturb pass also keeps g
    # torch.amp.GradScaler: scaler.step(optimizer) sets the attributes grad_scale (the loss
    # scale) and found_inf around its call of step() instead of unscaling the gradients itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, Any],
        *,
        p: float,
        eps: float,
        backend: str | None,
        base_kwargs: dict[str, Any],
        average: Any = None,
        skip_nonfinite: bool = False,
        capturable: bool = False,
    ) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"p must be a number (2, float('inf') or any p > 1), got {p!r}")
        if not p > 1.0:
            raise ValueError(f"p must be > 1 (2, float('inf') or any finite p > 1), got {p}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
        self._skip_nonfinite = skip_nonfinite
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be True or False, got {capturable!r}")
        self._capturable = capturable
        # capturable: the counts on the device (fp64; what a replayed CUDA graph advances):
        # [GradScaler's skips, skip_nonfinite's skips] since construction or the last load,
        # then [updates made, snapshots averaged] in all, started from the host's counts at the
        # first update or skip after construction or a load (:meth:`_device_counter`).
        self._device_counts: Tensor | None = None
        # capturable, SGD with dampening: per parameter whose momentum buffer was made in a
        # step skipped or not on the device, its cohort's flag (1 once an update went ahead)
        self._momentum_cohorts: dict[Tensor, Tensor] = {}
        self._found: Tensor | None = None  # the skip flag of skip_nonfinite, on the device
        self._one: Tensor | None = None  # its check's unscale factor, 1
        self._nonfinite_skipped = 0
        self._p = float(p)
        self._q = dual_exponent(self._p)
        self._eps = check_finite_nonnegative("eps", eps)
        self._sam_defaults = dict(defaults)
        self._perturbed: _StepPlan | None = None
        self._plan: _StepPlan | None = None
        self._layout_version = 0  # bumped when groups or loaded state change: plans expire
        self._w_old: dict[Tensor, Tensor] = {}
        self._first: dict[Tensor, Tensor] = {}  # g of the first pass (_keeps_first_grads)
        self._skipped: Tensor | None = None
        # Weight averaging (fastsam.averaging): the schedule, the averaged copy of each
        # parameter, the updates made and the snapshots averaged so far.
        self._average_schedule = averaging_schedule(average)
        self._averaged: dict[Tensor, Tensor] = {}
        self._updates = 0
        self._n_averaged = 0
        self._swapped = False
        self._amp_skipped = 0

        super().__init__(params, defaults)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    "keyword arguments for the base optimizer ("
                    + ", ".join(sorted(base_kwargs))
                    + ") are only accepted with an optimizer class, not an instance"
                )
            self._adopt_instance(base_optimizer)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer class or instance, got "
                f"{base_optimizer!r}"
            )
        self._link_base()
        if capturable and type(self.base_optimizer) not in _FUSED_KINDS:
            raise ValueError(
                "capturable=True needs a base update fastsam fuses (torch.optim.SGD, Adam or "
                f"AdamW), got {type(self.base_optimizer).__name__}: its own step() cannot skip "
                "an update on the device"
            )
        self._requested_backend = backend
        self._backends: dict[torch.device, Backend] = {}
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is not None:
            self._backend_for(first.device)  # an impossible request fails here, not mid-training

    # ----------------------------------------------------------------- construction helpers
    def _adopt_instance(self, base: Optimizer) -> None:
        """Use an already-built base optimizer over exactly our parameters."""
        owner = {p: g for g in self.param_groups for p in g["params"]}
        theirs = [p for g in base.param_groups for p in g["params"]]
        if len(theirs) != len(owner) or any(p not in owner for p in theirs):
            raise ValueError(
                "base_optimizer instance must be built over exactly the same parameters as "
                f"this optimizer: it has {len(theirs)} parameters, {len(owner)} were given here, "
                f"{sum(p not in owner for p in theirs)} of its parameters were not given here"
            )
        for group in base.param_groups:
            source = owner[group["params"][0]] if group["params"] else self._sam_defaults
            for key in self._sam_defaults:
                group.setdefault(key, source[key])
            self._check_group(group)
        self.base_optimizer = base

    def _link_base(self) -> None:
        """Share param_groups and state with the base optimizer (one source of truth)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._place_steps()
        self.defaults = {**self.base_optimizer.defaults, **self._sam_defaults}
        for group in self.param_groups:
            for key, value in self._sam_defaults.items():
                group.setdefault(key, value)
            self._check_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to this optimizer and to the base optimizer (one shared group dict)."""
        for key, value in self._sam_defaults.items():
            param_group.setdefault(key, value)
        self._check_group(param_group)
        params = param_group["params"]
        for p in [params] if isinstance(params, Tensor) else params:
            if isinstance(p, Tensor) and not (p.is_floating_point() or p.is_complex()):
                raise TypeError(
                    f"fastsam optimizes floating-point parameters; got a {p.dtype} tensor of "
                    f"shape {tuple(p.shape)} (integer tensors have no gradients)"
                )
        if "base_optimizer" in self.__dict__:
            self.base_optimizer.add_param_group(param_group)
        else:  # during Optimizer.__init__, before the base exists
            super().add_param_group(param_group)
        self._layout_version = getattr(self, "_layout_version", 0) + 1
        self.__dict__.get("_backends", {}).clear()  # sharding is decided over every parameter

    # ----------------------------------------------------------------- subclass hooks
    def _check_group(self, group: dict[str, Any]) -> None:
        check_rho(group["rho"])

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        raise NotImplementedError

    def _first_buffers(self, plan: _StepPlan) -> list[list[Tensor]] | None:
        """Per group of ``plan``, the persistent buffers the perturb pass fills with a copy of
        g when the optimizer ``_keeps_first_grads`` (GSAM, LookSAM), else None. Looked up once
        per plan."""
        if not self._keeps_first_grads:
            return None
        if plan.first is None:
            plan.first = [[persistent_buffer(self._first, p) for p in ps] for ps in plan.params]
        return plan.first

    def _before_update(
        self, perturbed: _StepPlan, now: _StepPlan, grads: list[list[Tensor]], fused: bool,
        skip: Tensor | None = None,
    ) -> list[Decomposition | None] | None:
        """Called at the start of the second step, before restore and update, with this step's
        gradients per group of ``now``. GSAM returns, per group, the decomposition the fused
        update applies (``fused``: the update is fused), or rewrites the gradients in place.
        ``skip``: capturable's device flag of the update (what the hook keeps must not change
        when it is set)."""
        return None

    # ----------------------------------------------------------------- the step
    def _backend_for(self, device: torch.device) -> Backend:
        backend = self._backends.get(device)
        if backend is None:
            key = _canonical(device)
            backend = self._backends.get(key)
            if backend is None:
                backend = select_backend(self._requested_backend, key)
                sharding = shard_groups([p for g in self.param_groups for p in g["params"]])
                if sharding is not None:  # FSDP2: local shards, reductions all-reduced
                    backend = ShardedBackend(backend, *sharding)
            self._backends[device] = self._backends[key] = backend
        return backend

    @property
    def backend(self) -> str:
        """Name of the backend the parameters' device uses."""
        first = next(p for g in self.param_groups for p in g["params"])
        return self._backend_for(first.device).name

    def _step_plan(self) -> tuple[_StepPlan, list]:
        """This step's plan, and the flat list of every parameter's gradient (or None)."""
        if self.base_optimizer.state is not self.state:  # loaded behind our back: relink
            self._link_base()
            self._layout_version += 1
        flat = [p for group in self.param_groups for p in group["params"]]
        flat_grads = list(map(_grad, flat))
        key = (
            self._layout_version,
            tuple(map(is_not, flat_grads, repeat(None))),
            tuple(map(Tensor.data_ptr, flat)),
        )
        if self._plan is not None and self._plan.key == key:
            return self._plan, flat_grads
        params, w_old, positions, device, has_complex = [], [], [], None, False
        idle = [p for p, g in zip(flat, flat_grads) if g is None]
        offset = 0
        for group in self.param_groups:
            n = len(group["params"])
            positions.append([offset + i for i in range(n) if flat_grads[offset + i] is not None])
            params.append([flat[i] for i in positions[-1]])
            offset += n
            w_old.append([])
            for p in params[-1]:
                if device is None:
                    device = p.device
                elif p.device != device:
                    raise RuntimeError(
                        f"fastsam needs every parameter with a gradient on one device: found "
                        f"{device} and {p.device}"
                    )
                if p.is_meta:
                    raise RuntimeError(
                        f"fastsam: a parameter of shape {tuple(p.shape)} is on the meta device "
                        "(shapes only, no data): materialize the model first (module.to_empty("
                        "device=...), then initialise it) and build the optimizer over its "
                        "parameters then (to_empty replaces meta parameters with new ones)"
                    )
                has_complex |= p.is_complex()
                w_old[-1].append(persistent_buffer(self._w_old, p) if self._keeps_w_old else p)
        self._plan = _StepPlan(key, params, w_old, positions, device, has_complex, idle)
        return self._plan, flat_grads

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient to ``w + e`` (the adversarial point).

        Args:
            zero_grad: clear the gradients afterwards (default False), ready for the second
                forward/backward pass.
        """
        if self._perturbed is not None:
            raise RuntimeError(
                "first_step() was called twice without second_step() in between: the weights "
                "are already perturbed. Call second_step() (or step()) to restore and update."
            )
        self._refuse_when_swapped("first_step()")
        plan, flat_grads = self._step_plan()
        self._check_capturable(plan)
        if plan.device is not None:
            kept = self._first_buffers(plan) or repeat(None)
            groups = [
                PerturbGroup(ps, grads, olds, _rho(group["rho"]), self._scaling(group), keep)
                for group, ps, grads, olds, keep in zip(
                    self.param_groups, plan.params, plan.grads(flat_grads), plan.w_old, kept
                )
            ]
            backend = self._backend_for(plan.device)
            if self._skipped is None or self._skipped.device != plan.device:
                self._skipped = torch.zeros((), dtype=torch.float32, device=plan.device)
            norm_sum = backend.perturbation_norm(groups, self._q)
            backend.perturb(groups, norm_sum, self._p, self._eps, self._skipped)
        self._perturbed = plan
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights saved by :meth:`first_step` and apply the base optimizer's update
        with the current (adversarial) gradients.

        SGD, Adam and AdamW updates are fused with the restore (one pass); any other base
        optimizer gets an exact restore followed by its own ``step()``.

        Args:
            zero_grad: clear the gradients afterwards (default False).
        """
        if self._perturbed is None:
            raise RuntimeError(
                "second_step() was called without a pending first_step(): there is no "
                "perturbation to undo. Call first_step() after the first backward pass."
            )
        perturbed, self._perturbed = self._perturbed, None
        now, flat_grads = self._step_plan()
        all_grads = now.grads(flat_grads)
        skip = self._skip_update(all_grads, perturbed)
        if skip is True:  # inf/NaN gradients: restore only
            self._restore(perturbed)
            self._opt_called = self.base_optimizer._opt_called = True
            if zero_grad:
                self.zero_grad()
            return
        flag = skip if isinstance(skip, Tensor) else None  # capturable: skipped on the device
        fused = self._fused_update_kind(now)
        if flag is not None and fused is None:  # a parameter was added since first_step()
            self._restore(perturbed)
            raise RuntimeError(self._not_capturable(now))
        sources = self._before_update(perturbed, now, all_grads, fused is not None, flag)
        averages = self._count_update(now, flag)
        states = self._plan_states(now) if fused else None
        for i, group in enumerate(self.param_groups):
            if now is perturbed:  # the usual case: the same parameters have gradients
                params, w_old = now.params[i], now.w_old[i]
                restore_only, restore_from = ([], []) if fused else (params, w_old)
            else:
                saved = (
                    dict(zip(perturbed.params[i], perturbed.w_old[i]))
                    if i < len(perturbed.params) else {}
                )
                params = now.params[i]
                restore_only = [p for p in saved if p.grad is None or fused is None]
                restore_from = [saved[p] for p in restore_only]
                # A parameter that was not perturbed (no gradient in the first pass) is its own
                # w_old: the fused kernels read w_old and write w element by element.
                w_old = [saved.get(p, p) for p in params]
            if restore_only:
                self._backend_for(restore_only[0].device).restore(restore_only, restore_from)
            if fused is None or not params:
                continue
            backend = self._backend_for(params[0].device)
            update = self._fused_sgd if fused == "sgd" else self._fused_adam
            source = sources[i] if sources else None
            average = averages[i] if averages else None
            update(backend, group, params, all_grads[i], w_old, states[i], source, average, flag)
        if fused is None:
            self.base_optimizer.step()
        self._average_rest(now, averages, fused is None)
        # An lr scheduler attached to either optimizer warns "lr_scheduler.step() before
        # optimizer.step()" unless it saw a step: the fused update and the two-step API bypass
        # the step() it wraps, so mark both as stepped (torch.optim.lr_scheduler's flag).
        self._opt_called = self.base_optimizer._opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One sharpness-aware step.

        With a closure (the popular API): the caller has already run the first forward and
        backward; this perturbs, calls ``closure()`` (forward + backward at the perturbed point,
        gradients zeroed before it), then restores and updates. Returns the closure's loss.

        Without a closure: performs the pending second step (after :meth:`first_step`); this is
        what ``GradScaler.step(optimizer)`` calls.
        """
        if closure is None:
            if self._perturbed is None and self._lr_is_zero():
                # torch.distributed.checkpoint creates an empty optimizer's state this way: a
                # step with zero gradients and every lr set to 0, which moves no weight.
                self.base_optimizer.step()
                self._place_steps()
                return None
            if self._perturbed is None:
                raise RuntimeError(
                    "step() without a closure performs the second step, but no first_step() is "
                    "pending. Either pass a closure that recomputes the loss and calls "
                    "backward(), or call first_step() first."
                )
            self.second_step()
            return None
        if self._perturbed is not None:
            raise RuntimeError(
                "step(closure) was called while a first_step() is pending; call step() without "
                "a closure, or second_step(), to finish that step first"
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def _restore(self, perturbed: _StepPlan) -> None:
        """Every perturbed parameter back to its saved weights, exactly."""
        for params, w_old in zip(perturbed.params, perturbed.w_old):
            if params:
                self._backend_for(params[0].device).restore(params, w_old)

    def _lr_is_zero(self) -> bool:
        lrs = [group.get("lr") for group in self.param_groups]
        return bool(lrs) and all(lr is not None and float(lr) == 0.0 for lr in lrs)

    def _plan_states(self, plan: _StepPlan) -> list[list[dict]]:
        """Per group of ``plan``, its parameters' state dicts. Tensor-keyed lookups cost ~1.6 us
        each (Tensor.__hash__ is Python): once per plan. torch.optim only ever replaces the
        whole state mapping, which expires the plan."""
        if plan.states is None:
            plan.states = [[self.state[p] for p in ps] for ps in plan.params]
        return plan.states

    def _update_in_place(
        self,
        plan: _StepPlan,
        all_grads: list[list[Tensor]],
        sources: list[GradientSource | None] | None = None,
        skip: Tensor | None = None,
    ) -> None:
        """One update of the plan's parameters from their current weights, with nothing to
        restore (FreeSAM, LookSAM's look-ahead steps): fused with SGD/Adam/AdamW (each
        parameter is its own w_old; ``sources`` per group; ``skip``: capturable's device
        flag), else the base optimizer's own ``step()``. Counts the update and averages the
        weights as scheduled."""
        averages = self._count_update(plan, skip)
        fused = self._fused_update_kind(plan)
        if plan.device is not None and fused is not None:
            backend = self._backend_for(plan.device)
            update = self._fused_sgd if fused == "sgd" else self._fused_adam
            for i, (group, params, grads, states) in enumerate(
                zip(self.param_groups, plan.params, all_grads, self._plan_states(plan))
            ):
                if params:
                    source = sources[i] if sources else None
                    average = averages[i] if averages else None
                    update(backend, group, params, grads, params, states, source, average, skip)
        elif plan.device is not None:
            self.base_optimizer.step()
        self._average_rest(plan, averages, fused is None)
        self._opt_called = self.base_optimizer._opt_called = True

    # ----------------------------------------------------------------- GradScaler
    def _skip_update(
        self, all_grads: list[list[Tensor]], perturbed: _StepPlan | None, on_host: bool = False
    ) -> bool | Tensor:
        """At the start of an update: True when it must be skipped for inf/NaN gradients,
        False when it goes ahead, or, with ``capturable`` (unless ``on_host``), the 0-d fp32
        device flag the update kernels read instead (False when nothing can skip it).

        Under GradScaler (its protocol: ``found_inf`` and ``grad_scale`` set around ``step()``):
        skip when the scaler found inf/NaN in this step's gradients (read on the host, one
        sync per step, as torch.optim's optimizers make under GradScaler; the flag itself with
        ``capturable``), and divide this step's gradients (and the kept first-pass ones, which
        the update combines with them) by the loss scale, on the device. Without a scaler and
        with ``skip_nonfinite``: skip when the first pass's perturbation norm (``perturbed``)
        or a gradient of this pass is inf/NaN (:meth:`_nonfinite`)."""
        scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        flag: Tensor | None = None
        on_device = self._capturable and not on_host
        if found_inf is not None and on_device:
            flag = self._count_device_skip(0, found_inf)
        elif found_inf is not None and bool(found_inf.item()):
            self._amp_skipped += 1
            return True
        if scale is None:
            if found_inf is None and self._skip_nonfinite:
                found = self._nonfinite(all_grads, perturbed)
                if found is None:
                    return False
                if on_device:
                    return self._count_device_skip(1, found)
                if bool(found.item()):
                    self._nonfinite_skipped += 1
                    return True
            return False if flag is None else flag
        inverse = scale.double().reciprocal()
        kept = (self._first_buffers(perturbed) if perturbed is not None else None) or []
        by_dtype: dict[tuple, list[Tensor]] = {}
        for t in [g for gs in all_grads for g in gs] + [k for ks in kept for k in ks]:
            by_dtype.setdefault((t.device, t.dtype), []).append(t)
        for (device, dtype), tensors in by_dtype.items():
            torch._foreach_mul_(tensors, inverse.to(device=device, dtype=dtype))
        return False if flag is None else flag

    def _count_device_skip(self, which: int, flag: Tensor) -> Tensor:
        """capturable: add the device flag (0 or 1) to skip counter ``which`` (0 GradScaler's,
        1 skip_nonfinite's) on the device, and return it as the 0-d fp32 flag the kernels
        read (on the parameters' device)."""
        device = self._plan.device if self._plan is not None else flag.device
        flag = flag.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
        self._device_counter(flag.device)[which].add_(flag)
        return flag

    def _device_counter(self, device: torch.device) -> Tensor:
        """capturable: the device counts (see ``_device_counts``), made on first use."""
        counts = self._device_counts
        if counts is None:
            counts = torch.tensor([0, 0, self._updates, self._n_averaged], dtype=torch.float64)
        if counts.device != device:
            counts = counts.to(device)
        self._device_counts = counts
        return counts

    def _read_device_counts(self) -> list[int] | None:
        """capturable: the device counts as numbers (reading them waits for the device), or
        None while the host's are current."""
        if self._device_counts is None:
            return None
        return [int(v) for v in self._device_counts.tolist()]

    def _nonfinite(
        self, all_grads: list[list[Tensor]], perturbed: _StepPlan | None
    ) -> Tensor | None:
        """skip_nonfinite's test: a one-element device flag, 1 when a gradient in
        ``all_grads`` is inf/NaN or, after a perturbation (``perturbed``), the first pass's norm
        was, else 0 (None without gradients). One fused check per dtype (torch's GradScaler
        kernel, with an unscale by exactly 1), summed over the shards of sharded parameters."""
        grads = [g for gs in all_grads for g in gs]
        if not grads:
            return None
        device = grads[0].device
        if self._found is None or self._found.device != device:
            self._found = torch.zeros(1, dtype=torch.float32, device=device)
            self._one = torch.ones(1, dtype=torch.float32, device=device)
        found = self._found
        if perturbed is not None and self._skipped is not None:
            found.copy_(self._skipped)  # 1 when the first pass's norm was not finite
        else:
            found.zero_()
        backend = self._backend_for(device)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in backend.local(grads):
            by_dtype.setdefault(g.dtype, []).append(g)
        for tensors in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, self._one)
        return backend.sum_over_shards(found).clamp_(max=1.0)

    @property
    def amp_skipped_steps(self) -> int:
        """Updates skipped because GradScaler found inf/NaN gradients (weights restored).
        With ``capturable`` the count is on the device: reading it waits for the device."""
        return self._counters()["amp_skipped"]

    @property
    def nonfinite_skipped_steps(self) -> int:
        """Updates skipped by ``skip_nonfinite=True`` for inf/NaN gradients (weights restored
        bit for bit, optimizer state untouched). Saved in :meth:`state_dict`. With
        ``capturable`` the count is on the device: reading it waits for the device."""
        return self._counters()["nonfinite_skipped"]

    # ----------------------------------------------------------------- capturable
    def _check_capturable(self, plan: _StepPlan) -> None:
        """With ``capturable``, before a step changes anything: refuse what the update kernels
        cannot skip on the device."""
        if not self._capturable or plan.device is None:
            return
        if self._fused_update_kind(plan) is None:
            raise RuntimeError(self._not_capturable(plan))

    def _place_steps(self) -> None:
        """Adam's step tensors where the fused update keeps them: on the CPU (torch.optim's
        layout), or on the parameter's device with ``capturable`` (torch's capturable
        layout). Called where torch creates or loads them (a load, the base optimizer's own
        step), not per step; a copy, no read of the value. Groups the base optimizer steps
        itself (its own capturable or fused Adam) keep torch's placement."""
        if _FUSED_KINDS.get(type(self.base_optimizer)) != "adam":
            return
        for group in self.param_groups:
            if group.get("capturable") or group.get("fused"):
                continue
            for p in group["params"]:
                state = self.state.get(p)
                step = state.get("step") if state else None
                device = p.device if self._capturable else torch.device("cpu")
                if isinstance(step, Tensor) and step.device != device:
                    state["step"] = step.to(device=device, dtype=torch.float32)

    def _not_capturable(self, plan: _StepPlan) -> str:
        why = (
            "complex parameters" if plan.has_complex
            else "a base optimizer option fastsam does not fuse (differentiable, fused, "
            "capturable or tensor betas)"
        )
        return (
            f"capturable=True needs the fused SGD/Adam/AdamW update, which {why} rule out: "
            "the base optimizer's own step() cannot be skipped on the device"
        )

    # ----------------------------------------------------------------- weight averaging
    def _count_update(self, plan: _StepPlan, skip: Tensor | None = None) -> list[Average] | None:
        """Count one update; per group of ``plan``, the averaging the update folds in when the
        schedule averages the weights after it, else None. With ``capturable`` the schedule
        runs on the device (``skip``: the update's device flag) and every update gets an
        averaging, of weight 0 when it is skipped or not due."""
        schedule = self._average_schedule
        if self._capturable and (plan.device is not None or self._device_counts is not None):
            counts = self._device_counter(plan.device or self._device_counts.device)
            made = 1.0 if skip is None else 1.0 - skip.to(torch.float64)
            counts[2].add_(made)
            if schedule is None:
                return None
            weight: float | Tensor = self._device_average_weight(schedule, counts, made)
        else:
            self._updates += 1
            if schedule is None or not schedule.due(self._updates):
                return None
            weight = schedule.weight(self._n_averaged)
            self._n_averaged += 1
        if plan.averaged is None:  # new copies start as the weights: defined from the start
            plan.averaged = [
                [persistent_buffer(self._averaged, p, copy=True) for p in ps] for ps in plan.params
            ]
        return [Average(buffers, weight) for buffers in plan.averaged]

    @staticmethod
    def _device_average_weight(
        schedule: Schedule, counts: Tensor, made: float | Tensor
    ) -> Tensor:
        """capturable: the averaging weight of the update just counted in ``counts`` (``made``:
        1, or 0 when skipped), a 0-d fp64 device tensor, 0 when it averages nothing; counts
        the snapshot."""
        due = schedule.due_on_device(counts[2]) * made
        weight = schedule.weight_on_device(counts[3]) * due
        counts[3].add_(due)
        return weight

    def _average_rest(
        self, plan: _StepPlan, averages: list[Average] | None, unfused: bool
    ) -> None:
        """The averaging an update did not fold in: every parameter with a gradient when the
        base optimizer stepped by itself (``unfused``), and those without a gradient this step
        (``torch.optim.swa_utils.AveragedModel`` averages every parameter)."""
        if not averages:
            return
        if unfused and plan.device is not None:
            for params, average in zip(plan.params, averages):
                foreach_average(params, average)
        if plan.idle:
            if plan.idle_averaged is None:
                plan.idle_averaged = [
                    persistent_buffer(self._averaged, p, copy=True) for p in plan.idle
                ]
            foreach_average(plan.idle, Average(plan.idle_averaged, averages[0].weight))

    @property
    def n_averaged(self) -> int:
        """Snapshots in the averaged weights so far (0 without ``average=``). With
        ``capturable`` the count is on the device: reading it waits for the device."""
        return self._counters()["n_averaged"]

    @torch.no_grad()
    def swap_average(self) -> None:
        """Exchange every parameter with its averaged copy, in place: the parameters keep their
        storage and identity, so a model evaluates with the averaged weights. Call again to
        swap back; :meth:`averaged_weights` does both around a block. Stepping is refused while
        the averaged weights are in."""
        self._refuse_when_perturbed("swap_average()")
        if self._average_schedule is None:
            raise RuntimeError(
                "this optimizer averages no weights: construct it with average='swa' or 'ema' "
                "(or fastsam.SWA(...) / fastsam.EMA(...))"
            )
        counters = self._counters()  # with capturable, one read of the device counts
        if counters["n_averaged"] == 0:
            schedule = self._average_schedule
            raise RuntimeError(
                f"no weights have been averaged yet: {counters['updates']} updates made, and "
                f"{schedule} averages after update {schedule.start + schedule.every} first"
            )
        for p, average in self._averaged.items():  # one tensor's copy at a time
            current = p.detach().clone()
            p.detach().copy_(average)
            average.copy_(current)
        self._swapped = not self._swapped

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Context manager: the averaged weights are in the parameters inside, the trained
        weights again after it (even on an exception).

        Example:
            >>> import torch, fastsam
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, average="swa")
            >>> for _ in range(3):
            ...     model(torch.randn(4, 3)).square().mean().backward()
            ...     opt.first_step(zero_grad=True)
            ...     model(torch.randn(4, 3)).square().mean().backward()
            ...     opt.second_step(zero_grad=True)
            >>> with opt.averaged_weights():
            ...     out = model(torch.randn(2, 3))  # evaluated with the running mean
        """
        self.swap_average()
        try:
            yield
        finally:
            self.swap_average()

    def _refuse_when_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"{what} while the averaged weights are swapped into the parameters "
                "(swap_average() / averaged_weights()): swap back first"
            )

    # ----------------------------------------------------------------- fused base updates
    def _fused_update_kind(self, plan: _StepPlan) -> str | None:
        """'sgd' or 'adam' when the base update can be fused with the restore, else None.

        Only the exact torch.optim classes qualify (a subclass may change step()), and only
        configurations whose state layout we reproduce: float betas, no differentiable,
        capturable or fused Adam, no complex parameters. lr may be a number or a tensor.
        """
        kind = _FUSED_KINDS.get(type(self.base_optimizer))
        if kind is None:
            return None
        for group in self.param_groups:
            if group.get("differentiable"):
                return None
            if kind == "adam" and (
                group.get("capturable")
                or group.get("fused")
                or any(isinstance(b, Tensor) for b in group["betas"])
            ):
                return None
        return None if plan.has_complex else kind

    def _fused_sgd(
        self,
        backend: Backend,
        group: dict,
        params: list,
        grads: list,
        w_old: list,
        states: list,
        source: GradientSource | None,
        average: Average | None = None,
        skip: Tensor | None = None,
    ) -> None:
        hyper = SGDHyper(
            lr=_lr(group["lr"]),
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group.get("maximize", False),
            skip=skip,
        )
        if hyper.momentum == 0:
            backend.restore_sgd(params, grads, w_old, [], hyper, False, source, average)
            return
        bufs = [state.get("momentum_buffer") for state in states]
        cohorts = self._momentum_cohorts
        if all(map(is_not, bufs, repeat(None))) and not cohorts:  # steady state: one call
            backend.restore_sgd(params, grads, w_old, bufs, hyper, False, source, average)
            return
        # torch.optim's first step sets buf = d (no dampening): those params go in their own
        # call with fresh_buffers=True. capturable: a skipped first step leaves the zero
        # buffers, and m·0 + d = d is that first step again, unless there is dampening: then
        # the buffers made in a step whose skip is decided on the device form a cohort with a
        # device flag, 1 once an update of theirs went ahead, and their updates take
        # dampening·flag.
        went_ahead = None if skip is None else 1.0 - skip.to(torch.float64)
        calls: dict[int, list[int]] = {}
        for i, (p, buf) in enumerate(zip(params, bufs)):
            calls.setdefault(-1 if buf is None else id(cohorts.get(p)), []).append(i)
        for key, idx in calls.items():
            fresh = key == -1
            for i in idx if fresh else ():
                bufs[i] = states[i]["momentum_buffer"] = torch.zeros_like(
                    params[i], memory_format=torch.preserve_format
                )
            started = None if fresh else cohorts.get(params[idx[0]])
            backend.restore_sgd(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [w_old[i] for i in idx],
                [bufs[i] for i in idx],
                hyper if started is None else replace(
                    hyper, dampening=started * hyper.dampening
                ),
                fresh,
                source.select(idx) if source else None,
                average.select(idx) if average else None,
            )
            if started is not None and went_ahead is None:
                started.fill_(1.0)
            elif started is not None:
                torch.maximum(started, went_ahead, out=started)
            elif fresh and went_ahead is not None and hyper.dampening != 0:
                started = went_ahead.reshape(()).clone()
                for i in idx:
                    cohorts[params[i]] = started

    def _fused_adam(
        self,
        backend: Backend,
        group: dict,
        params: list,
        grads: list,
        w_old: list,
        states: list,
        source: GradientSource | None,
        average: Average | None = None,
        skip: Tensor | None = None,
    ) -> None:
        amsgrad = group["amsgrad"]
        capturable = self._capturable
        for p, state in zip(params, states):
            if len(state) == 0:  # torch.optim.Adam's layout: fp32 step, moments like p
                # The step lives on the CPU, or on p's device with capturable (torch's
                # capturable layout).
                state["step"] = torch.zeros(
                    (), dtype=torch.float32, device=p.device if capturable else "cpu"
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
        steps = [state["step"] for state in states]
        beta1, beta2 = group["betas"]
        decoupled = group.get(
            "decoupled_weight_decay", isinstance(self.base_optimizer, torch.optim.AdamW)
        )
        hyper = AdamHyper(
            lr=_lr(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=bool(decoupled),
            amsgrad=amsgrad,
            maximize=group.get("maximize", False),
            step=None,
            skip=skip,
        )
        moments = (
            [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states],
            [st["max_exp_avg_sq"] for st in states] if amsgrad else [],
        )
        if capturable:  # one call; each tensor's bias corrections from its step, on the device
            torch._foreach_add_(steps, 1.0)
            if skip is not None:
                torch._foreach_sub_(steps, [skip] * len(steps))
            bias = adam_bias_corrections(steps, beta1, beta2, hyper.lr)
            backend.restore_adam(params, grads, w_old, *moments, replace(hyper, bias=bias),
                                 source, average)
            return
        torch._foreach_add_(steps, 1)
        # Tensors that joined late have a smaller step: one call per distinct step value. The
        # steps are CPU tensors (torch.optim's layout), so reading them waits for no device.
        values = torch.stack(steps).tolist()
        by_step: dict[float, list[int]] = {}
        for i, value in enumerate(values):
            by_step.setdefault(value, []).append(i)
        for step, idx in by_step.items():
            backend.restore_adam(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [w_old[i] for i in idx],
                *([m[i] for i in idx] if m else [] for m in moments),
                replace(hyper, step=step),
                source.select(idx) if source else None,
                average.select(idx) if average else None,
            )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (momentum, Adam moments, step) with this optimizer's
        per-group options (rho, ...) in its param_groups. Loadable by the base optimizer class
        itself, and by a fresh fastsam optimizer. Refused between first and second step.

        What fastsam keeps beyond the base optimizer goes where torch.distributed.checkpoint
        keeps it too: each parameter's own tensors (averaged weights, ...) into its state, the
        counters (updates, averaged snapshots, skipped steps, ...) into every param group under
        ``"fastsam_counters"``. Every parameter's state has the same entries at every step, so
        a fresh optimizer's state dict is a template DCP can load any checkpoint into: before
        the first average, a parameter's averaged weights are saved as a copy of its weights
        (not loaded back while nothing has been averaged)."""
        self._refuse_when_perturbed("state_dict()")
        self._refuse_when_swapped("state_dict()")
        sd = self.base_optimizer.state_dict()
        stores = self._param_stores()
        state = dict(sd["state"])
        self._drop_unmade_buffers(state)
        for i, p in enumerate(self._indexed_params()):
            extra = {}
            for key, store in stores.items():
                value = store.get(p)
                if value is None:
                    value = self._stand_in(key, p)
                if value is not None:
                    extra[key] = value
            if extra:
                state[i] = {**state.get(i, {}), **extra}
        counters = self._counters()
        groups = [{**group, COUNTERS_KEY: dict(counters)} for group in sd["param_groups"]]
        return {**sd, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict` or by the plain base optimizer."""
        self._refuse_when_perturbed("load_state_dict()")
        self._refuse_when_swapped("load_state_dict()")
        self._check_loaded_shapes(state_dict)
        groups = [dict(group) for group in state_dict["param_groups"]]
        counters = next((g[COUNTERS_KEY] for g in groups if COUNTERS_KEY in g), None)
        stores = self._param_stores()
        if counters is None:
            self._warn_afresh(stores)
            counters = {}
        for group in groups:
            group.pop(COUNTERS_KEY, None)
        loaded: dict[str, dict] = {key: {} for key in stores}
        state = {}
        for index, value in state_dict["state"].items():
            value = dict(value)
            for key in stores:
                if key in value:
                    loaded[key][index] = value.pop(key)
            if value:
                state[index] = value
        live = [
            {k: v for k, v in g.items() if k != "params" and isinstance(v, Tensor)}
            for g in self.param_groups
        ]
        self.base_optimizer.load_state_dict({**state_dict, "state": state, "param_groups": groups})
        _keep_option_tensors(self.base_optimizer.param_groups, live)
        self._link_base()
        self._layout_version += 1
        self._load_counters(counters)
        if self._n_averaged == 0:  # copies of the weights standing in for averages to come
            loaded[AVERAGE_KEY].clear()
        params = self._loaded_params(state_dict)
        for key, store in stores.items():
            store.clear()
            for index, tensor in loaded[key].items():
                p = params[index]
                store[p] = tensor.detach().to(device=p.device, dtype=p.dtype).clone()

    def _drop_unmade_buffers(self, state: dict[int, dict]) -> None:
        """capturable, SGD with dampening: a momentum buffer whose every update so far was
        skipped on the device is zeros standing in for none (torch.optim has made none yet):
        saved without it, so that the next update after a load is torch's first step. Reads
        each cohort's flag once; cohorts found started are done with (their buffers are real:
        the steady-state call takes them again)."""
        cohorts = self._momentum_cohorts
        if not cohorts:
            return
        started = {id(flag): bool(flag.item()) for flag in cohorts.values()}
        for i, p in enumerate(self._indexed_params()):
            flag = cohorts.get(p)
            if flag is None:
                continue
            if started[id(flag)]:
                del cohorts[p]
            elif "momentum_buffer" in state.get(i, {}):
                state[i] = {k: v for k, v in state[i].items() if k != "momentum_buffer"}

    def _warn_afresh(self, stores: dict[str, dict[Tensor, Tensor]]) -> None:
        """A loaded state dict without fastsam's counters has none of its tensors either: say
        what starts afresh, when something does."""
        lost = [key for key in stores if key != AVERAGE_KEY or self._average_schedule]
        if lost:
            warnings.warn(
                "fastsam: the loaded state dict has the base optimizer's state only (a plain "
                "torch.optim state dict, or torch.distributed.checkpoint with "
                "flatten_optimizer_state_dict=True, which keeps only the entries a fresh "
                f"optimizer has): {', '.join(lost)} and the counters start afresh",
                stacklevel=3,
            )

    def _counters(self) -> dict[str, int]:
        """The counts a state dict carries (subclasses add theirs). With ``capturable`` they
        are read from the device (the steps a replayed CUDA graph made count too)."""
        counted = self._read_device_counts()
        if counted is None:
            amp = nonfinite = 0
            updates, n_averaged = self._updates, self._n_averaged
        else:
            amp, nonfinite, updates, n_averaged = counted
        return {
            "updates": updates,
            "n_averaged": n_averaged,
            "amp_skipped": self._amp_skipped + amp,
            "nonfinite_skipped": self._nonfinite_skipped + nonfinite,
        }

    def _load_counters(self, counters: dict[str, Any]) -> None:
        """Set the counts from a loaded state dict's (zero where it has none: a state dict of
        the plain base optimizer)."""
        self._device_counts = None
        self._momentum_cohorts.clear()  # loaded buffers are those of updates made
        self._updates = int(counters.get("updates", 0))
        self._n_averaged = int(counters.get("n_averaged", 0))
        self._amp_skipped = int(counters.get("amp_skipped", 0))
        self._nonfinite_skipped = int(counters.get("nonfinite_skipped", 0))

    def _check_loaded_shapes(self, state_dict: dict[str, Any]) -> None:
        """Refuse, before anything is loaded, a state whose per-parameter tensors do not have
        their parameter's shape (a checkpoint of another model): the fused kernels would read
        past the end of them. torch.optim itself checks only the group sizes."""
        params = self._loaded_params(state_dict)
        for index, entry in state_dict.get("state", {}).items():
            if index not in params:
                raise ValueError(
                    f"the loaded state has an entry for parameter {index!r}, but its "
                    f"param_groups do not list it among this optimizer's {len(params)} "
                    "parameters"
                )
            p = params[index]
            if not isinstance(entry, dict):
                continue
            for key, value in entry.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(
                        f"the loaded state's {key!r} of parameter {index} has shape "
                        f"{tuple(value.shape)}, but the parameter has shape {tuple(p.shape)}: "
                        "the state dict is from another model or another parameter order"
                    )

    def _param_stores(self) -> dict[str, dict[Tensor, Tensor]]:
        """Per-parameter tensors kept beyond the base optimizer's state, by the key they are
        saved under in each parameter's state (subclasses add theirs)."""
        return {AVERAGE_KEY: self._averaged}

    def _stand_in(self, key: str, p: Tensor) -> Tensor | None:
        """What :meth:`state_dict` saves under ``key`` for a parameter that has no such tensor
        yet (None: nothing). With weight averaging, a copy of the weights in place of the
        averages to come, so that every state dict has the same entries."""
        if key == AVERAGE_KEY and self._average_schedule is not None:
            return p.detach().clone(memory_format=torch.preserve_format)
        return None

    def _indexed_params(self) -> list[Tensor]:
        """Parameters in state_dict order (torch.optim numbers them across groups in order)."""
        return [p for group in self.param_groups for p in group["params"]]

    def _loaded_params(self, state_dict: dict[str, Any]) -> dict[Any, Tensor]:
        """The parameter each key of a loaded state stands for. As torch.optim does, the keys
        are those its param_groups list, in our parameters' order: the indices this optimizer
        saves, or any others (torch.distributed.checkpoint's parameter names)."""
        ours = self._indexed_params()
        groups = state_dict.get("param_groups")
        keys = [k for g in groups for k in g["params"]] if groups else range(len(ours))
        return dict(zip(keys, ours))

    def _refuse_when_perturbed(self, what: str) -> None:
        if self._perturbed is not None:
            raise RuntimeError(
                f"{what} between first_step() and second_step(): the parameters hold the "
                "perturbed weights w + e. Finish the step with second_step() first."
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(p={self._p}, eps={self._eps}, "
            f"base_optimizer={self.base_optimizer!r})"
        )
