"""White-box gradient canaries: one DP-SGD run of a probe, scored from its released gradients.

The adversary of DP-SGD's analysis sees every noisy update and may choose the training data
(Nasr et al. 2021, "Adversary instantiation"; Nasr et al. 2023, "Tight auditing of
differentially private machine learning"). The strongest canary is an example whose clipped
gradient is a known vector no other example touches (a "Dirac" canary). dpwa builds them
as real examples that go through the real mechanism: Poisson sampling (`poisson_batches`),
K augmented views per example, physical chunks, the configured clipping engine and
Opacus's noise (`PrivateSGD`), with the configured sigma, q, steps, C and K.

The probe is a linear 2-class model without bias on vectors of `base_dims + m` coordinates.
Base examples (random, never audited) live in the first `base_dims` coordinates; canary j
is s * e_{base_dims + j} with label 0, so its gradient sits in column j of the weight alone,
and at zero weights (logits 0, softmax 1/2) it is s/2 (-1, 1) in that column: norm
s/sqrt(2) > C, clipped to exactly C along u = (-1, 1)/sqrt(2). The weights are held at zero
(the observer optimizer records each released gradient and applies nothing), so that vector
is the same at every step: the worst case the analysis covers, and the auditor's test is
exact. Each canary is in the training data with probability 1/2; distinct coordinates,
independent sampling and independent noise coordinates make canaries independent trials.

A model that tiles its batch (FiLM-Ensemble's M members, `members`) is probed by the same
linear model run on every input row M times (`_TiledProbe`, declared as such): an example is
then K x M rows, and its gradient must still be one vector clipped to C.

Per step t and canary j the auditor reads z = <released gradient, u> in units of one clipped
example: z ~ N(1, sigma^2) if j was sampled, N(0, sigma^2) otherwise. Its score is the
log-likelihood ratio of "in" against "out" under the claimed sigma and q, summed over the
steps: sum_t log(1 - q + q exp((2 z_t - 1) / (2 sigma^2))), the Neyman-Pearson test for
the claimed mechanism.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..privacy import PrivateSGD, keyed_state, poisson_batches
from ..rows import Tiling

__all__ = ["Mechanism", "CanaryRun", "canary_run", "probe_sgd", "null_thresholds"]


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """A DP-SGD mechanism as its accountant knows it, plus the settings the code path uses."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float = 1.0
    augmult_k: int = 1
    engine: str = "dpwa-fast"
    physical_batch_size: int = 256
    rescale_to_unit: bool = False
    members: int = 1              # rows per input row of a model that tiles its batch (FiLM-Ensemble)

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and 0 < self.sample_rate <= 1 and self.steps >= 1 and self.clip_norm > 0
                and self.augmult_k >= 1 and self.physical_batch_size >= 1 and self.members >= 1):
            raise ValueError(f"invalid mechanism {self}")


@dataclasses.dataclass(frozen=True)
class CanaryRun:
    scores: np.ndarray      # (m,) log-likelihood ratio of "in", per canary
    included: np.ndarray    # (m,) bool: canary j was in the training data
    seconds: float
    base_examples: int


class _TiledProbe(nn.Module):
    """The linear probe run on every input row `members` times (example-major), as a
    FiLM-Ensemble runs its trunk: declared to the engines as a tiling."""

    def __init__(self, linear: nn.Linear, members: int) -> None:
        super().__init__()
        self.linear, self.members = linear, members
        self.dpwa_tiling = Tiling(members=members, order="example-major")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.repeat_interleave(self.members, 0))


class _Observer(torch.optim.Optimizer):
    """The white-box adversary: records each released gradient, leaves the weights at zero."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.0})
        self.on_release: Optional[Callable[[torch.Tensor], None]] = None

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        assert self.on_release is not None
        self.on_release(self.param_groups[0]["params"][0].grad)


def probe_sgd(model: nn.Module, optimizer: torch.optim.Optimizer, mech: Mechanism, expected_batch_size: float,
              generator: torch.Generator) -> PrivateSGD:
    """The mechanism under audit, exactly as `dpwa train` builds it (`GradientMechanism`,
    metered: it refuses a release beyond `mech.steps`). Tests pass deliberately broken
    variants of this function (`canary_run(make_sgd=...)`) to show the audit flags them."""
    return PrivateSGD(model, optimizer, noise_multiplier=mech.noise_multiplier, clip_norm=mech.clip_norm,
                      expected_batch_size=expected_batch_size, rescale_to_unit=mech.rescale_to_unit,
                      generator=generator, engine=mech.engine, releases=mech.steps,
                      sample_rate=mech.sample_rate, physical_batch_size=mech.physical_batch_size)


#: the audit's independent streams, one per purpose (`stream`)
COINS, NOISE, BATCHES, NULL = range(4)


def stream(seed: int, purpose: int) -> torch.Generator:
    """A CPU generator for one purpose of the audit with `seed`: its whole mt19937 state from a
    hash of both (`keyed_state`). `manual_seed(seed + purpose)` kept only the seed's low 32 bits
    (seeds 0 and 2**32 gave one audit), and one audit's noise stream was the next seed's coins,
    and its null simulation drew from its own coins' stream."""
    key = hashlib.sha256(b"dpwa audit seed " + seed.to_bytes(8, "little", signed=True)).digest()
    return keyed_state(torch.Generator(), key, purpose)


