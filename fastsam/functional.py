"""The passes of one sharpness-aware step, and the contract every backend implements.

A SAM-family step is three passes over memory (docs/design.md §2):

    A  perturbation_norm   S = Σ_groups Σ_tensors Σ_i |u_i|^q,  u = T·g         (one reduction)
    B  perturb             w_old ← w;  w ← w + e,  e = ρ·T·sign(u)·|u|^(q-1) / (S^(1/p) + eps)
    C  restore_*           w ← update(w_old, g_adv, state)                        (one pass)

GSAM adds one reduction between the second backward pass and C (:meth:`Backend.gsam_along`),
keeps g through B (``PerturbGroup.keep_grads``) and hands C a :class:`Decomposition`.
FriendlySAM perturbs along ``d = g - sigma·m`` instead of g in A and B, and B also writes the
next momentum of first-pass gradients (``PerturbGroup.momentum``, :class:`Momentum`). ESAM
moves only the elements a counter-based Bernoulli draw keeps in B (``PerturbGroup.mask``,
:class:`Mask`).

``T`` is the ASAM operator (1 for plain SAM; see :class:`Scaling`), ``q`` the dual exponent of
``p`` (1/p + 1/q = 1). For p = 2 this is ``e = ρ·T²·g / (‖T·g‖₂ + eps)``; for p = ∞ it is
``e = ρ·T·sign(g)`` (the sign perturbation, no denominator).

Every backend (torch, triton, later cpu/cuda) subclasses :class:`Backend` and implements each
pass with exactly the signature given here; the optimizers in ``fastsam.optimizers`` collect
tensors and call these methods, nothing else. All arithmetic is fp32 whatever the storage dtype
(bf16/fp16 values are widened on load and rounded once on store).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor

__all__ = [
    "Scaling",
    "PerturbGroup",
    "Momentum",
    "momentum_scalars",
    "Mask",
    "mask_key",
    "mask_scalars",
    "mask_draws",
    "PerturbationNorm",
    "SGDHyper",
    "AdamHyper",
    "DecomposeGroup",
    "Decomposition",
    "Swap",
    "GradientSource",
    "Correction",
    "Average",
    "accumulation_dtype",
    "Backend",
    "dual_exponent",
    "gsam_along_from_sums",
    "adam_bias_corrections",
]


@dataclass(frozen=True)
class Scaling:
    """The ASAM operator ``T`` applied to one parameter group.

    kind:
        ``"none"``: T = 1 (plain SAM).
        ``"element"``: T = |w| + eta (element-wise ASAM; eta = 0 is the popular PyTorch SAM's
        ``adaptive=True``).
        ``"filter"``: T = ‖w[i, ...]‖₂ + eta broadcast over filter i (dim 0) for tensors with
        ndim ≥ 2, |w| + eta for 1-D tensors (filter-wise ASAM).
        ``"outer"``: T = |w| + eta applied once, outside the normalisation: u = g in the norm
        and ``e = ρ·T·sign(g)·|g|^(q-1) / (S^(1/p) + eps)`` (p = 2: ``ρ·(|w| + eta)·g /
        (‖g‖₂ + eps)``, the seed report's Adaptive-GSAM with eta = gamma).
    """

    kind: Literal["none", "element", "filter", "outer"] = "none"
    eta: float = 0.0

    @property
    def mode(self) -> int:
        """The kernels' code of ``kind`` (``csrc/elementwise.h`` Mode, the Triton kernels'
        mode values): 0 none, 1 element, 2 filter, 3 outer."""
        return _SCALING_MODES[self.kind]


_SCALING_MODES = {"none": 0, "element": 1, "filter": 2, "outer": 3}


@dataclass
class PerturbGroup:
    """The tensors of one parameter group that take part in the perturbation.

    ``params[i]``, ``grads[i]`` and ``w_old[i]`` have the same shape, dtype and device;
    ``w_old`` are the persistent copy buffers the perturb pass writes. ``keep_grads``, when
    given, are buffers like ``grads`` that the perturb pass also fills with a copy of g (GSAM
    keeps the first gradient this way, in the same sweep over memory).
    """

    params: list[Tensor]
    grads: list[Tensor]
    w_old: list[Tensor]
    rho: float | Tensor  # a number, or a 0-d tensor the kernels read on the device
    scaling: Scaling
    keep_grads: list[Tensor] | None = None
    momentum: Momentum | None = None  # FriendlySAM: passes A and B follow g - sigma·m
    mask: Mask | None = None  # ESAM: pass B moves the elements the mask keeps


@dataclass(frozen=True)
class Momentum:
    """FriendlySAM's momentum of first-pass gradients, folded into passes A and B of one group.
    With it, both passes use the direction

        d = g - sigma·m            (u = T·d in A; e from d in B)

    in place of g, and pass B also writes

        m_next = lmbda·m + gain·g

    reading ``current[i]`` (m, never written) and writing ``next[i]`` (both shaped like
    ``grads[i]``). When the norm is not finite, B writes ``m_next = m`` instead. The optimizer
    commits m_next once the step's update went ahead (so a skipped step leaves m as it was), and
    chooses the host numbers: (sigma·s, lmbda, (1 - lmbda)/s) for a loss scale s, and on a
    parameter's first step (0, 0, 1/s) with m zeros, which gives d = g and m_next = g/s."""

    current: list[Tensor]
    next: list[Tensor]
    sigma: float
    lmbda: float
    gain: float

    @property
    def kernel_scalars(self) -> tuple[float, float, float]:
        """The numbers the kernels read, in their order: [sigma, lmbda, gain]."""
        return (float(self.sigma), float(self.lmbda), float(self.gain))

    def with_tensors(self, current: list[Tensor], next: list[Tensor]) -> Momentum:
        """The same coefficients over other tensors (local shards)."""
        return replace(self, current=current, next=next)


