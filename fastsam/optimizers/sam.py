"""SAM (Foret et al., 2021), drop-in compatible with the popular PyTorch implementation."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ..functional import Scaling
from ._base import SharpnessAwareOptimizer

# The two scalings (immutable: made once, not at every step)
_PLAIN, _ELEMENT = Scaling(), Scaling("element", 0.0)


class SAM(SharpnessAwareOptimizer):
    r"""Sharpness-aware minimization around any torch.optim base optimizer.

    Each step evaluates the gradient at the worst point of a p-norm ball of radius ρ:

    .. math::
        u = T\,g,\qquad
        e = \rho\,\frac{T\,\mathrm{sign}(u)\,|u|^{q-1}}{\|u\|_q^{q/p} + \epsilon},\qquad
        w \leftarrow \mathrm{update}\big(w,\ \nabla L(w + e)\big)

    with 1/p + 1/q = 1, T = 1 (SAM) or T = |w| (``adaptive=True``: the popular implementation's
    ASAM, ``e = ρ·w²·g / (‖|w|·g‖₂ + eps)``). p = 2 gives ``e = ρ·g / (‖g‖₂ + eps)``;
    p = ∞ gives the sign perturbation ``e = ρ·sign(g)``. The norm is one global norm over every
    parameter with a gradient in every group; ρ may differ per group.

    Args:
        params: parameters or parameter groups (a group may set ``rho`` and ``adaptive``).
        base_optimizer: a ``torch.optim.Optimizer`` class, built over the same groups with
            ``base_kwargs``, or an already-built instance over exactly these parameters.
        rho (float, default 0.05): radius of the neighbourhood.
        adaptive (bool, default False): scale by T = |w| (ASAM as in the popular implementation;
            see :class:`fastsam.ASAM` for the paper's T = |w| + eta and filter-wise T).
        p (float, default 2): norm of the ball; ``float('inf')`` or any p > 1.
        eps (float, default 1e-12): added to the norm in the denominator.
        backend (str, optional): ``"torch"``, ``"triton"``, ``"cpu"`` or ``"cuda"``; default:
            ``FASTSAM_BACKEND``, else automatic.
        average (optional): weight averaging fused into the update, ``"swa"``, ``"ema"``,
            ``fastsam.SWA(start, every)`` or ``fastsam.EMA(decay, start, every)``; evaluate
            with :meth:`averaged_weights` (see :mod:`fastsam.averaging`).
        skip_nonfinite (bool, default False): skip an update whose gradients hold inf/NaN
            (with the weights restored bit for bit and the state untouched; counted by
            :attr:`nonfinite_skipped_steps`) instead of letting the NaN into the weights as
            torch.optim does. Costs one fused check of the gradients and one host read per step
            (none with ``capturable``).
        capturable (bool, default False): no step reads a device value on the host. inf/NaN
            skips (GradScaler's, ``skip_nonfinite``'s) are applied inside the update kernels,
            Adam's step counts live on the parameters' device (torch.optim's capturable
            layout), the skip counters are device tensors and so are ``average``'s schedule
            counts. ``lr`` and ``rho`` may be device tensors, written in place by a schedule.
            Needs a fused base update (torch.optim SGD, Adam, AdamW).
        interval (int, default 1): interval SAM (as MosaicML Composer's): a SAM step every
            ``interval`` steps, from the first, and the base optimizer's plain update with the
            first pass's gradient on the others, where :meth:`first_step` applies it and returns
            False (no second pass: check :attr:`sam_step_next`, or use ``step(closure)``, which
            calls the closure on SAM steps only; under GradScaler ``scaler.step(optimizer)``
            takes the plain steps). The steps begun are saved in the state dict.
        max_grad_norm (float, optional): clip the gradient each update uses by its global L2
            norm over every parameter with a gradient, ``g·min(1, max_grad_norm/(‖g‖₂ +
            1e-6))``: what ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` on
            ``.grad`` before :meth:`second_step` (or before an update made by
            :meth:`first_step`) does, fused: one more reduction, and the update reads the
            coefficient on the device. ``.grad`` itself is left unclipped when the update is
            fused (clipped in place, as clip_grad_norm_ leaves it, for another base
            optimizer). Under GradScaler the unscaled gradients are clipped.
        **base_kwargs: passed to ``base_optimizer`` when it is a class (lr, momentum, ...).

    Example:
        >>> import torch, fastsam
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
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
        rho: float = 0.05,
        adaptive: bool = False,
        p: float = 2,
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
        super().__init__(
            params,
            base_optimizer,
            dict(rho=rho, adaptive=adaptive),
            p=p,
            eps=eps,
            backend=backend,
            base_kwargs=base_kwargs,
            average=average,
            skip_nonfinite=skip_nonfinite,
            capturable=capturable,
            max_grad_norm=max_grad_norm,
            interval=interval,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if not isinstance(group["adaptive"], bool):
            raise TypeError(f"adaptive must be True or False, got {group['adaptive']!r}")

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        return _ELEMENT if group["adaptive"] else _PLAIN
