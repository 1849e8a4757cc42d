"""One worker of tests/test_fsdp.py: fastsam optimizers over FSDP2 (fully_shard) parameters on
CPU (gloo). Saves, per optimizer configuration and backend, the final full weights and the
number of all-reduces the optimizer's own steps made."""
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fastsam

STEPS = 3


def _sam(params, backend):
    return fastsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                       weight_decay=1e-3, backend=backend)


def _asam(params, backend):
    return fastsam.ASAM(params, torch.optim.Adam, rho=0.5, eta=0.01, normalization="filter",
                        lr=0.01, backend=backend)


def _gsam(params, backend):
    return fastsam.GSAM(params, torch.optim.AdamW, rho=0.05, alpha=0.3, lr=0.01,
                        weight_decay=0.1, backend=backend)


def _gsam_unfused(params, backend):
    return fastsam.GSAM(params, torch.optim.RMSprop, rho=0.05, alpha=0.3, lr=0.01,
                        backend=backend)


def _freesam(params, backend):
    return fastsam.FreeSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9,
                           backend=backend)


def _sam_ema(params, backend):
    return fastsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, average="ema",
                       backend=backend)


def _looksam(params, backend):
    return fastsam.LookSAM(params, torch.optim.SGD, rho=0.05, k=2, alpha=0.7, lr=0.1,
                           momentum=0.9, backend=backend)


def _looksam_unfused(params, backend):
    return fastsam.LookSAM(params, torch.optim.RMSprop, rho=0.05, k=2, alpha=0.7, lr=0.01,
                           backend=backend)


def _friendlysam(params, backend):
    return fastsam.FriendlySAM(params, torch.optim.SGD, rho=0.05, lmbda=0.5, lr=0.1,
                               momentum=0.9, backend=backend)


def _msam(params, backend):
    return fastsam.MSAM(params, torch.optim.Adam, rho=0.05, lr=0.01, backend=backend)


def _wsam(params, backend):
    return fastsam.WSAM(params, torch.optim.SGD, rho=0.05, gamma=0.8, lr=0.1, momentum=0.9,
                        backend=backend)


def _aesam(params, backend):
    # c = 2.5: the first step a SAM step (from μ = σ² = 0), the next ones plain while ‖g‖²
    # holds; every rank decides from the all-reduced norm
    return fastsam.AESAM(params, torch.optim.SGD, rho=0.05, total_steps=STEPS, lambda1=2.5,
                         lambda2=2.5, lr=0.1, momentum=0.9, backend=backend)


def _esam(params, backend):
    return fastsam.ESAM(params, torch.optim.SGD, rho=0.05, beta=0.5, seed=11, lr=0.1,
                        momentum=0.9, backend=backend)


def _gsam_clipped(params, backend):
    return fastsam.GSAM(params, torch.optim.SGD, rho=0.05, alpha=0.3, lr=0.1, momentum=0.9,
                        max_grad_norm=0.05, backend=backend)


def _sam_skip(params, backend):
    return fastsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                       skip_nonfinite=True, backend=backend)


# name: (constructor, all-reduces over the STEPS steps: one per reduction pass). LookSAM with
# k = 2: SAM, look-ahead, SAM; a SAM step reduces the norm, twice the projection and the
# direction's norm (4), a look-ahead step the gradient's norm (1).
CONFIGS = {
    "sam-sgd": (_sam, STEPS),
    "asam-filter-adam": (_asam, STEPS),
    "gsam-adamw": (_gsam, 2 * STEPS),
    "gsam-rmsprop": (_gsam_unfused, 2 * STEPS),
    "freesam-sgd": (_freesam, 0),
    "sam-ema": (_sam_ema, STEPS),
    "looksam-sgd": (_looksam, 4 + 1 + 4),
    "looksam-rmsprop": (_looksam_unfused, 4 + 1 + 4),
    # step BAD_STEP: a NaN in one element of rank 0's second-pass shard; the skip flag is
    # summed across the shards (one more all-reduce per step) and every rank skips
    "sam-skip-nonfinite": (_sam_skip, 2 * STEPS),
    # the same NaN under torch.amp.GradScaler (power-of-two scales: exact in fp64); the
    # scaler's found-inf check on DTensor gradients agrees across ranks by itself (DTensor's
    # collective, not counted here), fastsam adds only its norm's all-reduce
    "sam-gradscaler": (_sam, STEPS),
    # FriendlySAM: its momentum in the shards, the norm of d all-reduced once per step
    "friendlysam-sgd": (_friendlysam, STEPS),
    # MSAM: one pass; the norm of the momentum all-reduced once per step
    "msam-adam": (_msam, STEPS),
    # max_grad_norm: GSAM takes the clip's ‖g_adv‖² from its own sums: no more all-reduces
    "gsam-clipped": (_gsam_clipped, 2 * STEPS),
    # AE-SAM: the norm all-reduced once per step, SAM step or plain
    "aesam-sgd": (_aesam, STEPS),
    # WSAM (decoupled): SAM's norm, then elementwise passes over the shards only
    "wsam-sgd": (_wsam, STEPS),
    # ESAM: SAM's norm; each shard draws the mask of its place in the whole tensor (the
    # elements one process moves)
    "esam-sgd": (_esam, STEPS),
}
BAD_STEP = 1