def _log_likelihood_ratio(z: torch.Tensor, mech: Mechanism) -> torch.Tensor:
    """log of p(z | in) / p(z | out) for one step under the claimed sigma and q."""
    q, s2 = mech.sample_rate, mech.noise_multiplier ** 2
    log_out = torch.tensor(np.log1p(-q) if q < 1 else -np.inf, dtype=z.dtype)
    return torch.logaddexp(log_out, np.log(q) + (2 * z - 1) / (2 * s2))


def null_thresholds(mech: Mechanism, fprs: tuple[float, ...], *, samples: int = 20000, seed: int = 0) -> np.ndarray:
    """Score thresholds with false-positive rates `fprs` under the claimed mechanism, from
    simulated out-canaries (z ~ N(0, sigma^2) at every step): tests fixed before the audit
    sees any score, so choosing the best of them costs only a Bonferroni split."""
    g = stream(seed, NULL)
    total = torch.zeros(samples, dtype=torch.float64)
    for start in range(0, mech.steps, 256):
        t = min(256, mech.steps - start)
        z = mech.noise_multiplier * torch.randn(samples, t, generator=g, dtype=torch.float64)
        total += _log_likelihood_ratio(z, mech).sum(1)
    return np.quantile(total.numpy(), 1 - np.asarray(fprs))


def canary_run(mech: Mechanism, *, canaries: int = 1000, base_examples: Optional[int] = None, base_dims: int = 16,
               seed: int = 0, make_sgd: Callable[..., PrivateSGD] = probe_sgd,
               sample_rate_used: Optional[float] = None) -> CanaryRun:
    """Run the mechanism once on the probe with `canaries` gradient canaries (each in with
    probability 1/2) and score every canary from the released gradients.

    Args:
        mech: the mechanism as claimed (sigma, q, steps, C, K, engine, physical batch).
        canaries: m, the number of canaries.
        base_examples: ordinary examples trained alongside (default m / 2).
        base_dims: coordinates of the ordinary examples.
        seed: all randomness of the audit (it reads no private data, so nothing is secret).
        make_sgd: builds the mechanism (`probe_sgd`); tests plant bugs here.
        sample_rate_used: the rate the sampler really uses (default: the claimed one); tests
            plant the "recorded lower than used" bug here.
    """
    if canaries < 4:
        raise ValueError(f"need at least 4 canaries, got {canaries}")
    rng = stream(seed, COINS)
    n_base = canaries // 2 if base_examples is None else base_examples
    included = torch.rand(canaries, generator=rng) < 0.5
    members = included.nonzero().flatten()  # canary j is coordinate base_dims + j
    n = n_base + len(members)
    dims = base_dims + canaries
    c, k = mech.clip_norm, mech.augmult_k
    strength = 4 * c * 2 ** 0.5  # |gradient| = strength / sqrt(2) = 4 C: always clipped to C
    base_x = torch.randn(n_base, base_dims, generator=rng, dtype=torch.float64)
    base_y = torch.randint(0, 2, (n_base,), generator=rng)

    def views(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, K, dims) views and labels of training examples idx (base first, then members)."""
        x = torch.zeros(len(idx), k, dims, dtype=torch.float64)
        y = torch.zeros(len(idx), dtype=torch.long)
        base = idx < n_base
        if base.any():
            bi = idx[base]
            jitter = 0.1 * torch.randn(len(bi), k, base_dims, generator=rng, dtype=torch.float64)
            x[base, :, :base_dims] = base_x[bi].unsqueeze(1) + jitter  # augmented views differ
            y[base] = base_y[bi]
        pos = (~base).nonzero().flatten()
        x[pos, :, base_dims + members[idx[pos] - n_base]] = strength  # every view of a canary is the same
        return x, y

    linear = nn.Linear(dims, 2, bias=False).double()
    nn.init.zeros_(linear.weight)
    model = linear if mech.members == 1 else _TiledProbe(linear, mech.members)
    observer = _Observer(model.parameters())
    q = mech.sample_rate
    expected_b = q * n
    sgd = make_sgd(model, observer, mech, expected_b, stream(seed, NOISE))
    unit = (1.0 if mech.rescale_to_unit else c) / expected_b  # one clipped canary in the released gradient
    u = torch.tensor([-1.0, 1.0], dtype=torch.float64) / 2 ** 0.5
    scores = torch.zeros(canaries, dtype=torch.float64)

    def score(released: torch.Tensor) -> None:
        z = (u @ released[:, base_dims:]) / unit  # (m,): 1 + N(0, sigma^2) if sampled, else N(0, sigma^2)
        scores.add_(_log_likelihood_ratio(z, mech))

    observer.on_release = score
    batches = poisson_batches(n, sample_rate_used if sample_rate_used is not None else q,
                              stream(seed, BATCHES))
    t0 = time.time()
    for _ in range(mech.steps):
        idx = next(batches)
        sgd.step(views(part) for part in idx.split(mech.physical_batch_size))
    if hasattr(sgd.engine, "remove"):
        sgd.engine.remove()
    return CanaryRun(scores.numpy(), included.numpy(), time.time() - t0, n_base)
