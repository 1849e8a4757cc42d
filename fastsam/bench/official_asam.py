"""A faithful re-implementation of the official ASAM (github.com/SamsungLabs/ASAM, asam.py;
Kwon et al., 2021), written here from its published behaviour, for side-by-side benchmarks.
Not used by fastsam's optimizers.

The official class wraps an optimizer instance and a model: ``ASAM(optimizer, model, rho=0.5,
eta=0.01)``, then per batch ``ascent_step()`` after the first backward pass and
``descent_step()`` after the second. What it does, per step:
  ascent_step:  for every named parameter with a gradient, a persistent buffer (allocated on
                first use). Parameters whose name contains ``"weight"``: buffer = |w| + eta and
                the gradient is multiplied by it in place. The global norm is the norm of the
                stacked per-parameter norms, plus 1e-16. Then, again per parameter: weights'
                gradients are multiplied by T once more (T²·g), the buffer becomes
                ``e = grad·rho/norm`` and ``w += e``. Gradients are zeroed (in place, as
                ``zero_grad()`` did in the torch releases the official code was written for).
  descent_step: ``w -= e`` for every parameter (restore by subtraction, so bf16/fp16 weights
                do not come back exactly), then ``optimizer.step()`` and zero_grad.
The algorithm is fastsam's ``ASAM(asam_param_groups(model), ..., rho=0.5, eta=0.01)`` (up to
the eps placement: 1e-16 added to the norm here).
"""
import torch


class OfficialASAM:
    def __init__(self, optimizer, model, rho=0.5, eta=0.01):
        self.optimizer, self.model, self.rho, self.eta = optimizer, model, rho, eta
        self.state = {}  # parameter -> its persistent buffer (T, then e)

    def _with_grads(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]

    @torch.no_grad()
    def ascent_step(self):
        norms = []
        for name, p in self._with_grads():
            buf = self.state.get(p)
            if buf is None:
                buf = self.state[p] = p.detach().clone()
            if "weight" in name:
                buf.copy_(p).abs_().add_(self.eta)
                p.grad.mul_(buf)
            norms.append(torch.norm(p.grad, p=2))
        norm = torch.norm(torch.stack(norms), p=2) + 1e-16
        for name, p in self._with_grads():
            buf = self.state[p]
            if "weight" in name:
                p.grad.mul_(buf)
            buf.copy_(p.grad).mul_(self.rho / norm)
            p.add_(buf)
        self.optimizer.zero_grad(set_to_none=False)

    @torch.no_grad()
    def descent_step(self):
        for _, p in self._with_grads():
            p.sub_(self.state[p])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)

    # The two-step names the benchmark drives every provider with (gradients are always zeroed).
    def first_step(self, zero_grad=True):
        self.ascent_step()

    def second_step(self, zero_grad=True):
        self.descent_step()
