"""Sharded parameters (FSDP2's ``fully_shard``, any DTensor parameters): the passes of a backend
run on each rank's local shards, and each reduction is all-reduced across the shards once.

FSDP2 keeps every parameter as a DTensor sharded along dim 0 and reduce-scatters the gradients
into the same layout, so between backward and the next forward every rank holds a slice of w, g
and the optimizer state. Every elementwise pass of docs/design.md §2 is local: it runs on the local
tensors (``DTensor._local_tensor``, the storage FSDP2 all-gathers from) with the wrapped
backend's fused kernels. The reductions are not: pass A's ``S = Σ |T·g|^q``, GSAM's three
sums, LookSAM's sums and skip_nonfinite's flag are sums over shards, so each is computed
locally and then all-reduced with one ``all_reduce`` (of a 0-d tensor, or of the 3 sums
together; :meth:`ShardedBackend.sum_over_shards`) over the process group of each mesh dimension
the parameters are sharded on; replicated mesh dimensions (HSDP's) are left alone, their values
already agree. The perturbation and the update then follow from the global sums on
every rank: the numbers of one process holding the whole model, up to the order of the sum.
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch.distributed as dist
from torch import Tensor

from ..functional import (
    AdamHyper,
    Average,
    Backend,
    DecomposeGroup,
    GradientSource,
    Mask,
    PerturbationNorm,
    PerturbGroup,
    SGDHyper,
    gsam_along_from_sums,
)

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # a torch without torch.distributed
    DTensor = None


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def shard_groups(params: list[Tensor]) -> tuple[list, frozenset[int]] | None:
    """For a list of parameters: None when none is a DTensor, else the process groups a sum over
    their local shards must be all-reduced over, and the tensor dims they are sharded along.
    Raises when only some are DTensors, or when they are laid out on different meshes or
    placements (their local sums would not add up to one global sum)."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        plain = next(p for p in params if not is_sharded(p))
        raise RuntimeError(
            f"fastsam: {len(sharded)} of the {len(params)} parameters are DTensors (FSDP2 "
            f"fully_shard) and the others are not (a plain tensor of shape {tuple(plain.shape)}): "
            "the global norm needs every parameter sharded the same way. Apply fully_shard to "
            "the root module too, or give the unsharded parameters their own optimizer."
        )
    mesh, placements = sharded[0].device_mesh, tuple(sharded[0].placements)
    for p in sharded:
        if p.device_mesh != mesh or tuple(p.placements) != placements:
            raise RuntimeError(
                "fastsam: the DTensor parameters are not laid out alike (mesh "
                f"{mesh} with {placements} and mesh {p.device_mesh} with {tuple(p.placements)}); "
                "one optimizer takes parameters sharded over one mesh with one placement"
            )
    groups, dims = [], set()
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard():
            groups.append(mesh.get_group(mesh_dim))
            dims.add(placement.dim)
        elif placement.is_partial():
            raise RuntimeError(
                f"fastsam: DTensor parameters with a Partial placement ({placements}) hold "
                "partial values, not shards; redistribute them to Shard or Replicate"
            )
    return groups, frozenset(dims)


@functools.lru_cache(maxsize=4096)
def _first_element(shape: tuple[int, ...], mesh, placements: tuple) -> int:
    """The index, in a contiguous tensor of ``shape`` sharded along dim 0 only, of this rank's
    shard's first element (ESAM's ``Mask.offsets``); cached: a parameter's layout is fixed."""
    if not shape:
        return 0
    _, start = compute_local_shape_and_global_offset(shape, mesh, placements)
    return start[0] * math.prod(shape[1:])


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """The local shards of DTensors (in place writes reach the DTensor); other tensors as is."""
    return [getattr(t, "_local_tensor", t) for t in tensors]


