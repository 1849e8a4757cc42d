"""The native extension fastsam._C: its operators' input checks and schemas, a norm that does
not depend on the thread count and adds in the documented order, and compilation of the CUDA
sources (which only a GPU runs).

Numerical parity of the cpu/cuda backends over whole steps is in test_parity.py and
test_fused.py (the shared matrix)."""
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("FASTSAM_SKIP_BUILD") == "1", reason="pure-Python install (no fastsam._C)"
)

CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.fixture(scope="module")
def ops():
    from fastsam.backends import native

    if native._IMPORT_ERROR is not None:
        raise native._IMPORT_ERROR  # a failed build must fail here, with its reason
    return torch.ops.fastsam


def _tensors(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


SHAPES = [(4097,), (7,), (33, 65), (1,), (0,), (6, 3, 3, 3), (100_003,)]


# The sgd/adam operators' trailing gradient-source and averaging arguments, unused.
NO_GSAM = ([], None, 0.0, 0, [])
RHO = torch.tensor([0.05], dtype=torch.float64)  # perturb's rho per group (float64, on device)
# FriendlySAM's [sigma, lmbda, gain] per group (float64, on device)
MOMENTUM = torch.tensor([0.5, 0.9, 0.1], dtype=torch.float64)


def _norm(ops, params, grads, mode=0, q=2.0, eta=0.0):
    fp64 = params[0].dtype == torch.float64
    out = torch.zeros((), dtype=torch.float64 if fp64 else torch.float32)
    scratch = torch.zeros(0, dtype=torch.float64)
    ops.norm(params, grads, [len(params)], [mode], [eta], q, out, scratch, [])
    return out, scratch


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("mode,q", [(0, 2.0), (1, 2.0), (2, 2.0), (0, 1.0), (2, 1.5)])
def test_norm_is_bitwise_independent_of_thread_count(ops, mode, q):
    params, grads = _tensors(SHAPES, seed=1), _tensors(SHAPES, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _norm(ops, params, grads, mode, q, eta=0.01)
        torch.set_num_threads(max(2, threads))
        many, _ = _norm(ops, params, grads, mode, q, eta=0.01)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    # and it is the norm: against an fp64 sum written from the formula
    total = 0.0
    for w, g in zip(params, grads):
        w, g = w.double(), g.double()
        if mode == 1 or (mode == 2 and w.dim() < 2):
            g = g * (w.abs() + 0.01)
        elif mode == 2:
            g = g * (w.flatten(1).norm(dim=1) + 0.01).view(-1, *[1] * (w.dim() - 1))
        total += g.abs().pow(q).sum().item()
    assert math.isclose(float(one), total, rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gsam_along_is_the_formula_and_independent_of_thread_count(ops, dtype):
    adv, first = _tensors(SHAPES, dtype, seed=5), _tensors(SHAPES, dtype, seed=6)
    first = [f + 0.5 * a for f, a in zip(first, adv)]  # correlated, as in training
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = torch.zeros((), dtype=acc)
            ops.gsam_along(adv, first, 1e-12, out, torch.zeros(0, dtype=torch.float64))
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    a = torch.cat([t.double().flatten() for t in adv])
    f = torch.cat([t.double().flatten() for t in first])
    cosine = (a @ f) / (a.norm() * f.norm() + 1e-12)
    expected = float(cosine * f.norm() / (a.norm() + 1e-12))
    assert math.isclose(float(results[0]), expected, rel_tol=1e-5)


def _in_order_f32(terms, runs, lanes):
    """The accumulators of cpu_kernels.cpp's reductions over one segment, emulated in float32
    (docs/design.md §3): run k of r elements (r = n rounded down to a multiple of runs·lanes,
    divided by runs), element k·r + i into accumulator k·lanes + i % lanes, added one block
    after another. Returns the accumulators and the tail (the elements after the runs)."""
    n = terms.shape[0]
    run = n // (runs * lanes) * lanes
    blocks = np.concatenate([terms[k * run:(k + 1) * run].reshape(-1, lanes)
                             for k in range(runs)], axis=1)
    acc = (np.add.accumulate(blocks, axis=0, dtype=np.float32)[-1] if run
           else np.zeros(runs * lanes, np.float32))
    return acc, terms[runs * run:]


def _segments(tensors, chunk=32768):
    for t in tensors:
        flat = t.flatten().numpy()
        for start in range(0, flat.shape[0], chunk):
            yield slice(start, start + chunk), flat


def test_reductions_add_in_the_documented_order(ops):
    """The norm's and GSAM's per-segment partial sums are, to the bit, the order docs/design.md
    §3 and cpu_kernels.cpp state (four runs of 8 accumulators; GSAM: two runs per list),
    emulated here in float32 (a mutant that only reorders the accumulators fails this)."""
    params, grads = _tensors(SHAPES, seed=1), _tensors(SHAPES, seed=2)
    _, scratch = _norm(ops, params, grads)
    expected = []
    for part, g in _segments(grads):
        terms = g[part] * g[part]  # float32 products, as pow_q<kQ2>
        acc, tail = _in_order_f32(terms, runs=4, lanes=8)
        total = np.float32(0)
        for x in (*acc, *tail):
            total = np.float32(total + x)
        expected.append(float(total))
    assert scratch[:len(expected)].tolist() == expected

    adv, first = _tensors(SHAPES, seed=5), _tensors(SHAPES, seed=6)
    scratch = torch.zeros(0, dtype=torch.float64)
    ops.gsam_sums(adv, first, torch.zeros(3, dtype=torch.float64), scratch)
    expected = []
    for (part, a), (_, f) in zip(_segments(adv), _segments(first)):
        a, f = a[part], f[part]
        for terms in (f * a, a * a, f * f):  # inner, |adv|², |first|²
            acc, tail = _in_order_f32(terms, runs=2, lanes=8)
            total = 0.0
            for x in (*acc, *tail):
                total += float(x)
            expected.append(total)
    assert scratch[:len(expected)].tolist() == expected


# ----------------------------------------------------------------------------- checks
def test_operators_reject_mismatched_inputs_with_clear_messages(ops):
    w = _tensors([(5,), (3, 4)])
    hp = [0.0] * 4
    with pytest.raises(TypeError, match=r"sgd: grads\[1\] has dtype Double but params\[1\]"):
        ops.sgd(w, [w[0], w[1].double()], w, [], hp, None, False, False, False, *NO_GSAM)
    with pytest.raises(ValueError, match=r"w_old\[1\] has shape \[12\] but params\[1\] has \[3, 4"):
        ops.restore(w, [w[0], w[1].flatten()])
    with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
        ops.sgd(w, w[:1], w, [], hp, None, False, False, False, *NO_GSAM)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype Long"):
        ops.restore([torch.ones(3, dtype=torch.long)], [torch.ones(3, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"w_old\[1\] has strides \[1, 3\] but params\[1\] has "
                                         r"\[4, 1\] \(another memory format\)"):
        ops.restore(w, [w[0], torch.randn(4, 3).t()])
    with pytest.raises(ValueError, match=r"w_old\[1\] is not dense"):
        ops.restore(w, [w[0], torch.randn(3, 8)[:, ::2]])
    with pytest.raises(ValueError, match="hp has 2 values, needs 4"):
        ops.sgd(w, w, w, [], hp[:2], None, False, False, False, *NO_GSAM)
    with pytest.raises(ValueError, match="hp_device has 2 elements, needs 4"):
        ops.sgd(w, w, w, [], hp, torch.zeros(2, dtype=torch.float64), False, False, False,
                *NO_GSAM)
    with pytest.raises(TypeError, match="hp_device must be float64"):
        ops.sgd(w, w, w, [], hp, torch.zeros(4), False, False, False, *NO_GSAM)
    with pytest.raises(ValueError, match="group_sizes add up to 1 but there are 2 tensors"):
        ops.norm(w, w, [1], [0], [0.0], 2.0, torch.zeros(()), torch.zeros(0, dtype=torch.float64),
                 [])
    with pytest.raises(ValueError, match="group_modes"):
        ops.norm(w, w, [2], [7], [0.0], 2.0, torch.zeros(()), torch.zeros(0, dtype=torch.float64),
                 [])
    with pytest.raises(ValueError, match="call norm over the same tensors first"):
        ops.perturb(w, w, [t.clone() for t in w], [2], [0], [0.0], RHO, torch.ones(()),
                    torch.zeros(0, dtype=torch.float64), 2.0, 2.0, 1e-12, torch.zeros(()), [], [],
                    [])
    with pytest.raises(ValueError, match=r"perturb: keep has 1 tensors but params has 2"):
        ops.perturb(w, w, w, [2], [0], [0.0], RHO, torch.ones(()),
                    torch.zeros(4, dtype=torch.float64), 2.0, 2.0, 1e-12, torch.zeros(()), w[:1],
                    [], [])
    scratch4 = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="momentum lists given without group_momentum"):
        ops.norm(w, w, [2], [0], [0.0], 2.0, torch.zeros(()), scratch4, w)
    with pytest.raises(ValueError, match="group_momentum has 2 elements, needs 3"):
        ops.norm(w, w, [2], [0], [0.0], 2.0, torch.zeros(()), scratch4, w, MOMENTUM[:2])
    with pytest.raises(TypeError, match="group_momentum must be float64"):
        ops.norm(w, w, [2], [0], [0.0], 2.0, torch.zeros(()), scratch4, w, MOMENTUM.float())
    with pytest.raises(ValueError, match="perturb: momentum_next has 1 tensors but params has 2"):
        ops.perturb(w, w, [t.clone() for t in w], [2], [0], [0.0], RHO, torch.ones(()), scratch4,
                    2.0, 2.0, 1e-12, torch.zeros(()), [], w, w[:1], MOMENTUM)
    with pytest.raises(ValueError, match="keep and momentum together"):
        ops.perturb(w, w, [t.clone() for t in w], [2], [0], [0.0], RHO, torch.ones(()), scratch4,
                    2.0, 2.0, 1e-12, torch.zeros(()), w, w, w, MOMENTUM)
    with pytest.raises(ValueError, match="grad_mode 2 needs first_grads"):
        ops.sgd(w, w, w, [], hp, None, False, False, False, [], None, 0.0, 2, [])
    with pytest.raises(ValueError, match="grad_mode 1 needs along"):
        ops.sgd(w, w, w, [], hp, None, False, False, False, w, None, 0.5, 1, [])
    with pytest.raises(ValueError, match="grad_mode 3 needs along"):
        ops.sgd(w, w, w, [], hp, None, False, False, False, w, None, 0.0, 3, [])
    with pytest.raises(ValueError, match="grad_mode = 4"):
        ops.sgd(w, w, w, [], hp, None, False, False, False, w, None, 0.0, 4, [])
    with pytest.raises(ValueError, match="first_grads given with grad_mode 0"):
        ops.sgd(w, w, w, [], hp, None, False, False, False, w, None, 0.0, 0, [])
    with pytest.raises(ValueError, match=r"adam: first_grads\[1\] has shape \[12\]"):
        ops.adam(w, w, w, w, w, [], [0.0] * 8, None, True, False, False,
                 [w[0], w[1].flatten()], torch.zeros(()), 0.5, 1, [])
    with pytest.raises(TypeError, match="along must be float32 or float64"):
        ops.sgd(w, w, w, [], hp, None, False, False, False, w,
                torch.zeros((), dtype=torch.half), 0.5, 1, [])
    with pytest.raises(ValueError, match=r"sgd: average has 1 tensors but params has 2"):
        ops.sgd(w, w, w, [], [0.0] * 5, None, False, False, False, *NO_GSAM[:4],
                w[:1])
    with pytest.raises(ValueError, match=r"sgd: hp has 4 values, needs 5"):
        ops.sgd(w, w, w, [], hp, None, False, False, False, *NO_GSAM[:4], w)
    with pytest.raises(ValueError, match="gsam_along: first_grads has 1 tensors but grads has 2"):
        ops.gsam_along(w, w[:1], 1e-12, torch.zeros(()), torch.zeros(0, dtype=torch.float64))
    with pytest.raises(ValueError, match="gsam_sums: out has 1 elements, needs 3"):
        ops.gsam_sums(w, w, torch.zeros(()), torch.zeros(0, dtype=torch.float64))


def test_scratch_grows_onto_new_storage(ops):
    """norm and the GSAM reductions grow a too-small scratch by giving it new storage: the old
    storage is left as it was (a CUDA graph captured with it reads it at every replay; the
    backend holds it), where a resize would free it."""
    small, large = _tensors([(5,)], seed=3), _tensors([(5,), (100_003,)], seed=4)
    _, scratch = _norm(ops, small, small)
    for call in (lambda: ops.norm(large, large, [2], [0], [0.0], 2.0, torch.zeros(()), scratch,
                                  []),
                 lambda: ops.gsam_sums(large, large, torch.zeros(3), scratch)):
        before = scratch.untyped_storage()
        size, address = before.nbytes(), before.data_ptr()
        call()
        after = scratch.untyped_storage()
        assert after.data_ptr() != address and after.nbytes() > size
        assert (before.data_ptr(), before.nbytes()) == (address, size)


def test_operator_schemas_pass_opcheck(ops):
    """Mutation annotations, fake-tensor and autograd registration as torch.compile sees them."""
    params, grads = _tensors([(5,), (3, 4)], seed=3), _tensors([(5,), (3, 4)], seed=4)
    old = [torch.empty_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    out, scratch = _norm(ops, params, grads)  # scratch now has its size: no resize below
    skipped = torch.zeros(())
    sgd_hp = [0.1, 0.9, 0.0, 0.0]
    adam_hp = [1e-3, 0.9, 0.999, 1e-8, 0.0, 1e-2, 0.0447, 1.0]
    keep = [torch.empty_like(g) for g in grads]
    along = torch.tensor(0.25)

    def avg_hp(hp):  # the averaging weight follows the optimizer's scalars
        return hp + [0.3]

    calls = [
        (ops.norm.default, (params, grads, [2], [0], [0.0], 2.0, out, scratch, [])),
        (ops.norm.default, (params, grads, [2], [0], [0.0], 2.0, out, scratch, bufs, MOMENTUM)),
        (ops.perturb.default, (params, grads, old, [2], [0], [0.0], RHO, out, scratch, 2.0,
                               2.0, 1e-12, skipped, [], [], [])),
        (ops.perturb.default, (params, grads, old, [2], [3], [0.01], RHO, out, scratch, 2.0,
                               2.0, 1e-12, skipped, keep, [], [])),
        (ops.perturb.default, (params, grads, old, [2], [1], [0.0], RHO, out, scratch, 2.0,
                               2.0, 1e-12, skipped, [], bufs, keep, MOMENTUM)),
        (ops.restore.default, (params, old)),
        (ops.sgd.default, (params, grads, old, bufs, sgd_hp, None, False, False, False, *NO_GSAM)),
        (ops.sgd.default, (params, grads, old, bufs, sgd_hp, None, False, False, False, keep, along,
                           0.4, 1, [])),
        (ops.sgd.default, (params, grads, old, bufs, sgd_hp, None, False, False, False, keep, along,
                           0.0, 3, [])),
        (ops.adam.default, (params, grads, old, bufs, [b.clone() for b in bufs], [], adam_hp, None,
                            True, False, False, *NO_GSAM)),
        (ops.adam.default, (params, grads, old, bufs, [b.clone() for b in bufs], [], adam_hp, None,
                            True, False, False, keep, along, 0.4, 1, [])),
        (ops.sgd.default, (params, grads, old, bufs, sgd_hp, None, False, False, False,
                           [g.clone() for g in grads], None, 0.0, 2, [])),
        (ops.sgd.default, (params, grads, old, bufs, avg_hp(sgd_hp), None, False, False, False,
                           *NO_GSAM[:4], [p.clone() for p in params])),
        (ops.adam.default, (params, grads, old, bufs, [b.clone() for b in bufs], [],
                            avg_hp(adam_hp), None, True, False, False, *NO_GSAM[:4],
                            [p.clone() for p in params])),
        (ops.sgd.default, (params, grads, old, bufs, sgd_hp,
                           torch.tensor(sgd_hp, dtype=torch.float64), False, False, False,
                           *NO_GSAM)),
        (ops.gsam_along.default, (grads, keep, 1e-12, torch.zeros(()),
                                  torch.zeros(6, dtype=torch.float64))),
        (ops.gsam_sums.default, (grads, keep, torch.zeros(3), torch.zeros(6, dtype=torch.float64))),
    ]
    for op, args in calls:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def _poisoned(dtype, seed):
    """Tensors of SHAPES in ``dtype``, finite, holding their dtype's largest finite value (a
    check that squares or sums the values would overflow on it)."""
    out = _tensors(SHAPES, dtype, seed)
    out[2][0, 0] = torch.finfo(dtype).max
    out[6][5] = -torch.finfo(dtype).max
    return out


def test_nonfinite_finds_inf_and_nan_anywhere(ops):
    """skip_nonfinite's check (the held path's, csrc/kernels.h nonfinite) against
    torch.isfinite: every dtype in one call, inf, -inf and NaN at a tensor's first and last
    element, in a one-element tensor and deep in a tensor split across threads; `found` left as
    it was when all is finite (largest finite values included)."""
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    tensors = [t for k, dtype in enumerate(dtypes) for t in _poisoned(dtype, k)]
    found = torch.zeros(1)
    ops.nonfinite(tensors, found)
    assert found.item() == 0.0
    found.fill_(1.0)
    ops.nonfinite(tensors, found)  # a flag: only ever set
    assert found.item() == 1.0
    ops.nonfinite([], found.zero_())
    assert found.item() == 0.0
    places = [(0, (0,)), (0, (4096,)), (3, (0,)), (6, (0,)), (6, (71_234,)), (6, (100_002,)),
              (5, (5, 2, 2, 1)), (2, (32, 64))]
    for k, dtype in enumerate(dtypes):
        for value in (float("inf"), float("-inf"), float("nan")):
            for index, where in places:
                poisoned = _poisoned(dtype, k)
                poisoned[index][where] = value
                lists = tensors[:7 * k] + poisoned + tensors[7 * (k + 1):]
                assert not all(bool(torch.isfinite(t).all()) for t in lists)
                found.zero_()
                ops.nonfinite(lists, found)
                assert found.item() == 1.0, (dtype, value, index, where)


def test_nonfinite_checks_its_arguments(ops):
    tensors = _tensors([(5,), (3, 4)])
    with pytest.raises(TypeError, match="nonfinite: found must be float32"):
        ops.nonfinite(tensors, torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="nonfinite: found has 0 elements"):
        ops.nonfinite(tensors, torch.zeros(0))
    with pytest.raises(ValueError, match=r"nonfinite: tensors\[0\] is not dense"):
        ops.nonfinite([torch.zeros(4, 6)[:, ::2]], torch.zeros(1))
    torch.library.opcheck(ops.nonfinite.default, (tensors, torch.zeros(1)))


def test_scale_rounds_as_torchs_mul_by_a_factor_of_each_dtype(ops):
    """GradScaler's unscale on a held plan (csrc/kernels.h scale) against torch's own
    _foreach_mul_ by a 0-d factor of each dtype, bit for bit: every dtype in one call, a factor
    that is not a power of two (1/3 rounded to each dtype); a dtype without its factor is
    refused before anything is written."""
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    tensors = [t * 1000 for k, dtype in enumerate(dtypes) for t in _tensors(SHAPES, dtype, k)]
    factors = [torch.tensor(1 / 3, dtype=torch.float64).to(dtype) for dtype in dtypes]
    want = [t.clone() for t in tensors]
    for t in want:
        torch._foreach_mul_([t], factors[dtypes.index(t.dtype)])
    ops.scale(tensors, factors[::-1])  # (any order)
    assert all(torch.equal(a, b) for a, b in zip(tensors, want))
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match="scale: no factor of dtype Half"):
        ops.scale(tensors, [f for f in factors if f.dtype != torch.float16])
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    with pytest.raises(ValueError, match="needs the factor of each dtype"):
        ops.scale(tensors, [])
    with pytest.raises(ValueError, match=r"factors\[0\] must be one value"):
        ops.scale(tensors[:1], [torch.ones(2)])
    torch.library.opcheck(ops.scale.default, (_tensors([(5,), (3, 4)]), [torch.tensor(0.5)]))


def test_wsam_decoupled_is_both_foreach_passes_in_one(ops):
    """WSAM's decoupled term (csrc/kernels.h WsamArgs) against its two foreach passes in
    float64: first ← first − clip·g (stored in its dtype), then w ← w + alpha·first; with and
    without a clip coefficient (float32 and float64), every storage dtype, several steps."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        params = _tensors(SHAPES, dtype, seed=1)
        first = _tensors(SHAPES, dtype, seed=2)
        want_w = [p.to(torch.float64, copy=True) for p in params]  # (not the fp64 tensors)
        want_first = [f.to(torch.float64, copy=True) for f in first]
        clips = (None, torch.tensor(0.25), torch.tensor(3.0, dtype=torch.float64))
        for step, clip in enumerate(clips):
            grads = _tensors(SHAPES, dtype, seed=10 + step)
            alpha = -0.1 * (step + 1)
            ops.wsam_decoupled(params, first, grads, alpha, clip)
            c = 1.0 if clip is None else clip.item()
            for k, g in enumerate(grads):
                want_first[k] = (want_first[k] - c * g.double()).to(dtype).double()
                want_w[k] = (want_w[k] + alpha * want_first[k]).to(dtype).double()
            tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
            for got, want in zip(first + params, want_first + want_w):
                torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=r"wsam_decoupled: first\[1\] has shape"):
        ops.wsam_decoupled(params[:2], [params[0], params[0]], params[:2], 1.0)
    torch.library.opcheck(ops.wsam_decoupled.default,
                          (_tensors([(5,), (3, 4)]), _tensors([(5,), (3, 4)], seed=1),
                           _tensors([(5,), (3, 4)], seed=2), 0.5, torch.tensor(2.0)))


def test_cuda_backend_refused_on_cpu_parameters():
    import fastsam

    with pytest.raises(RuntimeError, match="cuda: parameters are on cpu"):
        fastsam.SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, backend="cuda")


@pytest.mark.gpu
def test_cuda_is_the_automatic_choice_on_a_gpu(ops):
    from fastsam.backends import select_backend

    assert ops.cuda_runnable(torch.cuda.current_device()) is True
    assert ops.cuda_runnable(10_000) is False  # no such device: refused, not an error
    assert select_backend(None, torch.device("cuda")).name == "cuda"


def test_missing_extension_is_explained(monkeypatch):
    from fastsam.backends import native, select_backend

    monkeypatch.setattr(native, "_IMPORT_ERROR", ImportError("libc10.so: cannot open"))
    with pytest.raises(RuntimeError, match="cpu: the fastsam._C extension is not importable"):
        select_backend("cpu", torch.device("cpu"))
    assert type(select_backend(None, torch.device("cpu"))).__name__ == "TorchBackend"


# ----------------------------------------------------------------------------- CUDA sources
def _nvcc():
    found = shutil.which("nvcc")
    if found is None and Path("/usr/local/cuda/bin/nvcc").exists():
        found = "/usr/local/cuda/bin/nvcc"
    if found is None:
        pytest.skip("nvcc not found: the CUDA sources are compiled where a CUDA toolkit exists")
    return found


def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """csrc/cuda_kernels.cu needs no torch headers: plain nvcc compiles it, warnings are errors."""
    cmd = [_nvcc(), "-std=c++17", "-O3", "-arch=sm_90", "--Werror", "all-warnings",
           "-c", str(CSRC / "cuda_kernels.cu"), "-o", str(tmp_path / "cuda_kernels.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_binding_compiles_with_cuda_enabled(tmp_path):
    """The CUDA half of csrc/binding.cpp (FASTSAM_WITH_CUDA), syntax- and type-checked against
    the installed torch's headers, which a CPU-only wheel ships too."""
    import sysconfig

    from torch.utils import cpp_extension

    roots = [os.environ.get("CUDA_HOME"), Path(_nvcc()).resolve().parent.parent, "/usr/local/cuda"]
    found = [Path(r) / "include" for r in roots
             if r and (Path(r) / "include" / "cuda_runtime_api.h").exists()]
    if not found:
        pytest.skip("CUDA toolkit headers not found (set CUDA_HOME)")
    cuda_include = found[0]
    # CPU wheels omit the one generated header of c10/cuda; its content is one macro.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = cpp_extension.include_paths() + [str(cuda_include), sysconfig.get_paths()["include"]]
    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-DFASTSAM_WITH_CUDA", f"-I{CSRC}"]
    cmd += [f"-I{p}" for p in includes] + [f"-idirafter{tmp_path}", str(CSRC / "binding.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- pass stores
def _at(offset, t):
    """A copy of t whose storage starts `offset` elements past the start of an allocation."""
    return torch.empty(t.numel() + offset, dtype=t.dtype)[offset:].view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pass_stores_are_the_same_bits_at_every_alignment(ops, dtype):
    """The cpu passes store the lists they do not read past the cache where the destination is
    16-byte aligned, block by block, and plainly elsewhere (csrc/cpu_kernels.cpp kStreamBlock):
    pass B's w_old and kept g are w and g exactly, a restore gives w_old back exactly, and the
    new w, w_old, g, momentum and Adam moments of perturb, sgd and adam are the same bits with
    every list starting aligned or 1-3 elements past (the blocks' tails, two segments)."""
    shapes = [(1,), (15,), (16,), (17,), (33, 65), (40_000,)]
    w0, g0, m0 = (_tensors(shapes, dtype, seed) for seed in (1, 2, 3))
    v0 = [t.abs() for t in _tensors(shapes, dtype, 4)]
    n = [len(shapes)]
    sgd_hp, adam_hp = [0.1, 0.9, 0.0, 0.01], [1e-2, 0.9, 0.999, 1e-8, 0.01, 1e-2, 0.5, 0.999]
    rho = torch.tensor([20.0], dtype=torch.float64)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    runs = []
    for offset in (0, 1, 2, 3):
        w, g, old, keep, buf, m, v = ([_at(offset, t) for t in ts]
                                      for ts in (w0, g0, m0, m0, m0, m0, v0))
        out, scratch = _norm(ops, w, g)
        ops.perturb(w, g, old, n, [0], [0.0], rho, out, scratch, 2.0, 2.0, 1e-12,
                    torch.zeros(()), keep, [], [])
        for a, b in zip(old, w0):
            assert torch.equal(a, b)  # w_old: w before the step, bit for bit
        for a, b in zip(keep, g0):
            assert torch.equal(a, b)
        for a, b, c in zip(w, w0, g0):  # w + rho·g/‖g‖ (moves of ~0.1: seen in bf16 too)
            assert not torch.equal(a, b)
            torch.testing.assert_close(a.double(), b.double() + 20 * c.double() / out.double()
                                       .sqrt(), **tol)
        perturbed = [t.clone() for t in w]
        ops.restore(w, old)
        for a, b in zip(w, w0):
            assert torch.equal(a, b)
        for a, b in zip(w, perturbed):
            a.copy_(b)
        ops.sgd(w, g, old, buf, sgd_hp, None, False, False, False, *NO_GSAM)
        sgd_w = [t.clone() for t in w]
        ops.adam(w, g, old, m, v, [], adam_hp, None, True, False, False, *NO_GSAM)
        runs.append([perturbed, sgd_w, buf, w, m, v])
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            for a, b in zip(got, want):
                assert torch.equal(a, b)


# ----------------------------------------------------------------------------- streaming kernels
def test_streaming_kernels_compute_what_they_stream(ops):
    """The benchmark's floor kernels (fastsam/bench/measure.py stream_rates) do their arithmetic:
    a read-only sum, a fill, a triad, the update's shape (d ← s·d + c, a ← b − s·d, both
    in the kernel's own float32 order), over odd sizes and misaligned starts."""
    for n in (1, 31, 4097, 100_003):
        x = torch.randn(n + 1)[1:]  # a start that is not 16-byte aligned
        out = torch.zeros((), dtype=torch.float64)
        ops.stream_read(x, out)
        assert math.isclose(out.item(), x.double().sum().item(), rel_tol=1e-5, abs_tol=1e-3)
        b, c = torch.randn(n), torch.randn(n)
        ops.stream_triad(x, b, c, 0.5)
        torch.testing.assert_close(x, b + 0.5 * c)
        ops.stream_fill(x, 2.5)
        assert torch.equal(x, torch.full((n,), 2.5))
        d = torch.randn(n + 3)[3:]
        want_d = 0.9 * d + c
        want_a = b - 0.9 * want_d
        ops.stream_update(x, b, c, d, 0.9)
        assert torch.equal(d, want_d) and torch.equal(x, want_a)


def test_streaming_kernels_check_their_arrays(ops):
    x = torch.zeros(8)
    with pytest.raises(TypeError, match="stream_fill: x must be float32"):
        ops.stream_fill(x.double(), 1.0)
    with pytest.raises(ValueError, match="stream_read: x must be contiguous"):
        ops.stream_read(torch.zeros(8, 2).t(), torch.zeros((), dtype=torch.float64))
    with pytest.raises(TypeError, match="out must be one float64 element"):
        ops.stream_read(x, torch.zeros(()))
    with pytest.raises(ValueError, match="stream_triad: c has 7 elements"):
        ops.stream_triad(x, torch.zeros(8), torch.zeros(7), 1.0)
    with pytest.raises(ValueError, match="stream_update: d has 9 elements"):
        ops.stream_update(x, torch.zeros(8), torch.zeros(8), torch.zeros(9), 1.0)
    for op, args in ((ops.stream_read.default, (x, torch.zeros((), dtype=torch.float64))),
                     (ops.stream_fill.default, (x, 1.0)),
                     (ops.stream_triad.default, (x, torch.ones(8), torch.ones(8), 2.0)),
                     (ops.stream_update.default,
                      (x, torch.ones(8), torch.ones(8), torch.ones(8), 0.5))):
        torch.library.opcheck(op, args)


def test_holds_checks_the_groups_by_identity_then_refreshes(ops):
    """HeldPlan.holds(param_groups), a held plan's check at each step call: None unless the
    groups are those bound (the same parameter objects in order, in a list or a tuple, and
    equal perturb values, a missing one True); then whether the plan still holds (refresh)."""
    from fastsam import _C

    a = [torch.zeros(1), torch.zeros(1), torch.ones(2)]
    for p in a:
        p.grad = torch.zeros_like(p)
    plan = _C.HeldPlan(a, [3], [])
    plan.bind_groups([a], (True,))
    assert plan.holds([{"params": a}]) is True
    assert plan.holds([{"params": list(a), "lr": 0.1}]) is True
    assert plan.holds([{"params": tuple(a), "perturb": True}]) is True
    for other in ([{"params": a, "perturb": False}],  # another perturb value
                  [{"params": a[:2]}], [{"params": a[::-1]}],
                  [{"params": [a[0], torch.zeros(1), a[2]]}],  # equal values, another object
                  [{"params": a}, {"params": []}], [], ({"params": a},), [{"lr": 0.1}], [a],
                  [{"params": set(a)}]):
        assert plan.holds(other) is None, other
    a[1].grad = None  # the groups are the same, the plan no longer holds
    assert plan.holds([{"params": a}]) is False
    a[1].grad = torch.zeros(1)
    assert plan.holds([{"params": a}]) is True

    class Refusing:
        def __eq__(self, other):
            raise RuntimeError("no comparison")

    with pytest.raises(RuntimeError, match="no comparison"):
        plan.holds([{"params": a, "perturb": Refusing()}])
    plan.bind_groups([a[:2], a[2:]], [True, False])  # bound again: these groups now
    assert plan.holds([{"params": a}]) is None
    assert plan.holds([{"params": a[:2]}, {"params": a[2:], "perturb": False}]) is True
    with pytest.raises(ValueError, match="as many members as perturbs"):
        plan.bind_groups([a], (True, False))
    with pytest.raises(TypeError, match="members"):
        plan.bind_groups(1, (True,))


def test_any_tensor_in_c_tells_what_the_loop_tells(ops):
    """fastsam._C.any_tensor (the held updates' check of their scalars) answers as
    fastsam.backends._constants.any_tensor: numbers (floats, ints, bools, in lists or tuples)
    are no tensors; a tensor, a Parameter, a 0-d or a subclass instance is one; other objects
    (a numpy float, None) are not; a non-sequence is refused."""
    from fastsam import _C
    from fastsam.backends._constants import any_tensor

    class Sub(torch.Tensor):
        pass

    t = torch.ones(())
    cases = [(), [], (1.0,), (1, True, 2.5, False, 0), [0.1, 0.9, 5e-4], (np.float64(1.0),),
             (None, "x"), (t,), [1.0, 2.0, t], (torch.nn.Parameter(torch.ones(2)),),
             (0.5, t.as_subclass(Sub)), (np.float64(2.0), 1, torch.zeros(3))]
    for values in cases:
        assert _C.any_tensor(values) is any_tensor(values), values
    assert [any_tensor(v) for v in cases] == [False] * 7 + [True] * 5  # (the oracle itself)
    for wrong in (iter([t]), {1.0}, t, 1.0):
        with pytest.raises(TypeError, match="list or tuple"):
            _C.any_tensor(wrong)


def test_clip_coefficient_rounds_as_torchs_operators(ops):
    """fastsam._C.clip_coefficient (max_grad_norm's coefficient on the CPU in one call) writes
    what the optimizer's torch operators write, bit for bit: min(1, max_norm / (sqrt(s) +
    1e-6)) in float32 and float64 (torch's own sqrt, which on the CPU is not always the
    correctly rounded one), NaN kept, over zero, tiny, huge, infinite and negative sums."""
    from fastsam import _C
    from fastsam.backends.native import NativeBackend

    def by_torch(s, max_norm):
        c, eps, m, one = (torch.empty_like(s) for _ in range(4))
        torch.sqrt(s, out=c).add_(eps.fill_(1e-6))
        torch.div(m.fill_(max_norm), c, out=c)
        return torch.minimum(c, one.fill_(1.0), out=c)

    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float64):
        sums = [0.0, 1e-30, 1e-12, 0.25, 1.0, 4.0, 1e6, float(torch.finfo(dtype).max),
                float("inf"), float("nan"), -1.0]
        sums += (torch.rand(300, generator=gen, dtype=torch.float64)
                 * 10.0 ** torch.randint(-8, 8, (300,), generator=gen)).tolist()
        for value in sums:
            for max_norm in (1e-3, 0.5, 1.0, 7.3, 1e5):
                s = torch.tensor(value, dtype=dtype)
                out = torch.empty_like(s)
                _C.clip_coefficient(s, max_norm, out)
                want = by_torch(s, max_norm)
                assert torch.equal(out, want) or (out.isnan() and want.isnan()), (value, max_norm)
    s, out = torch.tensor(4.0), torch.empty(())
    with pytest.raises(TypeError, match="one dtype"):
        _C.clip_coefficient(s, 1.0, torch.empty((), dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        _C.clip_coefficient(s.half(), 1.0, out.half())
    with pytest.raises(ValueError, match="one-element CPU tensor, got 2 elements"):
        _C.clip_coefficient(s, 1.0, torch.empty(2))
    with pytest.raises(ValueError, match="on meta"):
        _C.clip_coefficient(s, 1.0, torch.empty((), device="meta"))
    with pytest.raises(TypeError, match="takes"):
        _C.clip_coefficient(s, 1, out)
    # the backend takes the call on the CPU only (elsewhere the optimizer's torch operators)
    assert NativeBackend("cpu").clip_coefficient(s, 1.0, out)
    assert torch.equal(out, by_torch(s, 1.0)) and 0.4999 < out.item() < 0.5
    assert not NativeBackend("cpu").clip_coefficient(s, 1.0, torch.empty((), device="meta"))


def test_layout_key_changes_with_what_a_table_depends_on(ops):
    """fastsam._C.layout_key (the Triton launchers' table key): equal for the same tensors,
    different when any tensor is another (an equal copy), is viewed at another offset, changes
    dtype, or when a parameter's shape or strides change (channels_last); the lists' lengths
    and count are part of it. The Python fallback changes with the same things."""
    from fastsam import _C
    from fastsam.backends import triton as T

    w = [torch.zeros(2, 3, 4, 5), torch.zeros(7)]
    g = [torch.zeros(2, 3, 4, 5), torch.zeros(7)]
    key = _C.layout_key((w, g))
    assert isinstance(key[0], int) and isinstance(key[1], bytes)
    assert key == _C.layout_key((list(w), list(g)))
    # as the launchers' dict key: equal keys are one entry, the hash is the C loop's
    assert len({T._LayoutKey(key), T._LayoutKey(_C.layout_key((list(w), list(g))))}) == 1
    assert T._LayoutKey(key) != key and T._LayoutKey(key) != T._LayoutKey((key[0], b""))
    others = [
        ([w[0], w[1].clone()], g),                                    # another tensor
        (w, [g[0], g[1].double()]),                                   # another dtype
        ([w[0].contiguous(memory_format=torch.channels_last), w[1]], g),  # other strides
        ([w[0].view(6, 20), w[1]], g),                                # another shape
        (w, [g[0], torch.zeros(8)[1:]]),                              # another offset
        (w[:1], g[:1]),
    ]
    keys = {_C.layout_key(lists) for lists in others}
    assert key not in keys and len(keys) == len(others)
    assert len({h for h, _ in keys} | {key[0]}) == len(others) + 1  # the hashes differ too
    assert _C.layout_key((w,)) != key
    # the Python key (an install without the extension) sees the same changes
    in_python = {T._layout_key_in_python(lists) for lists in others}
    assert T._layout_key_in_python((w, g)) not in in_python and len(in_python) == len(others)
    assert T._layout_key_in_python((w, g)) == T._layout_key_in_python((list(w), list(g)))
    with pytest.raises(TypeError, match="tuple of lists"):
        _C.layout_key([w, g])
    with pytest.raises(TypeError, match="hold tensors"):
        _C.layout_key(([w[0], 1],))
