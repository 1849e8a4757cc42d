"""skip_nonfinite=True without a GradScaler. A step whose gradients hold inf/NaN (in either
pass) is skipped, with the weights and the whole optimizer state bit for bit as they were, the
skip counted and the following steps those of a run without it: test_engine.py checks that
for every optimizer, option and backend. Here: without the option a NaN reaches the weights,
as with torch.optim, and the option's type is checked."""
import math

import pytest
import torch
from conftest import DEVICE

import fastsam

SHAPES = [(4, 3), (5,), (2, 2, 3)]


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SHAPES]


def test_without_the_option_nan_reaches_the_weights(backend):
    params = _params()
    opt = fastsam.SAM(params, torch.optim.SGD, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.first_step()
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[2] = math.nan
    opt.second_step()
    assert torch.isnan(params[1][2])
    assert opt.nonfinite_skipped_steps == 0


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False"):
        fastsam.SAM(_params(), torch.optim.SGD, lr=0.1, skip_nonfinite="yes")
