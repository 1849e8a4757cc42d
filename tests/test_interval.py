"""Interval SAM (``interval=k`` on SAM, ASAM, GSAM; MosaicML Composer's semantics): a SAM step
every k steps from the first, the base optimizer's plain update with the first pass's gradient
on the others. Against the per-parameter oracle of tests/oracle.py doing the same, over 7 steps,
two groups, every backend; passes counted; the closure and GradScaler paths."""
from __future__ import annotations

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
    oracle_for,
    split_groups,
)
from oracle import OracleGSAM

import fastsam

INTERVAL, STEPS = 3, 7  # SAM steps at 0, 3, 6
SPECS = ({"rho": 0.05}, {"rho": 0.1})


class IntervalOracle:
    """An oracle's SAM step every ``k`` steps, its base optimizer's plain step otherwise."""

    def __init__(self, oracle, k):
        self.oracle, self.k, self.t = oracle, k, 0

    def first_step(self, zero_grad=False):
        sam_step = self.t % self.k == 0
        self.t += 1
        if sam_step:
            self.oracle.first_step(zero_grad)
            return True
        with torch.no_grad():
            self.oracle.base.step()
        if zero_grad:
            self.oracle.zero_grad()
        return False

    def second_step(self, zero_grad=False):
        self.oracle.second_step(zero_grad)


CASES = {
    # name: (fastsam class and options, base optimizer and kwargs, the oracle's T per group)
    "sam_sgd": (fastsam.SAM, {}, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True),
                ("none", 0.0)),
    "asam_adam": (fastsam.ASAM, {"eta": 0.01}, torch.optim.Adam, dict(lr=1e-2),
                  ("element", 0.01)),
    "gsam_adamw": (fastsam.GSAM, {"alpha": 0.3}, torch.optim.AdamW,
                   dict(lr=1e-2, weight_decay=0.1), None),
}


def _pair(case, backend):
    cls, options, base_cls, base_kwargs, kind = CASES[case]
    params = make_params(SHAPES, torch.float64, DEVICE)
    ref = clone_params(params)
    opt = cls(split_groups(params, SPECS), base_cls, interval=INTERVAL, backend=backend,
              **options, **base_kwargs)
    if kind is None:  # GSAM
        groups = [{"params": ref[:3], "T": ("none", 0.0), "gsam_alpha": 0.3, **SPECS[0]},
                  {"params": ref[3:], "T": ("none", 0.0), "gsam_alpha": 0.3, **SPECS[1]}]
        oracle = OracleGSAM(groups, base_cls, foreach=False, **base_kwargs)
    else:
        oracle = oracle_for(ref, SPECS, (kind, kind), base_cls, **base_kwargs)
    return params, ref, opt, IntervalOracle(oracle, INTERVAL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_interval_sam_matches_the_oracle(backend, case):
    params, ref, opt, oracle = _pair(case, backend)
    passes = assert_follows_oracle(opt, params, oracle, ref, oracle.oracle.base, STEPS)
    assert passes == STEPS + 3  # SAM steps at 0, 3, 6
    assert opt.state_dict()["param_groups"][0]["fastsam_counters"]["interval_steps"] == STEPS


def test_the_plain_steps_are_the_base_optimizers(backend):
    """Between SAM steps the update is exactly torch.optim's with the same gradient."""
    params = make_params(SHAPES, torch.float64, DEVICE)
    ref = clone_params(params)
    opt = fastsam.SAM(params, torch.optim.SGD, rho=0.05, interval=2, backend=backend, lr=0.1,
                      momentum=0.9)
    base = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=False)
    land = Landscape(SHAPES)
    drive(opt, params, land, 1)  # a SAM step; then the same weights and momentum in torch's
    with torch.no_grad():
        for p, r in zip(params, ref):
            r.copy_(p)
            base.state[r]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
    land.set_grads(params)
    land.set_grads(ref)
    assert opt.first_step() is False
    base.step()
    for p, r in zip(params, ref):  # fused arithmetic: equal up to the last bits
        torch.testing.assert_close(p, r, rtol=1e-14, atol=1e-15)


def test_closure_runs_on_sam_steps_only():
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, interval=2)
    calls = []

    def closure():
        calls.append(1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    results = []
    for _ in range(4):
        torch.nn.functional.mse_loss(model(x), y).backward()
        results.append(opt.step(closure))
        opt.zero_grad()
    assert len(calls) == 2 and [r is None for r in results] == [False, True, False, True]


def test_grad_scaler_takes_the_plain_steps():
    """Under GradScaler the plain steps go through scaler.step(optimizer), unscaled: the run
    equals the unscaled one (a power-of-two scale unscales exactly)."""
    def run(scaled):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2).double()
        x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                          interval=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
        for _ in range(STEPS):
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if opt.sam_step_next:
                opt.first_step(zero_grad=True)
                scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_interval_must_be_a_positive_int():
    w = [torch.nn.Parameter(torch.zeros(2))]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="interval must be an int >= 1"):
            fastsam.SAM(w, torch.optim.SGD, lr=0.1, interval=bad)
    assert fastsam.GSAM(w, torch.optim.SGD, lr=0.1, interval=4).interval == 4
