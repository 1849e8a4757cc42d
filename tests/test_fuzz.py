"""Differential fuzz (hypothesis): generated configurations against the per-parameter oracle,
backend by backend, over several steps.

A configuration is an optimizer with its options (SAM with p = 2, 3 or ∞ and the popular ASAM;
ASAM element- and filter-wise; GSAM and Adaptive-GSAM; FreeSAM; LookSAM), a base optimizer
(SGD with momentum/nesterov/dampening/weight decay, Adam, AdamW with amsgrad, RMSprop: not
fused), one to three groups with their own rho and lr, odd and empty shapes, fp64 or fp32,
parameters without a gradient in some steps, steps whose update gradient holds an inf (skipped
by ``skip_nonfinite``, the oracle skips them too), and a state dict round trip into a fresh
optimizer mid-run. The weights and the base optimizer's state must match the oracle's.

CI runs a fixed-seed budget (``derandomize``); ``FASTSAM_FUZZ_EXAMPLES=2000`` runs a longer,
randomised search per backend.
"""
import io
import os
from dataclasses import dataclass, field

import pytest
import torch
from harness import STATE_KEYS, Landscape, clone_params, make_params
from oracle import OracleFreeSAM, OracleGSAM, OracleLookSAM, OracleSAM

import fastsam

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

LONG = int(os.environ.get("FASTSAM_FUZZ_EXAMPLES", "0"))
# Examples per backend in CI: the interpreted Triton kernels cost ~10x the others per example.
BUDGET = {"torch": 200, "cpu": 200, "cuda": 200, "triton": 60}
POOL = [(1,), (7,), (0,), (5, 3), (4, 3, 2), (33,), (3, 2, 2, 2), (129,)]


@dataclass
class Config:
    optimizer: str
    options: dict
    base: str
    base_options: dict
    shapes: list
    groups: list  # per group: (first index, end index, rho, lr, gsam_alpha)
    dtype: torch.dtype
    steps: int
    no_grad: dict = field(default_factory=dict)  # step -> parameter indices without gradient
    poisoned: tuple = ()  # steps whose update gradient holds an inf
    reload_at: int | None = None  # state dict round trip before this step


BASES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
         "rmsprop": torch.optim.RMSprop}


@st.composite
def configs(draw):
    optimizer = draw(st.sampled_from(["sam", "asam", "gsam", "freesam", "looksam"]))
    options = {}
    if optimizer == "sam":
        options["p"] = draw(st.sampled_from([2.0, 3.0, float("inf")]))
        options["adaptive"] = options["p"] == 2.0 and draw(st.booleans())
    elif optimizer == "asam":
        options["normalization"] = draw(st.sampled_from(["element", "filter"]))
        options["eta"] = draw(st.sampled_from([0.0, 0.01, 0.1]))
    elif optimizer == "gsam":
        options["adaptive"] = draw(st.sampled_from([False, True, "agsam"]))
    elif optimizer == "looksam":
        options["k"] = draw(st.integers(1, 3))
        options["alpha"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
    base = draw(st.sampled_from(list(BASES)))
    base_options = {}
    if base == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        base_options = dict(momentum=momentum, weight_decay=draw(st.sampled_from([0.0, 1e-2])),
                            nesterov=momentum > 0 and draw(st.booleans()))
        if momentum and not base_options["nesterov"]:
            base_options["dampening"] = draw(st.sampled_from([0.0, 0.3]))
    elif base in ("adam", "adamw"):
        base_options = dict(weight_decay=draw(st.sampled_from([0.0, 1e-2])),
                            amsgrad=draw(st.booleans()))
    shapes = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=5))
    n_groups = 1 if optimizer == "freesam" else draw(st.integers(1, min(3, len(shapes))))
    cuts = sorted(draw(st.lists(st.integers(1, len(shapes) - 1), min_size=n_groups - 1,
                                max_size=n_groups - 1, unique=True))) if n_groups > 1 else []
    bounds = [0, *cuts, len(shapes)]
    groups = [(bounds[i], bounds[i + 1], draw(st.sampled_from([0.0, 0.05, 0.2])),
               draw(st.sampled_from([1e-2, 5e-2])), draw(st.sampled_from([0.0, 0.3])))
              for i in range(len(bounds) - 1)]
    # LookSAM's u_v cancels most of g_s: fp32 rounding grows ~1e3x there, so fp64 only
    dtype = torch.float64 if optimizer == "looksam" else draw(
        st.sampled_from([torch.float64, torch.float32]))
    steps = draw(st.integers(2, 5))
    no_grad = {t: tuple(draw(st.lists(st.integers(0, len(shapes) - 1), max_size=2,
                                      unique=True)))
               for t in range(steps) if draw(st.booleans())}
    poisoned = tuple(t for t in range(steps) if draw(st.integers(0, 4)) == 0)
    reload_at = draw(st.one_of(st.none(), st.integers(1, steps - 1)))
    return Config(optimizer, options, base, base_options, shapes, groups, dtype, steps,
                  no_grad, poisoned, reload_at)


