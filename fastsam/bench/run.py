"""The optimizer-step benchmark: every optimizer × provider on a parameter set, one row each.

A step is ``first_step()`` + ``second_step()`` (FreeSAM: ``step()``) with random gradients
already in ``.grad`` (no forward/backward: the optimizer's own work), SGD momentum 0.9 as the
base optimizer.

Providers:
  ``sgd``       a plain ``torch.optim.SGD`` momentum step (the cost SAM wraps; floor 20 B).
  ``popular``   :mod:`fastsam.bench.popular_sam` (SAM, and its ``adaptive=True`` ASAM).
  ``official``  :mod:`fastsam.bench.official_asam` (ASAM) or :mod:`fastsam.bench.official_gsam`.
  ``naive``     :mod:`fastsam.bench.naive_freesam` (FreeSAM has no published code).
  ``pytorch-optimizer``  kozistr's package's SAM (and its adaptive ASAM) when it is installed.
  every fastsam backend usable on the device (``torch``, ``triton``, ``cpu``, ``cuda``).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import fastsam

from .measure import (
    count_launches,
    count_operators,
    cuda_allocations,
    held_bytes,
    sync,
    timed,
)
from .naive_freesam import NaiveFreeSAM
from .official_asam import OfficialASAM
from .official_gsam import OfficialGSAM
from .param_sets import SETS
from .popular_sam import PopularSAM

OPTIMIZERS = ("sam", "asam", "gsam", "freesam", "sam-ema", "sam-skip")
# Bytes per fp32 element of one step (docs/design.md §2): SAM 40 = norm 4 + perturb 16 + restore and
# SGD 20; ASAM's norm also reads w (+4); GSAM keeps g (+4), reduces over g and g_adv (+8) and
# reads g again in the update (+4). The plain SGD step reads w, g, buf and writes w, buf; FreeSAM
# adds the stored gradient, read and written (+8). SAM with an EMA of the weights reads and
# writes the average too (+8). skip_nonfinite's check reads and rewrites g (torch's GradScaler
# kernel, unscaling by 1: +8).
FLOOR_BYTES = {"sgd": 20, "sam": 40, "asam": 44, "gsam": 56, "freesam": 28, "sam-ema": 48,
               "sam-skip": 48}
# The implementations each optimizer is compared with; the first is the speed-up baseline.
REFERENCES = {"sam": ("popular",), "asam": ("popular", "official"), "gsam": ("official",),
              "freesam": ("naive",), "sam-ema": ("popular",), "sam-skip": ("popular",)}
HYPER = dict(lr=0.01, momentum=0.9)
EMA_DECAY = 0.999


class PopularSAMWithEMA:
    """The usual way to keep an EMA of the weights beside the popular SAM: its two steps, then
    ``torch.optim.swa_utils.AveragedModel.update_parameters`` (an EMA ``multi_avg_fn``)."""

    def __init__(self, params: list) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.sam = PopularSAM(params, torch.optim.SGD, rho=0.05, **HYPER)
        self.module = torch.nn.ParameterList(params)
        self.averaged = AveragedModel(self.module,
                                      multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY))
        self.averaged_params = list(self.averaged.module.parameters())  # for held_bytes

    def first_step(self) -> None:
        self.sam.first_step()

    def second_step(self) -> None:
        self.sam.second_step()
        self.averaged.update_parameters(self.module)


def _pytorch_optimizer():
    try:
        import pytorch_optimizer
    except ImportError:
        return None
    return pytorch_optimizer


def providers(optimizer: str, device: torch.device) -> list[str]:
    """Every provider available for ``optimizer`` on ``device``, baseline first after sgd."""
    from fastsam.backends import BACKENDS, _refusal

    names = ["sgd", *REFERENCES[optimizer]]
    if optimizer in ("sam", "asam") and _pytorch_optimizer() is not None:
        names.append("pytorch-optimizer")
    return names + [b for b in BACKENDS if _refusal(b, device) is None]


class _Named(torch.nn.Module):
    """Parameters under ASAM's naming convention: tensors with 2+ dims are ``*weight``."""

    def __init__(self, params):
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"t{i}_{'weight' if p.dim() >= 2 else 'bias'}", p)


