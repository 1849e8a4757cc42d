"""``python -m fastsam.bench.train``: does the fast optimizer still generalise? A real training
comparison on data that ships inside scikit-learn (the 8×8 handwritten digits, 1797 images),
with a fraction of the training labels replaced by a random wrong class, as in the noisy-label
experiments of the SAM papers.

    pip install scikit-learn
    python -m fastsam.bench.train                     # 5 seeds, 40 % noise, a few minutes on CPU
    python -m fastsam.bench.train --noise 0.2 --seeds 3 --json out.json

Every optimizer trains the same MLP (64-256-256-10, ReLU) from the same initialisation per seed,
on the same noisy labels, for the same number of epochs with a cosine learning-rate schedule;
the table gives the accuracy on the clean held-out labels (mean ± std over seeds), the
wall time per run and the forward/backward passes per step. SAM-family optimizers run two
forward/backward passes per step (LookSAM, interval SAM and AE-SAM on their SAM steps only;
ESAM with data selection, ``esam-sds``, takes its second pass over half of each batch, chosen
by a forward pass at w + e that the count leaves out).
SAM-ON is not in the list: this MLP has no normalisation layer to perturb.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import fastsam

from .__main__ import environment
from .run import save_json

# name -> constructor over (params, lr, the run's steps)
OPTIMIZERS = {
    "sgd": lambda ps, lr, steps: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=5e-4),
    "sam": lambda ps, lr, steps: fastsam.SAM(ps, torch.optim.SGD, rho=0.1, lr=lr, momentum=0.9,
                                             weight_decay=5e-4),
    "asam": lambda ps, lr, steps: fastsam.ASAM(ps, torch.optim.SGD, rho=1.0, eta=0.01, lr=lr,
                                               momentum=0.9, weight_decay=5e-4),
    "gsam": lambda ps, lr, steps: fastsam.GSAM(ps, torch.optim.SGD, rho=0.1, alpha=0.3, lr=lr,
                                               momentum=0.9, weight_decay=5e-4),
    "agsam": lambda ps, lr, steps: fastsam.GSAM(ps, torch.optim.SGD, rho=0.1, alpha=0.3,
                                                adaptive="agsam", gamma=0.01, lr=lr, momentum=0.9,
                                                weight_decay=5e-4),
    "freesam": lambda ps, lr, steps: fastsam.FreeSAM(ps, torch.optim.SGD, lr=lr, momentum=0.9,
                                                     weight_decay=5e-4),
    "looksam": lambda ps, lr, steps: fastsam.LookSAM(ps, torch.optim.SGD, rho=0.1, k=5, lr=lr,
                                                     momentum=0.9, weight_decay=5e-4),
    "wsam": lambda ps, lr, steps: fastsam.WSAM(ps, torch.optim.SGD, rho=0.1, gamma=0.9, lr=lr,
                                               momentum=0.9, weight_decay=5e-4),
    "friendlysam": lambda ps, lr, steps: fastsam.FriendlySAM(ps, torch.optim.SGD, rho=0.1,
                                                             sigma=1.0, lmbda=0.9, lr=lr,
                                                             momentum=0.9, weight_decay=5e-4),
    "msam": lambda ps, lr, steps: fastsam.MSAM(ps, torch.optim.SGD, rho=0.1, lr=lr, momentum=0.9,
                                               weight_decay=5e-4),
    "sam-interval": lambda ps, lr, steps: fastsam.SAM(ps, torch.optim.SGD, rho=0.1, interval=2,
                                                      lr=lr, momentum=0.9, weight_decay=5e-4),
    # c from 1 to -1: SAM on ~16% of the steps at first, ~84% at the end (under a normal model)
    "aesam": lambda ps, lr, steps: fastsam.AESAM(ps, torch.optim.SGD, rho=0.1, total_steps=steps,
                                                 lambda1=-1.0, lambda2=1.0, lr=lr, momentum=0.9,
                                                 weight_decay=5e-4),
    # half the elements perturbed, by twice SAM's e (rho/beta); a fixed seed per run
    "esam": lambda ps, lr, steps: fastsam.ESAM(ps, torch.optim.SGD, rho=0.1, beta=0.5, seed=0,
                                               lr=lr, momentum=0.9, weight_decay=5e-4),
    # and the data selection: the second pass over the half of the batch whose loss rose most
    "esam-sds": lambda ps, lr, steps: fastsam.ESAM(ps, torch.optim.SGD, rho=0.1, beta=0.5,
                                                   seed=0, lr=lr, momentum=0.9,
                                                   weight_decay=5e-4),
}
ONE_PASS = ("sgd", "freesam", "msam")
SDS_GAMMA = 0.5  # esam-sds: the fraction of each batch its second pass takes


def load_digits(noise: float, seed: int):
    """Train/test tensors (80/20 split fixed by ``seed``), features scaled to [0, 1], and the
    training labels with a fraction ``noise`` replaced by a uniformly drawn wrong class."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise SystemExit(f"this comparison needs scikit-learn ({exc}): pip install scikit-learn")
    data = sklearn_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    noisy = y[train].clone()
    flip = torch.rand(len(noisy), generator=gen) < noise
    shift = torch.randint(1, 10, (len(noisy),), generator=gen)  # never the true class
    noisy[flip] = (noisy[flip] + shift[flip]) % 10
    return x[train], noisy, x[test], y[test], float(flip.float().mean())


