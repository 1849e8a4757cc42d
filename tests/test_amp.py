"""torch.amp.GradScaler with fastsam optimizers (the _step_supports_amp_scaling protocol): the
same steps as without a scaler, an inf/NaN in the first pass skips only the perturbation;
LookSAM's look-ahead steps go through scaler.step too. An inf/NaN in the second pass skips the
update with everything restored bit for bit and the scale backed off: test_engine.py checks
that for every optimizer, option and backend."""
import math

import pytest
import torch
from conftest import DEVICE
from harness import small_data as _data
from harness import small_model as _model
from harness import step

import fastsam

LOSS = torch.nn.functional.cross_entropy
SCALE = 2.0**12


def _scaler():
    return torch.amp.GradScaler(DEVICE.type, init_scale=SCALE)


OPTIMIZERS = {
    "sam_sgd": lambda ps, b: fastsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, backend=b),
    "asam_adamw": lambda ps, b: fastsam.ASAM(ps, torch.optim.AdamW, lr=1e-2, backend=b),
    "gsam_sgd": lambda ps, b: fastsam.GSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                           backend=b),
    "sam_rmsprop_unfused": lambda ps, b: fastsam.SAM(ps, torch.optim.RMSprop, lr=1e-3,
                                                     backend=b),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scaled_steps_match_unscaled_steps(backend, name):
    x, y = _data()
    plain, scaled = _model(), _model()
    opts = [OPTIMIZERS[name](m.parameters(), backend) for m in (plain, scaled)]
    scaler = _scaler()
    for _ in range(4):
        step(plain, opts[0], x, y)
        step(scaled, opts[1], x, y, scaler)
    assert opts[1].amp_skipped_steps == 0 and scaler.get_scale() == SCALE
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inf_in_first_pass_skips_the_perturbation(backend):
    """The norm of the first pass is not finite: no perturbation, so the second pass is taken
    at w itself and the step is the base optimizer's plain step."""
    x, y = _data()
    model, twin = _model(), _model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    base = torch.optim.SGD(twin.parameters(), lr=0.1)
    step(model, opt, x, y, _scaler(), ("first", math.inf))
    assert float(opt._skips.perturb_skipped) == 1.0
    LOSS(twin(x), y).backward()
    base.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_freesam_with_scaler(backend):
    """Same steps as without a scaler (the stored gradient is kept unscaled); a step with an
    inf is skipped: weights and the stored gradient stay as they were."""
    x, y = _data()
    plain, scaled = _model(), _model()
    opts = [fastsam.FreeSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                            backend=backend) for m in (plain, scaled)]
    scaler = _scaler()
    for _ in range(3):
        step(plain, opts[0], x, y)
        step(scaled, opts[1], x, y, scaler)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    weights = [p.detach().clone() for p in scaled.parameters()]
    stored = {p: g.clone() for p, g in opts[1]._stored.items()}
    step(scaled, opts[1], x, y, scaler, True)
    assert all(torch.equal(p, w) for p, w in zip(scaled.parameters(), weights))
    assert all(torch.equal(opts[1]._stored[p], g) for p, g in stored.items())
    assert opts[1].amp_skipped_steps == 1


def _looksam(model, backend):
    return fastsam.LookSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, k=3,
                           alpha=0.7, backend=backend)


def test_looksam_with_scaler(backend):
    """SAM and look-ahead steps under the scaler match the unscaled ones; an inf in a
    look-ahead step and in a SAM step's second pass skips each (weights, state, direction
    untouched) and backs the scale off."""
    x, y = _data()
    plain, scaled = _model(), _model()
    opts = [_looksam(m, backend) for m in (plain, scaled)]
    scaler = _scaler()
    for _ in range(5):  # SAM, look-ahead, look-ahead, SAM, look-ahead
        step(plain, opts[0], x, y)
        step(scaled, opts[1], x, y, scaler)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for skipped, sam_step in enumerate((False, True), start=1):  # step 6 look-ahead, 7 SAM
        assert opts[1].sam_step_next is sam_step
        weights = [p.detach().clone() for p in scaled.parameters()]
        state = [v.clone() for st in opts[1].state_dict()["state"].values()
                 for v in st.values() if torch.is_tensor(v)]
        step(scaled, opts[1], x, y, scaler, True)
        assert all(torch.equal(p, w) for p, w in zip(scaled.parameters(), weights))
        after = [v for st in opts[1].state_dict()["state"].values()
                 for v in st.values() if torch.is_tensor(v)]
        assert all(torch.equal(a, b) for a, b in zip(after, state, strict=True))
        assert opts[1].amp_skipped_steps == skipped
    assert scaler.get_scale() == SCALE / 4


def test_looksam_scaler_step_on_a_sam_step_needs_first_step():
    x, y = _data()
    model = _model()
    opt = _looksam(model, None)
    scaler = _scaler()
    scaler.scale(LOSS(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="needs first_step"):
        scaler.step(opt)
