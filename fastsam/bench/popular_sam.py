"""A faithful re-implementation of the popular PyTorch SAM (github.com/davda54/sam, sam.py),
written here from its published behaviour, for side-by-side benchmarks. Not used by fastsam.

What it does, per step, and what that costs:
  first_step:  one norm per parameter (‖g‖₂, or ‖|w|·g‖₂ with adaptive=True), stacked and
               normed again into one global norm; then for every parameter a fresh clone of w
               (``old_p``, stored in the optimizer state, so it also lands in state_dict) and
               ``w += (w² if adaptive else 1)·g·ρ/(norm + 1e-12)``.
  second_step: ``p.data = old_p`` for every parameter (a storage swap), then ``base.step()``.
About 84 bytes per element with SGD momentum and 5-8 kernels per tensor, against fastsam's 40
bytes in 3-4 launches (docs/design.md §2).
"""
import torch


class PopularSAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _grad_norm(self):
        device = self.param_groups[0]["params"][0].device
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    scaled = torch.abs(p) * p.grad if group["adaptive"] else p.grad
                    norms.append(scaled.norm(p=2).to(device))
        return torch.norm(torch.stack(norms), p=2)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = p.grad * scale.to(p)
                if group["adaptive"]:
                    e_w = torch.pow(p, 2) * e_w
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()
