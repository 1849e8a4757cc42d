"""Which launch shape makes the Triton passes fastest? One run, several variants, one table.

    python bench/triton_tuning.py --sets gpt2-medium resnet50

Times a full SAM + SGD-momentum step (first_step + second_step) with the triton backend for
each (BLOCK, CHUNK, num_warps) variant, against the same-run copy floor (40 B/element).
Variants are set through fastsam.backends.triton's module constants; the default is marked *.
"""
import argparse
import math
import statistics

import torch

import fastsam  # noqa: E402
import fastsam.backends.triton as tb  # noqa: E402
from fastsam.bench.measure import stream_rates, timed
from fastsam.bench.param_sets import SETS
from fastsam.bench.run import floor_seconds

VARIANTS = [  # (BLOCK, segments of CHUNK = k * BLOCK elements, num_warps)
    (1024, 8, 4), (512, 16, 4), (512, 32, 4), (512, 8, 4), (512, 16, 2), (256, 32, 2),
    (256, 64, 2), (4096, 4, 16), (2048, 8, 16), (1024, 16, 8),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", nargs="+", default=["gpt2-medium"], choices=list(SETS))
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda")
    default = (tb.BLOCK, tb.CHUNK // tb.BLOCK, tb.NUM_WARPS)
    for set_name in args.sets:
        sweep(set_name, device, args.reps, default)
    tb.BLOCK, tb.CHUNK, tb.NUM_WARPS = default[0], default[0] * default[1], default[2]


def sweep(set_name, device, reps, default):
    shapes = SETS[set_name]()
    numel = sum(math.prod(s) for s in shapes)
    floor_ms = floor_seconds("sam", "sgd", numel, stream_rates(numel, device, 20)) * 1e3
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    print(f"{set_name}: {numel} params, floor {floor_ms:.3f} ms")
    print(f"{'BLOCK':>6} {'CHUNK':>6} {'warps':>5} {'median ms':>10} {'x floor':>8}")
    for block, k, warps in VARIANTS:
        tb.BLOCK, tb.CHUNK, tb.NUM_WARPS = block, k * block, warps
        opt = fastsam.SAM(params, torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9,
                          backend="triton")

        def step(opt=opt):
            opt.first_step()
            opt.second_step()

        med = statistics.median(timed(step, device, reps, warmup=3)) * 1e3
        mark = "*" if (block, k, warps) == default else ""
        print(f"{block:>6} {k * block:>6} {warps:>5} {med:>10.3f} {med / floor_ms:>8.2f} {mark}")

if __name__ == "__main__":
    main()
