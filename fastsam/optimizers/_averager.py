"""Weight averaging (SWA, EMA) folded into the update, and swapping the averages in for
evaluation (docs/design.md §5; docs/averaging.md). The schedules are in :mod:`fastsam.averaging`."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..averaging import Schedule, averaging_schedule
from ..functional import Average, foreach_average
from ._plan import StepPlan, persistent_buffer, swap_contents
from ._skips import AVERAGED, UPDATES, Counters


class WeightAverager:
    """Counts updates, and keeps each parameter's averaged copy on the schedule of ``average``.

    Args:
        average: ``None``, ``"swa"``, ``"ema"``, or a :class:`fastsam.SWA`/:class:`fastsam.EMA`.
        counters: where updates and averaged snapshots are counted.
        capturable: the schedule runs on the device (every update gets an averaging, of weight
            0 when it is skipped or not due).
    """

    def __init__(self, average: Any, counters: Counters, capturable: bool) -> None:
        self.schedule: Schedule | None = averaging_schedule(average)
        self.counters = counters
        self.capturable = capturable
        self.averaged: dict[Tensor, Tensor] = {}
        self.swapped = False

    def count_update(self, plan: StepPlan, skip: Tensor | None = None) -> list[Average] | None:
        """Count one update; per group of ``plan``, the averaging the update folds in when the
        schedule averages the weights after it, else None (``skip``: the update's device
        flag, capturable)."""
        schedule, counters = self.schedule, self.counters
        if self.capturable and (plan.device is not None or counters.device_counts is not None):
            counts = counters.on_device(plan.device or counters.device_counts.device)
            made = 1.0 if skip is None else 1.0 - skip.to(torch.float64)
            counts[UPDATES].add_(made)
            if schedule is None:
                return None
            # the weight of this update's averaging, 0 when it averages nothing
            due = schedule.due_on_device(counts[UPDATES]) * made
            weight: float | Tensor = schedule.weight_on_device(counts[AVERAGED]) * due
            counts[AVERAGED].add_(due)
        else:
            counters.updates += 1
            if schedule is None or not schedule.due(counters.updates):
                return None
            weight = schedule.weight(counters.n_averaged)
            counters.n_averaged += 1
        if plan.averaged is None:  # new copies start as the weights: defined from the start
            plan.averaged = [
                [persistent_buffer(self.averaged, p, copy=True) for p in ps] for ps in plan.params
            ]
        return [Average(buffers, weight) for buffers in plan.averaged]

    def average_rest(
        self, plan: StepPlan, averages: list[Average] | None, unfused: bool
    ) -> None:
        """The averaging an update did not fold in: every parameter with a gradient when the
        base optimizer stepped by itself (``unfused``), and those without a gradient this step
        (``torch.optim.swa_utils.AveragedModel`` averages every parameter)."""
        if not averages:
            return
        if unfused and plan.device is not None:
            for params, average in zip(plan.params, averages):
                foreach_average(params, average)
        if plan.idle:
            if plan.idle_averaged is None:
                plan.idle_averaged = [
                    persistent_buffer(self.averaged, p, copy=True) for p in plan.idle
                ]
            foreach_average(plan.idle, Average(plan.idle_averaged, averages[0].weight))

    def swap(self) -> None:
        """Exchange every parameter with its averaged copy, in place (one tensor's copy at a
        time); refused while no average exists."""
        if self.schedule is None:
            raise RuntimeError(
                "this optimizer averages no weights: construct it with average='swa' or 'ema' "
                "(or fastsam.SWA(...) / fastsam.EMA(...))"
            )
        counts = self.counters.read()  # with capturable, one read of the device counts
        if counts["n_averaged"] == 0:
            schedule = self.schedule
            raise RuntimeError(
                f"no weights have been averaged yet: {counts['updates']} updates made, and "
                f"{schedule} averages after update {schedule.start + schedule.every} first"
            )
        swap_contents(self.averaged.items())
        self.swapped = not self.swapped

    def refuse_when_swapped(self, what: str) -> None:
        if self.swapped:
            raise RuntimeError(
                f"{what} while the averaged weights are swapped into the parameters "
                "(swap_average() / averaged_weights()): swap back first"
            )
