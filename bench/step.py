"""Optimizer-step benchmark: first_step + second_step (no forward/backward), side by side.

    python bench/step.py                       # resnet50 on the best device present
    python bench/step.py --sets resnet50 gpt2-medium --out bench/results/step-h100.json

Providers: ``sgd`` (a plain torch.optim.SGD momentum step, the cost SAM wraps: its floor is
20 B/element), ``popular`` (bench/popular_sam.py, a faithful re-implementation of the popular
per-parameter SAM), and every fastsam backend usable on the device (torch, triton, cpu,
cuda). ``--optimizer gsam`` times fastsam.GSAM beside ``official`` (bench/official_gsam.py, a
re-implementation of the official GSAM) instead. Base optimizer: SGD with momentum (fused into
fastsam's restore pass). Reported per
provider: median and spread (p10-p90) of the step time, speed-up over the reference, the
bytes-moved floor from a copy bandwidth measured in the same run, the ratio to it, kernel
launches per step (CUDA profiler; on CPU: aten ops dispatched), and on CUDA the peak extra
memory of a step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_gsam import OfficialGSAM  # noqa: E402
from param_sets import SETS  # noqa: E402
from popular_sam import PopularSAM  # noqa: E402

import fastsam  # noqa: E402

# fp32 SAM + SGD momentum, bytes per element (DESIGN.md §2): norm reads g (4), perturb reads w, g
# and writes w, w_old (16), restore+update reads w_old, g, buf and writes w, buf (20). The plain
# SGD step alone reads w, g, buf and writes w, buf (20).
FLOOR_BYTES_PER_ELEMENT = 40
# GSAM (DESIGN.md §2): SAM's 40 plus g kept in the perturb pass (4), one reduction pass over g
# and g_adv (8), and g read again by the fused restore+update (4).
GSAM_FLOOR_BYTES_PER_ELEMENT = 56
SGD_BYTES_PER_ELEMENT = 20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps, warmup):
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


def copy_bandwidth(numel, device, reps):
    """Bytes read + written per second by a device-to-device copy of ``numel`` fp32 elements."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = timed(lambda: dst.copy_(src), device, reps, warmup=3)
    return 8 * numel / statistics.median(times)


def count_launches(fn, device):
    """Kernel launches (CUDA) or aten ops dispatched (CPU) during one call of fn."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.n


def make_provider(name, shapes, device, gen, optimizer="sam"):
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    if name == "sgd":  # the plain base optimizer step that SAM wraps (torch.optim's default)
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        return opt.step, params
    kw = dict(rho=0.05, lr=0.01, momentum=0.9)
    if optimizer == "gsam":
        kw["alpha"] = 0.4
    if name == "popular":
        opt = PopularSAM(params, torch.optim.SGD, **kw)
    elif name == "official":
        opt = OfficialGSAM(params, torch.optim.SGD, **kw)
    elif optimizer == "gsam":
        opt = fastsam.GSAM(params, torch.optim.SGD, backend=name, **kw)
    else:
        opt = fastsam.SAM(params, torch.optim.SGD, backend=name, **kw)

    def step():
        opt.first_step()
        opt.second_step()

    return step, params


def providers_for(device, optimizer="sam"):
    """``sgd`` (plain torch.optim.SGD step, for scale), the reference implementation
    (``popular`` SAM, or the ``official`` GSAM), and every fastsam backend usable on
    ``device``."""
    from fastsam.backends import BACKENDS, _refusal

    reference = "official" if optimizer == "gsam" else "popular"
    return ["sgd", reference] + [b for b in BACKENDS if _refusal(b, device) is None]


def run(set_name, device, reps, bandwidth, optimizer="sam"):
    shapes = SETS[set_name]()
    numel = sum(math.prod(s) for s in shapes)
    rows, steps = [], {}
    sam_bytes = GSAM_FLOOR_BYTES_PER_ELEMENT if optimizer == "gsam" else FLOOR_BYTES_PER_ELEMENT
    for name in providers_for(device, optimizer):
        floor_bytes = SGD_BYTES_PER_ELEMENT if name == "sgd" else sam_bytes
        floor = floor_bytes * numel / bandwidth
        gen = torch.Generator(device=device).manual_seed(0)
        step, params = make_provider(name, shapes, device, gen, optimizer)
        step()  # state allocation (buffers, momentum) happens on the first step
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        times = timed(step, device, reps, warmup=3)
        peak = torch.cuda.max_memory_allocated() - base_mem if device.type == "cuda" else None
        steps[name] = step
        med = statistics.median(times)
        q = statistics.quantiles(times, n=10) if len(times) >= 10 else [min(times)] * 9
        rows.append(dict(
            set=set_name, provider=name, tensors=len(shapes), params=numel,
            median_ms=med * 1e3, p10_ms=q[0] * 1e3, p90_ms=q[-1] * 1e3,
            floor_ms=floor * 1e3, ratio_to_floor=med / floor,
            step_peak_extra_mb=None if peak is None else peak / 2**20,
        ))
        del step, params
    # Launches are counted after all timing: the profiler's hooks slow later launches.
    for row in rows:
        row["launches_per_step"] = count_launches(steps[row["provider"]], device)
    steps.clear()
    base = next(r for r in rows if r["provider"] in ("popular", "official"))["median_ms"]
    for r in rows:
        r["speedup_vs_popular"] = base / r["median_ms"]
    return rows


def environment(device):
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
        device=device.type, threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cores"] = os.cpu_count()
    return env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=["resnet50"], choices=list(SETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per provider")
    parser.add_argument("--optimizer", default="sam", choices=["sam", "gsam"],
                        help="gsam: fastsam.GSAM beside the official GSAM re-implementation")
    parser.add_argument("--out", help="write the results (JSON) to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reps = args.reps or (50 if device.type == "cuda" else 10)
    env = environment(device)
    largest = max(sum(math.prod(x) for x in SETS[s]()) for s in args.sets)
    bandwidth = copy_bandwidth(largest, device, reps)
    env["copy_bandwidth_GBps"] = bandwidth / 1e9
    env["optimizer"] = args.optimizer
    print(f"# {env}")
    rows = [r for s in args.sets for r in run(s, device, reps, bandwidth, args.optimizer)]
    header = (f"{'set':<12} {'provider':<8} {'median ms':>10} {'p10-p90 ms':>15} {'x ref':>9} "
              f"{'floor ms':>9} {'x floor':>8} {'launches':>9} {'peak+ MB':>9}")
    print(header)
    for r in rows:
        peak = "" if r["step_peak_extra_mb"] is None else f"{r['step_peak_extra_mb']:.1f}"
        print(f"{r['set']:<12} {r['provider']:<8} {r['median_ms']:>10.3f} "
              f"{r['p10_ms']:>7.3f}-{r['p90_ms']:<7.3f} {r['speedup_vs_popular']:>9.2f} "
              f"{r['floor_ms']:>9.3f} {r['ratio_to_floor']:>8.2f} {r['launches_per_step']:>9} "
              f"{peak:>9}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, results=rows), f, indent=1)
        print(f"# wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
