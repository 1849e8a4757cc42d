"""FriendlySAM against the per-parameter oracle of tests/oracle.py (the paper's code's formulas):
SAM and ASAM perturbations, fused bases and one the update is not fused with, two groups with
their own rho, lr, sigma and lmbda, parameters whose gradients come late or go missing, 7 steps,
every backend; m itself compared; skipped updates, checkpoints, GradScaler, and
pytorch-optimizer's FriendlySAM."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import DEVICE
from harness import (
    SHAPES,
    Landscape,
    assert_follows_oracle,
    clone_params,
    drive,
    make_params,
    small_data,
    small_model,
)
from oracle import OracleFriendlySAM

import fastsam

CASES = {
    # name: (adaptive, base class, base kwargs)
    "sgd_nesterov": (False, torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
    "adamw": (False, torch.optim.AdamW, dict(weight_decay=0.1)),
    "adaptive_adam_amsgrad": (True, torch.optim.Adam, dict(amsgrad=True)),
    "rmsprop": (False, torch.optim.RMSprop, dict(momentum=0.5)),
}
SPECS = ({"rho": 0.05, "lr": 1e-2, "sigma": 1.0, "lmbda": 0.9},
         {"rho": 0.1, "lr": 5e-3, "sigma": 0.5, "lmbda": 0.6})
KEY = "friendlysam_momentum"
STEPPED = "friendlysam_stepped"
# for the tests that are not the oracle's: harness.SHAPES without its 65537-element tensor (the
# Triton interpreter's time)
SMALL = [s for s in SHAPES if math.prod(s) < 65537]


def _pair(case, backend, dtype=torch.float64, shapes=SHAPES, **kw):
    adaptive, base_cls, base_kwargs = CASES[case]
    params = make_params(shapes, dtype, DEVICE)
    ref = clone_params(params)
    opt = fastsam.FriendlySAM(
        [{"params": params[:3], **SPECS[0]}, {"params": params[3:], **SPECS[1]}],
        base_cls, adaptive=adaptive, backend=backend, **kw, **base_kwargs)
    kind = ("element", 0.0) if adaptive else ("none", 0.0)
    oracle = OracleFriendlySAM([{"params": ref[:3], "T": kind, **SPECS[0]},
                                {"params": ref[3:], "T": kind, **SPECS[1]}],
                               base_cls, foreach=False, **base_kwargs)
    return params, ref, opt, oracle


def _momenta(opt, params):
    """m per parameter index, from the state dict (what a checkpoint carries): every parameter
    has the entry, marked 0 (a stand-in) where it has not stepped yet."""
    state = opt.state_dict()["state"]
    assert all(KEY in state[i] and STEPPED in state[i] for i in range(len(params)))
    return {i: state[i][KEY] for i in range(len(params)) if state[i][STEPPED].item() == 1}


def _assert_momenta_follow(opt, params, oracle, ref, **tol):
    momenta = _momenta(opt, params)
    assert sorted(momenta) == [i for i, r in enumerate(ref) if r in oracle.m]
    for i, m in momenta.items():
        torch.testing.assert_close(m.double().cpu(), oracle.m[ref[i]].double().cpu(), **tol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_friendlysam_matches_the_oracle(backend, case):
    params, ref, opt, oracle = _pair(case, backend)
    assert assert_follows_oracle(opt, params, oracle, ref, oracle.base) == 14
    _assert_momenta_follow(opt, params, oracle, ref, rtol=1e-10, atol=1e-12)


def test_gradients_that_come_late_or_go_missing(backend):
    """A parameter's first step with a gradient starts its m (m = g, d = g) whenever it comes,
    in either group; a parameter without a gradient keeps its m for later."""
    params, ref, opt, oracle = _pair("sgd_nesterov", backend)
    missing = {0: (1, 4), 1: (1, 4), 2: (4,), 3: (0, 7), 4: (2,), 5: (6,)}
    land = Landscape(SHAPES)
    assert drive(opt, params, land, 7, skip=missing) == drive(oracle, ref, land, 7, skip=missing)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
    _assert_momenta_follow(opt, params, oracle, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_follows_the_oracle_in_fp64(backend, dtype):
    """fp32 and bf16 storage (arithmetic in fp32, m rounded once per step to the storage dtype):
    close to the fp64 oracle over 7 steps."""
    params, ref, opt, oracle = _pair("adamw", backend, dtype, SMALL)
    ref64 = clone_params(params, torch.float64)
    oracle = OracleFriendlySAM([{"params": ref64[:3], "T": ("none", 0.0), **SPECS[0]},
                                {"params": ref64[3:], "T": ("none", 0.0), **SPECS[1]}],
                               torch.optim.AdamW, foreach=False, weight_decay=0.1)
    land = Landscape(SMALL)
    drive(opt, params, land, 7)
    drive(oracle, ref64, land, 7)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for p, r in zip(params, ref64):
        torch.testing.assert_close(p.double(), r, **tol)


def test_a_group_of_mixed_dtypes(backend):
    """fp32 and bf16 parameters in one group (one launch per dtype): each m is the formula's,
    m = lmbda·g1 + (1 − lmbda)·g2 after two steps (m = g1 after the first)."""
    ps = [torch.nn.Parameter(torch.randn(37, device=DEVICE)),
          torch.nn.Parameter(torch.randn(21, device=DEVICE).bfloat16())]
    opt = fastsam.FriendlySAM(ps, torch.optim.SGD, lr=0.1, lmbda=0.25, backend=backend)
    gen = torch.Generator().manual_seed(3)
    steps = [[torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype) for p in ps]
             for _ in range(2)]
    def set_grads(grads):
        for p, g in zip(ps, grads):
            p.grad = g.clone()

    for grads in steps:  # both passes see the same gradients
        set_grads(grads)
        opt.first_step(zero_grad=True)
        set_grads(grads)
        opt.second_step(zero_grad=True)
    for i, m in _momenta(opt, ps).items():
        g1, g2 = steps[0][i].float(), steps[1][i].float()
        tol = dict(rtol=1e-6, atol=1e-6) if i == 0 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(m.float(), 0.25 * g1 + 0.75 * g2, **tol)


def test_sigma_zero_is_sam(backend):
    """sigma = 0: d = g exactly, so the weights are SAM's bit for bit (m is kept all the same)."""
    params = make_params(SMALL, torch.float32, DEVICE)
    ref = clone_params(params)
    friendly = fastsam.FriendlySAM(params, torch.optim.SGD, rho=0.05, sigma=0.0, lmbda=0.5,
                                   backend=backend, lr=0.05, momentum=0.9)
    sam = fastsam.SAM(ref, torch.optim.SGD, rho=0.05, backend=backend, lr=0.05, momentum=0.9)
    land = Landscape(SMALL)
    drive(friendly, params, land, 5)
    drive(sam, ref, land, 5)
    for p, r in zip(params, ref):
        assert torch.equal(p, r)
    assert len(_momenta(friendly, params)) == len(params)


