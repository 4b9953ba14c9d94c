"""Epsilon and delta of a list of mechanism events, under three accountants.

* ``rdp``: Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019 for the subsampled
  Gaussian) with the RDP-to-(eps, delta) conversion of Balle et al. 2020, computed by
  dp-accounting on Opacus's default orders, so numbers agree with Opacus's RDP accountant.
* ``prv``: privacy random variables (Gopi, Lee, Wutschitz 2021), the default. The PRVs,
  the safe domain, the discretisation and the (eps, delta) read-out come from
  prv-accountant; the composition is done here, in one pass in Fourier space, because
  prv-accountant's convolution tree takes ~20 s for ten heterogeneous runs. We report the
  upper bound (estimate + eps_error), so the number is a guarantee, not an estimate.
* ``pld``: privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), by
  dp-accounting's PLDAccountant with its default discretisation (pessimistic estimate).

Events with different parameters compose (heterogeneous composition): a dataset's
ledger is the composition of every run that touched it.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import InvalidParameterError
from .events import Event, PoissonGaussian, merge

__all__ = ["ACCOUNTANTS", "DEFAULT_ACCOUNTANT", "epsilon", "delta", "check_accountant", "check_delta"]

DEFAULT_ACCOUNTANT = "prv"
#: Opacus's default RDP orders; using the same ones reproduces its numbers exactly.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
#: PRV epsilon error, Opacus's default: the upper bound is at most ~0.02 above the truth.
PRV_EPS_ERROR = 0.01


def check_delta(delta: float) -> None:
    """Check that `delta` is a number in (0, 1).

    Raises:
        InvalidParameterError: naming the value (``delta=...``).

    Whether delta is also below 1/N depends on the dataset: see
    `accounting.ledger.check_delta_below_1_over_n`.
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 < delta < 1):
        raise InvalidParameterError(f"Expected 0 < delta < 1, got delta={delta!r}")


def _check_epsilon(epsilon: float) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
            math.isfinite(epsilon) and epsilon >= 0):
        raise InvalidParameterError(f"Expected a finite epsilon >= 0, got epsilon={epsilon!r}")


# ---------------------------------------------------------------- dp-accounting (RDP, PLD)

def _dp_event(events: Sequence[Event]):
    import dp_accounting as dpa

    parts = []
    for e in events:
        if isinstance(e, PoissonGaussian):
            inner = dpa.PoissonSampledDpEvent(e.sample_rate, dpa.GaussianDpEvent(e.noise_multiplier))
        else:
            inner = dpa.GaussianDpEvent(e.noise_multiplier)
        parts.append(dpa.SelfComposedDpEvent(inner, e.count))
    return dpa.ComposedDpEvent(parts)


def _rdp(events: Sequence[Event]):
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(list(RDP_ORDERS))
    # dp-accounting logs a warning for every order whose series does not converge (tiny
    # sigma, large q) and drops that order; that only loosens the bound, so keep it quiet.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(_dp_event(events))
    finally:
        absl.setLevel(level)
    return acc


def _pld(events: Sequence[Event]):
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant()
    acc.compose(_dp_event(events))
    return acc


def _rdp_epsilon(events: Sequence[Event], delta: float) -> float:
    return float(_rdp(events).get_epsilon(delta))


def _rdp_delta(events: Sequence[Event], epsilon: float) -> float:
    return float(_rdp(events).get_delta(epsilon))


def _pld_epsilon(events: Sequence[Event], delta: float) -> float:
    return float(_pld(events).get_epsilon(delta))


def _pld_delta(events: Sequence[Event], epsilon: float) -> float:
    return float(_pld(events).get_delta(epsilon))


# ---------------------------------------------------------------- prv-accountant (PRV)

def _prv(event: Event):
    from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism

    if isinstance(event, PoissonGaussian):
        return PoissonSubsampledGaussianMechanism(sampling_probability=event.sample_rate,
                                                  noise_multiplier=event.noise_multiplier)
    return GaussianMechanism(noise_multiplier=event.noise_multiplier)


