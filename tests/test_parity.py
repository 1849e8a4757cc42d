"""Every backend against the per-parameter oracle: 7 full steps, parameters and optimizer state,
several groups with different rho and lr, odd sizes, empty tensors, params without grads."""
import math

import pytest
import torch
from harness import (
    SHAPES,
    Landscape,
    assert_state_close,
    clone_params,
    drive,
    make_params,
    oracle_for,
    split_groups,
)
from oracle import OracleSAM

import fastsam

STEPS = 7

# name -> (class, constructor kwargs, per-group option overrides, oracle T per group)
PERTURBATIONS = {
    "sam": (fastsam.SAM, {}, ({"rho": 0.05}, {"rho": 0.1}), (("none", 0.0),) * 2),
    "sam_adaptive": (
        fastsam.SAM, {"adaptive": True}, ({"rho": 0.05}, {"rho": 0.1}), (("element", 0.0),) * 2
    ),
    "sam_p_inf": (
        fastsam.SAM, {"p": math.inf}, ({"rho": 0.01}, {"rho": 0.02}), (("none", 0.0),) * 2
    ),
    "sam_p_3": (fastsam.SAM, {"p": 3.0}, ({"rho": 0.05}, {"rho": 0.1}), (("none", 0.0),) * 2),
    "asam_element": (
        fastsam.ASAM, {"eta": 0.01}, ({"rho": 0.5}, {"rho": 0.2}), (("element", 0.01),) * 2
    ),
    "asam_filter": (
        fastsam.ASAM,
        {"normalization": "filter", "eta": 0.02},
        ({"rho": 0.5}, {"rho": 0.2}),
        (("filter", 0.02),) * 2,
    ),
    "asam_mixed_groups": (  # official ASAM: only some parameters scaled, one global norm
        fastsam.ASAM,
        {},
        ({"rho": 0.5}, {"rho": 0.5, "adaptive": False}),
        (("element", 0.01), ("none", 0.0)),
    ),
}

BASES = {
    "sgd_momentum_wd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "sgd_nesterov": (
        torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-2}
    ),
    "sgd_dampening_maximize": (
        torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "dampening": 0.3, "maximize": True}
    ),
    "sgd_plain": (torch.optim.SGD, {"lr": 0.05}),
    "adam_l2": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-2}),
    "adamw_amsgrad": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    "adam_maximize": (torch.optim.Adam, {"lr": 1e-3, "maximize": True, "betas": (0.8, 0.99)}),
    "rmsprop_unfused": (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5}),
    # lr as a tensor (as for LR schedules on device): fused, read on the device
    "sgd_tensor_lr": (
        torch.optim.SGD, {"lr": torch.tensor(0.05), "momentum": 0.9, "nesterov": True}
    ),
    "adamw_tensor_lr": (torch.optim.AdamW, {"lr": torch.tensor(1e-2), "weight_decay": 0.1}),
}

CASES = [(p, "sgd_momentum_wd") for p in PERTURBATIONS] + [("sam", b) for b in BASES][1:]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def build(perturbation, base, params, backend):
    cls, kwargs, specs, T = PERTURBATIONS[perturbation]
    base_cls, base_kwargs = BASES[base]
    specs = (specs[0], {**specs[1], "lr": base_kwargs["lr"] * 0.5})
    fast = cls(split_groups(params, specs), base_cls, backend=backend, **kwargs, **base_kwargs)
    return fast, specs, T, base_cls, base_kwargs, kwargs


def make_oracle(ref_params, specs, T, base_cls, base_kwargs, kwargs):
    return oracle_for(
        ref_params, specs, T, base_cls, p=kwargs.get("p", 2.0), eps=1e-12, **base_kwargs
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("perturbation,base", CASES)
def test_matches_oracle(perturbation, base, dtype, backend, device):
    params = make_params(SHAPES, dtype, device)
    ref = clone_params(params)
    fast, specs, T, base_cls, base_kwargs, kwargs = build(perturbation, base, params, backend)
    oracle = make_oracle(ref, specs, T, base_cls, base_kwargs, kwargs)
    land = Landscape(SHAPES)
    drive(fast, params, land, STEPS)
    drive(oracle, ref, land, STEPS)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, **TOL[dtype])
    assert_state_close(fast, params, oracle.base, ref, **TOL[dtype])


@pytest.mark.parametrize("perturbation", list(PERTURBATIONS))
def test_perturbed_point(perturbation, backend, device):
    """After first_step the parameters hold w + e exactly as the oracle computes it."""
    dtype = torch.float64
    params = make_params(SHAPES, dtype, device, seed=3)
    ref = clone_params(params)
    fast, specs, T, base_cls, base_kwargs, kwargs = build(perturbation, "adam_l2", params, backend)
    oracle = make_oracle(ref, specs, T, base_cls, base_kwargs, kwargs)
    land = Landscape(SHAPES, seed=4)
    drive(fast, params, land, 2)
    drive(oracle, ref, land, 2)
    land.set_grads(params)
    land.set_grads(ref)
    before = [p.detach().clone() for p in params]
    fast.first_step()
    oracle.first_step()
    moved = 0
    for p, r, b in zip(params, ref, before):
        torch.testing.assert_close(p, r, **TOL[dtype])
        moved += int(not torch.equal(p, b))
    assert moved == sum(1 for s in SHAPES if math.prod(s) > 0)
    fast.second_step()
    oracle.second_step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, **TOL[dtype])


