"""The steady state over plans held in C++ (fastsam/optimizers/_held.py, csrc/binding/held.h):
the same numbers as the general path bit for bit, taken when it applies, and left whenever
the plan changes: gradients appearing or going, parameters replaced or moved, groups added,
state loaded, late Adam steps; GradScaler's and skip_nonfinite's decisions held too."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE, NATIVE
from harness import Landscape, assert_state_close, clone_params, drive, make_params
from oracle import OracleSAM

import fastsam
from fastsam.backends.native import NativeBackend

pytestmark = pytest.mark.skipif(not NATIVE, reason="needs the fastsam._C extension")

SHAPES = [(1,), (7,), (6, 3, 3, 3), (33, 65), (0,), (5,), (3, 4)]


@pytest.fixture
def calls(monkeypatch):
    """How often each held operator ran (the held path was taken)."""
    counts = {"perturb": 0, "sgd": 0, "adam": 0, "restore": 0}
    for name in counts:
        original = getattr(NativeBackend, f"held_{name}")

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(NativeBackend, f"held_{name}", counted)
    return counts


def pair(make, dtype=torch.float32, shapes=SHAPES, groups=None):
    """Two optimizers over equal parameters: the first steps over held plans, the second
    always takes the general path."""
    params = make_params(shapes, dtype, DEVICE, seed=3)
    other = clone_params(params)

    def build(ps):
        return make(groups(ps) if groups else ps)

    held, general = build(params), build(other)
    assert held._held is not None
    general._held = None
    return (held, params), (general, other)


def assert_same(a, b):
    (opt_a, params_a), (opt_b, params_b) = a, b
    for p, q in zip(params_a, params_b):
        assert torch.equal(p, q)
    for p, q in zip(params_a, params_b):
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert set(sa) == set(sb)
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[key]), key


def same_store(a, b, store):
    """The per-parameter tensors of the two optimizers' ``store`` (a dotted attribute path):
    the same entries, equal bit for bit."""
    stores = []
    for opt, _ in (a, b):
        for name in store.split("."):
            opt = getattr(opt, name)
        stores.append(opt)
    for p, q in zip(a[1], b[1]):
        x, y = stores[0].get(p), stores[1].get(q)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), store


def one_pass_step(a, b, land, without=(), nan=None):
    """One step() of each of two one-pass optimizers (FreeSAM, MSAM) with the landscape's
    gradients (none for the parameters ``without``; a NaN in parameter ``nan``'s), then the
    same weights and state."""
    for opt, params in (a, b):
        land.set_grads(params, without)
        if nan is not None:
            params[nan].grad.view(-1)[0] = float("nan")
        opt.step()
        opt.zero_grad()
    assert_same(a, b)


def run_both(a, b, steps, skip=(), first=0):
    land = Landscape(SHAPES if len(a[1]) == len(SHAPES) else [tuple(p.shape) for p in a[1]])
    for opt, params in (a, b):
        drive(opt, params, land, steps, skip, first)


def two_groups(ps):
    return [{"params": ps[:3], "lr": 0.05, "rho": 0.1},
            {"params": ps[3:], "lr": 0.02, "weight_decay": 1e-2}]


CONFIGS = {
    "sam-sgd-nesterov": lambda ps: fastsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                               nesterov=True, weight_decay=1e-3, backend="cpu"),
    "sam-sgd-dampening": lambda ps: fastsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                                dampening=0.3, maximize=True, backend="cpu"),
    "sam-sgd-plain": lambda ps: fastsam.SAM(ps, torch.optim.SGD, lr=0.1, backend="cpu"),
    "asam-adamw": lambda ps: fastsam.SAM(ps, torch.optim.AdamW, lr=1e-2, rho=0.5,
                                         adaptive=True, weight_decay=0.1, backend="cpu"),
    "asam-filter-adam-amsgrad": lambda ps: fastsam.ASAM(ps, torch.optim.Adam, lr=1e-2,
                                                        amsgrad=True, weight_decay=1e-2,
                                                        backend="cpu"),
    "sam-p3-swa": lambda ps: fastsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, p=3.0,
                                         average="swa", backend="cpu"),
    "sam-sgd-clip": lambda ps: fastsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                           max_grad_norm=0.5, backend="cpu"),
    "asam-adamw-clip": lambda ps: fastsam.SAM(ps, torch.optim.AdamW, lr=1e-2, adaptive=True,
                                              max_grad_norm=0.5, backend="cpu"),
    "sam-adam-ema-tensor-lr": lambda ps: fastsam.SAM(ps, torch.optim.Adam,
                                                     lr=torch.tensor(1e-2),
                                                     average=fastsam.EMA(0.9), backend="cpu"),
    # GSAM: pass B keeps g in "first"; the update's decomposition reads it, along from a
    # held reduction (or, with max_grad_norm, from the three sums the clip is made from)
    "gsam-sgd-groups": lambda ps: fastsam.GSAM(
        [{"params": ps[:3], "alpha": 0.4}, {"params": ps[3:], "alpha": 0.0, "rho": 0.1}],
        torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpu"),
    "gsam-adamw-clip": lambda ps: fastsam.GSAM(ps, torch.optim.AdamW, lr=1e-2, alpha=0.3,
                                               weight_decay=0.1, max_grad_norm=0.5,
                                               adaptive=True, backend="cpu"),
    "agsam-adam-ema": lambda ps: fastsam.GSAM(ps, torch.optim.Adam, lr=1e-2, adaptive="agsam",
                                              average=fastsam.EMA(0.9), backend="cpu"),
    # WSAM: GSAM's mode with fixed coefficients from "first"; decoupled, its term after the
    # update (two foreach passes over the held lists, the second per group's lr)
    "wsam-sgd-decoupled-groups": lambda ps: fastsam.WSAM(
        two_groups(ps), torch.optim.SGD, lr=0.1, momentum=0.9, gamma=0.8, backend="cpu"),
    "wsam-adamw-decoupled-clip": lambda ps: fastsam.WSAM(
        ps, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5, adaptive=True,
        backend="cpu"),
    "wsam-adam-coupled-swa": lambda ps: fastsam.WSAM(ps, torch.optim.Adam, lr=1e-2, gamma=0.7,
                                                     decouple=False, average="swa",
                                                     backend="cpu"),
    # FriendlySAM: passes A and B along d = g − sigma·m, m and m_next bound ("fm_a", "fm_b",
    # swapped by each commit)
    "friendlysam-sgd": lambda ps: fastsam.FriendlySAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                                      backend="cpu"),
    "friendlysam-adamw-groups-clip": lambda ps: fastsam.FriendlySAM(
        [{"params": ps[:3], "sigma": 0.5, "adaptive": True}, {"params": ps[3:], "lmbda": 0.6}],
        torch.optim.AdamW, lr=1e-2, max_grad_norm=0.5, skip_nonfinite=True, backend="cpu"),
    # ESAM: the held perturb pass draws the mask of the general path (each step's key)
    "esam-sgd": lambda ps: fastsam.ESAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, beta=0.4,
                                        seed=5, backend="cpu"),
}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_as_general_path(name, dtype, calls):
    a, b = pair(CONFIGS[name], dtype)
    run_both(a, b, 6)
    assert_same(a, b)
    # the first step makes the plan (general path), the other five run held; so do the updates
    # but the first, which makes the state (plain SGD has none: its first update is held too)
    assert calls["perturb"] == 5
    groups = len(a[0].param_groups)  # (an update call per group)
    assert calls["sgd"] + calls["adam"] == groups * (6 if name == "sam-sgd-plain" else 5)
    if "swa" in name or "ema" in name:
        for p, q in zip(a[1], b[1]):
            avg_a = a[0]._averager.averaged.get(p)
            avg_b = b[0]._averager.averaged.get(q)
            assert (avg_a is None) == (avg_b is None)
            if avg_a is not None:
                assert torch.equal(avg_a, avg_b)


BETWEEN = {  # optimizers with steps between SAM steps (a plain update, one pass)
    "sam-interval-sgd": lambda ps: fastsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                               interval=2, backend="cpu"),
    # c = 1.5: SAM steps while ‖g‖² stands out, plain ones otherwise (both taken over 8 steps)
    "aesam-sgd": lambda ps: fastsam.AESAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                          total_steps=8, lambda1=1.5, lambda2=1.5,
                                          backend="cpu"),
    "gsam-interval-sgd": lambda ps: fastsam.GSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                                 interval=3, max_grad_norm=0.5, backend="cpu"),
    "aesam-adamw-clip": lambda ps: fastsam.AESAM(ps, torch.optim.AdamW, lr=1e-2,
                                                 weight_decay=0.1, max_grad_norm=0.5,
                                                 total_steps=8, lambda1=1.5, lambda2=1.5,
                                                 backend="cpu"),
}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
@pytest.mark.parametrize("name", sorted(BETWEEN))
def test_steps_between_sam_steps_are_held(name, calls):
    """Interval SAM's and AE-SAM's plain steps run over the held plan (each parameter its own
    w_old), and so does AE-SAM's decision (pass A, then pass B or not): bit for bit the
    general path's, both kinds of step taken."""
    a, b = pair(BETWEEN[name])
    land = Landscape(SHAPES)
    kinds = []
    for t in range(8):
        for opt, params in (a, b):
            land.set_grads(params)
            sam = opt.first_step(zero_grad=True)
            if opt is a[0]:
                kinds.append(sam)
            if sam:
                land.set_grads(params)
                opt.second_step(zero_grad=True)
        assert_same(a, b)
    assert True in kinds and False in kinds, kinds
    # from the second step on every step is held: an update per step (the first made the
    # state), pass A per step for AE-SAM (its decision) and per SAM step for interval SAM
    assert calls["sgd"] + calls["adam"] == 7
    assert calls["perturb"] == (7 if "aesam" in name else sum(kinds[1:]))
    if "aesam" in name:
        assert a[0].statistics == b[0].statistics and a[0].sam_steps == b[0].sam_steps


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
def test_groups_and_sam_on(calls):
    def make(ps):
        groups = two_groups(ps)
        groups[1]["perturb"] = False  # SAM-ON: the second group only updates
        return fastsam.SAM(groups, torch.optim.SGD, momentum=0.9, backend="cpu")

    a, b = pair(make)
    run_both(a, b, 5)
    assert_same(a, b)
    assert calls["perturb"] == 4 and calls["sgd"] == 2 * 4  # one call per group


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
def test_schedules_are_read_each_step(calls):
    a, b = pair(lambda ps: fastsam.SAM(two_groups(ps), torch.optim.SGD, momentum=0.9,
                                       backend="cpu"))
    land = Landscape(SHAPES)
    for t in range(6):
        for opt, params in (a, b):
            for k, group in enumerate(opt.param_groups):
                group["lr"] = 0.1 / (t + 1 + k)
                group["rho"] = 0.05 * (t + 1)
            drive(opt, params, land, 1, first=t)
    assert_same(a, b)
    assert calls["perturb"] == 5


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
def test_held_calls_record_profiler_events(calls):
    """Each held call records its own profiler event (they are not dispatched operators), once
    a call, while the profiler listens; before and after, the same steps record nothing."""
    params = make_params(SHAPES, torch.float32, DEVICE, seed=3)
    opt = fastsam.SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, skip_nonfinite=True,
                      max_grad_norm=1.0, backend="cpu")
    land = Landscape(SHAPES)
    drive(opt, params, land, 2)  # held from the second step on
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        drive(opt, params, land, 3, first=2)
    drive(opt, params, land, 1, first=5)  # (no listener: no event begun)
    names = [e.name for e in prof.events()]
    # per step: pass A, and the update's clip norm; pass B; the update; the skip's check
    for name, count in (("norm", 6), ("perturb", 3), ("sgd", 3), ("check_nonfinite", 3)):
        assert names.count(f"fastsam::held_{name}") == count, name
    assert calls["perturb"] == 5 and calls["sgd"] == 5


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
def test_gsam_alpha_is_read_each_step(calls):
    """GSAM's per-group alpha changed between steps (a schedule; 0 turns the decomposition
    off for the group): the held update's gradient sources follow it, bit for bit the general
    path's (the held path keeps its sources while plan, along and alphas are the same)."""
    a, b = pair(lambda ps: fastsam.GSAM(two_groups(ps), torch.optim.SGD, lr=0.1, momentum=0.9,
                                        alpha=0.4, backend="cpu"))
    land = Landscape(SHAPES)
    alphas = [(0.4, 0.4), (0.4, 0.4), (0.1, 0.4), (0.1, 0.0), (0.0, 0.0), (0.7, 0.2)]
    for t, pair_of_alphas in enumerate(alphas):
        for opt, params in (a, b):
            for group, alpha in zip(opt.param_groups, pair_of_alphas):
                group["gsam_alpha"] = alpha
            drive(opt, params, land, 1, first=t)
        assert_same(a, b)
    assert calls["perturb"] == 5 and calls["sgd"] == 2 * 5


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_plan_changes_leave_the_held_path(base, calls):
    """Gradients that come and go, a parameter whose storage is replaced, a state tensor
    moved in place, a parameter swapped in the group's list, a group added: each step equals
    the general path's."""
    def make(ps):
        if base == "sgd":
            return fastsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpu")
        return fastsam.SAM(ps, torch.optim.AdamW, lr=1e-2, backend="cpu")

    a, b = pair(make)
    skip = {2: (1,), 3: (1,), 5: (0, 3), 6: (3,)}  # late and missing gradients
    run_both(a, b, 9, skip)
    assert_same(a, b)
    held_steps = calls["perturb"]
    assert 0 < held_steps < 9
    # a parameter's storage replaced (p.data = ...): a new plan, the same numbers
    for opt, params in (a, b):
        params[2].data = params[2].data.clone()
    run_both(a, b, 3, first=9)
    assert_same(a, b)
    # a state tensor moved in place (its storage replaced): the held tables follow it
    before = calls["perturb"]
    for opt, params in (a, b):
        state = opt.state[params[3]]["momentum_buffer" if base == "sgd" else "exp_avg"]
        state.set_(state.clone())
    run_both(a, b, 3, first=12)
    assert_same(a, b)
    assert calls["perturb"] == before + 3  # (held all along)
    # a parameter of a group replaced by another object at the same place
    for opt, params in (a, b):
        new = torch.nn.Parameter(params[5].detach().clone() + 1)
        opt.param_groups[0]["params"][5] = new
        params[5] = new
    run_both(a, b, 3, first=15)
    assert_same(a, b)
    # a group added
    for opt, params in (a, b):
        extra = torch.nn.Parameter(torch.linspace(-1, 1, 9))
        opt.add_param_group({"params": [extra]})
        params.append(extra)
    land = Landscape([tuple(p.shape) for p in a[1]], seed=4)
    for opt, params in (a, b):
        drive(opt, params, land, 3, first=18)
    assert_same(a, b)
    assert calls["perturb"] > held_steps


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
@pytest.mark.parametrize("change", ["shrunk", "reshaped"])
def test_a_parameter_changed_at_its_address_makes_a_new_plan(change, calls):
    """``p.data = p.data[:k]`` (or a view of another shape) keeps the parameter's address: the
    held plan sees the new shape and a new plan is made (the kept tables would have read the
    gradient past its end), the steps following the oracle's."""
    def resize(t):
        return t[:29] if change == "shrunk" else t.view(11, 3)

    params = make_params([(33,), (7,), (4, 5)], torch.float64, DEVICE, seed=3)
    ref = clone_params(params)
    opt = fastsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend="cpu")
    oracle = OracleSAM([{"params": ref, "rho": 0.05, "T": ("none", 0.0)}], torch.optim.SGD,
                       lr=0.1, momentum=0.9, foreach=False)
    land = Landscape([(33,), (7,), (4, 5)])
    drive(opt, params, land, 3)
    drive(oracle, ref, land, 3)
    for ps, state in ((params, opt.state), (ref, oracle.base.state)):
        ps[0].data = resize(ps[0].data)
        state[ps[0]]["momentum_buffer"] = resize(state[ps[0]]["momentum_buffer"])
    before = calls["perturb"]
    land = Landscape([tuple(p.shape) for p in params], seed=2)
    drive(opt, params, land, 4, first=3)
    drive(oracle, ref, land, 4, first=3)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
    assert_state_close(opt, params, oracle.base, ref, rtol=1e-10, atol=1e-12)
    assert calls["perturb"] == before + 3  # held again from the step after the new plan's


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
def test_loaded_state_is_bound_again(calls):
    a, b = pair(lambda ps: fastsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                       backend="cpu"))
    run_both(a, b, 4)
    saved = b[0].state_dict()
    for opt, _ in (a, b):
        # new momentum buffers (copies: torch.optim's load keeps the tensors it is given): the
        # held plan must not keep updating the old ones
        opt.load_state_dict(copy.deepcopy(saved))
    before = calls["sgd"]
    run_both(a, b, 4, first=4)
    assert_same(a, b)
    assert calls["sgd"] == before + 4  # held again: the state is bound anew


