"""Weight averaging (SWA, EMA) fused into the update: the averaged weights against
torch.optim.swa_utils.AveragedModel over the same updates, on every backend and optimizer;
swapping for evaluation, BatchNorm refresh, checkpoints, fusion and errors."""
import copy

import pytest
import torch
from conftest import DEVICE
from harness import SHAPES, Landscape, clone_params, drive, make_params
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import fastsam

STEPS = 7
SKIP = {2: (1,), 4: (6, 2)}  # steps where some parameters have no gradient

OPTIMIZERS = {
    "sam_sgd": (fastsam.SAM, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "asam_adamw": (fastsam.ASAM, torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "gsam_sgd": (fastsam.GSAM, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "freesam_adam": (fastsam.FreeSAM, torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "sam_rmsprop_unfused": (fastsam.SAM, torch.optim.RMSprop, dict(lr=1e-3)),
}
SCHEDULES = {
    "swa": (fastsam.SWA(start=1, every=2), None),
    "ema": (fastsam.EMA(decay=0.8), get_ema_multi_avg_fn(0.8)),
}


def reference_average(cls, base, kw, params, schedule, multi_avg_fn, backend):
    """The same optimizer without averaging, AveragedModel updated after the same updates, and
    fp64 snapshots of the weights there (for :func:`exact_average`)."""
    module = torch.nn.ParameterList(params)
    averaged = AveragedModel(module, multi_avg_fn=multi_avg_fn)
    opt = cls(params, base, backend=backend, **kw)
    land, snapshots = Landscape(SHAPES, seed=3), []
    for t in range(STEPS):
        drive(opt, params, _Replay(land, t), 1, SKIP)
        if schedule.due(t + 1):
            averaged.update_parameters(module)
            snapshots.append([p.detach().to(torch.float64, copy=True) for p in params])
    expected = [p.detach() for p in averaged.module.parameters()]
    return expected, int(averaged.n_averaged), exact_average(snapshots, schedule)


def exact_average(snapshots, schedule):
    """The average of fp64 snapshots by the textbook formula (no rounding to speak of)."""
    if isinstance(schedule, fastsam.SWA):
        return [torch.stack(ts).mean(0) for ts in zip(*snapshots)]
    out = [t.clone() for t in snapshots[0]]
    for snap in snapshots[1:]:
        out = [schedule.decay * a + (1 - schedule.decay) * s for a, s in zip(out, snap)]
    return out


class _Replay:
    """The landscape as seen at step ``t`` (so one-step training calls skip the same params)."""

    def __init__(self, land, t):
        self.land, self.t = land, t

    def set_grads(self, params, skip=()):
        self.land.set_grads(params, SKIP.get(self.t, ()))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-12, atol=1e-14)),
                                       (torch.float32, dict(rtol=1e-6, atol=1e-7))])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matches_averaged_model(backend, device, name, schedule, dtype, tol):
    cls, base, kw = OPTIMIZERS[name]
    sched, multi_avg_fn = SCHEDULES[schedule]
    params = make_params(SHAPES, dtype, device, seed=4)
    twin = clone_params(params)
    opt = cls(params, base, backend=backend, average=sched, **kw)
    drive(opt, params, Landscape(SHAPES, seed=3), STEPS, SKIP)
    expected, n, exact = reference_average(cls, base, kw, twin, sched, multi_avg_fn, backend)
    assert opt.n_averaged == n > 1
    trained = [p.detach().clone() for p in params]
    for p, t in zip(params, twin):  # averaging changes nothing about training
        torch.testing.assert_close(p.detach(), t.detach(), rtol=0, atol=0)
    # AveragedModel's SWA on CUDA rounds its weight 1/(n + 1) to fp32 (seen on an H100 with
    # torch 2.11: errors of 9e-9 on weights of order 0.1 in fp64), so it is an fp32-accurate
    # reference there; fastsam's weight is exact, checked against the textbook mean below.
    model_tol = dict(rtol=1e-6, atol=1e-7) if (
        device.type == "cuda" and dtype == torch.float64 and schedule == "swa") else tol
    with opt.averaged_weights():
        for p, e, x in zip(params, expected, exact):
            torch.testing.assert_close(p.detach(), e, **model_tol)
            torch.testing.assert_close(p.detach().double(), x, **tol)
    for p, t in zip(params, trained):  # swapped back exactly
        assert torch.equal(p.detach(), t)


