"""The ``torch`` backend: every pass in PyTorch foreach ops. Runs on any device.

This is the portable backend, not the fast one: each pass is a handful of foreach calls (one
launch per op per ~chunk of tensors on CUDA, a Python-free loop on CPU) with temporaries. The
update arithmetic follows torch.optim's own multi-tensor SGD/Adam op for op, in the storage
dtype, so on fp32 it reproduces torch.optim to the last bit on most machines.

Non-finite perturbation norm: ``e`` is scaled by 0. Elements whose gradient is inf/NaN still
become NaN at the perturbed point (``0·inf``); the restore from ``w_old`` is exact regardless.
The fused backends skip such elements instead (they can select per element without a sync).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..functional import (
    AdamHyper,
    Average,
    Backend,
    Correction,
    GradientSource,
    Mask,
    Momentum,
    PerturbationNorm,
    PerturbGroup,
    Scaling,
    SGDHyper,
    Swap,
    dual_exponent,
    foreach_average,
    mask_draws,
)
from ._constants import dense

_NARROW = (torch.float16, torch.bfloat16)


def _widen(tensors: list[Tensor]) -> list[Tensor]:
    """fp16/bf16 → fp32; fp32 and fp64 stay as they are (compute in at least fp32)."""
    return [t.float() if t.dtype in _NARROW else t for t in tensors]


def _operator_T(params: list[Tensor], scaling: Scaling) -> list[Tensor] | None:
    """The ASAM operator T per tensor (at least fp32, broadcastable), None for T = 1."""
    if scaling.kind == "none":
        return None
    if scaling.kind in ("element", "outer"):
        t = torch._foreach_abs(_widen(params))
        if scaling.eta != 0.0:
            torch._foreach_add_(t, scaling.eta)
        return t
    out = []
    for w in params:  # filter-wise: one norm per slice along dim 0, no foreach op for that
        (w,) = _widen([w])
        if w.dim() >= 2:
            n = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)
        else:
            n = w.abs()
        out.append(n + scaling.eta)
    return out


def _direction(group: PerturbGroup) -> list[Tensor]:
    """What the perturbation follows, at least fp32: g, or FriendlySAM's d = g - sigma·m
    (formed as (-sigma·m) + g: the same rounding, one temporary)."""
    g = _widen(group.grads)
    if group.momentum is None:
        return g
    d = torch._foreach_mul(_widen(group.momentum.current), -group.momentum.sigma)
    torch._foreach_add_(d, g)
    return d


def _scaled_grads(
    group: PerturbGroup, g: list[Tensor]
) -> tuple[list[Tensor], list[Tensor] | None]:
    """u = T·g (``g``: the group's :func:`_direction`) and T (None for T = 1, and for "outer"
    scaling, whose T multiplies e after the normalisation of the plain g)."""
    if group.scaling.kind == "outer":
        return g, None
    t = _operator_T(group.params, group.scaling)
    return (g if t is None else torch._foreach_mul(g, t)), t


def _next_momentum(
    grads: list[Tensor], momentum: Momentum, finite: Tensor, on_cpu: bool
) -> None:
    """FriendlySAM's m_next = lmbda·m + gain·g, or m itself when the norm is not finite.
    Formed in place in m_next where it is fp32/fp64 (temporaries for narrower dtypes only)."""
    nxt = momentum.next
    if on_cpu and not bool(finite):
        torch._foreach_copy_(nxt, momentum.current)
        return
    wide = all(t.dtype not in _NARROW for t in nxt)
    out = nxt if wide else [t.float() if t.dtype in _NARROW else t.clone()
                            for t in momentum.current]  # copies: m itself is never written
    if wide:
        torch._foreach_copy_(out, momentum.current)
    torch._foreach_mul_(out, momentum.lmbda)
    torch._foreach_add_(out, _widen(grads), alpha=momentum.gain)
    if not on_cpu:  # a non-finite norm keeps m: selected on the device
        for n, m in zip(out, momentum.current):
            torch.where(finite, n, m.to(n.dtype), out=n)
    if not wide:
        torch._foreach_copy_(nxt, out)


def _clipped(grads: list[Tensor], clip: Tensor | None) -> list[Tensor]:
    """``grads`` times max_grad_norm's coefficient (new tensors; ``grads`` without one)."""
    if clip is None:
        return grads
    return torch._foreach_mul(grads, clip.to(grads[0].device))  # in the gradients' dtypes


