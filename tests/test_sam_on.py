"""SAM-ON (Mueller et al., NeurIPS 2023): a group with ``perturb=False`` is left out of the
perturbation and its norm, and ``fastsam.sam_on_groups`` groups a model's normalisation layers
for it. Against the per-parameter oracle over 7 steps on every backend."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from harness import SHAPES, Landscape, assert_follows_oracle, clone_params, drive, make_params
from oracle import OracleSAM

import fastsam

SPECS = ({"rho": 0.1}, {"rho": 0.1, "perturb": False})
CASES = {
    "sam_sgd": (fastsam.SAM, {}, ("none", 0.0), torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "asam_adamw": (fastsam.ASAM, {"eta": 0.01}, ("element", 0.01), torch.optim.AdamW,
                   dict(lr=1e-2, weight_decay=0.1)),
}


def _pair(case, backend, specs=SPECS):
    cls, options, kind, base_cls, base_kwargs = CASES[case]
    params = make_params(SHAPES, torch.float64, DEVICE)
    ref = clone_params(params)
    opt = cls([{"params": params[:3], **specs[0]}, {"params": params[3:], **specs[1]}],
              base_cls, backend=backend, **options, **base_kwargs)
    oracle = OracleSAM([{"params": ref[:3], "T": kind, **specs[0]},
                        {"params": ref[3:], "T": kind, **specs[1]}],
                       base_cls, foreach=False, **base_kwargs)
    return params, ref, opt, oracle


@pytest.mark.parametrize("case", sorted(CASES))
def test_sam_on_matches_the_oracle(backend, case):
    params, ref, opt, oracle = _pair(case, backend)
    assert_follows_oracle(opt, params, oracle, ref, oracle.base)


def test_the_group_left_out_stays_at_w_in_the_second_pass(backend):
    params, _, opt, _ = _pair("sam_sgd", backend)
    Landscape(SHAPES).set_grads(params)
    before = [p.detach().clone() for p in params]
    opt.first_step()
    moved = [not torch.equal(p, b) for p, b in zip(params, before)]
    assert moved[3:] == [False] * len(moved[3:])  # the perturb=False group: at w
    assert any(moved[:3])  # the perturbed group moved (its norm is its own gradients')
    opt.second_step()


def test_every_group_left_out_is_the_base_optimizers_step(backend):
    """With nothing perturbed the step is the plain update at w."""
    left_out = ({"rho": 0.1, "perturb": False}, {"rho": 0.1, "perturb": False})
    params, ref, opt, _ = _pair("sam_sgd", backend, left_out)
    base = torch.optim.SGD(ref, lr=0.05, momentum=0.9, foreach=False)
    land = Landscape(SHAPES)
    for _ in range(3):
        drive(opt, params, land, 1)
        land.set_grads(ref)
        base.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)


class MyRMSNorm(torch.nn.Module):
    """A model library's norm layer: told by its class name."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_sam_on_groups_takes_the_normalisation_layers():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4),
        torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 8),
        torch.nn.LayerNorm(8), MyRMSNorm(8), torch.nn.Linear(8, 2),
    )
    model[0].bias.requires_grad_(False)  # frozen parameters take part in neither group
    groups = fastsam.sam_on_groups(model, lr=0.1)
    norms = [model[1].weight, model[1].bias, model[2].weight, model[2].bias, model[5].weight,
             model[5].bias, model[6].weight]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in norms]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in (
        model[0].weight, model[4].weight, model[4].bias, model[7].weight, model[7].bias)]
    assert groups[1]["perturb"] is False and groups[0]["lr"] == groups[1]["lr"] == 0.1
    optimizer = fastsam.SAM(groups, torch.optim.SGD, rho=0.1, lr=0.1)
    saved = optimizer.state_dict()
    assert [g.get("perturb", True) for g in saved["param_groups"]] == [True, False]
    with pytest.raises(ValueError, match="no trainable parameter in a normalisation layer"):
        fastsam.sam_on_groups(torch.nn.Linear(3, 3))


def test_perturb_is_checked():
    w = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="perturb must be True or False"):
        fastsam.SAM([{"params": w, "perturb": 0}], torch.optim.SGD, lr=0.1)
    for cls in (fastsam.GSAM, fastsam.LookSAM):
        with pytest.raises(ValueError, match="supported by SAM and ASAM"):
            cls([{"params": w, "perturb": False}], torch.optim.SGD, lr=0.1)
