"""AE-SAM against its per-parameter oracle on every backend (decisions, weights, state and
statistics), backward passes per step, checkpoints, GradScaler, inf/NaN first passes, the
closure API and errors."""
import math

import pytest
import torch
from harness import SHAPES, Landscape, assert_state_close, clone_params, drive, make_params
from oracle import OracleAESAM

import fastsam

STEPS = 8
SCHEDULE = dict(total_steps=STEPS, lambda1=-1.0, lambda2=1.0, delta=0.9)
BASES = {
    "sgd_momentum_wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "rmsprop_unfused": (torch.optim.RMSprop, dict(lr=1e-3)),
}
SKIP = {4: (7,), 5: (6, 2)}  # steps where some parameters have no gradient (without the
# largest one, step 4's ‖g‖² falls below the threshold: a plain step)


def groups_of(params):
    return [{"params": params[:3], "rho": 0.05}, {"params": params[3:], "rho": 0.1}]


def pair(backend, device, base, dtype=torch.float64, **extra):
    """A fastsam AESAM and the oracle over copies of the same parameters."""
    base_cls, kw = BASES[base]
    params = make_params(SHAPES, dtype, device, seed=11)
    ref = clone_params(params, torch.float64)
    opt = fastsam.AESAM(groups_of(params), base_cls, backend=backend, **SCHEDULE, **extra, **kw)
    oracle = OracleAESAM(groups_of(ref), base_cls, foreach=False, **SCHEDULE, **kw)
    return opt, params, oracle, ref


class Recording:
    """Passes ``first_step``'s answers through, keeping them."""

    def __init__(self, opt):
        self.opt, self.decisions = opt, []

    def first_step(self, zero_grad=False):
        sam = self.opt.first_step(zero_grad)
        self.decisions.append(sam)
        return sam

    def second_step(self, zero_grad=False):
        self.opt.second_step(zero_grad)


@pytest.mark.parametrize("base", list(BASES))
def test_matches_oracle(backend, device, base):
    """fp64, two groups with their own rho, parameters without a gradient on some steps: the
    same SAM and plain steps as the oracle (both kinds taken), the same weights, base state
    and statistics."""
    opt, params, oracle, ref = pair(backend, device, base)
    land = Landscape(SHAPES, seed=12)
    recording = Recording(opt)
    passes = drive(recording, params, land, STEPS, SKIP), drive(oracle, ref, land, STEPS, SKIP)
    assert recording.decisions == oracle.decisions
    assert True in oracle.decisions and False in oracle.decisions, oracle.decisions
    assert passes[0] == passes[1] == STEPS + sum(oracle.decisions)
    tol = dict(rtol=1e-10, atol=1e-12)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), **tol)
    assert_state_close(opt, params, oracle.base, ref, **tol)
    assert opt.statistics == pytest.approx((oracle.mean, oracle.var), rel=1e-10)
    assert opt.sam_steps == sum(oracle.decisions)


def test_fp32_follows_the_fp64_oracle(backend, device):
    """fp32 parameters (the norm accumulated in fp32): the same decisions as the fp64 oracle
    and weights within fp32 rounding of it."""
    opt, params, oracle, ref = pair(backend, device, "sgd_momentum_wd", torch.float32)
    land = Landscape(SHAPES, seed=12)
    recording = Recording(opt)
    drive(recording, params, land, STEPS, SKIP), drive(oracle, ref, land, STEPS, SKIP)
    assert recording.decisions == oracle.decisions
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r.detach(), rtol=1e-5, atol=1e-6)


