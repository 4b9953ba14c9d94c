"""Optimizers applied to the mechanism's noisy mean gradient: a registry from `optim.name`.

An optimizer only post-processes released gradients, so any of them is free under DP
(Abadi et al. 2016 for SGD; DP-Adam as in e.g. Tramer & Boneh 2021). Each entry reads only
its own fields of `OptimConfig` (the config refuses another optimizer's fields) and the
public noise std of the release (`noise_std`: sigma C / B per coordinate, sigma / B with
rescale_to_unit; 0 without privacy), which only `adambc` uses.

>>> import torch
>>> from dpwa.config import OptimConfig
>>> w = torch.nn.Parameter(torch.zeros(2))
>>> type(make_optimizer(OptimConfig(name="adamw", lr=0.1, weight_decay=0.01), [w])).__name__
'AdamW'
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .config import OptimConfig

__all__ = ["OPTIMIZERS", "make_optimizer", "apply_release", "AdamBC", "Padam"]

Params = Iterable[torch.nn.Parameter]


class AdamBC(torch.optim.Optimizer):
    """DP-AdamBC (Tang, Shpilevskiy & Lecuyer, AAAI 2024, "DP-AdamBC: Your DP-Adam is actually
    DP-SGD (unless you apply bias correction)"; code: ubc-systopia/DP-AdamBC).

    On DP gradients Adam's second moment is dominated by the noise variance (sigma C / B)^2,
    the same for every coordinate, so DP-Adam is DP-SGD with a rescaled lr. DP-AdamBC
    subtracts that known (public) variance from the bias-corrected second moment:

        m_hat = m_t / (1 - b1^t),  v_hat = v_t / (1 - b2^t)
        w <- w (1 - lr wd)                                  (decoupled, as AdamW; skipped at wd 0)
        w <- w - lr m_hat / (sqrt(max(v_hat - noise_std^2, floor)) + eps)

    The floor is the paper's gamma (`eps_root` in the authors' code, default 1e-8 there; their
    CIFAR-10 example uses 1e-9). It is absolute and must sit well below noise_std^2 to leave
    the correction any effect: with sigma 2.06, C 0.1, B 8192 (configs/cifar10_scatter_*),
    noise_std^2 = 6.3e-10, so the default 1e-8 binds on every coordinate and the update is
    momentum SGD at lr / 1e-4 (set e.g. optim.adambc_floor=1e-11 there; the clean signal^2
    per coordinate was ~5e-11 at initialisation). The authors' update has no eps (sqrt(floor) >= eps already
    bounds it); keeping eps makes noise_std = 0 (with v_hat >= floor) AdamW exactly. The
    authors' weight decay is coupled L2; here it is decoupled, as AdamW."""

    def __init__(self, params: Params, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, noise_std: float, floor: float) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      noise_var=noise_std ** 2, floor=floor))

    @torch.no_grad()
    def step(self, closure=None):
        for group, p, state, (m, v, t) in _adam_updates(self):
            (b1, b2), lr = group["betas"], group["lr"]
            v_hat = v / (1 - b2 ** t)
            denom = (v_hat - group["noise_var"]).clamp_(min=group["floor"]).sqrt_().add_(group["eps"])
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


class Padam(torch.optim.Optimizer):
    """Padam (Chen, Zhou, Tang, Yang, Cao & Gu, IJCAI 2020, "Closing the generalization gap of
    adaptive gradient methods in training deep neural networks", arXiv 1806.06763): AMSGrad
    with a partially adaptive denominator, p in (0, 1/2] (p = 1/2: AMSGrad, p -> 0: SGD with
    momentum). The base of GadamX (Granziol et al., arXiv 2003.01247) with p = 0.125.

        m_hat = m_t / (1 - b1^t),  v_max = max(v_max, v_t),  v_hat = v_max / (1 - b2^t)
        w <- w (1 - lr wd)                                  (decoupled; skipped at wd 0)
        w <- w - lr m_hat / (v_hat^p + eps)

    Weight decay is decoupled, p <- p (1 - lr wd) before the step, as `decoupled_wd=True` in
    diegogranziol/Gadam `base_optimizers/padam.py` (what its GadamX / PadamW use). That code
    divides by (sqrt(v_max) + eps)^(2p) with the Adam step size lr sqrt(1 - b2^t) / (1 - b1^t):
    for p < 1/2 it under-corrects v's bias, damping early steps by (1 - b2^t)^(1/2 - p) (x0.6
    still after 344 steps at b2 = 0.999), and its eps sits inside the power. Here v is
    bias-corrected before the power, so p = 1/2 is torch's AdamW(amsgrad=True) exactly."""

    def __init__(self, params: Params, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, partial: float) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, partial=partial))

    @torch.no_grad()
    def step(self, closure=None):
        for group, p, state, (m, v, t) in _adam_updates(self):
            (b1, b2), lr = group["betas"], group["lr"]
            v_max = state.setdefault("max_exp_avg_sq", torch.zeros_like(p))
            torch.maximum(v_max, v, out=v_max)
            denom = (v_max / (1 - b2 ** t)).pow_(group["partial"]).add_(group["eps"])
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


def _adam_updates(optimizer: torch.optim.Optimizer):
    """(group, p, state, (m_t, v_t, t)) for every parameter with a gradient, after `_moments`."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                state = optimizer.state[p]
                yield group, p, state, _moments(state, p, group)


def _moments(state: dict, p: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The Adam part shared by AdamBC and Padam: decoupled weight decay on p, then the moment
    EMAs of p.grad (updated in `state`); returns (m_t, v_t, t)."""
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    state["step"] += 1
    if group["weight_decay"]:
        p.mul_(1 - group["lr"] * group["weight_decay"])
    b1, b2 = group["betas"]
    g = p.grad
    state["exp_avg"].lerp_(g, 1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
    return state["exp_avg"], state["exp_avg_sq"], state["step"]


OPTIMIZERS: dict[str, Callable[[OptimConfig, list, float], torch.optim.Optimizer]] = {
    "sgd": lambda o, ps, _: torch.optim.SGD(ps, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                            weight_decay=o.weight_decay),
    "adam": lambda o, ps, _: torch.optim.Adam(ps, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                              weight_decay=o.weight_decay),
    "adamw": lambda o, ps, _: torch.optim.AdamW(ps, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                                weight_decay=o.weight_decay),
    "adambc": lambda o, ps, noise_std: AdamBC(ps, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                              weight_decay=o.weight_decay, noise_std=noise_std,
                                              floor=o.adambc_floor),
    "padam": lambda o, ps, _: Padam(ps, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                    partial=o.partial),
}


def make_optimizer(optim: OptimConfig, params: Params, *, noise_std: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer `optim.name` over `params` (the trainable parameters); `noise_std` is the
    public std of the noise on each coordinate of a release (0: none, or no privacy)."""
    return OPTIMIZERS[optim.name](optim, list(params), noise_std)


def apply_release(optimizer: torch.optim.Optimizer, release) -> dict[str, float]:
    """One optimizer step on a release's noisy gradients (`dpwa.mechanism.Release`); returns
    its local diagnostics (not covered by the guarantee)."""
    for p, g in release.grads.items():
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"private_batch_loss_diagnostic": release.loss_diagnostic,
            "private_batch_size_diagnostic": release.batch_size_diagnostic}
