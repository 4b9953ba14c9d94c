"""Optimizers applied to the mechanism's noisy mean gradient: a registry from `optim.name`.

An optimizer only post-processes released gradients, so any of them is free under DP
(Abadi et al. 2016 for SGD; DP-Adam as in e.g. Tramer & Boneh 2021). Each entry reads only
its own fields of `OptimConfig` (the config refuses another optimizer's fields).

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

__all__ = ["OPTIMIZERS", "make_optimizer", "apply_release"]

Params = Iterable[torch.nn.Parameter]

OPTIMIZERS: dict[str, Callable[[OptimConfig, Params], torch.optim.Optimizer]] = {
    "sgd": lambda o, ps: torch.optim.SGD(ps, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                         weight_decay=o.weight_decay),
    "adam": lambda o, ps: torch.optim.Adam(ps, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay),
    "adamw": lambda o, ps: torch.optim.AdamW(ps, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                             weight_decay=o.weight_decay),
}


def make_optimizer(optim: OptimConfig, params: Params) -> torch.optim.Optimizer:
    """The optimizer `optim.name` over `params` (the trainable parameters)."""
    return OPTIMIZERS[optim.name](optim, list(params))


def apply_release(optimizer: torch.optim.Optimizer, release) -> dict[str, float]:
    """One optimizer step on a release's noisy gradients (`dpwa.mechanism.Release`); returns
    its local diagnostics (not covered by the guarantee)."""
    for p, g in release.grads.items():
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"private_batch_loss_diagnostic": release.loss_diagnostic,
            "private_batch_size_diagnostic": release.batch_size_diagnostic}
