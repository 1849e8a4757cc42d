"""What the benchmark measures, one function each: step times, copy bandwidth, launches and
allocations per step, memory an optimizer holds."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def timed_step(loop, device: torch.device, reps: int, warmup: int) -> list[float]:
    """Seconds per step of a :class:`fastsam.bench.run.Loop`, its optimizer calls only (CUDA
    events around each call on a GPU, perf_counter on CPU): the gradients it prepares before each
    pass and what it does after the step are not timed."""
    out = []
    for rep in range(warmup + reps):
        total, events = 0.0, []
        for i, call in enumerate(loop.calls):
            loop.prepare(i)
            if device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                start.record()
                call()
                end.record()
                events.append((start, end))
            else:
                t0 = time.perf_counter()
                call()
                total += time.perf_counter() - t0
        loop.finish()
        if events:
            events[-1][1].synchronize()
            total = sum(start.elapsed_time(end) for start, end in events) / 1e3
        if rep >= warmup:
            out.append(total)
    return out


def copy_bandwidth(numel: int, device: torch.device, reps: int) -> float:
    """Bytes read + written per second by a same-device copy of ``numel`` fp32 elements."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = timed(lambda: dst.copy_(src), device, max(reps, 3), warmup=2)
    return 8 * numel / statistics.median(times)


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """Kernel launches (CUDA profiler) or aten/fastsam operators dispatched (CPU) in one call."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return count_operators(fn)[0]


def _storages(tree) -> set[int]:
    return {
        t.untyped_storage().data_ptr()
        for t in torch.utils._pytree.tree_leaves(tree)
        if isinstance(t, torch.Tensor)
    }


def count_operators(fn: Callable[[], object]) -> tuple[int, int, int]:
    """(operators dispatched, tensors they allocated, bytes allocated) during one call of fn.

    An output counts as an allocation when its storage is none of the operator's inputs'
    (in-place and view outputs share one). On CPU this is the allocator's view of a step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    totals = [0, 0, 0]

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            inputs = _storages((args, kwargs))
            totals[0] += 1
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    totals[1] += 1
                    totals[2] += t.untyped_storage().nbytes()
            return out

    with Counter():
        fn()
    return totals[0], totals[1], totals[2]


def cuda_allocations(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """(allocations, bytes) the CUDA caching allocator served during one call of fn."""
    sync(device)
    before = torch.cuda.memory_stats(device)
    fn()
    sync(device)
    after = torch.cuda.memory_stats(device)
    key_n, key_b = "allocation.all.allocated", "allocated_bytes.all.allocated"
    return after.get(key_n, 0) - before.get(key_n, 0), after.get(key_b, 0) - before.get(key_b, 0)


_WALKED_MODULES = ("fastsam", "torch.optim", "pytorch_optimizer")


def held_bytes(root: object, exclude: set[int]) -> int:
    """Bytes of every tensor storage reachable from ``root`` through containers and the
    attributes of optimizer objects (fastsam's, torch.optim's, the reference
    implementations'), each storage once, leaving out the storages in ``exclude`` (the
    parameters and their gradients)."""
    seen, total = set(exclude), 0
    stack, visited = [root], set()
    while stack:
        obj = stack.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif type(obj).__module__.startswith(_WALKED_MODULES) and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total