def _base(name):
    if name == "sgd":
        return dict(base=torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    return dict(base=torch.optim.AdamW, lr=1e-2, weight_decay=0.1)


def _mixed_params():
    """SHAPES' parameters, two of them bfloat16 (the unscale and the check go per dtype)."""
    params = make_params(SHAPES, torch.float32, DEVICE, seed=3)
    for i in (1, 3):
        params[i] = torch.nn.Parameter(params[i].detach().bfloat16())
    return params


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("sam_on", [False, True])
def test_skip_nonfinite_is_held(base, sam_on, calls):
    """skip_nonfinite over held plans: inf/NaN in the first pass (no perturbation, the update
    skipped) or in the second (the weights restored, the update skipped), bit for bit the
    general path's, the check and the restore held; SAM-ON's unperturbed group is left alone."""
    def make(ps):
        kwargs = _base(base)
        groups = two_groups(ps)
        groups[1]["perturb"] = not sam_on
        return fastsam.SAM(groups, kwargs.pop("base"), skip_nonfinite=True, backend="cpu",
                           **kwargs)

    params = _mixed_params()
    a = (make(params), params)
    other = clone_params(params)
    b = (make(other), other)
    b[0]._held = None
    land = Landscape(SHAPES)
    bad = {3: (0, 2, float("nan")), 5: (1, 5, float("inf")), 6: (2, 3, float("-inf"))}
    for t in range(8):
        before = [p.detach().clone() for p in a[1]]
        for opt, ps in (a, b):
            land.set_grads(ps)
            if bad.get(t, (None,))[0] == 0:
                ps[bad[t][1]].grad.view(-1)[0] = bad[t][2]
            opt.first_step(zero_grad=True)
            land.set_grads(ps)
            if bad.get(t, (None,))[0] in (1, 2):
                ps[bad[t][1]].grad.view(-1)[-1] = bad[t][2]
            opt.second_step(zero_grad=True)
        assert_same(a, b)
        if t in bad:  # skipped: every weight as it was
            assert all(torch.equal(p, q) for p, q in zip(a[1], before))
    assert a[0].nonfinite_skipped_steps == b[0].nonfinite_skipped_steps == 3
    # from the second step on: held perturbs and held updates but for the three skipped steps,
    # whose restore (of the perturbed group) is held
    assert calls["perturb"] == 7 and calls[base.replace("w", "")] == 2 * (7 - 3)
    assert calls["restore"] == 3


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", [fastsam.SAM, fastsam.GSAM, fastsam.WSAM])
def test_grad_scaler_steps_are_held(kind, base, calls):
    """scaler.step(optimizer) over held plans: the gradients (and GSAM's kept first-pass ones)
    unscaled per dtype in C++, a step whose gradients overflow skipped with the weights
    restored, the scale backing off; bit for bit the general path's (weights, state, counters,
    the scalers' scales)."""
    def make(ps):
        kwargs = _base(base)
        # max_grad_norm clips the scaled gradients (norm ~ 60·scale) and not the unscaled ones:
        # an update from gradients left scaled would not be the general path's
        return kind(ps, kwargs.pop("base"), max_grad_norm=500.0, backend="cpu", **kwargs)

    params = _mixed_params()
    other = clone_params(params)
    runs = []
    for ps in (params, other):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6, growth_interval=2)
        runs.append((make(ps), ps, scaler))
    runs[1][0]._held = None
    land = Landscape(SHAPES)
    for t in range(7):
        for opt, ps, scaler in runs:
            scale = scaler.scale(torch.ones((), dtype=torch.float64)).item()  # (its first use)
            land.set_grads(ps)
            for p in ps:
                p.grad.mul_(scale)
            opt.first_step(zero_grad=True)
            land.set_grads(ps)
            for p in ps:
                p.grad.mul_(scale)
            if t == 4:
                ps[1].grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert_same(runs[0][:2], runs[1][:2])
        assert runs[0][2].get_scale() == runs[1][2].get_scale()
    assert runs[0][0].amp_skipped_steps == runs[1][0].amp_skipped_steps == 1
    assert runs[0][2].get_scale() != 2.0 ** 6  # it grew and backed off
    assert calls["perturb"] == 6 and calls[base.replace("w", "")] == 5
    assert calls["restore"] == 1


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
def test_wsam_refusal_over_a_held_plan(calls):
    """A tensor lr given to WSAM(decouple=True) between steps: the held second step refuses it
    as the general path does, with the weights restored bit for bit."""
    params = make_params(SHAPES, torch.float32, DEVICE, seed=3)
    opt = fastsam.WSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpu")
    land = Landscape(SHAPES)
    drive(opt, params, land, 3)
    assert calls["perturb"] == 2
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["lr"] = torch.tensor(0.1)
    land.set_grads(params)
    opt.first_step(zero_grad=True)
    assert calls["perturb"] == 3  # held
    land.set_grads(params)
    with pytest.raises(RuntimeError, match="a float lr with decouple=True"):
        opt.second_step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    opt.state_dict()  # no step left pending


