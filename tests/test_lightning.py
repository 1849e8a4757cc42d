"""fastsam.integrations.lightning.SAMMixin: Lightning's automatic optimization runs SAM's two
passes per step (against the hand-written loop of tests/trainers.py over the same batches),
refuses to run anything else without the mixin, and manual optimization works as
documented."""
from __future__ import annotations

import pytest
import torch

lightning = pytest.importorskip("lightning")
from trainers import MODELS, collate, max_difference, model_loss, two_pass_loop  # noqa: E402

import fastsam  # noqa: E402
from fastsam.integrations.lightning import SAMMixin  # noqa: E402

BATCH, STEPS = 8, 4
OPTIMIZERS = {
    "sam_sgd": lambda ps: fastsam.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "asam_adamw": lambda ps: fastsam.ASAM(ps, torch.optim.AdamW, rho=0.5, lr=1e-3),
    "gsam_adam": lambda ps: fastsam.GSAM(ps, torch.optim.Adam, rho=0.05, alpha=0.3, lr=1e-3),
    "looksam_sgd": lambda ps: fastsam.LookSAM(ps, torch.optim.SGD, rho=0.05, k=2, lr=0.1),
    "freesam_sgd": lambda ps: fastsam.FreeSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
    "friendlysam_sgd": lambda ps: fastsam.FriendlySAM(ps, torch.optim.SGD, rho=0.05, lmbda=0.6,
                                                      lr=0.1, momentum=0.9),
    "aesam_sgd": lambda ps: fastsam.AESAM(ps, torch.optim.SGD, rho=0.05, total_steps=STEPS,
                                          lambda1=2.5, lambda2=2.5, lr=0.1, momentum=0.9),
    "esam_sgd": lambda ps: fastsam.ESAM(ps, torch.optim.SGD, rho=0.05, beta=0.5, seed=3, lr=0.1,
                                        momentum=0.9),
}


class Plain(lightning.LightningModule):
    def __init__(self, make_optimizer, seed=0):
        super().__init__()
        self.model = MODELS["bn"][0](seed)
        self.make_optimizer = make_optimizer

    def training_step(self, batch, batch_idx):
        loss = model_loss(self.model, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


class WithSAM(SAMMixin, Plain):
    pass


def data():
    return MODELS["bn"][1](BATCH * STEPS)


def fit(module, **trainer_kwargs):
    loader = torch.utils.data.DataLoader(data(), batch_size=BATCH, collate_fn=collate)
    settings = dict(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    settings.update(trainer_kwargs)
    trainer = lightning.Trainer(**settings)
    trainer.fit(module, loader)
    return trainer


def reference(kind, **loop_kwargs):
    model = MODELS["bn"][0]()
    opt = OPTIMIZERS[kind](model.parameters())
    items = data()
    losses = two_pass_loop(model, opt, [collate(items[i * BATCH:(i + 1) * BATCH])
                                        for i in range(STEPS)], **loop_kwargs)
    return model, losses


class Outputs(lightning.Callback):
    """The loss Lightning hands on for each batch (progress bar, on_train_batch_end)."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_mixin_equals_the_two_pass_loop(kind):
    module = WithSAM(OPTIMIZERS[kind])
    outputs = Outputs()
    trainer = fit(module, callbacks=[outputs])
    model, losses = reference(kind)
    assert outputs.losses == pytest.approx([x.item() for x in losses], rel=1e-6)
    assert max_difference(module.model, model) < 1e-6
    for a, b in zip(module.model.buffers(), model.buffers()):  # BatchNorm statistics of w
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # what training_step logged is the first pass's loss (at w, not at w + e)
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(losses[-1].item(),
                                                                         rel=1e-6)


def test_gradient_clipping_clips_the_second_pass():
    module = WithSAM(OPTIMIZERS["sam_sgd"])
    fit(module, gradient_clip_val=0.05)
    model, _ = reference("sam_sgd", max_grad_norm=0.05)
    assert max_difference(module.model, model) < 1e-6
    unclipped, _ = reference("sam_sgd")
    assert max_difference(module.model, unclipped) > 1e-4


@pytest.mark.parametrize("kind", ["sam_sgd", "looksam_sgd", "gsam_adam"])
def test_without_the_mixin_automatic_optimization_stops_at_once(kind):
    """Not a silently different algorithm: the first step raises, naming the fix, and no
    weight has moved."""
    module = Plain(OPTIMIZERS[kind])
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match="SAMMixin"):
        fit(module)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_freesam_needs_no_mixin():
    """FreeSAM makes one pass per step: Lightning's closure is its step."""
    module = Plain(OPTIMIZERS["freesam_sgd"])
    fit(module)
    model, _ = reference("freesam_sgd")
    assert max_difference(module.model, model) < 1e-6


def test_mixin_refuses_accumulation():
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=2"):
        fit(WithSAM(OPTIMIZERS["sam_sgd"]), accumulate_grad_batches=2)


class Manual(Plain):
    """Manual optimization, as docs/training.md shows it."""

    def __init__(self, make_optimizer):
        super().__init__(make_optimizer)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        sam = fastsam.unwrap(optimizer)
        loss = model_loss(self.model, batch)
        self.manual_backward(loss)
        if getattr(sam, "sam_step_next", True):  # LookSAM: False before a look-ahead step
            sam.first_step(zero_grad=True)
            with fastsam.frozen_bn_stats(self.model):
                self.manual_backward(model_loss(self.model, batch))
        optimizer.step()  # the second step (LookSAM: or the look-ahead step)
        optimizer.zero_grad()
        self.log("train_loss", loss)


@pytest.mark.parametrize("kind", ["sam_sgd", "looksam_sgd", "gsam_adam"])
def test_manual_optimization(kind):
    module = Manual(OPTIMIZERS[kind])
    fit(module)
    model, _ = reference(kind)
    assert max_difference(module.model, model) < 1e-6


@pytest.mark.parametrize("kind", ["sam_sgd", "friendlysam_sgd"])
def test_mixed_precision_with_a_grad_scaler(kind):
    """precision="16-mixed"'s path (the scaler steps the optimizer after Lightning's closure)
    rehearsed on CPU with a CPU GradScaler: the same steps as the loop under the scaler
    (FriendlySAM told the loss scale by the mixin)."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    module = WithSAM(OPTIMIZERS[kind])
    fit(module, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    model, _ = reference(kind, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16),
                         autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    assert max_difference(module.model, model) < 1e-6