def momentum_scalars(groups: list[PerturbGroup]) -> tuple[float, ...] | None:
    """The kernels' per-group array of :class:`Momentum` scalars, ``[sigma, lmbda, gain]`` of
    each group in order, or None when no group has a momentum. Every group with parameters has
    one, or none does."""
    given = {g.momentum is not None for g in groups if g.params}
    if len(given) > 1:
        raise ValueError("momentum must be given for every group or for none")
    if given != {True}:
        return None
    return tuple(x for g in groups
                 for x in (g.momentum.kernel_scalars if g.momentum else (0.0, 0.0, 0.0)))


_U32 = 0xFFFFFFFF
# The mask's 32-bit integer finaliser (``csrc/elementwise.h`` mix32): xor-shift by 16, multiply
# by _MIX[0], xor-shift by 15, multiply by _MIX[1], xor-shift by 15 (products modulo 2**32).
_MIX = (0x21F0AAAD, 0x735A2D97)


def _mix32(x: int) -> int:
    """The finaliser over one Python int below 2**32."""
    x ^= x >> 16
    x = (x * _MIX[0]) & _U32
    x ^= x >> 15
    x = (x * _MIX[1]) & _U32
    return x ^ (x >> 15)


def mask_key(seed: int, step: int) -> tuple[int, int]:
    """The two 32-bit words of a step's :class:`Mask` from a 64-bit ``seed`` and the step
    count (both >= 0): ``k0 = mix(seed_lo ^ mix(step_lo))``, ``k1 = mix(seed_hi ^ mix(k0 ^
    step_hi))`` (``_lo``/``_hi``: the low and high 32 bits)."""
    if seed < 0 or step < 0 or seed >> 64 or step >> 64:
        raise ValueError(f"seed and step must be in [0, 2**64), got {seed} and {step}")
    k0 = _mix32((seed & _U32) ^ _mix32(step & _U32))
    k1 = _mix32((seed >> 32) ^ _mix32(k0 ^ (step >> 32)))
    return k0, k1


