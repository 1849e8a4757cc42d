"""The optimizer-step benchmark: every optimizer × base optimizer × provider on a parameter set,
one row each.

A step is ``first_step()`` + ``second_step()`` (FreeSAM: ``step()``) in the loop people write,
without its forward/backward (the optimizer's own work is timed): before each pass the
gradients are made afresh (``.grad`` set from one of two pre-made sets, alternating, as a
backward pass after ``zero_grad(set_to_none=True)`` hands out new tensors), and after each step
a cosine lr schedule steps and the gradients are set to None. Only the optimizer's calls are
timed. Base optimizers (``BASES``): SGD with momentum 0.9, and AdamW.

Providers:
  ``plain``     the base optimizer's own step (``torch.optim.SGD`` or ``AdamW``: the cost SAM
                wraps; floor 20 B with SGD, 28 B with AdamW).
  ``popular``   :mod:`fastsam.bench.popular_sam` (SAM, and its ``adaptive=True`` ASAM).
  ``official``  :mod:`fastsam.bench.official_asam` (ASAM) or :mod:`fastsam.bench.official_gsam`.
  ``naive``     :mod:`fastsam.bench.naive_freesam` (FreeSAM has no published code).
  ``paper``     :mod:`fastsam.bench.reference_wsam` (WSAM per the paper's Algorithm 1),
                :mod:`fastsam.bench.reference_friendlysam` (FriendlySAM as its published code),
                :mod:`fastsam.bench.reference_msam` (MSAM per the paper's Algorithm 1),
                :mod:`fastsam.bench.reference_aesam` (AE-SAM as the paper describes it),
                :mod:`fastsam.bench.reference_esam` (ESAM's element-wise mask as the paper
                describes it).
  ``pytorch-optimizer``  kozistr's package's SAM (and its adaptive ASAM) when it is installed.
  every fastsam backend usable on the device (``torch``, ``triton``, ``cpu``, ``cuda``).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import fastsam

from .measure import (
    STREAM_BYTES,
    count_launches,
    count_operators,
    cuda_allocations,
    held_bytes,
    sync,
    timed_step,
)
from .naive_freesam import NaiveFreeSAM
from .official_asam import OfficialASAM
from .official_gsam import OfficialGSAM
from .param_sets import SETS
from .popular_sam import PopularSAM
from .reference_aesam import ReferenceAESAM
from .reference_esam import ReferenceESAM
from .reference_friendlysam import ReferenceFriendlySAM
from .reference_msam import ReferenceMSAM
from .reference_wsam import ReferenceWSAM

OPTIMIZERS = ("sam", "asam", "gsam", "freesam", "sam-ema", "sam-skip", "sam-clip", "wsam",
              "friendlysam", "msam", "aesam", "esam")
# Bytes per fp32 element of each pass of one step (docs/design.md §2), as (read, written), the
# update pass last. SAM: norm reads g (4, 0); perturb reads w, g and writes w, w_old (8, 8);
# restore and SGD read w_old, g, buf and write w, buf (12, 8): 40 B. ASAM's norm also reads w.
# GSAM's perturb also keeps g (+4 written), a reduction reads g and g_adv (8, 0), the update
# reads g again (+4 read): 56 B. The plain SGD step is the update alone; FreeSAM's reads and
# writes the stored gradient too (+4, +4). SAM with an EMA of the weights: the update reads and
# writes the average (+4, +4). skip_nonfinite's check reads g (4, 0): the native backends' held
# nonfinite pass (torch's GradScaler kernel, elsewhere, also rewrites g: (4, 4), above the floor).
PASS_BYTES = {
    "plain": [(12, 8)],
    "sam": [(4, 0), (8, 8), (12, 8)],
    "asam": [(8, 0), (8, 8), (12, 8)],
    "gsam": [(4, 0), (8, 12), (8, 0), (16, 8)],
    "freesam": [(16, 12)],
    "sam-ema": [(4, 0), (8, 8), (16, 12)],
    "sam-skip": [(4, 0), (8, 8), (4, 0), (12, 8)],
    # SAM with max_grad_norm: one more reduction over g_adv (the update reads the coefficient)
    "sam-clip": [(4, 0), (8, 8), (4, 0), (12, 8)],
    # WSAM, decoupled: GSAM's perturb (keeps g); after the update (which reads g too) g - g_adv
    # into the kept g and w += lr·α·(g - g_adv): one pass reading w, the kept g and g_adv,
    # writing w and the kept g, (12, 8) (the native backends' wsam_decoupled; two foreach
    # passes of (8, 4) elsewhere), listed before the update (the floor is a sum over passes)
    "wsam": [(4, 0), (8, 12), (12, 8), (16, 8)],
    # FriendlySAM: the norm reads g and m; perturb reads w, g, m and writes w, w_old, m_next
    "friendlysam": [(8, 0), (12, 12), (12, 8)],
    # MSAM, one pass: the norm reads the momentum; perturb reads w and the momentum and writes
    # w (kept) and w̃; the update (last, as in every entry) reads w (kept), g, buf and writes
    # the parameter and buf
    "msam": [(4, 0), (8, 8), (12, 8)],
    # AE-SAM's SAM step is SAM's (the decision reads the norm pass A makes); its plain steps
    # are the plain row's
    "aesam": [(4, 0), (8, 8), (12, 8)],
    # ESAM: SAM's passes; the mask is drawn in pass B from a hash, nothing more is moved
    "esam": [(4, 0), (8, 8), (12, 8)],
}
FLOOR_BYTES = {name: sum(r + w for r, w in passes) for name, passes in PASS_BYTES.items()}
# The base optimizers and the bytes of their update per element, read and written (SGD
# momentum: reads w, g, buf, writes w, buf; AdamW: reads w, g, m, v, writes w, m, v): the update
# passes above are SGD's and change by the difference with another base.
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01))}
UPDATE_BYTES = {"sgd": (12, 8), "adamw": (16, 12)}
COSINE_STEPS = 1000  # the schedule's period: every step has a new lr


def pass_floor(read: int, written: int, rates: dict) -> float:
    """Seconds per element of one pass that reads ``read`` and writes ``written`` bytes per
    element (:func:`floor_seconds`)."""
    fastest = max(rates[name] for name in STREAM_BYTES)
    return max(read / rates["read"], written / rates["write"], (read + written) / fastest)


def floor_seconds(optimizer: str, base: str, numel: int, rates: dict) -> float:
    """The bytes-moved floor of one step: over its passes, each at the largest of its bytes read
    at the read rate, its bytes written at the write rate and all its bytes at the fastest rate
    of the streaming kernels (``rates``: bytes/s, measure.stream_rates). A pass cannot read
    faster than the read-only kernel, write faster than the store-only one, nor move bytes
    faster than the memory moved them in any of them (the triad, the update's shape)."""
    passes = list(PASS_BYTES[optimizer])
    read, written = passes[-1]
    passes[-1] = (read + UPDATE_BYTES[base][0] - UPDATE_BYTES["sgd"][0],
                  written + UPDATE_BYTES[base][1] - UPDATE_BYTES["sgd"][1])
    return numel * sum(pass_floor(r, w, rates) for r, w in passes)


def row_floor_seconds(provider: str, optimizer: str, base: str, numel: int, rates: dict) -> float:
    """A row's floor: the plain base step's for the ``plain`` provider, else the optimizer's."""
    return floor_seconds("plain" if provider == "plain" else optimizer, base, numel, rates)


def refloor(rows: list[dict], rates: dict) -> None:
    """Each row's floor and ratio to it again, at ``rates`` (the fastest rates of the run)."""
    for r in rows:
        floor = row_floor_seconds(r["provider"], r["optimizer"], r["base"], r["params"], rates)
        r["floor_ms"], r["ratio_to_floor"] = floor * 1e3, r["median_ms"] / (floor * 1e3)


# The implementations each optimizer is compared with; the first is the speed-up baseline.
REFERENCES = {"sam": ("popular",), "asam": ("popular", "official"), "gsam": ("official",),
              "freesam": ("naive",), "sam-ema": ("popular",), "sam-skip": ("popular",),
              "sam-clip": ("popular",),
              "wsam": ("paper",), "friendlysam": ("paper",), "msam": ("paper",),
              "aesam": ("paper",), "esam": ("paper",)}
EMA_DECAY = 0.999
CLIP_NORM = 1.0
# The optimizers built the same way by their reference and by fastsam: (reference class,
# fastsam class, arguments); ONE_PASS: those whose step is step() alone.
PAIRED = {
    "freesam": (NaiveFreeSAM, fastsam.FreeSAM, {}),
    "msam": (ReferenceMSAM, fastsam.MSAM, dict(rho=0.05)),
    "friendlysam": (ReferenceFriendlySAM, fastsam.FriendlySAM, dict(rho=0.05)),
    "wsam": (ReferenceWSAM, fastsam.WSAM, dict(rho=0.05, gamma=0.9)),
    # every step a SAM step (c = -1000): the row times the SAM step with its decision (one
    # host read of ‖g‖², a synchronisation on a GPU)
    "aesam": (ReferenceAESAM, fastsam.AESAM,
              dict(rho=0.05, total_steps=COSINE_STEPS, lambda1=-1e3, lambda2=-1e3)),
    "esam": (ReferenceESAM, fastsam.ESAM, dict(rho=0.05, beta=0.5)),
}
ONE_PASS = ("freesam", "msam")


class PopularSAMWithClipping:
    """The usual way to clip with the popular SAM: ``torch.nn.utils.clip_grad_norm_`` (its
    foreach path) on the second pass's gradients, then the second step."""

    def __init__(self, params: list, base: str = "sgd") -> None:
        base_cls, hyper = BASES[base]
        self.params = params
        self.sam = PopularSAM(params, base_cls, rho=0.05, **hyper)

    def first_step(self) -> None:
        self.sam.first_step()

    def second_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.sam.second_step()


class PopularSAMWithEMA:
    """The usual way to keep an EMA of the weights beside the popular SAM: its two steps, then
    ``torch.optim.swa_utils.AveragedModel.update_parameters`` (an EMA ``multi_avg_fn``)."""

    def __init__(self, params: list, base: str = "sgd") -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        base_cls, hyper = BASES[base]
        self.sam = PopularSAM(params, base_cls, rho=0.05, **hyper)
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

    names = ["plain", *REFERENCES[optimizer]]
    if optimizer in ("sam", "asam") and _pytorch_optimizer() is not None:
        names.append("pytorch-optimizer")
    return names + [b for b in BACKENDS if _refusal(b, device) is None]


class _Named(torch.nn.Module):
    """Parameters under ASAM's naming convention: tensors with 2+ dims are ``*weight``."""

    def __init__(self, params):
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"t{i}_{'weight' if p.dim() >= 2 else 'bias'}", p)


