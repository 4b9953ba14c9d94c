"""DP-SGD (Abadi et al. 2016) on Opacus: Poisson sampling, per-example gradients, clipping,
Gaussian noise, large logical batches in physical chunks.

* Sampling: each example joins a logical batch independently with probability q = B/N
  (Opacus's `UniformWithReplacementSampler`); q is exactly what the ledger records.
* Per-example clipping: an engine (`dpwa.engines`) returns, per physical chunk, the sum of the
  examples' clipped gradients. With augmentation multiplicity an example's gradient is the
  mean over its K views, clipped once, so the sensitivity stays C. `per_example_grads` below
  (torch.func vmap over examples of the whole model) is the reference the engines are
  tested against.
* Noise, scaling: Opacus's `DPOptimizerFastGradientClipping` (accumulate the clipped sums over
  the chunks, add N(0, sigma^2 C^2) once per logical batch, divide by the expected batch
  size B), with its skip-step signal.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["poisson_batches", "per_example_grads", "PrivateSGD", "NonPrivateSGD", "secret_generator", "secret_seed"]


def poisson_batches(num_examples: int, sample_rate: float, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless Poisson-sampled logical batches of indices (each example in with prob. q)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(num_samples=num_examples, sample_rate=sample_rate,
                                            generator=generator, steps=1)
    while True:
        for indices in sampler:
            yield torch.as_tensor(indices, dtype=torch.long)


def per_example_grads(model: nn.Module, views: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of each example's loss, the mean cross-entropy over its K views.

    Args:
        model: any module without cross-example layers (no BatchNorm).
        views: (B, K, C, H, W) float inputs.
        labels: (B,) int64.

    Returns:
        ({param name: (B, *param.shape)}, per-example losses (B,)) for trainable params.
    """
    from torch.func import functional_call, grad_and_value, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_of_one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x,))
        return F.cross_entropy(out, y.expand(x.shape[0]))

    grads, losses = vmap(grad_and_value(loss_of_one), in_dims=(None, 0, 0), randomness="different")(
        params, views, labels)
    return grads, losses


def secret_seed() -> int:
    """63 bits of OS entropy."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def secret_generator(seed: Optional[int], device: str | torch.device = "cpu") -> torch.Generator:
    """An RNG for the mechanism's secret coins (the noise, on the parameters' device; the
    Poisson sampling): seeded from OS entropy unless a (test-only) seed is given.

    A known noise seed lets anyone subtract the noise from released weights; known batches
    void the amplification by subsampling that the accountant counts on. So the default seed
    is drawn from os.urandom and never stored.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else secret_seed())
    return g


class PrivateSGD:
    """One DP-SGD step per call to `step`, over a logical batch given as physical chunks.

    Args:
        model: the model whose trainable parameters are optimised.
        optimizer: a torch optimizer over those parameters (SGD, with momentum or not).
        noise_multiplier: sigma; the noise std is sigma * clip_norm.
        clip_norm: C, the per-example L2 bound.
        expected_batch_size: B = q N; the noisy sum is divided by it (not by the realised size,
            which would leak it).
        rescale_to_unit: divide the update by C (De et al.): noise std sigma, gradients <= 1.
        generator: noise RNG (see `secret_generator`).
        engine: how per-example clipped sums are computed (`dpwa.engines.ENGINES`).
        world_size: processes sharing each logical batch (torch.distributed initialised);
            each calls `step` with its own share of the examples.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 clip_norm: float, expected_batch_size: float, rescale_to_unit: bool = False,
                 generator: Optional[torch.Generator] = None, engine: str = "dpwa-fast",
                 world_size: int = 1) -> None:
        from opacus.optimizers import DistributedDPOptimizerFastGradientClipping, DPOptimizerFastGradientClipping

        from .engines import make_engine

        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip_norm = clip_norm
        self.rescale_to_unit = rescale_to_unit
        self.engine = make_engine(engine, model)
        self.distributed = world_size > 1
        # Opacus's optimizer for already-clipped sums: accumulates them over the chunks, adds
        # N(0, sigma^2 C^2) once per logical batch and divides by the expected batch size.
        # Distributed: each rank divides its sum by B / W, rank 0 alone adds the noise, and the
        # all-reduce (sum, then / W) gives every rank (sum of all clipped gradients + noise) / B.
        make = DistributedDPOptimizerFastGradientClipping if self.distributed else DPOptimizerFastGradientClipping
        self.dp = make(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                       expected_batch_size=expected_batch_size / world_size, loss_reduction="mean",
                       generator=generator)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.dp.original_optimizer

    def step(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Apply one noisy update from the chunks (views (b, K, C, H, W), labels (b,)) of one
        logical batch. An empty batch still gets its noise (the accountant counts the step).

        Returns local diagnostics over the private batch: not covered by the guarantee.
        """
        loss_sum, count = 0.0, 0
        # Look one chunk ahead to know which is last (the one that adds noise and steps),
        # so that only one chunk's augmented views are in memory at a time.
        pending = iter(chunks)
        chunk = next(pending, None)
        while True:
            following = next(pending, None)
            sums: dict = {}
            if chunk is not None and len(chunk[1]) > 0:
                sums, losses, _ = self.engine.clipped_sum(*chunk, self.clip_norm)
                loss_sum += float(losses.sum())
                count += len(losses)
            for p in self.params:
                p.grad = sums[p].detach() if p in sums else torch.zeros_like(p)
            self.dp.signal_skip_step(do_skip=following is not None)
            if self.dp.pre_step():
                if self.distributed:
                    self.dp.reduce_gradients()  # sum over ranks; one rank's noise in it
                if self.rescale_to_unit:
                    for p in self.params:
                        p.grad /= self.clip_norm
                self.dp.original_optimizer.step()
            self.dp.zero_grad(set_to_none=True)
            if following is None:
                break
            chunk = following
        return {"private_batch_loss_diagnostic": loss_sum / max(count, 1), "batch_size": count}


class NonPrivateSGD:
    """Plain minibatch SGD with the same interface as `PrivateSGD`, for public data only
    (`privacy.enabled: false`, which the config allows only with `data.public: true`): the mean
    over the batch of each example's loss (the mean over its K views). No clipping, no noise."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, count = 0.0, 0
        for views, labels in chunks:
            b, k = views.shape[:2]
            if b == 0:
                continue
            out = self.model(views.flatten(0, 1))
            losses = F.cross_entropy(out, labels.repeat_interleave(k), reduction="none").view(b, k).mean(1)
            losses.sum().backward()
            loss_sum += float(losses.detach().sum())
            count += b
        if count:
            for p in self.params:
                if p.grad is not None:
                    p.grad /= count
            self.optimizer.step()
        return {"train_batch_loss": loss_sum / max(count, 1), "batch_size": count}
