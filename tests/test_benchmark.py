"""The step benchmark as pytest-benchmark tests: opt-in, never part of the default run (timings on
shared machines are not pass/fail material). Run them with::

    pip install pytest-benchmark
    python -m pytest -m bench tests/test_benchmark.py

One test per optimizer × provider on the ResNet-50 parameter set, on the best device present;
pytest-benchmark prints the comparison table (``--benchmark-json`` saves it).
"""
import pytest
import torch

from fastsam.bench.param_sets import resnet50
from fastsam.bench.run import REFERENCES, build, providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [(o, p) for o in REFERENCES for p in providers(o, DEVICE)
         if not (p == "triton" and DEVICE.type == "cpu")]  # the interpreter is not a benchmark


@pytest.mark.bench
@pytest.mark.parametrize("optimizer,provider", CASES, ids=[f"{o}-{p}" for o, p in CASES])
def test_step(request, optimizer, provider):
    pytest.importorskip("pytest_benchmark")
    benchmark = request.getfixturevalue("benchmark")
    benchmark.group = f"resnet50 {optimizer}"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE, generator=gen)) for s in resnet50()]
    for p in params:
        p.grad = torch.randn(p.shape, device=DEVICE, generator=gen)
    step, _ = build(provider, optimizer, params)
    step()  # state and buffers

    def synced_step():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(synced_step, rounds=10, warmup_rounds=2)
    assert all(torch.isfinite(p).all() for p in params)
