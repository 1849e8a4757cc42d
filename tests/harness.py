"""Problems and drivers shared by the tests: parameters, a weight-dependent gradient field, a
loop that runs fastsam and the oracle side by side, a small classifier with its data, the
optimizer configurations every cross-cutting test runs, and the one-step driver. Test modules
share code through this module only (none imports another)."""
from __future__ import annotations

import contextlib

import torch
from conftest import DEVICE
from oracle import OracleSAM

import fastsam

LOSS = torch.nn.functional.cross_entropy

# Odd sizes (docs/design.md §4): scalars, a prime, just past a power of two, conv and matrix shapes,
# an empty tensor.
SHAPES = [(1,), (7,), (4097,), (6, 3, 3, 3), (33, 65), (0,), (5,), (65537,)]


def make_params(shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype))
        for s in shapes
    ]


def clone_params(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


class Landscape:
    """g_i(w) = 2·c_i⊙w + 0.5·d_i⊙cos(2w): smooth, non-convex, different at the perturbed point
    (curvature kept moderate so fp32 rounding is not amplified much over 7 steps).

    The gradient is computed in fp64 from the current weights and cast to the weights' dtype, so
    two optimizers that hold the same weights receive the same gradients."""

    def __init__(self, shapes, seed=1):
        gen = torch.Generator().manual_seed(seed)
        self.c = [torch.rand(s, generator=gen, dtype=torch.float64) for s in shapes]
        self.d = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    def grad(self, i, w):
        """The gradient at ``w``, laid out as ``w`` (autograd's gradient layout contract: a
        dense parameter's gradient has its strides)."""
        w64 = w.detach().double().cpu()
        g = 2 * self.c[i] * w64 + 0.5 * self.d[i] * torch.cos(2 * w64)
        return torch.empty_like(w).copy_(g)

    def set_grads(self, params, skip=()):
        for i, p in enumerate(params):
            p.grad = None if i in skip else self.grad(i, p)


def drive(opt, params, landscape, steps, skip=(), first=0):
    """``steps`` whole steps, from step ``first``, of a fastsam optimizer, an oracle or a
    reference implementation, with the gradients of ``landscape`` at the current weights. A
    step is one pass (FreeSAM's ``step()``, LookSAM's look-ahead steps, whose ``first_step()``
    returns False) or two (``first_step``, ``second_step``). ``skip``: step -> the parameters
    without a gradient then (a dict, or a function of the step). Returns the backward passes."""
    def without(t):
        return skip.get(t, ()) if isinstance(skip, dict) else skip(t) if callable(skip) else ()

    passes = 0
    for t in range(first, first + steps):
        landscape.set_grads(params, without(t))
        passes += 1
        if not hasattr(opt, "second_step") or isinstance(opt, (fastsam.FreeSAM, fastsam.MSAM)):
            opt.step()
        elif opt.first_step(zero_grad=True) is not False:
            landscape.set_grads(params, without(t))
            passes += 1
            opt.second_step(zero_grad=True)
    return passes


def assert_follows_oracle(opt, params, oracle, ref, base, steps=7):
    """``steps`` steps of ``opt`` and of ``oracle`` on one landscape: the same backward passes,
    weights and base-optimizer state (``base``: the oracle's torch.optim optimizer) at fp64
    tolerance. Returns the backward passes."""
    land = Landscape([tuple(p.shape) for p in params])
    passes = drive(opt, params, land, steps)
    assert drive(oracle, ref, land, steps) == passes
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
    assert_state_close(opt, params, base, ref, rtol=1e-10, atol=1e-12)
    return passes


def split_groups(params, specs):
    """Two groups: the first three params and the rest, with per-group options from ``specs``."""
    return [{"params": params[:3], **specs[0]}, {"params": params[3:], **specs[1]}]


def oracle_for(params, specs, T, base_cls, p=2.0, eps=1e-12, **base_kwargs):
    """An oracle over ``params`` with the same grouping; ``T[k]`` = (kind, eta) of group k."""
    groups = split_groups(params, specs)
    for g, t in zip(groups, T):
        g["T"] = t
    return OracleSAM(groups, base_cls, p=p, eps=eps, foreach=False, **base_kwargs)


STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


def assert_state_close(fast_opt, fast_params, ref_opt, ref_params, **tol):
    for p, r in zip(fast_params, ref_params):
        fs, rs = fast_opt.state.get(p, {}), ref_opt.state.get(r, {})
        assert set(fs) == set(rs), (set(fs), set(rs))
        for key in STATE_KEYS:
            if key in rs and rs[key] is not None:
                torch.testing.assert_close(
                    fs[key].double().cpu(), rs[key].double().cpu(), msg=key, **tol
                )


def small_model(seed=0):
    """A two-layer classifier (6 → 16 → 3) on the test device."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).to(DEVICE)


def small_data():
    """32 samples for :func:`small_model`."""
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(32, 6, generator=gen).to(DEVICE),
            torch.randint(0, 3, (32,), generator=gen).to(DEVICE))


# One configuration per optimizer, with options that exercise its state: the cross-cutting
# tests (capturable, dtypes, checkpoints) run each of them.
CONFIGS = {
    "sam_sgd_nesterov": lambda ps, rho=0.1, **kw: fastsam.SAM(
        ps, torch.optim.SGD, rho=rho, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
        **kw),
    "sam_sgd_dampening": lambda ps, rho=0.1, **kw: fastsam.SAM(
        ps, torch.optim.SGD, rho=rho, lr=0.1, momentum=0.9, dampening=0.5, **kw),
    "asam_adam_amsgrad": lambda ps, rho=0.5, **kw: fastsam.ASAM(
        ps, torch.optim.Adam, rho=rho, lr=1e-2, amsgrad=True, **kw),
    "gsam_adamw": lambda ps, rho=0.05, **kw: fastsam.GSAM(
        ps, torch.optim.AdamW, rho=rho, alpha=0.3, lr=1e-2, weight_decay=0.1, **kw),
    "freesam_sgd": lambda ps, **kw: fastsam.FreeSAM(
        ps, torch.optim.SGD, lr=0.1, momentum=0.9, **kw),
    # interval SAM: SAM steps at 0, 2, 4, 6, AdamW's plain steps between
    "sam_interval_adamw": lambda ps, rho=0.1, **kw: fastsam.SAM(
        ps, torch.optim.AdamW, rho=rho, lr=1e-2, weight_decay=0.05, interval=2, **kw),
    # WSAM's weighted gradient (the decoupled form takes neither averaging nor capturable)
    "wsam_sgd": lambda ps, rho=0.1, **kw: fastsam.WSAM(
        ps, torch.optim.SGD, rho=rho, gamma=0.8, decouple=False, lr=0.05, momentum=0.9, **kw),
    # SAM steps at 0, 2, 4, 6, look-ahead steps between
    "looksam_adam": lambda ps, rho=0.1, **kw: fastsam.LookSAM(
        ps, torch.optim.Adam, rho=rho, k=2, alpha=0.5, lr=1e-2, **kw),
}


_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def no_host_reads(active=True):
    """Fail on any Python-level read of a tensor's value (what waits for a GPU)."""
    if not active:
        yield
        return
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"a step read a tensor on the host (Tensor.{name})")
        return read

    for name in _READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def sync_errors(active=True):
    """On a GPU: fail on any synchronisation with the host (what a host read costs there)."""
    if not active:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def step(model, opt, x, y, scaler=None, poison=None, guard=(False, False),
         refuse=no_host_reads):
    """One step (two passes, or one: FreeSAM, LookSAM's look-ahead steps). ``poison``: True
    puts an inf into the gradient the update uses; ``(pass, value)`` puts ``value`` into the
    gradient of pass "first" or "update" (a one-pass step has only the update's). ``guard``:
    (first pass guarded, update guarded), by ``refuse``. Gradients are zeroed in place: they
    keep their addresses, as in a captured step (new addresses make the fused backends build
    new launch tables on the host, from host data)."""
    where, value = ("update", float("inf")) if poison is True else poison or (None, None)
    scale = scaler.scale if scaler else (lambda loss: loss)

    def backward(pass_):
        scale(LOSS(model(x), y)).backward()
        if pass_ == where:
            next(model.parameters()).grad.view(-1)[0] = value

    if getattr(opt, "sam_step_next", not isinstance(opt, (fastsam.FreeSAM, fastsam.MSAM))):
        backward("first")
        with refuse(guard[0]):
            opt.first_step()
        opt.zero_grad(set_to_none=False)
    else:
        where = "update" if where else where  # one pass: the update's
    backward("update")
    with refuse(guard[1]):
        if scaler:
            scaler.step(opt)
        else:
            opt.step()
    if scaler:
        scaler.update()
    opt.zero_grad(set_to_none=False)


