"""Skip decisions (GradScaler's found_inf, ``skip_nonfinite``) and the counts a state dict
carries, on the host or, with ``capturable``, on the device (docs/design.md §5, §8;
docs/amp.md)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from ..functional import Backend

# Positions in the device counts (capturable).
AMP, NONFINITE, UPDATES, AVERAGED = range(4)


class Counters:
    """Updates made, snapshots averaged and updates skipped (GradScaler's, ``skip_nonfinite``'s).

    On the host as numbers; with ``capturable``, after the first count, as one fp64 device
    tensor ``[GradScaler's skips, skip_nonfinite's skips, updates, snapshots averaged]`` (what a
    replayed CUDA graph advances): the skips since construction or the last load, and the
    updates and snapshots in all, started from the host's numbers."""

    def __init__(self) -> None:
        self.updates = 0
        self.n_averaged = 0
        self.amp_skipped = 0
        self.nonfinite_skipped = 0
        self.device_counts: Tensor | None = None

    def on_device(self, device: torch.device) -> Tensor:
        """capturable: the device counts, made on first use."""
        counts = self.device_counts
        if counts is None:
            counts = torch.tensor([0, 0, self.updates, self.n_averaged], dtype=torch.float64)
        if counts.device != device:
            counts = counts.to(device)
        self.device_counts = counts
        return counts

    def read(self) -> dict[str, int]:
        """The counts as numbers; with device counts, read from the device (waits for it)."""
        if self.device_counts is None:
            amp = nonfinite = 0
            updates, n_averaged = self.updates, self.n_averaged
        else:
            amp, nonfinite, updates, n_averaged = (int(v) for v in self.device_counts.tolist())
        return {
            "updates": updates,
            "n_averaged": n_averaged,
            "amp_skipped": self.amp_skipped + amp,
            "nonfinite_skipped": self.nonfinite_skipped + nonfinite,
        }

    def load(self, counters: dict[str, Any]) -> None:
        """The counts of a loaded state dict (zero where it has none: a plain base optimizer's
        state dict); device counts start again from them."""
        self.device_counts = None
        self.updates = int(counters.get("updates", 0))
        self.n_averaged = int(counters.get("n_averaged", 0))
        self.amp_skipped = int(counters.get("amp_skipped", 0))
        self.nonfinite_skipped = int(counters.get("nonfinite_skipped", 0))


