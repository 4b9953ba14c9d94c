"""FiLM-Ensemble (Turkoglu et al., NeurIPS 2022), made DP-correct: one network whose
normalisation layers carry per-member FiLM scales and shifts, an implicit ensemble of M
members trained in one run at the privacy cost of one model.

The reference (prs-eth/FILM-Ensemble `models/CBN.py`) normalises with *per-member batch
statistics*, which mixes the examples of a batch (forbidden under DP: an example's gradient
would depend on the others). Here each affine GroupNorm becomes GroupNorm(affine=False), a
per-example normalisation, followed by `FiLM`: gamma_m * x_hat + beta_m for member m.

The batch is tiled as the reference does it (`x.repeat_interleave(M, 0)` at the input: row
b * M + m is member m of input row b), and the model declares it (`dpwa_tiling`), so every
engine folds an example's M rows (K x M with augmentation multiplicity) into one gradient,
the mean over its rows, clipped once: clipping each copy would give an example M times the
sensitivity (`dpwa audit` has that planted bug). Prediction is the mean of the members'
softmaxes (`dpwa.evaluate`), with their disagreement reported.

Diversity initialisation: the reference draws gamma and beta from Xavier-uniform with gain
rho (`--cbn_gain`, 1.0), so its gammas are zero-mean and may be negative; here
gamma = 1 + U(-a, a) and beta = U(-a, a) with a = rho * sqrt(6 / (M + C)), so every member
starts as the plain network, perturbed (rho sets how far apart the members start).
Diversity then also comes from the independent DP noise on each member's gamma/beta.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..engines.rules import Layer, Record, _sq_norms, register_rule
from ..rows import Tiling

__all__ = ["FiLM", "FiLMEnsemble", "film_ensemble", "FiLMRule"]


class FiLM(nn.Module):
    """Per-member scale and shift of channels: rows (N * M, C, ...) in the tiled order (row
    n * M + m is member m), gamma and beta of shape (M, C)."""

    def __init__(self, channels: int, members: int, gain: float = 1.0) -> None:
        super().__init__()
        self.members = members
        a = gain * math.sqrt(6.0 / (members + channels))
        self.gamma = nn.Parameter(1.0 + torch.empty(members, channels).uniform_(-a, a))
        self.beta = nn.Parameter(torch.empty(members, channels).uniform_(-a, a))

    def _shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (1, self.members, x.shape[1]) + (1,) * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.members:
            raise ValueError(f"FiLM with {self.members} members got {x.shape[0]} rows (not a multiple): "
                             "the input must be tiled by FiLMEnsemble")
        shape = self._shape(x)
        y = x.reshape(-1, self.members, *x.shape[1:]) * self.gamma.view(shape) + self.beta.view(shape)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"channels={self.gamma.shape[1]}, members={self.members}"


class FiLMRule:
    """dpwa-fast's rule for FiLM: rows come example-major (an example's K views x M members,
    member fastest), so example b's gradients are, per member m and channel c, the sums over
    its views and positions of go * x (gamma) and of go (beta): (B, M, C), instantiated."""

    def __init__(self, rec: Record, go: torch.Tensor, batch: int, mode: str, layer: Layer) -> None:
        self.m = rec.module
        members, channels = self.m.gamma.shape
        shape = (batch, -1, members, channels, go[0, 0].numel())
        # terms2 (`dpwa.engines.rules.DenseRule._terms2`): dpwa-lean only, as GroupNormRule's
        self.per_example, self.terms2 = {}, go.new_zeros(batch) if rec.lean else None
        if self.m.gamma.requires_grad:
            terms = go * rec.x
            self.per_example["gamma"] = terms.reshape(shape).sum((1, 4))
            if rec.lean:
                self.terms2 += terms.square().reshape(batch, -1).sum(1)
        if self.m.beta.requires_grad:
            self.per_example["beta"] = go.reshape(shape).sum((1, 4))
            if rec.lean:
                self.terms2 += go.square().reshape(batch, -1).sum(1)

    def norms2(self) -> torch.Tensor:
        return sum(_sq_norms(v) for v in self.per_example.values())

    def clipped_sum(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: torch.einsum("b,bmc->mc", c, value) for name, value in self.per_example.items()}


register_rule(FiLM, Layer(FiLMRule, params=("gamma", "beta")))  # here, so that the engines never import models


class FiLMEnsemble(nn.Module):
    """`body` run once per member on every input row: the batch tiled M times (example-major),
    declared to the engines as `dpwa_tiling`. Output: (rows * M, classes), member fastest."""

    def __init__(self, body: nn.Module, members: int) -> None:
        super().__init__()
        self.body, self.members = body, members
        self.dpwa_tiling = Tiling(members=members, order="example-major")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.repeat_interleave(self.members, 0))


def _film_norm(norm: nn.GroupNorm, members: int, gain: float) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False),
                         FiLM(norm.num_channels, members, gain))


def film_ensemble(model: nn.Module, members: int, gain: float = 1.0) -> FiLMEnsemble:
    """`model` as a FiLM-Ensemble of `members`: every affine GroupNorm becomes
    GroupNorm(affine=False) + FiLM (the model's other layers are shared by all members).

    Raises:
        ValueError: members < 2, or a model with no affine GroupNorm to modulate.
    """
    if members < 2:
        raise ValueError(f"a FiLM-Ensemble needs at least 2 members, got {members}")
    found = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.GroupNorm and child.affine:
                setattr(module, child_name, _film_norm(child, members, gain))
                found.append(f"{name}.{child_name}" if name else child_name)
    if not found:
        hint = ("NF models (timm's NF family, nf_micro*) have no normalisation layers at all, so FiLM has "
                "nothing to modulate: use a GroupNorm model (wrn*, cnn*)" if type(model).__module__.startswith("timm.")
                else "scatter_cnn: set model.conv_norm=true to normalise after its convs")
        raise ValueError(f"{type(model).__name__} has no affine GroupNorm for FiLM to follow ({hint})")
    return FiLMEnsemble(model, members)
