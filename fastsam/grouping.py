"""Parameter groupings for SAM-ON (Mueller et al., "Normalization Layers Are All That
Sharpness-Aware Minimization Needs", NeurIPS 2023): perturb the normalisation layers only.

    groups = fastsam.sam_on_groups(model)
    optimizer = fastsam.SAM(groups, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

A group with ``perturb=False`` (SAM and ASAM) is left out of the perturbation and of its norm:
its parameters stay at ``w`` in the second pass, and are updated with the gradient taken there.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

# torch's normalisation layers with parameters; others are told by their class name (below)
_NORM_LAYERS: tuple[type, ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_NORM_NAMES = ("Norm", "Norm1d", "Norm2d", "Norm3d")


def is_normalization(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer: torch's BatchNorm, InstanceNorm, LayerNorm,
    GroupNorm and RMSNorm, or a class whose name ends in ``Norm`` (``Norm1d``/``2d``/``3d``),
    as the RMSNorm and LayerNorm variants of model libraries are named (``LlamaRMSNorm``,
    ``T5LayerNorm``)."""
    return isinstance(module, _NORM_LAYERS) or type(module).__name__.endswith(_NORM_NAMES)


def sam_on_groups(model: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """Two parameter groups for SAM-ON: the parameters of ``model``'s normalisation layers
    (:func:`is_normalization`; perturbed), and every other trainable parameter, with
    ``perturb=False``. ``options`` go into both groups (``lr``, ``weight_decay``, ...). An empty
    group is left out.

    Raises:
        ValueError: ``model`` has no trainable parameter in a normalisation layer (SAM-ON would
            perturb nothing).
    """
    norm_params: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if is_normalization(module):
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    norm_params[id(p)] = p
    if not norm_params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter in a normalisation layer: "
            "SAM-ON would perturb nothing (see fastsam.grouping.is_normalization)"
        )
    others = [p for p in dict.fromkeys(model.parameters())
              if p.requires_grad and id(p) not in norm_params]
    groups = [{"params": list(norm_params.values()), **options}]
    if others:
        groups.append({"params": others, "perturb": False, **options})
    return groups


__all__ = ["sam_on_groups", "is_normalization"]
