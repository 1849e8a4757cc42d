"""The two-step engine shared by every fastsam optimizer.

The classes here hold no arithmetic: they collect tensors, keep torch.optim's state layout, and
call the passes of :mod:`fastsam.functional` on the selected backend.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..backends import select_backend
from ..functional import AdamHyper, Backend, PerturbGroup, Scaling, SGDHyper, dual_exponent


def check_finite_nonnegative(name: str, value: Any) -> float:
    """Validate a hyper-parameter that must be a finite number >= 0 (NaN fails)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


class SharpnessAwareOptimizer(Optimizer):
    """Base class: first step (perturb), second step (restore + base update), closure step.

    Subclasses pass their per-group defaults and implement :meth:`_check_group` (validation of
    one group's options) and :meth:`_scaling` (the ASAM operator of one group).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, Any],
        *,
        p: float,
        eps: float,
        backend: str | None,
        base_kwargs: dict[str, Any],
    ) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"p must be a number (2, float('inf') or any p > 1), got {p!r}")
        if not p > 1.0:
            raise ValueError(f"p must be > 1 (2, float('inf') or any finite p > 1), got {p}")
        self._p = float(p)
        self._q = dual_exponent(self._p)
        self._eps = check_finite_nonnegative("eps", eps)
        self._sam_defaults = dict(defaults)
        self._perturbed: list[dict[Tensor, Tensor]] | None = None
        self._w_old: dict[Tensor, Tensor] = {}
        self._skipped: Tensor | None = None

        super().__init__(params, defaults)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    "keyword arguments for the base optimizer ("
                    + ", ".join(sorted(base_kwargs))
                    + ") are only accepted with an optimizer class, not an instance"
                )
            self._adopt_instance(base_optimizer)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer class or instance, got "
                f"{base_optimizer!r}"
            )
        self._link_base()
        self._requested_backend = backend
        self._backends: dict[torch.device, Backend] = {}
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is not None:
            self._backend_for(first.device)  # an impossible request fails here, not mid-training

    # ----------------------------------------------------------------- construction helpers
    def _adopt_instance(self, base: Optimizer) -> None:
        """Use an already-built base optimizer over exactly our parameters."""
        owner = {p: g for g in self.param_groups for p in g["params"]}
        theirs = [p for g in base.param_groups for p in g["params"]]
        if len(theirs) != len(owner) or any(p not in owner for p in theirs):
            raise ValueError(
                "base_optimizer instance must be built over exactly the same parameters as "
                f"this optimizer: it has {len(theirs)} parameters, {len(owner)} were given here, "
                f"{sum(p not in owner for p in theirs)} of its parameters were not given here"
            )
        for group in base.param_groups:
            source = owner[group["params"][0]] if group["params"] else self._sam_defaults
            for key in self._sam_defaults:
                group.setdefault(key, source[key])
            self._check_group(group)
        self.base_optimizer = base

    def _link_base(self) -> None:
        """Share param_groups and state with the base optimizer (one source of truth)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, **self._sam_defaults}
        for group in self.param_groups:
            for key, value in self._sam_defaults.items():
                group.setdefault(key, value)
            self._check_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to this optimizer and to the base optimizer (one shared group dict)."""
        for key, value in self._sam_defaults.items():
            param_group.setdefault(key, value)
        self._check_group(param_group)
        if "base_optimizer" in self.__dict__:
            self.base_optimizer.add_param_group(param_group)
        else:  # during Optimizer.__init__, before the base exists
            super().add_param_group(param_group)

    # ----------------------------------------------------------------- subclass hooks
    def _check_group(self, group: dict[str, Any]) -> None:
        check_finite_nonnegative("rho", group["rho"])

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        raise NotImplementedError

    # ----------------------------------------------------------------- the step
    def _backend_for(self, device: torch.device) -> Backend:
        backend = self._backends.get(device)
        if backend is None:
            backend = self._backends[device] = select_backend(self._requested_backend, device)
        return backend

    @property
    def backend(self) -> str:
        """Name of the backend the parameters' device uses."""
        first = next(p for g in self.param_groups for p in g["params"])
        return self._backend_for(first.device).name

    def _collect(self) -> tuple[list[PerturbGroup], torch.device | None]:
        groups, device = [], None
        for group in self.param_groups:
            params, grads, w_old = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"fastsam does not support sparse gradients (parameter of shape "
                        f"{tuple(p.shape)}); use a dense gradient or a sparse-aware optimizer"
                    )
                if device is None:
                    device = p.device
                elif p.device != device:
                    raise RuntimeError(
                        f"fastsam needs every parameter with a gradient on one device: found "
                        f"{device} and {p.device}"
                    )
                buf = self._w_old.get(p)
                if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                    buf = self._w_old[p] = torch.empty_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                w_old.append(buf)
            groups.append(PerturbGroup(params, grads, w_old, group["rho"], self._scaling(group)))
        return groups, device

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient to ``w + e`` (the adversarial point).

        Args:
            zero_grad: clear the gradients afterwards (default False), ready for the second
                forward/backward pass.
        """
        if self._perturbed is not None:
            raise RuntimeError(
                "first_step() was called twice without second_step() in between: the weights "
                "are already perturbed. Call second_step() (or step()) to restore and update."
            )
        groups, device = self._collect()
        if device is not None:
            backend = self._backend_for(device)
            if self._skipped is None or self._skipped.device != device:
                self._skipped = torch.zeros((), dtype=torch.float32, device=device)
            norm_sum = backend.perturbation_norm(groups, self._q)
            backend.perturb(groups, norm_sum, self._p, self._eps, self._skipped)
        self._perturbed = [dict(zip(g.params, g.w_old)) for g in groups]
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights saved by :meth:`first_step` and apply the base optimizer's update
        with the current (adversarial) gradients.

        SGD, Adam and AdamW updates are fused with the restore (one pass); any other base
        optimizer gets an exact restore followed by its own ``step()``.

        Args:
            zero_grad: clear the gradients afterwards (default False).
        """
        if self._perturbed is None:
            raise RuntimeError(
                "second_step() was called without a pending first_step(): there is no "
                "perturbation to undo. Call first_step() after the first backward pass."
            )
        perturbed, self._perturbed = self._perturbed, None
        perturbed += [{}] * (len(self.param_groups) - len(perturbed))
        fused = self._fused_update_kind()
        for group, saved in zip(self.param_groups, perturbed):
            params = [p for p in group["params"] if p.grad is not None]
            restore_only = [p for p in saved if p.grad is None or fused is None]
            if restore_only:
                backend = self._backend_for(restore_only[0].device)
                backend.restore(restore_only, [saved[p] for p in restore_only])
            if fused is None or not params:
                continue
            backend = self._backend_for(params[0].device)
            # A parameter that was not perturbed (no gradient in the first pass) is its own
            # w_old: the fused kernels read w_old and write w element by element.
            w_old = [saved.get(p, p) for p in params]
            if fused == "sgd":
                self._fused_sgd(backend, group, params, w_old)
            else:
                self._fused_adam(backend, group, params, w_old)
        if fused is None:
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One sharpness-aware step.

        With a closure (the popular API): the caller has already run the first forward and
        backward; this perturbs, calls ``closure()`` (forward + backward at the perturbed point,
        gradients zeroed before it), then restores and updates. Returns the closure's loss.

        Without a closure: performs the pending second step (after :meth:`first_step`); this is
        what ``GradScaler.step(optimizer)`` calls.
        """
        if closure is None:
            if self._perturbed is None:
                raise RuntimeError(
                    "step() without a closure performs the second step, but no first_step() is "
                    "pending. Either pass a closure that recomputes the loss and calls "
                    "backward(), or call first_step() first."
                )
            self.second_step()
            return None
        if self._perturbed is not None:
            raise RuntimeError(
                "step(closure) was called while a first_step() is pending; call step() without "
                "a closure, or second_step(), to finish that step first"
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    # ----------------------------------------------------------------- fused base updates
    def _fused_update_kind(self) -> str | None:
        """'sgd' or 'adam' when the base update can be fused with the restore, else None.

        Only the exact torch.optim classes qualify (a subclass may change step()), and only
        configurations whose state layout we reproduce: float lr/betas, no differentiable,
        capturable or fused Adam, no complex parameters.
        """
        kind = {
            torch.optim.SGD: "sgd",
            torch.optim.Adam: "adam",
            torch.optim.AdamW: "adam",
        }.get(type(self.base_optimizer))
        if kind is None:
            return None
        for group in self.param_groups:
            if group.get("differentiable") or isinstance(group["lr"], Tensor):
                return None
            if kind == "adam" and (
                group.get("capturable")
                or group.get("fused")
                or any(isinstance(b, Tensor) for b in group["betas"])
            ):
                return None
            if any(p.is_complex() for p in group["params"]):
                return None
        return kind

    def _fused_sgd(self, backend: Backend, group: dict, params: list, w_old: list) -> None:
        hyper = SGDHyper(
            lr=float(group["lr"]),
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group.get("maximize", False),
        )
        if hyper.momentum == 0:
            backend.restore_sgd(params, [p.grad for p in params], w_old, [], hyper, False)
            return
        # torch.optim's first step sets buf = d (no dampening): those params go in their own
        # call with fresh_buffers=True; in steady state that list is empty.
        for fresh in (False, True):
            idx = [i for i, p in enumerate(params)
                   if (self.state[p].get("momentum_buffer") is None) == fresh]
            if not idx:
                continue
            if fresh:
                for i in idx:
                    self.state[params[i]]["momentum_buffer"] = torch.zeros_like(
                        params[i], memory_format=torch.preserve_format
                    )
            ps = [params[i] for i in idx]
            backend.restore_sgd(
                ps,
                [p.grad for p in ps],
                [w_old[i] for i in idx],
                [self.state[p]["momentum_buffer"] for p in ps],
                hyper,
                fresh,
            )

    def _fused_adam(self, backend: Backend, group: dict, params: list, w_old: list) -> None:
        amsgrad = group["amsgrad"]
        for p in params:
            state = self.state[p]
            if len(state) == 0:  # torch.optim.Adam's layout: CPU fp32 step, moments like p
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1)
        # Tensors that joined late have a smaller step: one call per distinct step value.
        by_step: dict[float, list[int]] = {}
        for i, s in enumerate(steps):
            by_step.setdefault(float(s), []).append(i)
        beta1, beta2 = group["betas"]
        decoupled = group.get(
            "decoupled_weight_decay", isinstance(self.base_optimizer, torch.optim.AdamW)
        )
        for step, idx in by_step.items():
            hyper = AdamHyper(
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled=bool(decoupled),
                amsgrad=amsgrad,
                maximize=group.get("maximize", False),
                step=step,
            )
            ps = [params[i] for i in idx]
            backend.restore_adam(
                ps,
                [p.grad for p in ps],
                [w_old[i] for i in idx],
                [self.state[p]["exp_avg"] for p in ps],
                [self.state[p]["exp_avg_sq"] for p in ps],
                [self.state[p]["max_exp_avg_sq"] for p in ps] if amsgrad else [],
                hyper,
            )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (momentum, Adam moments, step) with this optimizer's
        per-group options (rho, ...) in its param_groups. Loadable by the base optimizer class
        itself, and by a fresh fastsam optimizer. Refused between first and second step."""
        self._refuse_when_perturbed("state_dict()")
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict` or by the plain base optimizer."""
        self._refuse_when_perturbed("load_state_dict()")
        self.base_optimizer.load_state_dict(state_dict)
        self._link_base()

    def _refuse_when_perturbed(self, what: str) -> None:
        if self._perturbed is not None:
            raise RuntimeError(
                f"{what} between first_step() and second_step(): the parameters hold the "
                "perturbed weights w + e. Finish the step with second_step() first."
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(p={self._p}, eps={self._eps}, "
            f"base_optimizer={self.base_optimizer!r})"
        )