def _fastsam(config, params, backend):
    groups = [{"params": params[a:b], "rho": rho, "lr": lr}
              for a, b, rho, lr, _ in config.groups]
    base = BASES[config.base]
    common = dict(backend=backend, skip_nonfinite=True, lr=config.groups[0][3],
                  **config.base_options)
    name, options = config.optimizer, config.options
    if name == "sam":
        return fastsam.SAM(groups, base, **options, **common)
    if name == "asam":
        return fastsam.ASAM(groups, base, **options, **common)
    if name == "gsam":
        for group, spec in zip(groups, config.groups):
            group["gsam_alpha"] = spec[4]
        return fastsam.GSAM(groups, base, adaptive=options["adaptive"], gamma=0.01, **common)
    if name == "freesam":
        for group in groups:
            del group["rho"]
        return fastsam.FreeSAM(groups, base, **common)
    return fastsam.LookSAM(groups, base, **options, **common)


def _oracle(config, params):
    base = BASES[config.base]
    kwargs = dict(foreach=False, lr=config.groups[0][3], **config.base_options)
    groups = [{"params": params[a:b], "rho": rho, "lr": lr}
              for a, b, rho, lr, _ in config.groups]
    name, options = config.optimizer, config.options
    if name in ("sam", "asam"):
        if name == "asam":
            T = (options["normalization"], options["eta"])
        else:
            T = ("element", 0.0) if options["adaptive"] else ("none", 0.0)
        for group in groups:
            group["T"] = T
        return OracleSAM(groups, base, p=options.get("p", 2.0), **kwargs)
    if name == "gsam":
        adaptive = options["adaptive"]
        for group, spec in zip(groups, config.groups):
            group["T"] = ("element", 0.0) if adaptive is True else ("none", 0.0)
            group["gsam_alpha"] = spec[4]
        return OracleGSAM(groups, base, gamma=0.01 if adaptive == "agsam" else None, **kwargs)
    if name == "freesam":
        return OracleFreeSAM(params, base, **kwargs)
    return OracleLookSAM(groups, base, k=options["k"], alpha=options["alpha"], **kwargs)


def _step(opt, params, land, t, config, oracle):
    """One step of either optimizer, with the same gradients (from each one's own weights) and,
    on a poisoned step, an inf in the gradient the update uses: fastsam skips that update
    (skip_nonfinite), the oracle does not step at all (LookSAM's oracle counts the step)."""
    skip = config.no_grad.get(t, ())
    poisoned = t in config.poisoned and any(p.numel() for i, p in enumerate(params)
                                            if i not in skip)
    if oracle and poisoned:
        if config.optimizer == "looksam":
            opt.t += 1
        return

    def update_grads():
        land.set_grads(params, skip)
        if poisoned:
            next(p for p in params if p.grad is not None and p.numel()).grad.view(-1)[0] = (
                float("inf"))

    if config.optimizer == "freesam":
        update_grads()
        opt.step()
        opt.zero_grad()
    elif config.optimizer == "looksam" and not oracle and not opt.sam_step_next:
        update_grads()
        assert opt.first_step(zero_grad=True) is False  # the look-ahead update
    else:
        land.set_grads(params, skip)
        if opt.first_step(zero_grad=True) is not False:
            update_grads()
            opt.second_step(zero_grad=True)


def _run(config, backend, device):
    params = make_params(config.shapes, config.dtype, device, seed=5)
    ref = clone_params(params)
    land = Landscape(config.shapes, seed=6)
    opt = _fastsam(config, params, backend)
    oracle = _oracle(config, ref)
    for t in range(config.steps):
        if t == config.reload_at:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt = _fastsam(config, params, backend)
            opt.load_state_dict(torch.load(buffer, weights_only=True))
        _step(opt, params, land, t, config, False)
        _step(oracle, ref, land, t, config, True)
    return opt, params, oracle, ref


TOLERANCES = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _fuzz(backend, device):
    settings = hypothesis.settings(
        max_examples=LONG or BUDGET[backend], derandomize=not LONG, deadline=None,
        database=None, suppress_health_check=list(hypothesis.HealthCheck),
    )

    @settings
    @hypothesis.given(configs())
    def check(config):
        opt, params, oracle, ref = _run(config, backend, device)
        tol = TOLERANCES[config.dtype]
        for i, (p, r) in enumerate(zip(params, ref)):
            torch.testing.assert_close(p.detach(), r.detach(), msg=f"weights of param {i}",
                                       **tol)
            fast, slow = opt.state.get(p, {}), oracle.base.state.get(r, {})
            for key in STATE_KEYS:
                if slow.get(key) is not None:
                    torch.testing.assert_close(fast[key].double().cpu(), slow[key].double().cpu(),
                                               msg=f"{key} of param {i}", **tol)
        # every skipped update counted once, through the state dict round trip too
        skipped = [t for t in config.poisoned
                   if any(p.numel() for i, p in enumerate(params)
                          if i not in config.no_grad.get(t, ()))]
        assert opt.nonfinite_skipped_steps == len(skipped)

    check()


def test_generated_configurations_match_the_oracle(backend, device):
    _fuzz(backend, device)