class SkipPolicy:
    """Whether an update goes ahead: decided on the host, or with ``capturable`` as a device
    flag the update kernels read.

    Args:
        skip_nonfinite: without a GradScaler, skip updates whose gradients (or the first pass's
            perturbation norm) hold inf/NaN.
        capturable: decide on the device (no host read).
        counters: where skips are counted.
    """

    def __init__(self, skip_nonfinite: bool, capturable: bool, counters: Counters) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.capturable = capturable
        self.counters = counters
        self.perturb_skipped: Tensor | None = None  # pass B's flag: the norm was not finite
        self._flag_device: torch.device | None = None  # its device (a tensor's .device makes
        # a new device object at each read: ~0.3 us)
        self._found: Tensor | None = None  # skip_nonfinite's flag, on the device
        self._one: Tensor | None = None  # its check's unscale factor, 1
        self._found_device: torch.device | None = None
        self._inverses: dict[tuple, Tensor] = {}  # 1/loss scale per (device, dtype): _inverse

    def perturb_flag(self, device: torch.device) -> Tensor:
        """The 0-d fp32 flag the perturb pass sets (1: the norm was not finite)."""
        if self.perturb_skipped is None or self._flag_device != device:
            self.perturb_skipped = torch.zeros((), dtype=torch.float32, device=device)
            self._flag_device = device
        return self.perturb_skipped

    def decide(
        self,
        scaler: tuple[Tensor | None, Tensor | None],
        grads: Gradients,
        after_perturb: bool,
        device: torch.device | None,
        on_host: bool = False,
    ) -> bool | Tensor:
        """At the start of an update: True when it must be skipped for inf/NaN gradients,
        False when it goes ahead, or, with ``capturable`` (unless ``on_host``), the 0-d fp32
        device flag the update kernels read instead (False when nothing can skip it).

        ``scaler``: GradScaler's ``(grad_scale, found_inf)`` (its protocol sets them on the
        optimizer around ``step()``). Under GradScaler: skip when the scaler found inf/NaN in
        this step's gradients (read on the host, one sync per step, as torch.optim's optimizers
        make under GradScaler; the flag itself with ``capturable``), and divide ``grads`` (with
        the first pass's gradients the update combines with them) by the loss scale, on the
        device. Without a scaler and with ``skip_nonfinite``: skip when a gradient of this pass
        or, ``after_perturb``, the first pass's perturbation norm is inf/NaN (``device``: that
        of the gradients)."""
        scale, found_inf = scaler
        flag: Tensor | None = None
        on_device = self.capturable and not on_host
        if found_inf is not None and on_device:
            flag = self._count_on_device(AMP, found_inf, device)
        elif found_inf is not None and bool(found_inf.item()):
            self.counters.amp_skipped += 1
            return True
        if scale is None:
            if found_inf is None and self.skip_nonfinite:
                found = self._nonfinite(grads, after_perturb)
                if found is None:
                    return False
                if on_device:
                    return self._count_on_device(NONFINITE, found, device)
                if bool(found.item()):
                    self.counters.nonfinite_skipped += 1
                    return True
            return False if flag is None else flag
        grads.scale(lambda where, dtype: self._inverse(scale, where, dtype))
        return False if flag is None else flag

    def _inverse(self, scale: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        """1/scale (formed in fp64 on the scale's device, then rounded once) as a 0-d tensor of
        ``dtype`` on ``device``, in buffers kept between steps: no allocation, no host read."""
        inverses = self._inverses
        wide = inverses.get((scale.device, torch.float64))
        if wide is None:
            wide = inverses[scale.device, torch.float64] = torch.empty(
                (), dtype=torch.float64, device=scale.device)
        torch.reciprocal(wide.copy_(scale.reshape(())), out=wide)
        if (device, dtype) == (scale.device, torch.float64):
            return wide
        out = inverses.get((device, dtype))
        if out is None:
            out = inverses[device, dtype] = torch.empty((), dtype=dtype, device=device)
        return out.copy_(wide, non_blocking=True)

    def _count_on_device(self, which: int, flag: Tensor, device: torch.device | None) -> Tensor:
        """capturable: add the device flag (0 or 1) to skip counter ``which`` on the device,
        and return it as the 0-d fp32 flag the kernels read (on the parameters' device)."""
        flag = flag.reshape(()).to(device=device or flag.device, dtype=torch.float32,
                                   non_blocking=True)
        self.counters.on_device(flag.device)[which].add_(flag)
        return flag

    def _nonfinite(self, grads: Gradients, after_perturb: bool) -> Tensor | None:
        """skip_nonfinite's test: a one-element device flag, 1 when a gradient is inf/NaN or,
        ``after_perturb``, the first pass's norm was, else 0 (None without gradients). One fused
        check per dtype (torch's GradScaler kernel, with an unscale by exactly 1), summed over
        the shards of sharded parameters."""
        device = grads.device
        if device is None:
            return None
        if self._found is None or self._found_device != device:  # (see _flag_device)
            self._found = torch.zeros(1, dtype=torch.float32, device=device)
            self._one = torch.ones(1, dtype=torch.float32, device=device)
            self._found_device = device
        found = self._found
        if after_perturb and self.perturb_skipped is not None:
            found.copy_(self.perturb_skipped)  # 1 when the first pass's norm was not finite
        else:
            found.zero_()
        grads.check_nonfinite(found, self._one)  # (sets 1, never adds: found stays 0 or 1)
        return grads.any_over_shards(found)


class Gradients(Protocol):
    """The gradients of an update as :meth:`SkipPolicy.decide` reads and unscales them: Python
    lists (:class:`GradientLists`, the general path) or a held plan's
    (fastsam/optimizers/_held.py)."""

    device: torch.device | None  # None: no gradients

    def check_nonfinite(self, found: Tensor, one: Tensor) -> None:
        """torch's GradScaler kernel over the gradients, per dtype: ``found`` set to 1 when
        one holds inf/NaN (``one``: the unscale factor, 1)."""

    def scale(self, factor: Callable[[torch.device, torch.dtype], Tensor]) -> None:
        """Every gradient times ``factor(device, dtype)`` of its own, in place."""

    def any_over_shards(self, found: Tensor) -> Tensor:
        """``found`` (0 or 1) made 1 where any shard of sharded parameters found one (in
        place)."""


class GradientLists:
    """:class:`Gradients` as lists: ``grads`` and ``kept`` (the first pass's gradients an
    update combines with them: unscaled with them, not checked), on ``backend``."""

    def __init__(self, grads: list[Tensor], kept: list[Tensor], backend: Backend | None) -> None:
        self.grads, self.kept, self.backend = grads, kept, backend
        self.device = grads[0].device if grads else None

    def check_nonfinite(self, found: Tensor, one: Tensor) -> None:
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in self.backend.local(self.grads):
            by_dtype.setdefault(g.dtype, []).append(g)
        for tensors in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)

    def scale(self, factor: Callable[[torch.device, torch.dtype], Tensor]) -> None:
        by_dtype: dict[tuple, list[Tensor]] = {}
        for t in self.grads + self.kept:
            by_dtype.setdefault((t.device, t.dtype), []).append(t)
        for (where, dtype), tensors in by_dtype.items():
            torch._foreach_mul_(tensors, factor(where, dtype))

    def any_over_shards(self, found: Tensor) -> Tensor:
        return self.backend.any_over_shards(found)
