"""LookSAM against its per-parameter oracle on every backend, backward passes per step, k = 1
being SAM, a degenerate direction, a plain base state dict, and errors (checkpoint
continuation: test_engine.py)."""
import warnings

import pytest
import torch
from harness import SHAPES, Landscape, assert_state_close, clone_params, drive, make_params
from oracle import OracleLookSAM

import fastsam

STEPS = 8
K, ALPHA = 3, 0.7
BASES = {
    "sgd_momentum_wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "rmsprop_unfused": (torch.optim.RMSprop, dict(lr=1e-3)),
}
SKIP = {4: (1,), 5: (6, 2)}  # steps where some parameters have no gradient


def groups_of(params):
    return [{"params": params[:3], "rho": 0.05}, {"params": params[3:], "rho": 0.1}]


@pytest.mark.parametrize("base", list(BASES))
def test_matches_oracle(backend, device, base):
    """fp64: against the fp64 oracle. g_v = g_s - (⟨g, g_s⟩/‖g‖²)·g cancels most of g_s (the
    two gradients are close), so rounding differences at the perturbed point grow ~1e3x in u_v:
    tolerances looser than the SAM tests' 1e-10."""
    base_cls, kw = BASES[base]
    params = make_params(SHAPES, torch.float64, device, seed=11)
    ref = clone_params(params)
    opt = fastsam.LookSAM(groups_of(params), base_cls, k=K, alpha=ALPHA, backend=backend, **kw)
    oracle = OracleLookSAM(groups_of(ref), base_cls, k=K, alpha=ALPHA, foreach=False, **kw)
    land = Landscape(SHAPES, seed=12)
    passes = drive(opt, params, land, STEPS, SKIP), drive(oracle, ref, land, STEPS, SKIP)
    assert passes == (STEPS + 3, STEPS + 3)
    tol = dict(rtol=1e-7, atol=1e-9)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), **tol)
    assert_state_close(opt, params, oracle.base, ref, **tol)


@pytest.mark.parametrize("base", list(BASES))
def test_fp32_error_within_twice_the_eager_error(backend, device, base):
    """fp32 (where the cancellation in g_v shows): the error against an fp64 oracle is at most
    twice that of the oracle run in fp32 itself (docs/design.md §4's rule for low precision)."""
    base_cls, kw = BASES[base]
    params = make_params(SHAPES, torch.float32, device, seed=11)
    exact, eager = clone_params(params, torch.float64), clone_params(params)
    land = Landscape(SHAPES, seed=12)
    opt = fastsam.LookSAM(groups_of(params), base_cls, k=K, alpha=ALPHA, backend=backend, **kw)
    drive(opt, params, land, STEPS, SKIP)
    for ps in (exact, eager):
        oracle = OracleLookSAM(groups_of(ps), base_cls, k=K, alpha=ALPHA, foreach=False, **kw)
        drive(oracle, ps, land, STEPS, SKIP)

    def error(ps):
        return max(float((p.detach().double() - e.detach()).abs().max())
                   for p, e in zip(ps, exact) if p.numel())

    assert error(params) <= 2 * error(eager) + 1e-6, (error(params), error(eager))


def test_look_ahead_update_is_fused(backend, device):
    """With SGD the base optimizer's own step never runs, and a look-ahead step leaves .grad as
    the backward pass wrote it (the correction is formed inside the update)."""
    params = make_params(SHAPES, torch.float32, device, seed=15)
    opt = fastsam.LookSAM(params, torch.optim.SGD, k=K, lr=0.05, momentum=0.9, backend=backend)

    def refuse():
        raise AssertionError("the unfused base step ran")

    opt.base_optimizer.step = refuse
    land = Landscape(SHAPES, seed=12)
    drive(opt, params, land, 1, SKIP)  # the SAM step: u_v is set
    land.set_grads(params)
    grads = [p.grad.clone() for p in params]
    assert opt.first_step() is False
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_k_equal_one_is_sam(backend, device):
    params = make_params(SHAPES, torch.float32, device, seed=13)
    ref = clone_params(params)
    kw = dict(lr=0.05, momentum=0.9)
    look = fastsam.LookSAM(params, torch.optim.SGD, rho=0.05, k=1, backend=backend, **kw)
    sam = fastsam.SAM(ref, torch.optim.SGD, rho=0.05, backend=backend, **kw)
    land = Landscape(SHAPES, seed=12)
    for t in range(4):
        for opt, ps in ((look, params), (sam, ref)):
            land.set_grads(ps)
            opt.first_step(zero_grad=True)
            land.set_grads(ps)
            opt.second_step(zero_grad=True)
    for p, r in zip(params, ref):
        assert torch.equal(p.detach(), r.detach())


