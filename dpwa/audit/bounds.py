"""Empirical lower bounds on epsilon from canary scores: the statistics of privacy auditing.

A mechanism that is (epsilon, delta)-DP bounds every membership test on a canary:
TPR <= e^epsilon FPR + delta. Observing a test that does better, with confidence, proves
the mechanism is *not* (epsilon, delta)-DP for any smaller epsilon: a lower bound, to set
next to the accountant's upper bound. Two ways to turn scores into a bound:

* `clopper_pearson_bound` (Jagielski et al. 2020, "Auditing differentially private machine
  learning: how private is private SGD?"; Nasr et al. 2021): canaries are independent
  trials, in or out; a threshold on the score is a test; exact (Clopper-Pearson) binomial
  confidence intervals give TPR from below and FPR from above, and
  epsilon >= log((TPR_low - delta) / FPR_high). Thresholds are fixed in advance or chosen
  on one half of the canaries and tested on the other, with the confidence split over the
  tests (Bonferroni), so picking the best test is valid.
* `one_run_bound` (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training
  run"): m canaries each included with probability 1/2 in one run; the auditor guesses "in"
  for the highest scores and "out" for the lowest, abstaining on the rest. Under
  (epsilon, delta)-DP the number of correct guesses is dominated by a binomial with success
  probability e^epsilon / (1 + e^epsilon), plus a delta term (their Theorem 3.1 / Appendix
  D). Needs no independence between canaries, hence one run is enough.

Both are torch-free (numpy, scipy).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats

from accounting.errors import InvalidParameterError

__all__ = ["Bound", "clopper_pearson_bound", "one_run_bound", "one_run_p_value"]


@dataclasses.dataclass(frozen=True)
class Bound:
    """An epsilon lower bound and how it was obtained."""

    epsilon: float       # the mechanism is not (epsilon', delta)-DP for any epsilon' < this
    confidence: float    # probability that the bound is valid
    method: str
    detail: dict         # counts behind the bound (threshold, TPR/FPR or guesses/correct)


def _check(scores: np.ndarray, *, delta: float, confidence: float) -> None:
    """Bad input is refused, not turned into a bound: a NaN score would count as above every
    threshold (searchsorted) and a negative delta would inflate the bound."""
    if not np.isfinite(scores).all():
        raise InvalidParameterError(f"canary scores must be finite, got {int((~np.isfinite(scores)).sum())} that are not")
    if not 0 <= delta < 1:
        raise InvalidParameterError(f"delta must be in [0, 1), got {delta}")
    if not 0 < confidence < 1:
        raise InvalidParameterError(f"confidence must be in (0, 1), got {confidence}")


def _cp_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound of a binomial proportion at level alpha."""
    return np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, n - k), 1.0)