def test_params_without_grads_and_frozen_layers(backend, device):
    """A param with no grad is never perturbed nor moved; a layer frozen for some steps and
    unfrozen later joins with fresh state, exactly as torch.optim does it."""
    dtype = torch.float64
    params = make_params(SHAPES, dtype, device, seed=5)
    ref = clone_params(params)
    fast, specs, T, base_cls, base_kwargs, kwargs = build("sam", "adamw_amsgrad", params, backend)
    oracle = make_oracle(ref, specs, T, base_cls, base_kwargs, kwargs)
    land = Landscape(SHAPES, seed=6)

    def skip(t):  # param 1 never has a grad; param 3 is frozen for steps 0-2 then trains
        return {1} | ({3} if t < 3 else set())

    never = params[1].detach().clone()
    drive(fast, params, land, STEPS, skip)
    drive(oracle, ref, land, STEPS, skip)
    assert torch.equal(params[1], never)
    assert fast.state.get(params[1], {}) == {}
    assert float(fast.state[params[3]]["step"]) == STEPS - 3
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, **TOL[dtype])
    assert_state_close(fast, params, oracle.base, ref, **TOL[dtype])


def test_grad_only_in_second_pass(backend, device):
    """A param with no grad in the first pass is not perturbed, but is updated by the base
    optimizer if it has a grad in the second pass (as the popular implementation would)."""
    params = make_params([(7,), (11,)], torch.float64, device, seed=7)
    ref = clone_params(params)
    fast = fastsam.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, backend=backend)
    oracle = OracleSAM([{"params": ref, "rho": 0.1, "T": ("none", 0.0)}], torch.optim.SGD,
                       foreach=False, lr=0.1, momentum=0.9)
    land = Landscape([(7,), (11,)], seed=8)
    for opt, ps in ((fast, params), (oracle, ref)):
        for _ in range(3):
            land.set_grads(ps, skip={1})
            opt.first_step(zero_grad=True)
            land.set_grads(ps)
            opt.second_step(zero_grad=True)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, **TOL[torch.float64])


# fp16 is paired with SGD only: eager fp16 Adam (torch.optim) underflows eps=1e-8 to 0 and
# divides by zero, so it has no finite error to compare with.
LOW_PRECISION_CASES = [
    ("sam", "sgd_momentum_wd", torch.bfloat16),
    ("asam_filter", "adam_l2", torch.bfloat16),
    ("sam", "sgd_momentum_wd", torch.float16),
    ("asam_filter", "sgd_nesterov", torch.float16),
]


@pytest.mark.parametrize("perturbation,base,dtype", LOW_PRECISION_CASES)
def test_low_precision(perturbation, base, dtype, backend, device):
    """Low-precision storage: fastsam's error against an fp64 oracle is at most twice the error
    of the eager per-parameter loop run in the same low precision (flash-attention's rule)."""
    params = make_params(SHAPES, dtype, device, seed=9)
    ref64 = clone_params(params, torch.float64)
    eager = clone_params(params)
    fast, specs, T, base_cls, base_kwargs, kwargs = build(perturbation, base, params, backend)
    oracle64 = make_oracle(ref64, specs, T, base_cls, base_kwargs, kwargs)
    oracle_lp = make_oracle(eager, specs, T, base_cls, base_kwargs, kwargs)
    land = Landscape(SHAPES, seed=10)
    for opt, ps in ((fast, params), (oracle64, ref64), (oracle_lp, eager)):
        drive(opt, ps, land, STEPS)
    # Judged over the whole parameter set: on a 1-element tensor the error is rounding luck.
    flat = [torch.cat([t.detach().double().flatten() for t in ts]) for ts in (params, ref64, eager)]
    err_fast = float((flat[0] - flat[1]).norm() / flat[1].norm())
    err_eager = float((flat[2] - flat[1]).norm() / flat[1].norm())
    assert math.isfinite(err_eager) and err_eager > 0, err_eager
    assert err_fast <= 2 * err_eager, (err_fast, err_eager)


def test_large_odd_tensor(backend, device):
    """278011 elements (docs/design.md §4), 7 steps, SAM + Adam."""
    shapes = [(278011,), (3,)]
    params = make_params(shapes, torch.float32, device, seed=11)
    ref = clone_params(params)
    fast = fastsam.SAM(params, torch.optim.Adam, rho=0.05, lr=1e-2, backend=backend)
    oracle = OracleSAM([{"params": ref, "rho": 0.05, "T": ("none", 0.0)}], torch.optim.Adam,
                       foreach=False, lr=1e-2)
    land = Landscape(shapes, seed=12)
    drive(fast, params, land, STEPS)
    drive(oracle, ref, land, STEPS)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, **TOL[torch.float32])
