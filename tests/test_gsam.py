"""GSAM against its per-parameter oracle on every backend, the decomposition's properties, the
rho schedules, and the official construction/``set_closure`` usage."""
import math

import pytest
import torch
from conftest import FUSED
from harness import SHAPES, Landscape, assert_state_close, clone_params, drive, make_params
from oracle import OracleGSAM

import fastsam
from fastsam.functional import DecomposeGroup

STEPS = 7
GAMMA = 0.02
BASES = {
    "sgd_momentum_wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "rmsprop_unfused": (torch.optim.RMSprop, dict(lr=1e-3)),
}


SPECS = ({"rho": 0.05}, {"rho": 0.1})


def _oracle(ref, base, adaptive=False, alphas=(0.3, 0.1)):
    """The per-parameter GSAM over ``ref``, grouped as :func:`_pair` groups fastsam's."""
    base_cls, kw = BASES[base]
    kind = ("element", 0.0) if adaptive is True else ("none", 0.0)
    groups = [{"params": ref[:3], "T": kind, "gsam_alpha": alphas[0], **SPECS[0]},
              {"params": ref[3:], "T": kind, "gsam_alpha": alphas[1], **SPECS[1]}]
    return OracleGSAM(groups, base_cls, foreach=False,
                      gamma=GAMMA if adaptive == "agsam" else None, **kw)


def _pair(backend, device, dtype, base, adaptive=False, alphas=(0.3, 0.1), seed=0):
    base_cls, kw = BASES[base]
    params = make_params(SHAPES, dtype, device, seed=seed)
    ref = clone_params(params)
    opt = fastsam.GSAM(
        [{"params": params[:3], "gsam_alpha": alphas[0], **SPECS[0]},
         {"params": params[3:], "gsam_alpha": alphas[1], **SPECS[1]}],
        base_cls, adaptive=adaptive, gamma=GAMMA, backend=backend, **kw,
    )
    return params, ref, opt, _oracle(ref, base, adaptive, alphas)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-10, atol=1e-12)),
                                       (torch.float32, dict(rtol=1e-5, atol=1e-5))])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("adaptive", [False, True, "agsam"])
def test_matches_oracle(backend, device, dtype, tol, base, adaptive):
    params, ref, opt, oracle = _pair(backend, device, dtype, base, adaptive)
    land = Landscape(SHAPES, seed=3)
    drive(opt, params, land, STEPS)
    drive(oracle, ref, land, STEPS)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, **tol)
    assert_state_close(opt, params, oracle.base, ref, **tol)


@pytest.mark.parametrize("dtype,base,adaptive", [
    (torch.bfloat16, "sgd_momentum_wd", False),
    (torch.bfloat16, "adamw", "agsam"),
    (torch.float16, "sgd_momentum_wd", True),
])
def test_low_precision(backend, device, dtype, base, adaptive):
    """bf16/fp16 storage: the error against an fp64 oracle is at most twice that of the eager
    per-parameter GSAM loop run in the same precision (as tests/test_parity.py for SAM)."""
    params, eager, opt, oracle_lp = _pair(backend, device, dtype, base, adaptive, seed=12)
    ref64 = clone_params(params, torch.float64)
    runs = [(opt, params), (_oracle(ref64, base, adaptive), ref64), (oracle_lp, eager)]
    land = Landscape(SHAPES, seed=13)
    for o, ps in runs:
        drive(o, ps, land, STEPS)
    flat = [torch.cat([t.detach().double().flatten() for t in ps]) for _, ps in runs]
    err_fast = float((flat[0] - flat[1]).norm() / flat[1].norm())
    err_eager = float((flat[2] - flat[1]).norm() / flat[1].norm())
    assert math.isfinite(err_eager) and err_eager > 0, err_eager
    assert err_fast <= 2 * err_eager, (err_fast, err_eager)


def test_alpha_zero_is_sam_exactly(backend, device):
    params = make_params(SHAPES, torch.float32, device, seed=4)
    twin = clone_params(params)
    gsam = fastsam.GSAM(params, torch.optim.SGD, rho=0.05, alpha=0.0, lr=0.05, momentum=0.9,
                        backend=backend)
    sam = fastsam.SAM(twin, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, backend=backend)
    land = Landscape(SHAPES, seed=5)
    drive(gsam, params, land, STEPS)
    drive(sam, twin, land, STEPS)
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


