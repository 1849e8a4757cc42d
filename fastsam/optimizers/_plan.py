"""The step plan: which parameters take part in a step, with their persistent buffers, cached
for as long as nothing it depends on changes (docs/design.md §5, §7)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, is_not

import torch
from torch import Tensor

_grad = attrgetter("grad")
_is_sparse = attrgetter("is_sparse")


def persistent_buffer(store: dict[Tensor, Tensor], p: Tensor, copy: bool = False) -> Tensor:
    """``store[p]``: a buffer shaped like ``p``, allocated once and kept across steps
    (re-allocated only if ``p`` changed shape, dtype or device); ``copy``: a new buffer starts
    as a copy of ``p`` rather than uninitialised."""
    buf = store.get(p)
    if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
        buf = torch.empty_like(p, memory_format=torch.preserve_format)
        if copy:
            buf.copy_(p.detach())
        store[p] = buf
    return buf


def swap_contents(pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Exchange the values of each pair of same-shaped tensors in place (one tensor's copy at a
    time): parameters keep their storage and identity."""
    with torch.no_grad():
        for a, b in pairs:
            held = a.detach().clone()
            a.detach().copy_(b)
            b.copy_(held)


class StateMapping(defaultdict):
    """An optimizer's state (each parameter's state dict), shared by a fastsam optimizer and
    its base optimizer: torch.optim's ``defaultdict(dict)``, counting in :attr:`changes` every
    change of which dict a parameter has (one set, made on first use, removed; all cleared),
    so that a plan that looked the dicts up (:meth:`StepPlanner.states`) looks again after
    one. A change inside a parameter's dict (an entry replaced) is not counted here: the
    general path reads the entries at each step, the held path checks them
    (``HeldLists.entries_unchanged``)."""

    def __init__(self, default_factory=dict, *args, **kwargs) -> None:
        super().__init__(default_factory, *args, **kwargs)
        self.changes = 0

    def __setitem__(self, key, value) -> None:
        self.changes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.changes += 1
        super().__delitem__(key)

    def clear(self) -> None:
        self.changes += 1
        super().clear()

    def pop(self, *args):
        self.changes += 1
        return super().pop(*args)

    def popitem(self):
        self.changes += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        self.changes += 1
        return super().setdefault(key, default)

    def update(self, *args, **kwargs) -> None:
        self.changes += 1
        super().update(*args, **kwargs)

    def __ior__(self, other):
        self.update(other)
        return self


@dataclass
class StepPlan:
    """Per group, the parameters that have a gradient and their persistent w_old buffers.

    Collecting these costs a few microseconds per tensor in Python (tensor-keyed lookups,
    device checks), so a plan is reused for as long as its key holds: the same parameters have
    gradients, at the same addresses (a ``p.data = ...`` swap changes the address), with the
    same param groups. Gradient tensors themselves are read afresh every step.
    """

    key: tuple
    params: list[list[Tensor]]
    w_old: list[list[Tensor]]
    positions: list[list[int]]  # where each group's params sit in the flat parameter list
    device: torch.device | None
    has_complex: bool
    idle: list[Tensor]  # parameters without a gradient this step (averaged on their own)
    states: list[list[dict]] | None = None  # per-parameter state dicts, looked up once
    states_changes: int = -1  # StateMapping.changes when they were looked up
    averaged: list[list[Tensor]] | None = None  # per group, the averaged copies (once)
    first: list[list[Tensor]] | None = None  # per group, the kept first gradients (once)
    idle_averaged: list[Tensor] | None = None
    fused: tuple[str | None] | None = None  # the update kind an eager step decided (1-tuple)
    # the plan's tensors held in C++ (fastsam/optimizers/_held.py), with the param groups it
    # was made for (the held path's check of the groups)
    held: object | None = None
    # the numbers of the groups with parameters, and of those the perturbation goes over (the
    # held calls' groups; "perturb" flags are part of the key), listed once (_held.py)
    with_params: list[int] | None = None
    perturbing: list[int] | None = None

    def grads(self, flat_grads: list) -> list[list[Tensor]]:
        """Per group, the gradients of the plan's parameters, taken from this step's flat list."""
        if torch.compiler.is_compiling():  # the same, in the constructs torch.compile traces
            out = [[flat_grads[i] for i in positions] for positions in self.positions]
            if any(g.is_sparse for grads in out for g in grads):
                raise RuntimeError("fastsam does not support sparse gradients")
            return out
        out = []
        for positions, params in zip(self.positions, self.params):
            grads = list(map(flat_grads.__getitem__, positions))
            if any(map(_is_sparse, grads)):
                bad = next(p for p, g in zip(params, grads) if g.is_sparse)
                raise RuntimeError(
                    f"fastsam does not support sparse gradients (parameter of shape "
                    f"{tuple(bad.shape)}); use a dense gradient or a sparse-aware optimizer"
                )
            out.append(grads)
        return out


