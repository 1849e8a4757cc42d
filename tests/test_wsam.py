"""WSAM (Yue et al., KDD 2023) against the per-parameter oracle of tests/oracle.py: both forms
(decoupled, and the weighted gradient in the update), SAM and ASAM perturbations, fused bases
and one the update is not fused with, 7 steps, two groups with their own rho and lr, every
backend."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from harness import SHAPES, Landscape, assert_follows_oracle, clone_params, drive, make_params
from oracle import OracleWSAM

import fastsam

CASES = {
    # name: (decouple, adaptive, base class, base kwargs)
    "decoupled_sgd": (True, False, torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
    "weighted_adamw": (False, False, torch.optim.AdamW, dict(weight_decay=0.1)),
    "decoupled_adaptive_adam": (True, True, torch.optim.Adam, dict(amsgrad=True)),
    "weighted_rmsprop": (False, False, torch.optim.RMSprop, dict(momentum=0.5)),
    "decoupled_rmsprop": (True, False, torch.optim.RMSprop, dict()),
}
GAMMA = 0.8  # alpha = 4


def _pair(case, backend):
    decouple, adaptive, base_cls, base_kwargs = CASES[case]
    params = make_params(SHAPES, torch.float64, DEVICE)
    ref = clone_params(params)
    specs = ({"rho": 0.05, "lr": 1e-2}, {"rho": 0.1, "lr": 5e-3})
    opt = fastsam.WSAM([{"params": params[:3], **specs[0]}, {"params": params[3:], **specs[1]}],
                       base_cls, gamma=GAMMA, decouple=decouple, adaptive=adaptive,
                       backend=backend, **base_kwargs)
    kind = ("element", 0.0) if adaptive else ("none", 0.0)
    oracle = OracleWSAM([{"params": ref[:3], "T": kind, **specs[0]},
                         {"params": ref[3:], "T": kind, **specs[1]}],
                        base_cls, GAMMA, decouple, foreach=False, **base_kwargs)
    return params, ref, opt, oracle


@pytest.mark.parametrize("case", sorted(CASES))
def test_wsam_matches_the_oracle(backend, case):
    params, ref, opt, oracle = _pair(case, backend)
    assert_follows_oracle(opt, params, oracle, ref, oracle.base)


def test_gamma_one_half_without_decoupling_is_sam(backend):
    params = make_params(SHAPES, torch.float64, DEVICE)
    ref = clone_params(params)
    wsam = fastsam.WSAM(params, torch.optim.SGD, rho=0.05, gamma=0.5, decouple=False,
                        backend=backend, lr=0.05, momentum=0.9)
    sam = fastsam.SAM(ref, torch.optim.SGD, rho=0.05, backend=backend, lr=0.05, momentum=0.9)
    land = Landscape(SHAPES)
    drive(wsam, params, land, 5)
    drive(sam, ref, land, 5)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)


def test_wsam_refuses_what_it_cannot_do():
    w = [torch.nn.Parameter(torch.zeros(3))]
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="gamma must be a number in"):
            fastsam.WSAM(w, torch.optim.SGD, gamma=bad, lr=0.1)
    with pytest.raises(ValueError, match="decouple=True\\) takes neither average"):
        fastsam.WSAM(w, torch.optim.SGD, lr=0.1, average="ema")
    with pytest.raises(ValueError, match="needs a float lr"):
        fastsam.WSAM(w, torch.optim.SGD, lr=torch.tensor(0.1))
    fastsam.WSAM(w, torch.optim.SGD, lr=0.1, decouple=False, average="ema", capturable=True)


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_pytorch_optimizer(decouple):
    """pytorch-optimizer's WSAM (4.1) forms the same update, both forms: its mix is
    ``g_adv.lerp_(g, 1 - alpha)`` and its decoupled term ``p.add_(g_adv - g, alpha=-lr·alpha)``.
    Where it differs: its norm, ``get_global_gradient_norm(self.param_groups,
    weight_adaptive=True)`` in ``WSAM.first_step`` (pytorch_optimizer/optimizer/sam.py, line 526
    of 4.1.0), returns the squared norm as a float32 tensor even for fp64 parameters (fastsam
    accumulates fp64 ones in fp64): its perturbation is off by about 1e-8 relative, 3.6e-11 in
    the weights after one step here, 1.4e-10 after 7; and its restore is ``p.sub_(e_w)`` (w up
    to the rounding of w + e) where fastsam copies w back. The tolerance allows those."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    params = make_params(SHAPES, torch.float64, "cpu")
    ref = clone_params(params)
    hyper = dict(rho=0.05, gamma=0.8, decouple=decouple, lr=0.05, momentum=0.9)
    ours = fastsam.WSAM(params, torch.optim.SGD, **hyper)
    theirs = pytorch_optimizer.WSAM(torch.nn.Module(), ref, torch.optim.SGD, **hyper)
    land = Landscape(SHAPES)
    drive(ours, params, land, 7)
    drive(theirs, ref, land, 7)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-8, atol=1e-10)


def test_an_lr_made_a_tensor_later_is_refused_before_any_update():
    w = torch.nn.Parameter(torch.ones(3))
    opt = fastsam.WSAM([w], torch.optim.SGD, lr=0.1)
    opt.param_groups[0]["lr"] = torch.tensor(0.1)
    w.grad = torch.ones(3)
    opt.first_step()
    w.grad = torch.full((3,), 2.0)
    with pytest.raises(RuntimeError, match="needs a float lr with decouple=True"):
        opt.second_step()
    assert torch.equal(w.detach(), torch.ones(3))  # restored, not updated
