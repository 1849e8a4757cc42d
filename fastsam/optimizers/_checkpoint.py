"""The checkpoint codec: what :meth:`state_dict` saves beyond the base optimizer's state, and the
checks a load makes before anything changes (docs/design.md §6).

The optimizer side of the codec is four hooks every fastsam optimizer has: ``_param_stores()``
(per-parameter tensors kept beyond the base state, by state key), ``_stand_in(key, p)`` (what is
saved for a parameter without such a tensor yet), ``_counters()`` and ``_load_counters()``.
"""
from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._core import FusedOptimizer

AVERAGE_KEY = "averaged_weights"  # per-parameter state entry of the averaged copy
# Each param group of a state dict carries the optimizer's counters under this key: a state
# dict's groups and per-parameter states are all that torch.distributed.checkpoint keeps.
COUNTERS_KEY = "fastsam_counters"
# Group options torch.optim fills in itself when a state dict lacks them (one saved by an
# older torch): their absence says nothing about which optimizer saved it.
_FILLED_BY_TORCH = frozenset(
    {"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"}
)


def save(opt: FusedOptimizer) -> dict[str, Any]:
    """The base optimizer's state dict, with each parameter's fastsam tensors in its state and
    the counters in every param group (see :meth:`FusedOptimizer.state_dict`)."""
    sd = opt.base_optimizer.state_dict()
    stores = opt._param_stores()
    state = dict(sd["state"])
    indexed = indexed_params(opt.param_groups)
    opt._fused.drop_unmade_buffers(state, indexed)
    for i, p in enumerate(indexed):
        extra = {}
        for key, store in stores.items():
            value = store.get(p)
            if value is None:
                value = opt._stand_in(key, p)
            if value is not None:
                extra[key] = value
        if extra:
            state[i] = {**state.get(i, {}), **extra}
    counters = opt._counters()
    groups = [{**group, COUNTERS_KEY: dict(counters)} for group in sd["param_groups"]]
    return {**sd, "state": state, "param_groups": groups}


def load(opt: FusedOptimizer, state_dict: dict[str, Any]) -> None:
    """Load ``state_dict`` (made by :func:`save` or by the plain base optimizer) into ``opt``,
    after checking that it fits: nothing changes when a check fails."""
    check_base_optimizer(opt, state_dict)
    check_shapes(opt, state_dict)
    groups = [dict(group) for group in state_dict["param_groups"]]
    counters = next((g[COUNTERS_KEY] for g in groups if COUNTERS_KEY in g), None)
    stores = opt._param_stores()
    if counters is None:
        _warn_afresh(opt, stores)
        counters = {}
    for group in groups:
        group.pop(COUNTERS_KEY, None)
    loaded: dict[str, dict] = {key: {} for key in stores}
    state = {}
    for index, value in state_dict["state"].items():
        value = dict(value)
        for key in stores:
            if key in value:
                loaded[key][index] = value.pop(key)
        if value:
            state[index] = value
    live = [
        {k: v for k, v in g.items() if k != "params" and isinstance(v, Tensor)}
        for g in opt.param_groups
    ]
    opt.base_optimizer.load_state_dict({**state_dict, "state": state, "param_groups": groups})
    _keep_option_tensors(opt.base_optimizer.param_groups, live)
    opt._link_base()
    opt._load_counters(counters)
    if opt._counts.n_averaged == 0:  # copies of the weights standing in for averages to come
        loaded[AVERAGE_KEY].clear()
    params = loaded_params(opt.param_groups, state_dict)
    for key, store in stores.items():
        store.clear()
        for index, tensor in loaded[key].items():
            p = params[index]
            store[p] = tensor.detach().to(device=p.device, dtype=p.dtype).clone()


def indexed_params(param_groups: list[dict]) -> list[Tensor]:
    """Parameters in state_dict order (torch.optim numbers them across groups in order)."""
    return [p for group in param_groups for p in group["params"]]


def loaded_params(param_groups: list[dict], state_dict: dict[str, Any]) -> dict[Any, Tensor]:
    """The parameter each key of a loaded state stands for. As torch.optim does, the keys are
    those its param_groups list, in our parameters' order: the indices this optimizer saves,
    or any others (torch.distributed.checkpoint's parameter names)."""
    ours = indexed_params(param_groups)
    groups = state_dict.get("param_groups")
    keys = [k for g in groups for k in g["params"]] if groups else range(len(ours))
    return dict(zip(keys, ours))


