"""The numeric oracle: textbook per-parameter SAM/ASAM loops, written from the papers' formulas.

Never optimised, never shared with fastsam's code. The base update is torch.optim itself
(single-tensor path), so fastsam's fused updates are judged against torch.optim's semantics.
Element-wise arithmetic runs in the parameters' own dtype and reductions accumulate in fp64
(as torch's norms accumulate wide): give it fp64 copies for a high-precision reference, or
low-precision copies for the "eager low precision" baseline.
"""
from __future__ import annotations

import math

import numpy as np
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
            if not g.get("perturb", True):  # SAM-ON: a group out of the norm and of e
                continue
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


class OracleKeepingG(OracleSAM):
    """SAM's first step, keeping each parameter's first-pass gradient g in ``self.first``."""

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        self.first = {w: w.grad.clone() for g in self.groups for w in g["params"]
                      if w.grad is not None}
        super().first_step(zero_grad)


class OracleGSAM(OracleKeepingG):
    """GSAM (Zhuang et al., 2022): SAM's first step, keeping the first gradient g; before the
    base update, the adversarial gradient g_adv loses alpha times the part of g orthogonal to it,
    with the official code's eps placement::

        cos = <g, g_adv> / (|g_adv| |g| + eps),   v = g - cos |g| g_adv / (|g_adv| + eps)
        g_adv <- g_adv - alpha v

    ``alpha`` per group (key ``gsam_alpha``); reductions in fp64, one over every group.
    ``gamma`` given: the seed report's Adaptive-GSAM perturbation ``e = rho (|w| + gamma) g /
    (|g| + eps)`` instead of the groups' ``T``.
    """

    def __init__(self, groups, base_cls, eps=1e-12, gamma=None, **base_kwargs):
        super().__init__(
            [{k: v for k, v in g.items() if k != "gsam_alpha"} for g in groups], base_cls, p=2.0,
            eps=eps, **base_kwargs,
        )
        self.alphas = [g["gsam_alpha"] for g in groups]
        self.gamma = gamma
        self.first = {}

    def perturbation(self):
        if self.gamma is None:
            return super().perturbation()
        items = [(w, g["rho"]) for g in self.groups for w in g["params"] if w.grad is not None]
        norm = math.sqrt(sum(float((w.grad.double() ** 2).sum()) for w, _ in items))
        return [(w, rho * (w.abs() + self.gamma) * w.grad / (norm + self.eps)) for w, rho in items]

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        pairs = [(w, self.first[w], alpha) for g, alpha in zip(self.groups, self.alphas)
                 for w in g["params"] if w.grad is not None and w in self.first]
        inner = sum(float((g0.double() * w.grad.double()).sum()) for w, g0, _ in pairs)
        adv_norm = math.sqrt(sum(float((w.grad.double() ** 2).sum()) for w, _, _ in pairs))
        first_norm = math.sqrt(sum(float((g0.double() ** 2).sum()) for _, g0, _ in pairs))
        cosine = inner / (adv_norm * first_norm + self.eps)
        for w, g0, alpha in pairs:
            vertical = g0 - cosine * first_norm * w.grad / (adv_norm + self.eps)
            w.grad.sub_(alpha * vertical)
        super().second_step(zero_grad)


class OracleWSAM(OracleKeepingG):
    """WSAM (Yue et al., KDD 2023) per parameter: SAM's first step, keeping g; alpha =
    gamma / (1 - gamma). Not decoupled: the base step with g + alpha (g_adv - g). Decoupled: the
    base step with g, then w <- w - lr alpha (g_adv - g), each group's lr."""

    def __init__(self, groups, base_cls, gamma, decouple, eps=1e-12, **base_kwargs):
        super().__init__(groups, base_cls, p=2.0, eps=eps, **base_kwargs)
        self.alpha, self.decouple = gamma / (1 - gamma), decouple
        self.first = {}

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for w, old in self.w_old.items():
            w.copy_(old)
        self.w_old = {}
        adv = {}
        for w, g0 in self.first.items():
            adv[w] = w.grad.clone()
            w.grad = g0.clone() if self.decouple else g0 + self.alpha * (adv[w] - g0)
        self.base.step()
        if self.decouple:
            for group, base_group in zip(self.groups, self.base.param_groups):
                for w in group["params"]:
                    if w in adv:
                        w.sub_(base_group["lr"] * self.alpha * (adv[w] - self.first[w]))
        if zero_grad:
            self.zero_grad()