def test_bf16_within_twice_the_eager_error(backend, device):
    """bf16 parameters: the decisions of the fp64 oracle and of the oracle run in bf16 itself,
    and an error against the fp64 oracle at most twice the bf16 oracle's (docs/design.md §4's
    rule for low precision)."""
    opt, params, _, _ = pair(backend, device, "sgd_momentum_wd", torch.bfloat16)
    exact, eager = clone_params(params, torch.float64), clone_params(params)
    land = Landscape(SHAPES, seed=12)
    recording = Recording(opt)
    drive(recording, params, land, STEPS, SKIP)
    base_cls, kw = BASES["sgd_momentum_wd"]
    decisions = []
    for ps in (exact, eager):
        oracle = OracleAESAM(groups_of(ps), base_cls, foreach=False, **SCHEDULE, **kw)
        drive(oracle, ps, land, STEPS, SKIP)
        decisions.append(oracle.decisions)
    assert recording.decisions == decisions[0] == decisions[1]

    def error(ps):
        return max(float((p.detach().double().cpu() - e.detach().cpu()).abs().max())
                   for p, e in zip(ps, exact) if p.numel())

    assert error(params) <= 2 * error(eager), (error(params), error(eager))


def test_threshold_schedule_and_first_steps():
    """c_t runs from lambda2 to lambda1 over total_steps and stays there; from μ = σ² = 0 the
    first step is a SAM step whenever c <= 1/sqrt(1 - δ)."""
    opt = fastsam.AESAM([torch.nn.Parameter(torch.ones(3))], torch.optim.SGD, lr=0.1,
                        total_steps=4, lambda1=-2.0, lambda2=2.0)
    assert [opt.threshold_coefficient(t) for t in range(6)] == [2.0, 1.0, 0.0, -1.0, -2.0, -2.0]
    for c, sam in ((1 / math.sqrt(0.1) - 1e-6, True), (1 / math.sqrt(0.1) + 1e-3, False)):
        w = torch.nn.Parameter(torch.ones(3))
        opt = fastsam.AESAM([w], torch.optim.SGD, lr=0.1, total_steps=4, lambda1=c, lambda2=c,
                            delta=0.9)
        w.grad = torch.full((3,), 2.0)
        assert opt.first_step() is sam
        assert opt.statistics == pytest.approx((0.1 * 12.0, 0.1 * (12.0 - 1.2) ** 2))


def test_checkpoint_continues_bit_identically(backend, device):
    """A state dict saved mid-run (statistics, step count, SAM steps) and loaded into a new
    AESAM: the rest of the run is that of the uninterrupted one, bit for bit."""
    land = Landscape(SHAPES, seed=12)
    whole, params, _, _ = pair(backend, device, "adamw", torch.float32)
    drive(whole, params, land, STEPS, SKIP)
    first, resumed, _, _ = pair(backend, device, "adamw", torch.float32)
    drive(first, resumed, land, 3, SKIP)
    saved = first.state_dict()
    base_cls, kw = BASES["adamw"]
    again = fastsam.AESAM(groups_of(resumed), base_cls, backend=backend, **SCHEDULE, **kw)
    again.load_state_dict(saved)
    assert again.statistics == first.statistics and again.sam_steps == first.sam_steps
    drive(again, resumed, land, STEPS - 3, SKIP, first=3)
    for p, r in zip(resumed, params):
        assert torch.equal(p, r)
    assert again.statistics == whole.statistics and again.sam_steps == whole.sam_steps