LOOKSAM = {  # k = 3: the look-ahead steps held (a correction read from "direction"), the SAM
    # steps on the general path
    "looksam-sgd-groups": lambda ps: fastsam.LookSAM(two_groups(ps), torch.optim.SGD,
                                                     momentum=0.9, k=3, backend="cpu"),
    "looksam-adamw-clip": lambda ps: fastsam.LookSAM(ps, torch.optim.AdamW, lr=1e-2, k=3,
                                                     weight_decay=0.1, max_grad_norm=0.5,
                                                     alpha=0.5, backend="cpu"),
    "looksam-sgd-skip-ema": lambda ps: fastsam.LookSAM(ps, torch.optim.SGD, lr=0.1, k=3,
                                                       momentum=0.9, skip_nonfinite=True,
                                                       average=fastsam.EMA(0.9),
                                                       backend="cpu"),
}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
@pytest.mark.parametrize("name", sorted(LOOKSAM))
def test_looksam_look_ahead_steps_are_held(name, calls):
    """LookSAM's look-ahead steps over held plans, bit for bit the general path's (weights,
    state, u_v), a NaN look-ahead step skipped; its SAM steps take the general path."""
    a, b = pair(LOOKSAM[name])
    land = Landscape(SHAPES)
    for t in range(9):
        for opt, params in (a, b):
            land.set_grads(params)
            if "skip" in name and t == 4:
                params[2].grad.view(-1)[0] = float("nan")
            if opt.first_step(zero_grad=True):
                land.set_grads(params)
                opt.second_step(zero_grad=True)
        assert_same(a, b)
        same_store(a, b, "_direction")
    groups = len(a[0].param_groups)
    look_ahead = 6 - (1 if "skip" in name else 0)  # steps 1, 2, 4, 5, 7, 8 (4 skipped)
    assert calls["perturb"] == 0 and calls["sgd"] + calls["adam"] == groups * look_ahead
    if "skip" in name:
        assert a[0].nonfinite_skipped_steps == b[0].nonfinite_skipped_steps == 1