def build(provider: str, optimizer: str, params: list,
          base: str = "sgd") -> tuple[Callable[[], None], object]:
    """The step function of one provider (gradients left in ``.grad``) and the object holding
    its state, over base optimizer ``base`` (``BASES``)."""
    sgd, hyper = BASES[base]  # the base optimizer class, whichever it is
    if provider in ("plain", "plain-fused"):  # plain-fused: torch.optim's fused kernel
        opt = sgd(params, **hyper, **({"fused": True} if provider == "plain-fused" else {}))
        return opt.step, opt
    if optimizer in PAIRED:  # one reference, one fastsam class, the same arguments
        reference, ours, options = PAIRED[optimizer]
        opt = (reference(params, sgd, **options, **hyper) if provider in REFERENCES[optimizer]
               else ours(params, sgd, **options, backend=provider, **hyper))
        if optimizer in ONE_PASS:
            return opt.step, opt
    elif optimizer == "gsam":
        if provider == "official":
            opt = OfficialGSAM(params, sgd, rho=0.05, alpha=0.4, **hyper)
        else:
            opt = fastsam.GSAM(params, sgd, rho=0.05, alpha=0.4, backend=provider, **hyper)
    elif optimizer == "sam-ema":
        opt = PopularSAMWithEMA(params, base) if provider == "popular" else fastsam.SAM(
            params, sgd, rho=0.05, backend=provider, average=fastsam.EMA(EMA_DECAY), **hyper
        )
    elif optimizer == "sam-clip":
        opt = PopularSAMWithClipping(params, base) if provider == "popular" else fastsam.SAM(
            params, sgd, rho=0.05, backend=provider, max_grad_norm=CLIP_NORM, **hyper)
    elif optimizer == "sam-skip" and provider != "popular":
        opt = fastsam.SAM(params, sgd, rho=0.05, backend=provider, skip_nonfinite=True, **hyper)
    elif optimizer == "asam" and provider == "official":
        opt = OfficialASAM(sgd(params, **hyper), _Named(params), rho=0.5, eta=0.01)
    elif optimizer == "asam" and provider == "popular":
        opt = PopularSAM(params, sgd, rho=0.5, adaptive=True, **hyper)
    elif provider == "pytorch-optimizer":
        opt = _pytorch_optimizer().SAM(
            params, sgd, rho=0.5 if optimizer == "asam" else 0.05,
            adaptive=optimizer == "asam", **hyper,
        )
    elif optimizer == "asam":  # the official algorithm: weights scaled, eta 0.01
        weights = [p for p in params if p.dim() >= 2]
        others = [p for p in params if p.dim() < 2]
        groups = [{"params": weights}] + ([{"params": others, "adaptive": False}] if others else [])
        opt = fastsam.ASAM(groups, sgd, rho=0.5, eta=0.01, backend=provider, **hyper)
    elif provider == "popular":
        opt = PopularSAM(params, sgd, rho=0.05, **hyper)
    else:
        opt = fastsam.SAM(params, sgd, rho=0.05, backend=provider, **hyper)

    def step():
        opt.first_step()
        opt.second_step()

    return step, opt