def _model_run(backend, device, scaled, steps=8):
    """A small model, every step with a GradScaler (scaled=True: the first step told the loss
    scale) or without one. Returns the weights, the decisions and the optimizer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).to(device)
    opt = fastsam.AESAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                        backend=backend, total_steps=steps, lambda1=0.0, lambda2=2.0)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10, enabled=scaled)
    gen = torch.Generator().manual_seed(3)
    decisions = []
    for _ in range(steps):
        x, y = torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        x, y = x.to(device), y.to(device)
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        sam = opt.first_step(zero_grad=True, grad_scale=scaler.get_scale() if scaled else None)
        decisions.append(sam)
        if sam:
            scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)  # a plain step under the scaler: taken here
        scaler.update()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], decisions, opt


def test_gradscaler_takes_the_loss_scale(backend, device):
    """Under GradScaler with first_step(grad_scale=...): the statistics are of the unscaled
    gradients (the same decisions as without a scaler), plain steps are taken by
    scaler.step(optimizer), and the weights are those of the unscaled run."""
    plain, plain_decisions, plain_opt = _model_run(backend, device, scaled=False)
    scaled, scaled_decisions, scaled_opt = _model_run(backend, device, scaled=True)
    assert scaled_decisions == plain_decisions
    assert True in plain_decisions and False in plain_decisions, plain_decisions
    assert scaled_opt.statistics == pytest.approx(plain_opt.statistics, rel=1e-5)
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradscaler_plain_step_waits_for_scaler_step():
    """A plain step decided under the scaler is pending until scaler.step(optimizer): the
    weights do not move before it, and a first_step() before it is refused."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = fastsam.AESAM([w], torch.optim.SGD, lr=0.1, total_steps=4, lambda1=9.0, lambda2=9.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(w.sum()).backward()
    assert opt.first_step(zero_grad=True, grad_scale=scaler.get_scale()) is False
    assert torch.equal(w.detach(), torch.ones(4)) and w.grad is not None
    with pytest.raises(RuntimeError, match="scaler.step"):
        opt.first_step(grad_scale=scaler.get_scale())
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(w.detach(), torch.full((4,), 0.9))
    assert opt.statistics == pytest.approx((0.1 * 4.0, 0.1 * (4.0 - 0.4) ** 2))


def test_gradscaler_after_a_plain_step_without_the_loss_scale_raises():
    """A plain step first_step() made itself, not told the loss scale, under a scaler (it used
    the scaled gradients): scaler.step says so rather than pass as a step."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = fastsam.AESAM([w], torch.optim.SGD, lr=0.1, total_steps=4, lambda1=9.0, lambda2=9.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(w.sum()).backward()
    assert opt.first_step() is False
    with pytest.raises(RuntimeError, match="not given grad_scale"):
        scaler.step(opt)


def test_gradscaler_without_the_loss_scale_is_refused():
    """A SAM step begun without grad_scale under a scaler: scaler.step refuses it with the
    weights restored and the statistics and step count as before the step."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = fastsam.AESAM([w], torch.optim.SGD, lr=0.1, total_steps=4, lambda1=-1.0, lambda2=-1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(w.sum()).backward()
    assert opt.first_step(zero_grad=True) is True
    scaler.scale(w.sum()).backward()
    with pytest.raises(RuntimeError, match="grad_scale=scaler.get_scale"):
        scaler.step(opt)
    assert torch.equal(w.detach(), torch.ones(4))
    assert opt.statistics == (0.0, 0.0) and opt.sam_steps == 0
    assert opt.state_dict()["param_groups"][0]["fastsam_counters"]["aesam_steps"] == 0


def test_non_finite_first_pass_is_a_skipped_plain_step(backend, device):
    """skip_nonfinite: a first pass with a NaN gradient takes no second pass, leaves the
    statistics as they were, and its update is skipped (weights and state unchanged)."""
    opt, params, _, _ = pair(backend, device, "sgd_momentum_wd", torch.float32,
                             skip_nonfinite=True)
    land = Landscape(SHAPES, seed=12)
    drive(opt, params, land, 2)
    before = ([p.detach().clone() for p in params], opt.statistics, opt.sam_steps)
    land.set_grads(params)
    params[2].grad[0] = float("nan")
    assert opt.first_step(zero_grad=True) is False
    assert opt.nonfinite_skipped_steps == 1
    for p, b in zip(params, before[0]):
        assert torch.equal(p.detach(), b)
    assert (opt.statistics, opt.sam_steps) == before[1:]


