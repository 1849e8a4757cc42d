"""ASAM (Kwon et al., 2021): adaptive sharpness with the paper's operator T."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..functional import Scaling
from ._base import SharpnessAwareOptimizer
from ._checks import check_finite_nonnegative

NORMALIZATIONS = ("element", "filter")


class ASAM(SharpnessAwareOptimizer):
    r"""Adaptive SAM: the perturbation ball is scaled by the normalization operator T.

    .. math::
        e = \rho\,\frac{T^2\,g}{\|T\,g\|_2 + \epsilon}\quad(p = 2),\qquad
        T = |w| + \eta\ \ \text{(element-wise)}\quad\text{or}\quad
        T_i = \|w_{i,\cdot}\|_2 + \eta\ \ \text{(filter-wise, filter } i = \text{dim 0)}

    Filter-wise T applies to tensors with ndim ≥ 2; 1-D tensors (biases, norms) use the
    element-wise T. A group with ``adaptive=False`` gets T = 1 (plain SAM scaling) but still
    enters the one global norm: this is how the official ASAM code treats parameters whose name
    does not contain ``"weight"`` (build those groups with :func:`asam_param_groups`). General p
    works as in :class:`fastsam.SAM`.

    Args:
        params: parameters or groups (a group may set ``rho``, ``eta``, ``normalization``,
            ``adaptive``).
        base_optimizer: a ``torch.optim.Optimizer`` class or an instance over these parameters.
        rho (float, default 0.5): radius (the paper's default for CIFAR).
        eta (float, default 0.01): added to |w| (or the filter norm) so zero weights still move.
        normalization (str, default ``"element"``): ``"element"`` or ``"filter"``.
        adaptive (bool, default True): apply T in this group.
        p (float, default 2), eps (float, default 1e-12), backend (str, optional), average
            (optional): as in SAM.
        skip_nonfinite (bool, default False): skip an update whose gradients hold inf/NaN
            (with the weights restored bit for bit and the state untouched; counted by
            :attr:`nonfinite_skipped_steps`) instead of letting the NaN into the weights as
            torch.optim does. Costs one fused check of the gradients and one host read per step
            (none with ``capturable``).
        capturable (bool, default False): as in :class:`fastsam.SAM`.
        interval (int, default 1): interval SAM, as in :class:`fastsam.SAM`.
        max_grad_norm (float, optional): as in :class:`fastsam.SAM`.
        **base_kwargs: passed to ``base_optimizer`` when it is a class.

    Example:
        >>> import torch, fastsam
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
        >>> groups = fastsam.asam_param_groups(model)
        >>> opt = fastsam.ASAM(groups, torch.optim.SGD, rho=0.5, normalization="filter", lr=0.1)
        >>> model(torch.randn(2, 3, 5, 5)).square().mean().backward()
        >>> opt.first_step(zero_grad=True)
        >>> model(torch.randn(2, 3, 5, 5)).square().mean().backward()
        >>> opt.second_step(zero_grad=True)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.5,
        eta: float = 0.01,
        normalization: str = "element",
        adaptive: bool = True,
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
            dict(rho=rho, eta=eta, normalization=normalization, adaptive=adaptive),
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
        check_finite_nonnegative("eta", group["eta"])
        if group["normalization"] not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {group['normalization']!r}"
            )
        if not isinstance(group["adaptive"], bool):
            raise TypeError(f"adaptive must be True or False, got {group['adaptive']!r}")

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        if not group["adaptive"]:
            return Scaling()
        return Scaling(group["normalization"], float(group["eta"]))


def asam_param_groups(model: torch.nn.Module, **options: Any) -> list[dict[str, Any]]:
    """The official ASAM grouping: parameters whose name contains ``"weight"`` are scaled by T,
    all others (biases, ...) get plain SAM scaling inside the same global norm.

    Args:
        model: the module whose ``named_parameters()`` are grouped.
        **options: extra keys put in both groups (``lr``, ``rho``, ...).

    Returns:
        A list of up to two groups: ``{"params": weights, "adaptive": True, **options}`` and
        ``{"params": others, "adaptive": False, **options}``; empty groups are left out.
    """
    weights, others = [], []
    for name, param in model.named_parameters():
        (weights if "weight" in name else others).append(param)
    groups = [
        {"params": weights, "adaptive": True, **options},
        {"params": others, "adaptive": False, **options},
    ]
    return [g for g in groups if g["params"]]
