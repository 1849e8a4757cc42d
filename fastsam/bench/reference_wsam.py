"""WSAM as the paper describes it (Yue et al., KDD 2023, Algorithm 1), written per parameter
here for side-by-side benchmarks: there is no official PyTorch code to follow. Not used by
fastsam.

  first_step:  SAM's: per-parameter norms stacked into one global norm; for every parameter a
               fresh clone of g (kept) and of w (``old_p``); ``w += ρ·g/(norm + 1e-12)``.
  second_step: w restored from the clone; decoupled (the paper's default): ``.grad`` set to g,
               ``base.step()``, then ``w -= lr·α·(g_adv − g)`` per parameter with
               α = γ/(1 − γ); otherwise ``.grad = g + α·(g_adv − g)`` and ``base.step()``.
"""
import torch


class ReferenceWSAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, gamma=0.9, decouple=True, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.alpha, self.decouple = gamma / (1 - gamma), decouple

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                self.state[p]["grad"] = p.grad.clone()
                p.add_(p.grad * (group["rho"] / (norm + 1e-12)))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        adversarial = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
                g = self.state[p]["grad"]
                if self.decouple:
                    adversarial[p] = p.grad.clone()
                    p.grad.copy_(g)
                else:
                    p.grad.sub_(g).mul_(self.alpha).add_(g)
        self.base_optimizer.step()
        for group in self.param_groups:
            for p in group["params"]:
                if p in adversarial:
                    p.sub_((adversarial[p] - self.state[p]["grad"]) * (group["lr"] * self.alpha))
        if zero_grad:
            self.zero_grad()
