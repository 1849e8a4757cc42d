"""MSAM against the per-parameter oracle of tests/oracle.py (the paper's algorithm): SGD with
momentum (and Nesterov), Adam and AdamW, two groups with their own rho and lr, parameters whose
gradients come late or go missing, 7 steps, every backend; the unperturbed weights, skipped
updates, checkpoints, GradScaler, averaging and the refusals."""
from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import DEVICE
from harness import (
    SHAPES,
    Landscape,
    clone_params,
    drive,
    make_params,
    small_data,
    small_model,
    step,
)
from oracle import OracleMSAM

import fastsam

CASES = {
    "sgd_nesterov": (torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict()),
    "adamw_amsgrad": (torch.optim.AdamW, dict(weight_decay=0.1, amsgrad=True)),
}
RHO, LR = (0.05, 0.1), (0.05, 0.02)


def _pair(case, backend, dtype=torch.float64, **kw):
    base_cls, base_kwargs = CASES[case]
    lr = (LR[0] / 5, LR[1] / 5) if base_cls is not torch.optim.SGD else LR
    params = make_params(SHAPES, dtype, DEVICE)
    ref = clone_params(params)
    opt = fastsam.MSAM([{"params": params[:3], "rho": RHO[0], "lr": lr[0]},
                        {"params": params[3:], "rho": RHO[1], "lr": lr[1]}],
                       base_cls, backend=backend, **kw, **base_kwargs)
    oracle = OracleMSAM([{"params": ref[:3], "rho": RHO[0], "lr": lr[0]},
                         {"params": ref[3:], "rho": RHO[1], "lr": lr[1]}],
                        base_cls, foreach=False, **base_kwargs)
    return params, ref, opt, oracle


def _assert_close(opt, params, oracle, ref, **tol):
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, **tol)
    for p, r in zip(params, ref):
        if r in oracle.w:
            torch.testing.assert_close(opt._weights[p], oracle.w[r], **tol)
    with opt.unperturbed_weights():
        for p, r in zip(params, ref):
            if r in oracle.w:
                torch.testing.assert_close(p, oracle.w[r], **tol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_msam_matches_the_oracle(backend, case):
    params, ref, opt, oracle = _pair(case, backend)
    land = Landscape(SHAPES)
    assert drive(opt, params, land, 7) == drive(oracle, ref, land, 7) == 7  # one pass a step
    _assert_close(opt, params, oracle, ref, rtol=1e-10, atol=1e-12)


def test_gradients_that_come_late_or_go_missing(backend):
    params, ref, opt, oracle = _pair("sgd_nesterov", backend)
    missing = {0: (1, 4), 1: (1, 4), 2: (4,), 3: (0, 7), 4: (2,), 5: (6,)}
    land = Landscape(SHAPES)
    drive(opt, params, land, 7, skip=missing)
    drive(oracle, ref, land, 7, skip=missing)
    _assert_close(opt, params, oracle, ref, rtol=1e-10, atol=1e-12)


def test_the_first_step_is_the_base_step_then_a_perturbation(backend):
    """v = 0 before the first step: it is the base optimizer's step from w, and the parameters
    then hold w − rho·v/‖v‖ (v = g after SGD's first step)."""
    params = make_params(SHAPES, torch.float64, DEVICE)
    ref = clone_params(params)
    opt = fastsam.MSAM(params, torch.optim.SGD, rho=0.1, backend=backend, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    land = Landscape(SHAPES)
    land.set_grads(params)
    land.set_grads(ref)
    opt.step()
    sgd.step()
    v = [g.grad for g in ref]
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in v))
    for p, r, g in zip(params, ref, v):
        torch.testing.assert_close(p, r - 0.1 * g / norm, rtol=1e-12, atol=1e-14)
    with opt.unperturbed_weights():
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r, rtol=1e-14, atol=1e-15)


def test_unperturbed_weights_swap_in_and_back(backend):
    params, _, opt, _ = _pair("adam", backend)
    land = Landscape(SHAPES)
    drive(opt, params, land, 3)
    perturbed = [p.detach().clone() for p in params]
    unperturbed = [opt._weights[p].clone() for p in params]
    with opt.unperturbed_weights():
        assert all(torch.equal(p, w) for p, w in zip(params, unperturbed))
        assert not all(torch.equal(p, q) for p, q in zip(params, perturbed))
        for what in (opt.step, opt.state_dict):
            with pytest.raises(RuntimeError, match="inside unperturbed_weights"):
                what()
    assert all(torch.equal(p, q) for p, q in zip(params, perturbed))


