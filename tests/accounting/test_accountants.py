"""Accountants: golden values (design.md section 5), cross-checks against Opacus and
dp-accounting, and the PRV composition checked against prv-accountant's own classes."""

import math

import numpy as np
import pytest

from accounting import Gaussian, InvalidParameterError, PoissonGaussian, delta, epsilon
from accounting import accountants as acc

Q, DELTA = 0.08192, 1e-5


def lib_prv(event):
    """prv-accountant's own PRV of `event` (the reference the fast paths are tested against)."""
    from prv_accountant.privacy_random_variables import GaussianMechanism, PoissonSubsampledGaussianMechanism

    if isinstance(event, PoissonGaussian):
        return PoissonSubsampledGaussianMechanism(sampling_probability=event.sample_rate,
                                                  noise_multiplier=event.noise_multiplier)
    return GaussianMechanism(noise_multiplier=event.noise_multiplier)


def dpsgd(sigma, steps, q=Q):
    return PoissonGaussian(noise_multiplier=sigma, sample_rate=q, steps=steps)


# Golden values, measured with dp-accounting 0.6.0 and Opacus 1.6.0 (design.md, section 5).
@pytest.mark.parametrize("sigma, steps, name, expected, tol", [
    (3, 2468, "rdp", 7.046, 5e-4),
    (3, 2468, "prv", 6.540, 5e-4),
    (3, 2468, "pld", 6.529, 5e-4),
    (10, 875, "rdp", 0.988, 5e-4),
    (10, 875, "prv", 0.913, 5e-4),
    (10, 875, "pld", 0.903, 5e-4),
    (6, 1125, "rdp", 2.000, 5e-4),
    (6, 1125, "prv", 1.847, 5e-4),
    (6, 1125, "pld", 1.836, 5e-4),
])
def test_golden_values(sigma, steps, name, expected, tol):
    assert epsilon([dpsgd(sigma, steps)], delta=DELTA, accountant=name) == pytest.approx(expected, abs=tol)


def test_prv_is_the_default_and_an_upper_bound():
    ev = [dpsgd(3, 2468)]
    assert epsilon(ev, delta=DELTA) == epsilon(ev, delta=DELTA, accountant="prv")
    # PRV upper bound sits above the tight PLD estimate and below the RDP bound.
    assert epsilon(ev, delta=DELTA, accountant="pld") < epsilon(ev, delta=DELTA) < epsilon(
        ev, delta=DELTA, accountant="rdp")


@pytest.mark.parametrize("history", [
    [(3.0, Q, 2468)],
    [(10.0, Q, 875)],
    [(1.1, 0.02048, 635), (3.0, Q, 400)],            # heterogeneous
    [(2.0, 0.01, 300), (6.0, 0.2, 50), (0.9, 0.004, 1000)],
])
def test_matches_opacus_accountants(history):
    pytest.importorskip("opacus")
    from opacus.accountants import PRVAccountant, RDPAccountant

    events = [dpsgd(s, n, q) for s, q, n in history]
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert epsilon(events, delta=DELTA, accountant="rdp") == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-5)
    prv = PRVAccountant()
    prv.history = list(history)
    assert epsilon(events, delta=DELTA, accountant="prv") == pytest.approx(prv.get_epsilon(DELTA), rel=1e-4)


def test_pld_matches_dp_accounting():
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant

    a = PLDAccountant()
    a.compose(dpa.ComposedDpEvent([
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.5)), 500),
        dpa.GaussianDpEvent(40.0)]))
    ours = epsilon([dpsgd(1.5, 500, 0.01), Gaussian(noise_multiplier=40.0)], delta=DELTA, accountant="pld")
    assert ours == pytest.approx(a.get_epsilon(DELTA), rel=1e-9)


def test_prv_matches_prv_accountant_library():
    """Our one-pass Fourier composition equals prv-accountant's PRVAccountant (convolution
    tree) on a heterogeneous composition with a plain Gaussian release."""
    from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant

    history = [(2.0, 0.05, 120), (4.0, 0.02, 300)]
    prvs = [PoissonSubsampledGaussianMechanism(noise_multiplier=s, sampling_probability=q) for s, q, _ in history]
    prvs.append(GaussianMechanism(noise_multiplier=30.0))
    counts = [n for *_, n in history] + [1]
    lib = PRVAccountant(prvs=prvs, max_self_compositions=counts, eps_error=acc.PRV_EPS_ERROR,
                        delta_error=DELTA / 1000)
    _, _, upper = lib.compute_epsilon(delta=DELTA, num_self_compositions=counts)
    ours = epsilon([dpsgd(s, n, q) for s, q, n in history] + [Gaussian(noise_multiplier=30.0)], delta=DELTA)
    assert ours == pytest.approx(upper, rel=1e-4)


