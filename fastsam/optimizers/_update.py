"""The base update fused with pass C: torch.optim.SGD and Adam/AdamW with torch.optim's exact
semantics and state layout (docs/design.md §2, §6)."""
from __future__ import annotations

from dataclasses import replace
from itertools import repeat
from operator import is_not

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..backends._constants import any_tensor
from ..functional import (
    AdamHyper,
    Average,
    Backend,
    GradientSource,
    SGDHyper,
    adam_bias_corrections,
)
from ._checks import as_lr
from ._plan import StepPlan

# The base optimizers whose update is fused with the restore (exact classes: a subclass may
# change step()).
FUSED_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}


def fused_kind(base: Optimizer, plan: StepPlan | None = None) -> str | None:
    """'sgd' or 'adam' when the base update can be fused with the restore, else None.

    Only the exact torch.optim classes qualify (a subclass may change step()), and only
    configurations whose state layout we reproduce: float betas, no differentiable,
    capturable or fused Adam, no complex parameters (``plan``). lr may be a number or a tensor.
    """
    kind = FUSED_KINDS.get(type(base))
    if kind is None:
        return None
    for group in base.param_groups:
        if group.get("differentiable"):
            return None
        if kind == "adam":
            if group.get("capturable") or group.get("fused"):
                return None
            beta1, beta2 = group["betas"]  # (floats told by type first: a call less)
            if (type(beta1) is not float or type(beta2) is not float) and any_tensor(
                    (beta1, beta2)):
                return None
    return None if plan is not None and plan.has_complex else kind


def not_capturable(plan: StepPlan) -> str:
    """Why a capturable step cannot run over ``plan`` (its update is not fused)."""
    why = (
        "complex parameters" if plan.has_complex
        else "a base optimizer option fastsam does not fuse (differentiable, fused, "
        "capturable or tensor betas)"
    )
    return (
        f"capturable=True needs the fused SGD/Adam/AdamW update, which {why} rule out: "
        "the base optimizer's own step() cannot be skipped on the device"
    )


def sgd_hyper(group: dict, skip: Tensor | None = None, clip: Tensor | None = None) -> SGDHyper:
    """torch.optim.SGD's hyper-parameters of ``group`` (``skip``, ``clip``: SGDHyper's)."""
    # (by position, in the fields' order: keywords cost ~0.7 us more, at every step)
    return SGDHyper(as_lr(group["lr"]), group["momentum"], group["dampening"],
                    group["weight_decay"], group["nesterov"], group.get("maximize", False), skip,
                    clip)


