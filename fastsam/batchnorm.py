"""Freezing BatchNorm running statistics during SAM's second forward pass.

The second forward pass runs at the perturbed weights w + e; letting BatchNorm update its
running mean/variance there would blend statistics of a model that is never deployed. While
frozen, BatchNorm layers still normalise with the batch statistics (training behaviour) but
leave ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def disable_running_stats(model: torch.nn.Module) -> None:
    """Stop every BatchNorm layer of ``model`` from updating its running statistics."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not hasattr(module, "_fastsam_tracking"):
            module._fastsam_tracking = module.track_running_stats
            module.track_running_stats = False


def enable_running_stats(model: torch.nn.Module) -> None:
    """Undo :func:`disable_running_stats`."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and hasattr(module, "_fastsam_tracking"):
            module.track_running_stats = module._fastsam_tracking
            del module._fastsam_tracking


@contextmanager
def frozen_bn_stats(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context manager: BatchNorm running statistics of ``model`` are frozen inside.

    Example:
        >>> import torch, fastsam
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
        >>> with fastsam.frozen_bn_stats(model):
        ...     _ = model(torch.randn(4, 3))
        >>> int(model[1].num_batches_tracked)
        0
    """
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)
