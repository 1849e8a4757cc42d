"""A faithful re-implementation of the official PyTorch GSAM (github.com/juntang-zhuang/GSAM,
gsam/gsam.py), written here from its published behaviour, for side-by-side benchmarks of the
optimizer's own work. Not used by fastsam.

The official ``step()`` runs both forward/backward passes itself; this class exposes the
optimizer-side work between and after them as ``first_step``/``second_step`` so the
benchmark can time exactly that. Per step it does what the official code does:
  first_step:  one global norm from per-parameter norms (‖g‖₂, or ‖|w|·g‖₂ with adaptive);
               for every parameter a fresh clone of g (``old_g``) and a fresh
               ``e_w = g·ρ_t/(norm + eps)`` (times w² with adaptive), both kept in the state;
               ``w += e_w``.
  second_step: ⟨old_g, g⟩ summed over per-parameter products, ‖g‖ and ‖old_g‖ from
               per-parameter norms; ``cos = ⟨old_g, g⟩/(‖g‖·‖old_g‖ + eps)``; for every
               parameter ``vertical = old_g − cos·‖old_g‖·g/(‖g‖ + eps)``,
               ``g −= alpha·vertical``; ``w −= e_w`` (restore by subtraction); ``base.step()``.
"""
import torch


class OfficialGSAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, alpha=0.4, adaptive=False,
                 perturb_eps=1e-12, **kwargs):
        super().__init__(params, dict(adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.rho_t, self.alpha, self.adaptive, self.perturb_eps = rho, alpha, adaptive, perturb_eps

    def _params(self):
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def _grad_norm(self, by=None, weight_adaptive=False):
        norms = []
        for p in self._params():
            g = p.grad if by is None else self.state[p][by]
            norms.append(((torch.abs(p.data) if weight_adaptive else 1.0) * g).norm(p=2))
        return torch.norm(torch.stack(norms), p=2)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm(weight_adaptive=self.adaptive)
        scale = self.rho_t / (grad_norm + self.perturb_eps)
        for p in self._params():
            self.state[p]["old_g"] = p.grad.data.clone()
            e_w = p.grad * scale.to(p)
            if self.adaptive:
                e_w *= torch.pow(p, 2)
            p.add_(e_w)
            self.state[p]["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        inner_prod = 0.0
        for p in self._params():
            inner_prod += torch.sum(self.state[p]["old_g"] * p.grad.data)
        new_grad_norm = self._grad_norm()
        old_grad_norm = self._grad_norm(by="old_g")
        cosine = inner_prod / (new_grad_norm * old_grad_norm + self.perturb_eps)
        for p in self._params():
            vertical = self.state[p]["old_g"] - cosine * old_grad_norm * p.grad.data / (
                new_grad_norm + self.perturb_eps
            )
            p.grad.data.add_(vertical, alpha=-self.alpha)
        for p in self._params():
            p.data.sub_(self.state[p]["e_w"])
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()
