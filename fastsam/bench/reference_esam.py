"""ESAM's stochastic weight perturbation as its paper describes it (Du, Yan, Feng, Zhou, Zhen,
Goh and Tan, ICLR 2022, "Efficient Sharpness-aware Minimization for Improved Training of Neural
Networks"), re-implemented here per parameter over the popular SAM
(:mod:`fastsam.bench.popular_sam`) for side-by-side benchmarks. Not used by fastsam.

  first_step:  the popular SAM's global ‖g‖; then for every parameter a fresh clone of w, a
               Bernoulli(beta) mask from torch's generator (``torch.rand_like(p) < beta``, a
               fresh tensor per parameter) and ``w += mask·g·ρ/(beta·(norm + 1e-12))``.
  second_step: the popular SAM's (each parameter back to its clone, ``base.step()``).

(The authors' own code draws per parameter tensor instead; docs/variants.md, ESAM.)
"""
import torch

from .popular_sam import PopularSAM


class ReferenceESAM(PopularSAM):
    def __init__(self, params, base_optimizer, rho=0.05, beta=0.5, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.beta = beta

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (self.beta * (grad_norm + 1e-12))
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                mask = torch.rand_like(p) < self.beta
                p.add_(p.grad * mask * scale.to(p))
        if zero_grad:
            self.zero_grad()