def check_base_optimizer(opt: FusedOptimizer, state_dict: dict[str, Any]) -> None:
    """Refuse a state dict saved from another kind of base optimizer (an Adam state dict into
    SAM over SGD): its groups lack options ours has (``momentum``), and the first step after
    such a load would fail, or run with the wrong state. Options torch.optim fills in itself,
    and fastsam's own (a plain base state dict has none), may be absent."""
    base = opt.base_optimizer
    ours = set(base.defaults) - _FILLED_BY_TORCH - set(opt._sam_defaults)
    for group in state_dict.get("param_groups") or ():
        missing = sorted(ours - set(group))
        if not missing:
            continue
        theirs = set(group) - {"params", "initial_lr", COUNTERS_KEY} - set(opt._sam_defaults)
        guess = _optimizers_with(theirs)
        raise ValueError(
            f"the loaded state dict was saved from another base optimizer: its param groups "
            f"lack {', '.join(missing)}, which {type(base).__name__} (the base optimizer of "
            f"this {type(opt).__name__}) has; they hold {', '.join(sorted(theirs))}"
            + (f" (as {' or '.join(guess)} does)" if guess else "")
            + f". Build the {type(opt).__name__} over the base optimizer the checkpoint was "
            "saved with"
        )


def _optimizers_with(options: set[str]) -> list[str]:
    """The torch.optim classes whose constructor takes every one of ``options``."""
    out = []
    for name in sorted(getattr(torch.optim, "__all__", ())):
        cls = getattr(torch.optim, name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            continue
        if cls is torch.optim.Optimizer:
            continue
        if options <= set(inspect.signature(cls.__init__).parameters):
            out.append(name)
    return out


def check_shapes(opt: FusedOptimizer, state_dict: dict[str, Any]) -> None:
    """Refuse, before anything is loaded, a state whose per-parameter tensors do not have
    their parameter's shape (a checkpoint of another model): the fused kernels would read
    past the end of them. torch.optim itself checks only the group sizes."""
    params = loaded_params(opt.param_groups, state_dict)
    for index, entry in state_dict.get("state", {}).items():
        if index not in params:
            raise ValueError(
                f"the loaded state has an entry for parameter {index!r}, but its "
                f"param_groups do not list it among this optimizer's {len(params)} "
                "parameters"
            )
        p = params[index]
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(
                    f"the loaded state's {key!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, but the parameter has shape {tuple(p.shape)}: "
                    "the state dict is from another model or another parameter order"
                )


def _warn_afresh(opt: FusedOptimizer, stores: dict[str, dict[Tensor, Tensor]]) -> None:
    """A loaded state dict without fastsam's counters has none of its tensors either: say
    what starts afresh, when something does."""
    lost = [key for key in stores if key != AVERAGE_KEY or opt._averager.schedule]
    if lost:
        warnings.warn(
            "fastsam: the loaded state dict has the base optimizer's state only (a plain "
            "torch.optim state dict, or torch.distributed.checkpoint with "
            "flatten_optimizer_state_dict=True, which keeps only the entries a fresh "
            f"optimizer has): {', '.join(lost)} and the counters start afresh",
            stacklevel=4,
        )


def _keep_option_tensors(groups: list[dict[str, Any]], live: list[dict[str, Tensor]]) -> None:
    """After a load, a group option that was a tensor (lr, rho) keeps that tensor, with the
    loaded value copied into it (torch.optim would put the loaded object in its place): a CUDA
    graph captured over it, or a schedule writing into it, still drives the group."""
    for group, tensors in zip(groups, live):
        for key, mine in tensors.items():
            loaded = group.get(key)
            if isinstance(loaded, Tensor) and loaded.numel() == mine.numel():
                mine.copy_(loaded.reshape(mine.shape))
            elif isinstance(loaded, (int, float)) and not isinstance(loaded, bool):
                mine.fill_(loaded)
            else:
                continue  # another kind of value: the loaded one stands
            group[key] = mine