@pytest.mark.parametrize("base", ["sgd_momentum_wd", "adamw"])
def test_decomposition_is_fused_into_the_update(backend, device, base, monkeypatch):
    """With SGD/Adam the decomposition never rewrites the gradients: one reduction
    (gsam_along), then the fused update forms g_adv - alpha·v itself."""
    from fastsam.functional import Backend

    def refuse(*args, **kwargs):
        raise AssertionError("the unfused decomposition ran")

    monkeypatch.setattr(Backend, "gsam_decompose", refuse)
    params, ref, opt, oracle = _pair(backend, device, torch.float64, base)
    land = Landscape(SHAPES, seed=8)
    drive(opt, params, land, 3)
    drive(oracle, ref, land, 3)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
    assert_state_close(opt, params, oracle.base, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif("triton" not in FUSED, reason="triton is not installed")
def test_triton_gsam_step_launches_do_not_grow_with_tensor_count(device):
    counts = []
    for n in (3, 40):
        params = [torch.nn.Parameter(torch.randn(50, device=device)) for _ in range(n)]
        opt = fastsam.GSAM(params, torch.optim.SGD, rho=0.05, alpha=0.3, lr=0.1, momentum=0.9,
                           backend="triton")
        impl = opt._backend_for(params[0].device)
        for _ in range(2):  # the second step has momentum buffers: one update launch
            for p in params:
                p.grad = torch.randn_like(p)
            before = impl.launches
            opt.first_step(zero_grad=True)
            for p in params:
                p.grad = torch.randn_like(p)
            opt.second_step(zero_grad=True)
        counts.append(impl.launches - before)
    # norm (2) + perturb keeping g (1) + GSAM reduction (2) + restore/decompose/SGD (1)
    assert counts == [6, 6]


def test_grads_only_in_one_pass(backend, device):
    """A parameter without a gradient in the first pass gets g_adv unchanged (no g to remove);
    the rest follow the oracle, which applies the same rule."""
    params, ref, opt, oracle = _pair(backend, device, torch.float64, "sgd_momentum_wd")
    land = Landscape(SHAPES, seed=6)
    for o, ps in ((opt, params), (oracle, ref)):
        for t in range(3):
            land.set_grads(ps, skip=(2,) if t == 1 else ())
            o.first_step(zero_grad=True)
            land.set_grads(ps)
            o.second_step(zero_grad=True)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_removed_component_is_orthogonal_to_adversarial_gradient(backend, device, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(17,), (5, 9), (300,)]
    adv = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]
    first = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) + 0.5 * a
             for s, a in zip(shapes, adv)]
    alpha = 0.7
    new = [a.clone() for a in adv]
    impl = fastsam.backends.select_backend(backend, device)
    impl.gsam_decompose([DecomposeGroup(new[:1], first[:1], alpha),
                         DecomposeGroup(new[1:], first[1:], alpha)], eps=1e-12)
    v = [(a - n) / alpha for a, n in zip(adv, new)]  # g_adv - alpha·v = new
    dot = sum(float((x * a).sum()) for x, a in zip(v, adv))
    scale = math.sqrt(sum(float((x * x).sum()) for x in v)) * math.sqrt(
        sum(float((a * a).sum()) for a in adv))
    assert abs(dot) <= 1e-10 * scale
    # and v is g minus its projection on g_adv: <v, g> = |g|^2 - <g, g_adv>^2 / |g_adv|^2
    g_sq = sum(float((f * f).sum()) for f in first)
    inner = sum(float((f * a).sum()) for f, a in zip(first, adv))
    a_sq = sum(float((a * a).sum()) for a in adv)
    v_dot_g = sum(float((x * f).sum()) for x, f in zip(v, first))
    assert math.isclose(v_dot_g, g_sq - inner**2 / a_sq, rel_tol=1e-9)



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gsam_sums_and_along(backend, device, dtype):
    """The three sums sharded parameters all-reduce (fastsam.backends.sharded), against fp64
    sums of the stored values; along from them equals the backend's own along."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(17,), (5, 9), (0, 4), (3000,)]
    adv = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    first = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    impl = fastsam.backends.select_backend(backend, device)
    groups = [DecomposeGroup(adv[:2], first[:2], 0.5), DecomposeGroup(adv[2:], first[2:], 0.5)]
    sums = impl.gsam_sums(groups)
    wide = [(f.double(), a.double()) for f, a in zip(first, adv)]
    expected = [sum(float((f * a).sum()) for f, a in wide),
                sum(float((a * a).sum()) for _, a in wide),
                sum(float((f * f).sum()) for f, _ in wide)]
    assert sums.shape == (3,)
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in zip(sums.tolist(), expected):
        assert math.isclose(got, want, rel_tol=rel, abs_tol=rel * expected[1])
    along = impl.gsam_along(groups, 1e-12)
    torch.testing.assert_close(
        fastsam.functional.gsam_along_from_sums(sums.clone(), 1e-12), along,
        rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


# ----------------------------------------------------------------------------- schedules
def test_proportion_scheduler_follows_the_lr():
    w = torch.nn.Parameter(torch.ones(3))
    base = torch.optim.SGD([w], lr=0.1)
    lr_sched = torch.optim.lr_scheduler.LinearLR(base, 1.0, 0.25, total_iters=4)
    rho = fastsam.ProportionScheduler(lr_sched, max_lr=0.1, min_lr=0.0, max_value=0.2,
                                      min_value=0.05)
    opt = fastsam.GSAM([w], base, None, 0.3, rho)  # official positional construction
    assert opt.rho_t == pytest.approx(0.2)
    seen = []
    for _ in range(5):
        base.step()
        lr_sched.step()
        seen.append(opt.update_rho_t())
    # lr after k scheduler steps: 0.1·(1 - 0.75·min(k, 4)/4); rho = 0.05 + 0.15·lr/0.1
    expected = [0.05 + 0.15 * (1 - 0.75 * min(k, 4) / 4) for k in range(1, 6)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert opt.param_groups[0]["rho"] == pytest.approx(expected[-1])


def test_step_schedules_by_hand():
    lin = fastsam.LinearScheduler(0.1, 0.02, total_steps=4)
    assert [lin.value] + [lin.step() for _ in range(5)] == pytest.approx(
        [0.1, 0.08, 0.06, 0.04, 0.02, 0.02])
    cos = fastsam.CosineScheduler(0.1, 0.0, total_steps=2)
    assert [cos.value] + [cos.step() for _ in range(3)] == pytest.approx([0.1, 0.05, 0.0, 0.0])


def test_schedule_errors():
    with pytest.raises(ValueError, match="total_steps"):
        fastsam.LinearScheduler(0.1, 0.0, total_steps=0)
    base = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(base, 1)
    with pytest.raises(ValueError, match="max_lr > min_lr"):
        fastsam.ProportionScheduler(sched, max_lr=0.1, min_lr=0.2, max_value=1, min_value=0)
    with pytest.raises(TypeError, match="step"):
        fastsam.GSAM(base.param_groups[0]["params"], torch.optim.SGD, rho_scheduler=0.1, lr=0.1)
    with pytest.raises(ValueError, match="disagree"):
        fastsam.GSAM(base.param_groups[0]["params"], torch.optim.SGD, gsam_alpha=0.1, alpha=0.2,
                     lr=0.1)
    with pytest.raises(ValueError, match="alpha"):
        fastsam.GSAM(base.param_groups[0]["params"], torch.optim.SGD, alpha=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="adaptive must be False, True .* or 'agsam'"):
        fastsam.GSAM(base.param_groups[0]["params"], torch.optim.SGD, adaptive="yes", lr=0.1)
    with pytest.raises(ValueError, match="adaptive must be"):
        fastsam.GSAM(base.param_groups[0]["params"], torch.optim.SGD, adaptive=1, lr=0.1)
    with pytest.raises(ValueError, match="gamma"):
        fastsam.GSAM(base.param_groups[0]["params"], torch.optim.SGD, adaptive="agsam",
                     gamma=-0.1, lr=0.1)


# ----------------------------------------------------------------------------- official usage
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16),
                                        torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def test_rmsprop_keeps_its_own_alpha():
    """Groups are shared with the base optimizer: GSAM's alpha must not clobber RMSprop's."""
    opt = fastsam.GSAM([torch.nn.Parameter(torch.ones(2))], torch.optim.RMSprop, alpha=0.3,
                       lr=0.1)
    assert opt.param_groups[0]["alpha"] == 0.99 and opt.param_groups[0]["gsam_alpha"] == 0.3


def test_official_construction_and_set_closure_match_the_two_step_api(backend, device):
    torch.manual_seed(0)
    x, y = torch.randn(32, 6, device=device), torch.randint(0, 3, (32,), device=device)
    model, twin = _Net().to(device), _Net().to(device)
    twin.load_state_dict(model.state_dict())
    loss_fn = torch.nn.CrossEntropyLoss()

    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lr_sched = torch.optim.lr_scheduler.LinearLR(base, 1.0, 0.5, total_iters=10)
    rho = fastsam.ProportionScheduler(lr_sched, 0.1, 0.05, 0.1, 0.05)
    official = fastsam.GSAM(model.parameters(), base, model, 0.3, rho, adaptive=False,
                            perturb_eps=1e-12, backend=backend)

    base2 = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    lr_sched2 = torch.optim.lr_scheduler.LinearLR(base2, 1.0, 0.5, total_iters=10)
    ours = fastsam.GSAM(twin.parameters(), base2, rho=0.1, alpha=0.3, backend=backend)

    losses = []
    for _ in range(8):
        official.set_closure(loss_fn, x, y)
        outputs, loss = official.step()
        assert outputs.shape == (32, 3)
        losses.append(float(loss))
        lr_sched.step()
        official.update_rho_t()

        ours.zero_grad()
        loss_fn(twin(x), y).backward()
        ours.first_step(zero_grad=True)
        with fastsam.frozen_bn_stats(twin):
            loss_fn(twin(x), y).backward()
        ours.second_step()
        lr_sched2.step()
        for g in ours.param_groups:  # the same proportional rule, by hand
            g["rho"] = 0.05 + 0.05 * (lr_sched2.get_last_lr()[0] - 0.05) / 0.05
    assert losses[-1] < losses[0]
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_set_closure_needs_the_model():
    opt = fastsam.GSAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs the model"):
        opt.set_closure(torch.nn.functional.mse_loss, torch.ones(2), torch.ones(2))
    with pytest.raises(RuntimeError, match="rho_scheduler"):
        opt.update_rho_t()