def _update_grads(grads: list[Tensor], source: GradientSource | None) -> list[Tensor]:
    """The gradients an update uses: ``grads`` (already clipped: :func:`_clipped`), GSAM's
    (1 + alpha·along)·g_adv - alpha·g or LookSAM's g + scale·u_v as new tensors, or FreeSAM's
    stored gradients (see _finish_swap)."""
    if source is None:
        return grads
    if isinstance(source, Swap):
        return source.previous
    if isinstance(source, Correction):
        out = torch._foreach_mul(source.directions, source.scale.to(grads[0].dtype))
        torch._foreach_add_(out, grads)
        return out
    coefficient = (1.0 + source.alpha * source.along).to(grads[0].dtype)
    out = torch._foreach_mul(grads, coefficient)
    torch._foreach_add_(out, source.first_grads, alpha=-source.alpha)
    return out


def _finish_swap(grads: list[Tensor], source: GradientSource | None) -> None:
    """A source that ``writes_operand`` (FreeSAM's): after the update has read the stored
    gradients, store this step's."""
    if source is not None and source.writes_operand:
        torch._foreach_copy_(source.operand, grads)


def _written(params: list[Tensor], states: list[Tensor], source: GradientSource | None,
             average: Average | None) -> list[Tensor]:
    """Every tensor an update writes: the parameters, their optimizer state, FreeSAM's stored
    gradients and the averaged weights."""
    out = params + states
    if source is not None and source.writes_operand:
        out += source.operand
    if average is not None:
        out += average.buffers
    return out


def _mask_of(w: Tensor, mask: Mask, position: int, k: int) -> Tensor:
    """Where :class:`~fastsam.functional.Mask` moves ``w`` (the tensor at ``position``, the
    ``k``-th of its group), shaped like ``w``: the draws follow the storage order of a tensor
    that covers its memory without gaps (any memory format), the logical order of any other."""
    start = mask.offsets[k] if mask.offsets is not None else 0
    draws = mask_draws(mask.key, position, w.numel(), w.device, start) < mask.threshold
    if w.numel() and dense(w):
        return draws.as_strided(w.shape, w.stride())
    return draws.view(w.shape)


