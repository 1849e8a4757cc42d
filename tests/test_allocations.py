"""A step after warm-up allocates nothing (docs/design.md §7): the host's scalars (an lr
schedule, Adam's step and bias corrections, the SWA/EMA weight, GradScaler's inverse scale)
reach the kernels by value, and what a step needs between steps is kept. Every fused backend
(the `torch` backend's foreach arithmetic makes temporaries by nature), FriendlySAM's
momentum, MSAM's perturbation and max_grad_norm's coefficient included; counted with the
profiler's memory events on the CPU (Triton under its interpreter), with the CUDA allocator's
statistics on a GPU. Steps: the gradients rewritten in place, both passes, the
scheduler's step."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, FUSED
from harness import CONFIGS

import fastsam

SCHEDULES = {
    "constant": None,
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50),
}
OPTIONS = {
    "plain": {},
    "swa": {"average": "swa"},
    "ema": {"average": fastsam.EMA(0.9)},
    "skip_nonfinite": {"skip_nonfinite": True},
    "scaler": {},  # GradScaler's protocol: grad_scale and found_inf set around the step
}
EXTRA = {
    "sam_adamw": lambda ps, **kw: fastsam.SAM(ps, torch.optim.AdamW, lr=1e-2,
                                               weight_decay=0.1, **kw),
    "sam_sgd_plain": lambda ps, **kw: fastsam.SAM(ps, torch.optim.SGD, lr=0.1, **kw),
    "friendlysam_adamw": lambda ps, **kw: fastsam.FriendlySAM(ps, torch.optim.AdamW, lr=1e-2,
                                                               **kw),
    "msam_sgd": lambda ps, **kw: fastsam.MSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    # ESAM: the mask's thresholds a cached constant array, its key passed by value
    "esam_sgd": lambda ps, **kw: fastsam.ESAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                              beta=0.5, seed=1, **kw),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).to(DEVICE)


def _grads(model, scale):
    return [torch.randn_like(p) * scale for p in model.parameters()]


def _step_fn(model, opt, schedule, scaled):
    """One whole step over fixed gradients, written into .grad in place."""
    first, second = _grads(model, 1.0), _grads(model, 1.1)
    scale = torch.full((), 4.0, device=DEVICE)
    found = torch.zeros((), device=DEVICE)

    def write(grads):
        for p, g in zip(model.parameters(), grads):
            p.grad.copy_(g)

    def protocol(on):
        if on:
            opt.grad_scale, opt.found_inf = scale, found
        else:
            for name in ("grad_scale", "found_inf"):
                opt.__dict__.pop(name, None)

    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def step():
        write(first)
        if isinstance(opt, (fastsam.FreeSAM, fastsam.MSAM)):  # one pass
            protocol(scaled)
            opt.step()
            protocol(False)
        elif isinstance(opt, fastsam.FriendlySAM):  # told the loss scale under the scaler
            opt.first_step(grad_scale=4.0 if scaled else None)
            write(second)
            protocol(scaled)
            opt.second_step()
            protocol(False)
        elif opt.first_step() is not False:
            write(second)
            protocol(scaled)
            opt.second_step()
            protocol(False)
        if schedule is not None:
            schedule.step()

    return step


def _cpu_allocations(step) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return [e.name for e in prof.events()
            if e.self_cpu_memory_usage > 0 and e.name != "[memory]"]


def _cuda_allocations(step) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    step()
    torch.cuda.synchronize()
    return torch.cuda.memory_stats()["allocation.all.allocated"] - before


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("config", sorted({**CONFIGS, **EXTRA}))
def test_a_step_after_warm_up_allocates_nothing(backend, schedule, option, config):
    _assert_allocates_nothing(backend, schedule, OPTIONS[option], option == "scaler", config)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config", sorted({**CONFIGS, **EXTRA}))
def test_clipping_allocates_nothing(backend, config):
    """max_grad_norm's coefficient and its operands are kept between steps."""
    _assert_allocates_nothing(backend, "cosine", {"max_grad_norm": 0.1}, False, config)


# WSAM's decoupled form (it takes no averaging): its term is one native pass after the update
DECOUPLED = {
    "wsam_decoupled_sgd": lambda ps, **kw: fastsam.WSAM(ps, torch.optim.SGD, rho=0.1, gamma=0.8,
                                                        lr=0.05, momentum=0.9, **kw),
    "wsam_decoupled_adamw": lambda ps, **kw: fastsam.WSAM(ps, torch.optim.AdamW, rho=0.1,
                                                          gamma=0.8, lr=1e-2, **kw),
}
DECOUPLED_OPTIONS = {"plain": {}, "max_grad_norm": {"max_grad_norm": 0.1},
                     "skip_nonfinite": {"skip_nonfinite": True}}


@pytest.mark.parametrize("backend", [b for b in FUSED if b != "triton"])
@pytest.mark.parametrize("option", sorted(DECOUPLED_OPTIONS))
@pytest.mark.parametrize("config", sorted(DECOUPLED))
def test_wsam_decoupled_allocates_nothing(backend, option, config):
    """The native backends' wsam_decoupled pass reads max_grad_norm's coefficient on the device
    (torch's foreach form, the triton backend's, multiplies g_adv by it into a temporary)."""
    _assert_allocates_nothing(backend, "cosine", DECOUPLED_OPTIONS[option], False, config)


def _assert_allocates_nothing(backend, schedule, options, scaled, config):
    make = {**CONFIGS, **EXTRA, **DECOUPLED}[config]
    model = _model()
    opt = make(list(model.parameters()), backend=backend, **options)
    scheduler = SCHEDULES[schedule]
    step = _step_fn(model, opt, scheduler(opt) if scheduler else None, scaled)
    is_looksam = isinstance(opt, fastsam.LookSAM)
    for _ in range(4):  # warm-up: state, buffers, plans and tables made
        step()
    counted = []
    for _ in range(4):
        sam_step = is_looksam and opt.sam_step_next
        found = _cpu_allocations(step) if DEVICE.type == "cpu" else _cuda_allocations(step)
        if not sam_step:  # LookSAM's SAM steps form u_v with temporaries (docs/variants.md)
            counted.append(found)
    assert all(not c for c in counted), counted