class OracleFriendlySAM(OracleSAM):
    """FriendlySAM (Li et al., CVPR 2024) per parameter, as the paper's code: on a parameter's
    first step m = g and the perturbation follows g; afterwards it follows d = g - sigma m, and
    then m <- lmbda m + (1 - lmbda) g. The perturbation is SAM's (or the popular ASAM's) with d
    in place of g. ``sigma``, ``lmbda`` per group."""

    def __init__(self, groups, base_cls, eps=1e-12, **base_kwargs):
        super().__init__(
            [{k: v for k, v in g.items() if k not in ("sigma", "lmbda")} for g in groups],
            base_cls, p=2.0, eps=eps, **base_kwargs,
        )
        self.coefficients = [(g["sigma"], g["lmbda"]) for g in groups]
        self.m = {}

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        for group, (sigma, lmbda) in zip(self.groups, self.coefficients):
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad.clone()
                if w not in self.m:
                    self.m[w] = g
                else:
                    w.grad = g - sigma * self.m[w]
                    self.m[w] = lmbda * self.m[w] + (1 - lmbda) * g
        super().first_step(zero_grad)


class OracleFreeSAM:
    """FreeSAM (seed report "SAM for free"), per parameter: the base optimizer steps with the
    previous step's gradient, and the current one is kept for the next step; a parameter's
    first step uses its current gradient. ``.grad`` is left as the backward pass wrote it."""

    def __init__(self, params, base_cls, **base_kwargs):
        self.params = list(params)
        self.base = base_cls(self.params, **base_kwargs)
        self.previous = {}

    @torch.no_grad()
    def step(self):
        current = {}
        for w in self.params:
            if w.grad is None:
                continue
            current[w] = w.grad.clone()
            used = self.previous.get(w, current[w])
            w.grad.copy_(used)
        self.base.step()
        for w, g in current.items():
            w.grad.copy_(g)
            self.previous[w] = g

    def zero_grad(self):
        for w in self.params:
            w.grad = None


