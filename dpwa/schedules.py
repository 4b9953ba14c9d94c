"""Learning-rate schedules: pure functions of the step (0-based: step s makes iterate s + 1
with lr(s)), wrapped at the edge by `Schedule`, which also knows where each cycle's
learning-rate minimum falls (where FGE / SGDR snapshots and cyclic SWA collect iterates:
by schedule, never by a metric on private data).

* constant, warm-up, cosine (Loshchilov & Hutter 2017, without restarts);
* `swa`: Izmailov et al. 2018 ("Averaging weights leads to wider optima"): lr until
  0.5 swa_start, linear decay to swa_lr until 0.9 swa_start, then swa_lr;
* `cyclic`: the triangular cycle of FGE (Garipov et al. 2018, "Loss surfaces, mode
  connectivity, and fast ensembling of DNNs"): from lr down to min_lr at mid-cycle and back;
* `sgdr`: cosine with warm restarts (Loshchilov & Hutter 2017): cycle i lasts
  t0 * t_mult^i steps and ends at min_lr.

>>> [round(cosine(s, lr=1.0, total_steps=10, warmup_steps=2), 3) for s in (0, 1, 2, 6, 9)]
[0.5, 1.0, 0.962, 0.309, 0.0]
>>> [cyclic(s, lr=1.0, min_lr=0.0, cycle_length=4) for s in range(8)]
[0.5, 0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 1.0]
>>> [round(sgdr(s, lr=1.0, min_lr=0.0, t0=2, t_mult=2), 3) for s in range(6)]
[0.5, 0.0, 0.854, 0.5, 0.146, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .config import ConfigError, OptimConfig

__all__ = ["constant", "warmup", "cosine", "swa", "cyclic", "sgdr", "SCHEDULES", "Schedule"]


def _warm(step: int, lr: float, warmup_steps: int) -> float | None:
    return lr * (step + 1) / warmup_steps if warmup_steps and step < warmup_steps else None


def constant(step: int, *, lr: float) -> float:
    return lr


def warmup(step: int, *, lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up over `warmup_steps` (step 0 gets lr / warmup_steps), then constant."""
    w = _warm(step, lr, warmup_steps)
    return lr if w is None else w


def cosine(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> float:
    """Warm-up, then cosine decay from lr to lr * final_fraction at the last step."""
    w = _warm(step, lr, warmup_steps)
    if w is not None:
        return w
    span = max(total_steps - warmup_steps, 1)
    t = min((step - warmup_steps + 1) / span, 1.0)
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))


def swa(step: int, *, lr: float, swa_lr: float, swa_start: int, warmup_steps: int = 0) -> float:
    """Izmailov et al.'s SWA schedule: lr for t <= 0.5, linear to swa_lr at t = 0.9, then
    swa_lr, with t = (step + 1) / swa_start (their `schedule()` in train.py, per step)."""
    w = _warm(step, lr, warmup_steps)
    if w is not None:
        return w
    t = (step + 1) / swa_start
    if t <= 0.5:
        return lr
    if t <= 0.9:
        return lr + (swa_lr - lr) * (t - 0.5) / 0.4
    return swa_lr


def cyclic(step: int, *, lr: float, min_lr: float, cycle_length: int, cycle_start: int = 0,
           warmup_steps: int = 0) -> float:
    """Garipov et al.'s triangular cycle after `cycle_start` steps at lr: with
    t = ((step - cycle_start) mod c + 1) / c, lr falls linearly to min_lr at t = 1/2 and rises
    back to lr at t = 1."""
    w = _warm(step, lr, warmup_steps)
    if w is not None:
        return w
    if step < cycle_start:
        return lr
    t = ((step - cycle_start) % cycle_length + 1) / cycle_length
    return (1 - 2 * t) * lr + 2 * t * min_lr if t <= 0.5 else (2 - 2 * t) * min_lr + (2 * t - 1) * lr


def _sgdr_position(step: int, t0: int, t_mult: int) -> tuple[int, int]:
    """(steps into the current cycle, length of the current cycle) for step >= 0 of the cycles."""
    length = t0
    while step >= length:
        step -= length
        length *= t_mult
    return step, length


def sgdr(step: int, *, lr: float, min_lr: float, t0: int, t_mult: int = 1, cycle_start: int = 0,
         warmup_steps: int = 0) -> float:
    """Cosine from lr to min_lr in each cycle, restarting at lr; the last step of a cycle has min_lr."""
    w = _warm(step, lr, warmup_steps)
    if w is not None:
        return w
    if step < cycle_start:
        return lr
    pos, length = _sgdr_position(step - cycle_start, t0, t_mult)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (pos + 1) / length))


