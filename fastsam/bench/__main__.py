"""``python -m fastsam.bench`` (also ``fastsam-bench``): fastsam beside the SAM implementations
people use today, one table.

    python -m fastsam.bench --quick                 # CI-sized: ResNet-50 and many tiny tensors
    python -m fastsam.bench --bases adamw           # one base optimizer (default: sgd adamw)
    python -m fastsam.bench                         # the default sets of the device
    python -m fastsam.bench --sets gpt2-medium --optimizers sam gsam --json out.json --plot out.png

Picks the best device present (CUDA, else CPU). For each parameter set, optimizer, base
optimizer (SGD momentum, AdamW) and provider (fastsam.bench.run) it times ``first_step +
second_step`` in the loop people write (gradients made afresh by each pass, set to None after
the step, a cosine lr schedule) and prints: the median and p10-p90 of the step, the speed-up over
the popular implementation (the official one for GSAM, the naive per-parameter one for FreeSAM),
the bytes-moved floor (bytes read at the read rate plus bytes written at the write rate of the
project's streaming kernels, measured in the same run) and the ratio to it, launches per step
(kernel launches on CUDA, operators dispatched on CPU), allocations per step, the memory the
optimizer holds beyond the plain base optimizer, on CUDA the peak memory of a step, and the
host's work per step (the same loop over one-element tensors), per tensor, and over that of one
step of the base optimizer with ``fused=True`` (torch.optim's fused kernel) on those tensors.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import sys

import torch

from .measure import STREAM_BYTES, fastest_rates, stream_rates
from .param_sets import SETS
from .run import BASES, OPTIMIZERS, REFERENCES, as_dicts, measure, providers, refloor, save_json

DEFAULT_SETS = {"cuda": ["resnet50", "vit-b16", "gpt2-medium", "many-tiny"],
                "cpu": ["resnet50", "vit-b16", "many-tiny"]}
QUICK_SETS = ["resnet50", "many-tiny"]


def environment(device: torch.device) -> dict:
    import fastsam

    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        fastsam=fastsam.__version__, torch=torch.__version__, python=platform.python_version(),
        machine=platform.machine(), device=device.type, threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cores"] = os.cpu_count()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled and sys.stderr.isatty()

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            filled = round(30 * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] "
                             f"{self.done}/{self.total} {label:<40}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 90 + "\r")


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


COLUMNS = [  # header, width, cell
    ("set", 11, lambda r: r["set"]),
    ("optim", 8, lambda r: r["optimizer"]),
    ("base", 5, lambda r: r["base"]),
    ("provider", 17, lambda r: r["provider"]),
    ("median ms", 10, lambda r: _fmt(r["median_ms"], ".3f")),
    ("p10-p90 ms", 17, lambda r: f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"),
    ("x ref", 6, lambda r: _fmt(r["speedup"], ".2f")),
    ("floor ms", 9, lambda r: _fmt(r["floor_ms"], ".3f")),
    ("x floor", 7, lambda r: _fmt(r["ratio_to_floor"], ".2f")),
    ("launches", 8, lambda r: str(r["launches"])),
    ("allocs", 6, lambda r: str(r["allocations"])),
    ("alloc MB", 8, lambda r: _fmt(r["allocated_mb"], ".1f")),
    ("extra MB", 8, lambda r: _fmt(r["extra_mb"], ".1f")),
    ("peak MB", 8, lambda r: _fmt(r["peak_mb"], ".1f")),
    ("host us", 8, lambda r: _fmt(r["host_us"], ".0f")),
    ("us/tensor", 9, lambda r: _fmt(r["host_us_per_tensor"], ".2f")),
    ("x fused", 7, lambda r: _fmt(r.get("host_vs_fused", math.nan), ".2f")),
]


def table(rows: list[dict]) -> str:
    lines = [" ".join(f"{h:>{w}}" if i > 3 else f"{h:<{w}}"
                      for i, (h, w, _) in enumerate(COLUMNS))]
    for r in rows:
        lines.append(" ".join(f"{cell(r):>{w}}" if i > 3 else f"{cell(r):<{w}}"
                              for i, (_, w, cell) in enumerate(COLUMNS)))
    return "\n".join(lines)


def plot(rows: list[dict], path: str, env: dict) -> None:
    """One figure: a grid of panels, parameter sets down and optimizers across. In each panel
    a bar per provider and base optimizer (median step, ms; the references grey), and the
    step's floor per base as a dashed line: how far each provider is from the others and
    from what the memory allows, at a glance."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib ({exc}); pip install matplotlib") from exc
    sets = list(dict.fromkeys(r["set"] for r in rows))
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    bases = list(dict.fromkeys(r["base"] for r in rows))
    colours = dict(zip(bases, ("#1f77b4", "#ff7f0e", "#2ca02c")))
    widest = max(len({r["provider"] for r in rows if r["optimizer"] == o}) for o in optimizers)
    fig, axes = plt.subplots(len(sets), len(optimizers), squeeze=False,
                             figsize=(3.0 * len(optimizers),
                                      0.6 + 0.2 * widest * len(bases) * len(sets)))
    for (i, set_name), (j, optimizer) in ((a, b) for a in enumerate(sets)
                                          for b in enumerate(optimizers)):
        ax = axes[i][j]
        mine = [r for r in rows if (r["set"], r["optimizer"]) == (set_name, optimizer)]
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        step = len(bases) + 0.6
        for r in mine:
            k, b = providers.index(r["provider"]), bases.index(r["base"])
            reference = r["provider"] in ("plain", *REFERENCES[optimizer])
            ax.barh(k * step + b, r["median_ms"], height=0.9, color=colours[r["base"]],
                    alpha=0.45 if reference else 1.0)
        for base in bases:
            floors = [r["floor_ms"] for r in mine if r["base"] == base and r["provider"] != "plain"]
            if floors:
                ax.axvline(floors[0], color=colours[base], linestyle="--", linewidth=1)
        ax.set_yticks([k * step + (len(bases) - 1) / 2 for k in range(len(providers))])
        ax.set_yticklabels(providers, fontsize=7)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{set_name} · {optimizer}", fontsize=8)
        if i == len(sets) - 1:
            ax.set_xlabel("median step, ms", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[b]) for b in bases]
    handles.append(plt.Line2D([0], [0], color="black", linestyle="--", linewidth=1))
    fig.legend(handles, [f"over {b}" for b in bases] + ["floor (per base)"], loc="lower center",
               ncol=len(bases) + 1, fontsize=7, frameon=False)
    fig.suptitle(f"fastsam.bench on {env.get('gpu', env.get('cpu'))}, torch {env['torch']}; "
                 "references pale", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path, dpi=120)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastsam.bench", description=__doc__.split("\n")[0].strip("`"))
    parser.add_argument("--sets", nargs="+", choices=list(SETS),
                        help="parameter sets (default: all on CUDA; all but gpt2-medium on CPU)")
    parser.add_argument("--optimizers", "--optimizer", nargs="+", choices=OPTIMIZERS,
                        default=list(OPTIMIZERS))
    parser.add_argument("--bases", nargs="+", choices=list(BASES), default=list(BASES),
                        help="base optimizers (default: sgd adamw)")
    parser.add_argument("--providers", nargs="+",
                        help="only these providers (default: every one available)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--reps", type=int, help="timed steps per provider")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized: resnet50 and many-tiny, few repetitions")
    parser.add_argument("--json", "--out", dest="json", help="write rows + environment here")
    parser.add_argument("--csv", help="write the rows as CSV here")
    parser.add_argument("--plot", help="write a PNG chart here (needs matplotlib)")
    parser.add_argument("--from-json", dest="from_json",
                        help="measure nothing: print (and --plot) the rows of a saved --json")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(table(saved["results"]))
        if args.plot:
            plot(saved["results"], args.plot, saved["environment"])
            print(f"# wrote {args.plot}")
        return saved["results"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sets = args.sets or (QUICK_SETS if args.quick else DEFAULT_SETS[device.type])
    reps = args.reps or (5 if args.quick else 50 if device.type == "cuda" else 10)
    warmup = 1 if args.quick else 3
    env = environment(device)
    largest = max(sum(math.prod(s) for s in SETS[name]()) for name in sets)
    rates = stream_rates(largest, device, reps)

    def remeasure() -> None:
        # The rates again before each row and after the last, each at its fastest in the run:
        # on a shared machine the memory's speed varies over seconds (this project's 2-core CI
        # machine: the store-only rate 20-41 GB/s in one hour), and rates measured once, or
        # only before and after, gave floors that rows beat.
        rates.update(fastest_rates(rates, stream_rates(largest, device, reps)))
    chosen = {
        o: [p for p in providers(o, device) if args.providers is None or p in args.providers]
        for o in args.optimizers
    }
    progress = Progress(len(sets) * len(args.bases) * sum(map(len, chosen.values())),
                        not args.no_progress)
    rows = []
    try:
        for name in sets:
            rows += as_dicts(measure(name, args.optimizers, device, reps, warmup, rates,
                                     chosen, progress, args.bases, before_row=remeasure))
    finally:
        progress.close()
    remeasure()
    refloor(rows, rates)
    env.update({f"{name}_GBps": rates[name] / 1e9 for name in STREAM_BYTES})
    env["stream_kernels"] = rates["kernels"]
    print("# " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in env.items()))
    print(table(rows))
    print("# x ref: speed-up over popular (SAM, ASAM, sam-skip; SAM + AveragedModel EMA for "
          "sam-ema; SAM + clip_grad_norm_ for sam-clip), "
          "official (GSAM), naive (FreeSAM) or paper (WSAM, FriendlySAM, MSAM, AE-SAM: every "
          "step a SAM step); "
          "floor: each pass at the slowest of its bytes read at the read rate, its bytes written "
          "at the write rate and all its bytes at the fastest rate, summed over the passes (the "
          "streaming kernels' rates above); launches: kernels (CUDA) or operators (CPU) per step; "
          "extra MB: memory held beyond the plain base optimizer; host us: the same step over "
          "one-element tensors (host work), per step and per tensor; x fused: host us over that "
          "of one step of the base optimizer with fused=True on the same tensors")
    save_json(args.json, environment=env, results=rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"# wrote {args.csv}")
    if args.plot:
        plot(rows, args.plot, env)
        print(f"# wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
