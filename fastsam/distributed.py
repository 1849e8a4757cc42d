"""SAM under DistributedDataParallel, in its two modes.

Global SAM (the default, nothing to do): both backward passes are all-reduced by DDP, so every
worker perturbs along the same global gradient and takes the same step: the numbers of one
process over the whole batch.

Per-worker SAM (the paper's m-sharpness, m = the per-worker batch): each worker perturbs along
its own gradient, and only the second pass is all-reduced. DDP decides during the *forward*
pass whether the next backward synchronises, so the first forward must run inside
``no_sync()`` too, not only its backward (putting only ``backward()`` there still
all-reduces). :func:`local_pass` is that context::

    with fastsam.local_pass(model):            # forward and backward: no all-reduce
        loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)       # each worker's own perturbation
    loss_fn(model(x), y).backward()            # all-reduced as usual
    optimizer.second_step(zero_grad=True)      # the same update on every worker
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


@contextmanager
def local_pass(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context for per-worker SAM's first pass: the forward and backward run inside it are not
    all-reduced by DDP (``model.no_sync()``). Any other model (no DDP) is left as it is."""
    no_sync = getattr(model, "no_sync", None)
    with no_sync() if callable(no_sync) else nullcontext():
        yield model
