"""fastsam where people train: the Hugging Face Trainer (:mod:`.transformers`), Accelerate
(:mod:`.accelerate`) and Lightning (:mod:`.lightning`). Each submodule imports its framework
when it is imported, never before; ``import fastsam`` imports none of them.

A sharpness-aware step needs two forward/backward passes at two points, while a trainer makes
one per optimizer step and then calls ``optimizer.step()``. The integrations put the second
pass where the framework lets them (docs/trainers.md; how: docs/design.md §11).
"""
from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from ..optimizers._core import FusedOptimizer
from ..optimizers.aesam import AESAM
from ..optimizers.friendlysam import FriendlySAM


def unwrap(optimizer: Any) -> FusedOptimizer:
    """The fastsam optimizer inside a framework's wrapper: Accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer`` (each holds the optimizer it
    wraps as ``.optimizer``), or the optimizer itself.

    Use the unwrapped optimizer for :meth:`first_step` and :meth:`second_step` (a
    ``LightningOptimizer`` copies the optimizer's attributes, so a step begun on it would not be
    seen by the optimizer it wraps); keep stepping through the wrapper where the framework
    needs it to (Accelerate's and Lightning's ``step()`` apply their GradScaler).

    Raises:
        TypeError: no fastsam optimizer is inside ``optimizer``.
    """
    found = optimizer
    for _ in range(16):  # wrappers nest a few levels at most
        inner = getattr(found, "optimizer", None)
        if not isinstance(inner, Optimizer) or inner is found:
            break
        found = inner
    if not isinstance(found, FusedOptimizer):
        raise TypeError(
            f"expected a fastsam optimizer (fastsam.SAM, ASAM, GSAM, LookSAM, FreeSAM, ...) or a "
            f"framework's wrapper around one, got {type(optimizer).__name__}"
            + (f" around {type(found).__name__}" if found is not optimizer else "")
        )
    return found


def report_amp_skip(wrapper: Any, skipped_before: int) -> None:
    """Tell Accelerate's ``AcceleratedOptimizer`` that its last ``step()`` was skipped by the
    GradScaler when the fastsam optimizer inside counted a skip since ``skipped_before``.

    The scaler leaves the skip to a fastsam optimizer (it restores the weights and counts it in
    ``amp_skipped_steps``) rather than not calling ``step()``, which is how Accelerate detects
    one; its ``step_was_skipped``, which ``AcceleratedScheduler`` and the Hugging Face Trainer
    read before advancing the lr schedule, would otherwise say the step was taken."""
    if hasattr(wrapper, "_is_overflow") and unwrap(wrapper).amp_skipped_steps > skipped_before:
        wrapper._is_overflow = True


def begin_sam_step(sam: FusedOptimizer, scaler: Any) -> Any:
    """``sam.first_step(zero_grad=True)`` in a framework's loop, given the framework's GradScaler
    (None without one); returns what it returns: False when no second pass follows (another
    SAM's first_step may return None). FriendlySAM keeps a momentum of
    unscaled gradients and AE-SAM decides from the unscaled ‖g‖², so they are told the loss
    scale the first pass's gradients carry; AE-SAM always gets one (1 without a scaler), which
    leaves a plain step to the framework's ``optimizer.step()``, after its gradient clipping and
    under its scaler."""
    scaled = scaler is not None and scaler.is_enabled()
    if isinstance(sam, AESAM):
        return sam.first_step(zero_grad=True, grad_scale=scaler.get_scale() if scaled else 1.0)
    if isinstance(sam, FriendlySAM) and scaled:
        return sam.first_step(zero_grad=True, grad_scale=scaler.get_scale())
    return sam.first_step(zero_grad=True)


__all__ = ["unwrap", "report_amp_skip", "begin_sam_step"]
