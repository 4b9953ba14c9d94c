"""The training state: what a checkpoint holds and a resumed run continues from.

One versioned object for the model, the method (its optimizer), the averagers, the
mechanism's release count and the counters, and one place (`Coins.state_dict`) that decides
which random-generator states may be written: never the sampling or noise generators of a
private run (a known noise draw can be subtracted from the released weights; known batches
void the amplification by subsampling). Checkpoints written before versioning (keys model,
optimizer, averagers, step, examples_seen, train_time_s) still load.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn as nn

from .errors import UsageError

__all__ = ["STATE_VERSION", "Coins", "TrainState", "StateError"]

STATE_VERSION = 2


class StateError(UsageError, ValueError):
    """A checkpoint that does not fit the run (the message names the mismatch)."""


@dataclasses.dataclass
class Coins:
    """The run's secret random sources. `reproducible` is true only where nothing is secret:
    a test run with a fixed noise seed (marked not private) or a public-data run."""

    sampling: torch.Generator
    noise: torch.Generator
    reproducible: bool
    validation: Optional[torch.Generator] = None  # the charged validation accuracies' noise, if any

    def state_dict(self) -> dict[str, Any]:
        """The generator states a checkpoint may hold: none for a private run, which resumes
        with fresh secret coins under the same reservation. A reproducible run resumes where
        each generator stood, so that it never draws the same noise twice."""
        if not self.reproducible:
            return {}
        return {"sample_rng": self.sampling.get_state(), "noise_rng": self.noise.get_state(),
                **({"validation_rng": self.validation.get_state()} if self.validation is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A private run takes no generator state from a file, whatever the file holds (a crafted
        one; a version 1 checkpoint, whose dpwa wrote sample_rng, seeded from train.seed + 1, for
        private runs too): it goes on with fresh secret coins."""
        if not self.reproducible:
            return
        for key, generator in (("sample_rng", self.sampling), ("noise_rng", self.noise),
                               ("validation_rng", self.validation)):
            if key in state and generator is not None:
                generator.set_state(state[key])


@dataclasses.dataclass
class TrainState:
    """Everything that changes while a run trains. `step` counts iterations, the mechanism
    counts releases (a method may make several per iteration)."""

    model: nn.Module
    method: Any           # dpwa.methods.Method
    averagers: dict       # name -> dpwa.averaging.Averager (rank 0 only)
    mechanism: Any        # GradientMechanism | PublicGradients
    coins: Coins
    step: int = 0
    train_time_s: float = 0.0
    statistics: Any = None  # dpwa.statistics.StatisticsMechanism (model.input_norm=private), else None
    validation: Any = None  # dpwa.validation.ValidationAccuracy (a charged validation split), else None

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "model": self.model.state_dict(), "method": self.method.state_dict(),
                "averagers": {n: a.state_dict() for n, a in self.averagers.items()},
                "mechanism": self.mechanism.state_dict(), "step": self.step, "train_time_s": self.train_time_s,
                "coins": self.coins.state_dict(),
                **({"statistics": self.statistics.state_dict()} if self.statistics is not None else {}),
                **({"validation": self.validation.state_dict()} if self.validation is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint of this or an earlier version.

        Raises:
            StateError: a newer version, or tensors that do not fit the model / method.
        """
        state = upgrade(state)
        try:
            self.model.load_state_dict(state["model"])
            self.method.load_state_dict(state["method"])
            for name, avg in self.averagers.items():
                avg.load_state_dict(state["averagers"][name])
            self.mechanism.load_state_dict(state["mechanism"])
            self.coins.load_state_dict(state["coins"])
            if self.statistics is not None:  # its released statistics are in the model's buffers
                self.statistics.load_state_dict(state["statistics"])
            if self.validation is not None:  # the accuracies it released are in the rows it covers
                self.validation.load_state_dict(state["validation"])
            self.step, self.train_time_s = int(state["step"]), float(state["train_time_s"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise StateError(f"the checkpoint does not match the run ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint in the current layout. Version 1 (unversioned: DP-SGD only) had the
    optimizer at top level, the generator states loose, and one release per step."""
    version = state.get("version", 1)
    if version > STATE_VERSION:
        raise StateError(f"the checkpoint has state version {version}; this dpwa reads up to {STATE_VERSION} "
                         "(upgrade dpwa)")
    if version == STATE_VERSION:
        return state
    step = int(state["step"])
    return {"version": STATE_VERSION, "model": state["model"], "method": {"optimizer": state["optimizer"]},
            "averagers": state.get("averagers", {}), "step": step, "train_time_s": state.get("train_time_s", 0.0),
            "mechanism": {"released": step, "releases": None},
            "coins": {k: state[k] for k in ("sample_rng", "noise_rng") if k in state}}
