"""Behaviour of the fused backends (triton and the native cpu/cuda extension): launch counts,
address tables rebuilt when gradients move, many tiny tensors, mixed dtypes, non-finite
norms, refusals, no allocation in steady-state steps, and (on a GPU) full-size and > 2^31-element
tensors.

Numerical parity over whole steps is in test_parity.py (shared by every backend)."""
import math
import os

import pytest
import torch
from conftest import DEVICE, FUSED, HAS_TRITON
from harness import Landscape, clone_params, drive, make_params
from oracle import OracleSAM

import fastsam


@pytest.fixture(params=FUSED)
def fused(request):
    return request.param


def _backend(opt):
    return opt._backend_for(opt.param_groups[0]["params"][0].device)


def _launches_per_step(n_tensors, base_cls, **kw):
    pytest.importorskip("triton")
    shapes = [(3 + (i % 5),) for i in range(n_tensors)]
    params = make_params(shapes, torch.float32, DEVICE)
    opt = fastsam.SAM(params, base_cls, backend="triton", **kw)
    land = Landscape(shapes)
    drive(opt, params, land, 1)  # first step allocates state (SGD: a fresh-buffer launch)
    before = _backend(opt).launches
    drive(opt, params, land, 2)
    return (_backend(opt).launches - before) / 2


@pytest.mark.parametrize(
    "base_cls,kw",
    [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-3))],
)
def test_launches_independent_of_tensor_count(base_cls, kw):
    few = _launches_per_step(4, base_cls, **kw)
    many = _launches_per_step(96, base_cls, **kw)
    assert few == many == 4  # norm partials, norm sum, perturb, restore+update


def _sgd_pair(shapes, seed, backend):
    """fp64 parameters with a fused SAM + SGD-momentum optimizer, and the oracle's twin."""
    params = make_params(shapes, torch.float64, DEVICE, seed=seed)
    ref = clone_params(params)
    opt = fastsam.SAM(params, torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, backend=backend)
    oracle = OracleSAM([{"params": ref, "rho": 0.1, "T": ("none", 0.0)}], torch.optim.SGD,
                       foreach=False, lr=0.05, momentum=0.9)
    return params, ref, opt, oracle


def test_many_tiny_tensors_match_oracle(fused):
    # (the Triton interpreter runs each program in Python: fewer tensors there, still many)
    shapes = [(1 + (i * 7) % 13,) for i in range(120 if fused == "triton" else 320)]
    params, ref, opt, oracle = _sgd_pair(shapes, seed=2, backend=fused)
    land = Landscape(shapes, seed=3)
    drive(opt, params, land, 4)
    drive(oracle, ref, land, 4)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)


def test_table_rebuilt_when_gradients_move(fused):
    """Old gradient tensors stay alive (their memory keeps stale values) while new ones are
    allocated elsewhere: a stale address table would read the old gradients."""
    shapes = [(4097,), (7,), (33, 5)]
    params, ref, opt, oracle = _sgd_pair(shapes, seed=4, backend=fused)
    land = Landscape(shapes, seed=5)
    graveyard = []
    for _ in range(4):
        for o, ps in ((opt, params), (oracle, ref)):
            land.set_grads(ps)
            graveyard += [p.grad for p in ps]  # keep every old gradient alive
            o.first_step(zero_grad=True)
            land.set_grads(ps)
            graveyard += [p.grad for p in ps]
            o.second_step(zero_grad=True)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
    if fused == "triton":
        assert len(_backend(opt)._plans) > 2  # new addresses, new plans


