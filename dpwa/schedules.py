"""Learning-rate schedules: pure functions of the step (0-based), wrapped at the edge.

>>> [round(cosine(s, lr=1.0, total_steps=10, warmup_steps=2), 3) for s in (0, 1, 2, 6, 9)]
[0.5, 1.0, 0.962, 0.309, 0.0]
"""

from __future__ import annotations

import math

__all__ = ["constant", "warmup", "cosine", "SCHEDULES", "lr_at"]


def constant(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> float:
    return lr


def warmup(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> float:
    """Linear warm-up over `warmup_steps` (step 0 gets lr / warmup_steps), then constant."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr


def cosine(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> float:
    """Warm-up, then cosine decay from lr to lr * final_fraction at the last step
    (Loshchilov & Hutter 2017, without restarts)."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min((step - warmup_steps + 1) / span, 1.0)
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))


SCHEDULES = {"constant": constant, "warmup": warmup, "cosine": cosine}


def lr_at(name: str, step: int, **kwargs: float) -> float:
    if name not in SCHEDULES:
        raise ValueError(f"Unknown schedule {name!r}; known schedules: {sorted(SCHEDULES)}")
    return SCHEDULES[name](step, **kwargs)  # type: ignore[arg-type]
