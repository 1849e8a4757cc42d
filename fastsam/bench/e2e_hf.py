"""``python -m fastsam.bench.e2e --trainer hf``: whole optimizer steps of a transformers GPT-2
model trained through the Hugging Face Trainer (``SAMTrainer`` for the SAM family), with
random tokens.

Rows: AdamW alone (the plain Trainer), a re-implementation of the popular SAM
(``fastsam/bench/popular_sam.py``) driven by the same two-pass trainer, and fastsam's SAM,
GSAM, LookSAM (k=5) and FreeSAM, every one over ``torch.optim.AdamW``. Columns: step
time (a mean over the timed steps, so that LookSAM's two kinds of step both count),
tokens per second, forward passes per step (counted), the ratio to the ideal (that many
forward/backward passes, timed outside the Trainer), the ratio to the AdamW step, and memory:
on CUDA the peak allocated during the timed steps, on CPU the optimizer's state (bytes it
holds beyond the parameters and gradients).

Presets: ``small`` (4 layers, width 256, 128 tokens, batch 8: minutes on a 2-core CPU; the
default on CPU) and ``gpt2`` (GPT-2 small, 124 M parameters, 1024 tokens, batch 8, bf16
autocast; the default on CUDA).
"""
from __future__ import annotations

import statistics
import time

import torch
from transformers import PrinterCallback, TrainerCallback

import fastsam

from .measure import held_bytes, sync, timed
from .popular_sam import PopularSAM

PRESETS = {
    "small": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, seq=128, batch=8),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, seq=1024, batch=8),
}
LR, RHO = 1e-4, 0.05
OPTIMIZERS = {
    "adamw": None,
    "popular-sam": None,
    "sam": lambda ps: fastsam.SAM(ps, torch.optim.AdamW, rho=RHO, lr=LR),
    "gsam": lambda ps: fastsam.GSAM(ps, torch.optim.AdamW, rho=RHO, alpha=0.3, lr=LR),
    "looksam": lambda ps: fastsam.LookSAM(ps, torch.optim.AdamW, rho=RHO, k=5, lr=LR),
    "freesam": lambda ps: fastsam.FreeSAM(ps, torch.optim.AdamW, lr=LR),
}


