"""``python -m fastsam.bench.e2e``: whole training steps (forward, backward and the optimizer) of
real models with random inputs, SAM-family optimizers beside plain SGD/AdamW.

    python -m fastsam.bench.e2e                       # both models on the best device present
    python -m fastsam.bench.e2e --models resnet --reps 20 --json out.json
    python -m fastsam.bench.e2e --trainer hf          # GPT-2 through the Hugging Face Trainer

A SAM-family step needs two forward/backward passes, so it cannot cost less than twice one
forward/backward (``ideal``); the table gives each step's median time, its ratio to that ideal
and to a plain SGD step, and on CUDA the step's peak memory.

Models (defined here, random weights and inputs): ``resnet``, a ResNet-style CNN (stem + 4
stages of two basic blocks with BatchNorm, widths 32-256, 32×32 inputs, batch 64);
``transformer``, a pre-norm transformer encoder (4 layers, width 256, 4 heads, sequence 128,
batch 16) with a classification head.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import fastsam

from .__main__ import environment
from .measure import sync, timed
from .official_gsam import OfficialGSAM
from .popular_sam import PopularSAM
from .run import save_json


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet(classes: int = 10) -> nn.Module:
    layers, cin = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()], 32
    for i, width in enumerate((32, 64, 128, 256)):
        layers += [_Block(cin, width, 1 if i == 0 else 2), _Block(width, width, 1)]
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class Transformer(nn.Module):
    def __init__(self, vocab: int = 1000, width: int = 256, depth: int = 4, heads: int = 4,
                 seq: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(1, seq, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.position).mean(1))


def batch_for(model_name: str, device: torch.device, gen: torch.Generator):
    if model_name == "resnet":
        x = torch.randn(64, 3, 32, 32, device=device, generator=gen)
        return x, torch.randint(0, 10, (64,), device=device, generator=gen)
    x = torch.randint(0, 1000, (16, 128), device=device, generator=gen)
    return x, torch.randint(0, 10, (16,), device=device, generator=gen)


MODELS = {"resnet": resnet, "transformer": Transformer}
# optimizer name -> (constructor, two passes per step?)
OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), False),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), False),
    "popular-sam": (lambda ps: PopularSAM(ps, torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9),
                    True),
    "sam": (lambda ps: fastsam.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9), True),
    "sam-adamw": (lambda ps: fastsam.SAM(ps, torch.optim.AdamW, rho=0.05, lr=1e-3), True),
    "official-gsam": (lambda ps: OfficialGSAM(ps, torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.01,
                                              momentum=0.9), True),
    "gsam": (lambda ps: fastsam.GSAM(ps, torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.01,
                                     momentum=0.9), True),
}


def run(model_name: str, device: torch.device, reps: int, warmup: int,
        optimizers: list[str]) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    x, y = batch_for(model_name, device, gen)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def forward_backward():
        loss_fn(model(x), y).backward()

    def zero():
        for p in model.parameters():
            p.grad = None

    fb = statistics.median(timed(lambda: (zero(), forward_backward()), device, reps, warmup))
    rows = [dict(model=model_name, optimizer="forward+backward", median_ms=fb * 1e3,
                 x_ideal=None, x_sgd=None, peak_mb=None)]
    for name in optimizers:
        model.load_state_dict(initial)
        make, two_pass = OPTIMIZERS[name]
        opt = make(list(model.parameters()))

        def step(opt=opt, two_pass=two_pass):
            zero()
            forward_backward()
            if two_pass:
                opt.first_step(zero_grad=True)
                with fastsam.frozen_bn_stats(model):
                    forward_backward()
                opt.second_step()
            else:
                opt.step()

        step()  # optimizer state and buffers
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        median = statistics.median(timed(step, device, reps, warmup))
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows.append(dict(model=model_name, optimizer=name, median_ms=median * 1e3,
                         x_ideal=median / (2 * fb) if two_pass else median / fb, x_sgd=None,
                         peak_mb=peak))
        del opt
    sgd = next((r["median_ms"] for r in rows if r["optimizer"] == "sgd"), None)
    for r in rows[1:]:
        r["x_sgd"] = r["median_ms"] / sgd if sgd else None
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m fastsam.bench.e2e",
                                     description=__doc__.split("\n")[0].strip("`"))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS),
                        default=list(OPTIMIZERS))
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--json", help="write rows + environment here")
    parser.add_argument("--trainer", choices=["none", "hf"], default="none",
                        help="hf: GPT-2 trained through the Hugging Face Trainer (SAMTrainer; "
                        "needs transformers: pip install -e '.[hf]')")
    parser.add_argument("--hf-optimizers", dest="optimizers_hf", nargs="+",
                        choices=["adamw", "popular-sam", "sam", "gsam", "looksam", "freesam"],
                        help="--trainer hf rows (default: all)")
    parser.add_argument("--preset", choices=["small", "gpt2"],
                        help="--trainer hf model size (default: gpt2 on CUDA, small on CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps = args.reps or (30 if device.type == "cuda" else 5)
    env = environment(device)
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if args.trainer == "hf":
        return _trainer_rows(args, device, env)
    rows = [r for m in args.models for r in run(m, device, reps, 2, args.optimizers)]
    print(f"{'model':<12} {'step':<17} {'median ms':>10} {'x ideal':>8} {'x sgd':>6} "
          f"{'peak MB':>8}")
    for r in rows:
        cells = [f"{r['x_ideal']:.2f}" if r["x_ideal"] else "-",
                 f"{r['x_sgd']:.2f}" if r["x_sgd"] else "-",
                 f"{r['peak_mb']:.0f}" if r["peak_mb"] else "-"]
        print(f"{r['model']:<12} {r['optimizer']:<17} {r['median_ms']:>10.2f} {cells[0]:>8} "
              f"{cells[1]:>6} {cells[2]:>8}")
    print("# x ideal: step / (2 x forward+backward) for two-pass optimizers, step / "
          "(forward+backward) for sgd and adamw")
    save_json(args.json, environment=env, results=rows)
    return rows


def _trainer_rows(args: argparse.Namespace, device: torch.device, env: dict) -> list[dict]:
    import tempfile

    import transformers

    from . import e2e_hf

    env["transformers"] = transformers.__version__
    preset = args.preset or ("gpt2" if device.type == "cuda" else "small")
    reps = args.reps or (20 if device.type == "cuda" else 10)  # multiples of LookSAM's k=5
    names = [n for n in (args.optimizers_hf or list(e2e_hf.OPTIMIZERS))]
    with tempfile.TemporaryDirectory() as out:
        rows = e2e_hf.run(device, preset, reps, 3 if device.type == "cuda" else 2, names, out)
    e2e_hf.print_rows(rows, preset)
    save_json(args.json, environment=env, preset=preset, results=rows)
    return rows


if __name__ == "__main__":
    main()
