"""``SAMMixin``: Lightning's automatic optimization running a fastsam optimizer's two passes.

    import lightning as L
    from fastsam.integrations.lightning import SAMMixin

    class Model(SAMMixin, L.LightningModule):      # SAMMixin first
        def configure_optimizers(self):
            return fastsam.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

Lightning calls ``optimizer.step(closure)`` with no backward pass before it, and its closure
makes one (``training_step``, ``zero_grad``, ``backward``). The mixin's ``optimizer_step`` hands
the step a closure that runs Lightning's twice around ``first_step()``: the first pass at w, the
perturbation, the second pass at w + e with BatchNorm statistics frozen. Lightning's gradient
clipping and ``on_before_optimizer_step`` then see the second pass's gradients, and the update
(fastsam's second step, through the GradScaler under ``precision="16-mixed"``) follows. A
fastsam optimizer stepped by automatic optimization without the mixin raises at its first step
instead of running another algorithm (docs/trainers.md, "Lightning").
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..batchnorm import frozen_bn_stats
from ..optimizers._base import SharpnessAwareOptimizer
from . import begin_sam_step, unwrap


class SAMMixin:
    """Mixin for a ``LightningModule`` (list it first among the bases) whose optimizer is a
    fastsam optimizer: each optimizer step runs both passes of SAM, ASAM, GSAM or LookSAM
    (LookSAM's look-ahead steps: the first only); FreeSAM and other optimizers step as
    Lightning steps them.

    ``training_step`` runs twice on a SAM step; what it logs with ``self.log`` in the second
    pass is dropped, so logged values (and the loss Lightning reports) are the first pass's,
    at the unperturbed weights. Gradient accumulation by ``Trainer(accumulate_grad_batches=k)``
    is refused (Lightning steps only after the last micro-batch, too late for a second pass
    over the others): use manual optimization for it.
    """

    _fastsam_second_pass = False

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        sam = unwrap(optimizer) if _holds_fastsam(optimizer) else None
        if not isinstance(sam, SharpnessAwareOptimizer) or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        accumulate = getattr(self.trainer, "accumulate_grad_batches", 1)
        if accumulate != 1:
            raise RuntimeError(
                f"SAMMixin cannot run SAM with Trainer(accumulate_grad_batches={accumulate}): "
                "Lightning steps after the last micro-batch only, too late for a second pass "
                "over the others. Use manual optimization with accumulation inside "
                "training_step (docs/trainers.md, Lightning)."
            )

        def both_passes() -> Any:
            loss = optimizer_closure()
            if loss is None or not getattr(sam, "sam_step_next", True):
                return loss  # a skipped batch, or LookSAM's look-ahead step: one pass
            first = getattr(optimizer_closure, "_result", None)
            if begin_sam_step(sam, getattr(self.trainer.precision_plugin, "scaler", None)) is False:
                return loss  # AE-SAM's plain step: one pass, the update in step()
            self._fastsam_second_pass = True
            try:
                with frozen_bn_stats(self):
                    optimizer_closure()
            finally:
                self._fastsam_second_pass = False
            if first is not None:  # what Lightning reports for this batch: the first pass
                optimizer_closure._result = first
            return loss

        with sam._closure_makes_the_passes():
            optimizer.step(closure=both_passes)

    def log(self, *args: Any, **kwargs: Any) -> None:
        if self._fastsam_second_pass:
            return  # the second pass's values are those of w + e: not logged
        super().log(*args, **kwargs)


def _holds_fastsam(optimizer: Any) -> bool:
    try:
        unwrap(optimizer)
    except TypeError:
        return False
    return True


__all__ = ["SAMMixin"]
