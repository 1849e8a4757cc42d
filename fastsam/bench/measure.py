"""What the benchmark measures, one function each: step times, streaming rates, launches and
allocations per step, memory an optimizer holds."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor


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


# The streaming kernels of the floor and the fp32 bytes each moves per element.
STREAM_BYTES = {"read": 4, "write": 4, "triad": 12, "update": 20}


def stream_kernels(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> tuple[dict, str]:
    """The streaming kernels over the contiguous fp32 arrays ``a``, ``b``, ``c``, ``d`` (of
    one size and device; ``a`` and ``d`` are written), by name (:data:`STREAM_BYTES`), and
    whose they are: ``fastsam._C``'s (csrc/kernels.h), ``read`` a read-only reduction over
    several streams; ``write`` a store-only fill (stores that skip the cache where the CPU
    has them, as the passes write the lists they do not read); ``triad`` a = b + s·c;
    ``update`` the update pass's shape, SGD momentum's (reads three lists, writes one in place
    and one it does not read: d ← s·d + c, a ← b − s·d). Without the extension, torch's
    operators stand in, ``"torch"`` (and a floor is then only as good as they are)."""
    out = torch.zeros((), dtype=torch.float64, device=a.device)
    try:
        import fastsam._C  # noqa: F401
    except (ImportError, OSError):
        def update() -> None:
            d.mul_(0.5).add_(c)
            torch.add(b, d, alpha=-0.5, out=a)

        return {"read": lambda: torch.sum(a, 0, dtype=torch.float64, out=out),
                "write": lambda: a.fill_(1.0),
                "triad": lambda: torch.add(b, c, alpha=0.5, out=a),
                "update": update}, "torch"
    ops = torch.ops.fastsam
    return {"read": lambda: ops.stream_read(a, out), "write": lambda: ops.stream_fill(a, 1.0),
            "triad": lambda: ops.stream_triad(a, b, c, 0.5),
            "update": lambda: ops.stream_update(a, b, c, d, 0.5)}, "fastsam._C"


def stream_rates(numel: int, device: torch.device, reps: int) -> dict:
    """Bytes per second of the streaming kernels (:func:`stream_kernels`) over ``numel`` fp32
    elements, by name, and ``kernels``, whose ran. Each rate is the fastest of at least 10
    runs: the speed the memory allows, not a typical one (a floor from medians would be beaten
    by a pass that runs when the machine is quieter)."""
    kernels, whose = stream_kernels(*(torch.rand(numel, device=device) for _ in range(4)))
    # In rounds of one run each, so that a slow spell of a shared machine slows every kernel
    # in some rounds rather than all the runs of one kernel.
    seconds = dict.fromkeys(kernels, math.inf)
    for fn in kernels.values():
        timed(fn, device, 0, warmup=2)
    for _ in range(max(reps, 10)):
        for name, fn in kernels.items():
            seconds[name] = min(seconds[name], timed(fn, device, 1, warmup=0)[0])
    return {**{name: STREAM_BYTES[name] * numel / s for name, s in seconds.items()},
            "kernels": whose}


def fastest_rates(*measured: dict) -> dict:
    """Each rate at the fastest of several stream_rates measurements (the benchmark measures
    before every row and after the last: the floor is then the memory's speed over the run)."""
    out = dict(measured[0])
    for m in measured[1:]:
        out.update({k: max(out[k], m[k]) for k in STREAM_BYTES})
    return out


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """Kernel launches (CUDA profiler) or, on the CPU, aten/fastsam operators dispatched plus
    the passes run over held plans (fastsam's C++ plan methods, not dispatched: counted by
    their profiler events; docs/design.md §5), in one call each."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return count_operators(fn)[0] + count_held_passes(fn)


def count_held_passes(fn: Callable[[], object]) -> int:
    """Passes run over held plans in one call of fn (csrc/binding/held.h records each)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("fastsam::held_"))


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
