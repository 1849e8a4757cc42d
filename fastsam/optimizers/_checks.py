"""Validation of hyper-parameters at the boundary, and their form for the backends.

Every check is written so that NaN fails (``not 0 <= x < inf``), and raises ``TypeError`` or
``ValueError`` (never ``assert``, which ``python -O`` removes).
"""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor


def check_finite_nonnegative(name: str, value: Any) -> float:
    """Validate a hyper-parameter that must be a finite number >= 0 (NaN fails)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_rho(value: Any) -> None:
    """Validate a group's rho: a finite number >= 0, or a one-element floating-point tensor
    holding one (its value is read once here, when the group is added or loaded; what is
    written into it later goes to the kernels unread)."""
    if isinstance(value, Tensor):
        if not value.is_floating_point() or value.numel() != 1:
            raise TypeError(
                "rho must be a number or a one-element floating-point tensor, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}"
            )
        if value.requires_grad:
            raise ValueError("a tensor rho must not require grad (rho is not differentiated)")
        value = value.item()
    check_finite_nonnegative("rho", value)


def as_lr(lr: float | Tensor) -> float | Tensor:
    """A number as float; a tensor as is: the backends read it on the device, and quantities
    derived from it (lr/(1 - β1^t), 1 - lr·wd) are tensor ops in its dtype, as in torch.optim."""
    if type(lr) is float:  # (the usual case, told before isinstance, which goes through
        return lr          # Tensor's metaclass: ~0.1 us)
    return lr.detach() if isinstance(lr, Tensor) else float(lr)


def as_rho(rho: float | Tensor) -> float | Tensor:
    """A number as float; a one-element tensor as a 0-d view of it: the backends read it on
    the device (a device tensor rho changed in place between steps is never read by the
    host)."""
    if type(rho) is float:  # (see as_lr)
        return rho
    return rho.detach().reshape(()) if isinstance(rho, Tensor) else float(rho)


def check_max_grad_norm(value: Any) -> float | None:
    """Validate ``max_grad_norm``: None (no clipping) or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"max_grad_norm must be a number or None, got {type(value).__name__}"
        )
    if not (0.0 < value < math.inf):
        raise ValueError(
            f"max_grad_norm must be a finite number > 0 (None: no clipping), got {value}"
        )
    return float(value)


def check_grad_scale(value: Any) -> float | None:
    """Validate a first step's ``grad_scale`` (``scaler.get_scale()``): None (unscaled
    gradients) or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"grad_scale must be a number (scaler.get_scale()), got {type(value).__name__}"
        )
    if not 0.0 < value < math.inf:
        raise ValueError(f"grad_scale must be a finite number > 0, got {value}")
    return float(value)
