"""AE-SAM as its paper describes it (Jiang, Yang, Zhang and Kwok, ICLR 2023, "An Adaptive Policy
to Employ Sharpness-Aware Minimization"), re-implemented here per parameter in the manner of the
popular SAM (:mod:`fastsam.bench.popular_sam`) for side-by-side benchmarks. Not used by fastsam.

  first_step:  per parameter ‖g‖₂, stacked and normed into the global ‖g‖; its square read on
               the host and folded into the running mean and variance; when it stands out
               (``s >= mean + c·std``, c linear from ``lambda2`` to ``lambda1`` over
               ``total_steps``): a clone of w per parameter and ``w += rho·g/(‖g‖ + 1e-12)``,
               returning True; otherwise ``base.step()`` with g, returning False.
  second_step: each parameter back to its clone, then ``base.step()``.
"""
import math

import torch


class ReferenceAESAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, *, total_steps, lambda1, lambda2,
                 delta=0.9, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.total_steps, self.lambdas, self.delta = total_steps, (lambda1, lambda2), delta
        self.t, self.mean, self.var = 0, 0.0, 0.0

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        with_grads = [(group, p) for group in self.param_groups for p in group["params"]
                      if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for _, p in with_grads]), p=2)
        s = norm.item() ** 2
        self.mean = self.delta * self.mean + (1 - self.delta) * s
        self.var = self.delta * self.var + (1 - self.delta) * (s - self.mean) ** 2
        share = min(self.t / self.total_steps, 1.0)
        c = share * self.lambdas[0] + (1 - share) * self.lambdas[1]
        self.t += 1
        if s < self.mean + c * math.sqrt(self.var):
            self.base_optimizer.step()
            return False
        for group, p in with_grads:
            self.state[p]["old_p"] = p.data.clone()
            p.add_(p.grad * (group["rho"] / (norm + 1e-12)))
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()