class OracleLookSAM:
    """LookSAM (Liu et al., 2022), per parameter. Step t is a SAM step when t % k == 0: perturb
    by rho·g/(‖g‖ + eps), update with g_s (the gradient at w + e), and keep the unit direction
    u_v = g_v / (‖g_v‖ + eps) of g_v = g_s - (⟨g, g_s⟩/‖g‖²)·g (with the GSAM code's eps
    placement: ⟨g,g_s⟩/(‖g‖‖g_s‖ + eps) · ‖g_s‖/(‖g‖ + eps)). Other steps update with
    g + alpha·‖g‖·u_v and take no second pass; u_v = 0 when ‖g_v‖ ≤ 2·(ε_dtype·‖g_s‖ +
    eps·(1 + ‖g_s‖)/(‖g‖ + eps)) (g_v only what rounding and eps leave of a parallel g_s).
    ``groups``: dicts with ``params`` and ``rho`` (plus base-optimizer keys); reductions in
    fp64."""

    def __init__(self, groups, base_cls, k, alpha, eps=1e-12, **base_kwargs):
        self.groups, self.k, self.alpha, self.eps = groups, k, alpha, eps
        self.base = base_cls([{k_: v for k_, v in g.items() if k_ != "rho"} for g in groups],
                             **base_kwargs)
        self.t = 0
        self.w_old, self.g_first, self.u_v = {}, {}, {}

    def _with_grads(self):
        return [(w, g["rho"]) for g in self.groups for w in g["params"] if w.grad is not None]

    @staticmethod
    def _norm(tensors):
        return math.sqrt(sum(float((x * x).sum(dtype=torch.float64)) for x in tensors))

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        sam_step = self.t % self.k == 0
        self.t += 1
        items = self._with_grads()
        norm = self._norm([w.grad for w, _ in items])
        if sam_step:
            self.g_first = {w: w.grad.clone() for w, _ in items}
            for w, rho in items:
                self.w_old[w] = w.clone()
                w.add_(rho * w.grad / (norm + self.eps))
        else:
            for w, _ in items:
                if w in self.u_v:
                    w.grad.add_(self.alpha * norm * self.u_v[w])
            self.base.step()
        if zero_grad:
            self.zero_grad()
        return sam_step

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        pairs = [(w, self.g_first[w], w.grad) for w, _ in self._with_grads() if w in self.g_first]
        inner = sum(float((f * s).sum(dtype=torch.float64)) for _, f, s in pairs)
        first_norm = self._norm([f for _, f, _ in pairs])
        second_norm = self._norm([s for _, _, s in pairs])
        cosine = inner / (first_norm * second_norm + self.eps)
        along = cosine * second_norm / (first_norm + self.eps)
        g_v = {w: s - along * f for w, f, s in pairs}
        norm_v = self._norm(list(g_v.values()))
        # No resolvable part of g_s orthogonal to g (rho = 0: g_s = g): u_v = 0. Below the
        # floor g_v is rounding (the dtype's epsilon of ‖g_s‖) or what the eps constants in the
        # coefficient's denominators leave along g (at most eps·(1 + ‖g_s‖)/‖g‖; twice both).
        machine = max((torch.finfo(v.dtype).eps for v in g_v.values()), default=0.0)
        floor = 2 * (machine * second_norm
                     + self.eps * (1 + second_norm) / (first_norm + self.eps))
        real = norm_v > floor
        for w, v in g_v.items():
            self.u_v[w] = v / (norm_v + self.eps) if real else torch.zeros_like(v)
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


class OracleMSAM:
    """MSAM (Becker et al., 2024) per parameter, as the paper's algorithm: the parameters hold
    w~ = w - rho v / (|v| + eps) between steps (v: SGD's momentum buffer or Adam's first
    moment, one global norm in fp64 over the parameters with a gradient); a step restores w,
    applies the base optimizer's step with the gradient taken at w~, and perturbs again along
    the new v. A parameter's first step starts from its weights as they are. ``groups``: dicts
    with ``params``, ``rho`` and base-optimizer keys."""

    def __init__(self, groups, base_cls, eps=1e-12, **base_kwargs):
        self.groups, self.eps = groups, eps
        self.base = base_cls([{k: v for k, v in g.items() if k != "rho"} for g in groups],
                             **base_kwargs)
        self.w = {}

    @torch.no_grad()
    def step(self):
        stepped = [(p, g["rho"]) for g in self.groups for p in g["params"] if p.grad is not None]
        for p, _ in stepped:
            if p in self.w:
                p.copy_(self.w[p])
        self.base.step()
        key = "momentum_buffer" if isinstance(self.base, torch.optim.SGD) else "exp_avg"
        moms = [self.base.state[p][key] for p, _ in stepped]
        norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in moms))
        for (p, rho), v in zip(stepped, moms):
            self.w[p] = p.clone()
            p.sub_(rho * v / (norm + self.eps))

    def zero_grad(self):
        for g in self.groups:
            for p in g["params"]:
                p.grad = None


