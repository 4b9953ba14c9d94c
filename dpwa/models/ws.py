"""Weight-standardised convolution (Qiao et al. 2019, "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization"), as used with GroupNorm by De et al. 2022.

The convolution uses w_hat = (w - mean(w)) / sqrt(var(w) + eps), statistics per output
channel over its fan-in. The trainable parameter is the raw `weight`; its gradient (and
every per-example gradient) flows through the standardisation; dpwa-fast's rule for it
(registered here, so that the engines never import the models) is derived in
`dpwa.engines.rules`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engines.rules import DenseRule, Layer, pad_functional, register_rule

__all__ = ["WSConv2d", "standardize"]


def standardize(weight: torch.Tensor, eps: float) -> torch.Tensor:
    flat = weight.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    return ((flat - mean) * torch.rsqrt(var + eps)).view_as(weight)


class WSConv2d(nn.Conv2d):
    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, standardize(self.weight, self.eps), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


register_rule(WSConv2d, Layer(DenseRule, standardise="unit", pad=pad_functional))  # forward: F.conv2d(x, w_hat, ...)
