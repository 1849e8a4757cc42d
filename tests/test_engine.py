"""The engine's cross-cutting behaviour, written once and run for every optimizer of
harness.CONFIGS (SAM with nesterov or dampening, ASAM + amsgrad Adam, GSAM + AdamW, FreeSAM,
LookSAM), every option that adds state (weight averaging, skip_nonfinite with a skipped step,
capturable) and every backend:

- a checkpoint (torch.save / torch.load(weights_only=True)) continues bit for bit: weights,
  the whole state dict (base state, averages, FreeSAM's gradients, LookSAM's direction) and the
  counters of a fresh optimizer loaded from it equal the uninterrupted run's;
- an update whose gradient holds inf/NaN (GradScaler's found_inf, or skip_nonfinite's check;
  decided on the host or, with capturable, on the device) changes nothing but its counter, and
  the run goes on as the run without that step;
- with a fused base update the base optimizer's own step() never runs.
"""
import io
import math

import pytest
import torch
from conftest import DEVICE
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


# (source of the skip, the pass whose gradient holds the bad value, the value). Under a
# GradScaler an inf in the first pass skips only the perturbation (test_amp.py).
SKIPS = [("scaler", "update", math.inf), ("skip_nonfinite", "update", math.nan),
         ("skip_nonfinite", "first", -math.inf)]
SKIPPED_AT = (1, 2)  # a look-ahead and a SAM step of LookSAM (k = 2)


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items()}
             for i, entry in opt.state_dict()["state"].items()})


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    _assert_same_state({"param_groups": [], "state": a[1]}, {"param_groups": [], "state": b[1]})


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("source,where,value", SKIPS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_skipped_update_changes_nothing(backend, name, source, where, value, capturable):
    """The weights, the whole state (base state, EMA averages, FreeSAM's gradients, LookSAM's
    direction) stay bit for bit as before a skipped update, the skip is counted (and the scaler
    backs off), and every later step is that of the run without the skipped steps (LookSAM's
    step count, which decides SAM and look-ahead steps, counts skipped steps too: the reference
    run's count is advanced past them)."""
    x, y = small_data()
    kw = dict(capturable=capturable, skip_nonfinite=source == "skip_nonfinite",
              average=fastsam.EMA(decay=0.7))

    def make(model):
        opt = CONFIGS[name](model.parameters(), backend=backend, **kw)
        scaler = (torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
                  if source == "scaler" else None)
        return opt, scaler

    model, clean = small_model(), small_model()
    (opt, scaler), (ref, ref_scaler) = make(model), make(clean)
    for t in range(5):
        if t in SKIPPED_AT:
            before = _snapshot(model, opt)
            step(model, opt, x, y, scaler, (where, value), (False, False))
            _assert_same(_snapshot(model, opt), before)
            if hasattr(ref, "_begun"):  # the reference makes no update either: its count of
                ref._begun += 1       # steps begun advances (LookSAM's, interval SAM's SAM steps)
            continue
        step(model, opt, x, y, scaler, None, (False, False))
        step(clean, ref, x, y, ref_scaler, None, (False, False))
    counted = opt.amp_skipped_steps if scaler else opt.nonfinite_skipped_steps
    assert counted == len(SKIPPED_AT)
    if scaler:
        assert scaler.get_scale() == ref_scaler.get_scale() / 2 ** len(SKIPPED_AT)
    _assert_same(_snapshot(model, opt), _snapshot(clean, ref))
    with opt.averaged_weights(), ref.averaged_weights():
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clean.parameters()))