def adam_hyper(group: dict, decoupled: bool, step: float | None, skip: Tensor | None = None,
               clip: Tensor | None = None) -> AdamHyper:
    """torch.optim.Adam/AdamW's hyper-parameters of ``group`` at ``step`` (after the
    increment; None: set per call)."""
    beta1, beta2 = group["betas"]
    # (by position, in the fields' order: see sgd_hyper)
    return AdamHyper(as_lr(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"],
                     decoupled, group["amsgrad"], group.get("maximize", False), step, skip, None,
                     clip)


def decoupled_weight_decay(base: Optimizer, group: dict) -> bool:
    """Whether ``group`` of Adam/AdamW ``base`` decouples its weight decay (AdamW's)."""
    return bool(group.get("decoupled_weight_decay", isinstance(base, torch.optim.AdamW)))


class FusedUpdate:
    """Runs the fused SGD or Adam/AdamW update of one group on a backend, making torch.optim's
    state where the base optimizer would (momentum buffers, Adam's moments and step).

    Args:
        capturable: Adam's steps live on the parameters' device, bias corrections are formed
            there; SGD with dampening keeps cohorts (below).
    """

    def __init__(self, capturable: bool) -> None:
        self.capturable = capturable
        # capturable, SGD with dampening: per parameter whose momentum buffer was made in a
        # step skipped or not on the device, its cohort's flag (1 once an update went ahead)
        self.cohorts: dict[Tensor, Tensor] = {}
        self._steps: dict[int, tuple[list[Tensor], Tensor]] = {}  # see _step_lists

    def __call__(
        self,
        kind: str,
        base: Optimizer,
        backend: Backend,
        group: dict,
        params: list[Tensor],
        grads: list[Tensor],
        w_old: list[Tensor],
        states: list[dict],
        source: GradientSource | None,
        average: Average | None = None,
        skip: Tensor | None = None,
        clip: Tensor | None = None,
    ) -> None:
        """The update of ``params`` (one group), from ``w_old`` (a parameter may be its own);
        ``clip``: max_grad_norm's coefficient of the gradients (``SGDHyper.clip``)."""
        if kind == "sgd":
            self.sgd(backend, group, params, grads, w_old, states, source, average, skip, clip)
        else:
            self.adam(backend, group, decoupled_weight_decay(base, group), params, grads, w_old,
                      states, source, average, skip, clip)

    def sgd(
        self,
        backend: Backend,
        group: dict,
        params: list,
        grads: list,
        w_old: list,
        states: list,
        source: GradientSource | None,
        average: Average | None = None,
        skip: Tensor | None = None,
        clip: Tensor | None = None,
    ) -> None:
        hyper = sgd_hyper(group, skip, clip)
        if hyper.momentum == 0:
            backend.restore_sgd(params, grads, w_old, [], hyper, False, source, average)
            return
        bufs = [state.get("momentum_buffer") for state in states]
        cohorts = self.cohorts
        if all(map(is_not, bufs, repeat(None))) and not cohorts:  # steady state: one call
            backend.restore_sgd(params, grads, w_old, bufs, hyper, False, source, average)
            return
        # torch.optim's first step sets buf = d (no dampening): those params go in their own
        # call with fresh_buffers=True. capturable: a skipped first step leaves the zero
        # buffers, and m·0 + d = d is that first step again, unless there is dampening: then
        # the buffers made in a step whose skip is decided on the device form a cohort with a
        # device flag, 1 once an update of theirs went ahead, and their updates take
        # dampening·flag.
        went_ahead = None if skip is None else 1.0 - skip.to(torch.float64)
        calls: dict[int, list[int]] = {}
        for i, (p, buf) in enumerate(zip(params, bufs)):
            calls.setdefault(-1 if buf is None else id(cohorts.get(p)), []).append(i)
        for key, idx in calls.items():
            fresh = key == -1
            for i in idx if fresh else ():
                bufs[i] = states[i]["momentum_buffer"] = torch.zeros_like(
                    params[i], memory_format=torch.preserve_format
                )
            started = None if fresh else cohorts.get(params[idx[0]])
            backend.restore_sgd(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [w_old[i] for i in idx],
                [bufs[i] for i in idx],
                hyper if started is None else replace(
                    hyper, dampening=started * hyper.dampening
                ),
                fresh,
                source.select(idx) if source else None,
                average.select(idx) if average else None,
            )
            if started is not None and went_ahead is None:
                started.fill_(1.0)
            elif started is not None:
                torch.maximum(started, went_ahead, out=started)
            elif fresh and went_ahead is not None and hyper.dampening != 0:
                started = went_ahead.reshape(()).clone()
                for i in idx:
                    cohorts[params[i]] = started

    def adam(
        self,
        backend: Backend,
        group: dict,
        decoupled: bool,
        params: list,
        grads: list,
        w_old: list,
        states: list,
        source: GradientSource | None,
        average: Average | None = None,
        skip: Tensor | None = None,
        clip: Tensor | None = None,
    ) -> None:
        amsgrad = group["amsgrad"]
        capturable = self.capturable
        for p, state in zip(params, states):
            if len(state) == 0:  # torch.optim.Adam's layout: fp32 step, moments like p
                # The step lives on the CPU, or on p's device with capturable (torch's
                # capturable layout).
                state["step"] = torch.zeros(
                    (), dtype=torch.float32, device=p.device if capturable else "cpu"
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
        steps = [state["step"] for state in states]
        beta1, beta2 = group["betas"]
        hyper = adam_hyper(group, decoupled, None, skip, clip)
        moments = (
            [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states],
            [st["max_exp_avg_sq"] for st in states] if amsgrad else [],
        )
        if capturable:  # one call; each tensor's bias corrections from its step, on the device
            torch._foreach_add_(steps, 1.0)
            if skip is not None:
                torch._foreach_sub_(steps, [skip] * len(steps))
            bias = adam_bias_corrections(steps, beta1, beta2, hyper.lr)
            backend.restore_adam(params, grads, w_old, *moments, replace(hyper, bias=bias),
                                 source, average)
            return
        ones, values_out = self._step_lists(len(steps))
        torch._foreach_add_(steps, ones)  # a tensor 1 per step: a number 1 allocates on CPU
        # Tensors that joined late have a smaller step: one call per distinct step value. The
        # steps are CPU tensors (torch.optim's layout), so reading them waits for no device.
        values = torch.stack(steps, out=values_out).tolist()
        by_step: dict[float, list[int]] = {}
        for i, value in enumerate(values):
            by_step.setdefault(value, []).append(i)
        for step, idx in by_step.items():
            backend.restore_adam(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [w_old[i] for i in idx],
                *([m[i] for i in idx] if m else [] for m in moments),
                replace(hyper, step=step),
                source.select(idx) if source else None,
                average.select(idx) if average else None,
            )

    def _step_lists(self, n: int) -> tuple[list[Tensor], Tensor]:
        """For ``n`` Adam step tensors on the CPU: a list of ``n`` references to one tensor 1
        (their increment) and a buffer of ``n`` values (their read-out), kept between steps
        so that a step allocates neither."""
        lists = self._steps.get(n)
        if lists is None:
            one = torch.ones((), dtype=torch.float32)
            lists = self._steps[n] = ([one] * n, torch.empty(n, dtype=torch.float32))
        return lists

    def place_steps(self, base: Optimizer) -> None:
        """Adam's step tensors where the fused update keeps them: on the CPU (torch.optim's
        layout), or on the parameter's device with ``capturable`` (torch's capturable
        layout). Called where torch creates or loads them (a load, the base optimizer's own
        step), not per step; a copy, no read of the value. Groups the base optimizer steps
        itself (its own capturable or fused Adam) keep torch's placement."""
        if FUSED_KINDS.get(type(base)) != "adam":
            return
        for group in base.param_groups:
            if group.get("capturable") or group.get("fused"):
                continue
            for p in group["params"]:
                state = base.state.get(p)
                step = state.get("step") if state else None
                device = p.device if self.capturable else torch.device("cpu")
                if isinstance(step, Tensor) and step.device != device:
                    state["step"] = step.to(device=device, dtype=torch.float32)

    def drop_unmade_buffers(self, state: dict[int, dict], indexed: list[Tensor]) -> None:
        """For a state dict being saved (``state``: index → entries, ``indexed``: the parameters
        in index order). capturable, SGD with dampening: a momentum buffer whose every update
        so far was skipped on the device is zeros standing in for none (torch.optim has made
        none yet): saved without it, so that the next update after a load is torch's first
        step. Reads each cohort's flag once; cohorts found started are done with (their buffers
        are real: the steady-state call takes them again)."""
        cohorts = self.cohorts
        if not cohorts:
            return
        started = {id(flag): bool(flag.item()) for flag in cohorts.values()}
        for i, p in enumerate(indexed):
            flag = cohorts.get(p)
            if flag is None:
                continue
            if started[id(flag)]:
                del cohorts[p]
            elif "momentum_buffer" in state.get(i, {}):
                state[i] = {k: v for k, v in state[i].items() if k != "momentum_buffer"}