def model_for(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


def train_one(name: str, seed: int, data, epochs: int, batch: int,
              lr: float) -> tuple[float, float]:
    """One run: the accuracy on the clean test labels and the forward/backward passes per
    step."""
    x_train, y_train, x_test, y_test, _ = data
    model = model_for(seed)
    steps = epochs * ((len(y_train) + batch - 1) // batch)
    opt = OPTIMIZERS[name](list(model.parameters()), lr, steps)
    base = getattr(opt, "base_optimizer", opt)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1000 + seed)
    two_pass = name not in ONE_PASS
    passes = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train), generator=gen).split(batch):
            xb, yb = x_train[idx], y_train[idx]
            if name == "esam-sds":
                passes += _sds_step(model, opt, xb, yb)
                sched.step()
                continue
            loss_fn(model(xb), yb).backward()
            passes += 1
            if two_pass:  # LookSAM, interval SAM, AE-SAM: one pass when first_step() says so
                if opt.first_step(zero_grad=True) is not False:
                    loss_fn(model(xb), yb).backward()
                    passes += 1
                    opt.second_step(zero_grad=True)
            else:
                opt.step()
                opt.zero_grad()
            sched.step()
    # MSAM's parameters hold the perturbed weights between steps: evaluate at w
    at_w = opt.unperturbed_weights() if isinstance(opt, fastsam.MSAM) else contextlib.nullcontext()
    with torch.no_grad(), at_w:
        return float((model(x_test).argmax(1) == y_test).float().mean()), passes / steps


def _sds_step(model, opt, xb, yb) -> float:
    """One ESAM step with sharpness-sensitive data selection (fastsam.esam_select): the first
    pass over the batch, a forward pass at w + e without a graph, the second pass over the
    selected samples. Returns the step's passes, counting a pass over a part of the batch as
    that part (the forward pass without a graph is not counted)."""
    per_sample = torch.nn.functional.cross_entropy
    before = per_sample(model(xb), yb, reduction="none")
    before.mean().backward()
    opt.first_step(zero_grad=True)
    with torch.no_grad():
        after = per_sample(model(xb), yb, reduction="none")
    chosen = fastsam.esam_select(before.detach(), after, SDS_GAMMA)
    per_sample(model(xb[chosen]), yb[chosen]).backward()
    opt.second_step(zero_grad=True)
    return 1.0 + len(chosen) / len(yb)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m fastsam.bench.train",
                                     description=__doc__.split("\n")[0].strip("`"))
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS),
                        default=list(OPTIMIZERS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--noise", type=float, default=0.4, help="fraction of noisy labels")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    env = environment(torch.device("cpu"))
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    results = {name: {"accuracy": [], "seconds": [], "passes_per_step": []}
               for name in args.optimizers}
    train_one("sgd", 0, load_digits(args.noise, 0), 1, args.batch, args.lr)  # warm-up, untimed
    for seed in range(args.seeds):
        data = load_digits(args.noise, seed)
        for name in args.optimizers:
            t0 = time.perf_counter()
            acc, passes = train_one(name, seed, data, args.epochs, args.batch, args.lr)
            results[name]["accuracy"].append(acc)
            results[name]["seconds"].append(time.perf_counter() - t0)
            results[name]["passes_per_step"].append(passes)
            print(f"# seed {seed} {name:<6} test accuracy {acc:.4f}", flush=True)
    print(f"digits, {args.noise:.0%} noisy training labels, {args.epochs} epochs, "
          f"{args.seeds} seeds; accuracy on clean test labels")
    print(f"{'optimizer':<12} {'accuracy mean ± std':>20} {'s per run':>10} "
          f"{'passes/step':>12}")
    for name, r in results.items():
        acc = r["accuracy"]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{name:<12} {100 * statistics.mean(acc):>12.2f} ± {100 * std:<5.2f} "
              f"{statistics.mean(r['seconds']):>10.1f} "
              f"{statistics.mean(r['passes_per_step']):>12.2f}")
    out = dict(environment=env, config=vars(args), results=results)
    save_json(args.json, **out)
    return out


if __name__ == "__main__":
    main()
