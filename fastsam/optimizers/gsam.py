"""GSAM (Zhuang et al., 2022, "Surrogate Gap Guided Sharpness-Aware Minimization"), drop-in
compatible with the official PyTorch GSAM construction and ``set_closure`` usage."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..backends.native import HeldSource
from ..batchnorm import frozen_bn_stats
from ..functional import DecomposeGroup, Decomposition, Scaling
from ._base import SharpnessAwareOptimizer
from ._checks import check_finite_nonnegative
from ._core import without_grad
from ._held import with_params
from ._plan import StepPlan

if TYPE_CHECKING:
    from ..backends.native import NativeBackend

# The perturbation scaling of each ``adaptive`` option.
_ADAPTIVE = {
    False: lambda group: Scaling(),
    True: lambda group: Scaling("element", 0.0),
    "official": lambda group: Scaling("element", 0.0),
    "agsam": lambda group: Scaling("outer", float(group["gamma"])),
}


class GSAM(SharpnessAwareOptimizer):
    r"""Surrogate-gap guided SAM around any torch.optim base optimizer.

    The first step is SAM's (``e = ρ_t·g / (‖g‖₂ + eps)``; see ``adaptive`` for the two
    adaptive forms) and keeps the first gradient g. Before the base update, the
    adversarial gradient loses ``alpha`` times the part of g orthogonal to it:

    .. math::
        \cos = \frac{\langle g, g_{adv}\rangle}{\|g_{adv}\|\,\|g\| + \epsilon},\quad
        v = g - \cos\,\|g\|\,\frac{g_{adv}}{\|g_{adv}\| + \epsilon},\quad
        w \leftarrow \mathrm{update}(w,\ g_{adv} - \alpha\,v)

    (the official code's eps placement). ``alpha = 0`` is SAM exactly. ``ρ_t`` may follow a
    schedule (:mod:`fastsam.schedulers`): :meth:`update_rho_t` advances it.

    Two ways to build and drive it:

    - fastsam's: ``GSAM(params, torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1)`` and the same
      ``first_step``/``second_step``/``step(closure)`` as :class:`fastsam.SAM`;
    - the official one: ``GSAM(params, base_optimizer_instance, model, gsam_alpha,
      rho_scheduler, adaptive=False, perturb_eps=1e-12)``, then per batch
      ``opt.set_closure(loss_fn, inputs, targets); outputs, loss = opt.step();
      lr_scheduler.step(); opt.update_rho_t()``. ``step()`` then runs both forward/backward
      passes itself (BatchNorm statistics frozen during the second) and returns
      ``(outputs, loss)``.

    Memory: two parameter-sized buffers (w_old and g).

    Args:
        params: parameters or parameter groups (a group may set ``rho``, ``gsam_alpha``,
            ``adaptive``, ``gamma``; the group key is ``gsam_alpha`` because groups are shared
            with the base optimizer, and RMSprop's own ``alpha`` must not be overwritten).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``base_kwargs``) or an
            instance over exactly these parameters.
        model (torch.nn.Module, optional): needed only for ``set_closure``/``step()`` the
            official way.
        gsam_alpha (float, optional): the official name of ``alpha``.
        rho_scheduler (optional): an object whose ``step()`` returns the next rho (see
            :mod:`fastsam.schedulers`); its current value is used from the start.
        adaptive (default False): the perturbation's scaling.

            - ``False``: ``e = ρ_t·g / (‖g‖₂ + eps)`` (GSAM).
            - ``True`` or ``"official"``: the official code's adaptive form (ASAM's, with no
              eta): ``e = ρ_t·w²·g / (‖|w|·g‖₂ + eps)``.
            - ``"agsam"``: Adaptive-GSAM of the seed report: ``e = ρ_t·(|w| + gamma)·g /
              (‖g‖₂ + eps)``, each weight's step scaled by its magnitude while the radius is
              measured on the plain gradient.
        gamma (float, default 0.01): Adaptive-GSAM's constant (only with ``adaptive="agsam"``);
            keeps weights at zero perturbable.
        perturb_eps (float, optional): the official name of ``eps``.
        rho (float, default 0.05): radius when no scheduler is given.
        alpha (float, default 0.4): weight of the removed orthogonal component.
        eps (float, default 1e-12): the constant of every denominator above.
        backend (str, optional), average (optional): as in :class:`fastsam.SAM`.
        skip_nonfinite (bool, default False): skip an update whose gradients hold inf/NaN
            (with the weights restored bit for bit and the state untouched; counted by
            :attr:`nonfinite_skipped_steps`) instead of letting the NaN into the weights as
            torch.optim does. Costs one fused check of the gradients and one host read per step
            (none with ``capturable``).
        capturable (bool, default False): as in :class:`fastsam.SAM`.
        interval (int, default 1): interval SAM, as in :class:`fastsam.SAM`.
        max_grad_norm (float, optional): as in :class:`fastsam.SAM`: g_adv is clipped before
            the decomposition (its along then is that of the clipped g_adv).
        **base_kwargs: passed to ``base_optimizer`` when it is a class.

    Example:
        >>> import torch, fastsam
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = fastsam.GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.3, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.first_step(zero_grad=True)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        model: torch.nn.Module | None = None,
        gsam_alpha: float | None = None,
        rho_scheduler: Any = None,
        adaptive: bool | str = False,
        perturb_eps: float | None = None,
        *,
        rho: float = 0.05,
        gamma: float = 0.01,
        alpha: float | None = None,
        eps: float = 1e-12,
        backend: str | None = None,
        average: Any = None,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        interval: int = 1,
        **base_kwargs: Any,
    ) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module (the official GSAM's third argument), got "
                f"{type(model).__name__}"
            )
        if gsam_alpha is not None and alpha is not None and gsam_alpha != alpha:
            raise ValueError(f"alpha={alpha} and gsam_alpha={gsam_alpha} disagree; give one")
        alpha = 0.4 if alpha is None and gsam_alpha is None else (
            alpha if alpha is not None else gsam_alpha
        )
        if perturb_eps is not None:
            eps = perturb_eps
        if rho_scheduler is not None and not callable(getattr(rho_scheduler, "step", None)):
            raise TypeError("rho_scheduler must have a step() method returning the next rho")
        self.model = model
        self.rho_scheduler = rho_scheduler
        self.alpha = alpha
        self._forward_backward: Callable[[], tuple[Any, Tensor]] | None = None
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho, gsam_alpha=alpha, adaptive=adaptive, gamma=gamma),
            p=2,
            eps=eps,
            backend=backend,
            base_kwargs=base_kwargs,
            average=average,
            skip_nonfinite=skip_nonfinite,
            capturable=capturable,
            max_grad_norm=max_grad_norm,
            interval=interval,
        )
        self.rho_t = rho
        self._clip_sums: Tensor | None = None  # see _update_clip
        if rho_scheduler is not None:
            current = getattr(rho_scheduler, "value", None)
            self._set_rho(float(current) if current is not None else rho_scheduler.step())

    # ----------------------------------------------------------------- options
    _keeps_first_grads = True  # the perturb pass keeps g for the decomposition
    # over held plans: the kept g bound as "first", the two hooks' held forms below
    _held_hooks = ("_keeps_first_grads", "_before_update", "_update_clip")

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_finite_nonnegative("alpha", group["gsam_alpha"])
        check_finite_nonnegative("gamma", group["gamma"])
        if type(group["adaptive"]) not in (bool, str) or group["adaptive"] not in _ADAPTIVE:
            raise ValueError(
                "adaptive must be False, True (= 'official': e = rho*w^2*g/||w*g||) or 'agsam' "
                f"(Adaptive-GSAM: e = rho*(|w|+gamma)*g/||g||), got {group['adaptive']!r}"
            )

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        return _ADAPTIVE[group["adaptive"]](group)

    def _set_rho(self, value: float) -> float:
        value = check_finite_nonnegative("rho from rho_scheduler", float(value))
        for group in self.param_groups:
            if isinstance(group["rho"], Tensor):  # written in place: a captured step reads it
                group["rho"].fill_(value)
            else:
                group["rho"] = value
        self.rho_t = value
        return value

    def update_rho_t(self) -> float:
        """Advance ``rho_scheduler`` and use its value as every group's rho (official API)."""
        if self.rho_scheduler is None:
            raise RuntimeError("update_rho_t() needs a rho_scheduler (given at construction)")
        return self._set_rho(self.rho_scheduler.step())

    # ----------------------------------------------------------------- the two hooks
    def _before_update(
        self, perturbed: StepPlan, now: StepPlan, grads: list[list[Tensor]], fused: bool,
        skip: Tensor | None = None, clip: Tensor | None = None,
    ) -> list[Decomposition | None] | None:
        # (keeps nothing itself: a skipped update ignores the decomposition it gets)
        if now.device is None:
            return None
        firsts = self._first_buffers(perturbed)
        backend = self._backend_for(now.device)
        alphas = [float(group["gsam_alpha"]) for group in self.param_groups]
        if fused and now is perturbed:  # the usual case: decomposition fused into the update
            if clip is None:
                along = backend.gsam_along(self._decompose_groups(perturbed, grads), self._eps)
            else:  # the update clips g_adv by c: the sums _update_clip reduced
                along = self._clipped_along(self._clip_sums, clip)
            return [
                Decomposition(f, a, along) if a != 0.0 and f else None
                for f, a in zip(firsts, alphas)
            ]
        groups = []
        for i in range(len(self.param_groups)):
            if now is perturbed:
                adv, first = grads[i], firsts[i]
            else:  # only parameters with a gradient in both passes take part
                saved = dict(zip(perturbed.params[i], firsts[i])) if i < len(firsts) else {}
                pairs = [(g, saved[p]) for p, g in zip(now.params[i], grads[i]) if p in saved]
                adv, first = [g for g, _ in pairs], [f for _, f in pairs]
            groups.append(DecomposeGroup(adv, first, alphas[i]))
        backend.gsam_decompose(groups, self._eps)
        return None

    def _decompose_groups(self, perturbed: StepPlan,
                          grads: list[list[Tensor]]) -> list[DecomposeGroup]:
        """Per group, g_adv (``grads``), the kept g and alpha, for the fused decomposition."""
        return [DecomposeGroup(g, f, float(group["gsam_alpha"])) for g, f, group in
                zip(grads, self._first_buffers(perturbed), self.param_groups)]

    def _update_clip(
        self, perturbed: StepPlan, now: StepPlan, grads: list[list[Tensor]], fused: bool
    ) -> Tensor | None:
        """Fused: the sums the decomposition needs, ``[⟨g, g_adv⟩, ‖g_adv‖², ‖g‖²]``, reduced
        here once (kept for :meth:`_before_update`); the clip coefficient from ‖g_adv‖²."""
        if self.max_grad_norm is None or not fused or now is not perturbed or now.device is None:
            return super()._update_clip(perturbed, now, grads, fused)
        backend = self._backend_for(now.device)
        self._clip_sums = backend.gsam_sums(self._decompose_groups(perturbed, grads))
        return self._clip_from(self._clip_sums[1], backend)

    def _held_update_clip(self, plan: StepPlan, backend: NativeBackend) -> Tensor | None:
        """:meth:`_update_clip` over a held plan: the three sums a held reduction."""
        if self.max_grad_norm is None:
            return None
        self._clip_sums = backend.held_gsam_sums(plan.held, with_params(plan))
        return self._clip_from(self._clip_sums[1], backend)

    def _held_sources(self, plan: StepPlan, backend: NativeBackend,
                      clip: Tensor | None) -> list[HeldSource | None]:
        """:meth:`_before_update` over a held plan: along a held reduction over the gradients
        and the kept g (bound as "first"), each group's decomposition read from "first"."""
        if clip is None:
            along = backend.held_gsam_along(plan.held, with_params(plan), self._eps)
        else:
            along = self._clipped_along(self._clip_sums, clip)
        alphas = [float(group["gsam_alpha"]) for group in self.param_groups]
        return self._kept_held_sources(plan, along, alphas, lambda: [
            HeldSource("first", Decomposition(f, alpha, along)) if alpha != 0.0 and f else None
            for f, alpha in zip(self._first_buffers(plan), alphas)
        ])

    def _clipped_along(self, sums: Tensor, clip: Tensor) -> Tensor:
        """``along`` (:func:`fastsam.functional.gsam_along_from_sums`) of the clipped c·g_adv
        from the sums of the unclipped one, ``[⟨g, g_adv⟩, ‖g_adv‖², ‖g‖²]``: ⟨g, c·g_adv⟩ =
        c·⟨g, g_adv⟩ and ‖c·g_adv‖ = c·‖g_adv‖. In kept 0-d tensors (no allocation)."""
        c, adv, first, den, along, eps = self._clip_kept(
            sums[0], "gsam_c", "gsam_adv", "gsam_first", "gsam_den", "gsam_along", "gsam_eps")
        c.copy_(clip)
        eps.fill_(self._eps)
        torch.sqrt(sums[1], out=adv).mul_(c)
        torch.sqrt(sums[2], out=first)
        torch.mul(adv, first, out=den).add_(eps)
        torch.mul(sums[0], c, out=along).div_(den)  # cos
        along.mul_(first).div_(torch.add(adv, eps, out=den))
        return along

    # ----------------------------------------------------------------- official usage
    def set_closure(self, loss_fn: Callable[..., Tensor], inputs: Any, targets: Any,
                    **kwargs: Any) -> None:
        """Official API: the forward/backward that :meth:`step` runs twice: zero the
        gradients, ``outputs = model(inputs)``, ``loss_fn(outputs, targets, **kwargs)``,
        backward. Needs ``model`` at construction."""
        if self.model is None:
            raise RuntimeError(
                "set_closure() needs the model: build GSAM(params, base_optimizer, model, ...)"
            )
        model = self.model

        def forward_backward() -> tuple[Any, Tensor]:
            self.base_optimizer.zero_grad()
            with torch.enable_grad():
                outputs = model(inputs)
                loss = loss_fn(outputs, targets, **kwargs)
            loss.backward()
            return outputs, loss.detach().clone()

        self._forward_backward = forward_backward

    @without_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """As :meth:`fastsam.SAM.step`; and, after :meth:`set_closure` (official usage) with no
        first step pending, one whole GSAM step returning ``(outputs, loss)``."""
        if closure is None and self._perturbed is None and self._forward_backward is not None:
            outputs, loss = self._forward_backward()
            if not self.first_step():  # interval GSAM's plain step: one pass
                return outputs, loss
            with frozen_bn_stats(self.model):
                self._forward_backward()
            self.second_step()
            return outputs, loss
        return super().step(closure)
