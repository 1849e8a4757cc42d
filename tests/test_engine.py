"""The engine's cross-cutting behaviour, written once and run for every optimizer of
harness.CONFIGS (SAM with nesterov or dampening, ASAM + amsgrad Adam, GSAM + AdamW, FreeSAM,
LookSAM), every option that adds state (weight averaging, skip_nonfinite with a skipped step,
capturable) and every backend:

- a checkpoint (torch.save / torch.load(weights_only=True)) continues bit for bit: weights,
  the whole state dict (base state, averages, FreeSAM's gradients, LookSAM's direction) and the
  counters of a fresh optimizer loaded from it equal the uninterrupted run's;
- with a fused base update the base optimizer's own step() never runs.
"""
import io

import pytest
import torch
from harness import CONFIGS, small_data, small_model, step

import fastsam

OPTIONS = {
    "plain": {},
    "ema": dict(average=fastsam.EMA(decay=0.7, start=1)),
    "skip_nonfinite": dict(skip_nonfinite=True),
    "capturable_swa": dict(capturable=True, skip_nonfinite=True, average="swa"),
}
SAVED_AT, STEPS = 4, 7  # LookSAM (k = 2) saves after a look-ahead step
POISONED = {"skip_nonfinite": (2, 5), "capturable_swa": (2, 5)}  # skipped updates


def _train(model, opt, x, y, steps, poisoned):
    for t in steps:
        step(model, opt, x, y, None, t in poisoned, (False, False))


def _assert_same_state(a, b):
    """Two state dicts hold the same tensors bit for bit, and the same groups (counters too)."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, entry in a["state"].items():
        assert entry.keys() == b["state"][i].keys(), i
        for key, value in entry.items():
            other = b["state"][i][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_continues_bit_identically(backend, name, option):
    x, y = small_data()
    poisoned = POISONED.get(option, ())
    model = small_model()
    opt = CONFIGS[name](model.parameters(), backend=backend, **OPTIONS[option])
    _train(model, opt, x, y, range(SAVED_AT), poisoned)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = small_model()
    resumed.load_state_dict(model.state_dict())
    _train(model, opt, x, y, range(SAVED_AT, STEPS), poisoned)

    buffer.seek(0)
    fresh = CONFIGS[name](resumed.parameters(), backend=backend, **OPTIONS[option])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    _train(resumed, fresh, x, y, range(SAVED_AT, STEPS), poisoned)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(opt.state_dict(), fresh.state_dict())
    assert fresh.nonfinite_skipped_steps == len(poisoned)
    if "average" in OPTIONS[option]:
        assert fresh.n_averaged > 0
        with opt.averaged_weights(), fresh.averaged_weights():
            assert all(torch.equal(p, q)
                       for p, q in zip(model.parameters(), resumed.parameters()))


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_base_update_never_runs_the_base_step(backend, name, option):
    """Every configuration's base (SGD, Adam, AdamW) is fused: its step() is never called, in
    two-pass, one-pass and look-ahead steps, with averaging and skipped steps."""
    x, y = small_data()
    model = small_model()
    opt = CONFIGS[name](model.parameters(), backend=backend, **OPTIONS[option])

    def refuse():
        raise AssertionError("the unfused base step ran")

    opt.base_optimizer.step = refuse
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, x, y, range(4), POISONED.get(option, ()))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    if "average" in OPTIONS[option]:  # the averages written by the fused pass, every parameter
        assert opt.n_averaged > 0
        assert len(opt._averager.averaged) == len(list(model.parameters()))