def test_a_skipped_update_changes_nothing(backend):
    """skip_nonfinite: a NaN gradient leaves w, w̃ and the state bit for bit, and the run goes
    on as the run without that step."""
    params = make_params(SHAPES, torch.float64, DEVICE)
    ref = clone_params(params)
    make = lambda ps: fastsam.MSAM(ps, torch.optim.SGD, rho=0.1, skip_nonfinite=True,  # noqa
                                   backend=backend, lr=0.05, momentum=0.9)
    opt, clean = make(params), make(ref)
    land = Landscape(SHAPES)
    drive(opt, params, land, 2)
    drive(clean, ref, land, 2)
    before = ([p.detach().clone() for p in params],
              [opt.state[p]["momentum_buffer"].clone() for p in params])
    land.set_grads(params)
    params[2].grad.view(-1)[0] = math.nan
    opt.step()
    assert opt.nonfinite_skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(params, before[0]))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], v)
               for p, v in zip(params, before[1]))
    drive(opt, params, land, 3, first=3)
    drive(clean, ref, land, 3, first=3)
    assert all(torch.equal(p, r) for p, r in zip(params, ref))


def test_checkpoint_continues_bit_identically(backend):
    """The model saved with its perturbed weights and the optimizer's state dict (which
    carries w) resume exactly."""
    params, _, opt, _ = _pair("adamw_amsgrad", backend, average="ema")
    land = Landscape(SHAPES)
    drive(opt, params, land, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = clone_params(params)
    drive(opt, params, land, 4, first=3)
    buffer.seek(0)
    fresh = fastsam.MSAM([{"params": resumed[:3], "rho": RHO[0], "lr": LR[0] / 5},
                          {"params": resumed[3:], "rho": RHO[1], "lr": LR[1] / 5}],
                         torch.optim.AdamW, backend=backend, average="ema", weight_decay=0.1,
                         amsgrad=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    drive(fresh, resumed, land, 4, first=3)
    assert all(torch.equal(p, r) for p, r in zip(params, resumed))
    with opt.averaged_weights(), fresh.averaged_weights():
        assert all(torch.equal(p, r) for p, r in zip(params, resumed))


def test_averages_are_of_the_unperturbed_weights(backend):
    params = make_params(SHAPES, torch.float64, DEVICE)
    opt = fastsam.MSAM(params, torch.optim.SGD, rho=0.1, backend=backend, lr=0.05,
                       momentum=0.9, average=fastsam.EMA(decay=0.5))
    land = Landscape(SHAPES)
    expected = None
    for t in range(4):
        drive(opt, params, land, 1, first=t, skip={2: (4,)})
        with opt.unperturbed_weights():
            w = [p.detach().clone() for p in params]
        expected = w if expected is None else [0.5 * e + 0.5 * x for e, x in zip(expected, w)]
    with opt.averaged_weights():
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


def test_gradscaler_steps_are_the_unscaled_ones(backend):
    def run(scaled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 3)).to(DEVICE)
        x, y = torch.randn(32, 6, device=DEVICE), torch.randint(0, 3, (32,), device=DEVICE)
        opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, rho=0.1, backend=backend,
                           lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10, enabled=scaled)
        for _ in range(4):
            scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return list(model.parameters())

    for p, q in zip(run(True), run(False)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_msam_refuses_what_it_cannot_follow():
    w = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="momentum > 0"):
        fastsam.MSAM(w, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="takes torch.optim.SGD"):
        fastsam.MSAM(w, torch.optim.RMSprop, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="rho"):
        fastsam.MSAM(w, torch.optim.Adam, rho=-1.0, lr=0.1)
    opt = fastsam.MSAM(w, torch.optim.Adam, lr=0.1)
    with pytest.raises(RuntimeError, match="one forward/backward pass per step"):
        opt.first_step()


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_capturable_steps_equal_host_decided_steps(backend, base):
    """capturable=True: no host read after warm-up; an inf step skipped on the device writes w
    back and forms the same w̃ again, so every step is the host-decided run's."""
    x, y = small_data()

    def run(capturable):
        model = small_model()
        make = ((lambda ps: fastsam.MSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, **kw))
                if base == "sgd" else (lambda ps: fastsam.MSAM(ps, torch.optim.Adam, lr=1e-2,
                                                                **kw)))
        kw = dict(rho=0.1, backend=backend, capturable=capturable, skip_nonfinite=True,
                  average="ema")
        opt = make(model.parameters())
        weights = []
        for t in range(6):
            guarded = capturable and t >= 2 and (backend != "torch" or DEVICE.type != "cpu")
            step(model, opt, x, y, None, t in (0, 3), (guarded, guarded))
            weights.append([p.detach().clone() for p in model.parameters()])
        return weights, opt

    (host, host_opt), (device, device_opt) = run(False), run(True)
    for a, b in zip(host, device):
        for p, q in zip(a, b):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(p, q) for p, q in zip(device[2], device[3]))  # step 3: skipped
    assert host_opt.nonfinite_skipped_steps == device_opt.nonfinite_skipped_steps == 2
