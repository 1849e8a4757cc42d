"""The Triton launchers' table key, side by side in one run: formed by one C loop
(``fastsam._C.layout_key``) and by Python's ``data_ptr()`` calls (the fallback without the
extension), over the lists of one SAM update launch (parameters, gradients, w_old, momentum
buffers) of N one-element tensors; each key then looked up in a dict, as the launcher's LRU
does.

    python bench/layout_key.py                      # 2000 and 20000 tensors
    python bench/layout_key.py --tensors 200 --reps 500 --json out.json

Prints medians (µs per key, lookup included), µs per tensor and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastsam.backends import triton as T
from fastsam.bench.__main__ import environment
from fastsam.bench.run import save_json


def key_us(form, lists: tuple, reps: int) -> float:
    cache = {form(lists): None}
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        key = form(lists)
        cache.get(key)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if T._layout_key_in_c is None:
        raise SystemExit("fastsam._C is not built: nothing to compare")
    env = environment(torch.device("cpu"))
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'tensors':>7} {'lists':>5} {'C us':>8} {'Python us':>10} {'C us/t':>7} "
          f"{'Python/C':>8}")
    rows = []
    for n in args.tensors:
        lists = (
            [torch.nn.Parameter(torch.zeros(1)) for _ in range(n)],
            *([torch.zeros(1) for _ in range(n)] for _ in range(3)),
        )
        c = key_us(lambda ls: T._LayoutKey(T._layout_key_in_c(ls)), lists, args.reps)
        py = key_us(T._layout_key_in_python, lists, max(args.reps // 10, 5))
        rows.append(dict(tensors=n, lists=len(lists), c_us=c, python_us=py))
        print(f"{n:7d} {len(lists):5d} {c:8.1f} {py:10.1f} {c / n:7.3f} {py / c:8.1f}")
    save_json(args.json, environment=env, results=rows)
    return rows


if __name__ == "__main__":
    main()