@dataclass(frozen=True)
class Mask:
    """ESAM's stochastic weight perturbation in pass B of one group: each element keeps its
    ``e_i`` with probability ``keep`` and is not moved otherwise (w_old is written as ever;
    pass A is unchanged: the norm is of the whole gradient). The draws are counter-based, so
    every backend makes the same ones and a step is reproducible from ``key`` alone: for the
    tensor at ``position`` in the pass's lists (groups in order, then tensors in order) and
    element ``i`` of it (its index in the tensor's storage order, from 0, plus the tensor's
    entry of ``offsets``), with ``lo``/``hi`` the low/high 32 bits of ``i`` and all arithmetic
    modulo 2**32 (mix as :func:`mask_key`)::

        b = mix(key0 ^ mix(position)),  c = mix(key1 ^ b)
        draw = mix(mix(lo + b) ^ (c + hi))           uniform on [0, 2**32)
        moved  iff  draw < threshold,  threshold = min(2**32, ceil(keep·2**32))

    The scale 1/keep of the paper's ``e = (ρ/β)·m ⊙ g/‖g‖`` is the caller's (in ``rho``).
    ``offsets`` (one per tensor of the group, or None: 0 each) place a shard in its whole
    tensor: a shard of dim-0-sharded parameter (FSDP2's) draws what the whole tensor's elements
    draw there, so a sharded run moves the elements one process moves. Shards that are not
    contiguous blocks of their tensor draw with a key of their rank's instead
    (:meth:`for_rank`)."""

    keep: float
    key: tuple[int, int]
    offsets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"Mask.keep must be in (0, 1], got {self.keep}")
        if len(self.key) != 2 or any(not 0 <= k <= _U32 for k in self.key):
            raise ValueError(f"Mask.key must be two 32-bit unsigned integers, got {self.key}")
        if self.offsets is not None and any(not 0 <= o < 2**53 for o in self.offsets):
            raise ValueError("Mask.offsets must be element indices in [0, 2**53)")

    def for_rank(self, rank: int) -> Mask:
        """The mask of one rank's shards when they cannot be placed (``offsets``): ``key0``
        mixed with the rank, ``(mix(key0 ^ mix(rank + 1)), key1)``."""
        return replace(self, key=(_mix32(self.key[0] ^ _mix32((rank + 1) & _U32)), self.key[1]))

    @property
    def threshold(self) -> float:
        """``min(2**32, ceil(keep·2**32))`` as the kernels read it (an exact float64)."""
        return float(min(1 << 32, math.ceil(self.keep * 4294967296.0)))


def mask_scalars(groups: list[PerturbGroup]) -> tuple[tuple[float, ...], tuple[int, int]] | None:
    """The kernels' array of :class:`Mask` numbers, the thresholds of the groups in order and
    then, when a group has ``offsets``, every tensor's offset (groups in order; 0 where a group
    has none), as float64 values; and the step's key. None when no group has a mask. Every
    group with parameters has one, with the same key, or none does."""
    given = {g.mask is not None for g in groups if g.params}
    if len(given) > 1:
        raise ValueError("mask must be given for every group or for none")
    if given != {True}:
        return None
    keys = {g.mask.key for g in groups if g.mask is not None}
    if len(keys) != 1:
        raise ValueError(f"the groups' masks must share one key, got {sorted(keys)}")
    numbers = tuple(g.mask.threshold if g.mask else 0.0 for g in groups)
    offsets = [g.mask.offsets if g.mask is not None else None for g in groups]
    if any(o is not None for o in offsets):
        for g, placed in zip(groups, offsets):
            placed = (0,) * len(g.params) if placed is None else placed
            if len(placed) != len(g.params):
                raise ValueError(f"Mask.offsets has {len(placed)} entries for "
                                 f"{len(g.params)} tensors")
            numbers += tuple(map(float, placed))
    return numbers, keys.pop()


def mask_draws(key: tuple[int, int], position: int, numel: int, device: torch.device,
               start: int = 0) -> Tensor:
    """The draws of :class:`Mask` for elements ``start`` to ``start + numel`` of the tensor at
    ``position``, as an int64 tensor (the torch backend's mask; values < 2**32). Two tensors
    are made (the draws and a scratch); every step in between is in place."""
    b = _mix32(key[0] ^ _mix32(position & _U32))
    c = _mix32(key[1] ^ b)
    x = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    high = (x >> 32).add_(c).bitwise_and_(_U32) if start + numel > 1 << 32 else c
    scratch = torch.empty_like(x)
    _mix32_(x.add_(b).bitwise_and_(_U32), scratch)
    return _mix32_(x.bitwise_xor_(high), scratch)


