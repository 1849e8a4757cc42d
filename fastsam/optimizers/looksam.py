"""LookSAM (Liu et al., 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization"):
the SAM gradient is computed every k steps only; in between, the part of it that changes slowly
(its component orthogonal to the plain gradient) is reused."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..backends.native import HeldSource
from ..functional import Correction, DecomposeGroup, PerturbGroup, Scaling
from ._base import SharpnessAwareOptimizer
from ._checks import check_finite_nonnegative
from ._held import with_params
from ._plan import StepPlan, persistent_buffer

STATE_KEY = "looksam_direction"  # per-parameter state: the unit orthogonal direction u_v


def orthogonal_floor(g_s_norm, g_norm, dtype: torch.dtype, eps: float):
    """The size of g_v at and below which it is what the projection leaves of a g_s parallel to
    g, not a part of g_s orthogonal to g (then u_v = 0; tensors or numbers):

        2·(ε·‖g_s‖ + eps·(1 + ‖g_s‖)/(‖g‖ + eps))

    ε·‖g_s‖: g_s is stored only to ±ε·‖g_s‖ (ε the dtype's machine epsilon), so no smaller
    orthogonal part is resolvable. The eps term bounds, to first order, what the eps constants
    in the projection's denominators leave along g (its coefficient is off by a factor of about
    eps/(‖g‖‖g_s‖) + eps/‖g‖): with rho = 0 (g_s = g) and ‖g‖ near 1 in fp64 that is ~1e-12,
    far above rounding, and normalising it would make an arbitrary unit vector. The bound is
    reached when g_s is exactly parallel to g (one-element parameters): hence the factor 2."""
    return 2.0 * (torch.finfo(dtype).eps * g_s_norm + eps * (1.0 + g_s_norm) / (g_norm + eps))


def _square_sum(tensors: list[Tensor]) -> Tensor:
    """Σ‖t‖² over ``tensors`` as a 0-d fp64 device tensor."""
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


class LookSAM(SharpnessAwareOptimizer):
    r"""SAM every ``k`` steps; in between, one forward/backward pass and a corrected gradient.

    On steps 0, k, 2k, ... (a *SAM step*) it is SAM: perturb by ``e = ρ·g/(‖g‖ + eps)``, take
    the gradient ``g_s`` at ``w + e``, update with ``g_s``, and keep the direction of the part of
    ``g_s`` orthogonal to the plain gradient ``g``:

    .. math::
        g_v = g_s - \frac{\langle g, g_s\rangle}{\|g\|^2}\,g,\qquad
        u_v = \frac{g_v}{\|g_v\| + \epsilon}

    (the paper's ``g_s - ‖g_s‖cos θ · g/‖g‖``; the projection is applied twice, which removes
    the rounding left along g when g_s and g are close). Where g_s has no resolvable part
    orthogonal to g (``‖g_v‖ ≤ 2·(ε·‖g_s‖ + eps·(1 + ‖g_s‖)/(‖g‖ + eps))``, ε the machine epsilon
    of the parameters' dtype: :func:`orthogonal_floor`; e.g. rho = 0, where g_s = g, or
    one-element parameters only), the paper's formula is 0/0: u_v is 0 and the look-ahead steps
    use g itself. On the other steps (*look-ahead
    steps*) there is no second pass: the update uses ``g + α·‖g‖·u_v``, the paper's
    ``g + α·(‖g‖/‖g_v‖)·g_v``.
    Over k steps that is k + 1 forward/backward passes instead of SAM's 2k.

    Use it like SAM; :meth:`first_step` returns whether this step needs the second pass::

        loss_fn(model(x), y).backward()
        if optimizer.first_step(zero_grad=True):   # a SAM step: weights perturbed
            loss_fn(model(x), y).backward()
            optimizer.second_step(zero_grad=True)
        # else: a look-ahead step, already applied by first_step()

    or ``optimizer.step(closure)``, which calls the closure on SAM steps only. Under
    ``torch.amp.GradScaler`` every update goes through ``scaler.step(optimizer)``, so a
    look-ahead step is taken by :meth:`step` instead of :meth:`first_step`::

        scaler.scale(loss_fn(model(x), y)).backward()
        if optimizer.sam_step_next:
            optimizer.first_step(zero_grad=True)
            scaler.scale(loss_fn(model(x), y)).backward()
        scaler.step(optimizer)                     # SAM step's second step, or look-ahead step
        scaler.update()
        optimizer.zero_grad()

    With SGD, Adam and AdamW a look-ahead step is one fused reduction (‖g‖) and one fused
    update that forms ``g + α·‖g‖·u_v`` in registers (``.grad`` is left as the backward pass
    wrote it); other base optimizers get the corrected gradient written into ``.grad`` before
    their ``step()``. The norms are global over every parameter with a gradient; ρ may differ
    per group, α is one value.

    Memory: w_old and g (the SAM step's buffers) and u_v: three parameter-sized buffers (four
    with ``capturable``).

    Args:
        params: parameters or parameter groups (a group may set ``rho``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``base_kwargs``) or an
            instance over exactly these parameters.
        rho (float, default 0.05): SAM's radius.
        k (int, default 5): a SAM step every k steps.
        alpha (float, default 0.7): weight of the reused orthogonal direction.
        eps (float, default 1e-12): added to the norms in denominators.
        backend (str, optional), average (optional): as in :class:`fastsam.SAM`.
        skip_nonfinite (bool, default False): skip an update whose gradients hold inf/NaN
            (with the weights restored bit for bit and the state untouched; counted by
            :attr:`nonfinite_skipped_steps`) instead of letting the NaN into the weights as
            torch.optim does. Costs one fused check of the gradients and one host read per step.
        capturable (bool, default False): as in :class:`fastsam.SAM`: the look-ahead steps'
            and the SAM steps' skips are decided on the device, a skipped SAM step leaves u_v
            as it was (its new value is formed in one more parameter-sized buffer, then
            selected on the device). Which steps are SAM steps is a host count of the steps.
        max_grad_norm (float, optional): as in :class:`fastsam.SAM`; on a look-ahead step g
            is clipped before the correction (whose ``α·‖g‖`` is then that of the clipped g).
        **base_kwargs: passed to ``base_optimizer`` when it is a class.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        eps: float = 1e-12,
        backend: str | None = None,
        *,
        average: Any = None,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (a SAM step every k steps), got {k!r}")
        self.alpha = check_finite_nonnegative("alpha", alpha)
        self._scale: tuple[Tensor, Tensor] | None = None  # _look_ahead_scale's buffers
        self._direction: dict[Tensor, Tensor] = {}  # u_v per parameter
        self._direction_plan: tuple[StepPlan, list[list[Tensor]]] | None = None
        self._candidate: dict[Tensor, Tensor] = {}  # capturable: the new u_v, by u_v tensor
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho),
            p=2,
            eps=eps,
            backend=backend,
            base_kwargs=base_kwargs,
            average=average,
            skip_nonfinite=skip_nonfinite,
            capturable=capturable,
            max_grad_norm=max_grad_norm,
            interval=k,  # the SAM steps; the look-ahead steps are those between
        )

    _keeps_first_grads = True  # the SAM steps' perturb pass keeps g for u_v

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        return Scaling()

    @property
    def k(self) -> int:
        """A SAM step every k steps (the base's ``interval``)."""
        return self.interval

    # Its look-ahead steps step over held plans (fastsam/optimizers/_held.py), u_v bound as
    # "direction"; its SAM steps (one in k) take the general path.
    _held_hooks = ("_between_sam_steps",)

    def _between_sam_steps(self, zero_grad: bool) -> None:
        """The look-ahead step: the update with the corrected gradient (first_step() returns
        False: no second pass)."""
        self._unperturbed_step(zero_grad, self._correction, self._held_correction)

    def _correction(self, plan: StepPlan, all_grads: list[list[Tensor]]) -> list | None:
        """The look-ahead step's gradient g + α·‖g‖·u_v: per group, the source the fused update
        forms it from, or (another base optimizer) written into ``.grad`` (None returned)."""
        scale = self._look_ahead_scale(plan, all_grads)
        directions = self._plan_directions(plan)
        if self._fused_update_kind(plan) is not None:  # g + scale·u_v formed in the update
            return [Correction(ds, scale) for ds in directions]
        local = self._backend_for(plan.device).local  # for the base optimizer's own step()
        for grads, ds in zip(all_grads, directions):
            if grads:
                ds = local(ds)
                torch._foreach_addcmul_(local(grads), ds,
                                        [scale.to(d.dtype).expand_as(d) for d in ds])
        return None

    def _held_correction(self, plan: StepPlan, clip: Tensor | None) -> list[HeldSource | None]:
        """:meth:`_correction` over a held plan (its fused update), ‖g‖² a held norm pass:
        per group the :class:`~fastsam.functional.Correction` of u_v (bound as "direction"),
        its scale times ``clip`` as ``_update_in_place`` makes it."""
        held = plan.held
        scale = self._scale_of(self._backend_for(plan.device).held_norm(held, with_params(plan)))
        out: list[HeldSource | None] = []
        for i, directions in enumerate(self._plan_directions(plan)):
            if not plan.params[i]:
                out.append(None)
                continue
            if ("direction", i) not in held.bound:
                held.bind("direction", i, directions)
            source = Correction(directions, scale)
            out.append(HeldSource("direction", source if clip is None
                                  else self._clipped_correction(source, clip)))
        return out

    def _look_ahead_scale(self, plan: StepPlan, all_grads: list[list[Tensor]]) -> Tensor:
        """α·‖g‖ over every parameter with a gradient, as a 0-d device tensor (one fused
        reduction; never read by the host)."""
        grads = [g for gs in all_grads for g in gs]
        params = [p for ps in plan.params for p in ps]
        group = PerturbGroup(params, grads, params, 0.0, Scaling())
        return self._scale_of(self._backend_for(plan.device).perturbation_norm([group], 2.0).total)

    def _scale_of(self, total: Tensor) -> Tensor:
        """α·√``total`` (‖g‖², a 0-d device tensor) in a kept 0-d tensor."""
        kept = self._scale
        if kept is None or (kept[0].device, kept[0].dtype) != (total.device, total.dtype):
            # kept between steps, alpha as a tensor too: on the CPU, multiplying a 0-d tensor
            # by a number allocates
            kept = self._scale = (torch.empty_like(total), torch.empty_like(total))
        scale, alpha = kept
        return torch.sqrt(total, out=scale).mul_(alpha.fill_(self.alpha))

    def _plan_directions(self, plan: StepPlan) -> list[list[Tensor]]:
        """Per group of ``plan``, each parameter's u_v; zeros (no correction) for a parameter
        that had no gradient at any SAM step yet. Looked up once per plan: the SAM steps
        rewrite the same tensors in place."""
        if self._direction_plan is not None and self._direction_plan[0] is plan:
            return self._direction_plan[1]
        out = []
        for params in plan.params:
            out.append([])
            for p in params:
                d = self._direction.get(p)
                if d is None or d.shape != p.shape or d.dtype != p.dtype:
                    d = self._direction[p] = torch.zeros_like(p)
                out[-1].append(d)
        self._direction_plan = (plan, out)
        return out

    # ----------------------------------------------------------------- SAM-step hook
    def _before_update(
        self, perturbed: StepPlan, now: StepPlan, grads: list[list[Tensor]], fused: bool,
        skip: Tensor | None = None, clip: Tensor | None = None,
    ) -> None:
        """Keep u_v from g (the first pass, kept) and g_s (this pass), over the parameters with
        a gradient in both passes; with a device ``skip`` flag, formed aside and kept only when
        the flag is clear."""
        if now.device is None:
            return None
        firsts = self._first_buffers(perturbed)
        if now is perturbed:  # the usual case: the plan's own lists, looked up once
            first = [f for fs in firsts for f in fs]
            second = [g for gs in grads for g in gs]
            directions = [d for ds in self._plan_directions(now) for d in ds]
        else:
            kept = {p: f for ps, fs in zip(perturbed.params, firsts) for p, f in zip(ps, fs)}
            pairs = [(p, kept[p], g) for ps, gs in zip(now.params, grads)
                     for p, g in zip(ps, gs) if p in kept]
            first = [f for _, f, _ in pairs]
            second = [g for _, _, g in pairs]
            directions = [persistent_buffer(self._direction, p) for p, _, _ in pairs]
        if not directions:
            return None
        backend = self._backend_for(now.device)
        # Sharded parameters (FSDP2): the local shards; the two reductions below are global.
        first, second, kept = backend.local(first), backend.local(second), backend.local(
            directions)
        directions = kept if skip is None else [persistent_buffer(self._candidate, d)
                                                for d in kept]
        torch._foreach_copy_(directions, second)
        # g_v = g_s - (⟨g, g_s⟩/‖g‖²)·g, then the same projection of the result again: g_v is
        # a small difference of close vectors, so the rounding of the first coefficient shows
        # as a component along g, which the second pass removes (Gram-Schmidt twice).
        for _ in range(2):
            # gsam_along with the roles swapped: ⟨x, g⟩ / ‖g‖² (up to eps), x's share along g.
            along = backend.gsam_along([DecomposeGroup(first, directions, 0.0)], self._eps)
            coefficient = (-along).to(directions[0].dtype)
            torch._foreach_addcmul_(directions, first, [coefficient.expand_as(d) for d in first])
        # [‖g_v‖, ‖g_s‖, ‖g‖], one all-reduce for the three squares when sharded
        norm, second_norm, first_norm = backend.sum_over_shards(
            torch.stack([_square_sum(directions), _square_sum(second), _square_sum(first)])
        ).sqrt()
        # u_v = g_v/(‖g_v‖ + eps), or 0 where g_v is what the projection leaves of a g_s
        # parallel to g (rho = 0 makes g_s = g): its direction differs by backend and machine
        # (orthogonal_floor). The narrowest dtype's epsilon counts.
        dtype = max({d.dtype for d in directions}, key=lambda t: torch.finfo(t).eps)
        real = norm > orthogonal_floor(second_norm, first_norm, dtype, self._eps)
        denominator = torch.where(real, norm + self._eps, math.inf)  # x/inf = 0
        torch._foreach_div_(directions, denominator.to(directions[0].dtype))
        if skip is not None:  # the new u_v unless the update is skipped
            keep_old = skip != 0
            for old, new in zip(kept, directions):
                torch.where(keep_old, old, new, out=old)
        return None

    # ----------------------------------------------------------------- state
    def _param_stores(self) -> dict[str, dict[Tensor, Tensor]]:
        return {**super()._param_stores(), STATE_KEY: self._direction}

    def _stand_in(self, key: str, p: Tensor) -> Tensor | None:
        """A parameter without a direction yet is saved with zeros (no correction), as the
        first step makes it: every state dict has the same entries."""
        if key == STATE_KEY:
            return torch.zeros_like(p, memory_format=torch.preserve_format)
        return super()._stand_in(key, p)

    # the steps begun, always in the state dict under LookSAM's own name (a loaded optimizer
    # goes on with the same kind of step; a state dict of the plain base optimizer: a SAM step)
    _steps_counter, _saves_steps_always = "looksam_steps", True
