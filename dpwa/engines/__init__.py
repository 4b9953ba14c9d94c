"""Per-example clipping engines: each turns a chunk of a logical batch into the sum of its
examples' clipped gradients, sum_b min(1, C / |g_b|) g_b, where g_b is the gradient of example
b's loss (`dpwa.rows.example_losses`: the mean over all its rows). Noise and scaling happen once
per logical batch, in `dpwa.mechanism.GradientMechanism`, whatever the engine.

    dpwa-fast         per-layer ghost norm or instantiation, book-kept clipped sum (default);
                      lean when that would not fit in half the free memory
    dpwa-lean         dpwa-fast's norms in backward hooks, then a second backward: less memory
    torch-func        vmap(grad) of the whole model: any layer; the reference
    opacus-hooks      Opacus GradSampleModule, hooks (per view, then summed)
    opacus-functorch  Opacus GradSampleModule, functorch per layer
    opacus-ghost      Opacus ghost clipping, two backward passes (augmult.k=1 only)

An engine is `clipped_sum(views, labels, clip_norm, rows) -> (sums by Parameter, losses,
norms)`. Whatever the engine, `dpwa.probe` checks it on the model against a loop over single
examples before any privacy is charged, on every path it may take at run time (`PATHS`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import EngineError
from .fast import FastEngine
from .reference import OpacusEngine, OpacusGhostEngine, TorchFuncEngine, clip_and_sum

__all__ = ["ENGINES", "PATHS", "register_engine", "engine_paths", "make_engine", "EngineError", "FastEngine", "TorchFuncEngine",
           "OpacusEngine", "OpacusGhostEngine", "clip_and_sum"]

ENGINES: dict[str, Callable[[nn.Module], object]] = {}
#: The code paths an engine may take at run time, by engine: {what to call it in a refusal:
#: a builder}; `dpwa.probe` checks every one (an engine that picks its path at run time from
#: the free memory could otherwise run one the probe never saw).
PATHS: dict[str, dict[str, Callable[[nn.Module], object]]] = {}


def register_engine(name: str, build: Callable[[nn.Module], object],
                    paths: dict[str, Callable[[nn.Module], object]] | None = None) -> None:
    """`paths`: the engine's run-time paths (default: `build` is its only one)."""
    if name in ENGINES:
        raise ValueError(f"engine {name!r} is registered twice")
    ENGINES[name] = build
    PATHS[name] = paths or {f"privacy.engine={name}": build}


def engine_paths(name: str) -> dict[str, Callable[[nn.Module], object]]:
    """The paths of engine `name` the probe must check (`PATHS`)."""
    if name not in ENGINES:
        raise EngineError(f"privacy.engine must be one of {', '.join(ENGINES)}; got {name!r}")
    return PATHS[name]


_CHUNKED = "in chunks of 2 examples, as large batches run"
_LEAN = "in its lean mode, which it switches to when the fast one would not fit in memory"


_REDONE = "every other example redone alone, as one whose norm cancels in rounding is"


def _every_other(norms2: torch.Tensor, terms2: object) -> torch.Tensor:
    return torch.arange(len(norms2), device=norms2.device) % 2 == 0


def _fast(memory: str, max_chunk: int | None = None, **kw: Any) -> Callable[[nn.Module], FastEngine]:
    return lambda model: FastEngine(model, memory=memory, max_chunk=max_chunk, **kw)


register_engine("dpwa-fast", _fast("auto"), paths={
    "privacy.engine=dpwa-fast": _fast("fast"),
    f"privacy.engine=dpwa-fast ({_CHUNKED})": _fast("fast", 2),
    f"privacy.engine=dpwa-fast ({_LEAN})": _fast("lean"),
    f"privacy.engine=dpwa-fast ({_LEAN}, {_CHUNKED})": _fast("lean", 2),
    f"privacy.engine=dpwa-fast ({_REDONE})": _fast("fast", redo=_every_other),
    f"privacy.engine=dpwa-fast ({_LEAN}, {_REDONE})": _fast("lean", redo=_every_other)})
register_engine("dpwa-lean", _fast("lean"), paths={
    "privacy.engine=dpwa-lean": _fast("lean"),
    f"privacy.engine=dpwa-lean ({_CHUNKED})": _fast("lean", 2),
    f"privacy.engine=dpwa-lean ({_REDONE})": _fast("lean", redo=_every_other)})
register_engine("torch-func", TorchFuncEngine)
register_engine("opacus-hooks", lambda model: OpacusEngine(model, functorch=False))
register_engine("opacus-functorch", lambda model: OpacusEngine(model, functorch=True))
register_engine("opacus-ghost", OpacusGhostEngine)


def make_engine(name: str, model: nn.Module):
    """The engine `name` on `model`.

    Raises:
        EngineError: an unknown name (the known ones listed), or a model the engine refuses.
    """
    if name not in ENGINES:
        raise EngineError(f"privacy.engine must be one of {', '.join(ENGINES)}; got {name!r}")
    return ENGINES[name](model)