FREESAM = {  # one pass per step: the update reads the stored gradient ("previous") and
    # stores this step's in its place
    "freesam-sgd": lambda ps: fastsam.FreeSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                              nesterov=True, backend="cpu"),
    "freesam-adamw-clip-ema": lambda ps: fastsam.FreeSAM(
        two_groups(ps), torch.optim.AdamW, max_grad_norm=0.5, average=fastsam.EMA(0.9),
        backend="cpu"),
    "freesam-adam-skip": lambda ps: fastsam.FreeSAM(ps, torch.optim.Adam, lr=1e-2,
                                                    skip_nonfinite=True, backend="cpu"),
}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
@pytest.mark.parametrize("name", sorted(FREESAM))
def test_freesam_steps_are_held(name, calls):
    """FreeSAM over held plans: bit for bit the general path's (weights, state, the stored
    gradients), a late gradient (a new plan, the general path) and a NaN step (skipped) on
    the way."""
    a, b = pair(FREESAM[name])
    land = Landscape(SHAPES)
    # SGD: parameter 1 without a gradient at step 4, plans change twice (Adam's steps would
    # differ after it: the per-value general update, tested above)
    skip = {4: (1,)} if "sgd" in name else {}
    for t in range(10):
        one_pass_step(a, b, land, skip.get(t, ()), 0 if "skip" in name and t == 7 else None)
        same_store(a, b, "_stored")
    groups = len(a[0].param_groups)
    # general: the first step, and the steps that make a plan (4 and 5); the skipped step
    # makes no update call
    held = 10 - (3 if skip else 1) - (1 if "skip" in name else 0)
    assert calls["sgd"] + calls["adam"] == groups * held
    if "skip" in name:
        assert a[0].nonfinite_skipped_steps == b[0].nonfinite_skipped_steps == 1