def passes(holder: object) -> list[Callable[[], None]]:
    """The calls of one step, one per forward/backward pass: ``[first_step, second_step]``, or
    ``[step]`` for a plain step, FreeSAM and MSAM."""
    if hasattr(holder, "first_step") and not isinstance(holder, (fastsam.FreeSAM, fastsam.MSAM)):
        return [holder.first_step, holder.second_step]
    return [holder.step]


def scheduled(holder: object) -> torch.optim.Optimizer:
    """The optimizer whose param_groups an lr scheduler steps (the base optimizer inside the
    references that wrap one)."""
    if isinstance(holder, torch.optim.Optimizer):
        return holder
    for name in ("sam", "optimizer", "base_optimizer"):  # the EMA pair; official ASAM; naive
        inner = getattr(holder, name, None)
        if inner is not None:
            return scheduled(inner)
    raise TypeError(f"no optimizer to schedule in {type(holder).__name__}")


class Loop:
    """The loop a step runs in (module docstring): ``prepare(i)`` before pass ``i`` puts the
    gradients of a fresh backward pass in ``.grad`` (untimed), ``calls`` are timed, ``finish()``
    steps the cosine schedule and sets the gradients to None (untimed)."""

    def __init__(self, holder: object, params: list, grads: tuple[list, list]) -> None:
        # the schedule first: it wraps the optimizer's step(), which the calls then are
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(scheduled(holder),
                                                                   COSINE_STEPS)
        self.calls = passes(holder)
        self.params, self.grads, self.turn = params, grads, 0

    def prepare(self, i: int) -> None:
        grads = self.grads[self.turn]
        self.turn ^= 1  # the other set: new addresses, as a new backward pass makes
        for p, g in zip(self.params, grads):
            p.grad = g

    def finish(self) -> None:
        self.schedule.step()
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """One whole step, untimed parts included (for counting operators and allocations:
        the untimed parts dispatch none)."""
        for i, call in enumerate(self.calls):
            self.prepare(i)
            call()
        self.finish()


