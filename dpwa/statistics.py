"""The statistics mechanism: per-channel mean and variance of the private training features,
released with the Gaussian mechanism, for `model.input_norm: private`.

Tramer & Boneh 2021 ("Differentially private learning needs better features", their
`dp_utils.scatter_normalization`) normalise ScatterNet features with privately estimated
per-channel statistics instead of GroupNorm. Each example contributes two vectors, one value
per channel: its mean feature over the spatial positions, and its mean squared feature. Each
vector is clipped to an L2 bound (C_1 = `mean_clip`, C_2 = `second_moment_clip`), summed over
the training set, and released once with N(0, sigma^2 C_j^2) noise: two releases of the
Gaussian mechanism with noise multiplier sigma on the full data (no subsampling), recorded in
the ledger as `Gaussian(noise_multiplier=sigma, count=2)` and composed with the run's DP-SGD
steps. The sums are divided by the training-set size N, which dpwa treats as public (as the
sample rate q = B / N does). var = max(E[x^2] - E[x]^2, 0): post-processing.

Unlike the reference, the clip bounds are configuration, never a quantile of the private
norms (the reference's median threshold is itself an unaccounted release).

Like the gradient mechanism it counts its releases and refuses, before it reads any
example, a release the ledger did not reserve: a resumed run gets its statistics from the
checkpoint, never from a second release.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from accounting import Gaussian

from .mechanism import ReleaseRefused

__all__ = ["FeatureStatistics", "StatisticsMechanism", "RELEASES_PER_ESTIMATE", "clipped_moment_sums"]

RELEASES_PER_ESTIMATE = 2  # the mean and the second moment


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Released per-channel statistics (C,), float64: safe to store and publish."""

    mean: torch.Tensor
    var: torch.Tensor


def clipped_moment_sums(features: torch.Tensor, mean_clip: float, second_moment_clip: float,
                        chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over examples of the clipped per-example channel means and mean squares,
    float64 (C,) each. `features`: (N, C, ...) with the spatial dimensions after C. An
    example's moment vector that is not finite counts as 0 (a function of it alone, so the
    sensitivity stays C_j): inf times its clip factor 0 is NaN, and a NaN in the sum would
    tell, whatever the noise, that the example is in the data."""
    c = features.shape[1]
    sums = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for part in features.split(chunk):
        x = part.to(torch.float64).reshape(len(part), c, -1)
        for total, moment, bound in zip(sums, (x.mean(-1), x.square().mean(-1)), (mean_clip, second_moment_clip)):
            finite = torch.isfinite(moment).all(dim=1, keepdim=True)
            moment = torch.where(finite, moment, 0.0)
            norms = moment.norm(dim=1, keepdim=True)
            total += (moment * (bound / norms.clamp_min(1e-300)).clamp(max=1.0)).sum(0)
    return sums


class StatisticsMechanism:
    """Args:
        noise_multiplier: sigma; the noise std of release j is sigma * C_j.
        mean_clip: C_1, the L2 bound on an example's vector of channel means.
        second_moment_clip: C_2, the same for its vector of channel mean squares.
        dataset_size: N, the (public) number of training examples the sums are divided by.
        releases: what the ledger reserved for this run (2 for one estimate, 0 for none).
        generator: the secret noise RNG (`dpwa.privacy.secret_generator`; by default a fresh
            one, never torch's global generator, which `torch.manual_seed` makes known).
        released: releases already made (a resumed run).
    """

    def __init__(self, *, noise_multiplier: float, mean_clip: float, second_moment_clip: float, dataset_size: int,
                 releases: int = RELEASES_PER_ESTIMATE, generator: Optional[torch.Generator] = None,
                 released: int = 0) -> None:
        if not (noise_multiplier > 0 and mean_clip > 0 and second_moment_clip > 0 and dataset_size >= 1):
            raise ValueError(f"Expected noise_multiplier, mean_clip, second_moment_clip > 0 and dataset_size >= 1; got "
                             f"{noise_multiplier=}, {mean_clip=}, {second_moment_clip=}, {dataset_size=}")
        if not 0 <= released <= releases:
            raise ValueError(f"Expected 0 <= {released=} <= {releases=}")
        self.noise_multiplier, self.mean_clip, self.second_moment_clip = noise_multiplier, mean_clip, second_moment_clip
        self.dataset_size, self.releases, self.released = dataset_size, releases, released
        if generator is None:
            from .privacy import secret_generator

            generator = secret_generator(None)
        self.generator = generator

    def events(self, releases: Optional[int] = None) -> list[Gaussian]:
        n = self.released if releases is None else releases
        return [Gaussian(noise_multiplier=self.noise_multiplier, count=n)] if n else []

    def release(self, features: torch.Tensor) -> FeatureStatistics:
        """The noisy per-channel mean and variance of `features` (N, C, ...).

        Raises:
            ReleaseRefused: the reservation cannot hold both releases (checked before any
                example is read).
        """
        if self.released + RELEASES_PER_ESTIMATE > self.releases:
            raise ReleaseRefused(f"feature statistics refused: the ledger reserved {self.releases} statistics "
                                 f"releases for this run and {self.released} were made; one estimate takes "
                                 f"{RELEASES_PER_ESTIMATE}")
        if len(features) != self.dataset_size:
            raise ValueError(f"Expected {self.dataset_size} examples (the reserved N), got {len(features)}")
        first, second = clipped_moment_sums(features, self.mean_clip, self.second_moment_clip)
        self.released += RELEASES_PER_ESTIMATE  # counted before anything leaves
        noisy = [total + torch.normal(0.0, self.noise_multiplier * bound, size=total.shape, dtype=torch.float64,
                                      generator=self.generator)
                 for total, bound in ((first, self.mean_clip), (second, self.second_moment_clip))]
        mean, second_moment = (v / self.dataset_size for v in noisy)
        return FeatureStatistics(mean=mean, var=(second_moment - mean.square()).clamp_min(0.0))

    def state_dict(self) -> dict[str, Any]:
        return {"released": self.released, "releases": self.releases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["releases"]) != self.releases or not 0 <= int(state["released"]) <= self.releases:
            raise ValueError(f"statistics state {state} does not fit a reservation of {self.releases} releases")
        self.released = int(state["released"])

    def __repr__(self) -> str:
        return (f"StatisticsMechanism(sigma={self.noise_multiplier:g}, C=({self.mean_clip:g}, "
                f"{self.second_moment_clip:g}), N={self.dataset_size}, released {self.released}/{self.releases})")
