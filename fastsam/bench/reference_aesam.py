"""AE-SAM as its paper describes it (Jiang, Yang, Zhang and Kwok, ICLR 2023, "An Adaptive Policy
to Employ Sharpness-Aware Minimization"), re-implemented here per parameter over the popular SAM
(:mod:`fastsam.bench.popular_sam`) for side-by-side benchmarks. Not used by fastsam.

  first_step:  the popular SAM's global ‖g‖ (per-parameter norms, stacked and normed), its square
               read on the host and folded into the running mean and variance; when it stands
               out (``s >= mean + c·std``, c linear from ``lambda2`` to ``lambda1`` over
               ``total_steps``): the popular SAM's first step with that norm, returning True;
               otherwise ``base.step()`` with g, returning False.
  second_step: the popular SAM's (each parameter back to its clone, ``base.step()``).
"""
import math

import torch

from .popular_sam import PopularSAM


class ReferenceAESAM(PopularSAM):
    def __init__(self, params, base_optimizer, rho=0.05, *, total_steps, lambda1, lambda2,
                 delta=0.9, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.total_steps, self.lambdas, self.delta = total_steps, (lambda1, lambda2), delta
        self.t, self.mean, self.var = 0, 0.0, 0.0
        self._decided = None  # the norm of this step's decision, which its first step uses

    def _grad_norm(self):
        return self._decided

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        norm = super()._grad_norm()
        s = norm.item() ** 2
        self.mean = self.delta * self.mean + (1 - self.delta) * s
        self.var = self.delta * self.var + (1 - self.delta) * (s - self.mean) ** 2
        share = min(self.t / self.total_steps, 1.0)
        c = share * self.lambdas[0] + (1 - share) * self.lambdas[1]
        self.t += 1
        if s < self.mean + c * math.sqrt(self.var):
            self.base_optimizer.step()
            return False
        self._decided = norm
        super().first_step(zero_grad)
        return True
