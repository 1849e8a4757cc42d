"""FriendlySAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization"): the perturbation
leaves out the full-batch component of the gradient, estimated by a momentum of the first-pass
gradients."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..functional import Momentum, PerturbGroup, Scaling
from ._base import SharpnessAwareOptimizer
from ._checks import as_rho, check_finite_nonnegative, check_grad_scale
from ._core import without_grad
from ._plan import StepPlan, persistent_buffer

if TYPE_CHECKING:
    from ..backends.native import NativeBackend

STATE_KEY = "friendlysam_momentum"  # per-parameter state: m, the momentum of first gradients
# per-parameter state: 1 where m is a momentum, 0 where it stands in for one not made yet (a
# parameter that has not stepped): every state dict has both entries for every parameter, as
# torch.distributed.checkpoint's templates (a fresh optimizer's state dict) need
STEPPED_KEY = "friendlysam_stepped"


def _fits(m: Tensor | None, p: Tensor) -> bool:
    return m is not None and m.shape == p.shape and m.dtype == p.dtype and m.device == p.device


@dataclass
class _MomentumLists:
    """Per param group of ``plan``, the positions of the parameters that have a momentum
    (``stepped``) and of those on their first step (``fresh``), with the tensors passes A and B
    read and write. A committed step swaps ``current`` and ``next`` (no per-tensor work); the
    optimizer's per-parameter dicts are brought up to date only when the lists are dropped."""

    plan: StepPlan
    stepped: list[list[int]]
    current: list[list[Tensor]]
    next: list[list[Tensor]]
    fresh: list[list[int]]
    zeros: list[list[Tensor]]  # fresh parameters' m: zeros (then the spare buffer)
    fresh_next: list[list[Tensor]]

    @property
    def any_fresh(self) -> bool:
        return any(self.fresh)


def _coefficients(group: dict[str, Any], scale: float) -> tuple[float, float, float]:
    """A group's momentum numbers for first-pass gradients at loss scale ``scale``: (sigma·s,
    lmbda, (1 − lmbda)/s), the :class:`~fastsam.functional.Momentum` of a stepped parameter."""
    sigma, lmbda = float(group["sigma"]), float(group["lmbda"])
    return float(sigma * scale), lmbda, float((1.0 - lmbda) / scale)


def _pick(values: list, idx: list[int], whole: int) -> list:
    return values if len(idx) == whole else [values[j] for j in idx]


