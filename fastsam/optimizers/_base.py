"""The two-step machine shared by the perturbing optimizers (SAM, ASAM, GSAM, LookSAM): first
step (pass A, the norm; pass B, perturb), second step (pass C, restore + update) and the closure
step, over the engine of :mod:`._core` (docs/design.md §2).

The classes here hold no arithmetic: they collect tensors, keep torch.optim's state layout, and
call the passes of :mod:`fastsam.functional` on the selected backend.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import repeat
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..functional import Decomposition, Mask, PerturbGroup, Scaling, dual_exponent
from . import _held
from ._checks import as_rho, check_finite_nonnegative, check_rho
from ._core import FusedOptimizer, without_grad
from ._plan import StepPlan
from ._update import not_capturable

if TYPE_CHECKING:
    from ..backends.native import HeldSource, NativeBackend

TRAINER_HINT = (
    "(Trainers: fastsam.integrations.transformers.SAMTrainer runs both passes in the Hugging "
    "Face Trainer, fastsam.integrations.lightning.SAMMixin in Lightning; docs/trainers.md.)"
)


def _lightning_closure(closure: Callable[[], Any]) -> str | None:
    """``"automatic"`` for the closure of Lightning's automatic optimization (its loops'
    ``Closure``, alone or inside the precision plugin's ``functools.partial``), ``"manual"`` for
    any other closure Lightning's precision plugin wraps (``LightningOptimizer.step()`` in
    manual optimization), None for the rest. Told apart by the defining modules alone: fastsam
    does not import Lightning."""
    def lightning(obj: Any) -> bool:
        return (type(obj).__module__ or "").split(".")[0] in ("lightning", "pytorch_lightning")

    wrapped = isinstance(closure, functools.partial)
    inner = closure.args if wrapped else ()
    if any(lightning(c) and type(c).__name__ == "Closure" for c in (closure, *inner)):
        return "automatic"
    if wrapped and lightning(getattr(closure.func, "__self__", None)):
        return "manual"
    return None


class _Progress:
    """Where the optimizer is between steps: the plan of a pending perturbation (None: none)
    and the number of steps begun. Kept in an object of its own rather than as attributes of
    the optimizer: torch.compile treats an Optimizer's own attributes as fixed while it traces
    a step, and would not carry these changes out of a compiled ``first_step``."""

    __slots__ = ("perturbed", "begun")

    def __init__(self) -> None:
        self.perturbed: StepPlan | None = None
        self.begun = 0


class SharpnessAwareOptimizer(FusedOptimizer):
    """Base class: first step (perturb), second step (restore + base update), closure step.

    Subclasses pass their per-group defaults and implement :meth:`_check_group` (validation of
    one group's options) and :meth:`_scaling` (the ASAM operator of one group).
    """

    _keeps_w_old = True  # the perturb pass copies w into a persistent buffer
    _keeps_first_grads = False  # GSAM, LookSAM: the perturb pass also keeps g
    # The hooks below a variant overrides and still steps over held plans with (_held.py),
    # through their held forms (_held_momentum, _held_update_clip, _held_sources,
    # _held_after_update): GSAM's, WSAM's, FriendlySAM's.
    _held_hooks: tuple[str, ...] = ()

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
        max_grad_norm: float | None = None,
        interval: int = 1,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"interval must be an int >= 1 (a SAM step every interval steps), got "
                f"{interval!r}"
            )
        self.interval = interval
        self._progress = _Progress()  # step t is a SAM step when t % interval == 0
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"p must be a number (2, float('inf') or any p > 1), got {p!r}")
        if not p > 1.0:
            raise ValueError(f"p must be > 1 (2, float('inf') or any finite p > 1), got {p}")
        self._p = float(p)
        self._q = dual_exponent(self._p)
        self._eps = check_finite_nonnegative("eps", eps)
        self._closure_drives = False  # see _closure_makes_the_passes()
        self._kept_sources: tuple | None = None  # see _kept_held_sources
        super().__init__(
            params, base_optimizer, defaults, backend=backend, base_kwargs=base_kwargs,
            average=average, skip_nonfinite=skip_nonfinite, capturable=capturable,
            max_grad_norm=max_grad_norm,
        )
        # the steady state over plans held in C++, for the configurations it takes
        self._held = (_held.HeldSteps(self, _held.sam_steps_apply(self)) if _held.applies(self)
                      else None)

    @property
    def _perturbed(self) -> StepPlan | None:
        """The plan of the pending perturbation (between first and second step), or None."""
        return self._progress.perturbed

    @_perturbed.setter
    def _perturbed(self, plan: StepPlan | None) -> None:
        self._progress.perturbed = plan

    @property
    def _begun(self) -> int:
        """Steps begun (interval SAM's and LookSAM's count)."""
        return self._progress.begun

    @_begun.setter
    def _begun(self, count: int) -> None:
        self._progress.begun = count

    # ----------------------------------------------------------------- subclass hooks
    def _check_group(self, group: dict[str, Any]) -> None:
        check_rho(group["rho"])
        perturb = group.get("perturb", True)
        if not isinstance(perturb, bool):
            raise TypeError(f"perturb must be True or False, got {perturb!r}")
        if not perturb and self._keeps_first_grads:
            raise ValueError(
                f"perturb=False (SAM-ON: a group left out of the perturbation) is supported by "
                f"SAM and ASAM; {type(self).__name__} combines every parameter's first-pass "
                "gradient with its second"
            )

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        raise NotImplementedError

    def _rho(self, group: dict[str, Any]) -> float | Tensor:
        """The radius pass B scales the perturbation of ``group`` by (ESAM: rho/beta)."""
        return as_rho(group["rho"])

    def _masks(self, groups: list[dict[str, Any]]) -> list[Mask | None]:
        """This step's ESAM mask of each of ``groups`` (the perturbed ones, in order): None
        each but for ESAM."""
        return [None] * len(groups)

    def _first_buffers(self, plan: StepPlan) -> list[list[Tensor]] | None:
        """Per group of ``plan``, the persistent buffers the perturb pass fills with a copy of
        g when the optimizer ``_keeps_first_grads`` (GSAM, LookSAM), else None."""
        return self._planner.first_buffers(plan) if self._keeps_first_grads else None

    def _before_update(
        self, perturbed: StepPlan, now: StepPlan, grads: list[list[Tensor]], fused: bool,
        skip: Tensor | None = None, clip: Tensor | None = None,
    ) -> list[Decomposition | None] | None:
        """Called at the start of the second step, before restore and update, with this step's
        gradients per group of ``now``. GSAM returns, per group, the decomposition the fused
        update applies (``fused``: the update is fused), or rewrites the gradients in place.
        ``skip``: capturable's device flag of the update (what the hook keeps must not change
        when it is set). ``clip``: max_grad_norm's coefficient the fused update multiplies
        ``grads`` by (unfused, ``grads`` are already clipped and ``clip`` is None)."""
        return None

    @property
    def sam_step_next(self) -> bool:
        """Whether the next :meth:`first_step` is a SAM step (two passes): always, unless
        ``interval`` > 1 (then every ``interval``-th step, from the first)."""
        return self._progress.begun % self.interval == 0

    # ----------------------------------------------------------------- the step
    @without_grad
    def first_step(self, zero_grad: bool = False) -> bool:
        """Move every parameter with a gradient to ``w + e`` (the adversarial point) and return
        True. With ``interval`` > 1, on the steps between SAM steps: apply the base optimizer's
        plain update with the current gradients instead, and return False (no second pass, no
        :meth:`second_step`).

        Args:
            zero_grad: clear the gradients afterwards (default False), ready for the second
                forward/backward pass.
        """
        progress = self._progress  # (its fields, not the properties: a call less each)
        if progress.perturbed is not None:
            raise RuntimeError(
                "first_step() was called twice without second_step() in between: the weights "
                "are already perturbed. Call second_step() (or step()) to restore and update."
            )
        self._refuse_when_swapped("first_step()")
        sam_step = self.sam_step_next
        progress.begun += 1
        if not sam_step:
            self._between_sam_steps(zero_grad)
            return False
        self._perturb(zero_grad)
        return progress.perturbed is not None  # (AE-SAM may decide on a plain step instead)

    def _perturbs(self, total: Tensor) -> bool:
        """Whether a SAM step, pass A's sum ``total`` made (S, a 0-d device tensor), goes on to
        perturb: always, but for AE-SAM, which decides here; False: :meth:`_between_sam_steps`
        takes the step instead (on the general path and over held plans alike)."""
        return True

    def _between_sam_steps(self, zero_grad: bool) -> None:
        """A step between SAM steps (the step counter already advanced): interval SAM's plain
        update; LookSAM's look-ahead step overrides it."""
        self._unperturbed_step(zero_grad)

    def _perturb(self, zero_grad: bool) -> None:
        """Passes A and B of a SAM step (docs/design.md §2): the norm, then ``w + e``."""
        held = self._held.perturb() if self._held is not None else None
        if held is False:  # pass A made over the held plan, and a plain step decided (AE-SAM)
            self._between_sam_steps(zero_grad)
            return
        if held is not None:  # the steady state: the plan held in C++ (_held.py)
            self._perturbed = held
            if zero_grad:
                self.zero_grad()
            return
        plan, flat_grads = self._step_plan()
        self._check_capturable(plan)
        if self._held is not None:
            self._held.adopt(plan)  # the next steps over this plan: held in C++
        if plan.device is not None:
            groups = self._perturb_groups(plan, plan.grads(flat_grads))
            flag = self._skips.perturb_flag(plan.device)
            if groups:
                backend = self._backend_for(plan.device)
                norm = backend.perturbation_norm(groups, self._q)
                if not self._perturbs(norm.total):  # AE-SAM: a plain step after all
                    self._between_sam_steps(zero_grad)
                    return
                backend.perturb(norm, self._p, self._eps, flag)
            else:
                flag.zero_()  # nothing perturbed: nothing to skip
        self._perturbed = plan
        if zero_grad:
            self.zero_grad()

    def _perturb_groups(
        self, plan: StepPlan, grads: list[list[Tensor]]
    ) -> list[PerturbGroup]:
        """The groups of passes A and B: every param group of ``plan`` but those left out of
        the perturbation (SAM-ON), with the kept-gradient buffers of the optimizers that keep
        g (FriendlySAM adds its momentum)."""
        kept = self._first_buffers(plan) or repeat(None)
        chosen = [
            (group, ps, gs, olds, keep) for group, ps, gs, olds, keep in zip(
                self.param_groups, plan.params, grads, plan.w_old, kept
            )
            if group.get("perturb", True)  # SAM-ON: groups out of the norm and of e
        ]
        masks = self._masks([group for group, *_ in chosen])
        return [
            PerturbGroup(ps, gs, olds, self._rho(group), self._scaling(group), keep, None, mask)
            for (group, ps, gs, olds, keep), mask in zip(chosen, masks)
        ]

    def _unperturbed_step(
        self, zero_grad: bool,
        correction: Callable[[StepPlan, list[list[Tensor]]], list | None] | None = None,
        held_correction: _held.PlainSources | None = None,
    ) -> None:
        """A step with no perturbation (interval SAM's plain steps, LookSAM's look-ahead
        steps; the step counter already advanced): the update with the current gradients, or
        with the per-group gradient sources ``correction(plan, grads)`` returns (over a held
        plan: those ``held_correction`` returns, given; without it, the general path). Under
        GradScaler (``scaler.step(optimizer)``) the gradients are unscaled first, and a step
        whose gradients hold inf/NaN is skipped, as is one under ``skip_nonfinite``."""
        if ((correction is None or held_correction is not None) and self._held is not None
                and self._held.plain(held_correction)):
            self._mark_stepped()  # over the held plan (_held.py)
            if zero_grad:
                self.zero_grad()
            return
        plan, flat_grads = self._step_plan()
        self._check_capturable(plan)
        all_grads = plan.grads(flat_grads)
        skip = self._skip_update(plan, all_grads, None, False)
        if skip is True:  # inf/NaN gradients: no update
            self._mark_stepped()
            if zero_grad:
                self.zero_grad()
            return
        clip = self._clip_coefficient(plan, all_grads)  # of g, before a correction is added
        sources = (correction(plan, all_grads)
                   if correction is not None and plan.device is not None else None)
        flag = skip if isinstance(skip, Tensor) else None  # capturable: skipped on the device
        self._update_in_place(plan, all_grads, sources, flag, clip)
        if zero_grad:
            self.zero_grad()

    @without_grad
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights saved by :meth:`first_step` and apply the base optimizer's update
        with the current (adversarial) gradients.

        SGD, Adam and AdamW updates are fused with the restore (one pass); any other base
        optimizer gets an exact restore followed by its own ``step()``.

        Args:
            zero_grad: clear the gradients afterwards (default False).
        """
        progress = self._progress  # (its fields, not the properties: a call less each)
        perturbed = progress.perturbed
        if perturbed is None:
            raise RuntimeError(
                "second_step() was called without a pending first_step(): there is no "
                "perturbation to undo. Call first_step() after the first backward pass."
            )
        progress.perturbed = None  # (before any hook: a refused update leaves no step pending)
        if self._held is not None and self._held.update(perturbed):  # the steady state
            self._mark_stepped()
            if zero_grad:
                self.zero_grad()
            return
        now, flat_grads = self._step_plan()
        all_grads = now.grads(flat_grads)
        skip = self._skip_update(now, all_grads, self._first_buffers(perturbed), True)
        if skip is True:  # inf/NaN gradients: restore only
            self._restore(perturbed)
            self._mark_stepped()
            if zero_grad:
                self.zero_grad()
            return
        flag = skip if isinstance(skip, Tensor) else None  # capturable: skipped on the device
        fused = self._fused_update_kind(now)
        if flag is not None and fused is None:  # a parameter was added since first_step()
            self._restore(perturbed)
            raise RuntimeError(not_capturable(now))
        clip = self._update_clip(perturbed, now, all_grads, fused is not None)
        if fused is None:  # the base optimizer's own step: .grad clipped as clip_grad_norm_ does
            self._clip_in_place(now, all_grads, clip)
            clip = None
        sources = self._before_update(perturbed, now, all_grads, fused is not None, flag, clip)
        averages = self._averager.count_update(now, flag)
        states = self._planner.states(now, self.state) if fused else None
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
                self._restore_from(restore_only, restore_from)
            if fused is None or not params:
                continue
            self._fused(
                fused, self.base_optimizer, self._backend_for(params[0].device), group, params,
                all_grads[i], w_old, states[i], sources[i] if sources else None,
                averages[i] if averages else None, flag, clip,
            )
        if fused is None:
            self.base_optimizer.step()
        self._after_update(perturbed, now, all_grads, fused is not None, clip)
        self._averager.average_rest(now, averages, fused is None)
        self._mark_stepped()
        if zero_grad:
            self.zero_grad()

    def _update_clip(
        self, perturbed: StepPlan, now: StepPlan, grads: list[list[Tensor]], fused: bool
    ) -> Tensor | None:
        """max_grad_norm's coefficient for the second step's update (None without it): one
        reduction over ``grads``; GSAM takes it from the sums its decomposition reduces."""
        return self._clip_coefficient(now, grads)

    def _held_momentum(self, plan: StepPlan,
                       groups: list[int]) -> tuple[str, str, tuple] | bool | None:
        """:meth:`_perturb_groups`' momentum over the held plan ``plan`` (passes A and B over
        ``groups``): FriendlySAM's bound lists m and m_next with the per-group scalars; None
        without one; False: this step takes the general path."""
        return None

    def _held_update_clip(self, plan: StepPlan, backend: NativeBackend) -> Tensor | None:
        """:meth:`_update_clip` over the held plan ``plan`` (_held.py) of a SAM step's update."""
        return self._held.clip(plan, backend)

    def _held_sources(self, plan: StepPlan, backend: NativeBackend,
                      clip: Tensor | None) -> list[HeldSource | None] | None:
        """:meth:`_before_update` over the held plan ``plan`` of a SAM step's fused update (the
        plan of both passes): per group, the gradient source of its held update (None: the
        plain gradient), or None for every group."""
        return None

    def _kept_held_sources(self, plan: StepPlan, along: Tensor, coefficients: object,
                           make: Callable[[], list[HeldSource | None]]
                           ) -> list[HeldSource | None]:
        """``make()``, the held update's gradient sources over ``plan`` (GSAM's and WSAM's
        decompositions, reading the kept buffer ``along``), kept while ``plan`` and ``along``
        are the same objects and ``coefficients`` equal: made once, not at every step. The
        sources are read, never changed."""
        kept = self._kept_sources
        if (kept is not None and kept[0] is plan and kept[1] is along
                and kept[2] == coefficients):
            return kept[3]
        sources = make()
        self._kept_sources = (plan, along, coefficients, sources)
        return sources

    def _held_after_update(self, plan: StepPlan, backend: NativeBackend,
                           clip: Tensor | None) -> None:
        """:meth:`_after_update` over the held plan ``plan`` of a SAM step's fused update."""

    def _after_update(
        self, perturbed: StepPlan, now: StepPlan, grads: list[list[Tensor]], fused: bool,
        clip: Tensor | None = None,
    ) -> None:
        """Called after the update of a second step that went ahead (WSAM's decoupled term,
        FriendlySAM's commit); ``clip`` as in :meth:`_before_update`."""

    @without_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One sharpness-aware step.

        With a closure (the popular API): the caller has already run the first forward and
        backward; this perturbs, calls ``closure()`` (forward + backward at the perturbed point,
        gradients zeroed before it), then restores and updates. Returns the closure's loss
        (None on interval SAM's plain steps, which do not call it).

        Without a closure: performs the pending second step (after :meth:`first_step`), or,
        when none is pending and the next step is one of interval SAM's plain steps, that
        step; this is what ``GradScaler.step(optimizer)`` calls.
        """
        if closure is not None and self._closure_finishes(closure):
            return self._after_closure(closure)
        if closure is None:
            if self._perturbed is None and self._lr_is_zero():
                # torch.distributed.checkpoint creates an empty optimizer's state this way: a
                # step with zero gradients and every lr set to 0, which moves no weight.
                self.base_optimizer.step()
                self._fused.place_steps(self.base_optimizer)
                return None
            if self._perturbed is None and not self.sam_step_next:
                self.first_step()  # a step between SAM steps: the whole update
                return None
            if self._perturbed is None and getattr(self, "grad_scale", None) is not None:
                raise RuntimeError(
                    "scaler.step(optimizer) on a SAM step needs first_step() and the second "
                    "backward pass first: check optimizer.sam_step_next before the step (the "
                    "steps between SAM steps are scaler.step(optimizer) alone)"
                )
            if self._perturbed is None:
                raise RuntimeError(
                    "step() without a closure performs the second step, but no first_step() is "
                    "pending. Either pass a closure that recomputes the loss and calls "
                    "backward(), or call first_step() first. " + TRAINER_HINT
                )
            self.second_step()
            return None
        if self._perturbed is not None:
            raise RuntimeError(
                "step(closure) was called while a first_step() is pending; call step() without "
                "a closure, or second_step(), to finish that step first"
            )
        if self.first_step(zero_grad=True) is False:
            return None  # a step between SAM steps: no second pass
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    # ----------------------------------------------------------------- trainers
    @contextmanager
    def _closure_makes_the_passes(self) -> Iterator[None]:
        """Inside, ``step(closure)`` follows torch.optim's convention, which trainers rely on:
        no backward pass precedes the step, and the closure makes every pass itself. The
        fastsam integrations hand over a closure that runs the first forward/backward, calls
        :meth:`first_step` and runs the second pass (a LookSAM look-ahead step: the first pass
        only); the step then finishes what the closure left pending (docs/design.md §11)."""
        self._closure_drives = True
        try:
            yield
        finally:
            self._closure_drives = False

    def _closure_finishes(self, closure: Callable[[], Any]) -> bool:
        """Whether ``step(closure)`` is to call the closure first and then finish the step: a
        fastsam integration drives it, or Lightning's manual optimization (whose
        ``optimizer.step()`` always passes a closure) finishes a step begun with
        :meth:`first_step`. Lightning's automatic optimization, which calls ``step(closure)``
        with no backward pass before it, is refused rather than run as another algorithm (the
        perturbation would follow the previous step's gradients)."""
        if self._closure_drives:
            return True
        kind = _lightning_closure(closure)
        if kind == "automatic":
            raise RuntimeError(
                f"{type(self).__name__}.step(closure) was called by Lightning's automatic "
                "optimization, which calls the closure inside step() with no backward pass "
                "before it: the perturbation would follow the previous step's gradients. Put "
                "fastsam.integrations.lightning.SAMMixin first in your LightningModule's bases "
                "(class Model(SAMMixin, LightningModule)) to run both passes per step, or use "
                "manual optimization (docs/trainers.md)."
            )
        return kind == "manual"

    def _after_closure(self, closure: Callable[[], Any]) -> Any:
        with torch.enable_grad():
            loss = closure()
        if loss is None and self._closure_drives and self._perturbed is None:
            return None  # an integration's closure skipped its batch (no backward pass)
        self.step()  # the pending second step (LookSAM: or the look-ahead step)
        return loss

    # The counter of the steps begun in state dicts, and whether it is saved with interval 1.
    _steps_counter, _saves_steps_always = "interval_steps", False

    def _counters(self) -> dict[str, int]:
        """With ``interval`` > 1, the counts include the steps begun (a loaded optimizer goes
        on with the same kind of step; a state dict without them: a SAM step)."""
        counts = super()._counters()
        if self.interval == 1 and not self._saves_steps_always:
            return counts
        return {**counts, self._steps_counter: self._begun}

    def _load_counters(self, counters: dict[str, Any]) -> None:
        super()._load_counters(counters)
        self._begun = int(counters.get(self._steps_counter, 0))

    def _restore(self, perturbed: StepPlan) -> None:
        """Every perturbed parameter back to its saved weights, exactly."""
        for params, w_old in zip(perturbed.params, perturbed.w_old):
            self._restore_from(params, w_old)

    def _restore_from(self, params: list[Tensor], w_old: list[Tensor]) -> None:
        """``params`` back to ``w_old``, leaving out the parameters that are their own w_old (a
        group out of the perturbation: never moved)."""
        pairs = [(p, o) for p, o in zip(params, w_old) if o is not p]
        if pairs:
            moved, saved = map(list, zip(*pairs))
            self._backend_for(moved[0].device).restore(moved, saved)

    def _lr_is_zero(self) -> bool:
        lrs = [group.get("lr") for group in self.param_groups]
        return bool(lrs) and all(lr is not None and float(lr) == 0.0 for lr in lrs)

    def _check_between_steps(self, what: str) -> None:
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
