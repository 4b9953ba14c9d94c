"""Per-example clipping engines: each turns a chunk of a logical batch into the sum of its
examples' clipped gradients, sum_b min(1, C / |g_b|) g_b, where g_b is the mean gradient over
example b's K augmented views. Noise and scaling happen once per logical batch, in
`dpwa.privacy.PrivateSGD`, whatever the engine.

    dpwa-fast         per-layer ghost norm or instantiation, book-kept clipped sum (default)
    torch-func        vmap(grad) of the whole model: any layer; the reference
    opacus-hooks      Opacus GradSampleModule, hooks (per view, then averaged)
    opacus-functorch  Opacus GradSampleModule, functorch per layer
    opacus-ghost      Opacus ghost clipping, two backward passes (augmult.k=1 only)
"""

from __future__ import annotations

import torch.nn as nn

from .fast import EngineError, FastEngine
from .reference import OpacusEngine, OpacusGhostEngine, TorchFuncEngine, clip_and_sum

__all__ = ["ENGINES", "make_engine", "EngineError", "FastEngine", "TorchFuncEngine", "OpacusEngine",
           "OpacusGhostEngine", "clip_and_sum"]

ENGINES = ("dpwa-fast", "torch-func", "opacus-hooks", "opacus-functorch", "opacus-ghost")


def make_engine(name: str, model: nn.Module):
    if name == "dpwa-fast":
        return FastEngine(model)
    if name == "torch-func":
        return TorchFuncEngine(model)
    if name in ("opacus-hooks", "opacus-functorch"):
        return OpacusEngine(model, functorch=name == "opacus-functorch")
    if name == "opacus-ghost":
        return OpacusGhostEngine(model)
    raise EngineError(f"privacy.engine must be one of {', '.join(ENGINES)}; got {name!r}")