def _mix32_(x: Tensor, scratch: Tensor) -> Tensor:
    """:func:`_mix32` in place over an int64 tensor of values < 2**32 (every product < 2**63)."""
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch))
    x.mul_(_MIX[0]).bitwise_and_(_U32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=scratch))
    x.mul_(_MIX[1]).bitwise_and_(_U32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=scratch))


@dataclass(frozen=True)
class PerturbationNorm:
    """What pass A hands pass B: ``total`` = S as a 0-d device tensor (fp32; fp64 when a
    parameter is fp64), the ``groups`` it was taken over, and what the backend ``prepared`` for
    them (its launch tables, the per-filter norms it computed on the way), which only that
    backend's :meth:`Backend.perturb` reads. Nothing passes between the two calls any other
    way: a backend keeps no state from one to the other."""

    total: Tensor
    groups: list[PerturbGroup]
    prepared: object = None


@dataclass(slots=True)  # (not frozen: a frozen dataclass costs ~0.8 us more to make, per
class SGDHyper:            # group and step; nothing changes one after it is made)
    """torch.optim.SGD hyper-parameters of one group (torch.optim's exact semantics).

    ``lr`` is a Python number or a one-element tensor; a tensor is read on the device by the
    kernels, never by the host; so is a 0-d tensor ``dampening`` (capturable: 0 while no update
    of the buffers went ahead). ``skip``: see :class:`AdamHyper`."""

    lr: float | Tensor
    momentum: float
    dampening: float | Tensor
    weight_decay: float
    nesterov: bool
    maximize: bool
    skip: Tensor | None = None
    clip: Tensor | None = None  # see AdamHyper

    @property
    def kernel_scalars(self) -> tuple:
        """The scalars the fused kernels read, in their order: [lr, momentum, dampening,
        weight_decay]."""
        return (self.lr, self.momentum, self.dampening, self.weight_decay)


@dataclass(slots=True)  # (not frozen: a frozen dataclass costs ~0.8 us more to make, per
class AdamHyper:            # group and step; nothing changes one after it is made)
    """torch.optim.Adam/AdamW hyper-parameters of one group; ``step`` is after the increment.
    ``lr`` as in :class:`SGDHyper` (then ``step_size`` is a tensor too).

    Sync-free updates (the optimizers' ``capturable=True``) give two device tensors instead of
    host values: ``skip``, a one-element fp32 flag (here and in :class:`SGDHyper`): when it is
    non-zero the update writes ``w ← w_old`` and nothing else (no state, no stored gradient,
    no average); and ``bias`` (``step`` None), an (n, 2) fp64 tensor of each tensor's bias
    corrections ``[lr/(1-β1^t), sqrt(1-β2^t)]`` in the order of the update's lists, from
    :func:`adam_bias_corrections` (the tensors of one update may be at different steps).

    ``clip`` (here and in :class:`SGDHyper`): the optimizers' ``max_grad_norm``, a 0-d device
    tensor (fp32, or fp64) that multiplies the gradient before anything else reads it, the
    gradient source's formula included (FreeSAM's :class:`Swap` stores the product); None: 1."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool  # AdamW: w ← w·(1 - lr·wd) instead of g ← g + wd·w
    amsgrad: bool
    maximize: bool
    step: float | None
    skip: Tensor | None = None
    bias: Tensor | None = None
    clip: Tensor | None = None

    @property
    def step_size(self) -> float | Tensor:
        if self.step is None:
            return 0.0  # per tensor in ``bias``
        return self.lr / (1.0 - self.beta1**self.step)

    @property
    def decay(self) -> float | Tensor:
        """AdamW's decoupled weight-decay factor 1 - lr·wd."""
        return 1.0 - self.lr * self.weight_decay

    @property
    def bias_correction2_sqrt(self) -> float:
        if self.step is None:
            return 0.0  # per tensor in ``bias``
        return (1.0 - self.beta2**self.step) ** 0.5

    @property
    def kernel_scalars(self) -> tuple:
        """The scalars the fused kernels read, in their order: [lr, β1, β2, eps, weight_decay,
        lr/(1-β1^t), sqrt(1-β2^t), 1 - lr·weight_decay]: :attr:`step_size`,
        :attr:`bias_correction2_sqrt` and :attr:`decay` formed inline (three property calls
        cost ~0.3 us, per group and step; tests/test_fused.py checks they agree)."""
        lr, step = self.lr, self.step
        if step is None:  # per tensor in ``bias``
            step_size = bias_correction2_sqrt = 0.0
        else:
            step_size = lr / (1.0 - self.beta1**step)
            bias_correction2_sqrt = (1.0 - self.beta2**step) ** 0.5
        return (lr, self.beta1, self.beta2, self.eps, self.weight_decay, step_size,
                bias_correction2_sqrt, 1.0 - lr * self.weight_decay)


