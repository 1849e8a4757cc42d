"""ESAM (Du, Yan, Feng, Zhou, Zhen, Goh and Tan, ICLR 2022, "Efficient Sharpness-aware
Minimization for Improved Training of Neural Networks"): stochastic weight perturbation, fused
into SAM's perturb pass, and sharpness-sensitive data selection as a helper for the loop."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..functional import Mask, Scaling, mask_key
from ._base import SharpnessAwareOptimizer
from ._checks import as_rho
from ._core import without_grad

_SEED_COUNTER = "esam_seed"


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)

# The two scalings (immutable: made once, not at every step)
_PLAIN, _ELEMENT = Scaling(), Scaling("element", 0.0)


class ESAM(SharpnessAwareOptimizer):
    r"""SAM that perturbs a random part of the weights (ESAM's stochastic weight perturbation).

    Each step draws a Bernoulli mask :math:`m` (each element 1 with probability ``beta``) and
    perturbs only the elements it keeps, scaled by :math:`1/\beta` (the paper's formula; the
    norm is of the whole gradient):

    .. math::
        e = \frac{\rho}{\beta}\; m \odot \frac{T^2 g}{\|T g\|_2 + \epsilon},\qquad
        w \leftarrow \mathrm{update}\big(w,\ \nabla L(w + e)\big)

    with T = 1, or T = |w| with ``adaptive=True`` (the popular ASAM, as the authors' code
    offers). ``beta=1`` is SAM. The update uses the second pass's gradient of every parameter.

    The mask is drawn inside the perturb pass's kernels from a counter-based generator
    (:class:`fastsam.functional.Mask`: a hash of the seed, the step count, the tensor's
    position among the step's parameters with a gradient, and the element's index in storage
    order), so every backend moves the same elements (tested on ``cpu``, ``triton`` and
    ``torch``; the ``cuda`` kernel has not run on a GPU yet), nothing is stored or uploaded,
    and a run is reproducible from ``seed``; the seed and the step count are in ``state_dict()``
    (``"fastsam_counters"``), so a resumed run draws the masks it would have drawn; under DDP
    or FSDP2 give every rank the same ``seed`` (FSDP2's shards then draw what one process
    draws). Cost: SAM's
    three passes, unchanged bytes (a masked element is read and copied to w_old like any
    other).

    How this differs from the authors' code (``dydjw9/Efficient_SAM``, ``utils/Esam.py``),
    which draws **per parameter tensor** (after each update it turns off ``requires_grad`` of
    each tensor with probability 1 − beta, so the next first pass computes no gradient for it,
    and normalises by the norm over the tensors that have one): this class follows the paper's
    element-wise mask with the whole gradient's norm; it saves no backward work (the first
    pass computes every gradient), which the fused passes make up for in memory traffic.
    Sharpness-sensitive data selection, the paper's other half, is
    :func:`fastsam.esam_select` (the loop chooses the second pass's samples).

    Args:
        params: parameters or parameter groups (a group may set ``rho``, ``beta`` and
            ``adaptive``).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``base_kwargs``) or an
            instance over exactly these parameters.
        rho (float, default 0.05): SAM's radius (before the 1/beta scale).
        beta (float, default 1.0): the probability that an element is perturbed, in (0, 1]
            (the authors' code's default is 1.0, SAM itself: set it).
        adaptive (bool, default False): T = |w| (the popular ASAM).
        eps (float, default 1e-12): added to the norm in the denominator.
        seed (int, optional): the masks' seed, in [0, 2**64); default: drawn from torch's
            default generator when the optimizer is made (so ``torch.manual_seed`` fixes it).
        backend, average, skip_nonfinite, max_grad_norm: as in :class:`fastsam.SAM`.
        capturable: not taken (each step's mask key travels with the launch); for the same
            reason :meth:`first_step` is not compiled by ``torch.compile`` (a clear error under
            it), while :meth:`second_step` and the model compile as for SAM.
        **base_kwargs: passed to ``base_optimizer`` when it is a class.

    Example:
        >>> import torch, fastsam
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = fastsam.ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.5,
        ...                    seed=0, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.first_step(zero_grad=True)
        True
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    _steps_counter, _saves_steps_always = "esam_steps", True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        beta: float = 1.0,
        adaptive: bool = False,
        eps: float = 1e-12,
        backend: str | None = None,
        *,
        seed: int | None = None,
        average: Any = None,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        if capturable is not False:
            raise ValueError(
                "ESAM does not take capturable=True: each step's mask key is a launch argument "
                "(a captured graph would replay one mask)"
            )
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self.seed = seed
        super().__init__(
            params, base_optimizer, dict(rho=rho, beta=beta, adaptive=adaptive), p=2, eps=eps,
            backend=backend, base_kwargs=base_kwargs, average=average,
            skip_nonfinite=skip_nonfinite, max_grad_norm=max_grad_norm,
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if not isinstance(group["adaptive"], bool):
            raise TypeError(f"adaptive must be True or False, got {group['adaptive']!r}")
        _check_fraction("beta", group["beta"])

    def _scaling(self, group: dict[str, Any]) -> Scaling:
        return _ELEMENT if group["adaptive"] else _PLAIN

    @property
    def steps(self) -> int:
        """The steps begun so far: the next step's mask is drawn with this count."""
        return self._begun

    def _rho(self, group: dict[str, Any]) -> float:
        return as_rho(group["rho"]) / float(group["beta"])

    @without_grad
    def first_step(self, zero_grad: bool = False) -> bool:
        """As :meth:`fastsam.SAM.first_step`, with this step's mask; not under
        ``torch.compile`` (refused before anything changes)."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "ESAM.first_step is not compiled: each step's mask key is formed on the host "
                "from the step count (a traced step would bake one key in, or recompile every "
                "step); call first_step eagerly (second_step and the model compile as usual)"
            )
        return super().first_step(zero_grad)

    def _masks(self, groups: list[dict[str, Any]]) -> list[Mask | None]:
        key = mask_key(self.seed, self._begun - 1)  # (first_step counted this step already)
        return [Mask(float(group["beta"]), key) for group in groups]

    # ----------------------------------------------------------------- state
    def _counters(self) -> dict[str, Any]:
        return {**super()._counters(), _SEED_COUNTER: self.seed}

    def _load_counters(self, counters: dict[str, Any]) -> None:
        super()._load_counters(counters)
        self.seed = int(counters.get(_SEED_COUNTER, self.seed))

    def __repr__(self) -> str:
        return f"ESAM(seed={self.seed}, base_optimizer={self.base_optimizer!r})"


def esam_select(loss_before: Tensor, loss_after: Tensor, gamma: float) -> Tensor:
    r"""ESAM's sharpness-sensitive data selection: the indices (ascending) of the
    :math:`k = \max(1, \lfloor\gamma n\rfloor)` samples whose loss rose most from ``w`` to
    ``w + e``, :math:`\ell_i(w + e) - \ell_i(w)` (ties: the earlier sample first).

    The loop computes the per-sample losses of the first pass (``loss_before``, at w), then,
    after :meth:`ESAM.first_step`, the losses at w + e without a graph (``loss_after``), and
    takes the second pass over the selected samples only (the paper's :math:`B^+`, of size
    :math:`\gamma|B|`). ``gamma=1`` selects every sample. (The authors' code keeps the samples
    strictly above the k-th largest increase, k − 1 of them without ties; this keeps k.)

    Args:
        loss_before, loss_after: per-sample losses, 1-D, of the same length n >= 1.
        gamma (float): the fraction of the batch to keep, in (0, 1].

    Example:
        >>> import torch, fastsam
        >>> fastsam.esam_select(torch.tensor([1.0, 1.0, 1.0, 1.0]),
        ...                     torch.tensor([1.5, 1.1, 2.0, 0.9]), gamma=0.5)
        tensor([0, 2])
    """
    gamma = _check_fraction("gamma", gamma)
    if loss_before.dim() != 1 or loss_before.shape != loss_after.shape:
        raise ValueError(
            "loss_before and loss_after must be 1-D per-sample losses of the same length, got "
            f"shapes {tuple(loss_before.shape)} and {tuple(loss_after.shape)}"
        )
    n = loss_before.numel()
    if n == 0:
        raise ValueError("esam_select needs at least one sample")
    k = max(1, math.floor(gamma * n))
    if k == n:
        return torch.arange(n, device=loss_before.device)
    rise = (loss_after.detach() - loss_before.detach()).float()
    # stable descending order: equal rises keep the batch's order
    order = torch.sort(rise, descending=True, stable=True).indices[:k]
    return torch.sort(order).values
