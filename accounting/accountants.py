"""Epsilon and delta of a list of mechanism events, under three accountants.

* ``rdp``: Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019 for the subsampled
  Gaussian) with the RDP-to-(eps, delta) conversion of Balle et al. 2020, computed by
  dp-accounting on Opacus's default orders, so numbers agree with Opacus's RDP accountant.
* ``prv``: privacy random variables (Gopi, Lee, Wutschitz 2021), the default. The PRVs'
  CDFs, the safe domain, the cell-centred discretisation and the (eps, delta) read-out are
  prv-accountant's (evaluated here in float64, tested equal to its long-double code); the
  composition is done here, in one pass in Fourier space, because prv-accountant's
  convolution tree takes ~20 s for ten heterogeneous runs. The grid's mesh and width are
  snapped to powers of 2**(1/16) (finer and wider than the theorem asks) so that nearby
  compositions share a grid, and each mechanism's discretised spectrum is cached per grid:
  a ledger's n-step and (n + 1)-step questions cost one discretisation. A composition of
  many steps keeps only a few hundred low frequencies (the rest underflow to exactly 0), so
  spectra are computed on that band (a blocked Taylor DFT) and the read-out sums the
  composed pmf's Fourier series in closed form, with its rounding bounded and added. We
  report the upper bound (estimate + eps_error), so the number is a guarantee, not an estimate.
* ``pld``: privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), by
  dp-accounting's PLDAccountant with its default discretisation (pessimistic estimate).

Events with different parameters compose (heterogeneous composition): a dataset's
ledger is the composition of every run that touched it.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import threading
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from . import memo, numerics
from .errors import AccountantFailedError, InvalidParameterError
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
    try:
        acc.compose(_dp_event(events))
    except (ValueError, OverflowError, MemoryError) as e:  # its discretisation outgrows its arrays (tiny sigma)
        raise AccountantFailedError(f"dp-accounting's PLD cannot discretise these events ({e}); the PRV or RDP "
                                    f"accountant can") from None
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

class _FastPoissonGaussianPRV:
    """The PRV of one Poisson-subsampled Gaussian step: prv-accountant's
    `PoissonSubsampledGaussianMechanism.cdf` in float64, with z = log(1 + (e^t - 1) / q)
    (`_log_shift`: log1p(expm1(t) / q), and t - log q + log1p(-(1 - q) e^-t) above t = 1, which
    never overflows) in place of its long-double log((q - 1) / q + e^t / q), and a plain-float
    path for scalar calls. The same values to ~1e-15 (tested), 5-20x faster; erfc is evaluated in float64 by
    both (here by `numerics.erfc`, scipy's algorithm, to 1e-15)."""

    pm_inf = 0.0

    def __init__(self, sample_rate: float, noise_multiplier: float) -> None:
        self.p, self.sigma = float(sample_rate), float(noise_multiplier)
        self.boundary = math.log1p(-self.p) if self.p < 1 else -math.inf  # the PRV's lower end
        self.k = math.sqrt(2.0) / 4.0 / self.sigma
        self.s2 = 2.0 * self.sigma**2

    def cdf(self, t):
        erfc = numerics.erfc
        p, k, s2 = self.p, self.k, self.s2
        if np.ndim(t) == 0:
            t = float(t)
            if not t > self.boundary:
                return 0.0
            z = math.log1p(math.expm1(t) / p) if t <= 1.0 else t - math.log(p) + math.log1p(-(1 - p) * math.exp(-t))
            return 0.5 * p * -math.erfc(k * (s2 * z - 1)) - 0.5 * (p - 1) * -math.erfc(k * (s2 * z + 1)) + 1
        t = np.asarray(t, dtype=np.float64)
        out = np.zeros(t.shape)
        inside = t > self.boundary
        z = _log_shift(t[inside], p)
        # t on a grid is increasing, and so are both arguments: erfc's sliced path
        out[inside] = 0.5 * p * -erfc(k * (s2 * z - 1), increasing=True) - \
            0.5 * (p - 1) * -erfc(k * (s2 * z + 1), increasing=True) + 1
        return out


def _log_shift(t: np.ndarray, p: float) -> np.ndarray:
    """log(1 + (e^t - 1) / p), without overflow: for t > 1 as t - log p + log1p(-(1 - p) e^-t).
    (log1p(expm1(t) / p) overflowed to inf above t ~ 709.8 + log p, and the CDF then read 1
    there: every privacy loss above ~705 was put below it, so a step of sigma 0.01 at q = 0.01
    reported epsilon 705 where it spends 5303: a helper's review.)"""
    z = np.empty_like(t)
    low = t <= 1.0
    z[low] = np.log1p(np.expm1(t[low]) / p)
    high = t[~low]
    z[~low] = high - math.log(p) + np.log1p(-(1 - p) * np.exp(-high))
    return z


class _FastGaussianPRV:
    """prv-accountant's `GaussianMechanism.cdf`: the normal CDF at t / mu - mu / 2 (its
    scipy.stats.norm.cdf is scipy.special.ndtr after argument checks; `numerics.ndtr` is
    the same Cephes code)."""

    pm_inf = 0.0

    def __init__(self, noise_multiplier: float) -> None:
        self.mu = 1.0 / float(noise_multiplier)

    def cdf(self, t):
        ndtr = numerics.ndtr
        if np.ndim(t) == 0:
            return float(ndtr(float(t) / self.mu - self.mu / 2))
        return ndtr(np.asarray(t, dtype=np.float64) / self.mu - self.mu / 2)


def _fast_prv(event: Event):
    """The PRV that discretisation evaluates: prv-accountant's PRV of `event`, faster."""
    if isinstance(event, PoissonGaussian):
        return _FastPoissonGaussianPRV(event.sample_rate, event.noise_multiplier)
    return _FastGaussianPRV(event.noise_multiplier)


def _rdp_curve(mechanism: Event) -> np.ndarray:
    """RDP of one step of `mechanism` at RDP_ORDERS (prv-accountant's formulas, in
    `numerics`), cached in this process: the ledger and the calibrations ask for the same
    mechanisms again and again. Where a budget is enforced (`memo.bypassed()`), from the
    curves this process computed itself, never from those the on-disk memo gave."""
    return (_computed_rdp_curve if memo.is_bypassed() else _memoised_rdp_curve)(mechanism)


def _rdp_values(mechanism: Event) -> list[float]:
    if isinstance(mechanism, PoissonGaussian):
        return numerics.poisson_gaussian_rdp(mechanism.sample_rate, mechanism.noise_multiplier, RDP_ORDERS)
    return [a / (2 * mechanism.noise_multiplier**2) for a in RDP_ORDERS]  # the Gaussian mechanism


def _frozen(values: list[float]) -> np.ndarray:
    curve = np.array(values, dtype=np.float64)
    curve.flags.writeable = False
    return curve


@functools.lru_cache(maxsize=4096)
def _computed_rdp_curve(mechanism: Event) -> np.ndarray:
    return _frozen(_rdp_values(mechanism))


@functools.lru_cache(maxsize=4096)
def _memoised_rdp_curve(mechanism: Event) -> np.ndarray:
    return _frozen(memo.memoised("rdp-curve", [mechanism], (RDP_ORDERS,), lambda: _rdp_values(mechanism),
                                 length=len(RDP_ORDERS)))


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
    from ._prv_lib.domain import Domain

    size = len(Domain.create_aligned(-L, L, mesh))
    while (size := numerics.next_fast_len(size)) % 2:
        size += 1
    k = size // 2 - 1
    return Domain(-k * mesh, (k + 1) * mesh, size)


class _Truncated:
    """prv-accountant's `PrivacyRandomVariableTruncated`: the PRV conditioned on [t_min, t_max].

    Its mean is prv-accountant's integration by parts, sum over the same breakpoints of
    R F(R) - L F(L) - int_L^R F, with the integrals by `numerics.integrate` in place of
    scipy.integrate.quad (agreeing with a tightly-toleranced quad to ~1e-15; quad at its
    default tolerance is off by up to ~1e-9, tested).
    """

    _POINTS = (-1e-1, -1e-2, -1e-3, -1e-4, -1e-5, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

    def __init__(self, prv, t_min: float, t_max: float) -> None:
        self.prv, self.t_min, self.t_max = prv, t_min, t_max
        self.remaining_mass = self.prv.cdf(t_max) - self.prv.cdf(t_min)

    def cdf(self, t):
        return np.where(t < self.t_min, 0, np.where(t < self.t_max, self.prv.cdf(t) / self.remaining_mass, 1))

    def mean(self) -> float:
        points = [self.t_min, *self._POINTS, self.t_max]
        pieces = list(zip(points[:-1], points[1:]))
        integrals = numerics.integrate(self.cdf, pieces)
        return float(sum(float(hi * self.cdf(hi) - lo * self.cdf(lo)) - i for (lo, hi), i in zip(pieces, integrals)))


#: Cell edges per CDF evaluation (256 KiB of float64; erfc's temporaries then stay in L2).
_CDF_PIECE = 2**15


def _discretise_support(prv, domain) -> tuple[int, np.ndarray, float]:
    """prv-accountant's cell-centred discretisation, evaluated only where the pmf is non-zero:
    (lo, pmf[lo:hi], mean shift), the pmf zero outside [lo, hi).

    A PRV's mass sits in a small part of the safe domain; outside it the truncated CDF is
    exactly 0 or exactly 1 and every cell's mass `cdf(right) - cdf(left)` is exactly 0. A
    coarse pass over the (monotone) CDF finds that part. Inside it, each cell edge's CDF is
    evaluated once (a cell's right edge is the next one's left edge), so the result equals
    `prv_accountant.discretisers.CellCentred` (to rounding of the edges, tested) at a
    fraction of its cost.
    """
    tprv = _Truncated(prv, domain.t_min(), domain.t_max())
    size, t_min, dt = len(domain), domain.t_min(), domain.dt()
    node = lambda i: t_min + i * dt  # noqa: E731  (float64 nodes, only where they are needed)
    half = dt / 2.0
    stride = 256
    coarse = np.arange(0, size, stride)
    right_cdf = tprv.cdf(node(coarse) + half)
    left_cdf = tprv.cdf(node(coarse) - half)
    zero = np.flatnonzero(right_cdf == 0)   # cells up to here have cdf(right) == 0
    one = np.flatnonzero(left_cdf == 1)     # cells from here on have cdf(left) == 1
    lo = int(coarse[zero[-1]]) if len(zero) else 0
    hi = int(coarse[one[0]]) if len(one) else size
    support = np.zeros(0)
    if hi > lo:
        edges = np.clip(node(np.arange(lo, hi + 1)) - half, tprv.t_min, tprv.t_max)  # cell i: [edge i, edge i + 1]
        # PrivacyRandomVariableTruncated.probability(a, b): clip both ends, divide by the mass.
        # In pieces that stay in the CPU's L2 cache with their temporaries: 2x faster than whole.
        cdf = np.concatenate([prv.cdf(edges[i:i + _CDF_PIECE]) for i in range(0, len(edges), _CDF_PIECE)])
        support = np.diff(cdf) / tprv.remaining_mass

    # a sum of products, not np.dot: BLAS's dot on ~1e6 elements wakes its threads, which spin
    # on a shared core for a few milliseconds of work (the command's CPU time doubled)
    mean_shift = tprv.mean() - (float((node(np.arange(lo, hi)) * support).sum()) if hi > lo else 0.0)
    if not np.abs(mean_shift) < domain.dt() / 2:
        raise AccountantFailedError("PRV discretisation failed: discrete mean differs from continuous mean")
    return lo, support, float(mean_shift)


#: Domain parameters are snapped to powers of 2**(1/_SNAP): the mesh down, the half-width up.
#: Nearby compositions (a run's n and n + 1 steps, a budget search) then share one domain and
#: reuse each mechanism's discretised spectrum. Both only tighten the guarantee's error terms
#: (a finer mesh, less truncated mass); the grid is ~9% larger on average.
_SNAP = 16


def _snap(x: float, direction: int) -> float:
    """x rounded to a power of 2**(1/_SNAP): down (direction -1) or up (+1), never past x."""
    k = math.floor(math.log2(x) * _SNAP) if direction < 0 else math.ceil(math.log2(x) * _SNAP)
    y = 2.0 ** (k / _SNAP)
    while (y > x) if direction < 0 else (y < x):  # guard the rounding of log2 and of the power
        k += direction
        y = 2.0 ** (k / _SNAP)
    return y


def _prv_grid(events: Sequence[Event], eps_error: float, delta_error: float) -> tuple[float, int]:
    """(mesh, size) of the domain that holds the composition of `events`.

    The half-width L is prv-accountant's `compute_safe_domain_size` and the mesh the one of
    Theorem 5.5 of Gopi et al. (it keeps the discretisation error below eps_error), both
    snapped (see `_SNAP`); the size is widened to an FFT-friendly one (`_fast_domain`).
    """
    total = sum(e.count for e in events)
    L = _safe_domain_size(events, eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / math.sqrt(total / 2 * math.log(12 / delta_error))
    mesh, L = _snap(mesh, -1), _snap(L, +1)
    if 2 * L / mesh > PRV_MAX_GRID:  # checked before any array is allocated
        raise AccountantFailedError(
            f"the PRV composition needs a grid of {2 * L / mesh:.3g} points (> {PRV_MAX_GRID}; epsilon is "
            f"about {L - 3:.3g} or more)")
    return mesh, len(_fast_domain(L, mesh))


#: The largest PRV grid composed (float64 points; each array of it is 256 MiB). Realistic
#: runs need 1e5-1e7 points; mechanisms with a huge epsilon (tiny noise, many steps) need
#: billions and would exhaust memory.
PRV_MAX_GRID = 2**25


def _grid_domain(mesh: float, size: int):
    from ._prv_lib.domain import Domain

    k = size // 2 - 1
    return Domain(-k * mesh, (k + 1) * mesh, size)


#: The low-band DFT's Taylor expansion: phases within a block stay within +-_TAYLOR_THETA
#: radians of the block's centre, and _TAYLOR_TERMS terms leave a remainder below
#: _TAYLOR_THETA**_TAYLOR_TERMS / _TAYLOR_TERMS! ~ 7e-19 of the signal's l1 norm (float64's
#: rounding of the sums is larger).
_TAYLOR_THETA = 0.5
_TAYLOR_TERMS = 16
#: Below this block length the low-band DFT saves too little over the full real FFT.
_TAYLOR_MIN_BLOCK = 16
#: OpenBLAS multiplies matrices with m * n * k up to 4 * 65536 on the calling thread; above it
#: it wakes its threads, which spin on a shared core long after a millisecond of work.
_BLAS_SERIAL = 4 * 65536


def _dft_low(x: np.ndarray, offset: int, size: int, band: int) -> Optional[np.ndarray]:
    """F(k) = sum_m x[m] exp(-2 pi i (offset + m) k / size) for k in [0, band): the first `band`
    frequencies of the size-point DFT of a real signal that is zero outside [offset, offset + len(x)),
    or None where the full real FFT is about as cheap.

    A pruned DFT by blocks and Taylor series (the low-frequency special case of the
    "Taylor-FFT"; e.g. Dutt & Rokhlin 1993 use the same expansion for non-uniform FFTs). Split
    m into blocks of B samples, B a divisor of `size`, with centre c:
    e^(-i phi_k m) = e^(-i phi_k c_a) sum_p (-i phi_k (b - c))^p / p! with phi_k = 2 pi k / size,
    so F(k) = e^(-i phi_k (offset + c)) sum_p (-i k / K)^p G_p(k), where G_p is the
    (size / B)-point DFT of the blocks' moments sum_b x[aB + b] u_b^p / p! with
    u_b = phi_K (b - c), |u_b| <= _TAYLOR_THETA (K = band - 1, the largest frequency). The
    cost is len(x) * _TAYLOR_TERMS multiply-adds and a few small FFTs, against a real FFT of
    `size` points: for the README's ledger query, ~3 ms instead of ~70 ms.
    """
    if band <= 1:
        return np.array([complex(x.sum())]) if band == 1 else np.zeros(0, dtype=np.complex128)
    top = band - 1
    phi = 2.0 * math.pi * top / size
    limit = int(2.0 * _TAYLOR_THETA / phi) + 1  # (B - 1) / 2 * phi <= theta
    block = max(_divisors_up_to(size, limit), default=1)
    points = size // block
    if block < _TAYLOR_MIN_BLOCK or points < 2 * band:
        return None
    blocks = -(-len(x) // block)
    padded = np.zeros(blocks * block)
    padded[:len(x)] = x
    u = (np.arange(block) - (block - 1) / 2.0) * phi
    powers = np.empty((block, _TAYLOR_TERMS))  # u^p / p!
    powers[:, 0] = 1.0
    for p in range(1, _TAYLOR_TERMS):
        powers[:, p] = powers[:, p - 1] * u / p
    moments = np.empty((blocks, _TAYLOR_TERMS))                 # sum_b x[aB + b] u_b^p / p!
    rows = max(1, _BLAS_SERIAL // (block * _TAYLOR_TERMS))
    for i in range(0, blocks, rows):  # products small enough that OpenBLAS runs them on one thread
        np.matmul(padded[i * block:(i + rows) * block].reshape(-1, block), powers, out=moments[i:i + rows])
    g = np.fft.rfft(moments, n=points, axis=0)[:band]           # (band, terms): G_p(k)
    ratio = np.arange(band) / top                               # k / K
    out = g[:, -1]
    for p in range(_TAYLOR_TERMS - 2, -1, -1):                  # Horner in (-i k / K)
        out = g[:, p] + (-1j * ratio) * out
    # e^(-i phi_k (offset + c)), c = (block - 1) / 2: the phase in integers, exact for any offset
    k = np.arange(band, dtype=np.int64)
    return out * np.exp(-1j * np.pi * (((2 * offset + block - 1) * k) % (2 * size)) / size)


def _divisors_up_to(n: int, limit: int) -> list[int]:
    """The divisors of n that are at most `limit`."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return [d for d in {*small, *(n // d for d in small)} if d <= limit]


class _Spectrum:
    """One mechanism discretised on one domain, as composition needs it: its pmf's Fourier
    transform F with log|F| (a composition of n copies is exp(n * log F)), its mean shift and
    its log mass at infinity.

    F is computed only at the low frequencies a composition can keep (`band`): |F(k)| is at
    most TV / (2 sin(pi k / size)) for a pmf of total variation TV (summation by parts), so
    in a composition of many steps every higher frequency underflows to exactly 0 and was
    never used. The pmf's support (a small part of the grid) is kept to extend the band.
    """

    __slots__ = ("support", "offset", "size", "tv", "fourier", "log_abs", "shift", "log_pmc_inf", "nbytes")

    def __init__(self, mechanism: Event, mesh: float, size: int) -> None:
        prv = _fast_prv(mechanism)
        domain = _grid_domain(mesh, size)
        start, support, mean_shift = _discretise_support(prv, domain)
        nonzero = np.flatnonzero(support)
        lo, hi = (int(nonzero[0]), int(nonzero[-1]) + 1) if len(nonzero) else (0, 1)
        support = support[lo:hi] if len(nonzero) else np.zeros(1)
        self.support, self.offset, self.size = support, start + lo, size
        # circular total variation: the jumps inside the support and onto the zeros around it
        self.tv = float(np.abs(np.diff(self.support)).sum() + abs(self.support[0]) + abs(self.support[-1]))
        self.fourier = np.zeros(0, dtype=np.complex128)
        self.log_abs = np.zeros(0)
        self.shift = float(domain.shift_right(mean_shift).shifts())
        self.log_pmc_inf = float(np.log(1 - prv.pm_inf))
        self.nbytes = self.support.nbytes

    def log_bound(self, k: int) -> float:
        """log of the bound TV / (2 sin(pi k / size)) on |F(k)| (and on 1: F is a pmf's)."""
        s = 2.0 * math.sin(math.pi * k / self.size)
        if s <= self.tv:
            return 0.0
        return math.log(self.tv) - math.log(s) if self.tv > 0 else -math.inf

    def extend(self, band: int) -> None:
        """Have F and log|F| at frequencies [0, band) (at least): the low-band DFT where it
        is cheaper than the full real FFT, else the real FFT."""
        if len(self.fourier) >= band:
            return
        half = self.size // 2 + 1
        band = min(half, max(band, int(1.25 * band) + 16))  # headroom: nearby compositions reuse it
        fourier = _dft_low(self.support, self.offset, self.size, band)
        if fourier is None:
            pmf = np.zeros(self.size)
            pmf[self.offset:self.offset + len(self.support)] = self.support
            fourier = np.fft.rfft(pmf)[:band]
        with np.errstate(divide="ignore"):
            log_abs = np.log(np.abs(fourier))  # -inf where F is exactly 0
        self.fourier, self.log_abs = fourier, log_abs
        self.nbytes = self.support.nbytes + fourier.nbytes + log_abs.nbytes


def _band(spectra: Sequence[tuple[_Spectrum, int]], size: int) -> int:
    """The number of low frequencies a composition can keep: the bound on
    sum_i n_i log|F_i(k)| decreases on [1, size / 2]; the first k where it is below _EXP_ZERO
    and every frequency above it give exactly 0 (bisection over k)."""
    bound = lambda k: sum(n * s.log_bound(k) for s, n in spectra)  # noqa: E731
    half = size // 2
    if bound(half) > _EXP_ZERO:
        return half + 1
    lo, hi = 0, half  # bound(hi) <= _EXP_ZERO; bound(0) = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if bound(mid) > _EXP_ZERO else (lo, mid)
    return hi


#: Spectra and read-out grids kept per process, least recently used first, within _CACHE_BYTES
#: (the README's ledger query at ~22,600 composed steps leaves ~5 MB here: spectra keep a
#: pmf's support and a band of frequencies, not the grid).
_CACHE: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
_CACHE_BYTES = 128 * 2**20
_CACHE_LOCK = threading.Lock()


def _cached(key: tuple, make: Callable[[], object], nbytes: Callable[[object], int]) -> object:
    with _CACHE_LOCK:
        found = _CACHE.get(key)
        if found is not None:
            _CACHE.move_to_end(key)
            return found
    found = make()  # outside the lock: two threads may both compute it, and get equal values
    with _CACHE_LOCK:
        _CACHE[key] = found
        while len(_CACHE) > 1 and sum(nbytes(v) for v in _CACHE.values()) > _CACHE_BYTES:
            _CACHE.popitem(last=False)
    return found


def _nbytes(value: object) -> int:
    return value.nbytes if isinstance(value, _Spectrum) else sum(a.nbytes for a in value)  # type: ignore


def _spectrum(mechanism: Event, mesh: float, size: int) -> _Spectrum:
    mechanism = mechanism.with_count(0)
    return _cached(("spectrum", mechanism, mesh, size), lambda: _Spectrum(mechanism, mesh, size),
                   _nbytes)  # type: ignore[return-value]


def _exp_grid(mesh: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(e^u, e^-u) on the unshifted grid u of the domain (mesh, size), for the read-out."""
    def make() -> tuple[np.ndarray, np.ndarray]:
        domain = _grid_domain(mesh, size)
        u = np.linspace(domain.t_min(), domain.t_max(), size)
        return np.exp(u), np.exp(-u)
    return _cached(("exp", mesh, size), make, _nbytes)  # type: ignore[return-value]


#: exp(x) is exactly 0.0 in float64 for x below about -745.13.
_EXP_ZERO = -746.0
#: Up to this many non-zero frequencies the read-out sums the composed pmf's Fourier series in
#: closed form (O(frequencies) per grid point asked, ~25 points); above it, it forms the pmf.
_SERIES_MAX = 4096


class _Composed:
    """A composed PRV as the Fourier series of its pmf on the grid (mesh, size):
    p_j = (1/size) sum_k w_k Re(c_k e^(2 pi i j k / size)) over the non-zero frequencies k
    (w_k = 2 but 1 at k = 0 and size/2), on `domain` (the grid shifted by the discretisation's
    mean corrections), with log mass at infinity `log_pmc_inf`."""

    __slots__ = ("freqs", "coeffs", "mesh", "size", "domain", "log_pmc_inf", "rounding")

    def __init__(self, freqs, coeffs, mesh, size, domain, log_pmc_inf, rounding=0.0) -> None:
        self.freqs, self.coeffs, self.mesh, self.size = freqs, coeffs, mesh, size
        self.domain, self.log_pmc_inf, self.rounding = domain, log_pmc_inf, rounding

    def pmf(self) -> np.ndarray:
        spectrum = np.zeros(self.size // 2 + 1, dtype=np.complex128)
        spectrum[self.freqs] = self.coeffs
        return np.fft.irfft(spectrum, n=self.size)  # numpy's pocketfft: scipy.fft's, without its import


def _prv_compose(events: Sequence[Event], eps_error: float, delta_error: float) -> _Composed:
    """Compose every event's discretised PRV on one safe domain, in one pass.

    Composition is a sum of independent privacy loss variables, i.e. a convolution of
    their pmfs: the product of their Fourier transforms, exp(sum_i n_i log F_i). The domain
    [-L, L] holds the composed PRV, so the circular convolution does not wrap; a circular
    shift (a phase) puts index 0 back at t_min (prv-accountant's Fourier composer rolls the
    pmf). Only the frequencies whose product does not underflow to exactly 0 are kept (a
    pmf's spectrum raised to a power dies fast: 179 of 972,001 for the README's ledger query),
    which changes no value of the result.
    """
    mesh, size = _prv_grid(events, eps_error, delta_error)
    spectra = [(_spectrum(e, mesh, size), e.count) for e in events]
    total = sum(n for _, n in spectra)
    band = _band(spectra, size)
    with _CACHE_LOCK:  # a spectrum is shared by threads: extend it under the lock
        for s, _ in spectra:
            s.extend(band)
        fourier = [(s.fourier[:band], s.log_abs[:band], n) for s, n in spectra]
    real = np.zeros(band)
    for _, log_abs, n in fourier:
        real += n * log_abs
    keep = np.flatnonzero(real > _EXP_ZERO)
    roll = total - 1 + (size // 2 if total % 2 == 0 else 0)
    phase = -2 * np.pi * ((roll * keep.astype(np.int64)) % size) / size
    for f, _, n in fourier:
        phase += n * np.angle(f[keep])
    shift = sum(n * s.shift for s, n in spectra)
    log_pmc_inf = sum(n * s.log_pmc_inf for s, n in spectra)
    rounding = _composition_rounding(keep, real[keep], phase, [(log_abs[keep], n) for _, log_abs, n in fourier], size)
    return _Composed(keep, np.exp(real[keep] + 1j * phase), mesh, size,
                     _grid_domain(mesh, size).shift_right(shift), log_pmc_inf, rounding)


def _composition_rounding(keep: np.ndarray, real: np.ndarray, phase: np.ndarray,
                          parts: list[tuple[np.ndarray, int]], size: int) -> float:
    """A first-order estimate, conservative by construction, of how far float64 rounding can move
    a tail sum of the composed pmf (d1, and d2 on the part of the grid the read-out uses), added
    to delta's error (a helper measured it at 180-2200 times the pmf's negative mass, 1,000 to
    200,000 steps).

    Each event's F_k carries an absolute error of about u log2(size) (its FFT of a pmf that sums
    to 1, u = float64's unit roundoff); raised to its count n, c_k = prod F_k^n moves by
    |c_k| sum_e n_e u log2(size) / |F_e,k|, and exp(real + i phase) by u (|real| + |phase|)
    |c_k| more. The inverse FFT spreads each |dc_k| / size over the size entries, so a tail sum
    moves by at most sum_k w_k |dc_k|, and d1 - e^u d2 by twice that. prv-accountant composes
    in long double and adds nothing; in float64 over many steps at small delta (1e-12 after
    1000 steps) the pmf's negative mass alone was 400 times the delta error it allowed, and
    epsilon came out below the truth (a helper's review)."""
    u = np.finfo(np.float64).eps / 2
    weight = np.where((keep == 0) | (keep == size // 2), 1.0, 2.0)
    moved = u * (np.abs(real) + np.abs(phase)) * np.exp(real) + u * math.log2(max(size, 2)) * sum(
        n * np.exp(real - log_abs) for log_abs, n in parts if n > 0)  # |c_k| / |F_e,k| <= 1: no overflow
    return float(2 * np.sum(weight * moved))


def _epsilon_upper(composed: _Composed, delta: float, delta_error: float, eps_error: float) -> float:
    """prv-accountant's `DiscretePrivacyRandomVariable.compute_epsilon(...)[2]` (the upper bound),
    in float64 and without the lower bound and estimate it also computes (tested equal).

    With u the unshifted grid and s the shift (t = u + s), the hockey-stick divergence at
    t_i is d1_i - e^(u_i) d2_i with d1_i = sum_{j>=i} p_j and d2_i = sum_{j>=i} p_j e^(-u_j),
    and epsilon = s + log((d1_i - delta) / d2_i) at the first i where it is at most delta.
    A composition with few frequencies has both sums in closed form (geometric series of
    each frequency), so a bisection over i costs microseconds (`_series_read_out`); one with
    many forms the pmf and its cumulative sums (`_pmf_read_out`); a grid wider than float64's
    exponential range falls back to prv-accountant's long-double read-out.
    """
    delta_inf = 1 - math.exp(composed.log_pmc_inf)
    delta_fin = (delta - delta_inf) / (1 - delta_inf)
    if delta_fin <= 0:
        return math.inf
    delta_error = delta_error + composed.rounding  # the float64 composition's own, bounded
    if np.finfo(np.float64).eps * composed.size > delta_fin - delta_error:
        raise AccountantFailedError(f"floating-point rounding of the PRV composition would dominate at delta={delta:g} "
                                    "(too small for this grid and number of steps)")
    if (composed.size // 2) * composed.mesh > 600:
        from ._prv_lib.discrete_privacy_random_variable import DiscretePrivacyRandomVariable

        return DiscretePrivacyRandomVariable(composed.pmf(), composed.domain, composed.log_pmc_inf).compute_epsilon(
            delta, delta_error, eps_error)[2]
    target = delta_fin - delta_error
    found = _series_read_out(composed, target) if len(composed.freqs) <= _SERIES_MAX else None
    i, d1, log_d2, rounding = found if found is not None else _pmf_read_out(composed, target)
    if i <= 0 or i >= composed.size:
        raise AccountantFailedError("Cannot compute epsilon")
    return float(composed.domain.shifts() + math.log(d1 - target) - log_d2 + eps_error + rounding)


def _pmf_read_out(composed: _Composed, target: float) -> tuple[int, float, float, float]:
    """(i, d1_i, log d2_i, 0.0) at the first i with e^(u_i) d2_i - d1_i >= -target, from the pmf
    (its rounding, like prv-accountant's, is not added: ~1e-16 of the pmf's tail sums)."""
    exp_u, exp_minus_u = _exp_grid(composed.mesh, composed.size)
    pmf = composed.pmf()
    d1 = np.cumsum(pmf[::-1])[::-1]
    d2 = np.cumsum((pmf * exp_minus_u)[::-1])[::-1]
    i = int(np.searchsorted(exp_u * d2 - d1, -target, side="left"))
    if not 0 < i < composed.size:
        return i, math.nan, math.nan, 0.0
    return i, float(d1[i]), math.log(d2[i]), 0.0


#: The largest effect on epsilon of the closed form's rounding that `_series_read_out` accepts
#: (and adds to the bound); above it the pmf's cumulative sums are used.
_SERIES_ROUNDING = 1e-6


def _series_read_out(composed: _Composed, target: float) -> Optional[tuple[int, float, float, float]]:
    """`_pmf_read_out` from the Fourier series, never forming the pmf (equal to rounding, tested).

    For frequency k with w = e^(2 pi i k / N): sum_{j=i}^{N-1} w^j = (w^i - 1) / (1 - w) (and
    N - i at k = 0), and sum_{j=i}^{N-1} w^j e^(-(j-i) dt) = (w^i - e^(-(N-i) dt)) / (1 - w e^(-dt)),
    which is e^(u_i) d2_i's share; e^(u_i) d2_i - d1_i increases with i, so the first i where it
    reaches -target is found by numpy's searchsorted bisection, ~log2(N) evaluations.

    The two sums cancel down to the tail mass (~delta) from terms of order 1, so their
    rounding is bounded (K + 4 units of float64 rounding on the sum of the terms' magnitudes,
    for K frequencies) and its effect on epsilon is added to the result: the bound stays a
    bound. None when that effect would exceed _SERIES_ROUNDING (tiny deltas): use the pmf.
    """
    n, dt = composed.size, composed.mesh
    k = composed.freqs.astype(np.int64)
    weight = np.where((k == 0) | (2 * k == n), 1.0, 2.0) / n
    c = composed.coeffs * weight
    theta = 2 * np.pi * k / n
    one_minus_w = 2 * np.sin(theta / 2) ** 2 - 1j * np.sin(theta)          # 1 - e^(i theta), accurately
    one_minus_wz = -math.expm1(-dt) + math.exp(-dt) * one_minus_w          # 1 - e^(i theta - dt)
    zero = k == 0
    safe = np.where(zero, 1.0, one_minus_w)

    def terms(i: int) -> tuple[np.ndarray, np.ndarray]:
        w_i = np.exp(2j * np.pi * ((i * k) % n) / n)
        return c * np.where(zero, n - i, (w_i - 1) / safe), c * (w_i - math.exp(-(n - i) * dt)) / one_minus_wz

    lo, hi = 0, n  # the first i in [0, n) with e^(u_i) d2_i - d1_i >= -target, else n
    while lo < hi:
        mid = (lo + hi) // 2
        t1, t2 = terms(mid)
        if np.sum(t2).real - np.sum(t1).real < -target:
            lo = mid + 1
        else:
            hi = mid
    if not 0 < lo < n:
        return lo, math.nan, math.nan, 0.0
    t1, t2 = terms(lo)
    d1, e = float(np.sum(t1).real), float(np.sum(t2).real)
    unit = (len(k) + 4) * np.finfo(np.float64).eps
    rounding = unit * float(np.abs(t1).sum()) / (d1 - target) + unit * float(np.abs(t2).sum()) / e
    if not (d1 > target and e > 0 and rounding <= _SERIES_ROUNDING):
        return None
    u = (lo - (n // 2 - 1)) * dt  # the unshifted grid: t_min = -(n / 2 - 1) dt
    return lo, d1, math.log(e) - u, rounding


def _prv_epsilon(events: Sequence[Event], delta: float, eps_error: float = PRV_EPS_ERROR) -> float:
    """The PRV upper bound; a larger `eps_error` gives a coarser, cheaper (and looser) one.
    Memoised on disk where the memo is enabled (`accounting.memo`: the command line)."""
    def compute() -> float:
        delta_error = delta / 1000
        try:
            composed = _prv_compose(events, eps_error, delta_error)
            return max(_epsilon_upper(composed, delta, delta_error, eps_error), 0.0)
        except AccountantFailedError as e:  # every PRV failure says what always works (a looser bound)
            raise AccountantFailedError(
                f"{e} (PRV accountant, at delta={delta:g}; such failures come with large epsilons, tens or "
                f"more): use the RDP accountant, looser, which always computes (accountant='rdp'; "
                f"`--accountant rdp` on the command line; for a dataset's budget, `dpwa ledger set-budget ... "
                f"--accountant rdp`)") from None

    return float(memo.memoised("prv-epsilon", events, (float(delta), float(eps_error)), compute))


def _rdp_proxy_epsilon(events: Sequence[Event], delta: float) -> float:
    """RDP epsilon from the cached per-mechanism curves: microseconds per call once the curves
    are known, so a search can bracket with it. Close to, but not, the `rdp` accountant's
    number (which dp-accounting computes); a guide for searches, never an answer."""
    if not events:
        return 0.0
    curve = sum(e.count * _rdp_curve(e.with_count(0)) for e in events)
    return max(_rdp_to_epsilon(np.asarray(curve, dtype=np.float64), delta), 0.0)


def _prv_delta(events: Sequence[Event], epsilon: float) -> float:
    """prv-accountant's `compute_delta_estimate` at epsilon - eps_error, plus the errors: the sum
    of p_t (1 - e^(epsilon - t)) over t >= epsilon, written so (its e^epsilon e^-t overflowed to
    NaN for epsilon above ~709), with the mass at infinity."""
    delta_error = 1e-12
    c = _prv_compose(events, PRV_EPS_ERROR, delta_error)
    eps = epsilon - PRV_EPS_ERROR
    t, pmf = c.domain.ts(), c.pmf()
    above = t >= eps
    delta_fin = float((pmf[above] * -np.expm1(eps - t[above])).sum())
    delta_inf = 1 - math.exp(c.log_pmc_inf)
    upper = delta_fin * (1 - delta_inf) + delta_inf + delta_error + c.rounding
    if not math.isfinite(upper):  # min/max would pass a NaN through as an answer
        raise AccountantFailedError(f"PRV delta is not finite ({upper}) for these events at epsilon={epsilon:g}; "
                                    "use the RDP accountant (accountant='rdp'; `--accountant rdp`)")
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
