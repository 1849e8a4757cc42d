"""WSAM (Yue et al., KDD 2023, "Sharpness-Aware Minimization Revisited: Weighted Sharpness as
a Regularization Term")."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..backends.native import HeldSource
from ..functional import Decomposition, Scaling
from ._base import SharpnessAwareOptimizer
from ._held import with_params
from ._plan import StepPlan

if TYPE_CHECKING:
    from ..backends.native import NativeBackend


class WSAM(SharpnessAwareOptimizer):
    r"""Weighted SAM: the sharpness L(w + e) − L(w) as a regulariser of weight
    :math:`\alpha = \gamma / (1 - \gamma)`. The first step is SAM's (``e = ρ·g/(‖g‖ + eps)``,
    or ASAM's with ``adaptive=True``) and keeps g; with g_adv the gradient at w + e:

    - ``decouple=False``: the base optimizer's update uses ``g + α·(g_adv − g)``;
    - ``decouple=True`` (default): the base update uses g, then
      ``w ← w − lr·α·(g_adv − g)`` (the sharpness term outside the base optimizer, as the
      paper's Algorithm 1 and pytorch-optimizer do).

    ``gamma = 0.5`` (α = 1) without decoupling is SAM. With SGD, Adam and AdamW the gradient is
    formed inside the fused update (GSAM's gradient mode with coefficients (α, 1 − α), or
    (0, 1) for the decoupled base update); the decoupled term is one more pass over w, the kept
    g and g_adv (one kernel on the native backends, two foreach passes on the others).
    Argument names follow pytorch-optimizer's ``WSAM`` (which also takes the model as its
    second argument; here BatchNorm is the caller's, as for every fastsam optimizer:
    :func:`fastsam.frozen_bn_stats`).

    Args:
        params, base_optimizer, rho, adaptive, eps, backend, skip_nonfinite, interval,
            max_grad_norm: as in :class:`fastsam.SAM` (g_adv is clipped).
        gamma (float, default 0.9): the sharpness weight, in [0, 1).
        decouple (bool, default True): the sharpness term outside the base update.
        average, capturable: as in :class:`fastsam.SAM`, with ``decouple=False`` only (the
            decoupled term follows the fused update, which averages and skips on the device).
        **base_kwargs: passed to ``base_optimizer`` when it is a class.
    """

    _keeps_first_grads = True  # the perturb pass keeps g

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        gamma: float = 0.9,
        decouple: bool = True,
        adaptive: bool = False,
        eps: float = 1e-12,
        backend: str | None = None,
        *,
        average: Any = None,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        interval: int = 1,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (
            0.0 <= gamma < 1.0
        ):
            raise ValueError(f"gamma must be a number in [0, 1), got {gamma!r}")
        if not isinstance(decouple, bool):
            raise TypeError(f"decouple must be True or False, got {decouple!r}")
        if decouple and (average is not None or capturable):
            raise ValueError(
                "WSAM(decouple=True) takes neither average nor capturable: its sharpness term "
                "follows the fused update, which averages and skips on the device; use "
                "decouple=False"
            )
        self.gamma, self.decouple = float(gamma), decouple
        self.alpha = self.gamma / (1.0 - self.gamma)
        self._one: Tensor | None = None
        super().__init__(
            params, base_optimizer, dict(rho=rho, adaptive=adaptive), p=2, eps=eps,
            backend=backend, base_kwargs=base_kwargs, average=average,
            skip_nonfinite=skip_nonfinite, capturable=capturable, interval=interval,
            max_grad_norm=max_grad_norm,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if not isinstance(group["adaptive"], bool):
            raise TypeError(f"adaptive must be True or False, got {group['adaptive']!r}")
        if self.decouple and isinstance(group.get("lr"), Tensor):
            raise ValueError("WSAM(decouple=True) needs a float lr (its term is lr·α·(g_adv − g))")

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        return Scaling("element", 0.0) if group["adaptive"] else Scaling()

    def _along(self, device: torch.device) -> Tensor:
        """The constant 1 the decomposition mode reads as its ``along`` (kept)."""
        if self._one is None or self._one.device != device:
            self._one = torch.ones((), dtype=torch.float64, device=device)
        return self._one

    def _before_update(
        self, perturbed: StepPlan, now: StepPlan, grads: list[list[Tensor]], fused: bool,
        skip: Tensor | None = None, clip: Tensor | None = None,
    ) -> list[Decomposition | None] | None:
        """The update's gradient from g_adv (this pass) and g (kept): fused, the mode-1 source
        ``(1 + c·1)·g_adv − c·g`` with c = α − 1 (``g + α·(g_adv − g)``) or c = −1 (g, for the
        decoupled update); otherwise written into ``.grad``."""
        if now.device is None:
            return None
        self._refuse(perturbed, now)
        firsts = self._first_buffers(perturbed)
        if fused:
            return self._decompositions(perturbed)
        local = self._backend_for(now.device).local
        for adv, first in zip(grads, firsts):
            if not adv:
                continue
            adv, first = local(adv), local(first)
            if self.decouple:  # kept ← g − g_adv (for _after_update), .grad ← g
                torch._foreach_sub_(first, adv)
                torch._foreach_add_(adv, first)
            else:  # .grad ← α·g_adv + (1 − α)·g
                torch._foreach_mul_(adv, self.alpha)
                torch._foreach_add_(adv, first, alpha=1.0 - self.alpha)
        return None

    def _refuse(self, perturbed: StepPlan, now: StepPlan) -> None:
        """Before anything is updated: refuse (the weights restored) a second step whose
        parameters with gradients changed since the first, or a tensor lr with decoupling."""
        why = ("the same parameters to have gradients in both passes (a parameter gained or "
               "lost its gradient between first_step() and second_step())"
               if now is not perturbed else
               "a float lr with decouple=True (its term is lr·α·(g_adv − g))"
               if self.decouple and any(isinstance(g["lr"], Tensor) for g in self.param_groups)
               else None)
        if why is not None:
            self._restore(perturbed)
            raise RuntimeError(f"WSAM needs {why}; the weights are restored")

    def _decompositions(self, plan: StepPlan) -> list[Decomposition | None]:
        """Per group, the fused update's gradient source: the mode-1 decomposition with
        along = 1 and c = α − 1, or c = −1 decoupled (module docstring)."""
        coefficient = -1.0 if self.decouple else self.alpha - 1.0
        along = self._along(plan.device)
        return [Decomposition(f, coefficient, along) if f and coefficient != 0.0 else None
                for f in self._first_buffers(plan)]

    # over held plans (fastsam/optimizers/_held.py): the same, on the plan's lists (the kept g
    # bound as "first")
    _held_hooks = ("_keeps_first_grads", "_before_update", "_after_update")

    def _held_sources(self, plan: StepPlan, backend: NativeBackend,
                      clip: Tensor | None) -> list[HeldSource | None]:
        self._refuse(plan, plan)
        return self._kept_held_sources(
            plan, self._along(plan.device), (self.alpha, self.decouple),
            lambda: [None if d is None else HeldSource("first", d)
                     for d in self._decompositions(plan)])

    def _held_after_update(self, plan: StepPlan, backend: NativeBackend,
                           clip: Tensor | None) -> None:
        """:meth:`_after_update`'s pass over the held lists, group by group (the lr)."""
        if not self.decouple:
            return
        for i in with_params(plan):
            backend.held_wsam_decoupled(plan.held, [i],
                                        float(self.param_groups[i]["lr"]) * self.alpha, clip)

    def _after_update(
        self, perturbed: StepPlan, now: StepPlan, grads: list[list[Tensor]], fused: bool,
        clip: Tensor | None = None,
    ) -> None:
        """Decoupled: ``w ← w + lr·α·(g − g_adv)`` (per group's lr; g_adv clipped by
        ``clip``)."""
        if not self.decouple or now.device is None:
            return
        backend = self._backend_for(now.device)
        local = backend.local
        for group, params, adv, first in zip(self.param_groups, now.params, grads,
                                              self._first_buffers(perturbed)):
            if not params:
                continue
            alpha = float(group["lr"]) * self.alpha
            if fused:  # the kept g becomes g − g_adv and w takes the term, in one pass
                backend.wsam_decoupled(params, first, adv, alpha, clip)
            else:  # (_before_update made the kept g − g_adv already)
                torch._foreach_add_(local(params), local(first), alpha=alpha)
