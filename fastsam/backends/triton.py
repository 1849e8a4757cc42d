"""The ``triton`` backend: launchers for the multi-tensor kernels in ``triton_kernels/``.

Launches per SAM step, whatever the number of tensors (one dtype combination, one group):
norm stage 1 + norm stage 2 + perturb + restore/update = 4. Each extra dtype combination adds
one launch per pass, each extra parameter group one restore/update launch.

Each launch walks a segment table (tensor index, start, length) and reads base addresses from
int64 tables, both built on the host once and cached: a table is rebuilt only when a pointer,
a size or a per-tensor option changes (e.g. gradients re-allocated by
``zero_grad(set_to_none=True)`` at a new address), and the upload is asynchronous from pinned
memory, so the step never waits for the host. Scratch buffers (norm partials, filter norms,
the norm itself) are cached too: after the first step a step allocates nothing on the device.

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``), which
is how the test suite checks them without a GPU.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from ..functional import AdamHyper, Backend, PerturbGroup, SGDHyper, dual_exponent

try:
    import triton.language as tl

    from .triton_kernels import sam as K

    _ACC = {torch.float64: tl.float64, torch.float32: tl.float32}

    _IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # keep the reason: shown when the backend is asked for
    _IMPORT_ERROR = exc

BLOCK = 1024  # elements per loop iteration of a program
CHUNK = 8 * BLOCK  # elements per segment (a program) for element-wise passes
SUM_BLOCK = 1024
_MODES = {"none": 0, "element": 1, "filter": 2}
_CACHE_SIZE = 32


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
    return _ACC[torch.float64 if t.dtype == torch.float64 else torch.float32]


def _upload(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return host
    # Pinned + non_blocking: the copy is queued on the stream, the host does not wait. A fresh
    # pinned tensor per upload: the caching host allocator keeps it alive until the copy is done.
    return host.pin_memory().to(device, non_blocking=True)


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
        n = len(first)
        seg_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int32), counts)
        first_seg = torch.cumsum(counts, 0) - counts
        local = torch.arange(int(counts.sum()), dtype=torch.int64) - first_seg[seg_tensor]
        seg_start = local * lens[seg_tensor]
        seg_len = torch.minimum(lens[seg_tensor], numels[seg_tensor] - seg_start)
        self.n_segments = int(seg_tensor.numel())
        self.seg = tuple(_upload(x, device) for x in (seg_tensor, seg_start, seg_len))
        self.addr = {
            role: _upload(torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64), device)
            for role, ts in roles.items()
        }
        self.values = {
            name: _upload(torch.tensor(vals, dtype=dtype), device)
            for name, (dtype, vals) in per_tensor.items()
        }
        # Vector-width hints are valid when every base address is 16-byte aligned and every
        # segment starts at a multiple of BLOCK elements.
        self.aligned = all(
            t.data_ptr() % 16 == 0 for ts in roles.values() for t in ts
        ) and all(L % BLOCK == 0 or c <= 1 for L, c in zip(seg_lens, counts.tolist()))


def _check_dense(tensors: Sequence[Tensor], what: str) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise RuntimeError(
                f"triton backend: {what} of shape {tuple(t.shape)} is not contiguous "
                f"(strides {t.stride()}); make it contiguous or use backend='torch'"
            )


def _partition(n: int, key: Callable[[int], Hashable]) -> dict[Hashable, list[int]]:
    out: dict[Hashable, list[int]] = {}
    for i in range(n):
        out.setdefault(key(i), []).append(i)
    return out


class TritonBackend(Backend):
    name = "triton"

    def __init__(self) -> None:
        self.launches = 0  # kernel launches so far: read by tests and benchmarks
        self._tables: OrderedDict[Hashable, _Table] = OrderedDict()
        self._scratch: dict[tuple, Tensor] = {}
        self._hyper: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._perturb_plan: list[tuple[_Table, dict, int, Tensor]] = []

    # ---------------------------------------------------------------- plumbing
    def _launch(self, kernel, n_programs: int, *args, **meta) -> None:
        if n_programs:
            self.launches += 1
            kernel[(n_programs,)](*args, **meta)

    def _table(
        self,
        roles: dict[str, list[Tensor]],
        seg_lens: list[int],
        per_tensor: dict[str, tuple[torch.dtype, list]] | None = None,
    ) -> _Table:
        per_tensor = per_tensor or {}
        key = (
            tuple((r, tuple(t.data_ptr() for t in ts)) for r, ts in roles.items()),
            tuple(t.numel() for t in next(iter(roles.values()))),
            tuple(seg_lens),
            tuple((k, tuple(v)) for k, (_, v) in per_tensor.items()),
        )
        table = self._tables.get(key)
        if table is None:
            device = next(iter(roles.values()))[0].device
            table = self._tables[key] = _Table(device, roles, seg_lens, per_tensor)
            if len(self._tables) > _CACHE_SIZE:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table

    def _buffer(self, name: str, numel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, device, dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._scratch[key] = torch.empty(max(numel, 1), dtype=dtype, device=device)
        return buf

    def _constants(self, values: tuple[float, ...], device: torch.device) -> Tensor:
        """Scalar hyper-parameters as an fp64 device array (Triton would round Python floats
        to fp32), uploaded once per distinct tuple of values."""
        key = (values, device)
        hp = self._hyper.get(key)
        if hp is None:
            hp = self._hyper[key] = _upload(torch.tensor(values, dtype=torch.float64), device)
            if len(self._hyper) > _CACHE_SIZE:  # an lr schedule makes a new tuple every step
                self._hyper.popitem(last=False)
        return hp

    # ---------------------------------------------------------------- pass A
    def perturbation_norm(self, groups: list[PerturbGroup], q: float) -> Tensor:
        entries = []  # (param, grad, w_old, mode, eta, rho, segment length)
        for group in groups:
            mode = _MODES[group.scaling.kind]
            for p, g, old in zip(group.params, group.grads, group.w_old):
                if p.numel() == 0:
                    continue
                m = 1 if (mode == 2 and p.dim() < 2) else mode
                seg_len = p.numel() // p.shape[0] if m == 2 else CHUNK
                entries.append((p, g, old, m, group.scaling.eta, group.rho, seg_len))
        device = next((e[0].device for e in entries), None) or next(
            p.device for grp in groups for p in grp.params
        )
        _check_dense([e[0] for e in entries], "a parameter")
        _check_dense([e[1] for e in entries], "a gradient")
        plans, offset = [], 0
        by_dtype = _partition(len(entries), lambda i: (entries[i][0].dtype, entries[i][1].dtype))
        for idx in by_dtype.values():
            es = [entries[i] for i in idx]
            table = self._table(
                {"w": [e[0] for e in es], "g": [e[1] for e in es], "old": [e[2] for e in es]},
                [e[6] for e in es],
                {
                    "mode": (torch.int32, [e[3] for e in es]),
                    "eta": (torch.float64, [e[4] for e in es]),
                    "rho": (torch.float64, [e[5] for e in es]),
                },
            )
            plans.append((table, {"w": es[0][0], "g": es[0][1]}, offset))
            offset += table.n_segments
        # fp64 parameters get an fp64 norm; everything else accumulates in fp32.
        acc = torch.float64 if any(e[0].dtype == torch.float64 for e in entries) else torch.float32
        partials = self._buffer("partials", offset, device, acc)
        filter_T = self._buffer("filter_T", offset, device, acc)
        norm_sum = self._buffer("norm_sum", 1, device, acc)[0]
        hp = self._constants((q,), device)
        qmode = 0 if q == 2.0 else 1 if q == 1.0 else 2
        for table, ref, start in plans:
            self._launch(
                K.norm_partials_kernel, table.n_segments,
                *table.seg, table.addr["w"], table.addr["g"],
                table.values["mode"], table.values["eta"],
                partials[start:], filter_T[start:], hp, ref["w"], ref["g"],
                QMODE=qmode, ACC=_acc(ref["w"]), ALIGNED=table.aligned, BLOCK=BLOCK,
            )
        self._launch(K.sum_kernel, 1, partials, offset, norm_sum, ACC=_ACC[acc], BLOCK=SUM_BLOCK)
        self._perturb_plan = [(table, ref, start, filter_T) for table, ref, start in plans]
        return norm_sum

    # ---------------------------------------------------------------- pass B
    def perturb(
        self, groups: list[PerturbGroup], norm_sum: Tensor, p: float, eps: float, skipped: Tensor
    ) -> None:
        # Uses the tables and filter norms of the perturbation_norm call just made over the
        # same groups (the engine always calls the two in a row).
        q = dual_exponent(p)
        qmode = 0 if q == 2.0 else 1 if q == 1.0 else 2
        hp = self._constants((q, 0.0 if math.isinf(p) else 1.0 / p, eps), norm_sum.device)
        if not self._perturb_plan:
            skipped.zero_()
            return
        for table, ref, start, filter_T in self._perturb_plan:
            self._launch(
                K.perturb_kernel, table.n_segments,
                *table.seg, table.addr["w"], table.addr["g"], table.addr["old"],
                table.values["mode"], table.values["eta"], table.values["rho"],
                filter_T[start:], norm_sum, skipped, hp, ref["w"], ref["g"],
                QMODE=qmode, ACC=_acc(ref["w"]), ALIGNED=table.aligned, BLOCK=BLOCK,
            )
        self._perturb_plan = []

    # ---------------------------------------------------------------- pass C
    def _update_tables(self, roles: dict[str, list[Tensor]]):
        """Split tensors by dtype combination; yield (table, first tensor of each role)."""
        live = [i for i, t in enumerate(roles["w"]) if t.numel() > 0]
        _check_dense([roles[r][i] for r in roles for i in live], "a parameter or its state")
        groups = _partition(len(live), lambda k: tuple(roles[r][live[k]].dtype for r in roles))
        for ks in groups.values():
            idx = [live[k] for k in ks]
            sub = {r: [ts[i] for i in idx] for r, ts in roles.items()}
            yield self._table(sub, [CHUNK] * len(idx)), {r: ts[0] for r, ts in sub.items()}

    def restore(self, params: list[Tensor], w_old: list[Tensor]) -> None:
        for table, ref in self._update_tables({"w": params, "old": w_old}):
            self._launch(
                K.restore_kernel, table.n_segments, *table.seg,
                table.addr["w"], table.addr["old"], ref["w"],
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
    ) -> None:
        has_momentum = hyper.momentum != 0
        roles = {"w": params, "g": grads, "old": w_old}
        if has_momentum:
            roles["buf"] = momentum_buffers
        constants = (hyper.lr, hyper.momentum, hyper.dampening, hyper.weight_decay)
        for table, ref in self._update_tables(roles):
            self._launch(
                K.sgd_kernel, table.n_segments, *table.seg,
                table.addr["w"], table.addr["g"], table.addr["old"],
                table.addr.get("buf", table.addr["w"]), self._constants(constants, ref["w"].device),
                ref["w"], ref["g"], ref.get("buf", ref["w"]),
                HAS_MOMENTUM=has_momentum, FRESH=fresh_buffers, NESTEROV=hyper.nesterov,
                MAXIMIZE=hyper.maximize, ACC=_acc(ref["w"]), ALIGNED=table.aligned, BLOCK=BLOCK,
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
    ) -> None:
        roles = {"w": params, "g": grads, "old": w_old, "m": exp_avgs, "v": exp_avg_sqs}
        if hyper.amsgrad:
            roles["vmax"] = max_exp_avg_sqs
        constants = (
            hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay,
            hyper.step_size, hyper.bias_correction2_sqrt,
        )
        for table, ref in self._update_tables(roles):
            self._launch(
                K.adam_kernel, table.n_segments, *table.seg,
                table.addr["w"], table.addr["g"], table.addr["old"], table.addr["m"],
                table.addr["v"], table.addr.get("vmax", table.addr["v"]),
                self._constants(constants, ref["w"].device),
                ref["w"], ref["g"], ref["m"],
                DECOUPLED=hyper.decoupled, AMSGRAD=hyper.amsgrad, MAXIMIZE=hyper.maximize,
                ACC=_acc(ref["w"]), ALIGNED=table.aligned, BLOCK=BLOCK,
            )
