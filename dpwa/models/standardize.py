"""`Standardize`: a fixed per-channel affine map (x - mean) / sqrt(var + eps), the input
normalisation of `model.input_norm: private`.

Its mean and var are buffers, set once from the released statistics (`dpwa.statistics`)
before the first step and never changed by a forward pass, so the layer treats each example
alone (the probe checks that) and the saved weights carry the statistics. Until they are
set it is the identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Standardize", "set_statistics"]


class Standardize(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.full((channels,), 1.0 - eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) * torch.rsqrt(self.var.view(shape) + self.eps)

    def extra_repr(self) -> str:
        return f"{self.mean.numel()}, eps={self.eps:g}"


@torch.no_grad()
def set_statistics(model: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> int:
    """Copy released statistics into every `Standardize` layer of `model` (in place, so the
    averagers' copies, which share the buffers, follow); returns how many layers took them."""
    layers = [m for m in model.modules() if isinstance(m, Standardize)]
    for layer in layers:
        layer.mean.copy_(mean.to(layer.mean))
        layer.var.copy_(var.to(layer.var))
    return len(layers)
