"""Entropy-SGD (Chaudhari et al. 2017, "Entropy-SGD: biasing gradient descent into wide
valleys", ICLR; code: ucla-vision/entropy-sgd, `entropyoptim.lua`, the paper's experiments)
under DP: descent on the local entropy, whose gradient is estimated by Langevin steps on
released gradients.

The local entropy F(x; gamma) = log int exp(-f(x') - gamma/2 |x - x'|^2) dx' has gradient
-grad F = gamma (x - <x'>), <x'> the mean of its Gibbs measure. One step (t = step index):

    gamma_t = gamma (1 + scoping)^(t + 1)        ("scoping"; Lua counts from 1)
    x' <- x,  mu <- x,  m <- 0
    L times, each on one release g (a fresh Poisson batch, taken at x'):
        m <- beta m + g;  d <- g + beta m         (Nesterov, beta = inner_momentum)
        d <- d - gamma_t (x - x') + (eps / sqrt(eta' / 2)) xi,   xi ~ N(0, I)
        x' <- x' - eta' d
        mu <- b mu + (1 - b) x'                   (b = mean_decay, 0.75)
    x <- optimizer step from x on the "gradient" x - mu, at the step's lr

As in the Lua code, gamma grows every step (the PyTorch port, `python/optim.py`, never
increments its step count, so its scoping does nothing) and gamma is absorbed into the outer
lr. With the default optimizer (optim.name=sgd, momentum 0) the outer step is the Lua one,
x <- x - lr (x - mu): the Lua code computes outer momentum from a first gradient and then
zeroes it. optim.momentum gives the PyTorch port's variant, Nesterov momentum on x - mu. Not
carried over: the reference's first `closure()` at x, whose gradient is discarded when L > 0
(a charged release for nothing); and its L2 on x' in the inner loop (use optim.weight_decay,
on the outer step). The outer optimizer gets noise_std 0 (x - mu is no release), and
optim.name=adambc, whose correction is for the noise of one release, is refused (dpwa.config).

Privacy: every inner step is one release of the mechanism, so `releases(steps)` = L x steps
and the noise is calibrated for that count (the paper compares at "effective epochs" = L x
epochs too); with train.epochs the steps are outer steps, so the data is passed L x epochs
times. The coupling, the extra noise, mu and the outer step are post-processing.

The DP noise as the thermal noise: each release already carries N(0, s^2) per coordinate,
s = sigma C / B (sigma / B with rescale_to_unit), which is the reference's Langevin term with
eps_DP = s sqrt(eta' / 2). `method.langevin_noise` (eps, default 0) adds independent noise on
top, for a total eps = sqrt(eps_DP^2 + eps^2) (Lua's default is 1e-4). With inner momentum the
DP noise, inside g, also passes through the momentum buffer while the extra noise is added
after it (as in Lua), so the equivalence is exact at inner_momentum=0. The extra noise is
public randomness (seeded by train.seed, the same on every rank, in the checkpoint).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..optimizers import make_optimizer
from . import Method, Step, register_method

__all__ = ["EntropySGD"]


@register_method
class EntropySGD(Method):
    name = "entropy_sgd"

    def __init__(self, cfg, model, *, noise_std: float = 0.0) -> None:
        super().__init__(cfg, model, noise_std=noise_std)
        self.optimizer = make_optimizer(cfg.optim, self.params)  # the outer step
        self.noise = torch.Generator().manual_seed(cfg.train.seed)  # the extra Langevin noise (public)

    @classmethod
    def releases(cls, cfg, steps: int) -> int:
        return cfg.method.inner_steps * steps

    def gamma(self, index: int) -> float:
        """The coupling of step `index` (0-based): grows by (1 + scoping) per step."""
        m = self.cfg.method
        return m.gamma * (1 + m.scoping) ** (index + 1)

    def step(self, step: Step) -> dict[str, float]:
        m = self.cfg.method
        gamma, beta, b = self.gamma(step.index), m.inner_momentum, m.mean_decay
        extra = m.langevin_noise / math.sqrt(0.5 * m.inner_lr)  # on the gradient, as the reference
        with torch.no_grad():
            centre = [p.detach().clone() for p in self.params]  # x; the parameters hold x'
            mean = [x.clone() for x in centre]
            momentum = [torch.zeros_like(x) for x in centre]
        losses, sizes = [], []
        for _ in range(m.inner_steps):
            out = step.release()  # the gradient at x'
            losses.append(out.loss_diagnostic)
            sizes.append(out.batch_size_diagnostic)
            with torch.no_grad():
                for p, x, mu, buf in zip(self.params, centre, mean, momentum):
                    d = out.grads[p]
                    if beta:
                        buf.mul_(beta).add_(d)
                        d = d + beta * buf
                    d = d - gamma * (x - p)
                    if extra:
                        d = d + extra * torch.randn(p.shape, generator=self.noise).to(p)
                    p.sub_(m.inner_lr * d)
                    mu.mul_(b).add_(p, alpha=1 - b)
        with torch.no_grad():
            for p, x, mu in zip(self.params, centre, mean):
                p.copy_(x)
                p.grad = x - mu
            norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in self.params))
        for group in self.optimizer.param_groups:
            group["lr"] = step.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"private_batch_loss_diagnostic": sum(losses) / len(losses),
                "private_batch_size_diagnostic": sum(sizes) / len(sizes),
                "entropy_gamma": gamma, "entropy_gradient_norm": norm}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise.set_state(state["noise"])
