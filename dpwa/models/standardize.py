"""`Standardize`: a fixed per-channel affine map (x - mean) / sqrt(var + eps), the input
normalisation of `model.input_norm: private`.

Its mean and var are buffers, set once from the released statistics (`dpwa.statistics`)
before the first step and never changed by a forward pass, so the layer treats each example
alone (the probe checks that) and the saved weights carry the statistics. Until they are
set it is the identity.

A channel released with variance 0 is dropped (output 0; the `keep` mask), as in Tramer &
Boneh's `standardize` (ftramer/Handcrafted-DP, models.py: `x *= (bn_var != 0)`): its released
second moment was at most the noise's, so 1 / sqrt(0 + eps) would scale that channel by about
316, giving the noisiest channels the largest inputs. Weights saved before the mask existed
load with every channel kept, and compute as they were trained.
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
        self.register_buffer("keep", torch.ones(channels, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(self.var + self.eps) * self.keep
        return (x - self.mean.view(shape)) * scale.view(shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # weights from before `keep`
        if prefix + "mean" in state_dict and prefix + "keep" not in state_dict:
            state_dict[prefix + "keep"] = torch.ones_like(self.keep)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.mean.numel()}, eps={self.eps:g}"


@torch.no_grad()
def set_statistics(model: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> int:
    """Copy released statistics into every `Standardize` layer of `model` (in place, so the
    averagers' copies, which share the buffers, follow), dropping the channels of variance 0;
    returns how many layers took them."""
    layers = [m for m in model.modules() if isinstance(m, Standardize)]
    for layer in layers:
        layer.mean.copy_(mean.to(layer.mean))
        layer.var.copy_(var.to(layer.var))
        layer.keep.copy_(var.to(layer.var.device) > 0)
    return len(layers)
