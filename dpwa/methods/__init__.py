"""Training methods: how a run turns the mechanism's noisy releases into iterates.

A method is what a new algorithm adds (one file here, registered with `register_method`);
the session loop (`dpwa.train`), the mechanism and the ledger calls are not edited for it.
It declares in `releases(steps)` how many noisy gradient releases `steps` iterations make:
that is what the ledger reserves, and the mechanism refuses one more. In `step` it may call
`Step.release()` (a fresh secret Poisson batch through the mechanism) as often as it
declared, and do anything with the results: everything after a release is post-processing.
It never sees the data, only released gradients.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch.nn as nn

from ..config import RunConfig
from ..mechanism import Release

__all__ = ["Method", "Step", "METHODS", "register_method", "make_method"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One iteration as the loop hands it to a method.

    index: 0-based (the step makes iterate index + 1); lr: the schedule's lr for it;
    release: the noisy mean gradient of the next secret Poisson batch (counted and metered).
    """

    index: int
    lr: float
    release: Callable[[], Release]


class Method(abc.ABC):
    """A training method over the trainable parameters of `model`. `noise_std` is the std of
    the noise on each coordinate of a release (sigma C / B, or sigma / B with rescale_to_unit;
    0 without privacy): public, calibrated by the plan, for methods that correct for it."""

    name: ClassVar[str]

    def __init__(self, cfg: RunConfig, model: nn.Module, *, noise_std: float = 0.0) -> None:
        self.cfg, self.model, self.noise_std = cfg, model, noise_std
        self.params = [p for p in model.parameters() if p.requires_grad]  # what the releases are for

    @classmethod
    @abc.abstractmethod
    def releases(cls, cfg: RunConfig, steps: int) -> int:
        """The noisy releases `steps` iterations make: what the ledger reserves (known from
        the config alone, before any model or data is touched)."""

    @abc.abstractmethod
    def step(self, step: Step) -> dict[str, float]:
        """Make one iterate; returns local diagnostics for metrics.jsonl (not covered by the
        guarantee: they may depend on the private batch)."""

    # method.* fields that count steps: `dpwa budget --config --batch-size` names them among the
    # keys to scale at the same epochs
    step_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def length_problems(cls, cfg: RunConfig, steps: int) -> list[str]:
        """Every way the method's own settings would not fit a `steps`-step run (a phase that
        never starts, a schedule with no update in it: a run charged for a method it would not
        be), as messages naming the keys. Checked with the schedule's and the averagers' before
        any charge (`dpwa.train._check_length`). None by default."""
        return []

    @classmethod
    def built_on(cls, cfg: RunConfig) -> list[Path]:
        """The run folder of each released run this method starts from (a curve's endpoints),
        whose weights its checkpoints carry (`dpwa.run_folder.carried_runs`): the ledger a
        private run is charged to must hold them, so that the spend on their data composes with
        this run's, and the run is labelled private only if they are. None by default."""
        return []

    @classmethod
    def released_models(cls, cfg: RunConfig, model: nn.Module, state: dict[str, Any]
                        ) -> dict[str, Callable[[], Iterator[nn.Module]]]:
        """Models the method keeps in its checkpointed `state` besides the last iterate (EDST's
        tickets, Sup-tickets' superposition), for `dpwa eval`: name -> a function returning the
        members whose mean softmax is the prediction, built on copies of `model`. Post-processing
        of released iterates; none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless by default
        pass


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as `method.name: <cls.name>`."""
    METHODS[cls.name] = cls
    return cls


def make_method(cfg: RunConfig, model: nn.Module, *, noise_std: float = 0.0) -> Method:
    return METHODS[cfg.method.name](cfg, model, noise_std=noise_std)


from . import curve, dpsat, dpsgd, edst, entropy_sgd, pswa, rigl, set, suptickets  # noqa: E402,F401 - registers the built-in methods