class FriendlySAM(SharpnessAwareOptimizer):
    r"""SAM whose perturbation follows the gradient minus its running mean.

    Each step keeps a momentum ``m`` of the first-pass gradients and perturbs along what
    remains of g once the full-batch component ``m`` is taken out (SAM's formula with
    ``d`` in place of ``g``; ``adaptive=True`` scales by ``|w|`` as the popular ASAM):

    .. math::
        d = g - \sigma\,m,\qquad m \leftarrow \lambda\,m + (1 - \lambda)\,g,\qquad
        e = \rho\,\frac{d}{\|d\|_2 + \epsilon},\qquad
        w \leftarrow \mathrm{update}\big(w,\ \nabla L(w + e)\big)

    On a parameter's first step ``m = g`` and ``d = g`` (the published code's initialisation).
    Defaults and argument names follow the paper's code and pytorch-optimizer's
    ``FriendlySAM`` (its ``perturb_eps`` is ``eps`` here).

    Fused: pass A reads g and m (the norm of ``d``), pass B reads w, g and m and writes w_old,
    ``w + e`` and the next m into a second buffer, which becomes m once the step's update went
    ahead; a skipped update (GradScaler's, ``skip_nonfinite``'s) leaves m as it was. Memory:
    two parameter-sized buffers per parameter beside SAM's w_old. ``state_dict()`` carries m
    (under ``"friendlysam_momentum"`` in each parameter's state, with ``"friendlysam_stepped"``
    1; a parameter that has not stepped is saved with zeros and 0, and starts afresh, ``m = g``,
    at its next step), so every state dict has the same entries (as the templates of
    ``torch.distributed.checkpoint`` need).

    Under ``torch.amp.GradScaler`` the first pass's gradients are scaled: m is kept in unscaled
    units, so :meth:`first_step` needs the loss scale, ``first_step(grad_scale=
    scaler.get_scale())``; a second step under the scaler after a first step without it is
    refused (weights restored, m untouched).

    Args:
        params, base_optimizer, rho, adaptive, eps, backend, average, skip_nonfinite,
            max_grad_norm: as in :class:`fastsam.SAM` (p = 2). ``capturable=True`` is refused.
        sigma (float, default 1.0): how much of m the perturbation direction leaves out.
        lmbda (float, default 0.9): decay of m, in [0, 1].
        **base_kwargs: passed to ``base_optimizer`` when it is a class.

    ``sigma`` and ``lmbda`` may differ per parameter group.

    Example:
        >>> import torch, fastsam
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = fastsam.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.first_step(zero_grad=True)
        True
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        eps: float = 1e-12,
        backend: str | None = None,
        *,
        average: Any = None,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        if capturable is not False:
            raise ValueError(
                "FriendlySAM does not take capturable=True: its step commits the new momentum "
                "on the host once the update went ahead"
            )
        self._momentum: dict[Tensor, Tensor] = {}  # committed m per parameter
        self._spare: dict[Tensor, Tensor] = {}  # where the next m_next goes
        self._lists: _MomentumLists | None = None
        # the lists whose buffers are bound to their held plan, and the one bound as "fm_a"
        self._held_lists: _MomentumLists | None = None
        self._held_a: list[list[Tensor]] | None = None
        self._step_scale: float | None = None  # the loss scale the pending first step used
        self._stepped: dict[Tensor, Tensor] = {}  # STEPPED_KEY's entries, saved or loaded
        super().__init__(
            params, base_optimizer, dict(rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive),
            p=2, eps=eps, backend=backend, base_kwargs=base_kwargs, average=average,
            skip_nonfinite=skip_nonfinite, max_grad_norm=max_grad_norm,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if not isinstance(group["adaptive"], bool):
            raise TypeError(f"adaptive must be True or False, got {group['adaptive']!r}")
        check_finite_nonnegative("sigma", group["sigma"])
        if check_finite_nonnegative("lmbda", group["lmbda"]) > 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {group['lmbda']}")

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        return Scaling("element", 0.0) if group["adaptive"] else Scaling()

    # ----------------------------------------------------------------- the step
    @without_grad
    def first_step(self, zero_grad: bool = False, grad_scale: float | None = None) -> bool:
        """Perturb along ``d = g − sigma·m`` and compute the next m (kept until the update goes
        ahead); returns True.

        Args:
            zero_grad: clear the gradients afterwards (default False).
            grad_scale: the loss scale the gradients carry (``scaler.get_scale()`` under
                ``torch.amp.GradScaler``); None: unscaled gradients.
        """
        grad_scale = check_grad_scale(grad_scale)
        if self._perturbed is None:  # (the base class refuses a second first_step itself)
            self._step_scale = grad_scale
        return super().first_step(zero_grad)

    def _perturb_groups(self, plan: StepPlan, grads: list[list[Tensor]]) -> list[PerturbGroup]:
        lists = self._lists_for(plan)
        scale = 1.0 if self._step_scale is None else self._step_scale
        out = []
        for i, (group, ps, gs, olds) in enumerate(
            zip(self.param_groups, plan.params, grads, plan.w_old)
        ):
            if not group.get("perturb", True) or not ps:
                continue
            rho, scaling = as_rho(group["rho"]), self._scaling(group)
            n = len(ps)
            stepped, fresh = lists.stepped[i], lists.fresh[i]
            if stepped:
                momentum = Momentum(lists.current[i], lists.next[i],
                                    *_coefficients(group, scale))
                out.append(PerturbGroup(
                    _pick(ps, stepped, n), _pick(gs, stepped, n), _pick(olds, stepped, n),
                    rho, scaling, None, momentum,
                ))
            if fresh:  # m = 0 and (sigma, lmbda) = 0: d = g, m_next = g/scale
                momentum = Momentum(lists.zeros[i], lists.fresh_next[i], 0.0, 0.0, 1.0 / scale)
                out.append(PerturbGroup(
                    _pick(ps, fresh, n), _pick(gs, fresh, n), _pick(olds, fresh, n),
                    rho, scaling, None, momentum,
                ))
        return out

    def _lists_for(self, plan: StepPlan) -> _MomentumLists:
        """The momentum lists of ``plan`` (made once per plan, from the per-parameter dicts)."""
        if self._lists is not None and self._lists.plan is plan:
            return self._lists
        self._sync()
        stepped, current, nxt, fresh, zeros, fresh_next = [], [], [], [], [], []
        for group, ps in zip(self.param_groups, plan.params):
            perturbed = group.get("perturb", True)
            known = [perturbed and _fits(self._momentum.get(p), p) for p in ps]
            have = [j for j, k in enumerate(known) if k]
            new = [j for j, k in enumerate(known) if perturbed and not k]
            stepped.append(have)
            current.append([self._momentum[ps[j]] for j in have])
            nxt.append([persistent_buffer(self._spare, ps[j]) for j in have])
            fresh.append(new)
            zeros.append([torch.zeros_like(ps[j], memory_format=torch.preserve_format)
                          for j in new])
            fresh_next.append([persistent_buffer(self._spare, ps[j]) for j in new])
        self._lists = _MomentumLists(plan, stepped, current, nxt, fresh, zeros, fresh_next)
        return self._lists

    def _sync(self) -> None:
        """The per-parameter dicts brought up to date with the lists' committed steps."""
        lists = self._lists
        if lists is None:
            return
        for ps, idx, current, nxt in zip(lists.plan.params, lists.stepped, lists.current,
                                         lists.next):
            for j, m, spare in zip(idx, current, nxt):
                self._momentum[ps[j]] = m
                self._spare[ps[j]] = spare

    def _before_update(
        self, perturbed: StepPlan, now: StepPlan, grads: list[list[Tensor]], fused: bool,
        skip: Tensor | None = None, clip: Tensor | None = None,
    ) -> None:
        self._refuse_unscaled(perturbed)
        return None

    def _refuse_unscaled(self, perturbed: StepPlan) -> None:
        """Under GradScaler, a first step told no loss scale: refused, the weights restored."""
        if self._step_scale is None and getattr(self, "grad_scale", None) is not None:
            self._restore(perturbed)
            raise RuntimeError(
                "FriendlySAM under GradScaler needs the loss scale of the first pass: call "
                "optimizer.first_step(grad_scale=scaler.get_scale()) (m is kept unscaled); "
                "the weights are restored and m is unchanged"
            )

    def _after_update(
        self, perturbed: StepPlan, now: StepPlan, grads: list[list[Tensor]], fused: bool,
        clip: Tensor | None = None,
    ) -> None:
        self._commit(perturbed)

    # over held plans (fastsam/optimizers/_held.py): m and m_next are the plan's bound lists
    # "fm_a" and "fm_b", in either role (a commit swaps them); steps with parameters on their
    # first step take the general path
    _held_hooks = ("_perturb_groups", "_before_update", "_after_update")

    def _held_momentum(self, plan: StepPlan, groups: list[int]) -> tuple[str, str, tuple] | bool:
        lists = self._lists_for(plan)
        if lists.any_fresh or any(len(lists.stepped[i]) != len(plan.params[i]) for i in groups):
            return False
        held = plan.held
        if self._held_lists is not lists:  # this plan's buffers, bound once
            for i in groups:
                held.bind("fm_a", i, lists.current[i])
                held.bind("fm_b", i, lists.next[i])
            self._held_lists, self._held_a = lists, lists.current
        names = ("fm_a", "fm_b") if lists.current is self._held_a else ("fm_b", "fm_a")
        scale = 1.0 if self._step_scale is None else self._step_scale
        scalars = tuple(x for i in groups  # (Momentum.kernel_scalars of _perturb_groups')
                        for x in _coefficients(self.param_groups[i], scale))
        return (*names, scalars)

    def _held_sources(self, plan: StepPlan, backend: NativeBackend,
                      clip: Tensor | None) -> None:
        self._refuse_unscaled(plan)
        return None

    def _held_after_update(self, plan: StepPlan, backend: NativeBackend,
                           clip: Tensor | None) -> None:
        self._commit(plan)

    def _commit(self, perturbed: StepPlan) -> None:
        """The step's update went ahead: m_next becomes m."""
        lists = self._lists
        if lists is None or lists.plan is not perturbed:
            return
        lists.current, lists.next = lists.next, lists.current
        if lists.any_fresh:  # first steps: these parameters now have a momentum
            self._sync()
            for ps, idx, zeros, nxt in zip(lists.plan.params, lists.fresh, lists.zeros,
                                           lists.fresh_next):
                for j, zero, m in zip(idx, zeros, nxt):
                    self._momentum[ps[j]] = m
                    self._spare[ps[j]] = zero
            self._lists = None

    # ----------------------------------------------------------------- state
    def _param_stores(self) -> dict[str, dict[Tensor, Tensor]]:
        self._sync()
        # (a tensor of its own per parameter: a loader may write into them in place)
        self._stepped = {p: torch.ones((), dtype=torch.float32) for p in self._momentum}
        return {**super()._param_stores(), STATE_KEY: self._momentum,
                STEPPED_KEY: self._stepped}

    def _stand_in(self, key: str, p: Tensor) -> Tensor | None:
        """A parameter without m yet is saved with zeros marked as no momentum (its next step
        starts m afresh), so that every state dict has the same entries."""
        if key == STATE_KEY:
            return torch.zeros_like(p, memory_format=torch.preserve_format)
        if key == STEPPED_KEY:
            return torch.zeros((), dtype=torch.float32)
        return super()._stand_in(key, p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict` or by the plain base optimizer (whose
        parameters then start their momentum afresh). A parameter whose m is marked as a
        stand-in (``"friendlysam_stepped"`` 0) starts afresh too; a state dict without the marks
        (saved before they were) has m for the parameters that stepped only."""
        self._check_between_steps("load_state_dict()")
        self._sync()
        self._lists = None
        super().load_state_dict(state_dict)
        for p, stepped in self._stepped.items():
            if not stepped.item():
                self._momentum.pop(p, None)
        self._stepped = {}
