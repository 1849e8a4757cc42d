"""FreeSAM (seed report "SAM for free"): the SAM gradient of step t approximated by the plain
gradient of step t − 1, so a step costs one forward/backward pass."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..backends.native import HeldSource
from ..functional import Swap
from . import _held
from ._core import FusedOptimizer, without_grad
from ._plan import StepPlan

STATE_KEY = "previous_grad"


def _stale(stored: Tensor | None, like: Tensor) -> bool:
    """Whether a stored gradient is missing or no longer fits (shape, dtype) tensor ``like``."""
    return stored is None or stored.shape != like.shape or stored.dtype != like.dtype


class FreeSAM(FusedOptimizer):
    r"""One-pass SAM: the update of step t uses the gradient of step t − 1.

    .. math::
        w_{t+1} = \mathrm{update}(w_t,\ g_{t-1}),\qquad g_{-1} = g_0

    After the backward pass, :meth:`step` applies the base optimizer with the gradient stored by
    the previous step and stores the current one in its place; the very first step (and a
    parameter's first step with a gradient) uses the current gradient. ``.grad`` is left as
    the backward pass wrote it.

    With ``torch.optim.SGD``, ``Adam`` and ``AdamW`` this is one fused pass per step (reads w, g,
    the stored gradient and the optimizer state; writes w, the stored gradient and the state).
    Any other base optimizer gets the stored gradient swapped into ``.grad`` for its own
    ``step()`` (and the current gradient back into ``.grad`` afterwards).

    Memory: one parameter-sized buffer per parameter. ``state_dict()`` carries it (under
    ``"previous_grad"`` in each parameter's state) and a loaded optimizer continues exactly; the
    base optimizer's own state is left untouched.

    Args:
        params: parameters or parameter groups.
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``base_kwargs``) or an
            instance over exactly these parameters.
        backend (str, optional), average (optional): as in :class:`fastsam.SAM`.
        skip_nonfinite (bool, default False): skip an update whose gradients hold inf/NaN
            (with the weights restored bit for bit and the state untouched; counted by
            :attr:`nonfinite_skipped_steps`) instead of letting the NaN into the weights as
            torch.optim does. Costs one fused check of the gradients and one host read per step
            (none with ``capturable``).
        capturable (bool, default False): as in :class:`fastsam.SAM` (the stored gradients
            are kept, not replaced, when the update is skipped on the device). A parameter's
            first step, which stores its first gradient, still reads the skip flag on the
            host: take it before capturing a graph.
        max_grad_norm (float, optional): as in :class:`fastsam.SAM`, before :meth:`step`:
            this step's gradient is clipped, and stored so for the next update.
        **base_kwargs: passed to ``base_optimizer`` when it is a class.

    Example:
        >>> import torch, fastsam
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = fastsam.FreeSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        >>> for _ in range(3):
        ...     torch.nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
        ...     opt.step()
        ...     opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        backend: str | None = None,
        average: Any = None,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        self._stored: dict[Tensor, Tensor] = {}
        # The stored buffers per group of the current step plan: looked up once per plan, not
        # once per step (tensor-keyed lookups cost microseconds per parameter).
        self._stored_plan: tuple[StepPlan, list[list[Tensor]]] | None = None
        super().__init__(params, base_optimizer, {}, backend=backend,
                         base_kwargs=base_kwargs, average=average,
                         skip_nonfinite=skip_nonfinite, capturable=capturable,
                         max_grad_norm=max_grad_norm)
        # the steady state over plans held in C++ (_held.py): the update with the stored
        # gradients bound to the plan as "previous"
        self._held = None if capturable else _held.HeldSteps(self, sam_steps=False)

    def first_step(self, zero_grad: bool = False) -> None:
        """Not a step of FreeSAM's (a migration aid): it has no perturbation to make."""
        raise RuntimeError("FreeSAM makes one forward/backward pass per step: call step()")

    second_step = first_step

    def _previous(self, params: list[Tensor], grads: list[Tensor],
                  clip: Tensor | None) -> list[Tensor]:
        """The stored gradients of ``params``; a parameter seen for the first time gets a copy
        of its current gradient (its first step uses the current gradient; times ``clip``,
        max_grad_norm's coefficient, when given)."""
        out = []
        for p, g in zip(params, grads):
            prev = self._stored.get(p)
            if _stale(prev, g):
                prev = self._stored[p] = g.detach().clone(memory_format=torch.preserve_format)
                if clip is not None:
                    prev.mul_(clip)
            out.append(prev)
        return out

    def _storing(self, plan: StepPlan) -> bool:
        """Whether a step over ``plan`` stores a first gradient (:meth:`_previous` makes one)."""
        return any(_stale(self._stored.get(p), p) for ps in plan.params for p in ps)

    @without_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update with the previous step's gradients and keep the current ones.

        Args:
            closure: optional, recomputes the loss (forward + backward); its loss is returned.
        """
        self._refuse_when_swapped("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if (self._held is not None and self._stored_plan is not None
                and self._stored_plan[0] is self._planner.current
                and self._held.plain(self._held_swaps)):
            self._mark_stepped()  # the steady state (_held.py)
            return loss
        plan, flat_grads = self._step_plan()
        self._check_capturable(plan)
        all_grads = plan.grads(flat_grads)
        new_plan = self._stored_plan is None or self._stored_plan[0] is not plan
        # A step that stores a parameter's first gradient decides its skip on the host, even
        # with capturable: a skipped step must not leave an inf/NaN gradient as the one the
        # next step uses (torch's capturable optimizers also need warm-up steps).
        skip = self._skip_update(plan, all_grads, None, False,
                                 on_host=new_plan and self._storing(plan))
        if skip is True:  # inf/NaN gradients: no update, no swap
            self._mark_stepped()
            return loss
        # max_grad_norm clips this step's gradient, the one stored for the next update (as
        # clip_grad_norm_ before step() would)
        clip = self._clip_coefficient(plan, all_grads)
        if new_plan:
            stored = [self._previous(ps, gs, clip) for ps, gs in zip(plan.params, all_grads)]
            self._stored_plan = (plan, stored)
        stored = self._stored_plan[1]
        if self._fused_update_kind(plan) is not None:
            flag = skip if isinstance(skip, Tensor) else None
            self._update_in_place(plan, all_grads, [Swap(previous) for previous in stored],
                                  flag, clip)
            if self._held is not None:
                self._held.adopt(plan)  # the next steps over this plan: held in C++
            return loss
        # The base optimizer steps with the stored gradients in .grad, then .grad gets this
        # step's gradient back (kept in the stored buffer meanwhile).
        for grads, previous in zip(all_grads, stored):
            if grads:
                current = [g.clone() for g in grads]
                if clip is not None:
                    torch._foreach_mul_(current, clip)
                torch._foreach_copy_(grads, previous)
                torch._foreach_copy_(previous, current)
        self._update_in_place(plan, all_grads)
        for grads, previous in zip(all_grads, stored):
            if grads:
                torch._foreach_copy_(grads, previous)
        return loss

    def _held_swaps(self, plan: StepPlan, clip: Tensor | None) -> list[HeldSource | None]:
        """The held update's source per group of ``plan`` (the plan of the stored buffers):
        :class:`~fastsam.functional.Swap` of the stored gradients, bound as "previous"."""
        held, stored = plan.held, self._stored_plan[1]
        out: list[HeldSource | None] = []
        for i, previous in enumerate(stored):
            if not plan.params[i]:
                out.append(None)
                continue
            if ("previous", i) not in held.bound:
                held.bind("previous", i, previous)
            out.append(HeldSource("previous", Swap(previous)))
        return out

    # ----------------------------------------------------------------- state
    def _param_stores(self) -> dict[str, dict[Tensor, Tensor]]:
        """Each parameter's stored gradient is saved in its state under ``"previous_grad"``
        (a state dict of the plain base optimizer has none: the next step starts afresh from
        the current gradient)."""
        return {**super()._param_stores(), STATE_KEY: self._stored}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict` or by the plain base optimizer."""
        self._stored_plan = None
        super().load_state_dict(state_dict)