@dataclass
class DecomposeGroup:
    """GSAM's gradient decomposition over one parameter group: ``grads`` are the adversarial
    gradients g_adv (rewritten in place), ``first_grads`` the gradients g of the first pass."""

    grads: list[Tensor]
    first_grads: list[Tensor]
    alpha: float


class GradientSource:
    """What pass C may use instead of the plain gradient, with its kernel encoding: every
    backend reads these attributes and none re-derives them (docs/design.md §2, §10).

    mode:
        the per-element formula's code (``csrc/kernels.h`` GradMode, the Triton kernels'
        GMODE); 0, the plain gradient, is no source at all (``None``).
    operand:
        the per-tensor list the formula reads beside g (``operand[i]`` like ``grads[i]``).
    scalar:
        a 0-d device tensor the formula reads (never read by the host), or None.
    coefficient:
        a host number the formula reads (GSAM's alpha; 0 where unused).
    writes_operand:
        whether the update also writes the operand (then it is part of what a skipped update
        leaves untouched).
    """

    mode: ClassVar[int]
    writes_operand: ClassVar[bool] = False
    operand_field: ClassVar[str]  # the dataclass field that holds the operand

    @property
    def coefficient(self) -> float:
        return 0.0

    @property
    def operand(self) -> list[Tensor]:
        return getattr(self, self.operand_field)

    @property
    def scalar(self) -> Tensor | None:
        return None

    def with_operand(self, operand: list[Tensor]) -> GradientSource:
        """The same source over other operand tensors (a subset, or local shards)."""
        return replace(self, **{self.operand_field: operand})

    def select(self, idx: list[int]) -> GradientSource:
        """The same source over the tensors at positions ``idx``."""
        operand = self.operand
        return self.with_operand([operand[i] for i in idx])


@dataclass(frozen=True)
class Decomposition(GradientSource):
    """GSAM's decomposition fused into pass C of one group: the update uses

        d = (1 + alpha·along)·g_adv - alpha·g

    instead of g_adv, where ``first_grads[i]`` is g of ``params[i]`` and ``along`` the 0-d
    device tensor returned by :meth:`Backend.gsam_along` (never read by the host)."""

    mode: ClassVar[int] = 1
    operand_field: ClassVar[str] = "first_grads"
    first_grads: list[Tensor]
    alpha: float
    along: Tensor

    @property
    def scalar(self) -> Tensor:
        return self.along

    @property
    def coefficient(self) -> float:
        return float(self.alpha)


@dataclass(frozen=True)
class Swap(GradientSource):
    """FreeSAM's gradient for pass C: the update of ``params[i]`` uses ``previous[i]`` (the
    gradient stored by the last step) and the same pass then stores this step's gradient
    there, ``previous[i] ← grads[i]``."""

    mode: ClassVar[int] = 2
    writes_operand: ClassVar[bool] = True
    operand_field: ClassVar[str] = "previous"
    previous: list[Tensor]