def test_mixed_dtypes_in_one_group(fused):
    shapes = [(4097,), (7,), (6, 3, 3, 3), (65,)]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64]
    params = [p.to(dt) for p, dt in zip(make_params(shapes, torch.float64, DEVICE, 6), dtypes)]
    params = [torch.nn.Parameter(p.detach()) for p in params]
    ref = clone_params(params)
    opt = fastsam.ASAM(params, torch.optim.Adam, rho=0.5, normalization="filter", lr=1e-2,
                       backend=fused)
    oracle = OracleSAM([{"params": ref, "rho": 0.5, "T": ("filter", 0.01)}], torch.optim.Adam,
                       foreach=False, lr=1e-2)
    land = Landscape(shapes, seed=7)
    drive(opt, params, land, 7)
    drive(oracle, ref, land, 7)
    assert opt.backend == fused
    for p, r in zip(params, ref):
        tol = dict(rtol=1e-5, atol=1e-5) if p.dtype == torch.float32 else {}
        torch.testing.assert_close(p, r, **tol)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_norm_skips_perturbation(bad, fused):
    params = make_params([(4097,), (7,)], torch.float32, DEVICE, seed=8)
    before = [p.detach().clone() for p in params]
    opt = fastsam.SAM(params, torch.optim.SGD, lr=0.1, backend=fused)
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[3] = bad
    opt.first_step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)  # bit-identical: nothing perturbed
    assert float(opt._skips.perturb_skipped) == 1.0
    opt.second_step()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.first_step()
    assert float(opt._skips.perturb_skipped) == 0.0
    assert not torch.equal(params[0], before[0])


def test_triton_refused_on_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton: parameters are on cpu"):
        fastsam.SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1,
                    backend="triton")


MEMORY_FORMATS = [(6, 3, 3, 3), (8, 5), (7,)]  # a conv weight, a matrix, a bias


def _laid_out(params, transpose):
    """The conv weight in channels_last (dim 0 still outermost) and, with ``transpose``, the
    matrix transposed: dense, not contiguous."""
    w = params[0].detach().to(memory_format=torch.channels_last)
    m = params[1].detach().t().contiguous().t() if transpose else params[1].detach()
    return [torch.nn.Parameter(w), torch.nn.Parameter(m), params[2]]


@pytest.mark.parametrize("kind", ["none", "filter"])
def test_memory_formats_match_the_oracle(fused, kind):
    """channels_last and transposed parameters (gradients laid out alike, as autograd makes them)
    run on the fused backends, walking memory linearly: 4 steps of SAM (or filter-wise ASAM,
    whose filters are still dim-0 slices) + SGD momentum against the oracle, fp64; the state
    buffers take the parameters' layout."""
    # filter-wise ASAM needs dim 0 outermost: the transposed matrix is refused there (below)
    params = _laid_out(make_params(MEMORY_FORMATS, torch.float64, DEVICE, seed=21),
                       transpose=kind == "none")
    assert not params[0].is_contiguous() and params[1].is_contiguous() == (kind == "filter")
    ref = clone_params(params)
    land = Landscape(MEMORY_FORMATS, seed=22)
    T = ("filter", 0.01) if kind == "filter" else ("none", 0.0)
    opt = (fastsam.ASAM(params, torch.optim.SGD, rho=0.5, eta=0.01, normalization="filter",
                        lr=0.05, momentum=0.9, backend=fused) if kind == "filter"
           else fastsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9,
                            backend=fused))
    oracle = OracleSAM([{"params": ref, "rho": 0.5 if kind == "filter" else 0.05, "T": T}],
                       torch.optim.SGD, foreach=False, lr=0.05, momentum=0.9)
    drive(opt, params, land, 4)
    drive(oracle, ref, land, 4)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-10, atol=1e-12)
        assert opt.state[p]["momentum_buffer"].stride() == p.stride()


