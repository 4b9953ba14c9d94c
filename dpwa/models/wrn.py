"""Wide ResNets (Zagoruyko & Komodakis 2016) as De et al. 2022 train them privately:
pre-activation blocks, weight-standardised convolutions, GroupNorm(16), no dropout.
WRN-d-k has (d - 4) / 6 blocks per stage and widths 16k, 32k, 64k.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import register_model
from .ws import WSConv2d


def _conv(cin: int, cout: int, ws: bool, *, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    cls = WSConv2d if ws else nn.Conv2d
    return cls(cin, cout, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int, ws: bool) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = _conv(cin, cout, ws, stride=stride)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = _conv(cout, cout, ws)
        self.shortcut = _conv(cin, cout, ws, kernel=1, stride=stride) if (cin != cout or stride != 1) else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act(self.norm2(out)))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, *, in_channels: int, num_classes: int, groups: int = 16,
                 weight_standardization: bool = True) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = _conv(in_channels, widths[0], weight_standardization)
        blocks = []
        cin = widths[0]
        for stage, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(_Block(cin, cout, 2 if (stage > 0 and i == 0) else 1, groups, weight_standardization))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(groups, cin)
        self.head = nn.Linear(cin, num_classes)
        nn.init.zeros_(self.head.weight)  # De et al.: zero-initialised classifier
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm(self.blocks(self.stem(x))))
        return self.head(out.mean(dim=(2, 3)))


def _wrn(depth: int, width: int):
    def build(*, in_channels: int, num_classes: int, groups: int = 16, weight_standardization: bool = True):
        return WideResNet(depth, width, in_channels=in_channels, num_classes=num_classes, groups=groups,
                          weight_standardization=weight_standardization)
    return build


register_model("wrn16_4")(_wrn(16, 4))
register_model("wrn40_4")(_wrn(40, 4))
register_model("wrn28_10")(_wrn(28, 10))