def make_model():
    """Layers of 8, 3 and 1 rows: over 2 ranks a shard may be uneven or empty."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), torch.nn.Tanh(),
        torch.nn.Linear(3, 1),
    ).double()


def make_data(world):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8 * world, 6, generator=gen, dtype=torch.float64)
    return x, torch.randn(8 * world, 1, generator=gen, dtype=torch.float64)


def train(model, optimizer, x, y, between=nullcontext, bad_step=None, scaler=None):
    """STEPS steps (two passes each; one for FreeSAM and LookSAM's look-ahead steps);
    ``between`` wraps each optimizer call (counting). ``bad_step``: "poison" puts a NaN into
    rank 0's local gradient shard in step BAD_STEP's second pass, "omit" leaves that step out
    (the single-process reference of a skipped step). ``scaler``: a GradScaler for both passes
    (the second step is ``scaler.step``)."""
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    loss_fn = torch.nn.functional.mse_loss
    for step in range(STEPS):
        if bad_step == "omit" and step == BAD_STEP:
            continue
        scale(loss_fn(model(x), y)).backward()
        if isinstance(optimizer, (fastsam.FreeSAM, fastsam.MSAM)):  # one pass per step
            with between():
                optimizer.step()
            optimizer.zero_grad()
            continue
        with between():
            second_pass = optimizer.first_step(zero_grad=True)
        if second_pass is False:  # LookSAM's look-ahead step: updated already
            continue
        scale(loss_fn(model(x), y)).backward()
        if bad_step == "poison" and step == BAD_STEP and dist.get_rank() == 0:
            next(model.parameters()).grad._local_tensor.view(-1)[0] = float("nan")
        with between():
            if scaler is None:
                optimizer.second_step(zero_grad=True)
            else:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()


class _Counting:
    """Counts torch.distributed.all_reduce calls made inside ``with counter():``."""

    def __init__(self):
        self.n = 0
        self.active = False
        self._all_reduce = dist.all_reduce
        dist.all_reduce = self._count

    def _count(self, *args, **kwargs):
        self.n += self.active
        return self._all_reduce(*args, **kwargs)

    def __call__(self):
        return self

    def __enter__(self):
        self.active = True

    def __exit__(self, *exc):
        self.active = False


def run(rank, world, init_file, backends, out, replicas=1, names=None):
    """Every configuration in ``names`` (default all) on every backend. ``replicas`` > 1: HSDP,
    a (replicas, world / replicas) mesh, parameters replicated over its first dimension and
    sharded over its second."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    if replicas == 1:
        mesh = init_device_mesh("cpu", (world,))
    else:
        mesh = init_device_mesh("cpu", (replicas, world // replicas),
                                mesh_dim_names=("replicate", "shard"))
    x, y = (t.chunk(world)[rank] for t in make_data(world))
    counter = _Counting()
    results = {}
    for name in names or CONFIGS:
        make_optimizer = CONFIGS[name][0]
        for backend in backends:
            model = _sharded_model(mesh)
            optimizer = make_optimizer(model.parameters(), backend)
            counter.n = 0
            bad = name in ("sam-skip-nonfinite", "sam-gradscaler")
            scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10)
                      if name == "sam-gradscaler" else None)
            train(model, optimizer, x, y, counter, "poison" if bad else None, scaler)
            full = [p.full_tensor().detach() for p in model.parameters()]
            results[f"{name}/{backend}"] = {
                "params": full, "allreduces": counter.n,
                "skipped": optimizer.amp_skipped_steps + optimizer.nonfinite_skipped_steps,
            }
    torch.save(results, f"{out}/rank{rank}.pt")
    _leave()


def _sharded_model(mesh):
    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _kept(model, optimizer):
    """What a resumed run must reproduce: the full weights, the averaged weights (when the
    optimizer averages) and the optimizer's counters."""
    kept = {"weights": [p.full_tensor().detach() for p in model.parameters()],
            "counters": optimizer.state_dict()["param_groups"][0]["fastsam_counters"]}
    if optimizer.n_averaged:
        with optimizer.averaged_weights():
            kept["averaged"] = [p.full_tensor().detach().clone() for p in model.parameters()]
    return kept


def checkpoint_run(rank, world, init_file, backend, out, names):
    """torch.distributed.checkpoint's FSDP2 flow for each configuration in ``names``: train,
    dcp.save the model's and optimizer's state dicts, build a fresh model and optimizer, dcp.load
    into them (their own state dicts as templates), then train both further; saves what both
    kept (:func:`_kept`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    x, y = (t.chunk(world)[rank] for t in make_data(world))
    results = {}
    for name in names:
        make_optimizer = CONFIGS[name][0]
        model = _sharded_model(mesh)
        optimizer = make_optimizer(model.parameters(), backend)
        train(model, optimizer, x, y, bad_step="poison" if name == "sam-skip-nonfinite" else None)
        saved = {"model": get_model_state_dict(model),
                 "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(saved, checkpoint_id=f"{out}/{name}")
        fresh = _sharded_model(mesh)
        fresh_optimizer = make_optimizer(fresh.parameters(), backend)
        loaded = {"model": get_model_state_dict(fresh),
                  "optim": get_optimizer_state_dict(fresh, fresh_optimizer)}
        dcp.load(loaded, checkpoint_id=f"{out}/{name}")
        set_model_state_dict(fresh, loaded["model"])
        set_optimizer_state_dict(fresh, fresh_optimizer, loaded["optim"])
        train(model, optimizer, x, y)
        train(fresh, fresh_optimizer, x, y)
        results[name] = {"continued": _kept(model, optimizer), "resumed": _kept(fresh,
                                                                              fresh_optimizer)}
    torch.save(results, f"{out}/rank{rank}.pt")
    _leave()


def _leave():
    """End a worker whose results are saved: every rank past its last collective, the group
    shut down, and no interpreter finalization, where a gloo worker thread still releasing a
    callback can abort the process ("terminate called without an active exception"; seen
    once in CI on the checkpoint test; tests/ddp_worker.py ends the same way)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