class OracleAESAM(OracleSAM):
    """AE-SAM (Jiang, Yang, Zhang and Kwok, 2023) per parameter. Each step: s = ‖g‖² over the
    parameters with a gradient (fp64), μ ← δ·μ + (1 − δ)·s, σ² ← δ·σ² + (1 − δ)·(s − μ)²
    (from μ = σ² = 0), c = (t/T)·λ1 + (1 − t/T)·λ2 with t/T at most 1; s ≥ μ + c·σ: SAM's two
    passes, otherwise the base optimizer's step with g (one pass). ``decisions``: the steps
    that were SAM steps."""

    def __init__(self, groups, base_cls, total_steps, lambda1, lambda2, delta, eps=1e-12,
                 **base_kwargs):
        for g in groups:
            g.setdefault("T", ("none", 0.0))
        super().__init__(groups, base_cls, eps=eps, **base_kwargs)
        self.total, self.lambdas, self.delta = total_steps, (lambda1, lambda2), delta
        self.t, self.mean, self.var, self.decisions = 0, 0.0, 0.0, []

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        s = sum(float((w.grad.double() ** 2).sum()) for g in self.groups
                if g.get("perturb", True) for w in g["params"] if w.grad is not None)
        d = self.delta
        self.mean = d * self.mean + (1 - d) * s
        self.var = d * self.var + (1 - d) * (s - self.mean) ** 2
        share = min(self.t / self.total, 1.0)
        c = share * self.lambdas[0] + (1 - share) * self.lambdas[1]
        self.t += 1
        sam = s >= self.mean + c * math.sqrt(self.var)
        self.decisions.append(sam)
        if sam:
            super().first_step(zero_grad)
        else:
            self.base.step()
            if zero_grad:
                self.zero_grad()
        return sam


# ESAM's counter-based mask, written from the definition in fastsam.functional.Mask's docstring
# with numpy's uint32 arithmetic (wrapping modulo 2**32), apart from fastsam's int64 code.
def _esam_mix(x):
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):  # the products wrap modulo 2**32 by design
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x21F0AAAD)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x735A2D97)
        return x ^ (x >> np.uint32(15))


def esam_key(seed, step):
    """(k0, k1) of a step: k0 = mix(seed_lo ^ mix(step_lo)), k1 = mix(seed_hi ^ mix(k0 ^
    step_hi))."""
    lo, hi = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    k0 = _esam_mix(lo ^ _esam_mix(np.uint32(step & 0xFFFFFFFF)))
    k1 = _esam_mix(hi ^ _esam_mix(k0 ^ np.uint32(step >> 32)))
    return int(k0), int(k1)


def esam_mask(key, position, w, beta, start=0):
    """The bool mask of tensor ``w`` at ``position``: element i (storage order, from
    ``start``) is kept when mix(mix(lo + b) ^ (c + hi)) < ceil(beta·2^32),
    b = mix(k0 ^ mix(position)), c = mix(k1 ^ b)."""
    with np.errstate(over="ignore"):
        b = _esam_mix(np.uint32(key[0]) ^ _esam_mix(np.uint32(position)))
        c = _esam_mix(np.uint32(key[1]) ^ b)
        i = np.arange(start, start + w.numel(), dtype=np.uint64)
        lo = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        hi = (i >> np.uint64(32)).astype(np.uint32)
        draw = _esam_mix(_esam_mix(lo + b) ^ (c + hi)).astype(np.uint64)
    kept = torch.from_numpy(draw < np.uint64(min(2**32, math.ceil(beta * 2**32))))
    if w.is_contiguous():
        return kept.view(w.shape)
    return kept.as_strided(w.shape, w.stride())  # a dense tensor in another memory format


class OracleESAM(OracleSAM):
    """ESAM (Du et al., ICLR 2022) per parameter, the paper's stochastic weight perturbation:
    e = (rho/beta)·m ⊙ T²g/(‖Tg‖ + eps) with m ~ Bernoulli(beta) element-wise (drawn by
    :func:`esam_mask`, positions counted over the parameters with a gradient, groups in order)
    and the norm over the whole gradient. ``beta`` per group; ``seed`` as ESAM's."""

    def __init__(self, groups, base_cls, seed, eps=1e-12, **base_kwargs):
        super().__init__([{k: v for k, v in g.items() if k != "beta"} for g in groups],
                         base_cls, p=2.0, eps=eps, **base_kwargs)
        self.betas = {w: g["beta"] for g in groups for w in g["params"]}
        self.seed, self.t = seed, 0

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        key = esam_key(self.seed, self.t)
        self.t += 1
        for position, (w, e) in enumerate(self.perturbation()):
            beta = self.betas[w]
            self.w_old[w] = w.clone()
            kept = esam_mask(key, position, w, beta).to(w.device)
            w.copy_(torch.where(kept, w + e / beta, w))
        if zero_grad:
            self.zero_grad()