MSAM = {  # one pass per step: the update from the bound "weights", then passes A and B
    # along the momentum (bound as the base optimizer's state)
    "msam-sgd": lambda ps: fastsam.MSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                        backend="cpu"),
    "msam-adamw-clip-ema": lambda ps: fastsam.MSAM(two_groups(ps), torch.optim.AdamW, rho=0.3,
                                                   max_grad_norm=0.5,
                                                   average=fastsam.EMA(0.9), backend="cpu"),
    "msam-sgd-skip": lambda ps: fastsam.MSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                             skip_nonfinite=True, backend="cpu"),
}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
@pytest.mark.parametrize("name", sorted(MSAM))
def test_msam_steps_are_held(name, calls):
    """MSAM over held plans: bit for bit the general path's (weights w̃, the kept w, state,
    averages: parameter 5 loses its gradient after step 2, then averaged at its w, not at
    w̃), a NaN step skipped."""
    a, b = pair(MSAM[name])
    land = Landscape(SHAPES)
    for t in range(8):
        one_pass_step(a, b, land, (5,) if t >= 3 else (), 1 if "skip" in name and t == 5 else None)
        same_store(a, b, "_weights")
        same_store(a, b, "_averager.averaged")
    groups = len(a[0].param_groups)
    # general: the first step and step 3 (a new plan); a skipped step makes no update
    held = 6 - (1 if "skip" in name else 0)
    assert calls["sgd"] + calls["adam"] == groups * held
    assert calls["perturb"] == held
    if "skip" in name:
        assert a[0].nonfinite_skipped_steps == b[0].nonfinite_skipped_steps == 1


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend")
def test_friendlysam_momentum_over_held_plans(calls):
    """FriendlySAM's m over held plans, bit for bit the general path's: first passes with a
    loss scale (grad_scale: m kept unscaled), a NaN first pass (no perturbation, m_next = m,
    the update skipped, m not committed), a parameter whose gradient comes late (its first
    step: the general path, then held again)."""
    def make(ps):
        return fastsam.FriendlySAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, sigma=0.8,
                                   lmbda=0.7, skip_nonfinite=True, backend="cpu")

    a, b = pair(make)
    land = Landscape(SHAPES)
    for t in range(9):
        for opt, params in (a, b):
            land.set_grads(params, (3,) if t < 4 else ())
            scale = 4.0 if t % 2 else None
            if scale is not None:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            if t == 6:
                params[1].grad[0] = float("nan")
            opt.first_step(zero_grad=True, grad_scale=scale)
            land.set_grads(params, (3,) if t < 4 else ())
            opt.second_step(zero_grad=True)
        assert_same(a, b)
        a[0]._sync(), b[0]._sync()
        same_store(a, b, "_momentum")
    assert a[0].nonfinite_skipped_steps == b[0].nonfinite_skipped_steps == 1
    # general: step 0 and step 4, each a new plan with parameters on their first step; the
    # other seven held (the NaN step's passes A and B too)
    assert calls["perturb"] == 7


