"""Small real models and the hand-written two-pass loop the trainer integrations are compared
with (tests/test_hf_trainer.py, test_lightning.py, test_accelerate.py). Models are built from
small configurations with random weights: nothing is downloaded."""
from __future__ import annotations

import torch
from torch import nn

import fastsam

VOCAB, LENGTH = 97, 12


def gpt2(seed: int = 0) -> nn.Module:
    """transformers' GPT-2 language model, 2 layers of width 32, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def bert(seed: int = 0) -> nn.Module:
    """transformers' BERT sequence classifier, 2 layers of width 32, dropout off."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


class Classifier(nn.Module):
    """A small classifier (with BatchNorm unless ``batchnorm=False``) that returns its loss as
    a transformers model does."""

    def __init__(self, seed: int = 0, batchnorm: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(10, 32),
                                  nn.BatchNorm1d(32) if batchnorm else nn.Identity(), nn.ReLU(),
                                  nn.Linear(32, 3))

    def forward(self, x, labels=None):
        logits = self.body(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def token_data(n: int, kind: str, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` examples for ``gpt2`` (labels = inputs, the first position masked with -100, so
    the Trainer's token count and the model's mean agree) or ``bert`` (a class label)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)
    if kind == "gpt2":
        labels = ids.clone()
        labels[:, 0] = -100
        return [{"input_ids": i, "labels": t} for i, t in zip(ids, labels)]
    classes = torch.randint(0, 3, (n,), generator=gen)
    return [{"input_ids": i, "labels": c} for i, c in zip(ids, classes)]


def bn_data(n: int, seed: int = 1, bad: int | None = None) -> list[dict[str, torch.Tensor]]:
    """``n`` examples for ``Classifier``; example ``bad`` holds an inf (a batch whose loss and
    gradients are not finite)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 10, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    if bad is not None:
        x[bad, 0] = float("inf")
    return [{"x": a, "labels": b} for a, b in zip(x, y)]


MODELS = {"gpt2": (gpt2, lambda n: token_data(n, "gpt2")),
          "bert": (bert, lambda n: token_data(n, "bert")),
          "bn": (Classifier, bn_data),
          "mlp": (lambda seed=0: Classifier(seed, batchnorm=False), bn_data)}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def two_pass_loop(model, optimizer, batches, max_grad_norm=None, autocast=None, scaler=None,
                  scheduler=None):
    """The hand-written loop: per batch, the first forward/backward, ``first_step``, the
    second with BatchNorm statistics frozen, clipping of the second pass's gradients, the
    second step (FreeSAM: one pass and ``step()``; LookSAM's look-ahead steps: one pass).
    Returns the first pass's losses."""
    losses = []

    def backward(batch):
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            loss = model_loss(model, batch)
        (scaler.scale(loss) if scaler else loss).backward()
        return loss.detach()

    def update():
        if max_grad_norm:
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
        if scheduler:
            scheduler.step()

    for batch in batches:
        model.train()
        losses.append(backward(batch))
        if isinstance(optimizer, (fastsam.FreeSAM, fastsam.MSAM)) or not getattr(
                optimizer, "sam_step_next", True):
            update()  # FreeSAM's or MSAM's step, or LookSAM's look-ahead step
            continue
        second_pass = True
        if isinstance(optimizer, fastsam.AESAM):  # a plain step is left to update() (clipped)
            second_pass = optimizer.first_step(
                zero_grad=True, grad_scale=scaler.get_scale() if scaler else 1.0)
        elif scaler and isinstance(optimizer, fastsam.FriendlySAM):  # m is kept unscaled
            optimizer.first_step(zero_grad=True, grad_scale=scaler.get_scale())
        else:
            optimizer.first_step(zero_grad=True)
        if second_pass:
            with fastsam.frozen_bn_stats(model):
                backward(batch)
        update()
    return losses


class SchedulerRule:
    """The lr schedule as Accelerate and the Trainer step it: not on a step the GradScaler
    skipped (for ``two_pass_loop(scheduler=...)``)."""

    def __init__(self, optimizer, scheduler) -> None:
        self.optimizer, self.scheduler, self.seen = optimizer, scheduler, 0

    def step(self) -> None:
        if self.optimizer.amp_skipped_steps == self.seen:
            self.scheduler.step()
        self.seen = self.optimizer.amp_skipped_steps


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


class PassCounter:
    """Counts the forward passes of a module (a forward hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.count = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1