def _cp_lower(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    return np.where(k > 0, stats.beta.ppf(alpha, k, n - k + 1), 0.0)


def _eps_at_thresholds(inside: np.ndarray, outside: np.ndarray, thresholds: np.ndarray, delta: float,
                       alpha: float) -> np.ndarray:
    """Confidence bound on epsilon of the test `score >= t` for each t: TPR from below and
    FPR from above, each at level alpha / 2."""
    tp = len(inside) - np.searchsorted(np.sort(inside), thresholds, side="left")  # scores >= t
    fp = len(outside) - np.searchsorted(np.sort(outside), thresholds, side="left")
    tpr, fpr = _cp_lower(tp, len(inside), alpha / 2), _cp_upper(fp, len(outside), alpha / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.log(np.maximum(tpr - delta, 0) / fpr)
    return np.nan_to_num(eps, nan=0.0, neginf=0.0)


def clopper_pearson_bound(in_scores: Sequence[float], out_scores: Sequence[float], *, delta: float,
                          confidence: float = 0.95, thresholds: Sequence[float] = (), seed: int = 0) -> Bound:
    """Epsilon lower bound from the scores of independent in- and out-canaries (higher = in).

    The tests are `score >= t` for each of `thresholds` (fixed before the scores were seen,
    e.g. from the claimed mechanism; all canaries count), and for one threshold chosen on a
    random half of the canaries and tested on the other half (it adapts to an implementation
    that differs from the claim). The confidence is split over all of them (Bonferroni).

    Args:
        in_scores, out_scores: attack scores of canaries that were / were not in the data.
        delta: the delta of the claim being tested.
        confidence: the bound holds with at least this probability.
        thresholds: tests fixed in advance.
        seed: the random halving.

    Returns:
        The best bound (0 if no test beats chance), with its threshold and counts.

    >>> round(clopper_pearson_bound([3.0] * 400, [0.0] * 400, delta=1e-5).epsilon, 3)  # 200 + 200 tested
    3.984
    >>> round(clopper_pearson_bound([3.0] * 400, [0.0] * 400, delta=1e-5, thresholds=[1.0]).epsilon, 3)
    4.508
    >>> clopper_pearson_bound([0.0] * 400, [0.0] * 400, delta=1e-5, thresholds=[0.0, 1.0]).epsilon
    0.0
    """
    inside, outside = np.asarray(in_scores, float), np.asarray(out_scores, float)
    if len(inside) < 4 or len(outside) < 4:
        raise InvalidParameterError(f"need at least 4 in- and 4 out-canaries, got {len(inside)} and {len(outside)}: "
                                    "use more canaries")
    _check(np.concatenate([inside, outside]), delta=delta, confidence=confidence)
    alpha = (1 - confidence) / (len(thresholds) + 1)
    rng = np.random.default_rng(seed)
    pin, pout = rng.permutation(len(inside)), rng.permutation(len(outside))
    choose_in, test_in = inside[pin[: len(pin) // 2]], inside[pin[len(pin) // 2:]]
    choose_out, test_out = outside[pout[: len(pout) // 2]], outside[pout[len(pout) // 2:]]
    candidates = np.unique(np.concatenate([choose_in, choose_out]))
    chosen = candidates[int(np.argmax(_eps_at_thresholds(choose_in, choose_out, candidates, delta, alpha)))]
    tests = [(float(t), inside, outside, "fixed in advance") for t in thresholds]
    tests.append((float(chosen), test_in, test_out, "chosen on the other half of the canaries"))
    bounds = [float(_eps_at_thresholds(tin, tout, np.array([t]), delta, alpha)[0]) for t, tin, tout, _ in tests]
    best = int(np.argmax(bounds))
    t, tin, tout, rule = tests[best]
    eps = max(bounds[best], 0.0)
    return Bound(eps, confidence, "clopper-pearson", {
        "threshold": t, "rule": rule, "tests": len(tests), "in": len(tin), "out": len(tout),
        "true_positives": int((tin >= t).sum()), "false_positives": int((tout >= t).sum())})


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least `correct` right guesses out of `guesses` (of m canaries) under
    an (epsilon, delta)-DP mechanism (Steinke et al. 2023, Theorem 3.1 and Appendix D).

    >>> round(one_run_p_value(1000, 100, 50, 0.0, 0.0), 3)   # a fair coin: P[Bin(100, 1/2) >= 50]
    0.54
    """
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")
    q = special.expit(epsilon)  # accuracy of epsilon-DP randomised response
    beta = stats.binom.sf(correct - 1, guesses, q)
    if delta == 0 or correct == 0:
        return float(min(beta, 1.0))
    i = np.arange(1, correct + 1)
    # P[correct > Bin >= correct - i] / i, maximised over i: the delta term's worst case
    alpha = np.max((stats.binom.cdf(correct - 1, guesses, q) - stats.binom.cdf(correct - i - 1, guesses, q)) / i)
    return float(min(beta + alpha * delta * 2 * m, 1.0))


def _one_run_eps(m: int, guesses: int, correct: int, delta: float, alpha: float) -> float:
    """Largest epsilon rejected at level alpha (0 if even epsilon = 0 is not rejected)."""
    def excess(eps: float) -> float:  # > 0 while (eps, delta)-DP is rejected
        return alpha - one_run_p_value(m, guesses, correct, eps, delta)

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        if hi > 1e3:
            return math.inf
        hi *= 2
    return float(optimize.brentq(excess, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-6))


def one_run_bound(scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95,
                  guess_fractions: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.5)) -> Bound:
    """Steinke et al.'s one-run bound: guess "in" for the top r/2 scores and "out" for the
    bottom r/2, for each r = fraction x m of a fixed grid; the confidence is split over the
    grid (Bonferroni), so taking the best r is valid.

    Args:
        scores: one score per canary (higher = more likely in).
        included: whether each canary was in the training data (each with probability 1/2).
        delta: the delta of the claim being tested.
        confidence: the bound holds with at least this probability.
        guess_fractions: the grid of guess counts, as fractions of the canaries.

    >>> s = np.r_[np.ones(500), np.zeros(500)]
    >>> one_run_bound(s, s > 0, delta=0.0).epsilon > 3
    True
    """
    s, inc = np.asarray(scores, float), np.asarray(included, bool)
    m = len(s)
    if m != len(inc) or m < 2:
        raise InvalidParameterError(f"need one inclusion flag per score and at least 2 canaries, got {m} and {len(inc)}")
    _check(s, delta=delta, confidence=confidence)
    alpha = (1 - confidence) / len(guess_fractions)
    order = np.argsort(-s, kind="stable")
    best = Bound(0.0, confidence, "one-run", {"canaries": m, "guesses": 0, "correct": 0})
    for f in guess_fractions:
        half = max(1, int(f * m) // 2)
        if 2 * half > m:
            continue
        correct = int(inc[order[:half]].sum() + (~inc[order[m - half:]]).sum())
        eps = _one_run_eps(m, 2 * half, correct, delta, alpha)
        if eps > best.epsilon:
            best = Bound(eps, confidence, "one-run", {"canaries": m, "guesses": 2 * half, "correct": correct})
    return best
