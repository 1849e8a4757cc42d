"""The host's cost of a step, side by side in one run: torch.optim's fused step, and fastsam's
SAM step over a held plan (the steady state, docs/design.md §5) and over the general path,
on N one-element tensors (no arithmetic to speak of: what is timed is the host's work).

    python bench/host_cost.py                       # 2000 tensors, SGD momentum and AdamW
    python bench/host_cost.py --tensors 200 2000 20000 --reps 200 --json out.json
    python bench/host_cost.py --optimizers sam sam-skip sam-clip    # other held steps

The loop is the benchmark's (fastsam.bench.run.Loop): fresh gradients before each pass, a
cosine lr schedule and the gradients set to None after each step; only the optimizer's calls
are timed. Prints medians (µs per step), µs per tensor, the ratio to the fused torch.optim step
and the fit of the held path's time to a + b·N over the tensor counts given.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time

import torch

from fastsam.bench.run import BASES, host_seconds, save_json

# The benchmark's optimizers (fastsam.bench.run) whose steady state is a held plan.
HELD = ("sam", "asam", "gsam", "wsam", "friendlysam", "freesam", "msam", "sam-ema", "sam-skip",
        "sam-clip", "aesam", "esam")


def _general(opt) -> None:
    opt._held = None  # fastsam's held path off: the general path over Python lists


def host_us(provider: str, optimizer: str, base: str, tensors: int, reps: int,
            general: bool = False) -> float:
    """Median µs of the timed calls of one step (module docstring); ``general``: fastsam's
    held path turned off."""
    return 1e6 * host_seconds(provider, optimizer, base, tensors, torch.device("cpu"), reps, 3,
                              _general if general else None)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[2000])
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--optimizers", nargs="+", default=["sam"], choices=list(HELD),
                        help="fastsam's step (the torch column is always the plain fused step)")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    env = dict(torch=torch.__version__, python=platform.python_version(),
               machine=platform.machine(), threads=torch.get_num_threads(),
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'optimizer':9} {'base':6} {'tensors':>7} {'fused torch':>11} {'held':>9} "
          f"{'general':>9} {'held/fused':>10} {'general/fused':>13} {'held us/t':>9} "
          f"{'general/held':>12}")
    rows = []
    for optimizer, base in itertools.product(args.optimizers, args.bases):
        for n in args.tensors:
            fused = host_us("plain-fused", "sam", base, n, args.reps)
            held = host_us("cpu", optimizer, base, n, args.reps)
            general = host_us("cpu", optimizer, base, n, args.reps, general=True)
            rows.append(dict(optimizer=optimizer, base=base, tensors=n, fused_us=fused,
                             held_us=held, general_us=general))
            print(f"{optimizer:9} {base:6} {n:7d} {fused:11.0f} {held:9.0f} {general:9.0f} "
                  f"{held / fused:10.2f} {general / fused:13.2f} {held / n:9.3f} "
                  f"{general / held:12.2f}")
        counts = [r for r in rows if (r["optimizer"], r["base"]) == (optimizer, base)]
        if len(counts) >= 2:  # least squares: held µs = a + b·N
            xs, ys = [r["tensors"] for r in counts], [r["held_us"] for r in counts]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            print(f"# {optimizer}, {base}: held step ≈ {my - b * mx:.0f} µs + {b:.3f} µs per "
                  "tensor")
    print("# µs per step (first_step + second_step, or one fused torch.optim step); held: "
          "fastsam's cpu backend over a held plan; general: the same with the held path off")
    save_json(args.json, environment=env, results=rows)
    return rows


if __name__ == "__main__":
    main()