@functools.lru_cache(maxsize=4096)
def _rdp_curve(mechanism: Event) -> np.ndarray:
    """RDP of one step of `mechanism` at RDP_ORDERS (prv-accountant's formulas), cached:
    the ledger and the calibrations ask for the same mechanisms again and again."""
    prv = _prv(mechanism)
    curve = np.array([float(prv.rdp(a)) for a in RDP_ORDERS])
    curve.flags.writeable = False
    return curve


def _rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    orders = np.asarray(RDP_ORDERS)
    return float(np.nanmin(rdp - np.log(delta * orders) / (orders - 1) + np.log1p(-1 / orders)))


def _safe_domain_size(events: Sequence[Event], eps_error: float, delta_error: float) -> float:
    """`prv_accountant.accountant.compute_safe_domain_size` (remark 5.6 of Gopi et al.),
    computing each mechanism's RDP curve once instead of twice per query (tested equal)."""
    counts = [e.count for e in events]
    curves = [_rdp_curve(e.with_count(0)) for e in events]
    L = _rdp_to_epsilon(sum(c * n for c, n in zip(curves, counts)), delta_error / 4)
    for curve in curves:
        L = max(L, _rdp_to_epsilon(curve, delta_error / 8 / sum(counts)))
    return max(L, eps_error) + 3


def _fast_domain(L: float, mesh: float):
    """prv-accountant's aligned domain on [-L, L], widened to an FFT-friendly even size.

    Widening only lowers the truncation error; a size with small prime factors makes the
    FFTs 5-10x faster than an arbitrary one. Index i sits at t = (i - K) * mesh with
    size = 2K + 2, the layout prv-accountant's Fourier composer relies on.
    """
    from prv_accountant.domain import Domain
    from scipy.fft import next_fast_len

    size = len(Domain.create_aligned(-L, L, mesh))
    while (size := next_fast_len(size, real=True)) % 2:
        size += 1
    k = size // 2 - 1
    return Domain(-k * mesh, (k + 1) * mesh, size)


def _discretise(prv, domain):
    """prv-accountant's cell-centred discretisation, evaluated only where the pmf is non-zero.

    A PRV's mass sits in a small part of the safe domain; outside it the truncated CDF is
    exactly 0 or exactly 1 and every cell's mass `cdf(right) - cdf(left)` is exactly 0. A
    coarse pass over the (monotone) CDF finds that part, so the result is identical to
    `prv_accountant.discretisers.CellCentred` at a fraction of its cost (tested).
    """
    from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable
    from prv_accountant.privacy_random_variables import PrivacyRandomVariableTruncated

    tprv = PrivacyRandomVariableTruncated(prv, domain.t_min(), domain.t_max())
    ts = domain.ts()
    half = domain.dt() / 2.0
    stride = 256
    coarse = np.arange(0, len(ts), stride)
    right_cdf = tprv.cdf(ts[coarse] + half)
    left_cdf = tprv.cdf(ts[coarse] - half)
    zero = np.flatnonzero(right_cdf == 0)   # cells up to here have cdf(right) == 0
    one = np.flatnonzero(left_cdf == 1)     # cells from here on have cdf(left) == 1
    lo = int(coarse[zero[-1]]) if len(zero) else 0
    hi = int(coarse[one[0]]) if len(one) else len(ts)
    pmf = np.zeros(len(ts), dtype=ts.dtype)
    pmf[lo:hi] = tprv.probability(ts[lo:hi] - half, ts[lo:hi] + half)

    mean_shift = tprv.mean() - np.dot(ts, pmf)
    if not np.abs(mean_shift) < domain.dt() / 2:
        raise RuntimeError("PRV discretisation failed: discrete mean differs from continuous mean")
    return DiscretePrivacyRandomVariable(pmf, domain.shift_right(mean_shift),
                                         log_pmc_inf=np.log(1 - prv.pm_inf))


