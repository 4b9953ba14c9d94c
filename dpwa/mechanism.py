"""The gradient mechanism: the only door through which a gradient of private data leaves.

One release is one step of the subsampled Gaussian mechanism of DP-SGD (Abadi et al. 2016):
the clipped per-example gradients of a Poisson-sampled logical batch, summed over its
physical chunks, plus N(0, sigma^2 C^2) once, divided by the expected batch size B (never by
the realised size, which would leak it), all-reduced over the ranks of a distributed run
(each rank clips its share; rank 0 alone adds the noise). The mechanism counts its releases
and refuses, before it reads any data, a release beyond what the ledger reserved: a method
with an inner loop or a second pass cannot spend more than it declared. What the ledger
records at every checkpoint and at commit is `events()`, computed from that count, not from
the loop that made the steps.

The optimizer step is not here: a method gets the noisy gradient and applies it however it
likes (SGD, Adam, an ascent step); everything after the release is post-processing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from accounting import PoissonGaussian

from .errors import RefusalError
from .rows import Rows, example_losses, tiling_of

__all__ = ["GradientMechanism", "PublicGradients", "Release", "ReleaseRefused"]


class ReleaseRefused(RefusalError):
    """A release beyond the reservation (exit 1); nothing was read and nothing was released."""


@dataclasses.dataclass(frozen=True)
class Release:
    """One noisy mean gradient per trainable parameter, and local diagnostics of the private
    batch (its mean loss and realised size: NOT covered by the guarantee, never published)."""

    grads: dict[nn.Parameter, torch.Tensor]
    loss_diagnostic: float
    batch_size_diagnostic: int


class GradientMechanism:
    """Args:
        model: its trainable parameters get the gradients.
        engine: a built engine (`dpwa.engines.make_engine`), already probed (`dpwa.probe`).
        clip_norm: C, the per-example L2 bound.
        noise_multiplier: sigma; the noise std is sigma * C.
        expected_batch_size: B = q N.
        sample_rate: q, for the events.
        releases: the number of releases the ledger reserved; one more is refused.
        generator: the noise RNG, on the parameters' device; None: a secret one from OS entropy
            (`dpwa.privacy.secret_generator`), never torch's global generator, which a
            `torch.manual_seed` makes known (anyone could then subtract the noise).
        world: the processes sharing each logical batch (`dpwa.distributed.World`); None: one.
        rescale_to_unit: divide the release by C (De et al.): noise std sigma / B, gradients <= 1 / B.
        released: releases already made (a resumed run).
    """

    def __init__(self, model: nn.Module, *, engine: Any, clip_norm: float, noise_multiplier: float,
                 expected_batch_size: float, sample_rate: float, releases: int,
                 generator: Optional[torch.Generator] = None, world: Any = None, rescale_to_unit: bool = False,
                 released: int = 0) -> None:
        if not (clip_norm > 0 and noise_multiplier >= 0 and expected_batch_size > 0 and 0 < sample_rate <= 1):
            raise ValueError(f"Expected clip_norm > 0, noise_multiplier >= 0, expected_batch_size > 0, "
                             f"0 < sample_rate <= 1; got {clip_norm=}, {noise_multiplier=}, {expected_batch_size=}, "
                             f"{sample_rate=}")
        if not (0 <= released <= releases):
            raise ValueError(f"Expected 0 <= {released=} <= {releases=}")
        self.model, self.engine = model, engine
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        self.expected_batch_size, self.sample_rate = expected_batch_size, sample_rate
        self.releases, self.released = releases, released
        if generator is None:
            from .privacy import secret_generator  # privacy imports this module

            generator = secret_generator(None, self.params[0].device if self.params else "cpu")
        self.generator, self.world, self.rescale_to_unit = generator, world, rescale_to_unit
        self.tiling = tiling_of(model)

    @property
    def remaining(self) -> int:
        return self.releases - self.released

    def events(self, releases: Optional[int] = None) -> list[PoissonGaussian]:
        """The mechanism events of `releases` releases (default: those made so far)."""
        n = self.released if releases is None else releases
        return [PoissonGaussian(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=n)]

    def release(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Release:
        """One noisy mean gradient from the physical chunks (views (b, K, ...), labels (b,)) of
        one Poisson-sampled logical batch (this rank's share of it). An empty batch still gets
        its noise: the accountant counts every step.

        Raises:
            ReleaseRefused: the reservation is used up (checked before any chunk is read).
        """
        if self.released >= self.releases:
            raise ReleaseRefused(f"release {self.released + 1} refused: the ledger reserved {self.releases} "
                                 "releases for this run and all were made; a method must declare every gradient "
                                 "query it makes in its plan (`Method.releases`)")
        self.model.train()  # the mode the probe checked (a model may mix examples only in another)
        sums = {p: torch.zeros_like(p) for p in self.params}
        loss_sum, count = 0.0, 0
        for views, labels in chunks:  # one chunk's views in memory at a time (an empty one adds nothing)
            # The engine sees the layout the probe checked it on (contiguous random inputs):
            # Opacus 1.6.0's conv rule gives wrong per-example gradients on channels-last
            # inputs, which a probe on contiguous ones would pass (tests/dpwa/test_memory_format.py).
            part, losses = self._clipped_sum(views.contiguous(), labels)
            for p, value in part.items():
                sums[p] += value.detach()
            loss_sum += float(losses.sum())
            count += len(losses)
        self.released += 1  # counted before anything leaves
        world = self.world
        main = world is None or world.main
        std = self.noise_multiplier * self.clip_norm
        for p in self.params:  # the same order, device and generator calls as Opacus's optimizer
            if main and std > 0:
                sums[p] += torch.normal(mean=0.0, std=std, size=p.shape, device=p.device, dtype=p.dtype,
                                        generator=self.generator)
        if world is not None and world.size > 1:
            # the clipped sums of every rank, one rank's noise; and the whole batch's loss sum and
            # size (the private diagnostics were rank 0's share)
            tail = torch.tensor([loss_sum, count], dtype=torch.float64)
            flat = torch.cat([*(sums[p].reshape(-1) for p in self.params), tail.to(self.params[0])])
            torch.distributed.all_reduce(flat)
            parts = flat.split([*(p.numel() for p in self.params), 2])
            for p, v in zip(self.params, parts):
                sums[p] = v.view_as(p)
            loss_sum, count = float(parts[-1][0]), int(round(float(parts[-1][1])))
        scale = self.expected_batch_size * (self.clip_norm if self.rescale_to_unit else 1.0)
        return Release({p: v / scale for p, v in sums.items()}, loss_sum / max(count, 1), count)

    def _clipped_sum(self, views: torch.Tensor, labels: torch.Tensor) -> tuple[dict[nn.Parameter, torch.Tensor],
                                                                              torch.Tensor]:
        """The engine's clipped sum of one chunk and its per-example losses, without the
        examples whose gradient or loss is not finite (an overflow, an inf pixel): summed with
        the others, one would make the release NaN and so tell, whatever the noise, that it is
        in the batch. Its clipped gradient is taken as 0, a function of it alone (the
        sensitivity stays C), and the chunk is summed again without it; the probe showed that
        no example's gradient depends on another's, so the others' are unchanged."""
        while len(labels):
            rows = Rows(examples=views.shape[0], views=views.shape[1], tiling=self.tiling)
            part, losses, norms = self.engine.clipped_sum(views, labels, self.clip_norm, rows)
            finite = torch.isfinite(norms) & torch.isfinite(losses)
            if bool(finite.all()):  # one check per chunk: the usual case
                return part, losses
            keep = finite.nonzero().flatten()
            views, labels = views[keep.to(views.device)], labels[keep.to(labels.device)]
        return {}, torch.zeros(0)

    def state_dict(self) -> dict[str, Any]:
        return {"released": self.released, "releases": self.releases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        reserved = state.get("releases")  # None: a checkpoint from before the count was stored
        if (reserved is not None and int(reserved) != self.releases) or not 0 <= int(state["released"]) <= self.releases:
            raise ValueError(f"mechanism state {state} does not fit a reservation of {self.releases} releases")
        self.released = int(state["released"])

    def __repr__(self) -> str:
        return (f"GradientMechanism(sigma={self.noise_multiplier:g}, C={self.clip_norm:g}, B={self.expected_batch_size:g}, "
                f"q={self.sample_rate:g}, released {self.released}/{self.releases})")


class PublicGradients:
    """The same interface as `GradientMechanism` for public data only (`privacy.enabled:
    false`, which the config allows only with `data.public: true`): the plain mean gradient of
    the batch's per-example losses, no clipping, no noise, nothing to count against a ledger."""

    def __init__(self, model: nn.Module, *, releases: int, released: int = 0) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.releases, self.released = releases, released
        self.tiling = tiling_of(model)

    def events(self, releases: Optional[int] = None) -> list[PoissonGaussian]:
        return []

    def release(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Release:
        for p in self.params:
            p.grad = None
        loss_sum, count = 0.0, 0
        for views, labels in chunks:
            if len(labels) == 0:
                continue
            rows = Rows(examples=views.shape[0], views=views.shape[1], tiling=self.tiling)
            losses = example_losses(self.model(views.flatten(0, 1)), labels, rows)
            losses.sum().backward()
            loss_sum += float(losses.detach().sum())
            count += len(losses)
        self.released += 1
        grads = {p: (p.grad / max(count, 1) if p.grad is not None else torch.zeros_like(p)) for p in self.params}
        for p in self.params:
            p.grad = None
        return Release(grads, loss_sum / max(count, 1), count)

    state_dict = GradientMechanism.state_dict
    load_state_dict = GradientMechanism.load_state_dict
