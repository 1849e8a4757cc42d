"""Accelerate: a fastsam optimizer through accelerator.prepare (fastsam.unwrap, the documented
two-pass loop) and fastsam.integrations.accelerate.sam_step (accumulation over the same
micro-batches, the GradScaler, clipping), against the hand-written loop of tests/trainers.py."""
from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
from trainers import (  # noqa: E402
    MODELS,
    SchedulerRule,
    bn_data,
    collate,
    max_difference,
    model_loss,
    two_pass_loop,
)

import fastsam  # noqa: E402
from fastsam.integrations.accelerate import sam_step  # noqa: E402

BATCH, STEPS = 8, 4
OPTIMIZERS = {
    "sam_sgd": lambda ps: fastsam.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "gsam_adamw": lambda ps: fastsam.GSAM(ps, torch.optim.AdamW, rho=0.05, alpha=0.3, lr=1e-3),
    "looksam_sgd": lambda ps: fastsam.LookSAM(ps, torch.optim.SGD, rho=0.05, k=2, lr=0.1),
    "freesam_sgd": lambda ps: fastsam.FreeSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
    "friendlysam_sgd": lambda ps: fastsam.FriendlySAM(ps, torch.optim.SGD, rho=0.05, lmbda=0.6,
                                                      lr=0.1, momentum=0.9),
    "msam_sgd": lambda ps: fastsam.MSAM(ps, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
    "aesam_sgd": lambda ps: fastsam.AESAM(ps, torch.optim.SGD, rho=0.05, total_steps=STEPS,
                                          lambda1=2.5, lambda2=2.5, lr=0.1, momentum=0.9),
    "esam_sgd": lambda ps: fastsam.ESAM(ps, torch.optim.SGD, rho=0.05, beta=0.5, seed=3, lr=0.1,
                                        momentum=0.9),
}


@pytest.fixture
def fresh_state():
    """Accelerate keeps its state in process-wide singletons: each test starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def step_batches(items, size=BATCH):
    return [collate(items[i * size:(i + 1) * size]) for i in range(len(items) // size)]


def reference(name, kind, items, **loop_kwargs):
    model = MODELS[name][0]()
    opt = OPTIMIZERS[kind](model.parameters())
    two_pass_loop(model, opt, step_batches(items), **loop_kwargs)
    return model, opt


def test_the_documented_loop(fresh_state):
    """accelerator.prepare's optimizer has no first_step; fastsam.unwrap reaches it."""
    accelerator = accelerate.Accelerator(cpu=True)
    items = bn_data(BATCH * STEPS)
    model = MODELS["bn"][0]()
    optimizer = OPTIMIZERS["sam_sgd"](model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    assert not hasattr(optimizer, "first_step")
    sam = fastsam.unwrap(optimizer)
    for batch in step_batches(items):
        accelerator.backward(model_loss(model, batch))
        sam.first_step(zero_grad=True)
        with fastsam.frozen_bn_stats(model):
            accelerator.backward(model_loss(model, batch))
        optimizer.step()
        optimizer.zero_grad()
    expected, _ = reference("bn", "sam_sgd", items)
    assert max_difference(model, expected) < 1e-6
    for a, b in zip(model.buffers(), expected.buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_sam_step_equals_the_loop(fresh_state, kind):
    accelerator = accelerate.Accelerator(cpu=True)
    items = bn_data(BATCH * STEPS)
    model = MODELS["bn"][0]()
    model, optimizer = accelerator.prepare(model, OPTIMIZERS[kind](model.parameters()))
    losses = [sam_step(accelerator, model, optimizer, [batch], model_loss)
              for batch in step_batches(items)]
    expected, _ = reference("bn", kind, items)
    assert max_difference(model, expected) < 1e-6
    reference_model = MODELS["bn"][0]()
    first = model_loss(reference_model, step_batches(items)[0]).item()
    assert losses[0].item() == pytest.approx(first, rel=1e-6)  # the first pass's loss


@pytest.mark.parametrize("configured", [1, 4])
def test_sam_step_accumulation_equals_one_large_batch(fresh_state, configured):
    """4 micro-batches of 2 in both passes make the step one batch of 8 makes, whatever the
    accelerator's gradient_accumulation_steps."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=configured)
    items = bn_data(BATCH * STEPS)
    model = MODELS["mlp"][0]()
    model, optimizer = accelerator.prepare(model, OPTIMIZERS["sam_sgd"](model.parameters()))
    for i in range(STEPS):
        micro = step_batches(items[i * BATCH:(i + 1) * BATCH], size=2)
        sam_step(accelerator, model, optimizer, micro, model_loss)
    expected, _ = reference("mlp", "sam_sgd", items)
    assert max_difference(model, expected) < 1e-6


def test_sam_step_clips_the_second_pass(fresh_state):
    accelerator = accelerate.Accelerator(cpu=True)
    items = bn_data(BATCH * STEPS)
    model = MODELS["bn"][0]()
    model, optimizer = accelerator.prepare(model, OPTIMIZERS["gsam_adamw"](model.parameters()))
    for batch in step_batches(items):
        sam_step(accelerator, model, optimizer, [batch], model_loss, max_grad_norm=0.05)
    expected, _ = reference("bn", "gsam_adamw", items, max_grad_norm=0.05)
    assert max_difference(model, expected) < 1e-6
    unclipped, _ = reference("bn", "gsam_adamw", items)
    assert max_difference(model, unclipped) > 1e-5


@pytest.mark.parametrize("kind", ["sam_sgd", "friendlysam_sgd"])
def test_sam_step_under_the_grad_scaler(fresh_state, kind):
    """Accelerate's fp16 path (a GradScaler in the prepared optimizer's step) rehearsed on CPU:
    a batch holding an inf is skipped with the weights restored, the scaler backs off, and an
    AcceleratedScheduler keeps its lr on the skipped step. FriendlySAM is told the loss scale
    (its momentum is unscaled)."""
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    items = bn_data(BATCH * STEPS, bad=BATCH + 3)
    model = MODELS["bn"][0]()
    optimizer = OPTIMIZERS[kind](model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    for batch in step_batches(items):
        sam_step(accelerator, model, optimizer, [batch], model_loss)
        schedule.step()
    expected = MODELS["bn"][0]()
    ref_opt = OPTIMIZERS[kind](expected.parameters())
    rule = SchedulerRule(ref_opt, torch.optim.lr_scheduler.LambdaLR(ref_opt,
                                                                     lambda s: 1.0 / (1 + s)))
    two_pass_loop(expected, ref_opt, step_batches(items), scheduler=rule,
                  scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    assert fastsam.unwrap(optimizer).amp_skipped_steps == ref_opt.amp_skipped_steps == 1
    assert max_difference(model, expected) < 1e-6
    assert schedule.scheduler.last_epoch == STEPS - 1
    assert accelerator.scaler.get_scale() == 2.0**15


def test_sam_step_refuses_misuse(fresh_state):
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = MODELS["bn"][0]()
    model, optimizer = accelerator.prepare(model, OPTIMIZERS["sam_sgd"](model.parameters()))
    batch = step_batches(bn_data(BATCH))[0]
    with pytest.raises(ValueError, match="at least one"):
        sam_step(accelerator, model, optimizer, [], model_loss)
    with accelerator.accumulate(model):  # the first of 2 micro-batches: no sync
        with pytest.raises(RuntimeError, match="accumulate"):
            sam_step(accelerator, model, optimizer, [batch], model_loss)
    plain = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="AcceleratedOptimizer around SGD"):
        fastsam.unwrap(plain)