def build(provider: str, optimizer: str, params: list) -> tuple[Callable[[], None], object]:
    """The step function of one provider and the object holding its state."""
    sgd = torch.optim.SGD
    if provider == "sgd":
        opt = sgd(params, **HYPER)
        return opt.step, opt
    if optimizer == "freesam":
        if provider == "naive":
            opt = NaiveFreeSAM(params, sgd, **HYPER)
        else:
            opt = fastsam.FreeSAM(params, sgd, backend=provider, **HYPER)
        return opt.step, opt
    if optimizer == "gsam":
        if provider == "official":
            opt = OfficialGSAM(params, sgd, rho=0.05, alpha=0.4, **HYPER)
        else:
            opt = fastsam.GSAM(params, sgd, rho=0.05, alpha=0.4, backend=provider, **HYPER)
    elif optimizer == "sam-ema":
        opt = PopularSAMWithEMA(params) if provider == "popular" else fastsam.SAM(
            params, sgd, rho=0.05, backend=provider, average=fastsam.EMA(EMA_DECAY), **HYPER
        )
    elif optimizer == "sam-skip" and provider != "popular":
        opt = fastsam.SAM(params, sgd, rho=0.05, backend=provider, skip_nonfinite=True, **HYPER)
    elif optimizer == "asam" and provider == "official":
        opt = OfficialASAM(sgd(params, **HYPER), _Named(params), rho=0.5, eta=0.01)
    elif optimizer == "asam" and provider == "popular":
        opt = PopularSAM(params, sgd, rho=0.5, adaptive=True, **HYPER)
    elif provider == "pytorch-optimizer":
        opt = _pytorch_optimizer().SAM(
            params, sgd, rho=0.5 if optimizer == "asam" else 0.05,
            adaptive=optimizer == "asam", **HYPER,
        )
    elif optimizer == "asam":  # the official algorithm: weights scaled, eta 0.01
        weights = [p for p in params if p.dim() >= 2]
        others = [p for p in params if p.dim() < 2]
        groups = [{"params": weights}] + ([{"params": others, "adaptive": False}] if others else [])
        opt = fastsam.ASAM(groups, sgd, rho=0.5, eta=0.01, backend=provider, **HYPER)
    elif provider == "popular":
        opt = PopularSAM(params, sgd, rho=0.05, **HYPER)
    else:
        opt = fastsam.SAM(params, sgd, rho=0.05, backend=provider, **HYPER)

    def step():
        opt.first_step()
        opt.second_step()

    return step, opt


@dataclass
class Row:
    set: str
    optimizer: str
    provider: str
    tensors: int
    params: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    speedup: float  # baseline median / this median (REFERENCES[optimizer][0])
    floor_ms: float
    ratio_to_floor: float
    launches: int  # kernel launches (CUDA) or operators dispatched (CPU) per step
    allocations: int  # per step, after the first
    allocated_mb: float  # per step, after the first
    extra_mb: float  # tensors the optimizer holds beyond what plain SGD holds
    peak_mb: float | None  # CUDA: peak memory of a step above its start


def _random_params(shapes, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen) for s in shapes]
    return params, grads


def _storages_of(params) -> set[int]:
    return {t.untyped_storage().data_ptr() for p in params for t in (p, p.grad)}


def _held_by_plain_sgd(shapes, device) -> int:
    """Bytes a plain torch.optim.SGD momentum optimizer holds after a step (its buffers)."""
    params, grads = _random_params(shapes, device, seed=0)
    for p, g in zip(params, grads):
        p.grad = g
    step, opt = build("sgd", "sam", params)
    step()
    return held_bytes(opt, _storages_of(params))


def measure(
    set_name: str,
    optimizers: list[str],
    device: torch.device,
    reps: int,
    warmup: int,
    bandwidth: float,
    names: dict[str, list[str]] | None = None,
    progress: Callable[[str], None] = lambda label: None,
) -> list[Row]:
    """Rows for every optimizer (× provider) on one parameter set."""
    shapes = SETS[set_name]()
    numel = sum(math.prod(s) for s in shapes)
    rows = []
    held_sgd = _held_by_plain_sgd(shapes, device)
    for optimizer in optimizers:
        timed_steps = {}
        for provider in (names or {}).get(optimizer) or providers(optimizer, device):
            progress(f"{set_name} {optimizer} {provider}")
            params, grads = _random_params(shapes, device, seed=0)
            for p, g in zip(params, grads):
                p.grad = g  # the steps leave .grad in place: every step sees the same g
            step, holder = build(provider, optimizer, params)
            step()  # buffers and optimizer state are allocated by the first step
            held = held_bytes(holder, _storages_of(params))
            if device.type == "cuda":
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                start_mem = torch.cuda.memory_allocated(device)
            times = timed(step, device, reps, warmup)
            peak = None
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - start_mem) / 2**20
                allocations, allocated = cuda_allocations(step, device)
            else:
                _, allocations, allocated = count_operators(step)
            timed_steps[provider] = step
            median = statistics.median(times)
            q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
            floor = FLOOR_BYTES["sgd" if provider == "sgd" else optimizer] * numel / bandwidth
            rows.append(Row(
                set=set_name, optimizer=optimizer, provider=provider, tensors=len(shapes),
                params=numel, median_ms=median * 1e3, p10_ms=q[0] * 1e3, p90_ms=q[-1] * 1e3,
                speedup=math.nan, floor_ms=floor * 1e3, ratio_to_floor=median / floor,
                launches=0, allocations=allocations, allocated_mb=allocated / 2**20,
                extra_mb=(held - held_sgd) / 2**20, peak_mb=peak,
            ))
            del params, grads, holder
        # Launches are counted after all timing: the profiler's hooks slow later launches.
        mine = [r for r in rows if r.optimizer == optimizer and r.set == set_name]
        for r in mine:
            r.launches = count_launches(timed_steps[r.provider], device)
        base = next((r for r in mine if r.provider == REFERENCES[optimizer][0]), None)
        for r in mine:
            r.speedup = base.median_ms / r.median_ms if base else math.nan
        timed_steps.clear()
    return rows


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
