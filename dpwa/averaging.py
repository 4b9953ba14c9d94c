"""Averages of the DP-SGD iterates: post-processing, so free of privacy cost.

`EMA` follows De et al. 2022 (warm-up decay_t = min(decay, (1 + t) / (10 + t)), as in
jax_privacy); `Polyak` is the uniform average of the iterates from a start step on
(Polyak & Juditsky 1992). Both read only parameters, never data, and both have
`state_dict`/`load_state_dict` so a resumed run continues them exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

__all__ = ["EMA", "Polyak"]


class _Averager:
    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()  # the averaged weights, usable as a model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.count = 0  # updates so far

    def _pairs(self, model: nn.Module):
        return zip(self.model.parameters(), model.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "weights": {k: v.clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.model.load_state_dict(state["weights"])


class EMA(_Averager):
    """theta_ema <- d_t theta_ema + (1 - d_t) theta, d_t = min(decay, (1 + t) / (10 + t)) with warm-up."""

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool = True) -> None:
        super().__init__(model)
        self.decay, self.warmup = decay, warmup

    def decay_at(self, t: int) -> float:
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay_at(self.count)
        for avg, p in self._pairs(model):
            avg.mul_(d).add_(p.detach(), alpha=1 - d)
        self.count += 1


class Polyak(_Averager):
    """Uniform average of the iterates passed to `update` at steps >= start."""

    def __init__(self, model: nn.Module, *, start: int = 0) -> None:
        super().__init__(model)
        self.start = start

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step < self.start:
            return
        self.count += 1
        for avg, p in self._pairs(model):
            avg.add_(p.detach() - avg, alpha=1 / self.count)
