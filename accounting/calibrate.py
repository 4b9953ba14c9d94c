"""Budget questions: the noise a target epsilon needs, the steps a budget allows, and the
epsilon a training configuration would spend.

Calibrations land on the conservative side: the returned noise multiplier or step count
never spends more than the target under the chosen accountant, and the noise multiplier
spends at least `(1 - rtol)` of it (so noise is not wasted).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from . import accountants as _accountants
from .accountants import DEFAULT_ACCOUNTANT, check_accountant, check_delta, epsilon
from .errors import InvalidParameterError
from .events import Event, PoissonGaussian, merge

__all__ = ["epsilon_for", "noise_multiplier_for", "steps_for", "sample_rate_and_steps", "check_target_epsilon"]

_SIGMA_RANGE = (1e-2, 1e4)  # noise multipliers outside this range are never useful


def check_target_epsilon(target_epsilon: float) -> None:
    """Check that a target epsilon is a finite number > 0.

    Raises:
        InvalidParameterError: naming the value (``target_epsilon=...``).
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
            math.isfinite(target_epsilon) and target_epsilon > 0):
        raise InvalidParameterError(f"Expected a finite target_epsilon > 0, got target_epsilon={target_epsilon!r}")


def sample_rate_and_steps(*, batch_size: int, dataset_size: int, epochs: float) -> tuple[float, int]:
    """Poisson sample rate q = B/N and the number of steps for `epochs` passes (ceil(epochs*N/B)).

    >>> sample_rate_and_steps(batch_size=4096, dataset_size=50000, epochs=10)
    (0.08192, 123)
    """
    for name, value in (("batch_size", batch_size), ("dataset_size", dataset_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidParameterError(f"Expected a positive integer {name}, got {name}={value!r}")
    if batch_size > dataset_size:
        raise InvalidParameterError(f"Expected {batch_size=} <= {dataset_size=}")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not (
            math.isfinite(epochs) and epochs >= 0):
        raise InvalidParameterError(f"Expected a finite epochs >= 0, got epochs={epochs!r}")
    q = batch_size / dataset_size
    return q, math.ceil(epochs * dataset_size / batch_size - 1e-9)


def epsilon_for(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = DEFAULT_ACCOUNTANT, prior: Sequence[Event] = ()) -> float:
    """Epsilon a DP-SGD configuration spends (composed after `prior` events, if any).

    >>> round(epsilon_for(noise_multiplier=10.0, sample_rate=0.08192, steps=875, delta=1e-5,
    ...                   accountant="rdp"), 3)
    0.988
    """
    event = PoissonGaussian(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return epsilon([*prior, event], delta=delta, accountant=accountant)


def _gdp_sigma_guess(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Starting point from the CLT / mu-GDP approximation (Bu, Dong et al. 2020); only a guess.

    mu solves delta_mu(epsilon) = delta (mu-GDP's delta grows with mu), by bisection on
    [1e-6, 100] with `numerics.ndtr`: a guess needs no scipy import."""
    from .numerics import ndtr

    def gdp_delta(mu: float) -> float:
        e = target_epsilon
        return float(ndtr(-e / mu + mu / 2) - math.exp(e) * ndtr(-e / mu - mu / 2)) - delta

    try:
        lo, hi = 1e-6, 100.0
        if not gdp_delta(lo) < 0 < gdp_delta(hi):
            return 1.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if gdp_delta(mid) < 0 else (lo, mid)
        ratio = (lo / sample_rate) ** 2 / max(steps, 1)
        return min(max(1 / math.sqrt(math.log1p(ratio)), _SIGMA_RANGE[0]), _SIGMA_RANGE[1])
    except (ValueError, ZeroDivisionError, OverflowError):
        return 1.0


def _search(g: Callable[[float], float], x0: float, slope: float, lo_bound: float, hi_bound: float,
            done: Callable[[float, float, float, float], bool]) -> tuple[float, float]:
    """Bracket and narrow the root of an increasing g(x) = log(eps(x)) - log(aim).

    Newton-like steps with the expected `slope` (then secant slopes) find a bracket; the
    Illinois variant of regula falsi narrows it. log-epsilon is close to linear in
    log-sigma and log-steps, so a handful of evaluations suffice. Returns (lo, hi) with
    g(lo) <= 0 < g(hi), stopping early when `done(lo, g_lo, hi, g_hi)` is true (lo may then
    be -inf, hi +inf when only one side was seen).
    """
    lo, g_lo, hi, g_hi = -math.inf, -math.inf, math.inf, math.inf
    x, gx = x0, g(x0)
    while True:
        if gx <= 0:
            lo, g_lo = x, gx
        else:
            hi, g_hi = x, gx
        if done(lo, g_lo, hi, g_hi):
            return lo, hi
        if math.isfinite(lo) and math.isfinite(hi):
            break
        if (gx <= 0 and x >= hi_bound) or (gx > 0 and x <= lo_bound):
            raise InvalidParameterError("the target lies outside the searchable range")
        # Newton step with the expected slope, overshooting a little so that we bracket.
        x_new = x - 1.1 * gx / slope - math.copysign(1e-3, gx)
        x = min(max(x_new, lo_bound), hi_bound)
        gx = g(x)
    side, w_lo, w_hi = 0, g_lo, g_hi  # the ends' weights for the secant; `done` sees the true values
    for _ in range(100):
        x = hi - w_hi * (hi - lo) / (w_hi - w_lo)
        if not lo < x < hi:
            x = (lo + hi) / 2
        gx = g(x)
        if gx <= 0:
            lo, g_lo, w_lo = x, gx, gx
            if side == -1:
                w_hi /= 2  # Illinois: stop one end from sticking
            side = -1
        else:
            hi, g_hi, w_hi = x, gx, gx
            if side == 1:
                w_lo /= 2
            side = 1
        if done(lo, g_lo, hi, g_hi):
            break
    return lo, hi


def noise_multiplier_for(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = DEFAULT_ACCOUNTANT, rtol: float = 0.01,
                         prior: Sequence[Event] = ()) -> float:
    """Noise multiplier whose run spends at most `target_epsilon`, and at least (1 - rtol) of it.

    epsilon falls as sigma grows, close to linearly in log-log; we search log(sigma) with a
    handful of accountant calls (each is the expensive part), starting from the mu-GDP
    approximation.

    Args:
        target_epsilon: the epsilon to spend, > 0.
        delta: in (0, 1).
        sample_rate: Poisson rate q in (0, 1].
        steps: number of DP-SGD steps, >= 1.
        accountant: "prv" (default), "rdp" or "pld".
        rtol: how far below the target the result may land.
        prior: events already spent (e.g. a dataset's ledger); the run composes with them.

    Raises:
        InvalidParameterError: bad inputs, or a target that no sigma in [1e-2, 1e4] meets
            (e.g. `prior` already spends more than the target).

    >>> s = noise_multiplier_for(target_epsilon=1.0, delta=1e-5, sample_rate=0.08192, steps=875,
    ...                          accountant="rdp")
    >>> 0.99 <= epsilon_for(noise_multiplier=s, sample_rate=0.08192, steps=875, delta=1e-5,
    ...                     accountant="rdp") <= 1.0
    True
    """
    check_target_epsilon(target_epsilon)
    check_delta(delta)
    check_accountant(accountant)
    PoissonGaussian(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)  # validates
    if steps < 1:
        raise InvalidParameterError(f"Expected steps >= 1 to calibrate noise, got {steps=}")
    if not 0 < rtol < 1:
        raise InvalidParameterError(f"Expected 0 < rtol < 1, got {rtol=}")
    aim = math.log(target_epsilon * (1 - rtol / 2))  # the middle of the accepted band

    def g(neg_log_sigma: float) -> float:  # increasing in -log(sigma)
        eps = epsilon_for(noise_multiplier=math.exp(-neg_log_sigma), sample_rate=sample_rate,
                          steps=steps, delta=delta, accountant=accountant, prior=prior)
        return math.log(max(eps, 1e-300)) - aim

    band = math.log(1 - rtol / 2), math.log((1 - rtol) / (1 - rtol / 2))
    done = lambda lo, g_lo, hi, g_hi: g_lo >= band[1] or hi - lo < 1e-12  # noqa: E731
    x0 = -math.log(_gdp_sigma_guess(target_epsilon, delta, sample_rate, steps))
    try:
        lo, _ = _search(g, x0, slope=1.0, lo_bound=-math.log(_SIGMA_RANGE[1]),
                        hi_bound=-math.log(_SIGMA_RANGE[0]), done=done)
    except InvalidParameterError:
        raise InvalidParameterError(
            f"No noise multiplier in {_SIGMA_RANGE} spends {target_epsilon=} at {delta=}, "
            f"{sample_rate=}, {steps=} (prior events: {len(prior)})") from None
    return math.exp(-lo)  # lo spends at most the target: the conservative side


def steps_for(*, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
              accountant: str = DEFAULT_ACCOUNTANT, prior: Sequence[Event] = ()) -> int:
    """Largest number of steps whose run spends at most `target_epsilon` (0 if not even one).

    The answer n is checked with the accountant itself: epsilon(prior + n steps) is at most
    the target and epsilon(prior + (n + 1) steps) above it, as `epsilon` (and so a ledger
    reservation) computes them. Cheap guides choose where to look: an RDP bound from cached
    per-mechanism curves (microseconds a call), then, for PRV, a PRV ten times coarser; the
    accountant is then evaluated a few times (2-4) next to the answer, where every call shares
    one cached discretisation.

    >>> steps_for(target_epsilon=1.0, delta=1e-5, noise_multiplier=10.0, sample_rate=0.08192,
    ...           accountant="rdp")
    895
    """
    check_target_epsilon(target_epsilon)
    check_delta(delta)
    check_accountant(accountant)
    PoissonGaussian(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=0)  # validates
    prior = merge(prior)

    def spend(n: int, *, how: str = accountant) -> float:
        event = PoissonGaussian(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=n)
        events = merge([*prior, event])
        if how == "rdp-proxy":
            return _accountants._rdp_proxy_epsilon(events, delta)
        if how == "prv-coarse":
            # The coarse upper bound minus its error, plus the fine one's: a guess at the fine bound.
            return _accountants._prv_epsilon(events, delta, _COARSE_EPS_ERROR) - _COARSE_EPS_ERROR + \
                _accountants.PRV_EPS_ERROR
        return epsilon(events, delta=delta, accountant=how)

    values: dict[int, float] = {}

    def eps(n: int) -> float:
        if n not in values:
            values[n] = spend(n)
        return values[n]

    # Guides, cheapest first: RDP from cached curves (exact integer search, microseconds per call),
    # corrected by its ratio to the accountant (or, for PRV, to a 10x coarser PRV) where it is
    # evaluated; then the accountant itself, a few calls around the guess.
    rdp = lambda n: spend(n, how="rdp-proxy")  # noqa: E731
    guide = (lambda n: spend(n, how="prv-coarse")) if accountant == "prv" else eps
    try:
        # RDP is a valid bound, looser than PRV and PLD: when even it allows _MAX_STEPS, so do
        # they, and the search stops here rather than compose a billion steps.
        guess, _ = _largest_fitting(rdp, target_epsilon, start=1, slope=0.5, rtol=0.0,
                                    fits_at_one=rdp(1) <= target_epsilon)
        guess = _ratio_search(guide, rdp, target_epsilon, guess)
        slope = _log_slope(rdp, guess)
        n, _ = _largest_fitting(eps, target_epsilon, start=guess, slope=slope, rtol=0.0, known=values)
    except _OutOfRange:
        raise InvalidParameterError(
            f"The budget allows more than {_MAX_STEPS:.0e} steps at {noise_multiplier=}, {sample_rate=}; "
            "check the inputs") from None
    # The search takes f(1) <= target on trust and checks everything above it: an answer n > 1
    # was evaluated (and 1 fits where n does: epsilon grows with the steps); an answer of 1 is
    # checked here, and 0 if even one step (or the prior alone) spends too much.
    if n == 1 and eps(1) > target_epsilon:
        return 0
    return n


def _log_slope(f: Callable[[int], float], n: int) -> float:
    """d log f / d log n at n, by a centred difference (a guess at the slope; 0.5 when flat)."""
    a, b = max(1, round(n * 0.99)), max(2, round(n * 1.01))
    fa, fb = f(a), f(b)
    if b <= a or not (fa > 0 and fb > fa):
        return 0.5
    return (math.log(fb) - math.log(fa)) / (math.log(b) - math.log(a))


def _ratio_search(f: Callable[[int], float], proxy: Callable[[int], float], target: float, n: int) -> int:
    """Where f reaches `target`, found through a cheap proxy of the same shape: f / proxy varies
    slowly with n, so the largest n with ratio * proxy(n) <= target, with the ratio measured
    at the last n, closes in within a few evaluations of f. A guess, not an answer."""
    for _ in range(6):
        value, base = f(n), proxy(n)
        if not (value > 0 and base > 0):
            return n
        try:
            m, _ = _largest_fitting(proxy, target * base / value, start=n, slope=0.5, rtol=0.0,
                                    fits_at_one=proxy(1) <= target * base / value)
        except _OutOfRange:  # the corrected proxy leaves the range: keep the guess so far
            return n
        if abs(m - n) <= max(1, 1e-4 * n):
            return m
        n = m
    return n


#: eps_error of the coarse PRV that guides `steps_for` (a 10x coarser mesh: ~10x cheaper).
_COARSE_EPS_ERROR = 0.1
_MAX_STEPS = 10**9


class _OutOfRange(Exception):
    pass


def _largest_fitting(f: Callable[[int], float], target: float, *, start: int, slope: float, rtol: float,
                     known: Optional[dict[int, float]] = None, fits_at_one: bool = True) -> tuple[int, float]:
    """The largest n >= 1 with f(n) <= target, for f increasing in n with f(1) <= target.

    Newton steps on log f against log n, with the log-log `slope` given and then measured
    between the last two points, aimed at floor(crossing) so that the last two evaluations
    are usually n and n + 1; a bisection step whenever the bracket stops shrinking. Stops
    when the bracket is [n, n + 1], or when it is narrower than `rtol * n`. Every evaluation
    is f itself: the result fits (f(n) <= target) and, with rtol 0, n + 1 does not.

    Returns (n, slope): the answer and the last measured slope (a guide for a finer search);
    n is 1 when `fits_at_one` is false (f(1) > target: no n fits). Raises _OutOfRange when
    even _MAX_STEPS fits.
    """
    if not fits_at_one:
        return 1, slope
    aim = math.log(target)
    lo, hi = 1, None                     # f(lo) <= target < f(hi)
    points: list[tuple[float, float]] = []  # (log n, log f(n) - aim), in evaluation order
    for n, value in (known or {}).items():
        if n >= 1:
            if value <= target:
                lo = max(lo, n)
            else:
                hi = n if hi is None else min(hi, n)
    n = max(int(start), 1)
    slow = 0
    for _ in range(200):
        if hi is not None and hi - lo <= max(1, rtol * lo):
            return lo, slope
        top = hi - 1 if hi is not None else _MAX_STEPS
        if lo >= top and hi is None:
            raise _OutOfRange
        n = min(max(n, lo + 1), top)
        width = (hi if hi is not None else 2 * n) - lo
        value = f(n)
        g = math.log(max(value, 1e-300)) - aim
        if value <= target:
            lo = n
        else:
            hi = n
        if points and points[-1][0] != math.log(n):
            measured = (g - points[-1][1]) / (math.log(n) - points[-1][0])
            if measured > 1e-3:
                slope = measured
        points.append((math.log(n), g))
        if hi is not None and hi - lo <= max(1, rtol * lo):
            return lo, slope
        guess = math.exp(min(math.log(n) - g / slope, math.log(4.0 * _MAX_STEPS)))
        nxt = math.floor(guess)
        if nxt == n:  # the crossing is in [n, n + 1): check the other side of it
            nxt = n + 1 if value <= target else n - 1
        new_width = (hi if hi is not None else 2 * n) - lo
        slow = slow + 1 if hi is not None and new_width > 0.5 * width else 0
        if hi is not None and slow >= 3:  # Newton is not closing in: bisect
            nxt, slow = (lo + hi) // 2, 0
        if hi is None:
            nxt = min(nxt, 4 * n)
        n = nxt
    raise RuntimeError("steps search did not converge")  # pragma: no cover
