"""The public API: errors at the boundary, state_dict, base optimizer instances, groups, the
closure step on a real model, the BatchNorm helper and backend selection."""
import math
import os

import pytest
import torch
from harness import SHAPES, Landscape, clone_params, drive, make_params

import fastsam


def _sgd_sam(params, backend="torch", **kw):
    return fastsam.SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, **kw)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("rho", [-0.1, math.nan, math.inf])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        _sgd_sam([torch.nn.Parameter(torch.ones(2))], rho=rho)


def test_bad_rho_in_a_group():
    groups = [{"params": [torch.nn.Parameter(torch.ones(2))], "rho": -1.0}]
    with pytest.raises(ValueError, match="rho"):
        _sgd_sam(groups)


@pytest.mark.parametrize("p", [1, 0.5, -2, math.nan])
def test_bad_p(p):
    with pytest.raises(ValueError, match="p must be > 1"):
        _sgd_sam([torch.nn.Parameter(torch.ones(2))], p=p)


def test_bad_p_type():
    with pytest.raises(TypeError, match="p must be a number"):
        _sgd_sam([torch.nn.Parameter(torch.ones(2))], p="2")


@pytest.mark.parametrize("eta", [-0.01, math.nan])
def test_bad_eta(eta):
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        fastsam.ASAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, eta=eta, lr=0.1)


def test_bad_normalization():
    with pytest.raises(ValueError, match="normalization must be one of"):
        fastsam.ASAM(
            [torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, normalization="layer", lr=0.1
        )


def test_bad_base_optimizer():
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer"):
        fastsam.SAM([torch.nn.Parameter(torch.ones(2))], "sgd", lr=0.1)


def test_base_kwargs_with_instance():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="only accepted with an optimizer class"):
        fastsam.SAM([p], torch.optim.SGD([p], lr=0.1), lr=0.2)


def test_base_instance_over_other_params():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="exactly the same parameters"):
        fastsam.SAM([a], torch.optim.SGD([a, b], lr=0.1))
    with pytest.raises(ValueError, match="exactly the same parameters"):
        fastsam.SAM([a, b], torch.optim.SGD([a], lr=0.1))


def test_sparse_gradient_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = _sgd_sam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.first_step()


def test_phase_errors():
    p = torch.nn.Parameter(torch.ones(3))
    opt = _sgd_sam([p])
    with pytest.raises(RuntimeError, match="no first_step\\(\\) is pending"):
        opt.step()
    with pytest.raises(RuntimeError, match="second_step\\(\\) was called without"):
        opt.second_step()
    p.grad = torch.ones(3)
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step\\(\\) was called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="while a first_step\\(\\) is pending"):
        opt.step(lambda: 0.0)
    with pytest.raises(RuntimeError, match="between first_step\\(\\) and second_step\\(\\)"):
        opt.state_dict()
    opt.second_step()
    opt.state_dict()


def test_unknown_backend_lists_every_backend():
    with pytest.raises(RuntimeError) as info:
        _sgd_sam([torch.nn.Parameter(torch.ones(2))], backend="nope")
    text = str(info.value)
    assert "'nope'" in text and "torch: available" in text and "triton:" in text


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FASTSAM_BACKEND", "nope")
    with pytest.raises(RuntimeError, match="FASTSAM_BACKEND='nope'"):
        fastsam.SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1)
    monkeypatch.setenv("FASTSAM_BACKEND", "torch")
    opt = fastsam.SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1)
    assert opt.backend == "torch"


def test_automatic_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTSAM_BACKEND", raising=False)
    opt = fastsam.SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1)
    assert opt.backend == ("torch" if os.environ.get("FASTSAM_SKIP_BUILD") == "1" else "cpu")


def test_state_dict_keeps_base_state_and_moves_to_torch_optim():
    """The popular implementation loses momentum on save; fastsam's state_dict is the base
    optimizer's own, loadable by torch.optim.SGD and back."""
    land = Landscape(SHAPES)
    params = make_params(SHAPES, torch.float32, "cpu")
    opt = _sgd_sam(params, rho=0.07)
    drive(opt, params, land, 2)
    sd = opt.state_dict()
    assert len(sd["state"]) == sum(1 for _ in params)
    assert all("momentum_buffer" in s for s in sd["state"].values())
    assert sd["param_groups"][0]["rho"] == 0.07

    plain = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    plain.load_state_dict(sd)
    moved = plain.state[params[2]]["momentum_buffer"]
    assert torch.equal(moved, opt.state[params[2]]["momentum_buffer"])

    again = _sgd_sam(params, rho=0.3)
    again.load_state_dict(plain.state_dict())  # rho survives through torch.optim's groups
    assert again.param_groups[0]["rho"] == 0.07
    assert again.param_groups is again.base_optimizer.param_groups
    assert again.state is again.base_optimizer.state