@dataclass
class Row:
    set: str
    optimizer: str
    base: str  # the base optimizer (BASES)
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
    host_us: float  # the same step over one-element tensors: host work (module docstring)
    host_us_per_tensor: float
    host_vs_fused: float  # host_us / the base optimizer's fused step over the same tensors


def _random_params(shapes, device, seed):
    """Parameters and two gradient sets (the same values at other addresses: the second
    stands for the next backward pass's tensors)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in shapes]
    grads = [torch.randn(s, device=device, generator=gen) for s in shapes]
    return params, (grads, [g.clone() for g in grads])


def _storages_of(params, grads) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*params, *grads[0], *grads[1]]}


def _held_by_plain(shapes, device, base) -> int:
    """Bytes the plain base optimizer holds after a step (momentum buffers, Adam's moments)."""
    params, grads = _random_params(shapes, device, seed=0)
    _, opt = build("plain", "sam", params, base)
    Loop(opt, params, grads).step()
    return held_bytes(opt, _storages_of(params, grads))


def host_seconds(provider: str, optimizer: str, base: str, tensors: int, device: torch.device,
                 reps: int, warmup: int,
                 adjust: Callable[[object], None] | None = None) -> float:
    """Median seconds of the host's part of a step: the loop over ``tensors`` one-element
    tensors (the per-tensor and fixed work, no arithmetic to speak of), timed on the host
    without waiting for the device inside the calls (the device is waited for between steps).
    ``adjust``: called with the provider's optimizer before the loop."""
    params, grads = _random_params([(1,)] * tensors, device, seed=1)
    _, holder = build(provider, optimizer, params, base)
    if adjust is not None:
        adjust(holder)
    loop = Loop(holder, params, grads)
    times = []
    for rep in range(warmup + reps):
        total = 0.0
        for i, call in enumerate(loop.calls):
            loop.prepare(i)
            start = time.perf_counter()
            call()
            total += time.perf_counter() - start
        loop.finish()
        sync(device)
        if rep >= warmup:
            times.append(total)
    return statistics.median(times)


def measure(
    set_name: str,
    optimizers: list[str],
    device: torch.device,
    reps: int,
    warmup: int,
    rates: dict,
    names: dict[str, list[str]] | None = None,
    progress: Callable[[str], None] = lambda label: None,
    bases: list[str] = ("sgd",),
    before_row: Callable[[], None] = lambda: None,
) -> list[Row]:
    """Rows for every optimizer (× base × provider) on one parameter set; ``before_row`` runs
    before each row is timed (the command measures the streaming rates again there)."""
    shapes = SETS[set_name]()
    numel = sum(math.prod(s) for s in shapes)
    rows = []
    for base in bases:
        held_plain = _held_by_plain(shapes, device, base)
        # the host's work of one torch.optim step with fused=True over as many one-element
        # tensors: what a step's host cost is compared with
        fused_host = host_seconds("plain-fused", "sam", base, len(shapes), device, reps, warmup)
        for optimizer in optimizers:
            for r in _measure_one(set_name, optimizer, base, shapes, numel, device, reps, warmup,
                                  rates, (names or {}).get(optimizer), held_plain, progress,
                                  before_row):
                r.host_vs_fused = r.host_us / (fused_host * 1e6)
                rows.append(r)
    return rows


def _measure_one(set_name, optimizer, base, shapes, numel, device, reps, warmup, rates,
                 names, held_plain, progress, before_row) -> list[Row]:
    rows, loops = [], {}
    for provider in names or providers(optimizer, device):
        progress(f"{set_name} {optimizer} {base} {provider}")
        before_row()
        params, grads = _random_params(shapes, device, seed=0)
        _, holder = build(provider, optimizer, params, base)
        loop = loops[provider] = Loop(holder, params, grads)
        loop.step()  # buffers and optimizer state are allocated by the first step
        held = held_bytes(holder, _storages_of(params, grads))
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            start_mem = torch.cuda.memory_allocated(device)
        times = timed_step(loop, device, reps, warmup)
        peak = None
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - start_mem) / 2**20
            allocations, allocated = cuda_allocations(loop.step, device)
        else:
            _, allocations, allocated = count_operators(loop.step)
        host = host_seconds(provider, optimizer, base, len(shapes), device, reps, warmup)
        median = statistics.median(times)
        q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
        floor = row_floor_seconds(provider, optimizer, base, numel, rates)
        rows.append(Row(
            set=set_name, optimizer=optimizer, base=base, provider=provider,
            tensors=len(shapes), params=numel, median_ms=median * 1e3, p10_ms=q[0] * 1e3,
            p90_ms=q[-1] * 1e3, speedup=math.nan, floor_ms=floor * 1e3,
            ratio_to_floor=median / floor, launches=0, allocations=allocations,
            allocated_mb=allocated / 2**20, extra_mb=(held - held_plain) / 2**20, peak_mb=peak,
            host_us=host * 1e6, host_us_per_tensor=host * 1e6 / len(shapes),
            host_vs_fused=math.nan,
        ))
        del params, grads, holder
    # Launches are counted after all timing: the profiler's hooks slow later launches.
    for r in rows:
        r.launches = count_launches(loops[r.provider].step, device)
    reference = next((r for r in rows if r.provider == REFERENCES[optimizer][0]), None)
    for r in rows:
        r.speedup = reference.median_ms / r.median_ms if reference else math.nan
    return rows


def save_json(path: str | None, **content) -> None:
    """Write a run's ``content`` (environment, results, ...) to ``path`` as JSON, when given."""
    if path:
        with open(path, "w") as f:
            json.dump(content, f, indent=1)
        print(f"# wrote {path}")


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