def _prv_compose(events: Sequence[Event], eps_error: float, delta_error: float):
    """Discretise each event's PRV on one safe domain and compose them all at once.

    Composition is a sum of independent privacy loss variables, i.e. a convolution of
    their pmfs: the product of their Fourier transforms. The domain [-L, L] from
    prv-accountant's `compute_safe_domain_size` holds the composed PRV, so the circular
    convolution does not wrap; the roll puts index 0 back at t_min (as prv-accountant's
    Fourier composer does for one PRV).
    """
    from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable
    from scipy.fft import irfft, rfft

    prvs = [_prv(e) for e in events]
    counts = [e.count for e in events]
    total = sum(counts)
    L = _safe_domain_size(events, eps_error=eps_error, delta_error=delta_error)
    # Theorem 5.5 of Gopi et al.: this mesh keeps the discretisation error below eps_error.
    mesh = eps_error / np.sqrt(total / 2 * np.log(12 / delta_error))
    domain = _fast_domain(L, mesh)
    size = len(domain)

    spectrum = np.ones(size // 2 + 1, dtype=np.complex128)
    shift, log_pmc_inf = 0.0, 0.0
    for prv, n in zip(prvs, counts):
        dprv = _discretise(prv, domain)
        spectrum *= rfft(np.asarray(dprv.pmf, dtype=np.float64)) ** n
        shift += n * dprv.domain.shifts()
        log_pmc_inf += n * float(dprv.log_pmc_inf)
    pmf = irfft(spectrum, n=size)
    pmf = np.roll(pmf, total - 1 + (size // 2 if total % 2 == 0 else 0))
    return DiscretePrivacyRandomVariable(pmf, domain.shift_right(shift), log_pmc_inf=log_pmc_inf)


def _prv_epsilon(events: Sequence[Event], delta: float) -> float:
    delta_error = delta / 1000
    composed = _prv_compose(events, PRV_EPS_ERROR, delta_error)
    _, _, upper = composed.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
    return max(float(upper), 0.0)


def _prv_delta(events: Sequence[Event], epsilon: float) -> float:
    delta_error = 1e-12
    composed = _prv_compose(events, PRV_EPS_ERROR, delta_error)
    upper = composed.compute_delta_estimate(epsilon - PRV_EPS_ERROR) + delta_error
    return float(min(max(upper, 0.0), 1.0))


# ---------------------------------------------------------------- registry and public API

#: name -> (epsilon(events, delta), delta(events, epsilon)); events are merged and non-empty.
ACCOUNTANTS: dict[str, tuple[Callable[[Sequence[Event], float], float],
                             Callable[[Sequence[Event], float], float]]] = {
    "rdp": (_rdp_epsilon, _rdp_delta),
    "prv": (_prv_epsilon, _prv_delta),
    "pld": (_pld_epsilon, _pld_delta),
}


def check_accountant(name: str) -> str:
    """Return `name` if it is a known accountant.

    Raises:
        InvalidParameterError: naming the unknown accountant and the known ones.
    """
    if name not in ACCOUNTANTS:
        raise InvalidParameterError(f"Unknown accountant {name!r}; known accountants: {sorted(ACCOUNTANTS)}")
    return name


def epsilon(events: Iterable[Event], *, delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon at `delta` of the composition of `events` (0.0 for no events).

    Args:
        events: mechanism events; any mix of parameters.
        delta: target delta in (0, 1).
        accountant: "prv" (default, upper bound), "rdp" or "pld".

    >>> ev = PoissonGaussian(noise_multiplier=3.0, sample_rate=0.08192, steps=2468)
    >>> round(epsilon([ev], delta=1e-5, accountant="rdp"), 3)
    7.046
    >>> round(epsilon([ev], delta=1e-5), 2)
    6.54
    """
    check_delta(delta)
    check_accountant(accountant)
    merged = merge(events)
    if not merged:
        return 0.0
    return ACCOUNTANTS[accountant][0](merged, float(delta))


def delta(events: Iterable[Event], *, epsilon: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Smallest delta the accountant certifies at `epsilon` for the composition of `events`.

    >>> ev = PoissonGaussian(noise_multiplier=3.0, sample_rate=0.08192, steps=2468)
    >>> delta([ev], epsilon=7.046, accountant="rdp") <= 1e-5
    True
    """
    _check_epsilon(epsilon)
    check_accountant(accountant)
    merged = merge(events)
    if not merged:
        return 0.0
    return ACCOUNTANTS[accountant][1](merged, float(epsilon))
