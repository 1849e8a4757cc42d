"""MSAM as the paper's algorithm states it (Becker, Altrock and Risse, 2024, "Momentum-SAM",
Algorithm 1, SGD with momentum), re-implemented here per parameter for side-by-side benchmarks.
Not used by fastsam.

  step: per parameter with a gradient, the last perturbation removed by adding it back
        (``w = w̃ + shift``); ``base.step()``; per-tensor norms of the new momentum stacked
        into one global norm; per parameter ``shift = rho·v/(norm + 1e-12)`` kept in its state
        and subtracted (``w̃ = w − shift``).
"""
import torch

_MOMENTUM = {torch.optim.SGD: "momentum_buffer", torch.optim.Adam: "exp_avg",
             torch.optim.AdamW: "exp_avg"}


class ReferenceMSAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.key = _MOMENTUM[base_optimizer]

    @torch.no_grad()
    def step(self, closure=None):
        stepped = [(group, p) for group in self.param_groups for p in group["params"]
                   if p.grad is not None]
        for _, p in stepped:
            shift = self.state[p].get("shift")
            if shift is not None:
                p.add_(shift)
        self.base_optimizer.step()
        moms = [self.base_optimizer.state[p][self.key] for _, p in stepped]
        norm = torch.norm(torch.stack([v.norm(p=2) for v in moms]), p=2)
        for (group, p), v in zip(stepped, moms):
            shift = v * (group["rho"] / (norm + 1e-12))
            self.state[p]["shift"] = shift
            p.sub_(shift)
