"""fastsam over FSDP2 (``fully_shard``) parameters on two CPU processes (gloo): every optimizer
configuration of tests/fsdp_worker.py, on every backend, against the same optimizer in one
process over the whole batch; one all-reduce per reduction pass, none per parameter."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import BACKENDS, NATIVE

import fastsam

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsdp_worker  # noqa: E402

WORLD = 2
# multi-process: marked slow (docs/design.md §4; `-m "not slow and not bench"` for a quick run)
pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Both ranks' results of every configuration and backend (one pair of processes)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    torch.multiprocessing.spawn(
        fsdp_worker.run, args=(WORLD, str(tmp / "init"), BACKENDS, str(tmp)), nprocs=WORLD
    )
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process(name, backend):
    return _single_process_over(name, backend, WORLD)


def _single_process_over(name, backend, world):
    """The same optimizer on the unsharded model over the whole batch: FSDP2 averages the
    ranks' gradients of equal shards' mean losses, the gradient of the whole batch's mean."""
    model = fsdp_worker.make_model()
    make_optimizer, _ = fsdp_worker.CONFIGS[name]
    fsdp_worker.train(model, make_optimizer(model.parameters(), backend),
                      *fsdp_worker.make_data(world),
                      bad_step="omit" if name in ("sam-skip-nonfinite", "sam-gradscaler")
                      else None)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("name", list(fsdp_worker.CONFIGS))
def test_fsdp2_matches_single_process(name, backend, sharded_runs):
    reference = _single_process(name, backend)
    for rank in sharded_runs:
        result = rank[f"{name}/{backend}"]
        for p, r in zip(result["params"], reference, strict=True):
            torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
        # The weights moved: the comparison is not between two untouched models.
        assert any(not torch.equal(p, q) for p, q in zip(result["params"],
                                                          fsdp_worker.make_model().parameters()))
        assert result["allreduces"] == fsdp_worker.CONFIGS[name][1], result["allreduces"]
        assert result["skipped"] == (name in ("sam-skip-nonfinite", "sam-gradscaler"))


HSDP_CONFIGS = ["sam-sgd", "gsam-adamw", "looksam-sgd", "esam-sgd"]
HSDP_BACKEND = NATIVE[0] if NATIVE else "torch"


@pytest.fixture(scope="module")
def hsdp_runs(tmp_path_factory):
    """HSDP on 4 processes, a (2, 2) mesh (one backend: the sharding logic is the wrapper's)."""
    tmp = tmp_path_factory.mktemp("hsdp")
    torch.multiprocessing.spawn(
        fsdp_worker.run, args=(4, str(tmp / "init"), [HSDP_BACKEND], str(tmp), 2, HSDP_CONFIGS),
        nprocs=4,
    )
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(4)]


@pytest.mark.parametrize("name", HSDP_CONFIGS)
def test_hsdp_reduces_over_the_shard_dimension_only(name, hsdp_runs):
    """Each sum is all-reduced over the 2 shards of its replica group only (reducing over the
    replicas too would double it): the numbers of one process over the whole batch, and the
    same all-reduce count as FSDP2."""
    reference = _single_process_over(name, HSDP_BACKEND, world=4)
    for rank in hsdp_runs:
        result = rank[f"{name}/{HSDP_BACKEND}"]
        for p, r in zip(result["params"], reference, strict=True):
            torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
        assert result["allreduces"] == fsdp_worker.CONFIGS[name][1]


# LookSAM (k = 2) is saved after 3 steps: the resumed run must take a look-ahead step next,
# with the saved direction; the skip run is saved after a skipped step.
DCP_CONFIGS = ["sam-sgd", "gsam-adamw", "asam-filter-adam", "freesam-sgd", "sam-ema",
               "looksam-sgd", "sam-skip-nonfinite", "friendlysam-sgd", "msam-adam", "aesam-sgd",
               "wsam-sgd", "esam-sgd"]


def test_distributed_checkpoint_resumes_bit_identically(tmp_path):
    """torch.distributed.checkpoint (dcp.save / dcp.load with get/set_optimizer_state_dict, the
    FSDP2 way): a fresh model and optimizer loaded from the checkpoint continue exactly as the
    trained ones: weights, averaged weights and counters. DCP creates an empty optimizer's
    state with a zero-lr step() (accepted), loads with parameter names as keys (mapped through
    param_groups, as torch.optim does), and keeps only per-parameter states and param groups
    (where fastsam's tensors and counters are)."""
    torch.multiprocessing.spawn(
        fsdp_worker.checkpoint_run,
        args=(WORLD, str(tmp_path / "init"), HSDP_BACKEND, str(tmp_path), DCP_CONFIGS),
        nprocs=WORLD,
    )
    for r in range(WORLD):
        results = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for name in DCP_CONFIGS:
            continued, resumed = results[name]["continued"], results[name]["resumed"]
            assert continued.keys() == resumed.keys(), name
            assert continued["counters"] == resumed["counters"], name
            for key in ("weights", "averaged"):
                for a, b in zip(continued.get(key, []), resumed.get(key, []), strict=True):
                    assert torch.equal(a, b), (name, key)
        assert results["sam-ema"]["resumed"]["counters"]["n_averaged"] == 2 * fsdp_worker.STEPS
        assert results["sam-skip-nonfinite"]["resumed"]["counters"]["nonfinite_skipped"] == 1
        assert results["looksam-sgd"]["resumed"]["counters"]["looksam_steps"] == 6


def test_zero_lr_step_without_first_step_only_initialises_state(backend):
    """The step DCP makes on an empty optimizer (zero gradients, every lr 0): the base
    optimizer's state is created and no weight moves; with a non-zero lr the same call is still
    refused (a forgotten first_step())."""
    p = torch.nn.Parameter(torch.randn(5))
    opt = fastsam.SAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1,
                      backend=backend)
    p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="no first_step\\(\\) is pending"):
        opt.step()
    before = p.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert torch.equal(p, before) and "momentum_buffer" in opt.state[p]


def test_mixed_sharded_and_plain_parameters_are_refused(tmp_path):
    torch.multiprocessing.spawn(_mixed, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=1)
    assert (tmp_path / "refused").read_text().startswith("fastsam: 2 of the 3 parameters")


def _mixed(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layer = torch.nn.Linear(3, 2)
    fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
    plain = torch.nn.Parameter(torch.zeros(2))
    try:
        fastsam.SAM([*layer.parameters(), plain], torch.optim.SGD, lr=0.1)
    except RuntimeError as exc:
        Path(out, "refused").write_text(str(exc))
    dist.destroy_process_group()