def _run(opt, params, land, steps, poison=()):
    """Two-pass steps; at a step of ``poison`` the second pass's gradient holds a NaN."""
    for t in steps:
        land.set_grads(params)
        opt.first_step(zero_grad=True)
        land.set_grads(params)
        if t in poison:
            params[1].grad[0] = math.nan
        opt.second_step(zero_grad=True)


def test_a_skipped_update_leaves_m_as_it_was(backend):
    """skip_nonfinite: an update skipped for a NaN in the second pass changes neither the
    weights nor m (computed in the first pass, committed only with the update), and the run
    goes on as the run without that step."""
    params = make_params(SMALL, torch.float64, DEVICE)
    ref = clone_params(params)
    make = lambda ps: fastsam.FriendlySAM(  # noqa: E731
        ps, torch.optim.Adam, rho=0.1, sigma=1.0, lmbda=0.8, skip_nonfinite=True,
        backend=backend, lr=1e-2)
    opt, clean = make(params), make(ref)
    land = Landscape(SMALL)
    _run(opt, params, land, range(2))
    _run(clean, ref, land, range(2))
    before = {i: m.clone() for i, m in _momenta(opt, params).items()}
    weights = [p.detach().clone() for p in params]
    _run(opt, params, land, [2], poison=(2,))
    assert opt.nonfinite_skipped_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert all(torch.equal(m, before[i]) for i, m in _momenta(opt, params).items())
    _run(opt, params, land, range(3, 6))
    _run(clean, ref, land, range(3, 6))
    for p, r in zip(params, ref):
        assert torch.equal(p, r)
    for (i, m), (j, n) in zip(_momenta(opt, params).items(), _momenta(clean, ref).items()):
        assert i == j and torch.equal(m, n)


