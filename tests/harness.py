"""Problems and drivers shared by the tests: parameters, a weight-dependent gradient field, and
a loop that runs fastsam and the oracle side by side."""
from __future__ import annotations

import torch
from oracle import OracleSAM

# Odd sizes (DESIGN.md §4): scalars, a prime, just past a power of two, conv and matrix shapes,
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
        w64 = w.detach().double().cpu()
        g = 2 * self.c[i] * w64 + 0.5 * self.d[i] * torch.cos(2 * w64)
        return g.to(w.device, w.dtype)

    def set_grads(self, params, skip=()):
        for i, p in enumerate(params):
            p.grad = None if i in skip else self.grad(i, p)


def drive(opt, params, landscape, steps, skip=lambda t: ()):
    """``steps`` full SAM steps with the two-step API; ``skip(t)`` lists params without grads."""
    for t in range(steps):
        landscape.set_grads(params, skip(t))
        opt.first_step(zero_grad=True)
        landscape.set_grads(params, skip(t))
        opt.second_step(zero_grad=True)


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
