"""Production use: gradient accumulation, determinism, torch.compile, and bad input refused with
clear errors (issue 8; GradScaler, non-finite gradients, DDP/FSDP2 and capturable=True have
their own files)."""
import copy

import pytest
import torch
from conftest import DEVICE
from harness import CONFIGS
from harness import step as _step

import fastsam


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model.to(DEVICE, dtype)


def _data(n=32, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=gen, dtype=dtype).to(DEVICE)
    y = torch.randint(0, 3, (n,), generator=gen).to(DEVICE)
    return x, y


def test_gradient_accumulation_matches_one_big_batch(backend):
    """Both passes over the same micro-batches, each loss divided by their number: the same
    steps as one batch of all of them (the README's pattern)."""
    x, y = _data()
    loss_fn = torch.nn.functional.cross_entropy
    big, small = _model(), _model()
    opts = [fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
            for m in (big, small)]
    micro = list(zip(x.chunk(4), y.chunk(4)))
    for _ in range(3):
        loss_fn(big(x), y).backward()
        opts[0].first_step(zero_grad=True)
        loss_fn(big(x), y).backward()
        opts[0].second_step(zero_grad=True)

        for xb, yb in micro:
            (loss_fn(small(xb), yb) / len(micro)).backward()
        opts[1].first_step(zero_grad=True)
        for xb, yb in micro:  # the same micro-batches, at the perturbed weights
            (loss_fn(small(xb), yb) / len(micro)).backward()
        opts[1].second_step(zero_grad=True)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [fastsam.SAM, fastsam.GSAM])
def test_two_identical_runs_are_bitwise_equal(backend, cls):
    x, y = _data(dtype=torch.float32)
    results = []
    for _ in range(2):
        model = _model(dtype=torch.float32)
        opt = cls(model.parameters(), torch.optim.AdamW, lr=1e-2, backend=backend)
        for _ in range(4):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    """torch.compile (inductor) of a whole training step that calls the optimizer: it gives the
    eager numbers, and the optimizer is traced, not left eager behind a graph break: the
    compiled graphs hold the passes' own operators (the native backend's norm, perturb and
    fused SGD update; the foreach update of the torch backend without the extension)."""
    x, y = _data(dtype=torch.float32)
    models = [_model(dtype=torch.float32), _model(dtype=torch.float32)]
    opts = [fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9) for m in models]
    traced: set[str] = set()

    def recording(gm, example_inputs):
        traced.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    def step(model, opt):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.second_step(zero_grad=True)
        return loss.detach()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=recording)
    for _ in range(3):
        torch.testing.assert_close(compiled(models[0], opts[0]), step(models[1], opts[1]),
                                   rtol=1e-5, atol=1e-6)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if opts[0].backend in ("cpu", "cuda"):
        expected = ("fastsam.norm", "fastsam.perturb", "fastsam.sgd")
    else:
        expected = ("_foreach_norm", "_foreach_add_")
    missing = [op for op in expected if not any(op in name for name in traced)]
    assert not missing, (missing, sorted(traced))


def test_integer_parameters_are_refused():
    with pytest.raises(TypeError, match="floating-point parameters; got a torch.int64 tensor"):
        fastsam.SAM([torch.nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)],
                    torch.optim.SGD, lr=0.1)
    opt = fastsam.SAM([torch.nn.Parameter(torch.ones(3))], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="floating-point parameters"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int32)]})


