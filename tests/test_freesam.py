"""FreeSAM against its per-parameter oracle on every backend, one backward pass per step, and its
one buffer per parameter (checkpoint continuation: test_engine.py)."""

import pytest
import torch
from harness import SHAPES, Landscape, assert_state_close, clone_params, drive, make_params
from oracle import OracleFreeSAM

import fastsam

STEPS = 7
BASES = {
    "sgd_momentum_wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd_nesterov_max": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                                maximize=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "adam_amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "rmsprop_unfused": (torch.optim.RMSprop, dict(lr=1e-3)),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-10, atol=1e-12)),
                                       (torch.float32, dict(rtol=1e-5, atol=1e-5))])
@pytest.mark.parametrize("base", list(BASES))
def test_matches_oracle(backend, device, dtype, tol, base):
    base_cls, kw = BASES[base]
    params = make_params(SHAPES, dtype, device, seed=1)
    ref = clone_params(params)
    opt = fastsam.FreeSAM(params, base_cls, backend=backend, **kw)
    oracle = OracleFreeSAM(ref, base_cls, foreach=False, **kw)
    land = Landscape(SHAPES, seed=2)
    skip = lambda t: (1,) if t == 2 else (6,) if t == 4 else ()  # noqa: E731
    drive(opt, params, land, STEPS, skip)
    drive(oracle, ref, land, STEPS, skip)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, **tol)
        if r.grad is not None:  # .grad is left as the backward pass wrote it
            torch.testing.assert_close(p.grad, r.grad, **tol)
    assert_state_close(opt, params, oracle.base, ref, **tol)


def test_first_step_is_the_base_optimizer_step(backend, device):
    params = make_params(SHAPES, torch.float32, device, seed=3)
    ref = clone_params(params)
    opt = fastsam.FreeSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    base = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    land = Landscape(SHAPES, seed=4)
    land.set_grads(params)
    land.set_grads(ref)
    opt.step()
    base.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r)


@pytest.mark.parametrize("base", ["sgd_momentum_wd", "adamw"])
def test_update_is_fused(backend, device, base):
    """With SGD/Adam(W) the base optimizer's own step never runs (one fused pass), and FreeSAM
    keeps one buffer per parameter (no w_old)."""
    base_cls, kw = BASES[base]
    params = make_params(SHAPES, torch.float32, device, seed=7)
    opt = fastsam.FreeSAM(params, base_cls, backend=backend, **kw)

    def refuse():
        raise AssertionError("the unfused base step ran")

    opt.base_optimizer.step = refuse
    drive(opt, params, Landscape(SHAPES, seed=8), 2)
    assert not opt._planner.w_old and len(opt._stored) == len(params)


def test_one_backward_per_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    backwards = []
    model[0].weight.register_hook(lambda g: backwards.append(1))
    opt = fastsam.FreeSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    losses = []
    for _ in range(20):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    assert len(backwards) == 20
    assert losses[-1] < losses[0]


def test_two_step_api_is_refused():
    opt = fastsam.FreeSAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="one forward/backward pass per step"):
        opt.first_step()