def _discretise(prv, domain):
    """`acc._discretise_support` as prv-accountant's DiscretePrivacyRandomVariable on the whole domain."""
    from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable

    lo, support, mean_shift = acc._discretise_support(prv, domain)
    pmf = np.zeros(len(domain))
    pmf[lo:lo + len(support)] = support
    return DiscretePrivacyRandomVariable(pmf, domain.shift_right(mean_shift), log_pmc_inf=np.log(1 - prv.pm_inf))


@pytest.mark.parametrize("event", [dpsgd(3.0, 500), dpsgd(1.0, 50, 0.1), dpsgd(0.3, 30, 0.5), dpsgd(0.6867, 637, 0.02048),
                                   Gaussian(noise_multiplier=5.0, count=20)])
def test_fast_discretisation_equals_prv_accountant(event):
    """Our discretisation (each edge's CDF once, float64 CDFs) equals prv-accountant's
    CellCentred on its own PRV classes. Not bit for bit: CellCentred's cells [t_i - dt/2,
    t_i + dt/2] sit on a grid whose spacing jitters by ~3e-15 (its long-double linspace is
    float64-accurate), so they overlap or leave gaps at that level, where ours share edges;
    a cell where the pdf is steep (~100) moves by ~3e-13, 1e-11 of the largest cell."""
    from prv_accountant.discretisers import CellCentred
    from prv_accountant.privacy_random_variables import PrivacyRandomVariableTruncated

    mesh = 0.01 / np.sqrt(event.count / 2 * np.log(12 / 1e-8))
    domain = acc._fast_domain(acc._safe_domain_size([event], 0.01, 1e-8), mesh)
    reference = CellCentred().discretise(PrivacyRandomVariableTruncated(lib_prv(event), domain.t_min(),
                                                                        domain.t_max()), domain)
    expected = np.asarray(reference.pmf, dtype=np.float64)
    for prv in (lib_prv(event), acc._fast_prv(event)):
        ours = _discretise(prv, domain)
        np.testing.assert_allclose(np.asarray(ours.pmf, dtype=np.float64), expected, rtol=0,
                                   atol=1e-10 * expected.max())
        assert float(np.sum(ours.pmf)) == pytest.approx(float(np.sum(reference.pmf)), abs=1e-12)
        assert len(ours.domain) == len(reference.domain) and ours.domain.t_min() == pytest.approx(
            reference.domain.t_min(), abs=1e-3 * domain.dt())


@pytest.mark.parametrize("event", [dpsgd(0.6867, 1, 0.02048), dpsgd(10.0, 1), dpsgd(0.3, 1, 0.5),
                                   Gaussian(noise_multiplier=2.0)])
def test_fast_cdf_equals_prv_accountant(event):
    t = np.linspace(-20, 20, 40001)
    lib, fast = lib_prv(event), acc._fast_prv(event)
    np.testing.assert_allclose(fast.cdf(t), np.asarray(lib.cdf(t.astype(np.longdouble)), dtype=np.float64),
                               rtol=0, atol=1e-13)
    for x in (-0.5, 0.01, 0.7, 3.0, 40.0):  # the scalar path the truncated mean's quadrature takes
        assert fast.cdf(x) == pytest.approx(float(lib.cdf(np.longdouble(x))), abs=1e-15)


@pytest.mark.parametrize("events", [[dpsgd(3.0, 2468)], [dpsgd(0.6867, 637, 0.02048), dpsgd(10.0, 22000)],
                                    [dpsgd(2.0, 120, 0.05), Gaussian(noise_multiplier=30.0)]])