@pytest.mark.parametrize("schedule", ["swa", "ema"])
def test_low_precision_average(backend, device, schedule):
    """bf16 parameters keep a bf16 average (as AveragedModel does). Against the exact average
    of the same bf16 snapshots, the fused average's error is at most 2x AveragedModel's plus
    one bf16 rounding (AveragedModel's SWA also rounds its weight 1/(n+1) to bf16)."""
    sched, multi_avg_fn = SCHEDULES[schedule]
    cls, base, kw = OPTIMIZERS["sam_sgd"]
    params = make_params(SHAPES, torch.bfloat16, device, seed=5)
    twin = clone_params(params)
    opt = cls(params, base, backend=backend, average=sched, **kw)
    drive(opt, params, Landscape(SHAPES, seed=3), STEPS, SKIP)
    expected, _, exact = reference_average(cls, base, kw, twin, sched, multi_avg_fn, backend)

    def error(values):
        return max(float((v.double() - e).abs().max()) for v, e in zip(values, exact) if e.numel())

    with opt.averaged_weights():
        ours = error([p.detach() for p in params])
    theirs = error(expected)
    scale = max(float(e.abs().max()) for e in exact if e.numel())
    assert ours <= 2 * theirs + 2**-8 * scale, (ours, theirs, scale)


def test_average_is_fused_into_the_update(device):
    """Triton: averaging adds no launch to a SAM step (4 launches with or without it)."""
    pytest.importorskip("triton")
    params = make_params(SHAPES, torch.float32, device, seed=6)
    land = Landscape(SHAPES, seed=3)
    counts = []
    for average in (None, "ema"):
        ps = clone_params(params)
        opt = fastsam.SAM(ps, torch.optim.SGD, lr=0.05, momentum=0.9, backend="triton",
                          average=average)
        drive(opt, ps, land, 2, SKIP)  # warm-up: momentum buffers exist, averages started
        backend = opt._backend_for(ps[0].device)
        before = backend.launches
        drive(opt, ps, land, 1, SKIP)
        counts.append(backend.launches - before)
    assert counts == [4, 4]


def test_state_dict_loads_into_the_plain_base_optimizer():
    params = make_params([(3,), (2, 2)], torch.float32, "cpu", seed=9)
    opt = fastsam.SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, average="swa")
    drive(opt, params, Landscape([(3,), (2, 2)], seed=3), 2, SKIP)
    sd = opt.state_dict()
    counters = [group["fastsam_counters"] for group in sd["param_groups"]]
    assert counters == [{"updates": 2, "n_averaged": 2, "amp_skipped": 0,
                         "nonfinite_skipped": 0}]
    assert all("averaged_weights" in s for s in sd["state"].values())
    plain = torch.optim.SGD(clone_params(params), lr=0.1, momentum=0.9)
    plain.load_state_dict(sd)  # the extra entries are carried, not in the way
    assert all("momentum_buffer" in s for s in plain.state.values())


def _layout(sd):
    """A state dict's entries without their values: what a DCP template must match."""
    return ({i: sorted(entry) for i, entry in sd["state"].items()},
            [sorted(group) for group in sd["param_groups"]])


@pytest.mark.parametrize("make", [
    lambda ps: fastsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                           average=fastsam.SWA(start=2)),
    lambda ps: fastsam.LookSAM(ps, torch.optim.Adam, lr=0.01, k=2, average="ema"),
], ids=["sam-swa-late", "looksam-ema"])
def test_every_state_dict_has_the_same_entries(make):
    """torch.distributed.checkpoint loads a checkpoint into a fresh optimizer's state dict (its
    template), reading only the entries the template has: a state dict has the same entries
    before the averaging starts (copies of the weights stand in for the averages) and before
    LookSAM's first step (zero directions) as later. The stand-ins are copies, and are not
    loaded back while nothing has been averaged."""
    shapes = [(3,), (2, 2)]
    params = make_params(shapes, torch.float32, "cpu", seed=4)
    opt = make(params)
    land = Landscape(shapes, seed=5)
    drive(opt, params, land, 1, SKIP)
    before = opt.state_dict()
    assert opt.n_averaged == 0 or isinstance(opt, fastsam.LookSAM)
    for i, p in enumerate(params):
        stand_in = before["state"][i]["averaged_weights"]
        if opt.n_averaged == 0:
            assert torch.equal(stand_in, p) and stand_in.data_ptr() != p.data_ptr()
    drive(opt, params, land, 3, SKIP)
    assert opt.n_averaged > 0
    assert _layout(opt.state_dict()) == _layout(before)
    fresh_params = clone_params(params)
    fresh = make(fresh_params)
    for p in fresh_params:
        p.grad = torch.zeros_like(p)
    fresh.param_groups[0]["lr"] = 0.0  # DCP's way of making a fresh optimizer's state
    fresh.step()
    assert _layout(fresh.state_dict()) == _layout(before)
    fresh.load_state_dict(before)
    fresh.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    if not isinstance(opt, fastsam.LookSAM):
        with pytest.raises(RuntimeError, match="no weights have been averaged yet"):
            fresh.swap_average()
        assert not fresh._averager.averaged  # no copy of the model until the averaging starts


