"""Periodic SWA (Guo, Jin & Liu 2022, "Stochastic weight averaging revisited", arXiv 2201.00519,
Appl. Sci. 2023; code: ZJLAB-AMMI/PSWA `Image Classification/pswa.py`, `dswa.py`): DP-SGD
restarted, every P steps, from the uniform average of its own recent iterates.

    steps 1..start:       DP-SGD
    each step after:      DP-SGD step, then w_bar <- w_bar + (w - w_bar) / (n + 1), n <- n + 1
    every P steps after:  restart: w <- w_bar, a fresh optimizer (momentum reset), n <- 0

As in the reference, the average restarts with the model (its `swa_n = 0`): the next average
holds only iterates made after the restart (the first is the DP-SGD step from w_bar), and the
restart point w_bar itself is not re-counted. The reference measures start and P in epochs
and averages end-of-epoch weights; with a few hundred large DP steps both are in steps here,
and every iterate is averaged (methods.md section 8). Its `bn_update` is not needed: dpwa's
models use GroupNorm, so an average is evaluated as is.

`method.pswa_restarts` bounds the restarts: 0 restarts every period to the end (PSWA); R > 0
makes R restarts and then averages to the end without restarting, i.e. R + 1 nested SWA rounds
of P steps (`dswa.py`: R = 1, DSWA; `tswa.py`: R = 2, TSWA). The run's last iterate is a
DP-SGD iterate unless it ends on a restart; the average of the iterates since the last restart,
the method's output (the reference evaluates and saves DSWA's second-round `swa_model`), is
kept in the checkpoint and released to `dpwa eval` as `pswa` (`released_models`).

Privacy: only the DP-SGD steps read data. Averages, restarts from an average and momentum
resets are post-processing, and DP-SGD continued from a post-processed point is DP-SGD: the
releases are DP-SGD's, one per step.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from ..optimizers import make_optimizer
from . import Step, register_method
from .dpsgd import DPSGD

__all__ = ["PSWA"]


@register_method
class PSWA(DPSGD):
    name = "pswa"
    step_keys = ("pswa_start", "pswa_period")

    @classmethod
    def length_problems(cls, cfg, steps: int) -> list[str]:
        m = cfg.method
        if m.pswa_start + m.pswa_period > steps:
            return [f"method.pswa_start={m.pswa_start} + method.pswa_period={m.pswa_period} is beyond the run "
                    f"({steps} steps): no restart from the average would fall within it (method.name=pswa would "
                    "be DP-SGD)"]
        if m.pswa_restarts and m.pswa_start + m.pswa_restarts * m.pswa_period >= steps:
            return [f"method.pswa_restarts={m.pswa_restarts} restarts every method.pswa_period={m.pswa_period} steps "
                    f"after method.pswa_start={m.pswa_start} need more than {m.pswa_start + m.pswa_restarts * m.pswa_period} "
                    f"steps, and the run has {steps}: its last round of averaging would never start (fewer "
                    "restarts, or 0: restart to the end)"]
        return []

    def __init__(self, cfg, model, *, noise_std: float = 0.0) -> None:
        super().__init__(cfg, model, noise_std=noise_std)
        m = cfg.method
        self.start, self.period, self.restarts = m.pswa_start, m.pswa_period, m.pswa_restarts
        self.average: Optional[list[torch.Tensor]] = None  # w_bar of the iterates since the last restart
        self.count = 0                                     # n, the iterates in it

    def step(self, step: Step) -> dict[str, float]:
        stats = super().step(step)
        done = step.index + 1  # the iterate just made
        if done > self.start:
            self._collect()
            rounds = (done - self.start) // self.period
            if (done - self.start) % self.period == 0 and (self.restarts == 0 or rounds <= self.restarts):
                self._restart()
        return {**stats, "pswa_averaged": float(self.count)}

    @torch.no_grad()
    def _collect(self) -> None:
        if self.average is None:
            self.average = [p.detach().clone() for p in self.params]
        else:
            for a, p in zip(self.average, self.params):
                a.add_(p - a, alpha=1.0 / (self.count + 1))
        self.count += 1

    @torch.no_grad()
    def _restart(self) -> None:
        for p, a in zip(self.params, self.average):
            p.copy_(a)
        self.optimizer = make_optimizer(self.cfg.optim, self.params, noise_std=self.noise_std)
        self.average, self.count = None, 0

    @classmethod
    def released_models(cls, cfg, model, state: dict[str, Any]) -> dict:
        """`pswa`: the average of the iterates since the last restart (none when the run ended
        on a restart: its last iterate is that average)."""
        if not state.get("count"):
            return {}
        average = copy.deepcopy(model)
        with torch.no_grad():
            for p, a in zip([p for p in average.parameters() if p.requires_grad], state["average"]):
                p.copy_(a)
        return {"pswa": lambda: iter([average])}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "average": self.average, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        average = state["average"]  # loaded on the CPU; kept on the parameters' device
        self.average = None if average is None else [a.to(p.device) for a, p in zip(average, self.params)]
        self.count = int(state["count"])