@pytest.mark.parametrize("saved_with,loaded_into,guess", [
    (torch.optim.Adam, torch.optim.SGD, "Adam"),
    (torch.optim.SGD, torch.optim.AdamW, "SGD"),
    (torch.optim.RMSprop, torch.optim.SGD, "RMSprop"),
])
def test_state_dict_of_another_base_optimizer_is_refused_before_loading(
    saved_with, loaded_into, guess
):
    """A checkpoint saved with another base optimizer (an Adam state dict into SAM over SGD:
    the first step after it would die with KeyError 'momentum') is refused with both names,
    and nothing of the live optimizer changes. Adam into AdamW (the same layout) loads."""
    land = Landscape(SHAPES[:3], seed=2)
    params = make_params(SHAPES[:3], torch.float32, "cpu", seed=3)
    theirs = fastsam.SAM(clone_params(params), saved_with, lr=0.01)
    drive(theirs, theirs.param_groups[0]["params"], land, 2)
    ours = fastsam.SAM(params, loaded_into, lr=0.01)
    drive(ours, params, land, 2)
    before = ours.state_dict()
    for saved in (theirs.state_dict(), theirs.base_optimizer.state_dict()):
        with pytest.raises(ValueError, match=rf"saved from another base optimizer.*"
                                             rf"{loaded_into.__name__}.*\({'as ' + guess}"):
            ours.load_state_dict(saved)
    after = ours.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, entry in before["state"].items():
        assert all(torch.equal(v, after["state"][i][k]) for k, v in entry.items())
    adamw = fastsam.SAM(clone_params(params), torch.optim.AdamW, lr=0.01)
    adam = fastsam.SAM(clone_params(params), torch.optim.Adam, lr=0.01)
    drive(adam, adam.param_groups[0]["params"], land, 1)
    adamw.load_state_dict(adam.state_dict())
    assert adamw.state_dict()["state"].keys() == adam.state_dict()["state"].keys()


def test_groups_and_state_are_shared_with_base():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = fastsam.SAM([a], torch.optim.SGD, rho=0.2, lr=0.1)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    opt.add_param_group({"params": [b], "lr": 0.01})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["lr"] == 0.01
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "rho": math.nan})


def test_base_optimizer_instance(device):
    """An already-built base optimizer (with its own groups) is used as is; SAM options are
    added to its groups from the groups given to fastsam."""
    params = make_params(SHAPES, torch.float64, device)
    ref = clone_params(params)
    base = torch.optim.SGD(
        [{"params": params[:3], "lr": 0.05}, {"params": params[3:], "lr": 0.02}], momentum=0.9
    )
    opt = fastsam.SAM([{"params": params[:3], "rho": 0.1}, {"params": params[3:]}], base, rho=0.05)
    assert [g["rho"] for g in opt.param_groups] == [0.1, 0.05]
    cls_built = fastsam.SAM(
        [{"params": ref[:3], "lr": 0.05, "rho": 0.1}, {"params": ref[3:], "lr": 0.02}],
        torch.optim.SGD, rho=0.05, momentum=0.9,
    )
    land = Landscape(SHAPES)
    drive(opt, params, land, 3)
    drive(cls_built, ref, land, 3)
    for p, r in zip(params, ref):
        assert torch.equal(p, r)


# ----------------------------------------------------------------------------- training
class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_closure_training_reduces_loss_and_equals_two_step_api(backend, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # bitwise-comparable runs
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8, device=device)
    y = (x.mean(dim=(2, 3)) @ torch.randn(3, 4, device=device)).argmax(dim=1)  # learnable
    model = SmallNet().to(device)
    twin = SmallNet().to(device)
    twin.load_state_dict(model.state_dict())
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                      backend=backend)
    opt2 = fastsam.SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                       backend=backend)

    def closure():
        with fastsam.frozen_bn_stats(model):
            loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step(closure)

        opt2.zero_grad()
        loss_fn(twin(x), y).backward()
        opt2.first_step(zero_grad=True)
        with fastsam.frozen_bn_stats(twin):
            loss_fn(twin(x), y).backward()
        opt2.step()  # no closure right after first_step: the second step
    assert losses[-1] < 0.85 * losses[0], losses
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_frozen_bn_stats():
    model = SmallNet()
    model.train()
    x = torch.randn(4, 3, 8, 8)
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    expected = model.bn(model.conv(x))  # training mode: batch statistics (and one update)
    model.bn.load_state_dict(before)
    with fastsam.frozen_bn_stats(model):
        got = model.bn(model.conv(x))
    torch.testing.assert_close(got, expected)
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.bn.track_running_stats
    model.bn(model.conv(x))
    assert int(model.bn.num_batches_tracked) == 1


