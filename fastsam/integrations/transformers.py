"""``SAMTrainer``: the Hugging Face ``transformers.Trainer`` running a fastsam optimizer's two
passes per optimizer step.

    from fastsam.integrations.transformers import SAMTrainer

    trainer = SAMTrainer(model=model, args=args, train_dataset=data,
                         sam_class=fastsam.SAM, sam_kwargs={"rho": 0.05})
    trainer.train()

How a step runs (docs/trainers.md, "Hugging Face Trainer"): the Trainer makes the first
forward/backward of every micro-batch as usual (its loss is the one logged). After the last
micro-batch of an optimizer step, :meth:`SAMTrainer.training_step` calls ``first_step()`` and
runs the second forward/backward over the same micro-batches, with the same loss
normalisation, BatchNorm statistics frozen and DDP's all-reduce on the last one only. The
Trainer then clips the gradients of the second pass (``max_grad_norm``) and calls
``optimizer.step()``, which is fastsam's second step (through the GradScaler under fp16).
FreeSAM takes its one pass; LookSAM's look-ahead steps take no second pass.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..batchnorm import frozen_bn_stats
from ..distributed import local_pass
from ..optimizers import MSAM, SAM
from ..optimizers._base import SharpnessAwareOptimizer
from ..optimizers._core import FusedOptimizer
from . import begin_sam_step, report_amp_skip, unwrap


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer steps are sharpness-aware.

    Takes every argument of ``Trainer``, plus:

    Args:
        sam_class: the fastsam optimizer class to build over the Trainer's own optimizer
            (``args.optim`` and its parameter groups, weight-decay split included), used when
            ``optimizers=`` gives no optimizer. Default :class:`fastsam.SAM`.
        sam_kwargs: its keyword arguments (``rho``, ``adaptive``, ``backend``, ...).
        sam_per_worker: under DDP, perturb each worker along its own gradient (per-worker SAM,
            the paper's m-sharpness: the first pass is not all-reduced); default False, global
            SAM (both passes all-reduced, the step one process would take on the whole batch).

    Or pass any fastsam optimizer as ``optimizers=(optimizer, scheduler)``.

    Notes:
        The Trainer's default ``optim="adamw_torch_fused"`` builds ``AdamW(fused=True)``,
        whose update fastsam leaves to torch after an exact restore; ``optim="adamw_torch"``
        lets fastsam fuse the restore with the AdamW update (one pass).
    """

    def __init__(
        self,
        *args: Any,
        sam_class: type[FusedOptimizer] | None = None,
        sam_kwargs: dict[str, Any] | None = None,
        sam_per_worker: bool = False,
        **kwargs: Any,
    ) -> None:
        if sam_class is not None and not (
            isinstance(sam_class, type) and issubclass(sam_class, FusedOptimizer)
        ):
            raise TypeError(
                f"sam_class must be a fastsam optimizer class (fastsam.SAM, ASAM, GSAM, "
                f"LookSAM, FreeSAM), got {sam_class!r}"
            )
        if not isinstance(sam_per_worker, bool):
            raise TypeError(f"sam_per_worker must be True or False, got {sam_per_worker!r}")
        super().__init__(*args, **kwargs)
        if self.optimizer is not None:
            if sam_class is not None or sam_kwargs:
                raise ValueError(
                    "SAMTrainer got both an optimizer (optimizers=) and sam_class/sam_kwargs: "
                    "give one; sam_class builds the optimizer over the Trainer's own choice"
                )
            unwrap(self.optimizer)  # TypeError when it is not a fastsam optimizer
        self.sam_class = SAM if sam_class is None else sam_class
        self.sam_kwargs = dict(sam_kwargs or {})
        self.sam_per_worker = sam_per_worker
        self._sam_window: list[tuple[Any, Any]] = []
        self.add_callback(_SchedulerFollowsAmpSkips())

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (``args.optim``, its parameter groups and weight-decay
        split), wrapped as the base optimizer of ``sam_class(**sam_kwargs)``."""
        if self.optimizer is None:
            base = super().create_optimizer(model)
            params = [p for group in base.param_groups for p in group["params"]]
            self.optimizer = self.sam_class(params, base, **self.sam_kwargs)
        return self.optimizer

    def _perturbing_optimizer(self) -> Any:
        """The optimizer whose ``first_step()`` this trainer calls, or None when its steps
        take one pass (FreeSAM)."""
        sam = unwrap(self.optimizer)
        return sam if isinstance(sam, SharpnessAwareOptimizer) else None

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The Trainer's forward/backward of one micro-batch; after the last micro-batch of an
        optimizer step, ``first_step()`` and the second pass over the step's micro-batches.
        Returns the first pass's loss (the one the Trainer logs)."""
        sam = self._perturbing_optimizer()
        if sam is None:  # FreeSAM: one pass per step
            return super().training_step(model, inputs, num_items_in_batch)
        with local_pass(model) if self.sam_per_worker else nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._sam_window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:  # more micro-batches to come in this step
            return loss
        window, self._sam_window = self._sam_window, []
        if not getattr(sam, "sam_step_next", True):
            return loss  # LookSAM's look-ahead step: optimizer.step() takes it whole
        if begin_sam_step(sam, self.accelerator.scaler) is False:
            return loss  # AE-SAM's plain step: optimizer.step() makes its update
        with frozen_bn_stats(model):
            for i, (micro_batch, items) in enumerate(window):
                last = i == len(window) - 1
                with nullcontext() if last else self.accelerator.no_sync(model):
                    super().training_step(model, micro_batch, items)
        return loss


    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's evaluation; with MSAM, whose parameters hold the perturbed weights
        between steps, at the unperturbed weights (swapped in for the evaluation only)."""
        sam = unwrap(self.optimizer) if self.optimizer is not None else None
        with sam.unperturbed_weights() if isinstance(sam, MSAM) else nullcontext():
            return super().evaluate(*args, **kwargs)


class _SchedulerFollowsAmpSkips(TrainerCallback):
    """Under the GradScaler, a step the scaler skips must not advance the lr schedule: the
    Trainer reads Accelerate's ``step_was_skipped``, which :func:`report_amp_skip` sets."""

    def __init__(self) -> None:
        self._skipped = 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self._skipped = unwrap(optimizer).amp_skipped_steps

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            report_amp_skip(optimizer, self._skipped)


__all__ = ["SAMTrainer"]
