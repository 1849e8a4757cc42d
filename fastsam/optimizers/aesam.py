"""AE-SAM (Jiang, Yang, Zhang and Kwok, ICLR 2023, "An Adaptive Policy to Employ Sharpness-Aware
Minimization"): SAM's second pass only on the steps whose squared gradient norm stands out from
its running statistics; the base optimizer's plain update on the others."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ..functional import Scaling
from ._base import SharpnessAwareOptimizer
from ._checks import check_grad_scale
from ._core import without_grad


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


class AESAM(SharpnessAwareOptimizer):
    r"""AE-SAM: SAM where the loss surface is sharp, the plain update where it is flat, decided
    each step from the first pass's squared gradient norm :math:`s_t = \|g_t\|^2`.

    With running statistics of :math:`s` (:math:`\mu_0 = \sigma_0^2 = 0`) and a threshold
    coefficient that moves linearly from ``lambda2`` (first step) to ``lambda1`` (step
    ``total_steps``, and after it):

    .. math::
        \mu_t = \delta\,\mu_{t-1} + (1-\delta)\,s_t,\qquad
        \sigma_t^2 = \delta\,\sigma_{t-1}^2 + (1-\delta)\,(s_t - \mu_t)^2,\qquad
        c_t = \tfrac{t}{T}\,\lambda_1 + \big(1 - \tfrac{t}{T}\big)\,\lambda_2

    step t (counted from 0) is a SAM step, :math:`w \leftarrow \mathrm{update}(w, \nabla L(w +
    \rho\,g_t/(\|g_t\| + \epsilon)))`, when :math:`s_t \ge \mu_t + c_t\,\sigma_t`, and
    otherwise the base optimizer's plain step :math:`w \leftarrow \mathrm{update}(w, g_t)`
    with no second forward/backward pass. Under a normal model of :math:`s`, c = 1 takes SAM on
    about 16% of the steps, c = 0 on half, c = −1 on about 84%.

    Fused: :math:`s_t` is the norm SAM's first pass computes anyway (one reduction, read on the
    host once per step: the decision is the Python loop's branch), then either SAM's perturb
    pass or the fused plain update. SAM-ON groups (``perturb=False``) are left out of
    :math:`s_t` as they are out of the norm. A first pass whose gradients hold inf/NaN leaves
    the statistics as they were and is a plain step (skipped under GradScaler or
    ``skip_nonfinite``, as any update); a SAM step whose update is skipped leaves them as they
    were too (a skipped step changes nothing but the step count, as interval SAM's).
    ``state_dict()`` carries the statistics and the step count (``"fastsam_counters"``);
    :attr:`sam_steps` counts the SAM steps taken.

    Usage: :meth:`first_step` returns whether a second pass follows. False: the step is whole
    (its update made), and a ``step()`` after it has nothing left to do. Given ``grad_scale``,
    a plain step is left to the ``step()`` that follows instead, with the gradients of the
    first pass (kept for it, whatever ``zero_grad`` says): under ``torch.amp.GradScaler`` pass
    the loss scale, ``first_step(zero_grad=True, grad_scale=scaler.get_scale())`` (:math:`s_t`
    is of the unscaled gradients), and ``scaler.step(optimizer)`` takes the plain step unscaled
    and inf-checked; ``grad_scale=1.0`` without a scaler leaves it to a ``step()`` after, say,
    your own gradient clipping (the fastsam trainer integrations do so).

    Args:
        params: parameters or parameter groups (a group may set ``rho``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``base_kwargs``) or an
            instance over exactly these parameters.
        rho (float, default 0.05): SAM's radius.
        total_steps (int): T, the steps of the run (the threshold's schedule).
        lambda1, lambda2 (float): the threshold coefficient at step T and at the first step
            (the paper's λ₁ and λ₂; no default: choose the share of SAM steps you want).
        delta (float, default 0.9): δ, the statistics' decay, 0 <= δ < 1.
        eps (float, default 1e-12): added to ‖g‖ in the perturbation's denominator.
        backend, average, skip_nonfinite, max_grad_norm: as in :class:`fastsam.SAM` (a plain
            step's gradient is clipped too).
        capturable: not taken (each step's decision is read on the host).
        **base_kwargs: passed to ``base_optimizer`` when it is a class.

    Example:
        >>> import torch, fastsam
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = fastsam.AESAM(model.parameters(), torch.optim.SGD, rho=0.05, total_steps=3,
        ...                     lambda1=-1.0, lambda2=1.0, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> for _ in range(3):
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     if opt.first_step(zero_grad=True):
        ...         torch.nn.functional.mse_loss(model(x), y).backward()
        ...         opt.second_step()
        ...     opt.zero_grad()
    """

    _steps_counter, _saves_steps_always = "aesam_steps", True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        total_steps: int,
        lambda1: float,
        lambda2: float,
        delta: float = 0.9,
        eps: float = 1e-12,
        backend: str | None = None,
        average: Any = None,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        if capturable:
            raise ValueError(
                "AESAM does not take capturable=True: each first_step() reads ‖g‖² on the host "
                "to decide whether a second pass follows (the training loop branches on it)"
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        self.total_steps = total_steps
        self.lambda1, self.lambda2 = _finite("lambda1", lambda1), _finite("lambda2", lambda2)
        self.delta = _finite("delta", delta)
        if not 0.0 <= self.delta < 1.0:
            raise ValueError(f"delta must be in [0, 1), got {delta}")
        self._mean = self._var = 0.0  # μ and σ² of ‖g‖²
        self._sam_steps = 0
        self._step_scale: float | None = None  # the loss scale of this step's first pass
        self._before: tuple[float, float, int] | None = None  # statistics before this step
        self._plain = ""  # "pending": scaler.step takes it; "taken": first_step() made it
        super().__init__(
            params, base_optimizer, dict(rho=rho), p=2, eps=eps, backend=backend,
            base_kwargs=base_kwargs, average=average, skip_nonfinite=skip_nonfinite,
            max_grad_norm=max_grad_norm,
        )

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        return Scaling()

    @property
    def sam_step_next(self) -> bool:
        """True: AE-SAM decides inside :meth:`first_step`, from the gradients it is given; use
        its answer (the two-step loop's branch)."""
        return True

    @property
    def sam_steps(self) -> int:
        """The SAM steps (two passes) taken so far."""
        return self._sam_steps

    @property
    def statistics(self) -> tuple[float, float]:
        """(μ, σ²): the running mean and variance of ‖g‖² after the last step."""
        return self._mean, self._var

    def threshold_coefficient(self, t: int) -> float:
        """c_t of step ``t`` (from 0): ``lambda2`` at the first step, ``lambda1`` from step
        ``total_steps`` on, linear between."""
        share = min(t / self.total_steps, 1.0)
        return share * self.lambda1 + (1.0 - share) * self.lambda2

    # ----------------------------------------------------------------- the step
    @without_grad
    def first_step(self, zero_grad: bool = False, grad_scale: float | None = None) -> bool:
        """Decide from ‖g‖² (class docstring); a SAM step: move to ``w + e`` and return True;
        a plain step: make the base optimizer's update with g (given ``grad_scale``: leave it
        to the next :meth:`step`) and return False.

        Args:
            zero_grad: clear the gradients afterwards (default False; kept on a plain step
                left to :meth:`step`).
            grad_scale: the loss scale the gradients carry (``scaler.get_scale()`` under
                ``torch.amp.GradScaler``; 1.0: unscaled, the plain step left to
                :meth:`step`); None: unscaled gradients, the plain step made here.
        """
        if self._plain == "pending":
            raise RuntimeError(
                "AESAM: the last first_step(grad_scale=...) decided on a plain step, which the "
                "step() after it takes (scaler.step(optimizer) under GradScaler): call it "
                "before the next step's first_step()"
            )
        grad_scale = check_grad_scale(grad_scale)
        if self._perturbed is None:  # (the base class refuses a second first_step itself)
            self._plain = ""
            self._step_scale = grad_scale
        return super().first_step(zero_grad)

    def _perturbs(self, total: Tensor) -> bool:
        s = float(total)  # the one host read of the step: the branch of the loop
        if self._step_scale is not None:
            s /= self._step_scale * self._step_scale
        self._before = (self._mean, self._var, self._sam_steps)
        if not math.isfinite(s):  # inf/NaN gradients: no statistics of them
            return False
        delta = self.delta
        mean = delta * self._mean + (1.0 - delta) * s
        var = delta * self._var + (1.0 - delta) * (s - mean) ** 2
        self._mean, self._var = mean, var
        sam = s >= mean + self.threshold_coefficient(self._begun - 1) * math.sqrt(var)
        if sam:
            self._sam_steps += 1
        return sam

    def _between_sam_steps(self, zero_grad: bool) -> None:
        if self._step_scale is not None:  # given grad_scale: the step() after it takes it
            self._plain = "pending"
            return
        self._unperturbed_step(zero_grad)
        self._plain = "taken"

    @without_grad
    def second_step(self, zero_grad: bool = False) -> None:
        """As :meth:`fastsam.SAM.second_step`. Under GradScaler (``scaler.step(optimizer)``), a
        SAM step begun without ``grad_scale`` is refused, with the weights and the statistics
        restored (they were of scaled gradients)."""
        perturbed = self._perturbed
        if (perturbed is not None and self._step_scale is None
                and getattr(self, "grad_scale", None) is not None):
            self._restore(perturbed)
            self._perturbed = None
            self._undo_decision()
            raise RuntimeError(
                "AESAM under GradScaler needs the loss scale of the first pass: call "
                "optimizer.first_step(grad_scale=scaler.get_scale()) (‖g‖² is of the unscaled "
                "gradients); the weights and the statistics are restored"
            )
        skipped = self.amp_skipped_steps + self.nonfinite_skipped_steps
        super().second_step(zero_grad)
        if self.amp_skipped_steps + self.nonfinite_skipped_steps != skipped:
            self._undo_decision(count=False)  # a skipped update changes nothing but the count

    def _undo_decision(self, count: bool = True) -> None:
        """The statistics as before this step's decision; ``count``: the step uncounted too."""
        if self._before is not None:
            self._mean, self._var, self._sam_steps = self._before
            if count:
                self._begun -= 1

    @without_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """As :meth:`fastsam.SAM.step`; after a :meth:`first_step` that returned False: the
        plain update left to it (given ``grad_scale``; ``scaler.step(optimizer)`` calls it
        under GradScaler), or nothing (the plain step is whole; under a scaler an error: that
        plain step used the scaled gradients)."""
        if closure is None and self._plain:
            plain, self._plain = self._plain, ""
            if plain == "pending":
                self._unperturbed_step(False)
            elif getattr(self, "grad_scale", None) is not None:  # scaler.step after a plain
                raise RuntimeError(  # step first_step() made itself: with scaled gradients
                    "AESAM under GradScaler: the last first_step() was not given "
                    "grad_scale=scaler.get_scale(), so it decided on ‖g‖² of the scaled "
                    "gradients and made its plain step with them; pass the loss scale to "
                    "first_step() under a scaler (the plain step is then scaler.step's)"
                )
            return None
        if (closure is None and self._perturbed is None
                and getattr(self, "grad_scale", None) is not None):
            raise RuntimeError(
                "AESAM under GradScaler: scaler.step(optimizer) finishes a step begun with "
                "first_step(zero_grad=True, grad_scale=scaler.get_scale()); no first_step() is "
                "pending"
            )
        return super().step(closure)

    # ----------------------------------------------------------------- state
    def _counters(self) -> dict[str, Any]:
        return {**super()._counters(), "aesam_mean": self._mean, "aesam_var": self._var,
                "aesam_sam_steps": self._sam_steps}

    def _load_counters(self, counters: dict[str, Any]) -> None:
        super()._load_counters(counters)
        self._mean = float(counters.get("aesam_mean", 0.0))
        self._var = float(counters.get("aesam_var", 0.0))
        self._sam_steps = int(counters.get("aesam_sam_steps", 0))
        self._plain, self._before = "", None

    def __repr__(self) -> str:
        return (f"AESAM(total_steps={self.total_steps}, lambda1={self.lambda1}, "
                f"lambda2={self.lambda2}, delta={self.delta}, "
                f"base_optimizer={self.base_optimizer!r})")
