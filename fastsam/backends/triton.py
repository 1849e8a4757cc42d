"""The ``triton`` backend: launchers for the multi-tensor kernels in ``triton_kernels/``.

Launches per SAM step, whatever the number of tensors (one dtype combination, one group):
norm stage 1 + norm stage 2 + perturb + restore/update = 4; GSAM adds its reduction (two
stages) = 6, the copy of g and the decomposition riding in the perturb and update launches.
Each extra dtype combination adds one launch per pass, each extra parameter group one
restore/update launch.

Each launch walks a segment table (tensor index, start, length) and reads base addresses from
int64 tables, both built on the host once and cached: a table is rebuilt only when an address,
a shape or a per-group option changes (e.g. gradients re-allocated by
``zero_grad(set_to_none=True)`` at a new address; rho is read from a small per-step array, so a
rho schedule rebuilds nothing). Uploads are asynchronous from pinned memory, so the step never
waits for the host. Scratch buffers (norm partials, filter norms, the norm itself) are cached
too: in steady state a step allocates nothing on the device.

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``), which
is how the test suite checks them without a GPU.
"""
from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Hashable
from operator import attrgetter

import torch
from torch import Tensor

from ..functional import (
    AdamHyper,
    Average,
    Backend,
    DecomposeGroup,
    GradientSource,
    PerturbationNorm,
    PerturbGroup,
    SGDHyper,
    accumulation_dtype,
    dual_exponent,
    mask_scalars,
    momentum_scalars,
)
from ._constants import ConstantArrays, LRUCache, dense, held_for_graphs, upload

try:
    import triton.language as tl

    from .triton_kernels import sam as K

    _ACC = {torch.float64: tl.float64, torch.float32: tl.float32}

    _IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # keep the reason: shown when the backend is asked for
    _IMPORT_ERROR = exc

# Launch shape, from bench/triton_tuning.py on an H100 (bench/results/): 512 elements per loop
# iteration (one 16-byte vector per thread per stream with 4 warps), 8192-element segments.
# GPT-2-medium step at 1.15x the copy floor, ResNet-50 at 1.63x (1024/8192: 1.30x and 1.69x).
# Under Triton's interpreter (CPU tests) small blocks only cost Python iterations: 4096 keeps
# two iterations per segment, so the loop and multi-segment paths are still exercised.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 4096 if _INTERPRETING else 512  # elements per loop iteration of a program
CHUNK = 8192  # elements per segment (one program) for element-wise passes
NUM_WARPS = 4
SUM_BLOCK = 1024


