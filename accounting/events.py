"""Mechanism events: what a ledger stores and what accountants compose.

The ledger records mechanisms, never epsilons (design rule 6): epsilon depends on the
accountant and on delta, and composing events is exact where adding epsilons is not.

Two mechanisms cover dpwa's data accesses:

* `PoissonGaussian`: `steps` DP-SGD steps, each a Gaussian mechanism with noise
  multiplier sigma (noise std / L2 sensitivity) applied to a Poisson sample of rate q
  (Abadi et al. 2016).
* `Gaussian`: `count` releases of a Gaussian mechanism on the whole dataset, without
  subsampling (e.g. a private evaluation query).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Iterable, Mapping, Union

from .errors import InvalidParameterError

__all__ = ["PoissonGaussian", "Gaussian", "Event", "event_from_dict", "events_from_json_list", "merge",
           "MIN_NOISE_MULTIPLIER", "MAX_NOISE_MULTIPLIER"]

#: Below this the accountants' arithmetic breaks down: a step's RDP grows as 1/sigma^2, which
#: overflows near sigma = 1e-154, and dp-accounting's subsampled-Gaussian RDP already returns
#: NaN and wrong finite values there, so an RDP bound of such a run came out as epsilon 0. At the
#: floor epsilon is above 1e100: no release near it protects anything.
MIN_NOISE_MULTIPLIER = 1e-50
#: Above this sigma^2 overflows float64 (near 1e154) in the accountants: a raw OverflowError
#: instead of an answer. At the cap epsilon is below 1e-99 for any count a run can make.
MAX_NOISE_MULTIPLIER = 1e100


def _check_noise(noise_multiplier: Any) -> None:
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)):
        raise InvalidParameterError(f"Expected a number for noise_multiplier, got {noise_multiplier!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise InvalidParameterError(
            f"Expected noise_multiplier > 0 and finite, got {noise_multiplier=}")
    if noise_multiplier < MIN_NOISE_MULTIPLIER:
        raise InvalidParameterError(
            f"Expected noise_multiplier >= {MIN_NOISE_MULTIPLIER:g} (the accountants' arithmetic overflows below; "
            f"epsilon there is above 1e100), got {noise_multiplier=}")
    if noise_multiplier > MAX_NOISE_MULTIPLIER:
        raise InvalidParameterError(
            f"Expected noise_multiplier <= {MAX_NOISE_MULTIPLIER:g} (sigma^2 overflows above; epsilon there is "
            f"below 1e-99), got {noise_multiplier=}")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"Expected an integer for {name}, got {value!r}")
    if value < 0:
        raise InvalidParameterError(f"Expected {name} >= 0, got {name}={value}")


@dataclass(frozen=True, kw_only=True)
class PoissonGaussian:
    """`steps` compositions of the Poisson-subsampled Gaussian mechanism (one DP-SGD run).

    Args:
        noise_multiplier: sigma, the noise std divided by the clipping norm.
        sample_rate: q in (0, 1], the probability that an example is in a logical batch.
        steps: number of noisy steps (>= 0).

    >>> PoissonGaussian(noise_multiplier=3.0, sample_rate=0.08192, steps=2468).steps
    2468
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    kind: ClassVar[str] = "poisson_gaussian"

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)
        q = self.sample_rate
        if isinstance(q, bool) or not isinstance(q, (int, float)):
            raise InvalidParameterError(f"Expected a number for sample_rate, got {q!r}")
        if not (0 < q <= 1):
            raise InvalidParameterError(f"Expected 0 < sample_rate <= 1, got sample_rate={q}")
        _check_count("steps", self.steps)

    @property
    def count(self) -> int:
        return self.steps

    def with_count(self, count: int) -> "PoissonGaussian":
        return PoissonGaussian(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                               steps=count)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class Gaussian:
    """`count` releases of the Gaussian mechanism on the full dataset (no subsampling).

    >>> Gaussian(noise_multiplier=50.0).count
    1
    """

    noise_multiplier: float
    count: int = 1
    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        _check_noise(self.noise_multiplier)
        _check_count("count", self.count)

    def with_count(self, count: int) -> "Gaussian":
        return Gaussian(noise_multiplier=self.noise_multiplier, count=count)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


Event = Union[PoissonGaussian, Gaussian]
_KINDS = {cls.kind: cls for cls in (PoissonGaussian, Gaussian)}


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Rebuild an event from `to_dict()` output, validating every field.

    Raises:
        InvalidParameterError: unknown kind, unknown or missing fields, or values out of range.
    """
    if not isinstance(data, Mapping):
        raise InvalidParameterError(f"Expected an event mapping, got {data!r}")
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind not in _KINDS:
        raise InvalidParameterError(f"Unknown event kind {kind!r}; known kinds: {sorted(_KINDS)}")
    try:
        return _KINDS[kind](**fields)
    except TypeError as e:
        raise InvalidParameterError(f"Bad fields for a {kind!r} event: {fields!r} ({e})") from None


def events_from_json_list(items: Iterable[Mapping[str, Any]]) -> list[Event]:
    return [event_from_dict(item) for item in items]


def merge(events: Iterable[Event]) -> list[Event]:
    """Group events with identical mechanisms, summing their counts; drop empty ones.

    Composition is commutative, so this changes no epsilon; it lets accountants use one
    self-composition per distinct mechanism (fast) instead of one per run. A Poisson
    Gaussian with sample rate 1 is the plain Gaussian mechanism and is merged with it.

    >>> merge([PoissonGaussian(noise_multiplier=1.0, sample_rate=0.1, steps=5),
    ...        PoissonGaussian(noise_multiplier=1.0, sample_rate=0.1, steps=7)])
    [PoissonGaussian(noise_multiplier=1.0, sample_rate=0.1, steps=12)]
    """
    totals: dict[Event, int] = {}
    for event in events:
        if isinstance(event, PoissonGaussian) and event.sample_rate == 1:
            event = Gaussian(noise_multiplier=float(event.noise_multiplier), count=event.steps)
        key = event.with_count(0)
        totals[key] = totals.get(key, 0) + event.count
    return [key.with_count(n) for key, n in totals.items() if n > 0]