def test_excluded_configurations_have_no_held_path():
    p = [torch.nn.Parameter(torch.ones(3))]
    assert fastsam.SAM(p, torch.optim.SGD, lr=0.1, backend="cpu")._held is not None
    assert fastsam.SAM(p, torch.optim.SGD, lr=0.1, backend="cpu",
                       skip_nonfinite=True)._held is not None
    assert fastsam.GSAM(p, torch.optim.SGD, lr=0.1, backend="cpu")._held is not None
    assert fastsam.WSAM(p, torch.optim.SGD, lr=0.1, backend="cpu")._held is not None
    assert fastsam.FriendlySAM(p, torch.optim.SGD, lr=0.1, backend="cpu")._held is not None
    looksam = fastsam.LookSAM(p, torch.optim.SGD, lr=0.1, backend="cpu")
    assert looksam._held is not None and not looksam._held.sam_steps  # look-ahead steps only
    for opt in (
        fastsam.SAM(p, torch.optim.SGD, lr=0.1, backend="cpu", capturable=True),
        fastsam.GSAM(p, torch.optim.SGD, lr=0.1, backend="cpu", capturable=True),
    ):
        assert opt._held is None, type(opt).__name__


def test_increment_steps_adds_one_only_when_the_steps_agree():
    """HeldPlan.increment_steps (Adam's CPU steps of a held update): every step + 1 when they
    hold one value (a step that is a view into a larger storage too), nothing changed and -1
    when they differ, an error for a step that is not one float32 value whatever the others
    hold."""
    import fastsam._C  # noqa: F401

    ps = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    plan = fastsam._C.HeldPlan(ps, [1, 1], [])
    storage = torch.zeros(5)
    first, second = torch.tensor(3.0), storage[2]  # the second at offset 2 of its storage
    second.fill_(3.0)
    plan.bind("step", 0, [first])
    plan.bind("step", 1, [second])
    assert plan.increment_steps("step", [0, 1]) == 4.0
    assert first.item() == 4.0 and torch.equal(storage, torch.tensor([0.0, 0.0, 4.0, 0.0, 0.0]))
    second.fill_(7.0)
    assert plan.increment_steps("step", [0, 1]) == -1.0
    assert first.item() == 4.0 and second.item() == 7.0
    assert plan.increment_steps("step", [1]) == 8.0 and first.item() == 4.0
    assert plan.increment_steps("", [0, 1]) == -1.0  # no list
    for bad in (torch.tensor(8.0, dtype=torch.float64), torch.full((2,), 8.0),
                torch.empty((), device="meta"), torch.tensor(8.0).to_sparse()):
        plan.bind("step", 0, [bad])
        for groups in ([0, 1], [1, 0]):
            with pytest.raises(ValueError, match="not one float32 value"):
                plan.increment_steps("step", groups)
    assert second.item() == 8.0


