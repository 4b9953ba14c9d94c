"""DP-SGD's pieces around the mechanism (Abadi et al. 2016): Poisson sampling and the
secret generators, plus `PrivateSGD` (mechanism + optimizer, for the audit and tests).

* Sampling: each example joins a logical batch independently with probability q = B/N
  (Opacus's `UniformWithReplacementSampler`); q is exactly what the ledger records.
* Clipping, noise, scaling: `dpwa.mechanism.GradientMechanism` over an engine
  (`dpwa.engines`); `dpwa.engines.reference.per_example_grads` (torch.func vmap over examples
  of the whole model) is the reference the engines are tested against.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import sys
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .mechanism import GradientMechanism

__all__ = ["poisson_batches", "PoissonBatches", "PrivateSGD", "secret_generator", "secret_seed", "secret_entropy",
           "seed_state", "keyed_state"]


class PoissonBatches:
    """Endless Poisson-sampled logical batches of indices (each example in with prob. q), one
    `torch.rand(N)` of the generator per batch (Opacus's `UniformWithReplacementSampler`).

    `peek()` is the batch the next `next()` will give, drawn from a copy of the generator: a
    loader can decode it ahead (`dpwa.loader`) while the secret generator, and every checkpoint
    of it, moves only when a batch is taken. A peeked batch that is never taken (the run stops)
    changes nothing: the copy is dropped, nothing of it is written or released.
    """

    def __init__(self, num_examples: int, sample_rate: float, generator: torch.Generator) -> None:
        self.num_examples, self.sample_rate, self.generator = num_examples, sample_rate, generator

    def __iter__(self) -> "PoissonBatches":
        return self

    def __next__(self) -> torch.Tensor:
        return self._draw(self.generator)

    def peek(self) -> torch.Tensor:
        """The batch the next `next()` gives; the generator does not move."""
        copy = torch.Generator(device=self.generator.device)
        copy.set_state(self.generator.get_state())
        return self._draw(copy)

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(num_samples=self.num_examples, sample_rate=self.sample_rate,
                                                generator=generator, steps=1)
        return torch.as_tensor(next(iter(sampler)), dtype=torch.long)


def poisson_batches(num_examples: int, sample_rate: float, generator: torch.Generator) -> PoissonBatches:
    """Endless Poisson-sampled logical batches of indices (each example in with prob. q)."""
    return PoissonBatches(num_examples, sample_rate, generator)


def secret_seed() -> int:
    """63 bits of OS entropy: a whole secret for a CUDA generator (Philox keys on all 64 bits of
    its seed), not for a CPU one (`seed_state`)."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


_MT_WORDS = 624                    # mt19937's state: 624 32-bit words (19937 bits)
_MT_OFFSET, _MT_BYTES = 24, 5056   # where they sit in torch's CPU generator state, and its size


def secret_entropy() -> bytes:
    """OS entropy for the whole state of a CPU generator (`seed_state`)."""
    return os.urandom(4 * _MT_WORDS)


def seed_state(g: torch.Generator, entropy: bytes) -> torch.Generator:
    """Set CPU generator `g`'s whole mt19937 state from `entropy` (624 x 4 bytes).

    `manual_seed` takes 64 bits, but torch seeds mt19937 from their low 32 only: a secret seed
    would pick one of 4.3e9 streams, few enough for a search to try every one against released
    weights (the noise, or the batches the accountant's amplification assumes unknown). The
    state holds 19937 bits; its first draw follows a twist of `entropy`, as Python's own
    mt19937 after `random.setstate((3, words + (624,), None))` (the test's reference)."""
    if len(entropy) != 4 * _MT_WORDS:
        raise ValueError(f"a CPU generator's state takes {4 * _MT_WORDS} bytes of entropy, got {len(entropy)}")
    g.manual_seed(0)  # the layout's other fields as after a seed: the next draw twists, no cached normals
    state = bytearray(g.get_state().numpy().tobytes())
    if len(state) != _MT_BYTES:  # torch's CPUGeneratorImplState, unchanged since 1.x
        raise RuntimeError(f"this torch's CPU generator state has {len(state)} bytes, not the {_MT_BYTES} dpwa "
                           "writes its secret mt19937 state into; a secret generator cannot be made safely")
    struct.pack_into(f"<{_MT_WORDS}Q", state, _MT_OFFSET, *struct.unpack(f"<{_MT_WORDS}I", entropy))
    g.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    return g


def keyed_state(g: torch.Generator, key: bytes, *labels: int) -> torch.Generator:
    """Set CPU generator `g`'s whole mt19937 state from a hash of a secret `key` and `labels`
    (SHAKE-256, 624 words): one secret stream per label tuple (a release, a rank) from one key
    and no state to checkpoint, each as hard to guess as the key; `manual_seed` of a derived
    integer would leave 32 bits (`seed_state`)."""
    if len(key) < 16:
        raise ValueError(f"a secret key takes at least 16 bytes, got {len(key)}")
    label = b"".join(int(v).to_bytes(8, "little", signed=True) for v in labels)
    return seed_state(g, hashlib.shake_256(len(key).to_bytes(4, "little") + key + label).digest(4 * _MT_WORDS))


def secret_generator(seed: Optional[int], device: str | torch.device = "cpu") -> torch.Generator:
    """An RNG for the mechanism's secret coins (the noise, on the parameters' device; the
    Poisson sampling): from OS entropy unless a (test-only) seed is given.

    A known noise seed lets anyone subtract the noise from released weights; known batches
    void the amplification by subsampling that the accountant counts on. So the default state
    is drawn from os.urandom, all of it (`seed_state`), and never stored.
    """
    g = torch.Generator(device=device)
    if seed is not None:
        g.manual_seed(seed)
    elif g.device.type == "cpu":
        seed_state(g, secret_entropy())
    else:
        g.manual_seed(secret_seed())
    return g


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class PrivateSGD:
    """A `GradientMechanism` and an optimizer in one object, for the audit and for tests that
    want one DP-SGD step per call. Training goes through the session loop (`dpwa.train`),
    where the mechanism's reservation comes from the ledger.

    Args:
        model: the model whose trainable parameters are optimised.
        optimizer: a torch optimizer over those parameters.
        noise_multiplier: sigma; the noise std is sigma * clip_norm.
        clip_norm: C, the per-example L2 bound.
        expected_batch_size: B = q N; the noisy sum is divided by it (not by the realised size,
            which would leak it).
        rescale_to_unit: divide the update by C (De et al.): noise std sigma, gradients <= 1.
        generator: noise RNG; None: a secret one (`secret_generator`), not torch's global one.
        engine: how per-example clipped sums are computed (`dpwa.engines.ENGINES`).
        world_size: processes sharing each logical batch (torch.distributed initialised);
            each calls `step` with its own share of the examples.
        releases: steps allowed (default: unmetered, for synthetic data only).
        sample_rate: q, recorded in the mechanism's events (default 1).
        physical_batch_size: the largest chunk `step` is given (public): batch independence is
            also probed at min(it, the expected batch per rank) examples, never at the realised
            (secret) size (default 256).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 clip_norm: float, expected_batch_size: float, rescale_to_unit: bool = False,
                 generator: Optional[torch.Generator] = None, engine: str = "dpwa-fast",
                 world_size: int = 1, releases: Optional[int] = None, sample_rate: float = 1.0,
                 physical_batch_size: int = 256) -> None:
        from .distributed import World
        from .engines import make_engine

        world = None
        if world_size > 1:
            import torch.distributed as dist

            world = World(rank=dist.get_rank(), size=world_size)
        self.model, self.optimizer = model, optimizer
        self.engine_name, self.probed = engine, None  # what the probe checked: `_probe_key`
        # public: a chunk as large as this rank's expected share, up to the chunks it is given
        self.probe_batch = max(2, min(round(expected_batch_size / world_size), physical_batch_size))
        self.engine = make_engine(engine, model)
        self.mechanism = GradientMechanism(
            model, engine=self.engine, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size, sample_rate=sample_rate,
            releases=releases if releases is not None else sys.maxsize, generator=generator, world=world,
            rescale_to_unit=rescale_to_unit)

    @property
    def params(self) -> list[nn.Parameter]:
        return self.mechanism.params

    def step(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Apply one noisy update from the chunks (views (b, K, C, H, W), labels (b,)) of one
        logical batch. An empty batch still gets its noise (the accountant counts the step).

        Returns local diagnostics over the private batch: not covered by the guarantee.
        """
        self.mechanism.engine = self.engine  # tests swap the engine for a planted bug
        from .optimizers import apply_release

        chunks = iter(chunks)
        first = next(chunks, None)
        if first is not None and self.probed != self._probe_key(first[0]):
            self._probe(first[0])
        return apply_release(self.optimizer, self.mechanism.release(itertools.chain([] if first is None else [first], chunks)))

    def _probe_key(self, views: torch.Tensor) -> tuple:
        """What the probe's verdict depends on, besides the parameters' values: the views'
        shape and K; the modules and their hooks (a hook or a layer added after the probe
        may mix examples); the parameters' layout (a model moved to channels-last meets
        activations in a layout the probe never saw, on which Opacus's conv rule is wrong).
        A change is probed again, on a fresh engine."""
        modules = tuple((id(m), *(tuple(getattr(m, d)) for d in _HOOK_DICTS)) for m in self.model.modules())
        return tuple(views.shape[1:]), modules, tuple(p.stride() for p in self.model.parameters())

    def _probe(self, views: torch.Tensor) -> None:
        """`dpwa.probe` before the first release, as `dpwa train` does before its reservation:
        a model that mixes examples, or an engine that is not exact on it, is refused here.
        Only shapes are read from the batch (random inputs are probed, not the data)."""
        from .engines import make_engine
        from .probe import probe

        shape, k = tuple(views.shape[2:]), views.shape[1]
        was = self.model.training
        with torch.no_grad():  # the number of classes, from the model's output on zeros
            classes = self.model.eval()(torch.zeros(2 * k, *shape, dtype=views.dtype, device=views.device)).shape[-1]
        self.model.train(was)
        if self.probed is not None:  # the model changed: its engine is rebuilt on it as it is now
            self.engine.remove()
            self.engine = self.mechanism.engine = make_engine(self.engine_name, self.model)
        # batch independence also at the physical batch (public; never the realised size, which is secret)
        probe(self.model, self.engine_name, example_shape=shape, views=k, num_classes=int(classes),
              batch=self.probe_batch)
        self.probed = self._probe_key(views)