class StepPlanner:
    """Builds the step plan and keeps it while its key holds; owns the persistent buffers a
    plan lists (w_old, and the first-pass gradients of the optimizers that keep them).

    Args:
        keeps_w_old: a w_old buffer per parameter (False: each parameter is its own w_old,
            for optimizers that never perturb).
    """

    def __init__(self, keeps_w_old: bool) -> None:
        self.keeps_w_old = keeps_w_old
        self.w_old: dict[Tensor, Tensor] = {}
        self.first: dict[Tensor, Tensor] = {}  # g of the first pass (GSAM, LookSAM)
        self.current: StepPlan | None = None
        self._version = 0  # bumped when groups or loaded state change: plans expire

    def expire(self) -> None:
        """Plans made so far are not reused (the groups or the loaded state changed)."""
        self._version += 1

    def plan(self, param_groups: list[dict]) -> tuple[StepPlan, list]:
        """This step's plan, and the flat list of every parameter's gradient (or None)."""
        if torch.compiler.is_compiling():
            return self._traced_plan(param_groups)
        flat = [p for group in param_groups for p in group["params"]]
        flat_grads = list(map(_grad, flat))
        key = (
            self._version,
            tuple(map(is_not, flat_grads, repeat(None))),
            tuple(map(Tensor.data_ptr, flat)),
            tuple(group.get("perturb", True) for group in param_groups),
        )
        if self.current is not None and self.current.key == key:
            return self.current, flat_grads
        params, w_old, positions, device, has_complex = [], [], [], None, False
        idle = [p for p, g in zip(flat, flat_grads) if g is None]
        offset = 0
        for group in param_groups:
            n = len(group["params"])
            # A group left out of the perturbation (SAM-ON's perturb=False) is its own w_old.
            keeps = self.keeps_w_old and group.get("perturb", True)
            positions.append([offset + i for i in range(n) if flat_grads[offset + i] is not None])
            params.append([flat[i] for i in positions[-1]])
            offset += n
            w_old.append([])
            for p in params[-1]:
                if device is None:
                    device = p.device
                elif p.device != device:
                    raise RuntimeError(
                        f"fastsam needs every parameter with a gradient on one device: found "
                        f"{device} and {p.device}"
                    )
                if p.is_meta:
                    raise RuntimeError(
                        f"fastsam: a parameter of shape {tuple(p.shape)} is on the meta device "
                        "(shapes only, no data): materialize the model first (module.to_empty("
                        "device=...), then initialise it) and build the optimizer over its "
                        "parameters then (to_empty replaces meta parameters with new ones)"
                    )
                has_complex |= p.is_complex()
                w_old[-1].append(persistent_buffer(self.w_old, p) if keeps else p)
        self.current = StepPlan(key, params, w_old, positions, device, has_complex, idle)
        return self.current, flat_grads

    def held(self, param_groups: list[dict]) -> StepPlan | None:
        """The current plan when it is held in C++ (:attr:`StepPlan.held`) and still holds:
        nothing expired it, and in one C++ call (``HeldLists.holds``) the groups have the same
        parameters (identity) and perturb flags, and every parameter of the plan has a
        gradient, its address, dtype, shape and strides, and no other has gained a gradient
        (else the plan expires). None: make the plan with :meth:`plan`."""
        plan = self.current
        if plan is None or plan.held is None or plan.key[0] != self._version:
            return None
        holds = plan.held.holds(param_groups)
        if holds:
            return plan
        if holds is False:
            # (mostly gradients come or go, which the key sees too; a parameter whose shape or
            # dtype changed at the same address does not change the key: made afresh)
            self.expire()
        return None  # (None: other groups, whose key tells whether a plan fits)

    def _traced_plan(self, param_groups: list[dict]) -> tuple[StepPlan, list]:
        """Under torch.compile: the plan of the eager steps before, whose key is checked but
        for the addresses (torch.compile guards on the tensors themselves); none that fits is
        refused, as making one needs the addresses."""
        flat_grads = [p.grad for group in param_groups for p in group["params"]]
        key = (self._version, tuple(g is not None for g in flat_grads),
               tuple(group.get("perturb", True) for group in param_groups))
        current = self.current
        if current is None or (current.key[0], current.key[1], current.key[3]) != key:
            raise RuntimeError(
                "fastsam under torch.compile steps with the plan an eager step made: take one "
                "step without torch.compile first (the warm-up torch.compile wants anyway), "
                "and again when parameters gain or lose their gradients or the groups change"
            )
        return current, flat_grads

    def first_buffers(self, plan: StepPlan) -> list[list[Tensor]]:
        """Per group of ``plan``, the persistent buffers the perturb pass fills with a copy of
        g (GSAM, LookSAM). Looked up once per plan."""
        if plan.first is None:
            plan.first = [[persistent_buffer(self.first, p) for p in ps] for ps in plan.params]
        return plan.first

    @staticmethod
    def states(plan: StepPlan, state: dict) -> list[list[dict]]:
        """Per group of ``plan``, its parameters' state dicts. Tensor-keyed lookups cost ~1.6 us
        each (Tensor.__hash__ is Python): once per plan, and again after a parameter's dict
        was set or removed (``state.changes``; a load replaces the whole mapping, which
        expires the plan)."""
        changes = getattr(state, "changes", None)  # (None: looked up at every call)
        if plan.states is None or changes is None or plan.states_changes != changes:
            plan.states = [[state[p] for p in ps] for ps in plan.params]
            plan.states_changes = getattr(state, "changes", -1)  # (after: lookups make dicts)
        return plan.states
