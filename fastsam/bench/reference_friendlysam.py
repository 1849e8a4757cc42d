"""FriendlySAM as its authors' published code runs it (Li et al., CVPR 2024), re-implemented
here per parameter for side-by-side benchmarks. Not used by fastsam.

  first_step:  per parameter with a gradient, a clone of g; on its first step the clone
               becomes m, else ``grad -= sigma·m`` in place and ``m = lmbda·m + (1 - lmbda)·g``
               (new tensors); per-tensor norms of the (ASAM-scaled) direction stacked into one
               global norm; per parameter a clone of w (``old_p``) and
               ``w += (w² if adaptive else 1)·grad·rho/(norm + 1e-12)``.
  second_step: ``p.data = old_p``, then ``base.step()``.
"""
import torch


class ReferenceFriendlySAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, sigma=1.0, lmbda=0.9, adaptive=False,
                 **kwargs):
        super().__init__(params, dict(rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive,
                                      **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.clone()
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = grad
                else:
                    p.grad -= state["momentum"] * group["sigma"]
                    state["momentum"] = (state["momentum"] * group["lmbda"]
                                         + grad * (1 - group["lmbda"]))
                scaled = torch.abs(p) * p.grad if group["adaptive"] else p.grad
                norms.append(scaled.norm(p=2))
        norm = torch.norm(torch.stack(norms), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_((torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()
