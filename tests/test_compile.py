"""torch.compile of the optimizer's steps themselves, ``fullgraph=True`` (no graph break
anywhere in ``first_step`` and ``second_step``, or in the one-pass optimizers' ``step``): with a
tensor lr under a cosine schedule (and ``capturable=True`` where the optimizer takes it), 20
steps equal the eager ones, and after the warm-up nothing is compiled again
(``torch.compiler.set_stance("fail_on_recompile")``). The ``cpu`` backend's native operators
and the ``torch`` backend's foreach arithmetic are traced (docs/training.md)."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, NATIVE

import fastsam

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(DEVICE.type != "cpu", reason="the GPU backends are compiled on a GPU"),
]
# Two eager steps (a SAM step and, for interval SAM and LookSAM, a step between), then compiled
# ones; from step 6 on nothing compiles again (interval SAM's and LookSAM's step count is
# specialised by the first compiled steps, then made symbolic by torch.compile's automatic
# dynamic: one graph per kind of step).
STEPS, WARM_UP, COMPILED_AT = 20, 2, 6
CONFIGS = {
    "sam_sgd": lambda ps, **kw: fastsam.SAM(ps, torch.optim.SGD, rho=0.05,
                                            lr=torch.tensor(0.1), momentum=0.9, **kw),
    "gsam_adamw": lambda ps, **kw: fastsam.GSAM(ps, torch.optim.AdamW, rho=0.05, alpha=0.3,
                                                lr=torch.tensor(1e-2), weight_decay=0.1, **kw),
    "sam_interval_adam": lambda ps, **kw: fastsam.SAM(ps, torch.optim.Adam, rho=0.05, interval=2,
                                                      lr=torch.tensor(1e-2), **kw),
    "looksam_sgd": lambda ps, **kw: fastsam.LookSAM(ps, torch.optim.SGD, rho=0.05, k=2,
                                                    alpha=0.5, lr=torch.tensor(0.1),
                                                    momentum=0.9, **kw),
    "wsam_clip_ema": lambda ps, **kw: fastsam.WSAM(
        ps, torch.optim.SGD, rho=0.05, gamma=0.8, decouple=False, lr=torch.tensor(0.1),
        momentum=0.9, max_grad_norm=0.1, average="ema", **kw),
    "freesam_sgd": lambda ps, **kw: fastsam.FreeSAM(ps, torch.optim.SGD, lr=torch.tensor(0.1),
                                                    momentum=0.9, **kw),
    "msam_adamw": lambda ps, **kw: fastsam.MSAM(ps, torch.optim.AdamW, rho=0.05,
                                                lr=torch.tensor(1e-2), weight_decay=0.1, **kw),
    "friendlysam_sgd": lambda ps, **kw: fastsam.FriendlySAM(
        ps, torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9, lr=torch.tensor(0.1),
        momentum=0.9, **{**kw, "capturable": False}),  # (FriendlySAM takes no capturable)
}
ONE_PASS = {"freesam_sgd", "msam_adamw"}  # step() after one forward/backward pass
BACKENDS = ["torch"] + [b for b in NATIVE if b == "cpu"]


def _run(name, backend, compiled):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = CONFIGS[name](model.parameters(), backend=backend, capturable=True)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    # Compiled before the scheduler is made: an lr scheduler replaces ``opt.step`` by a wrapper
    # of its own, which torch.compile does not trace (as for any torch.optim optimizer).
    one_pass = opt.step
    first, second = opt.first_step, opt.second_step
    if compiled:
        one_pass = torch.compile(opt.step, fullgraph=True)
        first = torch.compile(opt.first_step, fullgraph=True)
        second = torch.compile(opt.second_step, fullgraph=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    try:
        for t in range(STEPS):
            if compiled and t == COMPILED_AT:
                torch.compiler.set_stance("fail_on_recompile")
            eager = t < WARM_UP  # the plan, state and buffers are made by an eager step
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if name in ONE_PASS:
                (opt.step if eager else one_pass)()
                opt.zero_grad(set_to_none=False)
                schedule.step()
                continue
            sam_step = (opt.first_step if eager else first)()
            opt.zero_grad(set_to_none=False)
            if sam_step is not False:  # (a step between SAM steps is whole after first_step)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                (opt.second_step if eager else second)()
                opt.zero_grad(set_to_none=False)
            schedule.step()
    finally:
        torch.compiler.set_stance("default")
    return model, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_steps_equal_eager_without_recompiling(name, backend):
    torch._dynamo.reset()
    (eager, eager_opt), (compiled, compiled_opt) = (_run(name, backend, False),
                                                    _run(name, backend, True))
    # The torch backend's compiled step is Inductor's own code (its vectorised reductions, its
    # order of operations): it rounds otherwise than eager torch, 1.07e-7 apart after 20
    # LookSAM steps on one CI machine (an AVX2 AMD EPYC). The native ops are the same kernels
    # compiled or not.
    tol = dict(rtol=1e-5, atol=1e-6) if backend == "torch" else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, **tol)
    assert compiled_opt.state_dict()["param_groups"][0]["fastsam_counters"] == (
        eager_opt.state_dict()["param_groups"][0]["fastsam_counters"])
    saved, loaded = eager_opt.state_dict()["state"], compiled_opt.state_dict()["state"]
    assert saved.keys() == loaded.keys() and saved
    for index, entries in saved.items():  # the base optimizer's state and the variant's own
        assert entries.keys() == loaded[index].keys()  # (MSAM's w, FreeSAM's g, ...)
        for key, value in entries.items():  # (LookSAM's direction is a difference of near
            scale = float(value.abs().max())  # vectors: its error is relative to its scale)
            torch.testing.assert_close(loaded[index][key], value, rtol=1e-5, atol=1e-5 * scale,
                                       msg=key)
    if "ema" in name:
        with eager_opt.averaged_weights(), compiled_opt.averaged_weights():
            for a, b in zip(eager.parameters(), compiled.parameters()):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_a_compiled_step_needs_an_eager_one_first():
    """The plan (which parameters step, their buffers, launch tables) is made from addresses,
    which a traced step cannot read: a compiled first step without an eager one before it is
    refused with what to do."""
    torch._dynamo.reset()
    model = torch.nn.Linear(3, 2)
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    model(torch.randn(4, 3)).square().mean().backward()
    with pytest.raises(Exception, match="take one step without torch.compile first"):
        torch.compile(opt.first_step, fullgraph=True)()


def _aesam_run(compiled):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = fastsam.AESAM(model.parameters(), torch.optim.SGD, lr=torch.tensor(0.1), momentum=0.9,
                        total_steps=12, lambda1=1.0, lambda2=1.0, backend=BACKENDS[-1])
    first, second = opt.first_step, opt.second_step
    if compiled:
        first = torch.compile(opt.first_step)  # (a graph break at the decision's host read)
        second = torch.compile(opt.second_step, fullgraph=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 12)
    gen = torch.Generator().manual_seed(1)
    decisions = []
    for t in range(12):
        x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        sam = (opt.first_step if t < WARM_UP else first)()
        decisions.append(sam)
        opt.zero_grad(set_to_none=False)
        if sam:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            (opt.second_step if t < WARM_UP else second)()
            opt.zero_grad(set_to_none=False)
        schedule.step()
    return model, opt, decisions


def test_aesam_compiles_with_a_graph_break_at_its_decision():
    """AE-SAM's first step branches on ‖g‖² read on the host: it compiles with a graph break
    there (not fullgraph); its second step compiles whole. Both kinds of step taken compiled,
    the same decisions, weights and statistics as eager."""
    torch._dynamo.reset()
    (eager, eager_opt, eager_kinds), (compiled, compiled_opt, kinds) = (_aesam_run(False),
                                                                        _aesam_run(True))
    assert kinds == eager_kinds
    assert True in kinds[WARM_UP:] and False in kinds[WARM_UP:], kinds
    assert compiled_opt.statistics == eager_opt.statistics
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