@pytest.mark.parametrize("d", [1e-5, 1e-8])
def test_read_out_equals_prv_accountant(events, d, monkeypatch):
    """Our float64 read-outs of the upper bound equal prv-accountant's long-double one on the
    same composed pmf: the pmf's cumulative sums to rounding; the Fourier series' closed form
    to its rounding bound, which it adds (so it is never below) and keeps under 1e-6, else
    it hands over to the pmf (the tiny-delta cases)."""
    from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable

    composed = acc._prv_compose(events, 0.01, d / 1000)
    # ours adds the float64 composition's rounding bound to delta's error; theirs is given it
    theirs = float(DiscretePrivacyRandomVariable(composed.pmf(), composed.domain, composed.log_pmc_inf)
                   .compute_epsilon(d, d / 1000 + composed.rounding, 0.01)[2])
    assert len(composed.freqs) <= acc._SERIES_MAX  # the closed form is tried
    series = acc._series_read_out(composed, d * (1 - 1e-3) - composed.rounding)
    if d == 1e-5:
        assert series is not None and 0 < series[3] <= acc._SERIES_ROUNDING
    ours = acc._epsilon_upper(composed, d, d / 1000, 0.01)
    assert theirs - 1e-12 <= ours <= theirs + acc._SERIES_ROUNDING
    monkeypatch.setattr(acc, "_SERIES_MAX", 0)
    assert acc._epsilon_upper(composed, d, d / 1000, 0.01) == pytest.approx(theirs, rel=1e-10)