def test_asam_param_groups():
    model = SmallNet()
    groups = fastsam.asam_param_groups(model, lr=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["adaptive"] for g in groups] == [True, False]
    assert all("weight" in names[id(p)] for p in groups[0]["params"])
    assert all("weight" not in names[id(p)] for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = fastsam.ASAM(groups, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.1


def test_zero_size_and_gradless_only():
    """Nothing to perturb: steps are no-ops on weights and do not fail."""
    empty = torch.nn.Parameter(torch.ones(0))
    silent = torch.nn.Parameter(torch.ones(3))
    opt = _sgd_sam([empty, silent])
    empty.grad = torch.ones(0)
    opt.first_step()
    opt.second_step()
    assert torch.equal(silent, torch.ones(3))


@pytest.mark.parametrize("attach_to", ["sam", "base"])
def test_lr_scheduler_sees_the_fused_step(attach_to, recwarn):
    w = torch.nn.Parameter(torch.ones(3))
    opt = fastsam.SAM([w], torch.optim.SGD, lr=0.1, momentum=0.9)
    target = opt if attach_to == "sam" else opt.base_optimizer
    sched = torch.optim.lr_scheduler.StepLR(target, step_size=1, gamma=0.5)
    for _ in range(2):
        w.grad = torch.ones(3)
        opt.first_step()
        w.grad = torch.ones(3)
        opt.second_step()  # fused SGD: base_optimizer.step() is never called
        sched.step()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("normalization", ["element", "filter"])
def test_scaled_group_without_gradients(backend, device, normalization):
    """An ASAM group that is empty, or whose parameters have no gradient this step, next to a
    plain group (found by the benchmark: the torch backend failed on it)."""
    gen = torch.Generator().manual_seed(0)
    plain = [torch.nn.Parameter(torch.randn(5, generator=gen).to(device)) for _ in range(2)]
    scaled = torch.nn.Parameter(torch.randn(3, 4, generator=gen).to(device))
    opt = fastsam.ASAM(
        [{"params": []}, {"params": [scaled]}, {"params": plain, "adaptive": False}],
        torch.optim.SGD, rho=0.5, normalization=normalization, backend=backend, lr=0.1,
    )
    ref = [p.detach().clone() for p in plain]
    for _ in range(2):
        grads = [torch.randn(5, generator=gen).to(device) for _ in plain]
        for p, g in zip(plain, grads):
            p.grad = g
        opt.first_step()
        norm = torch.stack([g.norm() for g in grads]).norm()
        for p, g, r in zip(plain, grads, ref):  # perturbed by the plain group's norm only
            torch.testing.assert_close(p.detach(), r + 0.5 * g / norm)
        opt.second_step(zero_grad=True)
        ref = [r - 0.1 * g for r, g in zip(ref, grads)]
    for p, r in zip(plain, ref):
        torch.testing.assert_close(p.detach(), r)


def test_step_methods_leave_grad_mode_as_they_found_it():
    """The step methods run without grad (fastsam.optimizers._core.without_grad) and give the
    mode back: on when it was on (also when the step raises), off when it was off."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = fastsam.SAM([p], torch.optim.SGD, lr=0.1, backend="torch")
    seen = []
    original = opt._perturb

    def perturb(zero_grad):
        seen.append(torch.is_grad_enabled())
        return original(zero_grad)

    opt._perturb = perturb
    for enabled in (True, False):
        with torch.set_grad_enabled(enabled):
            p.grad = torch.ones(3)
            opt.first_step()
            assert torch.is_grad_enabled() is enabled
            opt.second_step()
            assert torch.is_grad_enabled() is enabled
            with pytest.raises(RuntimeError, match="without a pending first_step"):
                opt.second_step()
            assert torch.is_grad_enabled() is enabled
    assert seen == [False, False]
