"""SAM under DDP on two CPU processes (gloo), both modes, against a single-process reference;
the per-worker mode's first pass makes no all-reduce (fastsam.local_pass)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fastsam

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_worker  # noqa: E402

WORLD = 2
# multi-process: marked slow (docs/design.md §4; `-m "not slow and not bench"` for a quick run)
pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
    pytest.mark.slow,
]


def _run(mode, tmp_path):
    torch.multiprocessing.spawn(ddp_worker.run, args=(WORLD, str(tmp_path / "init"), mode,
                                                      str(tmp_path)), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _global_reference():
    """One process over the whole batch: DDP's mean of equal shards' mean losses."""
    model = ddp_worker.make_model()
    x, y = ddp_worker.make_data(WORLD)
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, **ddp_worker.HYPER)
    for _ in range(ddp_worker.STEPS):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return list(model.parameters())


def _per_worker_reference():
    """By hand: each shard's own perturbation e_k = rho·g_k/‖g_k‖, the gradients at w + e_k
    over each shard averaged, then torch.optim.SGD."""
    model = ddp_worker.make_model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=ddp_worker.HYPER["lr"],
                           momentum=ddp_worker.HYPER["momentum"])
    shards = list(zip(*(t.chunk(WORLD) for t in ddp_worker.make_data(WORLD))))
    loss_fn = torch.nn.functional.cross_entropy
    for _ in range(ddp_worker.STEPS):
        total = [torch.zeros_like(p) for p in params]
        for x, y in shards:
            grads = torch.autograd.grad(loss_fn(model(x), y), params)
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            with torch.no_grad():
                eps = [ddp_worker.HYPER["rho"] * g / (norm + 1e-12) for g in grads]
                for p, e in zip(params, eps):
                    p.add_(e)
            second = torch.autograd.grad(loss_fn(model(x), y), params)
            with torch.no_grad():
                for p, e, t, g in zip(params, eps, total, second):
                    p.sub_(e)
                    t.add_(g / WORLD)
        for p, t in zip(params, total):
            p.grad = t
        base.step()
    return params


@pytest.mark.parametrize("mode", ["global", "local"])
def test_ddp_matches_single_process_reference(mode, tmp_path):
    results = _run(mode, tmp_path)
    reference = _global_reference() if mode == "global" else _per_worker_reference()
    for result in results:  # every worker holds the same weights, the reference's
        for p, r in zip(result["params"], reference):
            torch.testing.assert_close(p, r.detach(), rtol=1e-10, atol=1e-12)
    if mode == "local":
        (tmp_path / "global").mkdir()
        global_ = _run("global", tmp_path / "global")
        # local_pass kept the first pass off the wire: half the all-reduces of global SAM
        assert results[0]["allreduces"] * 2 == global_[0]["allreduces"] > 0


def test_local_pass_is_a_no_op_without_ddp():
    model = torch.nn.Linear(2, 2)
    with fastsam.local_pass(model) as inside:
        assert inside is model