def test_check_nonfinite_over_held_gradients_of_any_layout():
    """A held plan's skip_nonfinite check: the nonfinite operator's pass when every gradient
    is laid out as its parameter, torch's per-dtype kernel when one is not (a transposed
    gradient): the same answers as torch.isfinite, group by group, dtypes mixed."""
    import fastsam._C  # noqa: F401

    ps = [torch.nn.Parameter(torch.ones(3, 4)), torch.nn.Parameter(torch.ones(5000)),
          torch.nn.Parameter(torch.ones(7, dtype=torch.float64)),
          torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]
    plan = fastsam._C.HeldPlan(ps, [2, 2], [])
    for transposed in (False, True):
        for p in ps:
            p.grad = torch.randn_like(p)
        if transposed:
            ps[0].grad = torch.randn(4, 3).t()
        assert plan.refresh()
        for index, where in [(0, (2, 1)), (1, (4999,)), (2, (0,)), (3, (1,))]:
            for value in (float("nan"), float("inf"), None):
                grad = ps[index].grad
                before = grad[where].item()
                if value is not None:
                    grad[where] = value
                for groups in ([0], [1], [0, 1], [1, 0]):
                    found = torch.zeros(1)
                    plan.check_nonfinite(groups, found, torch.ones(1))
                    members = [p for g in groups for p in ps[2 * g:2 * g + 2]]
                    want = not all(bool(torch.isfinite(p.grad).all()) for p in members)
                    assert found.item() == float(want), (transposed, index, value, groups)
                grad[where] = before
        with pytest.raises(ValueError, match="found is on meta"):
            plan.check_nonfinite([0], torch.zeros(1, device="meta"), torch.ones(1))
        plan.release()


