"""Each pass of the native backend's step beside its own bytes-moved floor, in one run: where a
step's distance from its floor comes from (docs/design.md §2 for the passes, docs/benchmarks.md
for the floor).

    python bench/passes.py                          # the ResNet-50 set on the CPU
    python bench/passes.py --set vit-b16 --reps 30 --json out.json

The operators of ``fastsam._C`` are called directly on fp32 tensors shaped like the set, rounds
of every pass and the streaming kernels in turn (so that a slow spell of a shared machine
slows them all). Each pass's floor is ``fastsam.bench.run.pass_floor``'s: its bytes
read at the read rate, its bytes written at the write rate and all its bytes at the fastest
rate, whichever is slowest, with each rate the fastest of the run. Prints medians, and each
pass's fastest run over its floor (under 1: the pass outran the floor's kernels).
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from fastsam.bench.measure import STREAM_BYTES, stream_kernels
from fastsam.bench.param_sets import SETS
from fastsam.bench.run import pass_floor, save_json

NO_SOURCE = ([], None, 0.0, 0, [])  # sgd/adam: no gradient source, no average
SGD_HP = [1e-9, 0.9, 0.0, 0.0]  # lr, momentum, dampening, weight decay (lr tiny: w ≈ const)
ADAM_HP = [1e-9, 0.9, 0.999, 1e-8, 0.01, 1e-9, 1.0, 1.0]  # elementwise.h AdamScalars order
# (bytes read, bytes written) per fp32 element of each pass (fastsam/bench/run.py PASS_BYTES)
PASSES = {
    "norm": (4, 0),           # reads g
    "perturb": (8, 8),        # reads w, g; writes w, w_old
    "perturb+keep": (8, 12),  # GSAM's: also writes the kept g
    "gsam_sums": (8, 0),      # reads g, g_adv
    "restore": (4, 4),        # reads w_old, writes w
    "sgd": (12, 8),           # reads w_old, g, buf; writes w, buf
    "adamw": (16, 12),        # reads w_old, g, m, v; writes w, m, v
}


def make_passes(shapes, device):
    ops = torch.ops.fastsam
    gen = torch.Generator(device=device).manual_seed(0)

    def tensors():
        return [torch.randn(s, device=device, generator=gen) for s in shapes]

    w, g, old, keep, buf, m = (tensors() for _ in range(6))
    v = [t.abs() for t in tensors()]
    n = [len(shapes)]
    f64 = dict(dtype=torch.float64, device=device)
    out, scratch = torch.zeros((), **f64), torch.zeros(0, **f64)
    total = torch.tensor(float(sum(math.prod(s) for s in shapes)), **f64)
    rho, skipped = torch.full((1,), 1e-9, **f64), torch.zeros((), device=device)
    along = torch.zeros(3, **f64)

    def perturb(kept):
        return lambda: ops.perturb(w, g, old, n, [0], [0.0], rho, total, scratch, 2.0, 2.0,
                                   1e-12, skipped, kept, [], [])

    return {
        "norm": lambda: ops.norm(w, g, n, [0], [0.0], 2.0, out, scratch, []),
        "perturb": perturb([]),
        "perturb+keep": perturb(keep),
        "gsam_sums": lambda: ops.gsam_sums(g, keep, along, scratch),
        "restore": lambda: ops.restore(w, old),
        "sgd": lambda: ops.sgd(w, g, old, buf, SGD_HP, None, False, False, False, *NO_SOURCE),
        "adamw": lambda: ops.adam(w, g, old, m, v, [], ADAM_HP, None, True, False, False,
                                  *NO_SOURCE),
    }


def timed_once(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="resnet50", choices=sorted(SETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import fastsam._C  # noqa: F401  (the operators)

    device = torch.device(args.device)
    shapes = SETS[args.set]()
    numel = sum(math.prod(s) for s in shapes)
    arrays = (torch.rand(numel, device=device) for _ in range(4))
    calls = {**make_passes(shapes, device), **stream_kernels(*arrays)[0]}
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm-up: scratch grown, pages touched
    for _ in range(args.reps):
        for name, fn in calls.items():
            times[name].append(timed_once(fn, device))
    rates = {name: size * numel / min(times[name]) for name, size in STREAM_BYTES.items()}
    env = dict(set=args.set, tensors=len(shapes), params=numel, device=str(device),
               threads=torch.get_num_threads(), torch=torch.__version__,
               python=platform.python_version(), machine=platform.machine(),
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **{f"{k}_GBps": round(r / 1e9, 2) for k, r in rates.items()})
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'pass':14s}{'B read':>7s}{'B written':>10s}{'median ms':>11s}{'floor ms':>10s}"
          f"{'x floor':>9s}{'GB/s':>7s}{'fastest x floor':>16s}")
    rows = []
    for name, (read, written) in PASSES.items():
        floor = numel * pass_floor(read, written, rates)
        median = statistics.median(times[name])
        rows.append(dict(name=name, read=read, written=written, median_ms=median * 1e3,
                         floor_ms=floor * 1e3, ratio_to_floor=median / floor,
                         GBps=numel * (read + written) / median / 1e9,
                         fastest_ratio_to_floor=min(times[name]) / floor))
        r = rows[-1]
        print(f"{name:14s}{read:7d}{written:10d}{r['median_ms']:11.2f}{r['floor_ms']:10.2f}"
              f"{r['ratio_to_floor']:9.2f}{r['GBps']:7.1f}{r['fastest_ratio_to_floor']:16.2f}")
    print("# medians of rounds of every pass and streaming kernel in turn; the floor at the "
          "fastest rate of each streaming kernel in the run; fastest: the pass's fastest run")
    save_json(args.json, environment=env, results=rows)
    return rows


if __name__ == "__main__":
    main()
