import pytest

from accounting import (InvalidParameterError, PoissonGaussian, epsilon, epsilon_for, noise_multiplier_for,
                        sample_rate_and_steps, steps_for)

Q, DELTA = 0.08192, 1e-5


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
@pytest.mark.parametrize("target, q, steps", [(8.0, Q, 2468), (1.0, Q, 875), (0.5, 0.001, 10000), (30.0, 0.5, 10)])
def test_noise_calibration_lands_within_one_percent_below(accountant, target, q, steps):
    if accountant == "pld" and q == 0.5:
        pytest.skip("PLD is slow (tens of seconds) at sigma < 0.5; covered by rdp and prv")
    sigma = noise_multiplier_for(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=accountant)
    spent = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant=accountant)
    assert 0.99 * target <= spent <= target


@pytest.mark.parametrize("q, steps", [(1.0, 1), (1.0, 1000), (1.0, 200_000), (Q, 200_000), (1e-5, 1000)])
def test_noise_calibration_stops_on_the_true_epsilon_not_an_illinois_weight(q, steps):
    """Regula falsi halves an end's value to move it; stopping on that halved value landed at
    0.986 of the target (delta 1e-10, RDP: sigma 196.89 where 195.26 gave 0.995)."""
    sigma = noise_multiplier_for(target_epsilon=1.0, delta=1e-10, sample_rate=q, steps=steps, accountant="rdp")
    spent = epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-10, accountant="rdp")
    assert 0.99 <= spent <= 1.0


def test_noise_calibration_reproduces_de_et_al():
    # De et al. calibrate sigma 3 for epsilon 8 under RDP with 2468 steps at q = 4096/50000.
    sigma = noise_multiplier_for(target_epsilon=7.046, delta=DELTA, sample_rate=Q, steps=2468, accountant="rdp",
                                 rtol=0.001)
    assert sigma == pytest.approx(3.0, rel=2e-3)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target, sigma, q", [(8.0, 3.0, Q), (1.0, 10.0, Q), (2.0, 1.0, 0.004)])
def test_steps_is_the_exact_maximum(accountant, target, sigma, q):
    n = steps_for(target_epsilon=target, delta=DELTA, noise_multiplier=sigma, sample_rate=q, accountant=accountant)
    assert n > 0
    assert epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=n, delta=DELTA, accountant=accountant) <= target
    assert epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=n + 1, delta=DELTA,
                       accountant=accountant) > target


def test_tight_accounting_buys_steps():
    # design.md: sigma 3 at q 0.08192 "buys roughly 3,500 steps at a true epsilon of 8" under PRV.
    n_prv = steps_for(target_epsilon=8.0, delta=DELTA, noise_multiplier=3.0, sample_rate=Q)
    n_rdp = steps_for(target_epsilon=8.0, delta=DELTA, noise_multiplier=3.0, sample_rate=Q, accountant="rdp")
    assert 3400 < n_prv < 3600
    assert n_rdp < n_prv


def test_steps_zero_when_one_step_is_too_much():
    assert steps_for(target_epsilon=0.1, delta=DELTA, noise_multiplier=0.6, sample_rate=0.5, accountant="rdp") == 0


def test_calibration_with_prior_spend():
    prior = [PoissonGaussian(noise_multiplier=10.0, sample_rate=Q, steps=875)]
    n_alone = steps_for(target_epsilon=4.0, delta=DELTA, noise_multiplier=3.0, sample_rate=Q, accountant="rdp")
    n_after = steps_for(target_epsilon=4.0, delta=DELTA, noise_multiplier=3.0, sample_rate=Q, accountant="rdp",
                        prior=prior)
    assert n_after < n_alone
    total = epsilon([*prior, PoissonGaussian(noise_multiplier=3.0, sample_rate=Q, steps=n_after)], delta=DELTA,
                    accountant="rdp")
    assert total <= 4.0
    sigma = noise_multiplier_for(target_epsilon=4.0, delta=DELTA, sample_rate=Q, steps=1000, accountant="rdp",
                                 prior=prior)
    assert 3.96 <= epsilon_for(noise_multiplier=sigma, sample_rate=Q, steps=1000, delta=DELTA, accountant="rdp",
                               prior=prior) <= 4.0


def test_impossible_target_is_a_clear_error():
    prior = [PoissonGaussian(noise_multiplier=0.5, sample_rate=0.5, steps=100)]
    with pytest.raises(InvalidParameterError, match="No noise multiplier"):
        noise_multiplier_for(target_epsilon=1.0, delta=DELTA, sample_rate=Q, steps=10, accountant="rdp", prior=prior)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(target_epsilon=0.0), "target_epsilon=0.0"),
    (dict(target_epsilon=-1.0), "target_epsilon=-1.0"),
    (dict(delta=1.0), "delta=1.0"),
    (dict(sample_rate=0.0), "sample_rate=0.0"),
    (dict(steps=0), "steps=0"),
    (dict(steps=-5), "steps=-5"),
    (dict(accountant="gdp"), "'gdp'"),
    (dict(rtol=0.0), "rtol=0.0"),
])
def test_noise_calibration_bad_input(kwargs, needle):
    args = dict(target_epsilon=1.0, delta=DELTA, sample_rate=Q, steps=100, accountant="rdp") | kwargs
    with pytest.raises(InvalidParameterError) as info:
        noise_multiplier_for(**args)
    assert needle in str(info.value)