def _full_composition(events, eps_error, delta_error):
    """The composition without the frequency band: every mechanism's full real FFT, the
    product of all frequencies, the pmf rolled back to t_min (prv-accountant's Fourier composer)."""
    mesh, size = acc._prv_grid(events, eps_error, delta_error)
    log_f = np.zeros(size // 2 + 1, dtype=np.complex128)
    for e in events:
        pmf = np.asarray(_discretise(acc._fast_prv(e.with_count(0)), acc._grid_domain(mesh, size)).pmf)
        with np.errstate(divide="ignore"):
            log_f += e.count * np.log(np.fft.rfft(pmf).astype(np.complex128))
    total = sum(e.count for e in events)
    pmf = np.fft.irfft(np.exp(log_f), n=size)
    return np.roll(pmf, total - 1 + (size // 2 if total % 2 == 0 else 0))


@pytest.mark.parametrize("events", [[dpsgd(0.6867, 637, 0.02048), dpsgd(10.0, 22000)], [dpsgd(3.0, 2468)],
                                    [dpsgd(2.0, 120, 0.05), Gaussian(noise_multiplier=30.0)]])
def test_band_limited_composition_equals_full_one(events):
    """Computing each spectrum only on the band of frequencies the composition can keep
    (the blocked Taylor DFT, bounded by the pmf's total variation) gives the pmf that the full
    FFT of every frequency gives; the README's ledger query keeps a few hundred of ~1e6."""
    acc._CACHE.clear()
    composed = acc._prv_compose(events, 0.01, DELTA / 1000)
    full = _full_composition(events, 0.01, DELTA / 1000)
    # equal down to the FFTs' noise floor (~1e-17 against a largest cell of ~1e-6)
    np.testing.assert_allclose(composed.pmf(), full, rtol=0, atol=1e-10 * full.max())
    if len(events) == 2 and events[1].count == 22000:
        assert len(composed.freqs) < 1e-3 * composed.size


def test_dft_low_equals_fft():
    """The blocked Taylor DFT of the lowest frequencies equals numpy's full complex FFT
    (float64) to rounding, for supports at the start, middle and end of the grid; where it
    would save little (a wide band, a short grid) it declines and the caller runs the real FFT."""
    rng = np.random.default_rng(0)
    cases = [(1000, 123456, 2**18 + 6, 300), (433389, 700000, 1944000, 622), (30000, 0, 186624, 620),
             (5000, 2**18 - 5000, 2**18, 64), (2**16, 0, 2**16, 20), (7, 3, 2**14, 1), (7, 3, 2**14, 0)]
    for width, offset, size, band in cases:
        x = rng.random(width)
        signal = np.zeros(size)
        signal[offset:offset + width] = x
        got = acc._dft_low(x, offset, size, band)
        assert got is not None and got.shape == (band,)
        np.testing.assert_allclose(got, np.fft.fft(signal)[:band], rtol=0, atol=1e-14 * x.sum())
    for width, offset, size, band in [(7, 3, 64, 20), (1, 5, 10, 6), (1000, 0, 2**16, 2**14)]:
        assert acc._dft_low(rng.random(width), offset, size, band) is None


def test_snapped_domain_is_finer_and_wider_and_shared():
    """The snapped grid's mesh is at most Theorem 5.5's and its half-width at least the safe
    domain size, so the error bounds hold; n and n + 1 steps share one grid (the cache)."""
    a, b = [dpsgd(0.6867, 637, 0.02048), dpsgd(10.0, 21986)], [dpsgd(0.6867, 637, 0.02048), dpsgd(10.0, 21987)]
    mesh, size = acc._prv_grid(a, 0.01, 1e-8)
    assert mesh <= 0.01 / np.sqrt(sum(e.count for e in a) / 2 * np.log(12 / 1e-8))
    assert (size // 2 - 1) * mesh >= acc._safe_domain_size(a, 0.01, 1e-8)
    assert acc._prv_grid(b, 0.01, 1e-8) == (mesh, size)
    for x in (1e-5, 0.3, 1.0, 7.77, 18.6):
        assert acc._snap(x, -1) <= x < acc._snap(x, -1) * 2 ** (1 / acc._SNAP) * (1 + 1e-12)
        assert acc._snap(x, +1) >= x > acc._snap(x, +1) / 2 ** (1 / acc._SNAP) / (1 + 1e-12)


def test_cached_and_fresh_compositions_agree():
    events = [dpsgd(0.6867, 637, 0.02048), dpsgd(10.0, 875)]
    first = epsilon(events, delta=DELTA)
    acc._CACHE.clear()
    assert epsilon(events, delta=DELTA) == first


def test_safe_domain_size_equals_prv_accountant():
    from prv_accountant.accountant import compute_safe_domain_size

    events = [dpsgd(2.0, 100, 0.05), dpsgd(5.0, 1000, 0.1), Gaussian(noise_multiplier=10.0, count=2)]
    ours = acc._safe_domain_size(events, 0.01, 1e-8)
    theirs = compute_safe_domain_size([lib_prv(e) for e in events], [e.count for e in events], 0.01, 1e-8)
    assert ours == pytest.approx(theirs, rel=1e-12)


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_heterogeneous_composition_is_order_free_and_exceeds_parts(name):
    a, b = dpsgd(2.0, 300, 0.05), dpsgd(8.0, 1000, Q)
    ab = epsilon([a, b], delta=DELTA, accountant=name)
    assert ab == pytest.approx(epsilon([b, a], delta=DELTA, accountant=name), rel=1e-9)
    assert ab > max(epsilon([a], delta=DELTA, accountant=name), epsilon([b], delta=DELTA, accountant=name))
    # Splitting one run into two identical halves changes nothing.
    assert epsilon([b.with_count(400), b.with_count(600)], delta=DELTA, accountant=name) == pytest.approx(
        epsilon([b], delta=DELTA, accountant=name), rel=1e-9)


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_plain_gaussian_release(name):
    # One Gaussian release with sigma 2: the exact (analytic) epsilon at 1e-5 is about 2.0
    # (Balle & Wang 2018); RDP is looser.
    eps = epsilon([Gaussian(noise_multiplier=2.0)], delta=DELTA, accountant=name)
    assert 1.95 < eps < (2.3 if name == "rdp" else 2.05)
    assert epsilon([dpsgd(2.0, 1, 1.0)], delta=DELTA, accountant=name) == pytest.approx(eps)


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_delta_and_epsilon_are_consistent(name):
    ev = [dpsgd(3.0, 2468)]
    eps = epsilon(ev, delta=DELTA, accountant=name)
    d = delta(ev, epsilon=eps, accountant=name)
    assert d <= DELTA * 1.01
    assert delta(ev, epsilon=eps * 0.8, accountant=name) > DELTA
    assert delta(ev, epsilon=eps * 1.2, accountant=name) < DELTA


def test_no_events_cost_nothing():
    assert epsilon([], delta=DELTA) == 0.0
    assert epsilon([dpsgd(1.0, 0)], delta=DELTA) == 0.0
    assert delta([], epsilon=1.0) == 0.0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(delta=0.0), "delta=0.0"), (dict(delta=1.0), "delta=1.0"), (dict(delta=-1e-5), "delta=-1e-05"),
    (dict(delta=1e-5, accountant="moments"), "'moments'"),
])
def test_epsilon_bad_input(kwargs, needle):
    with pytest.raises(InvalidParameterError) as info:
        epsilon([dpsgd(1.0, 10)], **kwargs)
    assert needle in str(info.value)


def test_delta_bad_input():
    with pytest.raises(InvalidParameterError, match="epsilon=-1"):
        delta([dpsgd(1.0, 10)], epsilon=-1.0)
    with pytest.raises(InvalidParameterError, match="epsilon=inf"):
        delta([dpsgd(1.0, 10)], epsilon=math.inf)


def test_prv_refuses_a_grid_that_would_exhaust_memory():
    """sigma 0.1 over 1465 steps needs ~2e8 grid points (GBs): refused before allocating,
    with an error that names the RDP accountant, which composes it."""
    from accounting.errors import AccountantFailedError

    event = PoissonGaussian(noise_multiplier=0.1, sample_rate=8 / 1497, steps=1465)
    with pytest.raises(AccountantFailedError, match="use the RDP accountant"):
        epsilon([event], delta=1e-4, accountant="prv")
    assert epsilon([event], delta=1e-4, accountant="rdp") > 100


def _one_step_exact_epsilon(sigma: float, q: float, target: float) -> float:
    """The exact epsilon of one Poisson-subsampled Gaussian step at delta `target`, by bisection
    on its hockey-stick divergence in closed form (the slow, obviously correct reference).

    Removing an example: P = (1 - q) N(0, s^2) + q N(1, s^2) against Q = N(0, s^2); the loss
    log(1 - q + q e^((2x - 1) / 2s^2)) exceeds eps exactly for x > a, a = s^2 log((e^eps - 1 + q) / q)
    + 1/2, so delta(eps) = P(x > a) - e^eps Q(x > a), in logs (e^eps overflows). Adding one
    gives delta 0 for any eps above -log(1 - q)."""
    from scipy.special import log_ndtr

    def delta_at(eps):
        a = sigma**2 * (eps + math.log1p(-(1 - q) * math.exp(-eps)) - math.log(q)) + 0.5  # log(e^eps - 1 + q) - log q
        tail_p = (1 - q) * math.exp(log_ndtr(-a / sigma)) + q * math.exp(log_ndtr(-(a - 1) / sigma))
        return tail_p - math.exp(eps + log_ndtr(-a / sigma))

    lo, hi = 0.0, 1e5
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > target else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma, q", [(0.01, 0.01), (0.02, 0.01), (0.02, 0.001), (0.5, 0.2), (2.0, 0.5)])
def test_prv_of_one_step_is_at_least_the_exact_epsilon_even_at_tiny_noise(sigma, q):
    """One step against its exact epsilon: log1p(expm1(t) / q) overflowed above t ~ 705, the
    CDF read 1 there, and PRV reported 705 for a step that spends 5303 (sigma 0.01, q 0.01; a
    helper's review). The bound is above the exact value and within 1% of it."""
    exact = _one_step_exact_epsilon(sigma, q, 1e-5)
    got = epsilon([PoissonGaussian(noise_multiplier=sigma, sample_rate=q, steps=1)], delta=1e-5)
    assert exact <= got <= exact * 1.01 + 0.02, (got, exact)


def test_prv_refuses_a_delta_its_float64_composition_cannot_resolve():
    """1000 steps at delta 1e-12: the float64 composition's rounding (bounded, `rounding`) is
    above what the delta leaves; epsilon came out 3.898 where the truth is in [3.912, 3.917]
    (a helper's bracket). Now an AccountantFailedError that points to RDP; at delta 1e-5 the
    bound is 1e-10, and the README's numbers do not move."""
    from accounting import AccountantFailedError

    ev = [PoissonGaussian(noise_multiplier=1.0, sample_rate=0.01, steps=1000)]
    with pytest.raises(AccountantFailedError, match="RDP accountant"):
        epsilon(ev, delta=1e-12)
    composed = acc._prv_compose(ev, acc.PRV_EPS_ERROR, 1e-8)
    assert 0 < composed.rounding < 1e-9
    assert epsilon([dpsgd(3.0, 2468)], delta=1e-5) == pytest.approx(6.5396, abs=5e-5)


def test_delta_is_finite_or_refused_and_noise_and_delta_extremes_are_accounting_errors():
    from accounting import AccountantFailedError, AccountingError

    step = [PoissonGaussian(noise_multiplier=0.01, sample_rate=0.01, steps=1)]
    d = delta(step, epsilon=1000)  # was NaN: the overflowed CDF
    assert math.isfinite(d) and 0.009 <= d <= 0.011
    with pytest.raises(InvalidParameterError, match="noise_multiplier <= 1e"):
        PoissonGaussian(noise_multiplier=1e200, sample_rate=0.5, steps=10)
    with pytest.raises(AccountingError):  # not a raw ValueError
        epsilon([PoissonGaussian(noise_multiplier=1.0, sample_rate=0.5, steps=10)], delta=1e-300)
    assert issubclass(AccountantFailedError, AccountingError)
