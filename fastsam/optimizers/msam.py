"""MSAM (Becker, Altrock and Risse, 2024, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead"): one forward/backward pass per step, taken at the weights moved against
the base optimizer's momentum."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..functional import PerturbGroup, Scaling
from . import _held
from ._checks import check_finite_nonnegative, check_rho
from ._core import FusedOptimizer, without_grad
from ._held import with_params
from ._plan import StepPlan, persistent_buffer, swap_contents
from ._update import FUSED_KINDS

STATE_KEY = "msam_weights"  # per-parameter state: the unperturbed weights w
_MOMENTUM = {"sgd": "momentum_buffer", "adam": "exp_avg"}  # the state entry MSAM follows
_PLAIN = Scaling()


class MSAM(FusedOptimizer):
    r"""Momentum-SAM: SAM's ascent step taken along the base optimizer's momentum, which needs
    no second forward/backward pass.

    Between steps the parameters hold the perturbed weights :math:`\tilde w = w - \rho\,
    v/(\|v\| + \epsilon)`, with ``v`` the base optimizer's momentum (SGD's momentum buffer,
    Adam's first moment; it points along the gradient, so this is a step against it, as the
    paper's "negative momentum"). A step takes the gradient computed there and

    .. math::
        w \leftarrow \mathrm{update}(w,\ \nabla L(\tilde w)),\qquad
        \tilde w \leftarrow w - \rho\,\frac{v}{\|v\|_2 + \epsilon}

    with the updated momentum (one global norm over every parameter with a gradient). The very
    first step starts from ``w`` itself (v = 0: no perturbation yet).

    Fused: the update reads ``w`` from a persistent buffer and writes the parameter (one pass,
    with SGD/Adam/AdamW's state), then a reduction over ``v`` and SAM's perturb pass over
    ``(w, v)`` store ``w`` back and write ``w̃``. Memory: one parameter-sized buffer per
    parameter (``w``). Evaluate, and save the model, with the unperturbed weights:
    :meth:`unperturbed_weights`. ``state_dict()`` carries ``w`` (under ``"msam_weights"`` in
    each parameter's state), so a model saved with its perturbed weights and the optimizer
    resume exactly.

    Args:
        params: parameters or parameter groups (a group may set ``rho``).
        base_optimizer: ``torch.optim.SGD`` with momentum > 0, ``Adam`` or ``AdamW`` (class,
            built with ``base_kwargs``, or instance): MSAM follows their momentum.
        rho (float, default 0.05): the perturbation's radius.
        eps (float, default 1e-12): added to ``‖v‖`` in the denominator.
        backend, average, skip_nonfinite, capturable, max_grad_norm: as in
            :class:`fastsam.SAM` (the averages are of the unperturbed weights; a skipped update
            leaves ``w``, ``v`` and ``w̃`` as they were: on the device, with ``capturable``,
            the update writes ``w`` back and the perturbation forms the same ``w̃`` again).
        **base_kwargs: passed to ``base_optimizer`` when it is a class.

    Example:
        >>> import torch, fastsam
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1,
        ...                    momentum=0.9)
        >>> for _ in range(3):
        ...     torch.nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> with opt.unperturbed_weights():
        ...     out = model(torch.randn(2, 4))  # evaluated at w
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        eps: float = 1e-12,
        backend: str | None = None,
        *,
        average: Any = None,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        self._eps = check_finite_nonnegative("eps", eps)
        self._weights: dict[Tensor, Tensor] = {}  # w per parameter (the unperturbed weights)
        self._weights_plan: tuple[StepPlan, list[list[Tensor]]] | None = None
        # per group of that plan, the base optimizer's momentum buffers (v), once they exist
        self._momentum_plan: list[list[Tensor]] | None = None
        self._swapped = False
        self._flag: Tensor | None = None
        super().__init__(
            params, base_optimizer, dict(rho=rho), backend=backend, base_kwargs=base_kwargs,
            average=average, skip_nonfinite=skip_nonfinite, capturable=capturable,
            max_grad_norm=max_grad_norm,
        )
        kind = FUSED_KINDS.get(type(self.base_optimizer))
        if kind is None or self._fused_update_kind() is None:
            raise ValueError(
                "MSAM follows the base optimizer's momentum: it takes torch.optim.SGD (with "
                "momentum > 0), Adam or AdamW, in a configuration fastsam fuses (no "
                "differentiable, fused or capturable Adam); got "
                f"{type(self.base_optimizer).__name__}"
            )
        self._kind = kind
        # the steady state over plans held in C++ (_held.py): the update from the bound
        # "weights", then passes A and B along the bound momentum
        self._held = None if capturable else _held.HeldSteps(self, sam_steps=False)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_rho(group["rho"])
        if isinstance(group["rho"], Tensor):
            raise TypeError("MSAM takes a float rho")
        if "momentum" in group and "betas" not in group and group["momentum"] == 0:
            raise ValueError("MSAM follows SGD's momentum: give the base SGD momentum > 0")

    def first_step(self, zero_grad: bool = False) -> None:
        """Not a step of MSAM's (a migration aid): it makes one forward/backward per step."""
        raise RuntimeError("MSAM makes one forward/backward pass per step: call step()")

    second_step = first_step

    # ----------------------------------------------------------------- the step
    @without_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update ``w`` with the gradient taken at ``w̃`` (in ``.grad``), then perturb the
        parameters along the updated momentum.

        Args:
            closure: optional, recomputes the loss (forward + backward at ``w̃``); its loss
                is returned.
        """
        self._refuse_when_swapped("step()")
        self._refuse_unperturbed("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._held is not None and self._held_step():
            return loss
        plan, flat_grads = self._step_plan()
        if plan.device is None:
            return loss
        all_grads = plan.grads(flat_grads)
        skip = self._skip_update(plan, all_grads, None, False)
        if skip is True:  # inf/NaN gradients: w, v and w̃ stay as they are
            self._mark_stepped()
            return loss
        flag = skip if isinstance(skip, Tensor) else None  # capturable: skipped on the device
        weights = self._plan_weights(plan)
        clip = self._clip_coefficient(plan, all_grads)
        averages = self._averager.count_update(plan, flag)
        backend = self._backend_for(plan.device)
        states = self._planner.states(plan, self.state)
        for i, (group, params, grads) in enumerate(zip(self.param_groups, plan.params,
                                                       all_grads)):
            if params:  # the parameters get update(w, g): the unperturbed new weights (w
                # itself when skipped on the device; the perturbation below is then w̃ again)
                self._fused(self._kind, self.base_optimizer, backend, group, params, grads,
                            weights[i], states[i], None, averages[i] if averages else None,
                            flag, clip)
        self._average_idle(plan, averages)
        self._perturb(plan, weights, states)
        self._mark_stepped()
        if self._held is not None and self._momentum_plan is not None:
            self._held.adopt(plan)  # the next steps over this plan: held in C++
        return loss

    def _held_step(self) -> bool:
        """:meth:`step` over the held plan (fastsam/optimizers/_held.py) once a general step
        made this plan's weights and momentum lists: the update from "weights" (bound), then
        passes A and B along the momentum; False, with nothing done, when the general path
        must take the step."""
        plan = self._planner.current
        if (plan is None or plan.held is None or self._momentum_plan is None
                or self._weights_plan is None or self._weights_plan[0] is not plan):
            return False
        held = plan.held
        for i, weights in enumerate(self._weights_plan[1]):
            if plan.params[i] and ("weights", i) not in held.bound:
                held.bind("weights", i, weights)
        if not self._held.plain(w_old="weights"):
            return False
        if not self._held.skipped:  # (a skipped update leaves w, v and w̃ as they are)
            groups = with_params(plan)
            self._backend_for(plan.device).held_perturb(
                held, groups, [_PLAIN] * len(groups),
                tuple(-float(self.param_groups[i]["rho"]) for i in groups), 2.0, 2.0,
                self._eps, self._flag, names=(_MOMENTUM[self._kind], "weights"))
        self._mark_stepped()
        return True

    def _held_average_rest(self, plan: StepPlan, averages: list | None) -> None:
        self._average_idle(plan, averages)

    def _plan_weights(self, plan: StepPlan) -> list[list[Tensor]]:
        """Per group of ``plan``, each parameter's ``w``; a parameter's first step starts from
        its weights as they are (a copy). Looked up once per plan."""
        if self._weights_plan is not None and self._weights_plan[0] is plan:
            return self._weights_plan[1]
        out = [[persistent_buffer(self._weights, p, copy=True) for p in params]
               for params in plan.params]
        self._weights_plan = (plan, out)
        self._momentum_plan = None
        return out

    def _perturb(self, plan: StepPlan, weights: list[list[Tensor]],
                 states: list[list[dict]]) -> None:
        """SAM's passes A and B with the momentum in place of g and −rho: ``w`` (the updated
        parameters) stored back, ``w̃ = w − rho·v/(‖v‖ + eps)`` written."""
        if self._momentum_plan is None:  # once per plan: the update made the buffers
            key = _MOMENTUM[self._kind]
            self._momentum_plan = [[s[key] for s in group_states] for group_states in states]
        groups = [
            PerturbGroup(params, v, w, -float(group["rho"]), _PLAIN)
            for group, params, w, v in zip(self.param_groups, plan.params, weights,
                                           self._momentum_plan)
            if params
        ]
        if not groups:
            return
        backend = self._backend_for(plan.device)
        if self._flag is None or self._flag.device != plan.device:
            self._flag = torch.zeros((), dtype=torch.float32, device=plan.device)
        backend.perturb(backend.perturbation_norm(groups, 2.0), 2.0, self._eps, self._flag)

    def _average_idle(self, plan: StepPlan, averages: list | None) -> None:
        """The averaging of the parameters without a gradient this step, at their unperturbed
        weights (they hold ``w̃`` between steps)."""
        if not averages or not plan.idle:
            return
        held = [(p, w) for p in plan.idle if (w := self._weights.get(p)) is not None]
        perturbed = [p.detach().clone() for p, _ in held]
        for p, w in held:
            p.detach().copy_(w)
        self._averager.average_rest(plan, averages, False)
        for (p, _), saved in zip(held, perturbed):
            p.detach().copy_(saved)

    # ----------------------------------------------------------------- evaluation
    @contextmanager
    def unperturbed_weights(self) -> Iterator[None]:
        """Context manager: the unperturbed weights ``w`` are in the parameters inside (to
        evaluate, or to save the model), the perturbed ``w̃`` again after it (even on an
        exception). Stepping is refused inside."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        swap_contents(self._weights.items())
        self._swapped = not self._swapped

    def _refuse_unperturbed(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(
                f"{what} inside unperturbed_weights(): the parameters hold w, not the perturbed "
                "weights a step starts from; leave the context first"
            )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        self._refuse_unperturbed("state_dict()")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict` (or by the plain base optimizer, after
        which each parameter's next step starts from its weights as they are)."""
        self._refuse_unperturbed("load_state_dict()")
        self._weights_plan = None
        super().load_state_dict(state_dict)

    def _param_stores(self) -> dict[str, dict[Tensor, Tensor]]:
        return {**super()._param_stores(), STATE_KEY: self._weights}

    def __repr__(self) -> str:
        return f"MSAM(eps={self._eps}, base_optimizer={self.base_optimizer!r})"