def test_held_plan_refuses_misuse():
    import fastsam._C  # noqa: F401

    ps = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    plan = fastsam._C.HeldPlan(ps, [1, 1], [])
    with pytest.raises(ValueError, match="2 tensors for group 0 of 1"):
        plan.bind("w_old", 0, [torch.ones(2), torch.ones(3)])
    with pytest.raises(ValueError, match="not a name to bind"):
        plan.bind("grad", 0, [torch.ones(2)])
    with pytest.raises(ValueError, match="group 2 of 2"):
        plan.bind("w_old", 2, [])
    with pytest.raises(ValueError, match="add up to 3"):
        fastsam._C.HeldPlan(ps, [3], [])
    with pytest.raises(ValueError, match="parameters on cpu and meta"):
        fastsam._C.HeldPlan([ps[0], torch.zeros(2, device="meta")], [2], [])
    assert not plan.refresh()  # no gradients yet
    for p in ps:
        p.grad = torch.zeros_like(p)
    assert plan.refresh()
    with pytest.raises(ValueError, match="no factor of dtype Float"):
        plan.scale([0, 1], ["grad"], [torch.tensor(0.5, dtype=torch.float64)])
    ps[1].grad.fill_(3.0)
    plan.scale([1], ["grad"], [torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0)])
    assert torch.equal(ps[1].grad, torch.full((3,), 6.0)) and torch.equal(ps[0].grad,
                                                                          torch.zeros(2))
    with pytest.raises(ValueError, match="wsam_decoupled: 2 list names, needs 3"):
        plan.wsam_decoupled([0], ["params", "grad"], 1.0, None)
    plan.bind("first", 1, [torch.full((3,), 4.0)])
    with torch.no_grad():  # first ← 4 − 2·6 = −8, then p ← 1 − 0.5·(−8) = 5
        plan.wsam_decoupled([1], ["params", "first", "grad"], -0.5, torch.tensor(2.0))
        assert torch.equal(ps[1], torch.full((3,), 5.0))
        ps[1].fill_(1.0)
    found = torch.zeros(1)
    plan.check_nonfinite([0, 1], found, torch.ones(1))
    assert found.item() == 0.0
    ps[0].grad[1] = float("nan")
    plan.check_nonfinite([1], found, torch.ones(1))  # group 1 only: still finite
    assert found.item() == 0.0
    plan.check_nonfinite([0, 1], found, torch.ones(1))
    assert found.item() == 1.0
    ps[0].grad.zero_()
    plan.bind("w_old", 0, [torch.zeros(2)])
    with pytest.raises(ValueError, match="not bound for group 1"):
        plan.restore([0, 1], ["params", "w_old"])
    with pytest.raises(ValueError, match="no list 'other'"):
        plan.restore([0], ["params", "other"])
    plan.bind("w_old", 1, [torch.zeros(4)])  # not the parameter's shape
    with pytest.raises(ValueError, match=r"w_old\[1\] has shape"):
        plan.restore([0, 1], ["params", "w_old"])
    ps[0].grad = None
    assert not plan.refresh()