def test_layouts_the_kernels_cannot_walk_are_refused(fused):
    """Refused before anything is written, with the fix in the message: a gradient laid out
    unlike its parameter, a parameter that is not dense, filter-wise ASAM over a tensor whose
    filters are not contiguous blocks."""
    w = torch.nn.Parameter(torch.randn(8, 6, device=DEVICE).t())  # dense, transposed
    opt = fastsam.SAM([w], torch.optim.SGD, lr=0.1, backend=fused)
    w.grad = torch.ones(w.shape, device=DEVICE)  # contiguous: another layout than w
    before = w.detach().clone()
    with pytest.raises(ValueError, match="another memory format"):
        opt.first_step()
    assert torch.equal(w.detach(), before)
    gapped = torch.nn.Parameter(torch.randn(6, 16, device=DEVICE)[:, ::2])
    opt = fastsam.SAM([gapped], torch.optim.SGD, lr=0.1, backend=fused)
    gapped.grad = torch.ones_like(gapped)
    with pytest.raises(ValueError, match="not dense"):
        opt.first_step()
    w.grad = torch.ones_like(w)
    asam = fastsam.ASAM([w], torch.optim.SGD, normalization="filter", lr=0.1, backend=fused)
    with pytest.raises(ValueError, match="filter-wise ASAM needs each filter"):
        asam.first_step()
    assert torch.equal(w.detach(), before)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_resnet50_set_on_gpu(fused):
    """The full ResNet-50 parameter set, 3 steps of SAM + SGD momentum: fused vs the oracle."""
    from fastsam.bench.param_sets import resnet50

    shapes = resnet50()
    params = make_params(shapes, torch.float32, "cuda", seed=9)
    ref = clone_params(params)
    opt = fastsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9, backend=fused)
    oracle = OracleSAM([{"params": ref, "rho": 0.05, "T": ("none", 0.0)}], torch.optim.SGD,
                       foreach=False, lr=0.01, momentum=0.9)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
        for o, ps in ((opt, params), (oracle, ref)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.first_step()
            for p, g in zip(ps, grads):
                p.grad = (g * 0.5 + p.detach() * 0.1)
            o.second_step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_tensor_over_2_pow_31_elements(fused):
    """int64 offsets: a bf16 tensor of 2^31 + 1 elements, checked at its far end."""
    n = 2**31 + 1
    need = 4 * 2 * n + 8 * 2**20  # w, g, w_old, grad copies in bf16, plus slack
    free, _ = torch.cuda.mem_get_info()
    if free < 1.5 * need:
        pytest.skip(f"needs about {1.5 * need / 2**30:.0f} GiB of free GPU memory")
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16))
    w.grad = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    tail = slice(n - 4096, n)
    w0 = w.detach()[tail].float().clone()
    g0 = w.grad[tail].float().clone()
    norm = torch.linalg.vector_norm(w.grad, dtype=torch.float32)
    opt = fastsam.SAM([w], torch.optim.SGD, rho=0.05, lr=0.1, backend=fused)
    opt.first_step()
    # The reference norm sums in another order, and the kernel may fuse w + s*g into one FMA:
    # results agree to one bf16 rounding (relative 2^-8).
    one_ulp = dict(rtol=2**-7, atol=1e-6)
    expected = w0 + 0.05 * g0 / (norm + 1e-12)
    torch.testing.assert_close(w.detach()[tail].float(), expected, **one_ulp)
    assert torch.equal(opt._planner.w_old[w][tail].float(), w0)  # the copy is exact
    opt.second_step()  # grad unchanged: w = w_old - lr * g
    torch.testing.assert_close(w.detach()[tail].float(), w0 - 0.1 * g0, **one_ulp)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_compile_for_a_gpu():
    """Every Triton kernel, in the variants the backend launches (storage dtypes, q modes,
    GSAM/FreeSAM/LookSAM gradient sources, kept gradients, FriendlySAM's momentum, the clip
    coefficient, averaging, GSAM's sums), compiles to a cubin for sm_90 here: the compiled path
    is checked even where only the interpreter can run."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("triton_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("ok ") == 66


@pytest.mark.parametrize("lr", [1e-3, "tensor"])
@pytest.mark.parametrize("step", [None, 1.0, 7.0])
def test_adam_kernel_scalars_are_the_properties_values(lr, step):
    """AdamHyper.kernel_scalars forms step_size, bias_correction2_sqrt and decay inline (the
    properties cost a call each at every step): the same values, of the same type, as the
    properties the torch backend reads; a tensor lr included."""
    from fastsam.functional import AdamHyper

    lr = torch.tensor(3e-3, dtype=torch.float64) if lr == "tensor" else lr
    hyper = AdamHyper(lr, 0.9, 0.999, 1e-8, 0.01, True, False, False, step)
    want = (hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay,
            hyper.step_size, hyper.bias_correction2_sqrt, hyper.decay)
    got = hyper.kernel_scalars
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert type(a) is type(b)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
