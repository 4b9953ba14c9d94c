"""Charged validation accuracy: the accuracy of a released model on the validation split,
released as a noisy count (design rule 5: an evaluation on private data is charged).

The validation split (`data.val_size`) is carved from the private training data and held
out of DP training, so reading it is a data access like any other. An accuracy is the count
of examples the model predicts correctly, divided by N_val: adding or removing one example
moves the count by at most 1 (sensitivity 1), so the count is released with N(0, sigma^2)
noise, sigma = s * N_val, where s = `train.val_noise` is the standard deviation of the
released accuracy; N_val is public, as N is for the sample rate q = B / N. This is
`dpwa.loss_query.LossMechanism` with each example's value its 0/1 correctness and B = 1 (the
Gaussian mechanism on a bounded sum, Dwork & Roth 2014, Thm A.1). k accuracies are one
`Gaussian(noise_multiplier=sigma, count=k)` event: `dpwa train` reserves it with the run's
DP-SGD steps (and calibrates its noise for privacy.epsilon with it counted), `dpwa eval
--data val` as a query of its own. Noisy accuracies are clipped to [0, 1] (post-processing).

Only accuracy is released: NLL, calibration and reliability bins would each need a bounded
query of their own. `train.val_noise=0` keeps the exact metrics, outside the guarantee
(warned, and listed in the report's `outside_guarantee`).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from accounting import Event, Gaussian

from .evaluate import predict_members
from .loss_query import LossMechanism

__all__ = ["ValidationAccuracy", "validation_event", "planned_releases", "PERIODIC", "FINAL", "evaluated_methods"]

PERIODIC = ("raw", "ema", "polyak", "swa")       # evaluated every train.eval_every steps
FINAL = ("raw", "ema", "polyak", "swa", "fge")   # evaluated at the end of a run
_KEPT = {"raw": None, "ema": None, "polyak": None, "swa": "swa", "fge": "snapshots"}  # averaging flag that keeps it


def evaluated_methods(cfg: Any, names: Iterable[str]) -> list[str]:
    """Which of `names` a run of `cfg` keeps (raw, EMA and Polyak always; SWA and FGE by their
    averaging flags): the most it evaluates at one point."""
    return [n for n in names if _KEPT[n] is None or getattr(cfg.averaging, _KEPT[n])]


def planned_releases(cfg: Any, steps: int) -> int:
    """The accuracies a run of `steps` steps evaluates on the validation split, at most: every
    kept periodic method at each `train.eval_every` boundary before the end, then every kept
    final method. An average that has collected nothing yet is skipped (released fewer)."""
    every = cfg.train.eval_every
    periodic = (steps - 1) // every if every else 0
    return periodic * len(evaluated_methods(cfg, PERIODIC)) + len(evaluated_methods(cfg, FINAL))


def validation_event(cfg: Any, steps: int) -> Optional[Gaussian]:
    """What a run's validation accuracies release: None unless a private run evaluates on the
    validation split with train.val_noise > 0."""
    if not (cfg.privacy.enabled and cfg.train.eval_split == "val" and cfg.train.val_noise > 0):
        return None
    return Gaussian(noise_multiplier=cfg.train.val_noise * cfg.data.val_size, count=planned_releases(cfg, steps))


class ValidationAccuracy:
    """Noisy accuracies on one validation split, at most `releases` of them.

    Args:
        noise: s, the standard deviation of each released accuracy (sigma = s * N_val on the count).
        size: N_val, the split's (public) size.
        releases: what the ledger reserved.
        generator: the secret noise RNG (`dpwa.privacy.secret_generator`; seeded in tests only).
    """

    def __init__(self, *, noise: float, size: int, releases: int, generator: Optional[torch.Generator] = None
                 ) -> None:
        if not noise > 0:
            raise ValueError(f"Expected noise > 0 (the std of a released accuracy), got {noise=}")
        self.noise = noise
        self._counts = LossMechanism(noise_multiplier=noise * size, loss_clip=1.0, dataset_size=size,
                                     releases=releases, generator=generator, what="validation accuracy")

    @property
    def noise_multiplier(self) -> float:
        return self._counts.noise_multiplier

    @property
    def released(self) -> int:
        return self._counts.released

    @property
    def releases(self) -> int:
        return self._counts.releases

    def events(self) -> list[Event]:
        return self._counts.events()

    def accuracy(self, members: Iterable[nn.Module], split: Any, data: Any) -> float:
        """The noisy accuracy of the ensemble of `members` (the mean of their softmaxes, as
        `dpwa.evaluate`) on `split`, in [0, 1]; counted before it is returned.

        Raises:
            ReleaseRefused: every reserved accuracy has been released (nothing is read).
        """
        def correct() -> Iterable[torch.Tensor]:  # read only once the mechanism has checked its count
            yield (predict_members(members, split, data).mean(0).argmax(1) == split.y).double()

        return min(max(self._counts.release(correct()), 0.0), 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"released": self.released}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        released = int(state["released"])
        if not 0 <= released <= self.releases:
            raise ValueError(f"the checkpoint's {released} validation releases exceed the {self.releases} reserved")
        self._counts.released = released

    def __repr__(self) -> str:
        return f"ValidationAccuracy(s={self.noise:g}, {self._counts!r})"
