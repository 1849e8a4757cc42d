"""ESAM against the per-parameter oracle of tests/oracle.py (the paper's element-wise stochastic
weight perturbation, its mask drawn by the oracle's own numpy code from the definition in
fastsam.functional.Mask): two groups with their own beta, SGD/AdamW/an unfused base, the popular
ASAM, missing gradients, 7 steps, every backend; the mask itself (the same elements on every
backend, its rate and independence), beta = 1 as SAM, channels_last, checkpoints, GradScaler,
skipped steps, the closure API, errors; and the data-selection helper against a brute force."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS, DEVICE
from harness import (
    SHAPES,
    Landscape,
    assert_follows_oracle,
    clone_params,
    drive,
    make_params,
)
from oracle import OracleESAM, esam_key, esam_mask

import fastsam
from fastsam.functional import Mask, mask_draws, mask_key

BASES = {
    "sgd_nesterov": (torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(weight_decay=0.1)),
    "rmsprop": (torch.optim.RMSprop, dict(momentum=0.5)),  # not fused: restore, then its step
}
SPECS = ({"rho": 0.05, "lr": 1e-2, "beta": 0.5}, {"rho": 0.1, "lr": 5e-3, "beta": 0.3})
SEED = 2**40 + 12345  # both 32-bit halves in use
# harness.SHAPES without its 65537-element tensor where the oracle is not the point
SMALL = [s for s in SHAPES if math.prod(s) < 65537]


def _pair(backend, base="sgd_nesterov", adaptive=False, dtype=torch.float64, shapes=SHAPES,
          seed=SEED, **kw):
    base_cls, base_kwargs = BASES[base]
    params = make_params(shapes, dtype, DEVICE)
    ref = clone_params(params)
    opt = fastsam.ESAM([{"params": params[:3], **SPECS[0]}, {"params": params[3:], **SPECS[1]}],
                       base_cls, adaptive=adaptive, seed=seed, backend=backend, **kw,
                       **base_kwargs)
    kind = ("element", 0.0) if adaptive else ("none", 0.0)
    oracle = OracleESAM([{"params": ref[:3], "T": kind, **SPECS[0]},
                         {"params": ref[3:], "T": kind, **SPECS[1]}],
                        base_cls, seed=seed, foreach=False, **base_kwargs)
    return params, ref, opt, oracle


# ----------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("base", sorted(BASES))
def test_esam_matches_the_oracle(backend, base):
    params, ref, opt, oracle = _pair(backend, base)
    assert assert_follows_oracle(opt, params, oracle, ref, oracle.base) == 14


def test_adaptive_matches_the_oracle(backend):
    params, ref, opt, oracle = _pair(backend, "adamw", adaptive=True)
    assert_follows_oracle(opt, params, oracle, ref, oracle.base)


def test_gradients_that_go_missing_shift_the_positions(backend):
    """A parameter without a gradient is out of the step (its position is taken by the next
    one's), in either group, as the oracle counts."""
    params, ref, opt, oracle = _pair(backend)
    missing = {0: (1, 4), 1: (0,), 2: (4,), 3: (2, 7), 5: (6,)}
    land = Landscape(SHAPES)
    assert drive(opt, params, land, 7, skip=missing) == drive(oracle, ref, land, 7, skip=missing)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_follows_the_oracle_in_fp64(backend, dtype):
    params, ref, opt, oracle = _pair(backend, "adamw", dtype=dtype, shapes=SMALL)
    ref64 = clone_params(params, torch.float64)
    base_cls, base_kwargs = BASES["adamw"]
    oracle = OracleESAM([{"params": ref64[:3], "T": ("none", 0.0), **SPECS[0]},
                         {"params": ref64[3:], "T": ("none", 0.0), **SPECS[1]}],
                        base_cls, seed=SEED, foreach=False, **base_kwargs)
    land = Landscape(SMALL)
    drive(opt, params, land, 7)
    drive(oracle, ref64, land, 7)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for p, r in zip(params, ref64):
        torch.testing.assert_close(p.double(), r, **tol)


# ----------------------------------------------------------------------------- the mask
def _moved(backend, dtype=torch.float64, steps=3, channels_last=False):
    """Per step, which elements the first step moved (one large and two small tensors; fp64,
    so that no kept element's e is lost to rounding)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(3, 4, 5, 6), (70000,), (3,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype))
              for s in shapes]
    if channels_last:
        params[0] = torch.nn.Parameter(params[0].detach().to(memory_format=torch.channels_last))
    opt = fastsam.ESAM([{"params": params[:2], "beta": 0.4}, {"params": params[2:]}],
                       torch.optim.SGD, beta=0.7, seed=7, lr=0.1, backend=backend)
    moved = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, dtype)
            if channels_last and p.dim() == 4:
                p.grad = p.grad.contiguous(memory_format=torch.channels_last)
        before = [p.detach().clone() for p in params]
        opt.first_step()
        moved.append([(p.detach() != b).cpu() for p, b in zip(params, before)])
        opt.second_step(zero_grad=True)
    return moved


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_backend_moves_the_elements_of_the_definition(backend, channels_last):
    """The moved elements are those of the oracle's numpy mask (storage order: a channels_last
    tensor draws along its memory), on every backend, step after step."""
    assert_moved_by_definition(_moved(backend, channels_last=channels_last), channels_last)


def assert_moved_by_definition(moved, channels_last=False):
    for t, step in enumerate(moved):
        key = esam_key(7, t)
        for position, (m, shape, beta) in enumerate(zip(step, [(3, 4, 5, 6), (70000,), (3,)],
                                                        (0.4, 0.4, 0.7))):
            w = torch.empty(shape)
            if channels_last and len(shape) == 4:
                w = w.contiguous(memory_format=torch.channels_last)
            assert torch.equal(m, esam_mask(key, position, w, beta)), (t, position)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_cpu_baseline_loop_moves_the_same_elements(tmp_path):
    """The cpu backend's masked sweep has an AVX2 build beside the baseline one (taken where
    the CPU has AVX2): the baseline loop, forced with FASTSAM_CPU_BASELINE=1 in a fresh
    process, moves the elements of the definition too."""
    code = (
        "import sys, torch; sys.path.insert(0, %r); import test_esam; "
        "torch.save(test_esam._moved('cpu'), %r)" % (str(Path(__file__).parent),
                                                     str(tmp_path / "moved.pt"))
    )
    env = {**os.environ, "FASTSAM_CPU_BASELINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_moved_by_definition(torch.load(tmp_path / "moved.pt"))


def test_mask_rate_and_independence():
    """Each element is kept with probability beta, independently of the step, of the tensor
    and of its neighbours (within 5 standard deviations on 2^20 draws)."""
    n, beta = 1 << 20, 0.3
    threshold = Mask(beta, (0, 0)).threshold
    a = mask_draws(mask_key(11, 0), 0, n, torch.device("cpu")) < threshold
    b = mask_draws(mask_key(11, 1), 0, n, torch.device("cpu")) < threshold  # next step
    c = mask_draws(mask_key(11, 0), 1, n, torch.device("cpu")) < threshold  # next tensor
    d = mask_draws(mask_key(12, 0), 0, n, torch.device("cpu")) < threshold  # another seed

    def close(rate, p):
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), (rate, p)

    close(a.double().mean().item(), beta)
    for other in (b, c, d):
        close((a & other).double().mean().item(), beta * beta)
    close((a[1:] & a[:-1]).double().mean().item(), beta * beta)  # neighbours


def test_draws_past_two_to_the_32():
    """Elements from 2^32 on draw with the high word too: the torch code and the oracle's
    agree there, and the draws differ from those 2^32 elements earlier. (The kernels' high-word
    arithmetic, the same formula, needs a tensor of 2^32 elements: not run here.)"""
    key, start = mask_key(3, 9), 2**32 - 64
    draws = mask_draws(key, 5, 128, torch.device("cpu"), start=start)
    assert draws.dtype == torch.int64 and 0 <= int(draws.min()) and int(draws.max()) < 2**32
    assert torch.equal(draws < 2**31, esam_mask(key, 5, torch.empty(128), 0.5, start=start))
    low = mask_draws(key, 5, 64, torch.device("cpu"))
    assert not torch.equal(draws[64:], low)


def test_beta_one_is_sam_bit_for_bit(backend):
    params = make_params(SMALL, torch.float32, DEVICE)
    others = clone_params(params)
    esam = fastsam.ESAM(params, torch.optim.SGD, rho=0.1, beta=1.0, lr=0.05, momentum=0.9,
                        backend=backend, seed=0)
    sam = fastsam.SAM(others, torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend)
    land = Landscape(SMALL)
    drive(esam, params, land, 5)
    drive(sam, others, land, 5)
    for p, r in zip(params, others):
        assert torch.equal(p, r)


def test_seeds():
    """The same seed, the same run; another seed, another; no seed: drawn from torch's
    generator (torch.manual_seed fixes it)."""
    def run(seed):
        return _weights(fastsam.ESAM, seed=seed)

    assert all(torch.equal(a, b) for a, b in zip(run(1), run(1)))
    assert not all(torch.equal(a, b) for a, b in zip(run(1), run(2)))
    torch.manual_seed(4)
    first = fastsam.ESAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1).seed
    torch.manual_seed(4)
    assert fastsam.ESAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1).seed == first


def _weights(cls, steps=4, **kw):
    params = make_params(SMALL, torch.float32, DEVICE)
    opt = cls(params, torch.optim.SGD, rho=0.1, beta=0.5, lr=0.05, **kw)
    drive(opt, params, Landscape(SMALL), steps)
    return params


# ----------------------------------------------------------------------------- the API
def test_checkpoint_continues_bit_identically(backend):
    """The seed and the step count travel in the state dict: a resumed run (made with another
    seed) draws the masks of the uninterrupted one."""
    land = Landscape(SHAPES, seed=12)
    params, _, whole, _ = _pair(backend, "adamw", dtype=torch.float32)
    drive(whole, params, land, 7)
    resumed, _, first, _ = _pair(backend, "adamw", dtype=torch.float32)
    drive(first, resumed, land, 3)
    saved = first.state_dict()
    counters = saved["param_groups"][0]["fastsam_counters"]
    assert counters["esam_seed"] == SEED and counters["esam_steps"] == 3
    again = fastsam.ESAM([{"params": resumed[:3], **SPECS[0]}, {"params": resumed[3:], **SPECS[1]}],
                         torch.optim.AdamW, seed=1, backend=backend, weight_decay=0.1)
    again.load_state_dict(saved)
    assert again.seed == SEED and again.steps == 3
    drive(again, resumed, land, 4, first=3)
    for p, r in zip(resumed, params):
        assert torch.equal(p, r)


def test_closure_api_equals_the_two_step_api(backend):
    land = Landscape(SMALL)
    params = make_params(SMALL, torch.float32, DEVICE)
    two = fastsam.ESAM(params, torch.optim.SGD, beta=0.5, seed=3, lr=0.05, backend=backend)
    drive(two, params, land, 4)
    others = make_params(SMALL, torch.float32, DEVICE)
    closured = fastsam.ESAM(others, torch.optim.SGD, beta=0.5, seed=3, lr=0.05, backend=backend)

    def closure():
        land.set_grads(others)
        return torch.tensor(0.0)

    for _ in range(4):
        land.set_grads(others)
        closured.step(closure)
        closured.zero_grad()
    for p, r in zip(others, params):
        assert torch.equal(p, r)


def test_gradscaler_gives_the_unscaled_run(backend):
    """Under GradScaler (a constant power-of-two scale: exact) the weights are those of the run
    without one: the perturbation is scale-free and the update unscaled."""
    def run(scaled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 3)).to(DEVICE)
        opt = fastsam.ESAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                           beta=0.5, seed=9, eps=0.0, backend=backend)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 10, growth_interval=1000,
                                      enabled=scaled)
        gen = torch.Generator().manual_seed(3)
        for _ in range(4):
            x, y = torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen)
            x, y = x.to(DEVICE), y.to(DEVICE)
            scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
            opt.first_step(zero_grad=True)
            scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_non_finite_first_pass_moves_nothing(backend):
    """inf in the first pass's gradients: no element moves (mask or not), and with
    skip_nonfinite the update is skipped with the weights restored bit for bit."""
    params = make_params(SMALL, torch.float32, DEVICE)
    opt = fastsam.ESAM(params, torch.optim.SGD, beta=0.5, seed=3, lr=0.05, backend=backend,
                       skip_nonfinite=True)
    land = Landscape(SMALL)
    before = [p.detach().clone() for p in params]
    land.set_grads(params)
    params[1].grad[2] = float("inf")
    opt.first_step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    land.set_grads(params)
    opt.second_step()
    assert opt.nonfinite_skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_sam_on_groups_are_left_out(backend):
    """A group with perturb=False takes no part: the others draw positions among themselves."""
    params = make_params(SMALL, torch.float64, DEVICE)
    ref = clone_params(params)
    opt = fastsam.ESAM([{"params": params[:2], "perturb": False}, {"params": params[2:]}],
                       torch.optim.SGD, beta=0.5, seed=5, lr=0.05, backend=backend)
    oracle = OracleESAM([{"params": ref[:2], "perturb": False, "rho": 0.05, "beta": 0.5,
                          "T": ("none", 0.0)},
                         {"params": ref[2:], "rho": 0.05, "beta": 0.5, "T": ("none", 0.0)}],
                        torch.optim.SGD, seed=5, foreach=False, lr=0.05)
    land = Landscape(SMALL)
    drive(opt, params, land, 4)
    drive(oracle, ref, land, 4)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)


def test_first_step_is_refused_under_torch_compile():
    """The mask key is formed on the host from the step count: a compiled first_step is
    refused with what to do, and nothing moves; the eager steps go on."""
    torch._dynamo.reset()
    params = make_params(SMALL, torch.float32, DEVICE)
    opt = fastsam.ESAM(params, torch.optim.SGD, beta=0.5, seed=3, lr=0.05)
    land = Landscape(SMALL)
    drive(opt, params, land, 1)  # the eager warm-up step a compiled step needs
    land.set_grads(params)
    before = [p.detach().clone() for p in params]
    with pytest.raises(Exception, match="ESAM.first_step is not compiled"):
        torch.compile(opt.first_step, fullgraph=True)()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    drive(opt, params, land, 1, first=1)


@pytest.mark.parametrize("kw, error, match", [
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta=True), TypeError, "beta"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(capturable=True), ValueError, "capturable"),
    (dict(adaptive=1), TypeError, "adaptive"),
])
def test_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        fastsam.ESAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, **kw)


def test_mask_arguments_are_checked():
    with pytest.raises(ValueError, match="keep"):
        Mask(0.0, (0, 0))
    with pytest.raises(ValueError, match="key"):
        Mask(0.5, (0, 2**32))
    assert Mask(1.0, (0, 0)).threshold == 2.0**32
    assert Mask(0.3, (0, 0)).threshold == math.ceil(0.3 * 2**32)


# ----------------------------------------------------------------------------- data selection
def test_esam_select_keeps_the_largest_rises():
    gen = torch.Generator().manual_seed(0)
    for n, gamma in [(1, 0.5), (10, 0.5), (33, 0.25), (64, 0.999), (7, 1.0), (50, 0.01)]:
        before = torch.rand(n, generator=gen)
        after = before + torch.randn(n, generator=gen)
        chosen = fastsam.esam_select(before, after, gamma)
        k = max(1, math.floor(gamma * n))
        rises = (after - before).tolist()
        expected = sorted(sorted(range(n), key=lambda i: (-rises[i], i))[:k])
        assert chosen.tolist() == expected, (n, gamma)


def test_esam_select_ties_keep_the_batch_order():
    before = torch.zeros(6)
    after = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 0.0])
    assert fastsam.esam_select(before, after, 0.5).tolist() == [0, 1, 3]


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(3), torch.zeros(3), 0.0), "gamma"),
    ((torch.zeros(3), torch.zeros(4), 0.5), "same length"),
    ((torch.zeros(3, 1), torch.zeros(3, 1), 0.5), "1-D"),
    ((torch.zeros(0), torch.zeros(0), 0.5), "at least one"),
])
def test_esam_select_errors(args, match):
    with pytest.raises(ValueError, match=match):
        fastsam.esam_select(*args)
