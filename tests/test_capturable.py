"""capturable=True: inf/NaN skips (GradScaler's found_inf, skip_nonfinite's check) are decided
on the device by the update kernels, Adam's step counts live on the parameters' device, and no
step reads a tensor's value on the host.

Each run is compared with the same run under capturable=False, whose host-side skips
test_amp.py and test_api.py check against the textbook loop: weights after every step, the
optimizer state and the counters, over 7 steps with skipped ones among them (the very first
update, which creates the state, and one in steady state)."""
import copy
import gc
import weakref

import pytest
import torch
from conftest import DEVICE, FUSED
from harness import CONFIGS, LOSS, no_host_reads, sync_errors
from harness import small_data as _data
from harness import small_model as _model
from harness import step as _step

import fastsam
from fastsam.backends import _constants

STEPS = 7
POISONED = (0, 3, 4)  # steps whose update's gradient holds an inf
WARM_UP = 2  # steps before the host-read guard (plans, tables and state are made first)

def _run(name, backend, source, capturable, refuse=no_host_reads, **options):
    x, y = _data()
    model = _model()
    opt = CONFIGS[name](model.parameters(), backend=backend, capturable=capturable,
                        skip_nonfinite=source == "skip_nonfinite", **options)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10) if source == "scaler" else None
    weights = []
    for t in range(STEPS):
        guarded = capturable and t >= WARM_UP
        # The torch backend's perturb reads the norm on CPU tensors (a shortcut that is free
        # there and never taken on a GPU): its first pass is not guarded on CPU.
        first = guarded and (backend != "torch" or DEVICE.type != "cpu")
        _step(model, opt, x, y, scaler, t in POISONED, (first, guarded), refuse)
        if t < WARM_UP:  # checkpoints taken mid-run (after a skipped first update, and
            opt.state_dict()  # after one that went ahead) change nothing that follows
        weights.append([p.detach().clone() for p in model.parameters()])
    return weights, opt, scaler


