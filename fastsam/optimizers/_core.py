"""The engine every fastsam optimizer is built on: a torch.optim-style class that shares its
groups and state with a base optimizer and runs one fused update per step.

It composes the components (docs/design.md §5): the step plan
(:class:`~._plan.StepPlanner`), skip decisions and counters (:mod:`._skips`), the fused base
update (:class:`~._update.FusedUpdate`), weight averaging (:class:`~._averager.WeightAverager`)
and the checkpoint codec (:mod:`._checkpoint`). :class:`~._base.SharpnessAwareOptimizer` adds
the perturb/restore passes; FreeSAM uses this class as it is.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..backends import select_backend
from ..backends.sharded import ShardedBackend, shard_groups
from ..functional import Backend, Correction, GradientSource, PerturbGroup, Scaling
from . import _checkpoint
from ._averager import WeightAverager
from ._checkpoint import AVERAGE_KEY
from ._checks import check_max_grad_norm
from ._plan import StateMapping, StepPlan, StepPlanner
from ._skips import Counters, GradientLists, Gradients, SkipPolicy
from ._update import FUSED_KINDS, FusedUpdate, fused_kind, not_capturable


def without_grad(method: Callable[..., Any]) -> Callable[..., Any]:
    """``@torch.no_grad()`` for the step methods, at a tenth of its host cost (torch's
    decorator makes, copies and enters a context object at every call: ~3 us, paid at each
    step call): grad mode is switched off around the call where it is on, and left as it is
    where it is off. Under torch.compile: ``torch.no_grad()`` itself, which dynamo traces."""
    @functools.wraps(method)
    def step_method(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return method(*args, **kwargs)
        if not torch.is_grad_enabled():
            return method(*args, **kwargs)
        torch._C._set_grad_enabled(False)
        try:
            return method(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(True)

    return step_method


def _canonical(device: torch.device) -> torch.device:
    """``cuda`` and ``cuda:0`` (the current device) are one device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class FusedOptimizer(Optimizer):
    """A base optimizer's update, fused on a fastsam backend, with skips, averaging and
    checkpoints. Subclasses pass their per-group defaults and implement :meth:`_check_group`.
    """

    _keeps_w_old = False  # a persistent w_old buffer per parameter (the perturbing optimizers)
    # torch.amp.GradScaler: scaler.step(optimizer) sets the attributes grad_scale (the loss
    # scale) and found_inf around its call of step() instead of unscaling the gradients itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, Any],
        *,
        backend: str | None,
        base_kwargs: dict[str, Any],
        average: Any = None,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be True or False, got {capturable!r}")
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self._clip_buffers: dict[tuple, Tensor] = {}  # max_grad_norm's coefficient, kept
        self._capturable = capturable
        self._sam_defaults = dict(defaults)
        self._planner = StepPlanner(self._keeps_w_old)
        self._counts = Counters()
        self._skips = SkipPolicy(skip_nonfinite, capturable, self._counts)
        self._fused = FusedUpdate(capturable)
        self._averager = WeightAverager(average, self._counts, capturable)

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
        if capturable and type(self.base_optimizer) not in FUSED_KINDS:
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

    # ----------------------------------------------------------------- construction
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
        """Share param_groups and state with the base optimizer (one source of truth; the
        state as a :class:`~._plan.StateMapping`, which counts a parameter's dict set or
        removed)."""
        self.param_groups = self.base_optimizer.param_groups
        if not isinstance(self.base_optimizer.state, StateMapping):
            self.base_optimizer.state = StateMapping(dict, self.base_optimizer.state)
        self.state = self.base_optimizer.state
        self._fused.place_steps(self.base_optimizer)
        self.defaults = {**self.base_optimizer.defaults, **self._sam_defaults}
        for group in self.param_groups:
            for key, value in self._sam_defaults.items():
                group.setdefault(key, value)
            self._check_group(group)
        self._planner.expire()

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
        self._planner.expire()
        self.__dict__.get("_backends", {}).clear()  # sharding is decided over every parameter

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one group's own options (subclasses)."""

    # ----------------------------------------------------------------- backends and plans
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

    def _step_plan(self) -> tuple[StepPlan, list]:
        """This step's plan, and the flat list of every parameter's gradient (or None)."""
        if self.base_optimizer.state is not self.state:  # loaded behind our back: relink
            self._link_base()
        return self._planner.plan(self.param_groups)

    def _fused_update_kind(self, plan: StepPlan | None = None) -> str | None:
        """'sgd', 'adam' or None (:func:`~._update.fused_kind`), as decided by the last eager
        step over ``plan`` when torch.compile traces a step: while it traces an optimizer,
        torch.compile shows every param group with ``capturable=True``."""
        if plan is None:
            return fused_kind(self.base_optimizer, plan)
        if torch.compiler.is_compiling() and plan.fused is not None:
            return plan.fused[0]
        return self._eager_update_kind(plan)

    def _eager_update_kind(self, plan: StepPlan) -> str | None:
        """:meth:`_fused_update_kind` of an eager step over ``plan`` (the held steps': they are
        never traced), kept for torch.compile's traces of ``plan``."""
        kind = fused_kind(self.base_optimizer, plan)
        plan.fused = (kind,)
        return kind

    def _check_capturable(self, plan: StepPlan) -> None:
        """With ``capturable``, before a step changes anything: refuse what the update kernels
        cannot skip on the device."""
        if self._capturable and plan.device is not None and self._fused_update_kind(plan) is None:
            raise RuntimeError(not_capturable(plan))

    # ----------------------------------------------------------------- the update
    def _skip_update(
        self, plan: StepPlan, all_grads: list[list[Tensor]], kept: list[list[Tensor]] | None,
        after_perturb: bool, on_host: bool = False,
    ) -> bool | Tensor:
        """:meth:`SkipPolicy.decide <fastsam.optimizers._skips.SkipPolicy.decide>` for this
        update over the gradient lists (and ``kept``, unscaled with them)."""
        def gradients() -> GradientLists:
            backend = self._backend_for(plan.device) if plan.device is not None else None
            return GradientLists([g for gs in all_grads for g in gs],
                                 [k for ks in kept or () for k in ks], backend)

        return self._decide_skip(gradients, plan.device, after_perturb, on_host)

    def _decide_skip(self, gradients: Callable[[], Gradients], device: torch.device | None,
                     after_perturb: bool, on_host: bool = False) -> bool | Tensor:
        """:meth:`SkipPolicy.decide` over ``gradients()`` (the general path's lists or a held
        plan's), GradScaler's attributes read from the optimizer; False at once when nothing
        can skip the update (no per-tensor work)."""
        scaler = (getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        if scaler == (None, None) and not self._skips.skip_nonfinite:
            return False
        return self._skips.decide(scaler, gradients(), after_perturb, device, on_host)

    def _clip_coefficient(self, plan: StepPlan, all_grads: list[list[Tensor]]) -> Tensor | None:
        """``max_grad_norm``'s coefficient for an update with these gradients, as
        ``torch.nn.utils.clip_grad_norm_`` forms it: ``min(1, max_grad_norm/(‖g‖₂ + 1e-6))``,
        ‖g‖ over every gradient of the update (one fused reduction, all-reduced when sharded),
        as a 0-d device tensor kept between steps (never read by the host). None without
        ``max_grad_norm``."""
        if self.max_grad_norm is None or plan.device is None:
            return None
        groups = [PerturbGroup(ps, gs, ps, 0.0, Scaling()) for ps, gs in zip(plan.params, all_grads)
                  if ps]
        backend = self._backend_for(plan.device)
        return self._clip_from(backend.perturbation_norm(groups, 2.0).total, backend)

    def _clip_from(self, square_sum: Tensor, backend: Backend) -> Tensor:
        """The clip coefficient from ‖g‖₂² (a 0-d device tensor a reduction made): the
        backend's one call where it has one (``Backend.clip_coefficient``), else torch's
        operators (the same numbers)."""
        coefficient, = self._clip_kept(square_sum, "coefficient")
        if backend.clip_coefficient(square_sum, self.max_grad_norm, coefficient):
            return coefficient
        eps, max_norm, one = self._clip_kept(square_sum, "eps", "max_norm", "one")
        torch.sqrt(square_sum, out=coefficient).add_(eps.fill_(1e-6))
        torch.div(max_norm.fill_(self.max_grad_norm), coefficient, out=coefficient)
        return torch.minimum(coefficient, one.fill_(1.0), out=coefficient)

    def _clip_kept(self, like: Tensor, *names: str) -> list[Tensor]:
        """0-d tensors like ``like``, kept between steps by name (operands a step would
        otherwise allocate: on the CPU a Python number in a tensor op is one)."""
        out = []
        for name in names:
            key = (name, like.device, like.dtype)
            kept = self._clip_buffers.get(key)
            if kept is None:
                kept = self._clip_buffers[key] = torch.empty_like(like)
            out.append(kept)
        return out

    def _clip_in_place(self, plan: StepPlan, all_grads: list[list[Tensor]],
                       clip: Tensor | None) -> None:
        """``.grad`` times the clip coefficient, in place (for a base optimizer's own
        ``step()``, as ``clip_grad_norm_`` leaves them)."""
        if clip is None:
            return
        local = self._backend_for(plan.device).local
        for grads in all_grads:
            if grads:
                torch._foreach_mul_(local(grads), clip)

    def _clipped_correction(self, source: Correction, clip: Tensor) -> Correction:
        """LookSAM's correction of a clipped gradient: its scale α‖g‖ times ``clip``."""
        (scale,) = self._clip_kept(source.scale, "correction")
        return replace(source, scale=torch.mul(source.scale, clip, out=scale))

    def _update_in_place(
        self,
        plan: StepPlan,
        all_grads: list[list[Tensor]],
        sources: list[GradientSource | None] | None = None,
        skip: Tensor | None = None,
        clip: Tensor | None = None,
    ) -> None:
        """One update of the plan's parameters from their current weights, with nothing to
        restore (FreeSAM, LookSAM's look-ahead steps): fused with SGD/Adam/AdamW (each
        parameter is its own w_old; ``sources`` per group; ``skip``: capturable's device
        flag), else the base optimizer's own ``step()``. ``clip``: max_grad_norm's coefficient
        of the gradients (:meth:`_clip_coefficient`, taken before a source's gradient was
        written into ``.grad``). Counts the update and averages the weights as scheduled."""
        averages = self._averager.count_update(plan, skip)
        kind = self._fused_update_kind(plan)
        if plan.device is not None and kind is not None:
            backend = self._backend_for(plan.device)
            states = self._planner.states(plan, self.state)
            if clip is not None and sources:  # LookSAM's α‖g‖ is of the clipped g
                sources = [self._clipped_correction(s, clip) if isinstance(s, Correction) else s
                           for s in sources]
            for i, (group, params, grads) in enumerate(
                zip(self.param_groups, plan.params, all_grads)
            ):
                if params:
                    self._fused(
                        kind, self.base_optimizer, backend, group, params, grads, params,
                        states[i], sources[i] if sources else None,
                        averages[i] if averages else None, skip, clip,
                    )
        elif plan.device is not None:
            self._clip_in_place(plan, all_grads, clip)
            self.base_optimizer.step()
        self._averager.average_rest(plan, averages, kind is None)
        self._mark_stepped()

    def _held_average_rest(self, plan: StepPlan, averages: list | None) -> None:
        """After a held update (_held.py): the averaging it did not fold in (the parameters
        without a gradient), as ``_update_in_place`` makes it; MSAM's own."""
        self._averager.average_rest(plan, averages, False)

    def _mark_stepped(self) -> None:
        """An lr scheduler attached to either optimizer warns "lr_scheduler.step() before
        optimizer.step()" unless it saw a step: the fused update and the two-step API bypass
        the step() it wraps, so mark both as stepped (torch.optim.lr_scheduler's flag)."""
        self._opt_called = self.base_optimizer._opt_called = True

    def _check_between_steps(self, what: str) -> None:
        """Refuse ``what`` in the middle of a step (the two-step optimizers)."""

    # ----------------------------------------------------------------- counts
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

    @property
    def n_averaged(self) -> int:
        """Snapshots in the averaged weights so far (0 without ``average=``). With
        ``capturable`` the count is on the device: reading it waits for the device."""
        return self._counters()["n_averaged"]

    # ----------------------------------------------------------------- weight averaging
    def swap_average(self) -> None:
        """Exchange every parameter with its averaged copy, in place: the parameters keep their
        storage and identity, so a model evaluates with the averaged weights. Call again to
        swap back; :meth:`averaged_weights` does both around a block. Stepping is refused while
        the averaged weights are in."""
        self._check_between_steps("swap_average()")
        self._averager.swap()

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
        self._averager.refuse_when_swapped(what)

    # ----------------------------------------------------------------- checkpoints
    def __getstate__(self) -> dict[str, Any]:
        """Refused: torch.optim's pickling keeps only defaults, state and param_groups, so a
        copied or unpickled fastsam optimizer would lack its base optimizer, plans and
        backends and fail at its first call. A state dict carries everything instead."""
        raise TypeError(
            f"a fastsam {type(self).__name__} cannot be copied or pickled whole "
            "(copy.deepcopy, pickle, torch.save of the optimizer object): save its "
            "state_dict() and load it into a new optimizer built over the parameters"
        )

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
        self._check_between_steps("state_dict()")
        self._refuse_when_swapped("state_dict()")
        return _checkpoint.save(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict` or by the plain base optimizer. One
        saved from another kind of base optimizer, or for parameters of other shapes, is
        refused before anything is loaded."""
        self._check_between_steps("load_state_dict()")
        self._refuse_when_swapped("load_state_dict()")
        _checkpoint.load(self, state_dict)

    def _param_stores(self) -> dict[str, dict[Tensor, Tensor]]:
        """Per-parameter tensors kept beyond the base optimizer's state, by the key they are
        saved under in each parameter's state (subclasses add theirs)."""
        return {AVERAGE_KEY: self._averager.averaged}

    def _stand_in(self, key: str, p: Tensor) -> Tensor | None:
        """What :meth:`state_dict` saves under ``key`` for a parameter that has no such tensor
        yet (None: nothing). With weight averaging, a copy of the weights in place of the
        averages to come, so that every state dict has the same entries."""
        if key == AVERAGE_KEY and self._averager.schedule is not None:
            return p.detach().clone(memory_format=torch.preserve_format)
        return None

    def _counters(self) -> dict[str, int]:
        """The counts a state dict carries (subclasses add theirs). With ``capturable`` they
        are read from the device (the steps a replayed CUDA graph made count too)."""
        return self._counts.read()

    def _load_counters(self, counters: dict[str, Any]) -> None:
        """Set the counts from a loaded state dict's (zero where it has none: a state dict of
        the plain base optimizer)."""
        self._counts.load(counters)
        self._fused.cohorts.clear()  # loaded buffers are those of updates made

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={self.base_optimizer!r})"