def _model(preset: dict, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=preset["n_layer"], n_embd=preset["n_embd"],
                        n_head=preset["n_head"], vocab_size=preset["vocab_size"],
                        n_positions=preset["seq"], bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(device)


def _data(preset: dict, steps: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, preset["vocab_size"], (steps * preset["batch"], preset["seq"]),
                        generator=gen)
    return [{"input_ids": i, "labels": i} for i in ids]


class _StepClock(TrainerCallback):
    """Trainer callback: the wall time of each optimizer step after ``warmup`` (synchronised
    on CUDA), the model's forward passes in those steps (a forward hook), and from ``warmup``
    steps on the CUDA peak memory."""

    def __init__(self, model: torch.nn.Module, device: torch.device, warmup: int) -> None:
        self.device, self.warmup, self.times = device, warmup, []
        self.passes, self._start, self._counting = 0, 0.0, False
        model.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.passes += self._counting

    def on_step_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self._counting = state.global_step >= self.warmup
        if state.global_step == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        if self._counting:
            self.times.append(time.perf_counter() - self._start)


def _trainer_classes():
    from transformers import Trainer

    from ..integrations.transformers import SAMTrainer, _SchedulerFollowsAmpSkips

    class PopularInTrainer(PopularSAM):
        """The popular SAM with ``step()`` as its second step (what the Trainer calls)."""

        def step(self, closure=None):
            self.second_step()

    class PopularSAMTrainer(SAMTrainer):
        """SAMTrainer's two passes around the popular SAM (bench only: SAMTrainer itself
        takes fastsam optimizers)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.remove_callback(_SchedulerFollowsAmpSkips)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = PopularInTrainer(self.model.parameters(), torch.optim.AdamW,
                                                  rho=RHO, lr=LR)
            return self.optimizer

        def _perturbing_optimizer(self):
            return self.optimizer.optimizer  # inside Accelerate's wrapper

    return Trainer, SAMTrainer, PopularSAMTrainer


def _forward_backward_seconds(preset, device, reps, autocast) -> float:
    model = _model(preset, device)
    batch = {k: v.to(device) for k, v in
             next(iter(torch.utils.data.DataLoader(_data(preset, 1), batch_size=preset["batch"]))
                  ).items()}

    def once():
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = model(**batch).loss
        loss.backward()

    return statistics.median(timed(once, device, reps, warmup=2))


def run(device: torch.device, preset_name: str, reps: int, warmup: int,
        optimizers: list[str], out_dir: str) -> list[dict]:
    from transformers import TrainingArguments

    Trainer, SAMTrainer, PopularSAMTrainer = _trainer_classes()
    preset = PRESETS[preset_name]
    bf16 = device.type == "cuda" and preset_name == "gpt2"
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else
                (lambda: torch.autocast(device.type, enabled=False)))
    fb = _forward_backward_seconds(preset, device, reps, autocast)
    tokens = preset["batch"] * preset["seq"]
    rows = [dict(optimizer="forward+backward", ms_per_step=fb * 1e3, tokens_per_s=tokens / fb,
                 passes=1.0, x_ideal=None, x_adamw=None, memory_mb=None)]
    steps = warmup + reps
    for name in optimizers:
        model = _model(preset, device)
        clock = _StepClock(model, device, warmup)
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=preset["batch"], max_steps=steps,
            use_cpu=device.type == "cpu", report_to=[], save_strategy="no",
            logging_steps=10**9, disable_tqdm=True, bf16=bf16, lr_scheduler_type="cosine",
            learning_rate=LR, optim="adamw_torch", seed=0,
        )
        common = dict(model=model, args=args, train_dataset=_data(preset, steps),
                      callbacks=[clock])
        if name == "adamw":
            trainer = Trainer(**common)
        elif name == "popular-sam":
            trainer = PopularSAMTrainer(**common)
        else:
            trainer = SAMTrainer(optimizers=(OPTIMIZERS[name](model.parameters()), None),
                                 **common)
        trainer.remove_callback(PrinterCallback)  # its end-of-training dict would interleave
        trainer.train()
        per_step = sum(clock.times) / len(clock.times)  # a mean: LookSAM's steps differ
        passes = clock.passes / len(clock.times)
        if device.type == "cuda":
            memory = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            exclude = {t.untyped_storage().data_ptr() for p in model.parameters()
                       for t in (p, p.grad) if t is not None}
            memory = held_bytes(trainer.optimizer.optimizer, exclude) / 2**20
        rows.append(dict(optimizer=name, ms_per_step=per_step * 1e3,
                         tokens_per_s=tokens / per_step, passes=passes,
                         x_ideal=per_step / (passes * fb), x_adamw=None, memory_mb=memory))
        del trainer, model
    adamw = next((r["ms_per_step"] for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows[1:]:
        r["x_adamw"] = r["ms_per_step"] / adamw if adamw else None
    return rows


def print_rows(rows: list[dict], preset: str) -> None:
    print(f"# GPT-2 through the Hugging Face Trainer, preset {preset}: {PRESETS[preset]}")
    print(f"{'step':<17} {'ms/step':>10} {'tokens/s':>9} {'passes':>6} {'x ideal':>8} "
          f"{'x adamw':>8} {'memory MB':>10}")
    for r in rows:
        cells = [f"{r['x_ideal']:.2f}" if r["x_ideal"] else "-",
                 f"{r['x_adamw']:.2f}" if r["x_adamw"] else "-",
                 f"{r['memory_mb']:.1f}" if r["memory_mb"] is not None else "-"]
        print(f"{r['optimizer']:<17} {r['ms_per_step']:>10.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['passes']:>6.2f} {cells[0]:>8} {cells[1]:>8} {cells[2]:>10}")
    print("# ms/step: mean over the timed steps (forward+backward: median, outside the "
          "Trainer); x ideal: step / (passes x forward+backward); memory: CUDA peak allocated "
          "in the timed steps, or on CPU the optimizer's state")