@pytest.mark.parametrize("source", ["scaler", "skip_nonfinite"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_capturable_steps_equal_host_decided_steps(backend, name, source):
    host, host_opt, host_scaler = _run(name, backend, source, capturable=False)
    dev, dev_opt, dev_scaler = _run(name, backend, source, capturable=True)
    # The fused kernels compute the same formulas either way; the torch backend forms Adam's
    # per-tensor bias corrections with device ops instead of addcdiv's host scalar.
    exact = backend in FUSED or "sgd" in name
    for t in range(STEPS):
        for a, b in zip(host[t], dev[t]):
            if exact:
                assert torch.equal(a, b), f"step {t}"
            else:
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        if t in POISONED:  # skipped: every weight exactly as before the step
            before = dev[t - 1] if t else [p.detach() for p in _model().parameters()]
            assert all(torch.equal(a, b) for a, b in zip(before, dev[t]))
    counters = {
        "amp_skipped": len(POISONED) if source == "scaler" else 0,
        "nonfinite_skipped": len(POISONED) if source == "skip_nonfinite" else 0,
    }
    for opt in (host_opt, dev_opt):
        assert opt.amp_skipped_steps == counters["amp_skipped"]
        assert opt.nonfinite_skipped_steps == counters["nonfinite_skipped"]
    host_sd, dev_sd = host_opt.state_dict(), dev_opt.state_dict()
    assert host_sd["param_groups"][0]["fastsam_counters"] == dev_sd["param_groups"][0][
        "fastsam_counters"]
    assert host_sd["param_groups"][0]["fastsam_counters"]["updates"] == STEPS - len(POISONED)
    assert host_sd["state"].keys() == dev_sd["state"].keys()
    for index, entry in host_sd["state"].items():
        assert entry.keys() == dev_sd["state"][index].keys()
        for key, value in entry.items():
            mine = dev_sd["state"][index][key]
            if key == "step":  # torch's capturable layout: on the parameters' device
                assert mine.device == DEVICE and float(mine) == float(value)
            elif exact:
                assert torch.equal(value, mine), key
            elif key == "looksam_direction":  # a unit vector from a difference of close ones
                torch.testing.assert_close(mine, value, rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(mine, value, rtol=1e-6, atol=1e-7)
    if source == "scaler":
        assert host_scaler.get_scale() == dev_scaler.get_scale() < 2.0**10


AVERAGES = {
    "swa_start1_every2": fastsam.SWA(start=1, every=2),
    "ema_every1": fastsam.EMA(decay=0.75),
}


@pytest.mark.parametrize("average", list(AVERAGES))
@pytest.mark.parametrize("name", ["sam_sgd_nesterov", "gsam_adamw", "freesam_sgd",
                                  "looksam_adam"])
def test_capturable_averaging_runs_its_schedule_on_the_device(backend, name, average):
    """With capturable the averaging schedule counts updates on the device: skipped updates
    are not counted, and the averaged weights after every step equal capturable=False's
    (where the host decides), with no host read in a step."""
    weights_a, opt_a, _ = _run(name, backend, "scaler", False, average=AVERAGES[average])
    weights_b, opt_b, _ = _run(name, backend, "scaler", True, average=AVERAGES[average])
    exact = backend in FUSED or "sgd" in name
    for a, b in zip(weights_a[-1], weights_b[-1]):
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    # 4 updates made (calls 1, 4 and 5 of 7 skipped); SWA(1, 2) averages after update 3
    # (counting the skipped calls would make it 2 averages), the EMA after each of the 4
    expected = 1 if average.startswith("swa") else STEPS - len(POISONED)
    assert opt_a.n_averaged == opt_b.n_averaged == expected
    counters = [o.state_dict()["param_groups"][0]["fastsam_counters"] for o in (opt_a, opt_b)]
    assert counters[0] == counters[1]
    averaged = []
    for opt in (opt_a, opt_b):
        with opt.averaged_weights():
            averaged.append([p.detach().clone() for p in opt.param_groups[0]["params"]])
    for a, b in zip(*averaged):
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(a, w) for a, w in zip(averaged[1], weights_b[-1]))


def test_zero_and_one_average_weights_are_exact(backend):
    """The update kernels' averaging at a device weight of 0 (capturable: an update the
    schedule skips) leaves the average as it is, and at 1 copies the new weights, even where
    w - avg overflows (0·inf would be NaN)."""
    from fastsam.backends import select_backend
    from fastsam.functional import Average, SGDHyper

    engine = select_backend(backend, DEVICE)
    hyper = SGDHyper(lr=0.5, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False)
    big = torch.tensor([3e38, 1.0, -2.5], device=DEVICE)
    for weight, expected in ((0.0, -big), (1.0, big - 0.5)):
        w, avg = big.clone(), -big
        engine.restore_sgd([w], [torch.ones_like(w)], [big.clone()], [], hyper, False, None,
                           Average([avg], torch.tensor(weight, dtype=torch.float64,
                                                       device=DEVICE)))
        assert torch.equal(w, big - 0.5)
        assert torch.equal(avg, expected), weight


def test_capturable_averaging_continues_from_a_checkpoint(backend):
    """The device counts start from a loaded state dict's counters (both layouts)."""
    average = fastsam.SWA(start=1, every=2)
    x, y = _data()
    models = [_model(), _model()]
    opts = [fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend,
                        capturable=c, average=average) for m, c in zip(models, (False, True))]
    for _ in range(4):  # updates 1..4: averaged after 3
        _step(models[0], opts[0], x, y, None, False, (False, False))
    models[1].load_state_dict(models[0].state_dict())
    opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))
    assert opts[1].n_averaged == 1
    for _ in range(3):  # updates 5..7: averaged after 5 and 7
        for m, o in zip(models, opts):
            _step(m, o, x, y, None, False, (False, False))
    assert opts[0].n_averaged == opts[1].n_averaged == 3
    averaged = []
    for opt in opts:
        with opt.averaged_weights():
            averaged.append([p.detach().clone() for p in opt.param_groups[0]["params"]])
    assert all(torch.equal(a, b) for a, b in zip(*averaged))


def test_skipped_first_update_keeps_torch_optims_first_step(backend):
    """A skipped first update leaves zero momentum buffers and Adam moments at step 0; the next
    update is then torch.optim's first step exactly (buf = d undampened, bias corrections at
    t = 1). A state dict taken after the skipped step has no momentum buffer yet (torch.optim
    would have none): a fresh optimizer loaded from it makes that first step too."""
    x, y = _data()
    for base, kw in ((torch.optim.SGD, dict(momentum=0.9)),
                     (torch.optim.SGD, dict(momentum=0.9, dampening=0.5)),
                     (torch.optim.Adam, {})):
        runs = []
        for poison_first in (True, False):
            model = _model()
            opt = fastsam.SAM(model.parameters(), base, lr=0.05, backend=backend,
                              capturable=True, skip_nonfinite=True, **kw)
            if poison_first:
                _step(model, opt, x, y, None, True, (False, False))
                saved = copy.deepcopy(opt.state_dict())
                if kw.get("dampening"):
                    assert all("momentum_buffer" not in s for s in saved["state"].values())
                opt = fastsam.SAM(model.parameters(), base, lr=0.05, backend=backend,
                                  capturable=True, skip_nonfinite=True, **kw)
                opt.load_state_dict(saved)
            _step(model, opt, x, y, None, False, (False, False))
            runs.append((model, opt))
        (a, opt_a), (b, opt_b) = runs
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        sd_a, sd_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        for index in sd_b:
            for key, value in sd_b[index].items():
                assert torch.equal(sd_a[index][key].cpu(), value.cpu()), key