@dataclass(frozen=True)
class Correction(GradientSource):
    """LookSAM's gradient for pass C on a look-ahead step: the update of ``params[i]`` uses

        g + scale·directions[i]

    with ``scale`` a 0-d device tensor (alpha·‖g‖, never read by the host)."""

    mode: ClassVar[int] = 3
    operand_field: ClassVar[str] = "directions"
    directions: list[Tensor]
    scale: Tensor

    @property
    def scalar(self) -> Tensor:
        return self.scale


@dataclass(frozen=True)
class Average:
    """Weight averaging (SWA, EMA) folded into pass C: once ``params[i]`` holds its updated
    value w (as stored, rounded to its dtype), ``buffers[i]`` becomes

        avg = w                          when weight == 1 (the first average: an exact copy)
        avg  unchanged                   when weight == 0 (not averaged after this update)
        avg = avg + weight·(w - avg)     otherwise

    SWA's running mean of n earlier averages uses weight 1/(n + 1), an EMA 1 - decay. A 0-d
    fp64 tensor weight is read on the device (``capturable``: the schedule runs there, and an
    update it does not average passes weight 0)."""

    buffers: list[Tensor]
    weight: float | Tensor

    def with_buffers(self, buffers: list[Tensor]) -> Average:
        """The same averaging over other buffers (a subset, or local shards)."""
        return Average(buffers, self.weight)

    def select(self, idx: list[int]) -> Average:
        return self.with_buffers([self.buffers[i] for i in idx])


def foreach_average(params: list[Tensor], average: Average) -> None:
    """:class:`Average` as one foreach call of its own over ``params``."""
    if not params:
        return
    weight = average.weight
    if isinstance(weight, Tensor):  # on the device: weights 1 and 0 selected, as the kernels do
        as_dtype = {p.dtype: weight.to(p.dtype) for p in params}
        lerped = torch._foreach_lerp(average.buffers, params, [as_dtype[p.dtype] for p in params])
        copy, keep = weight == 1.0, weight == 0.0
        torch._foreach_copy_(average.buffers, [
            torch.where(copy, p, torch.where(keep, avg, new))
            for p, avg, new in zip(params, average.buffers, lerped)
        ])
    elif weight == 1.0:
        torch._foreach_copy_(average.buffers, params)
    else:
        torch._foreach_lerp_(average.buffers, params, weight)


def adam_bias_corrections(steps: list[Tensor], beta1: float, beta2: float,
                          lr: float | Tensor) -> Tensor:
    """:attr:`AdamHyper.bias` on the device: per step tensor ``t`` (0-d, already incremented),
    ``[lr/(1-β1^t), sqrt(1-β2^t)]`` in fp64, the values torch.optim computes on the host."""
    t = torch.stack(steps).to(torch.float64)
    if isinstance(lr, Tensor):
        lr = lr.to(device=t.device, dtype=torch.float64)
    step_size = lr / (1.0 - torch.pow(beta1, t))
    return torch.stack([step_size, (1.0 - torch.pow(beta2, t)).sqrt()], dim=1)


def gsam_along_from_sums(sums: Tensor, eps: float) -> Tensor:
    """GSAM's ``along`` (:meth:`Backend.gsam_along`) from ``sums = [⟨g, g_adv⟩, ‖g_adv‖²,
    ‖g‖²]``, as a 0-d tensor of the sums' dtype, on their device."""
    adv_norm, first_norm = sums[1].sqrt(), sums[2].sqrt()
    cosine = sums[0] / (adv_norm * first_norm + eps)
    return cosine * first_norm / (adv_norm + eps)


