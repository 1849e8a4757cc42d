"""Accelerate: a fastsam optimizer through ``accelerator.prepare``.

``accelerator.prepare(optimizer)`` returns an ``AcceleratedOptimizer``, which has no
``first_step``; :func:`fastsam.unwrap` gives the fastsam optimizer inside it. Keep calling
``step()`` and ``zero_grad()`` on the prepared optimizer: under fp16 its ``step()`` is
``scaler.step(optimizer)``, fastsam's second step with the gradients unscaled::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sam = fastsam.unwrap(optimizer)
    for x, y in loader:
        accelerator.backward(loss_fn(model(x), y))
        sam.first_step(zero_grad=True)
        with fastsam.frozen_bn_stats(model):
            accelerator.backward(loss_fn(model(x), y))
        optimizer.step()
        optimizer.zero_grad()

With gradient accumulation both passes must run over the same micro-batches, which
``accelerator.accumulate()`` (one micro-batch per call) cannot arrange: :func:`sam_step` runs
one optimizer step over a list of micro-batches (docs/trainers.md, "Accelerate").
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from ..batchnorm import frozen_bn_stats
from ..optimizers._base import SharpnessAwareOptimizer
from . import begin_sam_step, report_amp_skip, unwrap


def sam_step(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    batches: Sequence[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    *,
    max_grad_norm: float | None = None,
    per_worker: bool = False,
) -> torch.Tensor:
    """One optimizer step of a fastsam optimizer over ``batches`` (the micro-batches of one
    step), the same as one step over their concatenation when ``loss_fn`` returns a mean over
    equal-sized micro-batches.

    Runs ``loss_fn(model, batch)`` and ``accelerator.backward`` for each micro-batch (DDP
    all-reduces the last one only), ``first_step()``, the same over the micro-batches again
    with BatchNorm statistics frozen, optionally ``accelerator.clip_grad_norm_`` on the second
    pass's gradients, then ``optimizer.step()`` (fastsam's second step, through the GradScaler
    under fp16; a step the scaler skips is reported as skipped, so that an
    ``AcceleratedScheduler`` keeps its lr) and ``optimizer.zero_grad()``. FreeSAM and LookSAM's
    look-ahead steps take one pass. Each micro-batch's loss counts ``1/len(batches)``, whatever
    the accelerator's ``gradient_accumulation_steps``.

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared ``model`` and ``optimizer``.
        model: the prepared model.
        optimizer: the prepared optimizer (an ``AcceleratedOptimizer`` around a fastsam one).
        batches: the micro-batches of this step (at least one).
        loss_fn: ``loss_fn(model, batch)`` -> the micro-batch's scalar loss.
        max_grad_norm: clip the update's gradients to this global norm (None: no clipping).
        per_worker: under DDP, perturb along each worker's own gradient (the first pass is
            not all-reduced).

    Returns:
        The first pass's loss, averaged over the micro-batches (detached).
    """
    sam = unwrap(optimizer)
    if len(batches) == 0:
        raise ValueError("sam_step needs at least one micro-batch")
    if not accelerator.sync_gradients:
        raise RuntimeError(
            "sam_step was called inside accelerator.accumulate() (or another context that "
            "defers the all-reduce): it runs the whole accumulation itself; call it with the "
            "step's micro-batches, outside accumulate()"
        )
    weight = accelerator.gradient_accumulation_steps / len(batches)

    def one_pass(local: bool) -> torch.Tensor:
        total = 0.0
        for i, batch in enumerate(batches):
            synced = not local and i == len(batches) - 1
            with nullcontext() if synced else accelerator.no_sync(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss * weight)  # backward divides by the accumulation
            total = total + loss.detach()
        return total / len(batches)

    loss = one_pass(per_worker)
    if (isinstance(sam, SharpnessAwareOptimizer) and getattr(sam, "sam_step_next", True)
            and begin_sam_step(sam, accelerator.scaler) is not False):  # AE-SAM's plain step
        with frozen_bn_stats(model):
            one_pass(False)
    if max_grad_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    skipped = sam.amp_skipped_steps
    optimizer.step()
    report_amp_skip(optimizer, skipped)  # AcceleratedScheduler then keeps the lr
    optimizer.zero_grad()
    return loss


__all__ = ["sam_step"]
