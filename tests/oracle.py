"""The numeric oracle: textbook per-parameter SAM/ASAM loops, written from the papers' formulas.

Never optimised, never shared with fastsam's code. The base update is torch.optim itself
(single-tensor path), so fastsam's fused updates are judged against torch.optim's semantics.
Element-wise arithmetic runs in the parameters' own dtype and reductions accumulate in fp64
(as torch's norms accumulate wide): give it fp64 copies for a high-precision reference, or
low-precision copies for the "eager low precision" baseline.
"""
from __future__ import annotations

import math

import torch


def operator_T(w: torch.Tensor, kind: str, eta: float) -> torch.Tensor:
    """ASAM's T for one tensor, same shape as w."""
    if kind == "none":
        return torch.ones_like(w)
    if kind == "element" or w.dim() < 2:
        return w.abs() + eta
    assert kind == "filter", kind
    t = torch.empty_like(w)
    for i in range(w.shape[0]):  # one filter at a time, as the paper defines it
        t[i] = torch.sqrt((w[i] * w[i]).sum(dtype=torch.float64)) + eta
    return t


class OracleSAM:
    """SAM / ASAM over explicit groups.

    ``groups``: list of dicts with ``params``, ``rho``, ``T`` = (kind, eta) and any base-optimizer
    keys (lr, ...). ``p`` is the norm of the ball, ``eps`` the denominator constant.
    """

    def __init__(self, groups, base_cls, p=2.0, eps=1e-12, **base_kwargs):
        self.groups = groups
        self.p, self.eps = float(p), eps
        base_groups = [
            {k: v for k, v in g.items() if k not in ("rho", "T")} for g in groups
        ]
        self.base = base_cls(base_groups, **base_kwargs)
        self.w_old = {}

    def perturbation(self):
        """The list of (param, e) for every param with a gradient."""
        items = []
        for g in self.groups:
            kind, eta = g["T"]
            for w in g["params"]:
                if w.grad is not None:
                    items.append((w, w.grad, operator_T(w, kind, eta), g["rho"]))
        out = []
        if self.p == 2:
            squares = (float(((t * gr) ** 2).sum(dtype=torch.float64)) for _, gr, t, _ in items)
            norm = math.sqrt(sum(squares))
            for w, gr, t, rho in items:
                out.append((w, rho * t * t * gr / (norm + self.eps)))
        elif math.isinf(self.p):
            for w, gr, t, rho in items:
                out.append((w, rho * t * torch.sign(gr)))
        else:
            q = self.p / (self.p - 1)
            total = sum(
                float(((t * gr).abs() ** q).sum(dtype=torch.float64)) for _, gr, t, _ in items
            )
            denom = total ** (1 / self.p) + self.eps
            for w, gr, t, rho in items:
                u = t * gr
                out.append((w, rho * t * torch.sign(u) * u.abs() ** (q - 1) / denom))
        return out

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        for w, e in self.perturbation():
            self.w_old[w] = w.clone()
            w.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for w, old in self.w_old.items():
            w.copy_(old)
        self.w_old = {}
        self.base.step()
        if zero_grad:
            self.zero_grad()

    def zero_grad(self):
        for g in self.groups:
            for w in g["params"]:
                w.grad = None