def test_swap_errors_and_refusals():
    params = make_params([(3,)], torch.float32, "cpu")
    land = Landscape([(3,)], seed=3)
    plain = fastsam.SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="averages no weights"):
        plain.swap_average()
    opt = fastsam.SAM(params, torch.optim.SGD, lr=0.1, average=fastsam.SWA(start=2, every=3))
    drive(opt, params, land, 2, SKIP)
    with pytest.raises(RuntimeError, match="no weights have been averaged yet: 2 updates made"):
        opt.swap_average()
    drive(opt, params, land, 3, SKIP)
    opt.swap_average()
    with pytest.raises(RuntimeError, match="averaged weights are swapped"):
        drive(opt, params, land, 1, SKIP)
    with pytest.raises(RuntimeError, match="averaged weights are swapped"):
        opt.state_dict()
    opt.swap_average()
    drive(opt, params, land, 1, SKIP)
    land.set_grads(params)
    opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.swap_average()


@pytest.mark.parametrize("value,error", [
    ("mean", ValueError), (0.9, ValueError), (True, ValueError),
])
def test_bad_average_argument(value, error):
    with pytest.raises(error, match="average must be"):
        fastsam.SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, average=value)


@pytest.mark.parametrize("make,error,match", [
    (lambda: fastsam.EMA(decay=1.0), ValueError, r"decay must be in \[0, 1\)"),
    (lambda: fastsam.EMA(decay="0.9"), TypeError, "decay must be a number"),
    (lambda: fastsam.SWA(every=0), ValueError, "every must be >= 1"),
    (lambda: fastsam.SWA(start=-1), ValueError, "start must be >= 0"),
    (lambda: fastsam.SWA(start=1.5), TypeError, "start must be an int"),
])
def test_bad_schedules(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_update_bn_matches_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2), torch.nn.BatchNorm1d(2, momentum=0.3))
    twin = copy.deepcopy(model)
    batches = [(torch.randn(16, 4) * (i + 1), torch.zeros(16)) for i in range(5)]
    model.eval()
    fastsam.update_bn(batches, model)
    torch.optim.swa_utils.update_bn(batches, twin)
    assert not model.training  # mode restored
    for a, b in zip(model.modules(), twin.modules()):
        if isinstance(a, torch.nn.BatchNorm1d):
            torch.testing.assert_close(a.running_mean, b.running_mean)
            torch.testing.assert_close(a.running_var, b.running_var)
            assert a.momentum == b.momentum
    assert int(model[1].num_batches_tracked) == 5


def test_swa_recipe_with_bn_refresh_runs_as_documented():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 1)).to(DEVICE)
    data = [(torch.randn(16, 4, device=DEVICE), torch.randn(16, 1, device=DEVICE))
            for _ in range(4)]
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9,
                      average=fastsam.SWA(start=2))
    for _ in range(2):
        for x, y in data:
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            with fastsam.frozen_bn_stats(model):
                torch.nn.functional.mse_loss(model(x), y).backward()
            opt.second_step(zero_grad=True)
    trained = [p.detach().clone() for p in model.parameters()]
    with opt.averaged_weights():
        fastsam.update_bn(data, model)
        model.eval()
        loss = sum(float(torch.nn.functional.mse_loss(model(x), y)) for x, y in data)
        averaged = [p.detach().clone() for p in model.parameters()]
    assert loss == loss and opt.n_averaged == 6
    assert all(torch.equal(p.detach(), t) for p, t in zip(model.parameters(), trained))
    assert not all(torch.equal(a, t) for a, t in zip(averaged, trained))