def _local_grads(grads: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """Local gradient shards, which must be laid out as their parameters' (FSDP2's are)."""
    for g, p in zip(grads, params):
        if is_sharded(g) and g.placements != p.placements:
            raise RuntimeError(
                f"fastsam: a gradient is laid out as {tuple(g.placements)} but its parameter "
                f"(shape {tuple(p.shape)}) as {tuple(p.placements)}; the fused passes need "
                "each gradient sharded like its parameter"
            )
    return local_tensors(grads)


def _local_source(source: GradientSource | None) -> GradientSource | None:
    return None if source is None else source.with_operand(local_tensors(source.operand))


class ShardedBackend(Backend):
    """``inner``'s passes on local shards, each reduction all-reduced over ``groups``."""

    def __init__(self, inner: Backend, groups: list, dims: frozenset[int]) -> None:
        self.inner = inner
        self.groups = groups
        self.dims = dims
        self.name = inner.name

    def local(self, tensors: list[Tensor]) -> list[Tensor]:
        return local_tensors(tensors)

    def sum_over_shards(self, partial: Tensor) -> Tensor:
        for group in self.groups:
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
        return partial

    def any_over_shards(self, flag: Tensor) -> Tensor:
        for group in self.groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return flag

    def _local_groups(self, groups: list[PerturbGroup]) -> list[PerturbGroup]:
        out = []
        for g in groups:
            if g.scaling.kind == "filter" and self.dims - {0}:
                raise RuntimeError(
                    "fastsam: filter-wise ASAM needs whole filters (dim 0) on each rank, but the "
                    f"parameters are sharded along dims {sorted(self.dims)}"
                )
            keep = None if g.keep_grads is None else local_tensors(g.keep_grads)
            momentum = None if g.momentum is None else g.momentum.with_tensors(
                local_tensors(g.momentum.current), local_tensors(g.momentum.next))
            mask = None if g.mask is None else self._local_mask(g.mask, g.params)
            out.append(PerturbGroup(
                local_tensors(g.params), _local_grads(g.grads, g.params),
                local_tensors(g.w_old), g.rho, g.scaling, keep, momentum, mask,
            ))
        return out

    def _local_mask(self, mask: Mask, params: list[Tensor]) -> Mask:
        """ESAM's mask over local shards: each shard placed in its whole tensor (its first
        element's index there, ``Mask.offsets``), so the shards draw what one process draws;
        where a shard is not one contiguous block of its tensor (sharded along another dim,
        a non-contiguous tensor), every rank draws with a key of its own instead."""
        if self.dims - {0} or not all(is_sharded(p) and p.is_contiguous() for p in params):
            return mask.for_rank(dist.get_rank())
        return replace(mask, offsets=tuple(
            _first_element(p.shape, p.device_mesh, tuple(p.placements)) for p in params))

    def perturbation_norm(self, groups: list[PerturbGroup], q: float) -> PerturbationNorm:
        local = self.inner.perturbation_norm(self._local_groups(groups), q)
        # the local sum made global in place: the inner backend's perturb reads the same tensor
        return PerturbationNorm(self.sum_over_shards(local.total), groups, local)

    def perturb(self, norm: PerturbationNorm, p: float, eps: float, skipped: Tensor) -> None:
        # the inner backend's own hand-off, over the local groups unwrapped once per step
        self.inner.perturb(norm.prepared, p, eps, skipped)

    def restore(self, params: list[Tensor], w_old: list[Tensor]) -> None:
        self.inner.restore(local_tensors(params), local_tensors(w_old))

    def wsam_decoupled(self, params: list[Tensor], first: list[Tensor], grads: list[Tensor],
                       alpha: float, clip: Tensor | None = None) -> None:
        self.inner.wsam_decoupled(local_tensors(params), local_tensors(first),
                                  local_tensors(grads), alpha, clip)

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
        self.inner.restore_sgd(
            local_tensors(params), _local_grads(grads, params), local_tensors(w_old),
            local_tensors(momentum_buffers), hyper, fresh_buffers, _local_source(source),
            _local_average(average),
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
        self.inner.restore_adam(
            local_tensors(params), _local_grads(grads, params), local_tensors(w_old),
            local_tensors(exp_avgs), local_tensors(exp_avg_sqs), local_tensors(max_exp_avg_sqs),
            hyper, _local_source(source), _local_average(average),
        )

    def _local_decompose(self, groups: list[DecomposeGroup]) -> list[DecomposeGroup]:
        return [
            DecomposeGroup(local_tensors(g.grads), local_tensors(g.first_grads), g.alpha)
            for g in groups
        ]

    def gsam_sums(self, groups: list[DecomposeGroup]) -> Tensor:
        return self.sum_over_shards(self.inner.gsam_sums(self._local_decompose(groups)))

    def gsam_along(self, groups: list[DecomposeGroup], eps: float) -> Tensor:
        return gsam_along_from_sums(self.gsam_sums(groups), eps)

    def gsam_decompose(self, groups: list[DecomposeGroup], eps: float) -> None:
        Backend.gsam_decompose(self, self._local_decompose(groups), eps)


def _local_average(average: Average | None) -> Average | None:
    return None if average is None else average.with_buffers(local_tensors(average.buffers))