def _snapshot(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of what an update writes, put back by :func:`_put_back` when the device skip flag
    is set. This backend computes the update and then selects, element by element, on the
    device; the fused backends test the flag in their kernels instead."""
    return [t.clone() for t in tensors]


def _put_back(skip: Tensor, tensors: list[Tensor], saved: list[Tensor]) -> None:
    """``t ← saved`` where the flag ``skip`` is non-zero, else ``t`` as it is (no host read)."""
    flag = skip.reshape(()) != 0
    for t, before in zip(tensors, saved):
        torch.where(flag, before, t, out=t)


class TorchBackend(Backend):
    name = "torch"

    def perturbation_norm(self, groups: list[PerturbGroup], q: float) -> PerturbationNorm:
        # prepared: FriendlySAM's directions d, formed once for both passes (the others'
        # widened gradients are formed again in pass B rather than held between the passes)
        kept = [_direction(g) if g.params and g.momentum is not None else None for g in groups]
        return PerturbationNorm(self._norm_sum(groups, kept, q), groups, kept)

    @staticmethod
    def _norm_sum(groups: list[PerturbGroup], kept: list, q: float) -> Tensor:
        total = None
        for group, direction in zip(groups, kept):
            if not group.params:  # an empty group (or none of its params has a gradient)
                continue
            u, _ = _scaled_grads(group, direction or _direction(group))
            part = torch.stack(torch._foreach_norm(u, q)).pow(q).sum()
            total = part if total is None else total + part  # promotes fp32 + fp64
        if total is None:
            return torch.zeros(())
        return total.float() if total.dtype in _NARROW else total

    def perturb(self, norm: PerturbationNorm, p: float, eps: float, skipped: Tensor) -> None:
        groups, norm_sum = norm.groups, norm.total
        finite = torch.isfinite(norm_sum)
        skipped.copy_(~finite)
        if math.isinf(p):
            inv_denom = torch.ones_like(norm_sum)
        else:
            inv_denom = (norm_sum.pow(1.0 / p) + eps).reciprocal()
        inv_denom = torch.where(finite, inv_denom, torch.zeros_like(inv_denom))
        q = dual_exponent(p)
        # On CPU a tensor's value is a plain memory read (no device to wait for): reading the
        # scale lets plain SAM update w in place without an e temporary, which on CPU costs
        # more in first-touch page faults of a fresh 4-bytes-per-parameter buffer than in bytes.
        # (not under torch.compile, which traces no read of a tensor's value)
        on_cpu = norm_sum.device.type == "cpu" and not torch.compiler.is_compiling()
        position = 0  # of the group's first tensor in the pass's lists (ESAM's mask)
        for group, direction in zip(groups, norm.prepared):
            first, position = position, position + len(group.params)
            if not group.params:
                continue
            scale = inv_denom * group.rho
            # ESAM's mask, unless it keeps every element (beta = 1: SAM's arithmetic exactly)
            mask = group.mask if group.mask is not None and group.mask.keep < 1.0 else None
            u, t = _scaled_grads(group, direction or _direction(group))
            if group.keep_grads is not None:
                torch._foreach_copy_(group.keep_grads, group.grads)
            if group.momentum is not None:
                _next_momentum(group.grads, group.momentum, finite, on_cpu)
            outer = group.scaling.kind == "outer"
            if on_cpu and not bool(finite):  # a non-finite norm: w stays exactly as it is
                torch._foreach_copy_(group.w_old, group.params)
                continue
            if q == 2.0 and t is None and on_cpu and not outer and mask is None:
                torch._foreach_copy_(group.w_old, group.params)
                torch._foreach_add_(group.params, u, alpha=scale.item())
                continue
            if q == 2.0 and t is None:  # e = scale·g: one read of g, one write of e
                e = torch._foreach_mul(u, scale)
            elif q == 2.0:  # e = scale·T·u (u = T·g is a temporary: scaled in place)
                torch._foreach_mul_(u, t)
                torch._foreach_mul_(u, scale)
                e = u
            else:  # e = scale·T·sign(u)·|u|^(q-1)
                e = torch._foreach_sign(u)
                if q != 1.0:
                    torch._foreach_mul_(e, torch._foreach_pow(torch._foreach_abs(u), q - 1.0))
                if t is not None:
                    torch._foreach_mul_(e, t)
                torch._foreach_mul_(e, scale)
            if outer:  # e = T·ê, ê the perturbation of the plain g
                torch._foreach_mul_(e, _operator_T(group.params, group.scaling))
            if not on_cpu:  # scale is 0 for a non-finite norm, but 0·inf is NaN: select
                e = [torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
                     for x in e]
            torch._foreach_copy_(group.w_old, group.params)
            if mask is None:
                torch._foreach_add_(group.params, e)
                continue
            for k, (w, x) in enumerate(zip(group.params, e)):  # ESAM: the kept elements move
                moved = _mask_of(w, mask, first + k, k)
                torch.where(moved, (w + x).to(w.dtype), w, out=w)

    def restore(self, params: list[Tensor], w_old: list[Tensor]) -> None:
        if params:
            torch._foreach_copy_(params, w_old)

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
        if not params:
            return
        self.restore(params, w_old)
        if hyper.skip is not None:
            written = _written(params, momentum_buffers, source, average)
            saved = _snapshot(written)
        grads = _clipped(grads, hyper.clip)
        self._sgd(params, _update_grads(grads, source), momentum_buffers, hyper, fresh_buffers)
        _finish_swap(grads, source)
        if average is not None:
            foreach_average(params, average)
        if hyper.skip is not None:
            _put_back(hyper.skip, written, saved)

    def _sgd(self, params, grads, momentum_buffers, hyper, fresh_buffers) -> None:
        d = torch._foreach_neg(grads) if hyper.maximize else grads
        if hyper.weight_decay != 0:
            d = torch._foreach_add(d, params, alpha=hyper.weight_decay)
        if hyper.momentum != 0:
            if fresh_buffers:
                torch._foreach_copy_(momentum_buffers, d)
            else:
                torch._foreach_mul_(momentum_buffers, hyper.momentum)
                if isinstance(hyper.dampening, Tensor):  # on the device (capturable)
                    torch._foreach_add_(momentum_buffers,
                                        torch._foreach_mul(d, 1.0 - hyper.dampening))
                else:
                    torch._foreach_add_(momentum_buffers, d, alpha=1 - hyper.dampening)
            if hyper.nesterov:
                d = torch._foreach_add(d, momentum_buffers, alpha=hyper.momentum)
            else:
                d = momentum_buffers
        if isinstance(hyper.lr, Tensor):  # no host read: scale on the device
            torch._foreach_sub_(params, torch._foreach_mul(d, hyper.lr.to(params[0].device)))
        else:
            torch._foreach_add_(params, d, alpha=-hyper.lr)

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
        if not params:
            return
        self.restore(params, w_old)
        if hyper.skip is not None:
            states = exp_avgs + exp_avg_sqs + (max_exp_avg_sqs if hyper.amsgrad else [])
            written = _written(params, states, source, average)
            saved = _snapshot(written)
        grads = _clipped(grads, hyper.clip)
        self._adam(params, _update_grads(grads, source), exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                   hyper)
        _finish_swap(grads, source)
        if average is not None:
            foreach_average(params, average)
        if hyper.skip is not None:
            _put_back(hyper.skip, written, saved)

    def _adam(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hyper) -> None:
        g = torch._foreach_neg(grads) if hyper.maximize else grads
        lr = hyper.lr.to(params[0].device) if isinstance(hyper.lr, Tensor) else hyper.lr
        if hyper.weight_decay != 0:
            if hyper.decoupled:
                decay = hyper.decay
                if isinstance(decay, Tensor):
                    decay = decay.to(lr.device)
                torch._foreach_mul_(params, decay)
            else:
                g = torch._foreach_add(g, params, alpha=hyper.weight_decay)
        torch._foreach_lerp_(exp_avgs, g, 1 - hyper.beta1)
        torch._foreach_mul_(exp_avg_sqs, hyper.beta2)
        torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - hyper.beta2)
        if hyper.amsgrad:
            torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
            second = max_exp_avg_sqs
        else:
            second = exp_avg_sqs
        denom = torch._foreach_sqrt(second)
        if hyper.bias is not None:  # per tensor, on the device: [step size, sqrt(1 - β2^t)]
            rows = hyper.bias.to(denom[0].dtype)
            torch._foreach_div_(denom, list(rows[:, 1].unbind()))
            torch._foreach_add_(denom, hyper.eps)
            update = torch._foreach_div(exp_avgs, denom)
            torch._foreach_mul_(update, list(rows[:, 0].unbind()))
            torch._foreach_sub_(params, update)
            return
        torch._foreach_div_(denom, hyper.bias_correction2_sqrt)
        torch._foreach_add_(denom, hyper.eps)
        if isinstance(lr, Tensor):  # addcdiv takes only numbers: divide, then scale on device
            update = torch._foreach_div(exp_avgs, denom)
            torch._foreach_mul_(update, hyper.step_size.to(lr.device))
            torch._foreach_sub_(params, update)
        else:
            torch._foreach_addcdiv_(params, exp_avgs, denom, -hyper.step_size)