def test_a_skipped_sam_update_leaves_the_statistics(backend, device):
    """skip_nonfinite: a SAM step whose second pass holds a NaN is skipped: weights, base state,
    statistics and SAM steps as before it; only the step count advances."""
    opt, params, _, _ = pair(backend, device, "sgd_momentum_wd", torch.float32,
                             skip_nonfinite=True)
    land = Landscape(SHAPES, seed=12)
    drive(opt, params, land, 2)
    before = ([p.detach().clone() for p in params], opt.statistics, opt.sam_steps)
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in params if p.numel()]
    land.set_grads(params)
    assert opt.first_step(zero_grad=True) is True
    land.set_grads(params)
    params[2].grad[0] = float("nan")
    opt.second_step(zero_grad=True)
    assert opt.nonfinite_skipped_steps == 1
    for p, b in zip(params, before[0]):
        assert torch.equal(p.detach(), b)
    for m, p in zip(momenta, [p for p in params if p.numel()]):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    assert (opt.statistics, opt.sam_steps) == before[1:]
    assert opt.state_dict()["param_groups"][0]["fastsam_counters"]["aesam_steps"] == 3


def test_closure_api_equals_the_two_step_api(backend, device):
    """step(closure) calls the closure on SAM steps only, and gives the two-step API's
    weights."""
    land = Landscape(SHAPES, seed=12)
    two_step, params, _, _ = pair(backend, device, "sgd_momentum_wd", torch.float32)
    recording = Recording(two_step)
    drive(recording, params, land, STEPS, SKIP)
    closured, others, _, _ = pair(backend, device, "sgd_momentum_wd", torch.float32)
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        land.set_grads(others, SKIP.get(t, ()))
        return torch.tensor(0.0)

    for t in range(STEPS):
        land.set_grads(others, SKIP.get(t, ()))
        closured.step(closure)
        closured.zero_grad()
    assert calls == sum(recording.decisions) and 0 < calls < STEPS
    for p, r in zip(others, params):
        assert torch.equal(p, r)


def test_step_after_a_plain_step_has_nothing_left_to_do():
    """After first_step() returned False the step is whole: a step() (a trainer's, the
    scaler's) changes nothing; second_step() is refused."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = fastsam.AESAM([w], torch.optim.SGD, lr=0.1, total_steps=4, lambda1=9.0, lambda2=9.0)
    w.grad = torch.ones(4)
    assert opt.first_step() is False
    after = w.detach().clone()
    torch.testing.assert_close(after, torch.full((4,), 0.9))
    assert opt.step() is None
    assert torch.equal(w.detach(), after)
    with pytest.raises(RuntimeError, match="without a pending first_step"):
        opt.second_step()


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(capturable=True), ValueError, "capturable"),
        (dict(total_steps=0), ValueError, "total_steps"),
        (dict(total_steps=True), ValueError, "total_steps"),
        (dict(total_steps=2.0), ValueError, "total_steps"),
        (dict(delta=1.0), ValueError, "delta"),
        (dict(delta=-0.1), ValueError, "delta"),
        (dict(delta=float("nan")), ValueError, "delta"),
        (dict(lambda1=float("inf")), ValueError, "lambda1"),
        (dict(lambda2="1"), TypeError, "lambda2"),
        (dict(rho=-1.0), ValueError, "rho"),
    ],
)
def test_bad_arguments(kw, error, match):
    args = {**dict(total_steps=4, lambda1=-1.0, lambda2=1.0, lr=0.1), **kw}
    with pytest.raises(error, match=match):
        fastsam.AESAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, **args)


def test_bad_grad_scale_is_refused_before_anything_changes():
    w = torch.nn.Parameter(torch.ones(2))
    opt = fastsam.AESAM([w], torch.optim.SGD, lr=0.1, total_steps=4, lambda1=-1.0, lambda2=1.0)
    w.grad = torch.ones(2)
    for bad, error in ((0.0, ValueError), (float("nan"), ValueError), ("2", TypeError)):
        with pytest.raises(error, match="grad_scale"):
            opt.first_step(grad_scale=bad)
    assert opt.statistics == (0.0, 0.0) and torch.equal(w.detach(), torch.ones(2))
