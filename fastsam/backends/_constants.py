"""What the fused backends (triton, cpu, cuda) share: the one cache policy (an LRU), the hold
on what CUDA graphs read, uploads, and scalar hyper-parameters as small fp64 arrays on the
parameters' device (docs/design.md §7).

Kernels read scalars from memory rather than from launch arguments: values stay fp64 (Triton
would round Python floats to fp32) and a tensor value (an lr given as a tensor) is copied in on
the device, never read by the host.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

CACHE_SIZE = 32

# What captured CUDA graphs read, kept for the rest of the process (see held_for_graphs).
_HELD_FOR_GRAPHS: dict[int, object] = {}


# The plain numbers' types: a value of one is no tensor, told without isinstance(v, Tensor),
# which goes through Tensor's metaclass (~0.1 us a value, several values a step).
_NUMBERS = frozenset((float, int, bool))


def any_tensor(values: tuple | list) -> bool:
    """Whether a value of ``values`` is a tensor (the others are numbers)."""
    for v in values:
        if type(v) not in _NUMBERS and isinstance(v, Tensor):
            return True
    return False


def capturing() -> bool:
    """Whether work queued now is being captured into a CUDA graph (a host-side query, no
    synchronisation; False wherever CUDA was never initialised)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def held_for_graphs(obj):
    """``obj``, kept alive for the rest of the process when it is used during a CUDA graph
    capture; returned as is.

    A graph bakes in the addresses its kernels and copies read (segment tables, constant arrays,
    scratch buffers, the pinned staging copy of an upload) and reads them again at every replay.
    Once a cache evicted one, or a bigger buffer replaced one, the allocators would hand its
    memory to another tensor and replays would read that tensor's bytes. What a captured step
    holds is small: its tables and scalar arrays, each object once.
    """
    if capturing():
        _HELD_FOR_GRAPHS.setdefault(id(obj), obj)
    return obj


def upload(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without making the host wait."""
    if device.type == "cpu":
        return host
    # Pinned + non_blocking: the copy is queued on the stream, the host does not wait. A fresh
    # pinned tensor per upload: the caching host allocator keeps it alive until the copy is done
    # (a captured copy reads it again at every replay: then it is kept for good).
    return held_for_graphs(host.pin_memory()).to(device, non_blocking=True)


class LRUCache(OrderedDict):
    """The backends' cache policy: at most ``capacity`` entries, the least recently used one
    evicted first; an entry used during a CUDA graph capture is also held for good
    (:func:`held_for_graphs`), whatever the cache later evicts."""

    def __init__(self, capacity: int = CACHE_SIZE) -> None:
        super().__init__()
        self.capacity = capacity

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
        value = self.get(key)
        if value is None:
            value = self[key] = build()
            if len(self) > self.capacity:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return held_for_graphs(value)


class ConstantArrays:
    """fp64 device arrays of scalar values, one per distinct tuple of values (an
    :class:`LRUCache`: an lr schedule makes a new tuple every step, a fixed configuration
    uploads once).

    Tensor values (an lr given as a tensor: capturable mode) are copied on the device into the
    array kept for the tuple's other values and those positions, at each call: no allocation,
    no host read. Calls queued on one stream read the array in order, so one array serves
    every call with the same numbers."""

    def __init__(self) -> None:
        self._arrays = LRUCache()
        # the array of the last call when its values were all numbers: the same values again
        # (a fixed rho at every step) take it without a lookup (it is the LRU's newest entry)
        self._last: tuple | None = None

    def __call__(self, values: tuple, device: torch.device) -> Tensor:
        if any_tensor(values):
            return self._with_tensors(values, device)
        last = self._last  # (numbers only: a tensor is never compared on the host)
        if (last is not None and last[0] == values and last[1] == device
                and (last[3] or not capturing())):  # (last[3]: on the CPU, never captured)
            return last[2]
        array = self._arrays.get_or_build(
            (values, device), lambda: upload(torch.tensor(values, dtype=torch.float64), device)
        )
        # (device.type makes a new string at each read: ~0.3 us, read once here)
        self._last = (values, device, array, device.type == "cpu")
        return array

    def _with_tensors(self, values: tuple, device: torch.device) -> Tensor:
        """The array of ``values`` some of which are tensors: copied in on the device."""
        tensors = [(i, v) for i, v in enumerate(values) if isinstance(v, Tensor)]
        numbers = tuple(0.0 if isinstance(v, Tensor) else v for v in values)
        slots = tuple(i for i, _ in tensors)
        array = self._arrays.get_or_build(
            (numbers, slots, device),
            lambda: upload(torch.tensor(numbers, dtype=torch.float64), device),
        )
        for i, v in tensors:
            array[i].copy_(v.reshape(()), non_blocking=True)
        self._last = None
        return array


def dense(t: Tensor) -> bool:
    """Whether ``t`` covers its memory without gaps or overlaps (any memory format; an empty
    tensor has no memory to walk): the tensors whose storage order the passes walk (the torch
    backend's ESAM mask follows the same order)."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(
        ((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda d: d[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True