def unavailable_reason(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device``, or None when it can."""
    if _IMPORT_ERROR is not None:
        return f"triton is not importable ({_IMPORT_ERROR!r}); pip install triton"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (
            "parameters are on cpu: Triton kernels need CUDA tensors "
            "(TRITON_INTERPRET=1 runs them in Triton's interpreter, for testing)"
        )
    return f"parameters are on {device.type}: Triton kernels need CUDA tensors"


def _acc(t: Tensor):
    """Compute dtype of a launch: fp64 for fp64 storage, fp32 for everything else."""
    return _ACC[accumulation_dtype([t])]


class _Table:
    """Device-side description of one launch: segments, addresses per role, per-tensor values."""

    def __init__(
        self,
        device: torch.device,
        roles: dict[str, list[Tensor]],
        seg_lens: list[int],
        per_tensor: dict[str, tuple[torch.dtype, list]],
    ) -> None:
        first = next(iter(roles.values()))
        numels = torch.tensor([t.numel() for t in first], dtype=torch.int64)
        lens = torch.tensor(seg_lens, dtype=torch.int64)
        counts = (numels + lens - 1) // lens
        seg_tensor = torch.repeat_interleave(torch.arange(len(first), dtype=torch.int32), counts)
        first_seg = torch.cumsum(counts, 0) - counts
        local = torch.arange(int(counts.sum()), dtype=torch.int64) - first_seg[seg_tensor]
        seg_start = local * lens[seg_tensor]
        seg_len = torch.minimum(lens[seg_tensor], numels[seg_tensor] - seg_start)
        self.n_segments = int(seg_tensor.numel())
        self.seg = tuple(upload(x, device) for x in (seg_tensor, seg_start, seg_len))
        self.addr = {
            role: upload(torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64), device)
            for role, ts in roles.items()
        }
        self.values = {
            name: upload(torch.tensor(vals, dtype=dtype), device)
            for name, (dtype, vals) in per_tensor.items()
        }
        self.ref = {role: ts[0] for role, ts in roles.items()}  # dtype carriers
        self.acc = _acc(self.ref["w"])
        # Vector-width hints are valid when every base address is 16-byte aligned and every
        # segment starts at a multiple of BLOCK elements.
        self.aligned = all(
            t.data_ptr() % 16 == 0 for ts in roles.values() for t in ts
        ) and all(L % BLOCK == 0 or c <= 1 for L, c in zip(seg_lens, counts.tolist()))


def _layout(t: Tensor) -> tuple:
    """The strides of the dims with more than one element: what says how ``t`` lies in memory."""
    return tuple(st for s, st in zip(t.shape, t.stride()) if s != 1)


def _check_layout(roles: dict[str, list[Tensor]]) -> None:
    """Every tensor dense and laid out as its parameter (roles["w"][i]): the kernels walk each
    one's memory linearly, so element k of one is element k of every other (channels_last
    works like contiguous)."""
    for role, tensors in roles.items():
        for w, t in zip(roles["w"], tensors):
            if not dense(t):
                raise ValueError(
                    f"triton backend: a {role} tensor of shape {tuple(t.shape)} is not dense "
                    f"(strides {t.stride()}); make it contiguous or use backend='torch'"
                )
            if t.numel() and _layout(t) != _layout(w):
                raise ValueError(
                    f"triton backend: a {role} tensor has strides {t.stride()} but its "
                    f"parameter has {w.stride()} (another memory format): give it its "
                    "parameter's layout (torch.empty_like(p) does) or use backend='torch'"
                )


def _by_dtypes(roles: dict[str, list[Tensor]]) -> list[list[int]]:
    """Indices of the non-empty tensors, split by the dtype combination across roles."""
    out: dict[tuple, list[int]] = {}
    for i, w in enumerate(roles["w"]):
        if w.numel() > 0:
            out.setdefault(tuple(ts[i].dtype for ts in roles.values()), []).append(i)
    return list(out.values())


def _pick(roles: dict[str, list[Tensor]], idx: list[int]) -> dict[str, list[Tensor]]:
    return {r: [ts[i] for i in idx] for r, ts in roles.items()}


_shape = attrgetter("shape")


class _LayoutKey:
    """``fastsam._C.layout_key``'s (hash, bytes) as a dict key: hashed by the C loop's hash,
    equal when the bytes are (one memcmp)."""

    __slots__ = ("_hash", "_bytes")

    def __init__(self, pair: tuple[int, bytes]) -> None:
        self._hash, self._bytes = pair

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (type(other) is _LayoutKey and self._hash == other._hash
                and self._bytes == other._bytes)


def _layout_key(roles: dict[str, list[Tensor]]) -> Hashable:
    """What a table depends on: every address and dtype, the parameters' shapes and strides;
    any moved or re-allocated tensor changes it. Formed at every launch: by one C loop
    (``fastsam._C.layout_key``, several times faster than Python's per-tensor calls:
    bench/layout_key.py) where the extension is built, else by ``data_ptr()`` calls through
    map."""
    lists = tuple(roles.values())
    if _layout_key_in_c is not None:
        return _LayoutKey(_layout_key_in_c(lists))
    return _layout_key_in_python(lists)


def _layout_key_in_python(lists: tuple[list[Tensor], ...]) -> tuple:
    """:func:`_layout_key` without the extension (the parameters' list first)."""
    return tuple(tuple(map(Tensor.data_ptr, ts)) for ts in lists) + (
        tuple(map(_shape, lists[0])), tuple(map(Tensor.stride, lists[0])),
        tuple(t.dtype for ts in lists for t in ts),
    )


try:
    from .._C import layout_key as _layout_key_in_c
except (ImportError, OSError):  # a pure-Python install (or a broken build): the key in Python
    _layout_key_in_c = None


def _keeps_gradients(groups: list[PerturbGroup]) -> bool:
    """Whether the perturb pass also copies g (every group gives keep_grads, or none does)."""
    keep = {g.keep_grads is not None for g in groups if g.params}
    if len(keep) > 1:
        raise ValueError("keep_grads must be given for every group or for none")
    return keep == {True}


def _group_roles(g: PerturbGroup) -> dict[str, list[Tensor]]:
    roles = {"w": g.params, "g": g.grads, "old": g.w_old}
    if g.keep_grads is not None:
        roles["keep"] = g.keep_grads
    if g.momentum is not None:
        roles["m"], roles["m_next"] = g.momentum.current, g.momentum.next
    return roles


def _roles_key(groups: list[PerturbGroup]) -> tuple:
    return tuple((_layout_key(_group_roles(g)), g.scaling) for g in groups)


class _PerturbPlan:
    """The launches of passes A and B over a set of groups, and their scratch offsets."""

    def __init__(self, groups: list[PerturbGroup]) -> None:
        roles = {
            "w": [p for g in groups for p in g.params],
            "g": [t for g in groups for t in g.grads],
            "old": [t for g in groups for t in g.w_old],
        }
        self.keep = _keeps_gradients(groups)
        if self.keep:
            roles["keep"] = [t for g in groups for t in g.keep_grads]
        self.momentum = momentum_scalars(groups) is not None
        if self.momentum:
            roles["m"] = [t for g in groups for t in g.momentum.current]
            roles["m_next"] = [t for g in groups for t in g.momentum.next]
        _check_layout(roles)
        mode, eta, group_of, seg_lens = [], [], [], []
        for k, group in enumerate(groups):
            kind = group.scaling.mode
            for p in group.params:
                m = 1 if (kind == 2 and p.dim() < 2) else kind  # 1-D: element-wise T
                if m == 2 and p.numel() and p.stride(0) * p.shape[0] != p.numel():
                    raise ValueError(
                        f"triton backend: a parameter of shape {tuple(p.shape)} has strides "
                        f"{p.stride()}: filter-wise ASAM needs each filter (a slice along dim "
                        "0) contiguous in memory, dim 0 outermost"
                    )
                mode.append(m)
                eta.append(group.scaling.eta)
                group_of.append(k)
                seg_lens.append(p.numel() // p.shape[0] if m == 2 and p.numel() else CHUNK)
        device = next(p.device for g in groups for p in g.params)
        self.launches: list[tuple[_Table, int]] = []
        self.n_segments = 0
        for idx in _by_dtypes(roles):
            table = _Table(
                device,
                _pick(roles, idx),
                [seg_lens[i] for i in idx],
                {
                    "mode": (torch.int32, [mode[i] for i in idx]),
                    "eta": (torch.float64, [eta[i] for i in idx]),
                    "group": (torch.int32, [group_of[i] for i in idx]),
                    "index": (torch.int32, idx),  # positions in the lists (ESAM's mask)
                },
            )
            self.launches.append((table, self.n_segments))
            self.n_segments += table.n_segments
        # fp64 parameters get an fp64 norm; everything else accumulates in fp32.
        self.acc = accumulation_dtype(roles["w"])
        self.device = device


def _source_args(table: _Table, source: GradientSource | None) -> tuple:
    """The operand addresses and the scalar of an update launch's gradient source (unused
    stand-ins where the source has none)."""
    if source is None:
        return table.addr["g"], table.addr["g"]
    scalar = source.scalar
    return table.addr["first"], table.addr["g"] if scalar is None else scalar


def _update_roles(roles: dict, source: GradientSource | None, average: Average | None) -> None:
    """The roles of an update launch beyond the optimizer's: the source's operand, the
    averaged weights."""
    if source is not None:
        roles["first"] = source.operand
    if average is not None:
        roles["avg"] = average.buffers


def _extra_scalars(source: GradientSource | None, average: Average | None) -> tuple:
    """The update kernels' scalars after the optimizer's: the source's coefficient, the
    averaging weight (0 where unused)."""
    return (source.coefficient if source is not None else 0.0,
            average.weight if average is not None else 0.0)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self) -> None:
        self.launches = 0  # kernel launches so far: read by tests and benchmarks
        self._plans = LRUCache()
        self._constants = ConstantArrays()
        self._scratch: dict[tuple, Tensor] = {}

    # ---------------------------------------------------------------- plumbing
    def _hyper(self, values: tuple, device: torch.device) -> tuple[Tensor, list[int], bool]:
        """An update's scalars as its kernel takes them (sam.py _hyper): by value, each number's
        fp64 bit pattern as an int argument (beside a stand-in array); or, when a value is a
        tensor (an lr given as one), the device array the kernel reads instead (beside zeros).
        The last entry says which: True for the device array."""
        if any(isinstance(v, Tensor) for v in values):
            return self._constants(values, device), [0] * len(values), True
        packed = struct.pack(f"<{len(values)}d", *values)
        return (self._buffer("hp_stand_in", 1, device, torch.float64),
                list(struct.unpack(f"<{len(values)}q", packed)), False)

    def _launch(self, kernel, n_programs: int, *args, **meta) -> None:
        if n_programs:
            self.launches += 1
            kernel[(n_programs,)](*args, num_warps=NUM_WARPS, **meta)

    def _cached(self, key: Hashable, build: Callable[[], object]):
        """A plan, rebuilt only when its key (addresses, shapes, options) changes, e.g. after
        ``zero_grad(set_to_none=True)`` moved the gradients."""
        return self._plans.get_or_build(key, build)

    def _buffer(self, name: str, numel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, device, dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._scratch[key] = torch.empty(max(numel, 1), dtype=dtype, device=device)
        return held_for_graphs(buf)

    # ---------------------------------------------------------------- pass A
    def perturbation_norm(self, groups: list[PerturbGroup], q: float) -> PerturbationNorm:
        key = ("perturb",) + _roles_key(groups)
        plan = self._cached(key, lambda: _PerturbPlan(groups))
        partials = self._buffer("partials", plan.n_segments, plan.device, plan.acc)
        filter_T = self._buffer("filter_T", plan.n_segments, plan.device, plan.acc)
        norm_sum = self._buffer("norm_sum", 1, plan.device, plan.acc)[0]
        hp = self._constants((q,), plan.device)
        momentum = self._momentum(groups, plan)
        qmode = 0 if q == 2.0 else 1 if q == 1.0 else 2
        for table, start in plan.launches:
            self._launch(
                K.norm_partials_kernel, table.n_segments,
                *table.seg, table.addr["w"], table.addr["g"],
                table.values["mode"], table.values["eta"],
                partials[start:], filter_T[start:], hp, table.addr.get("m", table.addr["g"]),
                table.values["group"], momentum, table.ref["w"], table.ref["g"],
                QMODE=qmode, MOM=plan.momentum, ACC=table.acc, ALIGNED=table.aligned,
                BLOCK=BLOCK,
            )
        self._launch(
            K.sum_kernel, 1, partials, plan.n_segments, norm_sum,
            ACC=_ACC[plan.acc], BLOCK=SUM_BLOCK,
        )
        return PerturbationNorm(norm_sum, groups, (plan, filter_T, momentum))

    def _momentum(self, groups: list[PerturbGroup], plan: _PerturbPlan) -> Tensor:
        """FriendlySAM's [sigma, lmbda, gain] per group as a device array (an unread stand-in
        without a momentum)."""
        scalars = momentum_scalars(groups) if plan.momentum else None
        return self._constants(scalars or (0.0,), plan.device)

    # ---------------------------------------------------------------- pass B
    def perturb(self, norm: PerturbationNorm, p: float, eps: float, skipped: Tensor) -> None:
        # The plan and the filter norms of the perturbation_norm call just made over the same
        # groups (the engine calls the two in a row: the filter norms are in scratch).
        (plan, filter_T, momentum), groups, norm_sum = norm.prepared, norm.groups, norm.total
        q = dual_exponent(p)
        qmode = 0 if q == 2.0 else 1 if q == 1.0 else 2
        hp = self._constants((q, 0.0 if math.isinf(p) else 1.0 / p, eps), plan.device)
        rho = self._constants(tuple(g.rho for g in groups), plan.device)
        mask = mask_scalars(groups)  # ESAM's: thresholds per group (constant), the step's key
        thresholds = self._constants(mask[0] if mask else (0.0,), plan.device)
        # where the per-tensor offsets start in that array (after the groups'), -1: none
        offset_at = len(groups) if mask and len(mask[0]) > len(groups) else -1
        # the key's words by value, as int64 (bit 32 set: one argument type whatever the key)
        key = (0, 0) if mask is None else tuple(k | 1 << 32 for k in mask[1])
        if not plan.launches:
            skipped.zero_()
        for table, start in plan.launches:
            self._launch(
                K.perturb_kernel, table.n_segments,
                *table.seg, table.addr["w"], table.addr["g"], table.addr["old"],
                table.values["mode"], table.values["eta"], table.values["group"], rho,
                filter_T[start:], norm_sum, skipped, hp,
                table.addr.get("keep", table.addr["g"]), table.addr.get("m", table.addr["g"]),
                table.addr.get("m_next", table.addr["g"]), momentum,
                table.values["index"], thresholds, offset_at, *key,
                table.ref["w"], table.ref["g"],
                QMODE=qmode, KEEP=plan.keep, MOM=plan.momentum, MASK=mask is not None,
                ACC=table.acc, ALIGNED=table.aligned, BLOCK=BLOCK,
            )

    # ---------------------------------------------------------------- pass C
    def _update_tables(self, roles: dict[str, list[Tensor]]) -> list[_Table]:
        """One table per dtype combination of the roles (cached by addresses and shapes)."""

        def build() -> list[_Table]:
            _check_layout(roles)
            device = roles["w"][0].device
            # "index": each table tensor's position in the caller's lists (AdamHyper.bias rows)
            return [
                _Table(device, _pick(roles, idx), [CHUNK] * len(idx),
                       {"index": (torch.int64, idx)})
                for idx in _by_dtypes(roles)
            ]

        if not roles["w"]:
            return []
        return self._cached(("update", tuple(roles), _layout_key(roles)), build)

    def restore(self, params: list[Tensor], w_old: list[Tensor]) -> None:
        for table in self._update_tables({"w": params, "old": w_old}):
            self._launch(
                K.restore_kernel, table.n_segments, *table.seg,
                table.addr["w"], table.addr["old"], table.ref["w"],
                ALIGNED=table.aligned, BLOCK=BLOCK,
            )

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
        has_momentum = hyper.momentum != 0
        roles = {"w": params, "g": grads, "old": w_old}
        if has_momentum:
            roles["buf"] = momentum_buffers
        _update_roles(roles, source, average)
        constants = hyper.kernel_scalars + _extra_scalars(source, average)
        for table in self._update_tables(roles):
            hp, bits, on_device = self._hyper(constants, table.ref["w"].device)
            self._launch(
                K.sgd_kernel, table.n_segments, *table.seg,
                table.addr["w"], table.addr["g"], table.addr["old"],
                table.addr.get("buf", table.addr["w"]), hp, *bits,
                *_source_args(table, source), table.addr.get("avg", table.addr["w"]),
                hp if hyper.skip is None else hyper.skip, self._clip(hyper.clip, table),
                table.ref["w"], table.ref["g"], table.ref.get("buf", table.ref["w"]),
                HAS_MOMENTUM=has_momentum, FRESH=fresh_buffers, NESTEROV=hyper.nesterov,
                MAXIMIZE=hyper.maximize, GMODE=source.mode if source else 0,
                AVG=average is not None, SKIP=hyper.skip is not None,
                HP_DEVICE=on_device, ACC=table.acc, ALIGNED=table.aligned, BLOCK=BLOCK,
            )

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
        roles = {"w": params, "g": grads, "old": w_old, "m": exp_avgs, "v": exp_avg_sqs}
        if hyper.amsgrad:
            roles["vmax"] = max_exp_avg_sqs
        _update_roles(roles, source, average)
        constants = hyper.kernel_scalars + _extra_scalars(source, average)
        for table in self._update_tables(roles):
            hp, bits, on_device = self._hyper(constants, table.ref["w"].device)
            self._launch(
                K.adam_kernel, table.n_segments, *table.seg,
                table.addr["w"], table.addr["g"], table.addr["old"], table.addr["m"],
                table.addr["v"], table.addr.get("vmax", table.addr["v"]), hp, *bits[1:],
                *_source_args(table, source), table.addr.get("avg", table.addr["w"]),
                hp if hyper.skip is None else hyper.skip,
                hp if hyper.bias is None else hyper.bias, table.values["index"],
                self._clip(hyper.clip, table), table.ref["w"], table.ref["g"], table.ref["m"],
                DECOUPLED=hyper.decoupled, AMSGRAD=hyper.amsgrad, MAXIMIZE=hyper.maximize,
                GMODE=source.mode if source else 0, AVG=average is not None,
                SKIP=hyper.skip is not None, BIAS=hyper.bias is not None,
                HP_DEVICE=on_device, ACC=table.acc, ALIGNED=table.aligned, BLOCK=BLOCK,
            )

    def _clip(self, clip: Tensor | None, table: _Table) -> Tensor:
        """max_grad_norm's coefficient, or a kept 1 where there is none."""
        return clip if clip is not None else self._constants((1.0,), table.ref["w"].device)

    # ---------------------------------------------------------------- GSAM's reduction
    def gsam_along(self, groups: list[DecomposeGroup], eps: float) -> Tensor:
        return self._gsam_reduce(groups, eps)

    def gsam_sums(self, groups: list[DecomposeGroup]) -> Tensor:
        return self._gsam_reduce(groups, None)

    def _gsam_reduce(self, groups: list[DecomposeGroup], eps: float | None) -> Tensor:
        """Stage 1 (per-segment partials), then stage 2: ``along`` with ``eps``, the three
        sums without."""
        adv = [t for g in groups for t in g.grads]
        acc = accumulation_dtype(adv)
        sums = eps is None
        if not adv:
            return torch.zeros(3 if sums else (), dtype=acc)
        roles = {"w": adv, "first": [t for g in groups for t in g.first_grads]}
        tables = self._update_tables(roles)
        device = adv[0].device
        n_segments = sum(table.n_segments for table in tables)
        partials = self._buffer("gsam_partials", 3 * n_segments, device, acc)
        out = self._buffer("gsam_sums", 3, device, acc)[:3] if sums else (
            self._buffer("gsam_along", 1, device, acc)[0])
        start = 0
        for table in tables:
            self._launch(
                K.gsam_partials_kernel, table.n_segments, *table.seg,
                table.addr["w"], table.addr["first"], partials[3 * start:], table.ref["w"],
                ACC=table.acc, ALIGNED=table.aligned, BLOCK=BLOCK,
            )
            start += table.n_segments
        self._launch(
            K.gsam_along_kernel, 1, partials, n_segments,
            self._constants((0.0 if sums else eps,), device), out,
            SUMS=sums, ACC=_ACC[acc], BLOCK=SUM_BLOCK,
        )
        return out