# name -> lr(step, optim config, run length, SWA start): the config's fields bound to each function.
SCHEDULES: dict[str, Callable[[int, OptimConfig, int, int], float]] = {
    "constant": lambda s, o, n, a: constant(s, lr=o.lr),
    "warmup": lambda s, o, n, a: warmup(s, lr=o.lr, warmup_steps=o.warmup_steps),
    "cosine": lambda s, o, n, a: cosine(s, lr=o.lr, total_steps=n, warmup_steps=o.warmup_steps,
                                        final_fraction=o.final_lr_fraction),
    "swa": lambda s, o, n, a: swa(s, lr=o.lr, swa_lr=o.swa_lr, swa_start=a, warmup_steps=o.warmup_steps),
    "cyclic": lambda s, o, n, a: cyclic(s, lr=o.lr, min_lr=o.min_lr, cycle_length=o.cycle_length,
                                        cycle_start=o.cycle_start, warmup_steps=o.warmup_steps),
    "sgdr": lambda s, o, n, a: sgdr(s, lr=o.lr, min_lr=o.min_lr, t0=o.sgdr_t0, t_mult=o.cycle_mult,
                                    cycle_start=o.cycle_start, warmup_steps=o.warmup_steps),
}


@dataclass(frozen=True)
class Schedule:
    """The schedule of a run: `OptimConfig` plus the run's length (and, for `swa`, the SWA
    start step). Validated at construction; callable as lr(step)."""

    optim: OptimConfig
    total_steps: int
    swa_start: int = 0

    def __post_init__(self) -> None:
        o, n = self.optim, self.total_steps
        if o.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}; got {o.schedule!r}")
        if o.schedule == "swa":
            if not 0 < self.swa_start < n:
                raise ConfigError(f"optim.schedule=swa decays the lr relative to averaging.swa_start, which must be "
                                  f"in (0, {n}) for this {n}-step run; got averaging.swa_start={self.swa_start}")
            if o.warmup_steps > self.swa_start // 2:
                raise ConfigError(f"optim.warmup_steps={o.warmup_steps} runs into the swa schedule's decay, which "
                                  f"starts at half of averaging.swa_start={self.swa_start}: use at most "
                                  f"{self.swa_start // 2} warmup steps")
        if o.schedule in ("cyclic", "sgdr") and o.warmup_steps > o.cycle_start:
            raise ConfigError(f"optim.warmup_steps={o.warmup_steps} overlaps the {o.schedule} cycles, which start at "
                              f"optim.cycle_start={o.cycle_start}: a minimum inside the warmup is not at optim.min_lr, "
                              f"and a snapshot there not at a minimum; set optim.cycle_start >= {o.warmup_steps} or "
                              "optim.warmup_steps=0")
        if o.schedule in ("cyclic", "sgdr"):
            if o.cycle_start >= n:
                raise ConfigError(f"optim.cycle_start={o.cycle_start} is beyond the run ({n} steps)")
            if o.schedule == "cyclic" and (o.cycle_length < 2 or o.cycle_length % 2):
                raise ConfigError(f"optim.cycle_length={o.cycle_length} must be even and >= 2 for the cyclic "
                                  "schedule: its lr minimum is at mid-cycle, step cycle_length / 2")
            if o.schedule == "sgdr" and o.sgdr_t0 < 1:
                raise ConfigError(f"optim.sgdr_t0 (SGDR's T_0) must be >= 1, got {o.sgdr_t0}")
            where = "mid-cycle" if o.schedule == "cyclic" else "the end of a cycle"
            ends = self._ends_at_minimum()
            if ends is not None:
                raise ConfigError(
                    f"The {o.schedule} schedule must end at an lr minimum ({where}), or its last steps spend privacy "
                    f"past the last snapshot: with optim.cycle_start={o.cycle_start} and "
                    + (f"optim.cycle_length={o.cycle_length}" if o.schedule == "cyclic" else
                       f"optim.sgdr_t0={o.sgdr_t0}, optim.cycle_mult={o.cycle_mult}")
                    + f", a {n}-step run does not end at one; use train.steps={ends} (or change the cycles)")

    def _ends_at_minimum(self) -> int | None:
        """None if the last step is a minimum, else the nearest run length that ends at one."""
        if self.is_minimum(self.total_steps - 1):
            return None
        minima = [s + 1 for s in range(self.optim.cycle_start,
                                         2 * self.total_steps + 2 * max(self.optim.cycle_length, self.optim.sgdr_t0))
                  if self.is_minimum(s)]
        return min(minima, key=lambda m: (abs(m - self.total_steps), m))

    def __call__(self, step: int) -> float:
        return SCHEDULES[self.optim.schedule](step, self.optim, self.total_steps, self.swa_start)

    @property
    def cyclical(self) -> bool:
        return self.optim.schedule in ("cyclic", "sgdr")

    def is_minimum(self, step: int) -> bool:
        """Whether step (0-based) takes a cycle's lowest lr: the iterate it makes is a snapshot.
        Only cyclic schedules have minima."""
        o = self.optim
        if not self.cyclical or step < o.cycle_start:
            return False
        if o.schedule == "cyclic":
            return (step - o.cycle_start) % o.cycle_length + 1 == o.cycle_length // 2
        pos, length = _sgdr_position(step - o.cycle_start, o.sgdr_t0, o.cycle_mult)
        return pos + 1 == length

    def minima(self) -> list[int]:
        """Iterates (1-based step counts) taken at the lr minima of this run."""
        return [s + 1 for s in range(self.total_steps) if self.is_minimum(s)]