def test_a_non_finite_first_pass_leaves_m_as_it_was(backend):
    """An inf in the first pass: no perturbation, and m_next = m (not poisoned)."""
    params = make_params(SMALL, torch.float64, DEVICE)
    opt = fastsam.FriendlySAM(params, torch.optim.SGD, rho=0.1, skip_nonfinite=True,
                              backend=backend, lr=1e-2)
    land = Landscape(SMALL)
    _run(opt, params, land, range(2))
    before = {i: m.clone() for i, m in _momenta(opt, params).items()}
    weights = [p.detach().clone() for p in params]
    land.set_grads(params)
    params[3].grad.view(-1)[0] = -math.inf
    opt.first_step(zero_grad=True)
    assert all(torch.equal(p, w) for p, w in zip(params, weights))  # not perturbed
    land.set_grads(params)
    opt.second_step(zero_grad=True)
    assert opt.nonfinite_skipped_steps == 1
    assert all(torch.equal(m, before[i]) for i, m in _momenta(opt, params).items())


def test_checkpoint_continues_bit_identically(backend):
    """m travels in the state dict; a fresh optimizer loaded from it continues bit for bit. A
    state dict of the plain base optimizer starts every m afresh (m = g)."""
    params, _, opt, _ = _pair("sgd_nesterov", backend, shapes=SMALL, average="ema")
    resumed = clone_params(params)
    land = Landscape(SMALL)
    missing = {4: (1,)}  # parameter 2 has no m when the checkpoint is taken; 1 skips step 4
    drive(opt, params, land, 3, skip=lambda t: (2,) if t < 3 else ())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    assert 2 not in _momenta(opt, params) and 0 in _momenta(opt, params)
    for p, r in zip(params, resumed):
        r.data.copy_(p.data)
    drive(opt, params, land, 4, first=3, skip=missing)
    buffer.seek(0)
    fresh = fastsam.FriendlySAM(
        [{"params": resumed[:3], **SPECS[0]}, {"params": resumed[3:], **SPECS[1]}],
        torch.optim.SGD, backend=backend, average="ema", momentum=0.9, nesterov=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    drive(fresh, resumed, land, 4, first=3, skip=missing)
    for p, r in zip(params, resumed):
        assert torch.equal(p, r)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for key, value in a["state"][i].items():
            assert torch.equal(value, b["state"][i][key]) if torch.is_tensor(value) else (
                value == b["state"][i][key]), (i, key)

    plain = fastsam.FriendlySAM(clone_params(params), torch.optim.SGD, backend=backend, lr=0.1)
    with pytest.warns(UserWarning, match="friendlysam_momentum, friendlysam_stepped and the "
                      "counters start afresh"):
        plain.load_state_dict(
            torch.optim.SGD(plain.param_groups[0]["params"], lr=0.1).state_dict())
    assert _momenta(plain, plain.param_groups[0]["params"]) == {}


def test_a_state_dict_without_the_marks_still_loads(backend):
    """A state dict saved before the stand-ins were (m for the parameters that stepped only,
    no "friendlysam_stepped"): every m in it is a momentum, the others start afresh; the run
    continues as the one loaded with the marks."""
    params, _, opt, _ = _pair("sgd_nesterov", backend, shapes=SMALL)
    land = Landscape(SMALL)
    drive(opt, params, land, 3, skip=lambda t: (2,) if t < 3 else ())
    saved = opt.state_dict()
    old = {**saved, "state": {
        i: {k: v for k, v in entry.items() if k != STEPPED}
        for i, entry in saved["state"].items()}}
    for i, entry in old["state"].items():
        if not saved["state"][i][STEPPED].item():
            del entry[KEY]
    runs = []
    for state_dict in (saved, old):
        ps = clone_params(params)
        fresh = fastsam.FriendlySAM(
            [{"params": ps[:3], **SPECS[0]}, {"params": ps[3:], **SPECS[1]}],
            torch.optim.SGD, backend=backend, momentum=0.9, nesterov=True)
        fresh.load_state_dict(copy.deepcopy(state_dict))  # (torch.optim's load may alias)
        drive(fresh, ps, land, 3, first=3)
        runs.append(ps)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def _amp_run(scaled, backend, steps=4):
    model = small_model()
    x, y = small_data()
    opt = fastsam.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, lmbda=0.7,
                              backend=backend, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**12, growth_interval=2)
    loss_fn = torch.nn.functional.cross_entropy
    for _ in range(steps):
        if scaled:
            scaler.scale(loss_fn(model(x), y)).backward()
            opt.first_step(zero_grad=True, grad_scale=scaler.get_scale())
            scaler.scale(loss_fn(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss_fn(model(x), y).backward()
            opt.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
            opt.second_step()
        opt.zero_grad()
    return model, opt, scaler


def test_gradscaler_with_the_loss_scale(backend):
    """Under GradScaler, with first_step(grad_scale=scaler.get_scale()): the steps (and m, in
    unscaled units) of the run without a scaler, while the scale grows every 2 steps."""
    model, opt, scaler = _amp_run(True, backend)
    plain, plain_opt, _ = _amp_run(False, backend)
    assert scaler.get_scale() == 2.0**14
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for m, n in zip(_momenta(opt, list(model.parameters())).values(),
                    _momenta(plain_opt, list(plain.parameters())).values()):
        torch.testing.assert_close(m, n, rtol=1e-5, atol=1e-6)


def test_gradscaler_without_the_loss_scale_is_refused(backend):
    model = small_model()
    x, y = small_data()
    opt = fastsam.FriendlySAM(model.parameters(), torch.optim.SGD, backend=backend, lr=0.05)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8)
    loss_fn = torch.nn.functional.cross_entropy
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(loss_fn(model(x), y)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(loss_fn(model(x), y)).backward()
    with pytest.raises(RuntimeError, match=r"first_step\(grad_scale=scaler.get_scale\(\)\)"):
        scaler.step(opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert _momenta(opt, list(model.parameters())) == {}


def test_friendlysam_refuses_what_it_cannot_do():
    w = [torch.nn.Parameter(torch.zeros(3))]
    for name, bad in (("sigma", -1.0), ("sigma", math.nan), ("lmbda", 1.5), ("lmbda", -0.1)):
        with pytest.raises(ValueError, match=name):
            fastsam.FriendlySAM(w, torch.optim.SGD, lr=0.1, **{name: bad})
    with pytest.raises(TypeError, match="sigma must be a number"):
        fastsam.FriendlySAM(w, torch.optim.SGD, lr=0.1, sigma="1")
    with pytest.raises(ValueError, match="capturable"):
        fastsam.FriendlySAM(w, torch.optim.Adam, lr=0.1, capturable=True)
    opt = fastsam.FriendlySAM(w, torch.optim.SGD, lr=0.1)
    w[0].grad = torch.ones(3)
    for bad, error in ((0.0, ValueError), (math.inf, ValueError), ("2", TypeError)):
        with pytest.raises(error, match="grad_scale"):
            opt.first_step(grad_scale=bad)
    assert torch.equal(w[0], torch.zeros(3))  # nothing moved


@pytest.mark.parametrize("adaptive", [False, True])
def test_friendlysam_matches_pytorch_optimizer(adaptive):
    """pytorch-optimizer's FriendlySAM (4.1) forms the same perturbation: ``grad.sub_(momentum,
    alpha=sigma)`` and ``momentum.lerp_(raw_grad, 1 - lmbda)``, m = g on a parameter's first
    step. Where it differs: its norm (``get_global_gradient_norm(..., weight_adaptive=True)``
    in ``FriendlySAM.first_step``, pytorch_optimizer/optimizer/sam.py of 4.1.0) is a float32
    tensor even for fp64 parameters, so its perturbation is off by about 1e-8 relative; its m
    update is a lerp, m + (1 - lmbda)(g - m), equal to lmbda·m + (1 - lmbda)·g up to rounding."""
    from pytorch_optimizer import FriendlySAM as TheirFriendlySAM

    params = make_params(SHAPES, torch.float64, torch.device("cpu"))
    ref = clone_params(params)
    kw = dict(rho=0.05, sigma=1.0, lmbda=0.8, adaptive=adaptive, lr=0.05, momentum=0.9)
    ours = fastsam.FriendlySAM(params, torch.optim.SGD, backend="torch", **kw)
    theirs = TheirFriendlySAM(ref, torch.optim.SGD, **kw)
    land = Landscape(SHAPES)
    drive(ours, params, land, 7)
    drive(theirs, ref, land, 7)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-7, atol=1e-9)
    for i, m in _momenta(ours, params).items():
        torch.testing.assert_close(m, theirs.state[ref[i]]["momentum"], rtol=1e-7, atol=1e-9)
