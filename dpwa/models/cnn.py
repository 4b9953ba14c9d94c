"""Small CNNs for CPU-scale DP training.

`scatter_cnn`: the CNN on ScatterNet features (dpwa.features) of Tramer & Boneh 2021.
`cnn_tanh`: the end-to-end DP CIFAR CNN of Papernot et al. 2021 ("Tempered sigmoid
activations") / Tramer & Boneh 2021, with GroupNorm: conv3x3 32,32 -> pool -> 64,64 -> pool
-> 128,128 -> pool -> linear (0.31M parameters on CIFAR). Their CNN has one more hidden layer,
linear 2048 -> 128 -> tanh, before the classifier (0.55M); this one is the plain-Opacus
baseline's model (`../shared/baselines`), which leaves it out. `cnn_small`: two conv blocks for tiny inputs (digits, 8x8), the quickstart model.
"""

from __future__ import annotations

import torch.nn as nn

from . import register_model
from .standardize import Standardize
from .ws import WSConv2d


def _conv(cin: int, cout: int, ws: bool) -> nn.Conv2d:
    return (WSConv2d if ws else nn.Conv2d)(cin, cout, kernel_size=3, padding=1)


def _gn(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


@register_model("cnn_tanh")
def cnn_tanh(*, in_channels: int, num_classes: int, groups: int = 8, weight_standardization: bool = False,
             widths: tuple[int, ...] = (32, 64, 128)) -> nn.Module:
    layers: list[nn.Module] = []
    cin = in_channels
    for cout in widths:
        for _ in range(2):
            layers += [_conv(cin, cout, weight_standardization), _gn(groups, cout), nn.Tanh()]
            cin = cout
        layers.append(nn.AvgPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(cin * 16, num_classes)]
    return nn.Sequential(*layers)


@register_model("cnn_small")
def cnn_small(*, in_channels: int, num_classes: int, groups: int = 8, weight_standardization: bool = True,
              ) -> nn.Module:
    return nn.Sequential(
        _conv(in_channels, 16, weight_standardization), _gn(groups, 16), nn.Tanh(), nn.AvgPool2d(2),
        _conv(16, 32, weight_standardization), _gn(groups, 32), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4, num_classes))


@register_model("scatter_cnn")
def scatter_cnn(*, in_channels: int, num_classes: int, groups: int = 27, weight_standardization: bool = False,
                width: int = 64, input_norm: str = "group", conv_norm: bool = False) -> nn.Module:
    """The CNN on ScatterNet features of Tramer & Boneh 2021 (CIFAR-10: 243 x 8 x 8 inputs):
    the features normalised by GroupNorm without affine parameters (input_norm=group, free)
    or by released per-channel statistics (input_norm=private: `Standardize`, set by the
    statistics mechanism), then conv3x3 64 -> tanh -> maxpool -> conv3x3 64 -> tanh -> linear
    (0.19M parameters). conv_norm: a GroupNorm(16) after each conv (not in Tramer & Boneh's
    CNN; what a FiLM-Ensemble modulates, `dpwa.models.film`)."""
    norm = (Standardize(in_channels) if input_norm == "private"
            else nn.GroupNorm(min(groups, in_channels), in_channels, affine=False))

    def block(cin: int) -> list[nn.Module]:
        return [_conv(cin, width, weight_standardization), *([_gn(16, width)] if conv_norm else []), nn.Tanh()]

    return nn.Sequential(
        norm, *block(in_channels), nn.MaxPool2d(2), *block(width),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 16, num_classes))