def test_sample_rate_and_steps():
    assert sample_rate_and_steps(batch_size=4096, dataset_size=50000, epochs=200) == (0.08192, 2442)
    assert sample_rate_and_steps(batch_size=100, dataset_size=1000, epochs=3) == (0.1, 30)
    with pytest.raises(InvalidParameterError, match="batch_size=2000 <= dataset_size=1000"):
        sample_rate_and_steps(batch_size=2000, dataset_size=1000, epochs=1)
    with pytest.raises(InvalidParameterError, match="epochs=-1"):
        sample_rate_and_steps(batch_size=10, dataset_size=1000, epochs=-1)


# ---------------------------------------------------------------- the step search, brute force

def _brute_force_steps(target, sigma, q, accountant, prior, limit, start=0):
    """Walk n = start + 1, ... with the accountant itself until a run of n steps no longer fits."""
    n = start
    while n < limit and epsilon([*prior, PoissonGaussian(noise_multiplier=sigma, sample_rate=q, steps=n + 1)],
                                delta=DELTA, accountant=accountant) <= target:
        n += 1
    return n


HETEROGENEOUS = [PoissonGaussian(noise_multiplier=1.1, sample_rate=0.02, steps=40),
                 PoissonGaussian(noise_multiplier=4.0, sample_rate=0.05, steps=30)]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("extra, sigma, q, prior", [
    (0.8, 2.0, 0.05, []),                      # no prior
    (0.15, 3.0, 0.05, HETEROGENEOUS),          # a prior of other mechanisms
    (0.1, 4.0, 0.05, HETEROGENEOUS),           # the new run merges with a prior mechanism
    (0.3, 1.5, 0.1, [PoissonGaussian(noise_multiplier=0.8, sample_rate=0.02, steps=20)]),
    (0.05, 1.0, 0.01, [PoissonGaussian(noise_multiplier=0.8, sample_rate=0.02, steps=20)]),
])
def test_steps_for_equals_brute_force(accountant, extra, sigma, q, prior):
    """The search's answer is what walking n up one step at a time with `epsilon` gives: it
    never allows a step the accountant (and so a ledger reservation) would refuse."""
    target = round(epsilon(prior, delta=DELTA, accountant=accountant) + extra, 3)
    n = steps_for(target_epsilon=target, delta=DELTA, noise_multiplier=sigma, sample_rate=q, accountant=accountant,
                  prior=prior)
    assert 0 < n < 300
    # RDP is exactly monotone in n (n times one curve), so its walk may start near the answer.
    start = 0 if accountant == "prv" else max(n - 10, 0)
    assert n == _brute_force_steps(target, sigma, q, accountant, prior, limit=n + 3, start=start)


def test_steps_for_when_the_prior_alone_is_over_the_target():
    prior = [PoissonGaussian(noise_multiplier=1.0, sample_rate=0.05, steps=500)]
    assert steps_for(target_epsilon=1.0, delta=DELTA, noise_multiplier=5.0, sample_rate=Q, prior=prior) == 0


def test_readme_ledger_query_is_exact_with_few_accountant_calls(monkeypatch):
    """`dpwa ledger remaining --sigma 10 --sample-rate 0.08192` on the README's ledger (budget 10):
    the answer fits and one more step does not, with a handful of full PRV evaluations (the
    old search made 15, 0.5 s each, at ~22,600 composed steps)."""
    from accounting import accountants as acc

    prior = [PoissonGaussian(noise_multiplier=0.6867, sample_rate=0.02048, steps=637),
             PoissonGaussian(noise_multiplier=10.0, sample_rate=Q, steps=875)]
    calls = []
    fine = acc.ACCOUNTANTS["prv"]
    monkeypatch.setitem(acc.ACCOUNTANTS, "prv", (lambda ev, d: calls.append(ev) or fine[0](ev, d), fine[1]))
    n = steps_for(target_epsilon=10.0, delta=DELTA, noise_multiplier=10.0, sample_rate=Q, prior=prior)
    assert n == 21111
    assert len(calls) <= 6
    monkeypatch.undo()
    run = PoissonGaussian(noise_multiplier=10.0, sample_rate=Q, steps=n)
    assert epsilon([*prior, run], delta=DELTA) <= 10.0 < epsilon([*prior, run.with_count(n + 1)], delta=DELTA)


def test_steps_for_beyond_the_search_range_is_a_clear_error():
    with pytest.raises(InvalidParameterError, match="more than 1e\\+09 steps"):
        steps_for(target_epsilon=50.0, delta=DELTA, noise_multiplier=1000.0, sample_rate=1e-6, accountant="rdp")