def test_state_of_another_model_is_refused_before_loading(backend):
    def trained(shape):
        p = torch.nn.Parameter(torch.ones(shape, device=DEVICE))
        opt = fastsam.SAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
        for _ in range(2):
            p.grad = torch.ones_like(p)
            opt.first_step()
            p.grad = torch.ones_like(p)
            opt.second_step()
        return p, opt

    _, other = trained(3)
    p, opt = trained(5)
    before = opt.state[p]["momentum_buffer"].clone()
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter 0 has shape \(3,\), "
                                         r"but the parameter has shape \(5,\)"):
        opt.load_state_dict(other.state_dict())
    assert torch.equal(opt.state[p]["momentum_buffer"], before)  # nothing was loaded
    sd = opt.state_dict()
    sd["state"] = {**sd["state"], 7: sd["state"][0]}
    with pytest.raises(ValueError, match="entry for parameter 7, but its param_groups do not"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("name", ["sam_sgd_nesterov", "asam_adam_amsgrad", "freesam_sgd",
                                  "looksam_adam"])
def test_loaded_state_takes_the_parameters_dtype(backend, name):
    """A state dict saved by an fp64 run loads into an fp32 optimizer as torch.optim loads one:
    every floating-point state tensor (fastsam's too: averages, FreeSAM's stored gradients,
    LookSAM's direction) takes its parameter's dtype, the step count is kept as saved; the run
    then continues exactly as from the same state cast to fp32 by hand (the fused kernels read
    each buffer with its parameter's dtype: a buffer left in fp64 would be read out of bounds)."""
    x, y = _data(dtype=torch.float32)

    def run(dtype, steps, state=None):
        model = _model(dtype=dtype)
        opt = CONFIGS[name](model.parameters(), backend=backend, average="ema")
        if state is not None:
            opt.load_state_dict(state)
        for _ in range(steps):
            _step(model, opt, x.to(dtype), y, None, False, (False, False))
        return model, opt

    _, saved = run(torch.float64, 3)
    saved = saved.state_dict()
    by_hand = {**saved, "state": {
        i: {k: v.float() if k != "step" and v.is_floating_point() else v for k, v in s.items()}
        for i, s in saved["state"].items()}}
    fp64_keys = {k for s in saved["state"].values() for k, v in s.items()
                 if k != "step" and v.dtype == torch.float64}
    assert {"exp_avg", "averaged_weights"} & fp64_keys  # the check below is not vacuous
    # (copies: as in torch.optim, a loaded step count is the saved tensor itself)
    loaded, loaded_opt = run(torch.float32, 3, copy.deepcopy(saved))
    reference, reference_opt = run(torch.float32, 3, copy.deepcopy(by_hand))
    for a, b in zip(loaded.parameters(), reference.parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    with loaded_opt.averaged_weights(), reference_opt.averaged_weights():
        assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(),
                                                      reference.parameters()))
    resaved = loaded_opt.state_dict()["state"]
    for i, s in saved["state"].items():
        assert set(resaved[i]) == set(s)
        for key in fp64_keys & set(s):
            assert resaved[i][key].dtype == torch.float32, key


def test_parameters_on_two_devices_are_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2, device="cuda"))
    opt = fastsam.SAM([a, b], torch.optim.SGD, lr=0.1, backend="torch")
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    with pytest.raises(RuntimeError, match="every parameter with a gradient on one device"):
        opt.first_step()


@pytest.mark.parametrize("normalization", ["filter", "element"])
def test_empty_parameters_take_no_part(backend, normalization):
    """Tensors with no elements (an FSDP2 shard can be one: 1 row over 2 ranks) change nothing:
    the same steps with and without them give the same weights."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(0, 3), (4, 3), (3, 0), (5,)]
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for _ in range(4)]

    def run(keep):
        params = [torch.nn.Parameter(start[i].clone()) for i in keep]
        opt = fastsam.ASAM(params, torch.optim.SGD, rho=0.5, normalization=normalization,
                           lr=0.1, momentum=0.9, backend=backend)
        for step in range(2):
            for p, i in zip(params, keep):
                p.grad = grads[2 * step][i].clone()
            opt.first_step()
            for p, i in zip(params, keep):
                p.grad = grads[2 * step + 1][i].clone()
            opt.second_step()
        return {i: p.detach() for p, i in zip(params, keep)}

    with_empty, without = run([0, 1, 2, 3]), run([1, 3])
    for i in (1, 3):
        torch.testing.assert_close(with_empty[i], without[i], rtol=1e-14, atol=0)
        assert not torch.equal(with_empty[i], start[i])


def test_meta_parameters_are_refused_at_the_step():
    """An optimizer over a meta-device model (shapes only, no data) cannot step: refused with a
    message that says to build it after materializing (to_empty makes new parameters). Only the
    torch backend accepts meta tensors at all; the fused ones refuse them when built."""
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    with pytest.raises(RuntimeError, match="is on the meta device .* build the optimizer"):
        opt.first_step()
    assert not opt._perturbed