def test_capturable_refusals():
    model = _model()
    with pytest.raises(TypeError, match="capturable must be True or False"):
        fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, capturable=1)
    with pytest.raises(ValueError, match="RMSprop"):
        fastsam.SAM(model.parameters(), torch.optim.RMSprop, lr=0.1, capturable=True)
    # a base option fastsam does not fuse: refused at the step, before any weight moves
    x, y = _data()
    LOSS(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt = fastsam.SAM(model.parameters(), torch.optim.Adam, lr=0.1, capturable=True)
    opt.param_groups[0]["differentiable"] = True
    with pytest.raises(RuntimeError, match="cannot be skipped on the device"):
        opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_loaded_host_layout_moves_adam_steps_to_the_device(backend):
    """A state dict of a capturable=False run (CPU steps) loads into a capturable optimizer and
    continues exactly as the run it came from."""
    x, y = _data()
    models = [_model(), _model()]
    opts = [fastsam.SAM(m.parameters(), torch.optim.Adam, lr=1e-2, backend=backend,
                        capturable=c) for m, c in zip(models, (False, True))]
    for _ in range(2):
        _step(models[0], opts[0], x, y, None, False, (False, False))
    models[1].load_state_dict(models[0].state_dict())
    # a copy, as from a checkpoint file (torch.optim keeps loaded tensors that need no cast)
    opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))
    for _ in range(2):
        for m, o in zip(models, opts):
            _step(m, o, x, y, None, False, (False, False))
    for p, q in zip(*(m.parameters() for m in models)):
        if backend in FUSED:
            assert torch.equal(q, p)
        else:  # bias corrections as device ops (see the first test)
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert all(s["step"].device == DEVICE and float(s["step"]) == 4.0
               for s in opts[1].state.values())


RHOS = (0.25, 0.0625, 0.5, 0.125, 0.0, 0.375)  # exact in fp32: the runs compare bitwise


@pytest.mark.parametrize("name", [n for n in CONFIGS if "freesam" not in n])
def test_tensor_rho_written_in_place_drives_the_steps(backend, name):
    """rho as a device tensor (what a captured step reads): a schedule written into it in place
    gives the steps a float rho set on the group gives, and no step reads it on the host."""
    x, y = _data()
    runs = []
    for tensor in (False, True):
        model = _model()
        rho = torch.tensor(RHOS[0], device=DEVICE) if tensor else RHOS[0]
        opt = CONFIGS[name](model.parameters(), rho=rho, backend=backend, capturable=tensor)
        weights = []
        for t, value in enumerate(RHOS):
            if tensor:
                rho.fill_(value)
                assert opt.param_groups[0]["rho"] is rho
            else:
                opt.param_groups[0]["rho"] = value
            guarded = tensor and t >= WARM_UP
            first = guarded and (backend != "torch" or DEVICE.type != "cpu")
            _step(model, opt, x, y, None, False, (first, guarded))
            weights.append([p.detach().clone() for p in model.parameters()])
        runs.append(weights)
    exact = backend in FUSED or "sgd" in name  # see the first test
    for t, (a, b) in enumerate(zip(*runs)):
        for p, q in zip(a, b):
            if exact:
                assert torch.equal(p, q), f"step {t}"
            else:
                torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_tensor_rho_checks_schedules_and_loads():
    model = _model()
    params = list(model.parameters())
    for bad, error, match in (
        (torch.tensor(1), TypeError, "one-element floating-point tensor"),
        (torch.tensor([0.1, 0.2]), TypeError, "one-element floating-point tensor"),
        (torch.tensor(0.1, requires_grad=True), ValueError, "must not require grad"),
        (torch.tensor(-0.1), ValueError, "finite number >= 0"),
        (torch.tensor(float("nan")), ValueError, "finite number >= 0"),
    ):
        with pytest.raises(error, match=match):
            fastsam.SAM(params, torch.optim.SGD, rho=bad, lr=0.1)
    # GSAM's rho schedule writes into a tensor rho, which stays the group's
    rho = torch.tensor([0.05], dtype=torch.float64)
    schedule = fastsam.schedulers.LinearScheduler(0.5, 0.25, total_steps=2)
    opt = fastsam.GSAM(params, torch.optim.SGD, rho=rho, lr=0.1, rho_scheduler=schedule)
    assert opt.param_groups[0]["rho"] is rho and float(rho) == 0.5  # the schedule's start
    opt.update_rho_t()
    assert opt.param_groups[0]["rho"] is rho and float(rho) == opt.rho_t == 0.375
    # a load copies the saved value into the live tensor (a graph captured over it still reads
    # the group's rho), from a float or a tensor
    saved = opt.state_dict()
    saved["param_groups"][0]["rho"] = 0.125
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["rho"] is rho and float(rho) == 0.125
    saved["param_groups"][0]["rho"] = torch.tensor(0.25)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["rho"] is rho and float(rho) == 0.25
    # a float rho takes the loaded value as torch.optim does
    plain = fastsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)
    plain.load_state_dict({**saved, "param_groups": [
        {**g, "rho": torch.tensor(0.5)} for g in plain.state_dict()["param_groups"]]})
    assert float(plain.param_groups[0]["rho"]) == 0.5


