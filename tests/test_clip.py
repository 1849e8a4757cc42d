"""``max_grad_norm=`` on every optimizer: the update's gradient clipped by its global norm
inside the fused passes equals ``torch.nn.utils.clip_grad_norm_`` called on ``.grad`` before
the update (before ``second_step()``; before FreeSAM's ``step()``; before the ``first_step()``
of LookSAM's look-ahead steps and interval SAM's plain steps, which update). Fused bases and
bases the update is not fused with, 5 fp64 steps, every backend; the clip is active in every
case (the run differs from the unclipped one), and a bound no gradient reaches changes nothing
bit for bit."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE
from harness import CONFIGS, SHAPES, Landscape, make_params, small_data, small_model, step

import fastsam

SGD = dict(lr=0.05, momentum=0.9, nesterov=True)
CASES = {
    "sam_sgd": lambda ps, **kw: fastsam.SAM(ps, torch.optim.SGD, rho=0.05, **SGD, **kw),
    "asam_adamw": lambda ps, **kw: fastsam.ASAM(ps, torch.optim.AdamW, rho=0.5, lr=1e-2,
                                                 weight_decay=0.1, **kw),
    "gsam_adam": lambda ps, **kw: fastsam.GSAM(ps, torch.optim.Adam, rho=0.05, alpha=0.3,
                                                lr=1e-2, **kw),
    "gsam_rmsprop": lambda ps, **kw: fastsam.GSAM(ps, torch.optim.RMSprop, rho=0.05, alpha=0.3,
                                                   lr=1e-2, **kw),
    "wsam_decoupled": lambda ps, **kw: fastsam.WSAM(ps, torch.optim.SGD, rho=0.05, gamma=0.8,
                                                     **SGD, **kw),
    "wsam_weighted": lambda ps, **kw: fastsam.WSAM(ps, torch.optim.AdamW, rho=0.05, gamma=0.8,
                                                    decouple=False, lr=1e-2, **kw),
    "freesam_sgd": lambda ps, **kw: fastsam.FreeSAM(ps, torch.optim.SGD, **SGD, **kw),
    "freesam_rmsprop": lambda ps, **kw: fastsam.FreeSAM(ps, torch.optim.RMSprop, lr=1e-2, **kw),
    "looksam_sgd": lambda ps, **kw: fastsam.LookSAM(ps, torch.optim.SGD, rho=0.05, k=3,
                                                     alpha=0.5, **SGD, **kw),
    "looksam_rmsprop": lambda ps, **kw: fastsam.LookSAM(ps, torch.optim.RMSprop, rho=0.05, k=2,
                                                         alpha=0.5, lr=1e-2, **kw),
    "sam_interval_adam": lambda ps, **kw: fastsam.SAM(ps, torch.optim.Adam, rho=0.05,
                                                       interval=2, lr=1e-2, **kw),
    "friendlysam_sgd": lambda ps, **kw: fastsam.FriendlySAM(ps, torch.optim.SGD, rho=0.05,
                                                             lmbda=0.7, **SGD, **kw),
}
MAX_NORM = 2.0
STEPS = 5
# harness.SHAPES without its two largest tensors (the Triton interpreter's time)
CLIP_SHAPES = [s for s in SHAPES if math.prod(s) < 4097]


def _run(make, backend, clip_inside, max_norm=MAX_NORM, clip_outside=None):
    """STEPS steps; ``clip_inside``: max_grad_norm given to the optimizer; ``clip_outside``:
    clip_grad_norm_ on .grad before each update instead."""
    params = make_params(CLIP_SHAPES, torch.float64, DEVICE)
    land = Landscape(CLIP_SHAPES)
    opt = make(params, backend=backend, max_grad_norm=max_norm if clip_inside else None)

    def clip():
        if clip_outside is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_outside)

    for _ in range(STEPS):
        land.set_grads(params)
        if isinstance(opt, fastsam.FreeSAM):
            clip()
            opt.step()
            continue
        if not opt.sam_step_next:  # this first_step() is the update
            clip()
            assert opt.first_step(zero_grad=True) is False
            continue
        opt.first_step(zero_grad=True)
        land.set_grads(params)
        clip()
        opt.second_step(zero_grad=True)
    return params, opt


@pytest.mark.parametrize("name", sorted(CASES))
def test_max_grad_norm_equals_clip_grad_norm_before_the_update(backend, name):
    clipped, opt = _run(CASES[name], backend, True)
    outside, _ = _run(CASES[name], backend, False, clip_outside=MAX_NORM)
    unclipped, _ = _run(CASES[name], backend, False)
    for p, r in zip(clipped, outside):
        torch.testing.assert_close(p, r, rtol=1e-8, atol=1e-10)
    assert any(not torch.allclose(p, u, rtol=1e-6, atol=1e-9)
               for p, u in zip(clipped, unclipped))  # the bound was reached
    assert opt.max_grad_norm == MAX_NORM


@pytest.mark.parametrize("name", ["sam_sgd", "gsam_adam", "freesam_sgd", "looksam_sgd"])
def test_a_bound_never_reached_changes_nothing(backend, name):
    """A coefficient of exactly 1 multiplies every gradient exactly: the run is the unclipped
    one bit for bit (FreeSAM's stored gradients too)."""
    clipped, _ = _run(CASES[name], backend, True, max_norm=1e12)
    unclipped, _ = _run(CASES[name], backend, False)
    for p, u in zip(clipped, unclipped):
        assert torch.equal(p, u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_matches_clip_grad_norm(backend, dtype):
    """fp32 and bf16 parameters: the fused clip (the coefficient applied in fp32, rounded once)
    against clip_grad_norm_ (which rounds the clipped gradient to the parameter's dtype)."""
    def run(clip_inside):
        params = make_params(CLIP_SHAPES, dtype, DEVICE)
        land = Landscape(CLIP_SHAPES)
        opt = fastsam.SAM(params, torch.optim.AdamW, rho=0.05, lr=1e-2, backend=backend,
                          max_grad_norm=MAX_NORM if clip_inside else None)
        for _ in range(STEPS):
            land.set_grads(params)
            opt.first_step(zero_grad=True)
            land.set_grads(params)
            if not clip_inside:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            opt.second_step(zero_grad=True)
        return params

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for p, r in zip(run(True), run(False)):
        torch.testing.assert_close(p.double(), r.double(), **tol)


def test_max_grad_norm_under_the_grad_scaler(backend):
    """Under GradScaler the clip applies to the unscaled gradients: the loop that unscales,
    clips and steps (what the Hugging Face Trainer does) gives the same weights."""
    x, y = small_data()
    loss_fn = torch.nn.functional.cross_entropy

    def run(clip_inside):
        model = small_model()
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **SGD, backend=backend,
                          max_grad_norm=0.1 if clip_inside else None)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
        for _ in range(4):
            scaler.scale(loss_fn(model(x), y)).backward()
            opt.first_step(zero_grad=True)
            scaler.scale(loss_fn(model(x), y)).backward()
            if not clip_inside:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return list(model.parameters())

    for p, r in zip(run(True), run(False)):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_capturable_clips_on_the_device(backend, name):
    """capturable=True: the coefficient is formed and applied on the device (no host read
    after warm-up, inf/NaN updates skipped there), the weights those of host-decided steps."""
    x, y = small_data()

    def run(capturable):
        model = small_model()
        opt = CONFIGS[name](model.parameters(), backend=backend, capturable=capturable,
                            skip_nonfinite=True, max_grad_norm=0.05)
        for t in range(5):
            guarded = capturable and t >= 2 and (backend != "torch" or DEVICE.type != "cpu")
            step(model, opt, x, y, None, t == 3, (guarded, guarded))
        return list(model.parameters()), opt

    (host, _), (device, opt) = run(False), run(True)
    for a, b in zip(host, device):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert opt.nonfinite_skipped_steps == 1


def test_max_grad_norm_is_validated():
    w = [torch.nn.Parameter(torch.zeros(3))]
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
            fastsam.SAM(w, torch.optim.SGD, lr=0.1, max_grad_norm=bad)
    for bad in ("1", True):
        with pytest.raises(TypeError, match="max_grad_norm must be a number or None"):
            fastsam.FreeSAM(w, torch.optim.SGD, lr=0.1, max_grad_norm=bad)
