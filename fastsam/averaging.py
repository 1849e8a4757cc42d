"""Weight averaging folded into the update pass: SWA's running mean and an exponential moving
average (EMA) of the weights, with no pass of its own.

Every fastsam optimizer takes ``average="swa"``, ``"ema"``, :class:`SWA` or :class:`EMA`. After
each update that the schedule selects, the averaged copy of every parameter becomes

    avg = w                          at the first average (an exact copy)
    avg = avg + weight·(w - avg)     afterwards: weight 1/(n + 1) for SWA's mean of n + 1
                                     snapshots, 1 - decay for an EMA

which is what ``torch.optim.swa_utils.AveragedModel`` computes when ``update_parameters`` is
called after the same updates (``get_ema_multi_avg_fn(decay)`` for the EMA). The fused update
kernels (SGD, Adam, AdamW) write the average in the same pass as the new weights; other base
optimizers, and parameters without a gradient in that step, get one foreach pass.

Evaluate with the averaged weights through ``optimizer.averaged_weights()`` (swapped into the
parameters in place and back) after refreshing BatchNorm statistics with :func:`update_bn`.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def _check_count(name: str, value: Any, smallest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < smallest:
        raise ValueError(f"{name} must be >= {smallest}, got {value}")
    return value


@dataclass(frozen=True)
class SWA:
    """Stochastic weight averaging: the mean of the weights after updates ``start + every``,
    ``start + 2·every``, ... (updates are counted from 1 by every ``step()``/``second_step()``).

    Args:
        start: updates before averaging begins (default 0: from the first update).
        every: updates between two snapshots (default 1).
    """

    start: int = 0
    every: int = 1

    def __post_init__(self) -> None:
        _check_count("start", self.start, 0)
        _check_count("every", self.every, 1)

    def due(self, update: int) -> bool:
        """Whether the weights are averaged after update number ``update`` (from 1)."""
        return update > self.start and (update - self.start) % self.every == 0

    def due_on_device(self, update: torch.Tensor) -> torch.Tensor:
        """:meth:`due` of a float64 device count, as 0. or 1. on the device."""
        since = update - self.start
        return ((since > 0) & (torch.remainder(since, self.every) == 0)).to(update.dtype)

    def weight(self, n_averaged: int) -> float:
        """The weight of the new snapshot when ``n_averaged`` are already in the mean."""
        return 1.0 / (n_averaged + 1)

    def weight_on_device(self, n_averaged: torch.Tensor) -> torch.Tensor:
        """:meth:`weight` of a float64 device count (the same division in fp64)."""
        return (n_averaged + 1.0).reciprocal()


@dataclass(frozen=True)
class EMA:
    """Exponential moving average ``avg = decay·avg + (1 - decay)·w``, started as a copy.

    Args:
        decay: in [0, 1) (default 0.999).
        start, every: as in :class:`SWA`.
    """

    decay: float = 0.999
    start: int = 0
    every: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)):
            raise TypeError(f"decay must be a number, got {type(self.decay).__name__}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        _check_count("start", self.start, 0)
        _check_count("every", self.every, 1)

    due = SWA.due
    due_on_device = SWA.due_on_device

    def weight(self, n_averaged: int) -> float:
        return 1.0 if n_averaged == 0 else 1.0 - float(self.decay)

    def weight_on_device(self, n_averaged: torch.Tensor) -> torch.Tensor:
        return 1.0 - (n_averaged != 0).to(n_averaged.dtype) * float(self.decay)


Schedule = SWA | EMA


def averaging_schedule(value: Any) -> Schedule | None:
    """``average=`` of the optimizers: None, "swa", "ema", or an :class:`SWA`/:class:`EMA`."""
    if value is None or isinstance(value, (SWA, EMA)):
        return value
    if isinstance(value, str) and value.lower() in ("swa", "ema"):
        return SWA() if value.lower() == "swa" else EMA()
    raise ValueError(
        f"average must be None, 'swa', 'ema', fastsam.SWA(...) or fastsam.EMA(...), got {value!r}"
    )


@torch.no_grad()
def update_bn(
    loader: Iterable[Any], model: torch.nn.Module, device: torch.device | str | None = None
) -> None:
    """Recompute the running statistics of every BatchNorm layer of ``model`` over ``loader``.

    Averaged weights come with no matching BatchNorm statistics: run this with the averaged
    weights in place (inside ``optimizer.averaged_weights()``) before evaluating. Each layer's
    statistics are reset and then accumulated as an equal-weight mean over every batch (its
    momentum is None while this runs); the model is left in the training mode it had.

    Args:
        loader: batches; a batch that is a list or tuple contributes its first element.
        model: the model whose BatchNorm layers are refreshed (nothing happens without any).
        device: where to move each input first (default: leave it where it is).
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return
    momenta = {}
    for layer in layers:
        layer.reset_running_stats()
        momenta[layer] = layer.momentum
        layer.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = model.training
    model.train()
    try:
        for batch in loader:
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            if device is not None:
                inputs = inputs.to(device)
            model(inputs)
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        model.train(was_training)
