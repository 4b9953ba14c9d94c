"""The statistics of the audit against slow, obviously correct references, and their validity:
on mechanisms whose epsilon is known, the lower bounds stay below it."""

import math

import numpy as np
import pytest
from scipy import stats

from dpwa.audit import clopper_pearson_bound, one_run_bound, one_run_p_value


def reference_p_value(m, r, v, eps, delta):
    """Steinke et al. 2023, Appendix D, written as a literal loop."""
    q = 1 / (1 + math.exp(-eps))
    beta = sum(stats.binom.pmf(j, r, q) for j in range(v, r + 1))
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize("m,r,v,eps,delta", [(1000, 100, 80, 1.0, 1e-5), (1000, 100, 60, 0.3, 1e-3),
                                             (500, 40, 40, 2.0, 0.0), (2000, 500, 300, 0.5, 1e-6),
                                             (100, 10, 0, 1.0, 1e-5)])
def test_one_run_p_value_matches_the_papers_algorithm(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(reference_p_value(m, r, v, eps, delta), rel=1e-9,
                                                                 abs=1e-15)


def test_one_run_bound_is_the_largest_rejected_epsilon():
    s = np.r_[np.ones(60), np.zeros(940)]
    inc = np.zeros(1000, bool)
    inc[:55] = True  # 55 of the top 60 are in
    b = one_run_bound(s, inc, delta=1e-5, guess_fractions=(0.1,))
    assert b.detail == {"canaries": 1000, "guesses": 100, "correct": int(inc[:50].sum() + (~inc[-50:]).sum())}
    # at the bound the p-value equals 1 - confidence; just below it the claim is rejected
    v = b.detail["correct"]
    assert one_run_p_value(1000, 100, v, b.epsilon, 1e-5) == pytest.approx(0.05, abs=1e-4)
    assert one_run_p_value(1000, 100, v, b.epsilon - 0.01, 1e-5) < 0.05


def test_clopper_pearson_perfect_separation_matches_the_exact_intervals():
    n = 400
    b = clopper_pearson_bound([1.0] * n, [0.0] * n, delta=1e-5, thresholds=[0.5])
    alpha = 0.05 / 2 / 2  # two tests (the fixed threshold, the halving one), two one-sided intervals each
    tpr_low = stats.beta.ppf(alpha, n, 1)  # all n in above the threshold
    fpr_high = stats.beta.ppf(1 - alpha, 1, n)  # none of the n out
    assert b.epsilon == pytest.approx(math.log((tpr_low - 1e-5) / fpr_high), rel=1e-9)
    assert b.detail["true_positives"] == n and b.detail["false_positives"] == 0


def _randomized_response(eps, n, rng):
    """Pure eps-DP: an in-canary says "in" with probability e^eps / (1 + e^eps)."""
    p = 1 / (1 + math.exp(-eps))
    return (rng.random(n) < p).astype(float), (rng.random(n) < 1 - p).astype(float)


def test_one_run_bound_splits_the_confidence_over_its_grid():
    """With the default grid of 5 guess counts, each is tested at level 0.05 / 5 (Bonferroni):
    the p-value at the bound is 0.01, not 0.05 (testing each at 0.05 and keeping the best is
    not a valid 95% bound)."""
    rng = np.random.default_rng(3)
    inc = rng.random(2000) < 0.5
    scores = inc * 1.5 + rng.normal(size=2000)
    b = one_run_bound(scores, inc, delta=1e-5)
    assert b.epsilon > 0.5
    d = b.detail
    assert one_run_p_value(2000, d["guesses"], d["correct"], b.epsilon, 1e-5) == pytest.approx(0.01, abs=1e-5)


def test_bounds_are_valid_on_a_mechanism_of_known_epsilon():
    """Randomised response is exactly eps-DP, and its tests meet TPR = e^eps FPR: the tightest
    case. Over 1500 independent audits a 95% bound may exceed eps in about 75 of them (at most
    3.5 standard deviations more are allowed); a bound tested at the wrong level exceeds it
    about 3 times as often."""
    rng = np.random.default_rng(0)
    eps, over_cp, over_one, tight = 1.0, 0, 0, []
    for _ in range(1500):
        inside, outside = _randomized_response(eps, 500, rng)
        cp = clopper_pearson_bound(inside, outside, delta=0.0, thresholds=[0.5], seed=int(rng.integers(1 << 30)))
        scores = np.r_[inside, outside] + 1e-9 * rng.random(1000)  # break ties at random
        one = one_run_bound(scores, np.r_[np.ones(500, bool), np.zeros(500, bool)], delta=0.0)
        over_cp += cp.epsilon > eps
        over_one += one.epsilon > eps
        tight.append(cp.epsilon)
    limit = 1500 * 0.05 + 3.5 * math.sqrt(1500 * 0.05 * 0.95)
    assert over_cp <= limit and over_one <= limit, (over_cp, over_one)
    assert np.median(tight) > 0.6 * eps  # and the bound is not vacuous


def test_gaussian_scores_approach_but_stay_below_the_true_epsilon():
    """In-scores N(mu, 1) against out-scores N(0, 1) is mu-GDP; its epsilon at delta is known
    in closed form (Dong, Roth, Su 2019). With 20,000 canaries the bound gets close."""
    mu, delta = 2.0, 1e-3
    from scipy.optimize import brentq

    def gdp_delta(e):
        return stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)

    true_eps = brentq(lambda e: gdp_delta(e) - delta, 0, 50)
    rng = np.random.default_rng(1)
    inside, outside = rng.normal(mu, 1, 10000), rng.normal(0, 1, 10000)
    b = clopper_pearson_bound(inside, outside, delta=delta, thresholds=list(stats.norm.isf([0.01, 0.003, 0.001])))
    assert 0.5 * true_eps < b.epsilon < true_eps


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 4"):
        clopper_pearson_bound([1.0], [0.0, 1.0, 2.0, 3.0], delta=1e-5)
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson_bound([1.0] * 4, [0.0] * 4, delta=1e-5, confidence=1.0)
    with pytest.raises(ValueError, match="one inclusion flag per score"):
        one_run_bound([1.0, 2.0, 3.0], [True], delta=1e-5)
    with pytest.raises(ValueError, match="correct <= guesses <= m"):
        one_run_p_value(10, 20, 5, 1.0, 1e-5)
    with pytest.raises(ValueError, match="scores must be finite, got 4 that are not"):
        clopper_pearson_bound([math.nan] * 4, [0.0] * 4, delta=1e-5, thresholds=[0.5])
    for bad in (dict(delta=-0.5), dict(delta=1.0), dict(delta=math.nan), dict(confidence=0.0),
                dict(confidence=-1.0)):
        kw = {"delta": 1e-5, **bad}
        with pytest.raises(ValueError, match="delta must be in|confidence must be in"):
            one_run_bound([1.0, 0.0], [True, False], **kw)
        with pytest.raises(ValueError, match="delta must be in|confidence must be in"):
            clopper_pearson_bound([1.0] * 4, [0.0] * 4, **kw)


def test_the_adaptive_threshold_is_tested_only_on_the_half_it_was_not_chosen_on():
    """Choosing the threshold on the canaries it is then tested on biases the bound upward
    (the mutant still passed every other test): the counts reported are the other half's."""
    rng = np.random.default_rng(3)
    inside, outside = rng.normal(1.0, 1.0, 301), rng.normal(0.0, 1.0, 299)
    b = clopper_pearson_bound(inside, outside, delta=1e-5, seed=11)
    d = b.detail
    assert d["rule"] == "chosen on the other half of the canaries" and d["tests"] == 1
    halving = np.random.default_rng(11)
    pin, pout = halving.permutation(301), halving.permutation(299)
    test_in, test_out = inside[pin[150:]], outside[pout[149:]]
    choose_in, choose_out = inside[pin[:150]], outside[pout[:149]]
    assert (d["in"], d["out"]) == (151, 150)
    assert d["true_positives"] == int((test_in >= d["threshold"]).sum())
    assert d["false_positives"] == int((test_out >= d["threshold"]).sum())
    assert d["threshold"] in set(choose_in) | set(choose_out)  # a score of the choosing half