@pytest.mark.parametrize("capturable", [False, True])
def test_no_orthogonal_part_gives_no_direction(backend, device, capturable):
    """rho = 0: g_s = g, so g_v = g_s - (⟨g,g_s⟩/‖g‖²)·g is cancellation noise. u_v is 0 (not
    noise normalised to a unit vector, whose sign and direction depend on the backend's
    rounding), so LookSAM is its base optimizer: a look-ahead step uses g itself. The same
    steps with rho = 0.05 make a unit direction (the check can fail)."""
    kw = dict(lr=0.05, momentum=0.9)
    for rho in (0.0, 0.05):
        params = make_params(SHAPES, torch.float32, device, seed=16)
        ref = clone_params(params)
        opt = fastsam.LookSAM(
            params, torch.optim.SGD, k=2, backend=backend, capturable=capturable,
            rho=torch.tensor(rho, device=device) if capturable else rho, **kw,
        )
        land = Landscape(SHAPES, seed=12)
        drive(opt, params, land, 4, SKIP)  # SAM, look-ahead, SAM, look-ahead: 4 updates
        total = sum(float(d.double().square().sum()) for d in opt._direction.values()) ** 0.5
        if rho != 0.0:
            assert abs(total - 1.0) < 1e-5, total
            continue
        assert opt._direction and total == 0.0, total
        base = torch.optim.SGD(ref, foreach=False, **kw)
        for _ in range(4):
            land.set_grads(ref)
            base.step()
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


def test_backward_passes_per_step_are_one_plus_one_over_k():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    backwards = []
    model[0].weight.register_hook(lambda g: backwards.append(1))
    k = 4
    opt = fastsam.LookSAM(model.parameters(), torch.optim.SGD, k=k, lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    losses = []

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    steps = 24
    for _ in range(steps):
        losses.append(float(closure().detach()))
        opt.step(closure)
        opt.zero_grad()
    assert len(backwards) == steps * (1 + 1 / k)
    assert losses[-1] < losses[0]


def test_plain_base_state_dict_starts_looksam_afresh_with_a_warning():
    """A state dict without fastsam's entries (the plain base optimizer's, or DCP's flattened
    one) loads the base state; LookSAM's direction and step count start afresh (the next step
    is a SAM step), and the load says so. SAM, which keeps nothing more, loads it silently."""
    land = Landscape(SHAPES, seed=2)
    params = make_params(SHAPES, torch.float32, "cpu", seed=3)
    opt = fastsam.LookSAM(params, torch.optim.SGD, k=K, lr=0.1, momentum=0.9)
    drive(opt, params, land, 4, SKIP)
    assert not opt.sam_step_next
    plain = torch.optim.SGD(clone_params(params), lr=0.1, momentum=0.9)
    plain.load_state_dict(opt.base_optimizer.state_dict())
    with pytest.warns(UserWarning, match="looksam_direction and the counters start afresh"):
        opt.load_state_dict(plain.state_dict())
    assert opt.sam_step_next
    assert all("momentum_buffer" in opt.state[p] for p in params)
    sam = fastsam.SAM(clone_params(params), torch.optim.SGD, lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sam.load_state_dict(plain.state_dict())


def test_look_ahead_step_has_no_second_step():
    params = make_params([(3,)], torch.float32, "cpu")
    land = Landscape([(3,)], seed=1)
    opt = fastsam.LookSAM(params, torch.optim.SGD, k=2, lr=0.1)
    drive(opt, params, land, 1, SKIP)
    land.set_grads(params)
    assert opt.first_step() is False  # a look-ahead step: already applied
    with pytest.raises(RuntimeError, match="without a pending first_step"):
        opt.second_step()


@pytest.mark.parametrize("kw,error,match", [
    (dict(k=0), ValueError, "k must be an int >= 1"),
    (dict(k=2.5), ValueError, "k must be an int >= 1"),
    (dict(alpha=-1.0), ValueError, "alpha must be a finite number >= 0"),
    (dict(rho=float("nan")), ValueError, "rho must be a finite number >= 0"),
])
def test_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        fastsam.LookSAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, **kw)