def accumulation_dtype(tensors: list[Tensor]) -> torch.dtype:
    """The dtype reductions over ``tensors`` accumulate in (and return): fp64 when one of them
    is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _widen(tensors: list[Tensor], acc) -> list[Tensor]:
    """Tensors narrower than fp32 as copies in ``acc`` (the reductions' accumulation dtype);
    fp32 and fp64 tensors as they are."""
    return [t if t.dtype in (torch.float32, torch.float64) else t.to(acc) for t in tensors]


def dual_exponent(p: float) -> float:
    """q with 1/p + 1/q = 1 (p = 2 → 2, p = ∞ → 1)."""
    return 1.0 if math.isinf(p) else p / (p - 1.0)


class Backend:
    """The passes of docs/design.md §2. A backend overrides every method below that raises
    NotImplementedError; the others have portable defaults (torch operators) it may replace.

    No method synchronises with the host: reductions stay on the device as 0-d fp32 tensors.
    """

    name: str = "abstract"

    def local(self, tensors: list[Tensor]) -> list[Tensor]:
        """The tensors the passes work on: ``tensors`` themselves, or, for sharded parameters
        (FSDP2's DTensors), their local shards. Foreach code outside the passes uses these."""
        return tensors

    def sum_over_shards(self, partial: Tensor) -> Tensor:
        """A sum computed over :meth:`local` tensors made global (in place): the identity, or an
        all-reduce across the shards for sharded parameters."""
        return partial

    def any_over_shards(self, flag: Tensor) -> Tensor:
        """A 0/1 flag computed over :meth:`local` tensors made global (in place): 1 where a
        shard's is; the identity, or an all-reduce (max) across the shards."""
        return flag

    def perturbation_norm(self, groups: list[PerturbGroup], q: float) -> PerturbationNorm:
        """Pass A. ``S = Σ |T·g|^q`` over every tensor of every group, as the ``total`` (a 0-d
        tensor on the parameters' device, fp32 accumulation) of a :class:`PerturbationNorm`.
        A group with a :class:`Momentum` contributes ``Σ |T·d|^q``, d = g - sigma·m."""
        raise NotImplementedError

    def perturb(self, norm: PerturbationNorm, p: float, eps: float, skipped: Tensor) -> None:
        """Pass B over the groups of ``norm`` (what :meth:`perturbation_norm` returned, its
        total possibly made global in place): ``w_old ← w`` and ``w ← w + e`` for every tensor
        (formula in the module docstring, ``rho`` per group). If the total is not finite the
        perturbation is zero and ``skipped`` (0-d fp32) is set to 1, else to 0. A group with a
        :class:`Momentum` perturbs along d and writes its ``next`` momentum (``m`` itself when
        the total is not finite)."""
        raise NotImplementedError

    def restore(self, params: list[Tensor], w_old: list[Tensor]) -> None:
        """Pass C without an update: ``w ← w_old`` exactly."""
        raise NotImplementedError

    def clip_coefficient(self, square_sum: Tensor, max_norm: float, out: Tensor) -> bool:
        """max_grad_norm's coefficient ``min(1, max_norm / (sqrt(square_sum) + 1e-6))`` into
        the 0-d ``out`` (the dtype of ``square_sum``), rounded as torch's operators round it
        step by step, in one call; False, with nothing written, where the backend has no such
        call for these tensors (the optimizer then forms it with torch's operators)."""
        return False

    def wsam_decoupled(self, params: list[Tensor], first: list[Tensor], grads: list[Tensor],
                       alpha: float, clip: Tensor | None = None) -> None:
        """WSAM's decoupled term after its update (:class:`fastsam.WSAM`): ``first ← first −
        clip·g``, then ``w ← w + alpha·first``; ``clip`` is max_grad_norm's 0-d coefficient (1
        when None). Here torch's foreach operators (two passes); the native backends fuse them
        into one."""
        torch._foreach_sub_(first, grads if clip is None else torch._foreach_mul(grads, clip))
        torch._foreach_add_(params, first, alpha=alpha)

    def restore_sgd(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        w_old: list[Tensor],
        momentum_buffers: list[Tensor],
        hyper: SGDHyper,
        fresh_buffers: bool,
        source: GradientSource | None = None,
        average: Average | None = None,
    ) -> None:
        """Pass C fused with torch.optim.SGD::

            g = (1 + alpha·along)·g - alpha·g_first     source Decomposition (GSAM)
            g, g_prev = g_prev, g                        source Swap (FreeSAM)
            g = g + scale·u_v                            source Correction (LookSAM)
            d = ±g + wd·w_old
            buf = d                      if fresh_buffers  (torch.optim's first step)
            buf = m·buf + (1 - damp)·d   otherwise
            d = d + m·buf if nesterov else buf          (when m ≠ 0)
            w = w_old - lr·d

        ``momentum_buffers`` is empty when momentum is 0. ``w_old[i]`` may be ``params[i]``
        itself (a parameter that was not perturbed). With ``average``, the same pass then
        averages the new w into its buffers (:class:`Average`). When ``hyper.skip`` holds a
        non-zero flag (read on the device): ``w ← w_old`` and nothing else is written."""
        raise NotImplementedError

    def restore_adam(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        w_old: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        hyper: AdamHyper,
        source: GradientSource | None = None,
        average: Average | None = None,
    ) -> None:
        """Pass C fused with torch.optim.Adam/AdamW (every tensor at the same ``hyper.step``)::

            g = (1 + alpha·along)·g - alpha·g_first     source Decomposition (GSAM)
            g, g_prev = g_prev, g                        source Swap (FreeSAM)
            g = g + scale·u_v                            source Correction (LookSAM)
            w = w_old·(1 - lr·wd) if decoupled;  g = ±g (+ wd·w_old if not decoupled)
            m = lerp(m, g, 1 - β1);  v = β2·v + (1 - β2)·g²;  v̂ = max(v̂, v) if amsgrad
            w = w - lr/(1 - β1^t) · m / (sqrt(v or v̂)/sqrt(1 - β2^t) + eps)

        ``max_exp_avg_sqs`` is empty unless amsgrad. ``average`` and ``hyper.skip`` as in
        :meth:`restore_sgd`; with ``hyper.bias``, tensor i's bias corrections are its row."""
        raise NotImplementedError

    def gsam_along(self, groups: list[DecomposeGroup], eps: float) -> Tensor:
        """GSAM's reduction pass, one read of g_adv and g for every group together::

            cos   = ⟨g, g_adv⟩ / (‖g_adv‖·‖g‖ + eps)
            along = cos·‖g‖ / (‖g_adv‖ + eps)

        returned as a 0-d tensor on the device (fp32; fp64 when a gradient is fp64). The part of
        g orthogonal to g_adv is then ``v = g - along·g_adv`` (the official code's eps
        placement), and the update uses ``g_adv - alpha·v = (1 + alpha·along)·g_adv -
        alpha·g`` (:class:`Decomposition`). The fused backends override this (one reduction
        launch and one combining launch); this default is :meth:`gsam_sums` then
        :func:`gsam_along_from_sums`."""
        return gsam_along_from_sums(self.gsam_sums(groups), eps)

    def gsam_sums(self, groups: list[DecomposeGroup]) -> Tensor:
        """The three sums behind :meth:`gsam_along`, ``[⟨g, g_adv⟩, ‖g_adv‖², ‖g‖²]``, as a
        1-d tensor of 3 on the device (fp32; fp64 when a gradient is fp64). Sharded parameters
        (FSDP2) all-reduce these before combining them. This default is foreach ops."""
        adv = [t for g in groups for t in g.grads]
        first = [t for g in groups for t in g.first_grads]
        acc = accumulation_dtype(adv)
        if not adv:
            return torch.zeros(3, dtype=acc)
        wide_adv, wide_first = _widen(adv, acc), _widen(first, acc)
        inner = torch.stack(
            [t.sum(dtype=acc) for t in torch._foreach_mul(wide_first, wide_adv)]
        ).sum()
        adv_sq = torch.stack(torch._foreach_norm(wide_adv)).to(acc).square().sum()
        first_sq = torch.stack(torch._foreach_norm(wide_first)).to(acc).square().sum()
        return torch.stack([inner, adv_sq, first_sq])

    def gsam_decompose(self, groups: list[DecomposeGroup], eps: float) -> None:
        """``g_adv ← (1 + alpha·along)·g_adv - alpha·g`` in place, for a base optimizer whose
        update is not fused: :meth:`gsam_along`, then one foreach pass per group."""
        along = self.gsam_along(groups, eps)
        for group in groups:
            if group.alpha == 0.0 or not group.grads:
                continue
            torch._foreach_mul_(group.grads, (1.0 + group.alpha * along).to(group.grads[0].dtype))
            torch._foreach_add_(group.grads, group.first_grads, alpha=-group.alpha)
