"""The model a run config asks for, on the data it trains on."""

from __future__ import annotations

from typing import Any

import torch

from . import create_model

__all__ = ["build_model"]


def build_model(cfg: Any, data: Any, *, load_pretrained: bool = True) -> torch.nn.Module:
    """`cfg.model` for `data` (channels, classes); `load_pretrained=False` skips reading
    pretrained weights (a checkpoint will overwrite them anyway, e.g. in `dpwa eval`)."""
    m = cfg.model
    return create_model(m.name, in_channels=data.in_channels, num_classes=data.num_classes, groups=m.groups,
                        weight_standardization=m.weight_standardization,
                        pretrained=m.pretrained if load_pretrained else None,
                        trainable=m.trainable, trainable_stages=m.trainable_stages, input_norm=m.input_norm,
                        conv_norm=m.conv_norm, film_members=m.film_members, film_gain=m.film_gain)