def test_native_ops_check_the_skip_flag():
    """The native operators take a one-element float32 flag only."""
    pytest.importorskip("fastsam._C")
    p = torch.zeros(4, device=DEVICE)
    args = ([p], [torch.ones(4, device=DEVICE)], [p.clone()], [], [0.1, 0.0, 0.0, 0.0], None,
            False, False, False, [], None, 0.0, 0, [])
    with pytest.raises(TypeError, match="skip must be float32"):
        torch.ops.fastsam.sgd(*args, torch.zeros(1, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="skip has 0 elements"):
        torch.ops.fastsam.sgd(*args, torch.zeros(0, device=DEVICE))
    old = args[2][0].clone()
    torch.ops.fastsam.sgd(*args, torch.ones(1, device=DEVICE))  # skipped: w ← w_old
    assert torch.equal(p, old)
    torch.ops.fastsam.sgd(*args, torch.zeros(1, device=DEVICE))
    assert torch.equal(p, old - 0.1)


def test_native_perturb_takes_rho_as_a_device_array():
    """The native perturb reads one float64 rho per group from memory on the parameters'
    device (the host never sees a tensor rho's value)."""
    pytest.importorskip("fastsam._C")
    w, g = torch.ones(4, device=DEVICE), torch.full((4,), 2.0, device=DEVICE)
    norm, scratch = torch.zeros((), device=DEVICE), torch.zeros(0, dtype=torch.float64,
                                                                  device=DEVICE)
    skipped, w_old = torch.zeros((), device=DEVICE), torch.empty(4, device=DEVICE)
    torch.ops.fastsam.norm([w], [g], [1], [0], [0.0], 2.0, norm, scratch, [])

    def perturb(rhos):
        torch.ops.fastsam.perturb([w], [g], [w_old], [1], [0], [0.0], rhos, norm, scratch,
                                  2.0, 2.0, 0.0, skipped, [], [], [])

    with pytest.raises(TypeError, match="group_rhos must be float64"):
        perturb(torch.tensor([0.5], device=DEVICE))
    with pytest.raises(ValueError, match="group_rhos has 0 elements, needs 1"):
        perturb(torch.zeros(0, dtype=torch.float64, device=DEVICE))
    perturb(torch.tensor([0.5], dtype=torch.float64, device=DEVICE))
    assert torch.equal(w_old, torch.ones(4, device=DEVICE))
    assert torch.equal(w, torch.full((4,), 1.25, device=DEVICE))  # 1 + 0.5·g/‖g‖ (‖g‖ = 4)


@pytest.mark.gpu
@pytest.mark.parametrize("average", [None, "ema"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_synchronisation_on_cuda(backend, name, average):
    """On a GPU: after the warm-up steps, every optimizer call of a step (with GradScaler, with
    skipped steps among them, with averaging) runs under
    torch.cuda.set_sync_debug_mode("error"), which raises on a synchronisation."""
    _, opt, _ = _run(name, backend, "scaler", True, sync_errors, average=average)
    assert opt.amp_skipped_steps >= 1


def _cached_objects(opt):
    """What the fused backends of ``opt`` cache for its steps: launch plans (their device
    tables), scalar arrays, scratch buffers (the native operators grow theirs onto new storage:
    the storage is what a graph reads)."""
    out = []
    for backend in set(opt._backends.values()):
        for plan in getattr(backend, "_plans", {}).values():  # update plans: lists of tables
            out += plan if isinstance(plan, list) else [plan]
        out += backend._constants._arrays.values()
        for buf in backend._scratch.values():
            out.append(buf.untyped_storage() if backend.name != "triton" else buf)
    return out


def _drop_caches(opt):
    for backend in set(opt._backends.values()):
        getattr(backend, "_plans", {}).clear()
        backend._constants._arrays.clear()
        backend._scratch.clear()


@pytest.mark.parametrize("captured", [True, False])
@pytest.mark.parametrize("backend", FUSED)
def test_what_a_captured_step_reads_outlives_the_caches(backend, captured, monkeypatch):
    """A CUDA graph reads its step's tables, scalar arrays and scratch at every replay, long
    after a cache may have evicted them (an eager step with new gradient addresses makes new
    entries): whatever a step uses during a capture is held for good. The capture is emulated
    here (the query answers yes for one step); without it, the same objects die with the
    caches, so the check can fail."""
    monkeypatch.setattr(_constants, "_HELD_FOR_GRAPHS", {})
    x, y = _data()
    model = _model()
    opt = CONFIGS["gsam_adamw"](model.parameters(), backend=backend, capturable=True,
                                skip_nonfinite=True, average="ema")
    for t in range(WARM_UP + 1):
        if t == WARM_UP and captured:
            monkeypatch.setattr(_constants, "capturing", lambda: True)
        _step(model, opt, x, y, None, False, (False, False))
    monkeypatch.setattr(_constants, "capturing", lambda: False)
    refs = [weakref.ref(obj) for obj in _cached_objects(opt)]
    assert len(refs) >= 5
    _drop_caches(opt)
    del opt, model
    gc.collect()
    assert all(ref() is not None for ref in refs) == captured
    assert any(ref() is not None for ref in refs) == captured


@pytest.mark.gpu
# (LookSAM is left out: a replay repeats the captured kind of step, its host schedule stands)
@pytest.mark.parametrize("name", [n for n in CONFIGS if "looksam" not in n])
def test_cuda_graph_replay_equals_eager(backend, name):
    """On a GPU: a whole step (both passes, or FreeSAM's one) captured in a CUDA graph after
    warm-up steps, then replayed (with the backends' caches dropped), equals the same steps run
    eagerly: lr and rho are device tensors written between replays, skip_nonfinite skips the
    replay whose loss is made inf, and the device counters advance with the replays. Gradients
    are zeroed in place, so the fused backends' launch tables (keyed by gradient addresses) are
    built in the warm-up."""
    x, y = _data()
    freesam = "freesam" in name
    runs = []
    for graphed in (False, True):
        model = _model()
        lr, rho = torch.tensor(0.01, device=DEVICE), torch.tensor(0.05, device=DEVICE)
        opt = CONFIGS[name](model.parameters(), backend=backend, capturable=True,
                            skip_nonfinite=True, **({} if freesam else {"rho": rho}))
        for group in opt.param_groups:
            group["lr"] = lr
        poison = torch.ones((), device=DEVICE)

        def step():
            if not freesam:
                LOSS(model(x), y).backward()
                opt.first_step()
                opt.zero_grad(set_to_none=False)
            (LOSS(model(x), y) * poison).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARM_UP + 1):
                step()
        torch.cuda.current_stream().wait_stream(side)
        run = step
        if graphed:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
            if backend in FUSED:  # replays read what the capture held, not the caches
                _drop_caches(opt)
        weights = []
        for t in range(STEPS):
            lr.fill_(0.01 / (1 + t))
            rho.fill_(0.05 + 0.01 * t)
            poison.fill_(float("inf") if t == 3 else 1.0)
            run()
            weights.append([p.detach().clone() for p in model.parameters()])
        runs.append((weights, opt))
    (eager, eager_opt), (replayed, graph_opt) = runs
    for t in range(STEPS):
        for a, b in zip(eager[t], replayed[t]):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=f"step {t}")
    assert all(torch.equal(a, b) for a, b in zip(replayed[2], replayed[3]))  # skipped
    assert not all(torch.equal(a, b) for a, b in zip(replayed[3], replayed[4]))
    counters = [o.state_dict()["param_groups"][0]["fastsam_counters"]
                for o in (eager_opt, graph_opt)]
    assert counters[0] == counters[1]
    assert counters[1]["nonfinite_skipped"] == 1
    assert counters[1]["updates"] == WARM_UP + 1 + STEPS - 1
