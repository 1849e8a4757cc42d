"""skip_nonfinite=True without a GradScaler: a step whose gradients hold inf/NaN (in either
pass) is skipped, the weights and the whole optimizer state stay bit for bit as they were, the
skip is counted (and checkpointed: test_engine.py), and the following steps are those of a run
without that step. Without the option a NaN reaches the weights, as with torch.optim."""
import math

import pytest
import torch
from conftest import DEVICE

import fastsam

SHAPES = [(4, 3), (5,), (2, 2, 3)]
BAD_STEP = 1  # of 4


def _sam(ps, b):
    return fastsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, skip_nonfinite=True,
                       backend=b)


OPTIMIZERS = {
    "sam-sgd": _sam,
    "asam-adamw": lambda ps, b: fastsam.ASAM(ps, torch.optim.AdamW, lr=1e-2, backend=b,
                                             skip_nonfinite=True),
    "gsam-adam-ema": lambda ps, b: fastsam.GSAM(ps, torch.optim.Adam, lr=1e-2, average="ema",
                                                skip_nonfinite=True, backend=b),
    "sam-rmsprop-unfused": lambda ps, b: fastsam.SAM(ps, torch.optim.RMSprop, lr=1e-3,
                                                     skip_nonfinite=True, backend=b),
    "freesam-sgd": lambda ps, b: fastsam.FreeSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9,
                                                 skip_nonfinite=True, backend=b),
}


def _grads(step, pass_):
    gen = torch.Generator().manual_seed(100 * step + pass_)
    return [torch.randn(s, generator=gen).to(DEVICE) for s in SHAPES]


def _step(opt, params, step, poison=None):
    """One step with the gradients of (step, pass); ``poison`` = (pass, value) puts value into
    that pass's gradient."""
    def set_grads(pass_):
        for p, g in zip(params, _grads(step, pass_)):
            p.grad = g
        if poison is not None and poison[0] == pass_:
            params[1].grad[2] = poison[1]

    set_grads(1)
    if isinstance(opt, fastsam.FreeSAM):
        opt.step()
        return
    if opt.first_step() is False:  # LookSAM's look-ahead step
        return
    set_grads(2)
    opt.second_step()


def _snapshot(params, opt):
    state = opt.state_dict()["state"]
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in state.items()})


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        for k in a[1][i]:
            x, y = a[1][i][k], b[1][i][k]
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y, (i, k)


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SHAPES]


POISONS = [(1, math.inf), (1, math.nan), (2, -math.inf), (2, math.nan)]


@pytest.mark.parametrize("name, poison", [
    (name, poison) for name in OPTIMIZERS for poison in POISONS
    if poison[0] == 1 or not name.startswith("freesam")  # FreeSAM has one pass
])
def test_a_nonfinite_step_is_skipped_exactly(backend, name, poison):
    make = OPTIMIZERS[name]
    params, clean = _params(), _params()
    opt, ref = make(params, backend), make(clean, backend)
    for step in range(4):
        if step == BAD_STEP:
            before = _snapshot(params, opt)
            _step(opt, params, step, poison)
            _assert_same(_snapshot(params, opt), before)  # nothing moved, nothing counted
            assert opt.nonfinite_skipped_steps == 1
            continue
        _step(opt, params, step)
        _step(ref, clean, step)
    # the run with the skipped step is the run without it
    _assert_same(_snapshot(params, opt), _snapshot(clean, ref))
    assert ref.nonfinite_skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in params)
    if name.startswith("gsam"):  # the averaged copy skipped it too
        with opt.averaged_weights(), ref.averaged_weights():
            assert all(torch.equal(p, q) for p, q in zip(params, clean))


def test_looksam_skips_sam_and_look_ahead_steps(backend):
    params = _params()
    opt = fastsam.LookSAM(params, torch.optim.SGD, lr=0.1, k=2, skip_nonfinite=True,
                          backend=backend)
    _step(opt, params, 0)
    for step, poison in ((1, (1, math.nan)), (2, (2, math.inf))):  # look-ahead, then SAM step
        before = _snapshot(params, opt)
        _step(opt, params, step, poison)
        _assert_same(_snapshot(params, opt), before)
    assert opt.nonfinite_skipped_steps == 2
    _step(opt, params, 3)
    assert all(torch.isfinite(p).all() for p in params)


def test_without_the_option_nan_reaches_the_weights(backend):
    params = _params()
    opt = fastsam.SAM(params, torch.optim.SGD, lr=0.1, backend=backend)
    _step(opt, params, 0, (2, math.nan))
    assert torch.isnan(params[1][2])
    assert opt.nonfinite_skipped_steps == 0


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False"):
        fastsam.SAM(_params(), torch.optim.SGD, lr=0.1, skip_nonfinite="yes")
