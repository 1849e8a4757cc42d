"""Schedules for GSAM's radius rho_t (any object with ``step() -> float`` works as well).

- :class:`ProportionScheduler`: rho proportional to the learning rate, the official GSAM
  mapping of ``lr`` in ``[min_lr, max_lr]`` linearly onto ``[min_value, max_value]``; it reads
  the lr of any ``torch.optim.lr_scheduler`` scheduler.
- :class:`LinearScheduler`, :class:`CosineScheduler`: rho as a function of the step count.

Each scheduler's ``step()`` advances it and returns the new value; ``value`` is the current one.
:meth:`fastsam.GSAM.update_rho_t` calls ``step()`` and writes the value into every group.
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LRScheduler

__all__ = ["ProportionScheduler", "LinearScheduler", "CosineScheduler"]


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


class ProportionScheduler:
    """``value = min_value + (max_value - min_value)·(lr - min_lr)/(max_lr - min_lr)`` with
    ``lr`` the first group's current learning rate of ``pytorch_lr_scheduler``.

    Args (the official GSAM code's names and order):
        pytorch_lr_scheduler: a torch lr scheduler; its last lr is read at every ``step()``.
        max_lr, min_lr: the lr range (``max_lr > min_lr``, or both equal with
            ``max_value == min_value``: a constant).
        max_value, min_value: the rho range they map onto.

    Example:
        >>> import torch, fastsam
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> base = torch.optim.SGD([w], lr=0.1)
        >>> lr_sched = torch.optim.lr_scheduler.LinearLR(base, 1.0, 0.0, total_iters=10)
        >>> rho = fastsam.ProportionScheduler(lr_sched, max_lr=0.1, min_lr=0.0,
        ...                                   max_value=0.1, min_value=0.02)
        >>> rho.value
        0.1
    """

    def __init__(self, pytorch_lr_scheduler: LRScheduler, max_lr: float, min_lr: float,
                 max_value: float, min_value: float) -> None:
        self.pytorch_lr_scheduler = pytorch_lr_scheduler
        self.max_lr, self.min_lr = _number("max_lr", max_lr), _number("min_lr", min_lr)
        self.max_value = _number("max_value", max_value)
        self.min_value = _number("min_value", min_value)
        if not (self.max_lr > self.min_lr or (
            self.max_lr == self.min_lr and self.max_value == self.min_value
        )):
            raise ValueError(
                f"need max_lr > min_lr (got {max_lr} and {min_lr}), or equal lrs with "
                f"max_value == min_value"
            )
        self.value = self._compute()

    def _lr(self) -> float:
        last = getattr(self.pytorch_lr_scheduler, "_last_lr", None)
        lr = last[0] if last else self.pytorch_lr_scheduler.optimizer.param_groups[0]["lr"]
        return float(lr)

    def _compute(self) -> float:
        if self.max_lr == self.min_lr:
            return self.max_value
        fraction = (self._lr() - self.min_lr) / (self.max_lr - self.min_lr)
        return self.min_value + (self.max_value - self.min_value) * fraction

    def step(self) -> float:
        self.value = self._compute()
        return self.value


class _StepSchedule:
    def __init__(self, start: float, end: float, total_steps: int) -> None:
        self.start, self.end = _number("start", start), _number("end", end)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        self.total_steps = total_steps
        self.t = 0
        self.value = self.at(0)

    def at(self, t: int) -> float:
        raise NotImplementedError

    def step(self) -> float:
        self.t += 1
        self.value = self.at(self.t)
        return self.value


class LinearScheduler(_StepSchedule):
    """``value(t) = start + (end - start)·min(t, T)/T``, t = number of ``step()`` calls so far
    (``value`` is ``start`` before the first), T = ``total_steps``."""

    def at(self, t: int) -> float:
        return self.start + (self.end - self.start) * min(t, self.total_steps) / self.total_steps


class CosineScheduler(_StepSchedule):
    """``value(t) = end + (start - end)·(1 + cos(π·min(t, T)/T))/2`` (start at t = 0, end
    from t = T on)."""

    def at(self, t: int) -> float:
        phase = math.pi * min(t, self.total_steps) / self.total_steps
        return self.end + (self.start - self.end) * (1.0 + math.cos(phase)) / 2.0
