"""accounting.numerics (the PRV path without scipy) against scipy and prv-accountant."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from accounting import numerics as N
from accounting import steps_for
from accounting.accountants import RDP_ORDERS, _FastPoissonGaussianPRV, _Truncated

ROOT = Path(__file__).resolve().parents[2]


def _points() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([np.linspace(-30, 30, 600001), rng.standard_normal(200000) * 5,
                           np.geomspace(1e-300, 27, 20000), -np.geomspace(1e-300, 27, 20000),
                           [0.0, -0.0, 1.0, -1.0, 8.0, -8.0, 26.6, np.inf, -np.inf, np.nan]])


def test_erfc_and_ndtr_are_bit_identical_to_scipy_with_its_exp(monkeypatch):
    """Cephes' algorithm exactly as scipy evaluates it: with the C library's exp (scipy's) in
    place of numpy's, every value is scipy's, bit for bit."""
    import scipy.special as sp

    x = _points()
    libm_exp = np.frompyfunc(math.exp, 1, 1)
    monkeypatch.setattr(N, "_exp", lambda v: libm_exp(v).astype(np.float64))
    np.testing.assert_array_equal(N.erfc(x), sp.erfc(x))
    np.testing.assert_array_equal(N.ndtr(x), sp.ndtr(x))


def test_erfc_and_ndtr_equal_scipy_with_numpys_exp():
    """numpy's SIMD exp (AVX-512) may round an ulp away from the C library's: a few ulp, no more."""
    import scipy.special as sp

    x = _points()
    for f in (N.erfc, N.ndtr):
        got, want = f(x), getattr(sp, f.__name__)(x)
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[np.isinf(want)], want[np.isinf(want)])
        np.testing.assert_array_max_ulp(got, want, maxulp=5)
    assert N.erfc(np.float64(0.5)).shape == () and N.erfc(x[:840000].reshape(10, -1)).shape == (10, 84000)


def test_erfc_sliced_path_is_bit_identical():
    """`erfc(x, increasing=True)`: sorted input takes contiguous slices, the rest (unsorted,
    NaN, 2-d) the general path; every value equals the general path's, bit for bit."""

    x = _points()
    finite = np.sort(x[~np.isnan(x)])
    for a in (finite, finite[(finite > -1.5) & (finite < 1.5)], finite[finite >= 8.0], np.array([-8.0, -1.0, 1.0, 8.0]),
              x, x[:840000].reshape(10, -1), np.array([2.0])):
        np.testing.assert_array_equal(N.erfc(a, increasing=True), N.erfc(a))


def test_next_fast_len_equals_scipy():
    import scipy.fft

    rng = np.random.default_rng(1)
    for n in [*range(1, 5000), *map(int, rng.integers(5000, 10**8, 500))]:
        assert N.next_fast_len(n) == scipy.fft.next_fast_len(n, real=True), n


@pytest.mark.parametrize("q,sigma", [(0.08192, 10.0), (0.02048, 0.6867), (0.001, 0.5), (0.5, 1.0), (0.99, 3.0),
                                     (1e-4, 50.0), (0.3, 0.3), (1.0, 2.0)])
def test_rdp_equals_prv_accountant(q, sigma):
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    ours = N.poisson_gaussian_rdp(q, sigma, RDP_ORDERS)
    theirs = [float(PoissonSubsampledGaussianMechanism(q, sigma).rdp(a)) for a in RDP_ORDERS]
    # The fractional orders' series cancels: where the RDP is ~1e-12 both lose digits, equally.
    np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-15)


def test_rdp_against_a_high_precision_integral():
    """A_alpha = E_{N(0, s^2)}[(mu(z) / mu0(z))^alpha] by mpmath at 40 digits: the slowly
    converging series at a fractional order (4,000 terms at q 0.5, order 1.1) is right; a
    subnormal erfc in its tail once made it wrong in the 6th digit."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    for q, s, a in [(0.5, 1.0, 1.1), (0.08192, 10.0, 1.5), (0.02048, 0.6867, 7.0)]:
        q_, s_, a_ = mp.mpf(q), mp.mpf(s), mp.mpf(a)
        ratio = lambda z: ((1 - q_) * mp.npdf(z, 0, s_) + q_ * mp.npdf(z, 1, s_)) / mp.npdf(z, 0, s_)  # noqa: E731
        big_a = mp.quad(lambda z: mp.npdf(z, 0, s_) * ratio(z) ** a_, [-mp.inf, -10 * s_, 0, 1, 10 * s_, mp.inf])
        assert N.poisson_gaussian_rdp(q, s, [a])[0] == pytest.approx(float(mp.log(big_a) / (a_ - 1)), rel=1e-9)


def test_integrate_is_exact_on_known_integrals():
    exp = N.integrate(np.exp, [(0.0, 1.0), (1.0, 1.0), (-3.0, 2.0), (0.0, 1.0)])
    np.testing.assert_allclose(exp, [math.e - 1, 0.0, math.exp(2) - math.exp(-3), math.e - 1], rtol=0, atol=1e-14)
    assert N.integrate(lambda t: np.where(t < 0.3, 0.0, 1.0), [(0.0, 1.0)])[0] == pytest.approx(0.7, abs=1e-13)
    assert N.integrate(np.sin, [(0.0, 100 * math.pi)])[0] == pytest.approx(0.0, abs=1e-13)


@pytest.mark.parametrize("q,sigma,L", [(0.08192, 10.0, 19.0), (0.02048, 0.6867, 3.0), (0.3, 0.3, 19.0),
                                       (0.001, 0.5, 3.0)])
@pytest.mark.filterwarnings("ignore:The occurrence of roundoff")
def test_truncated_mean_equals_a_tight_quad(q, sigma, L):
    """The mean's integrals equal scipy.integrate.quad at tight tolerances (to ~1e-14), and
    prv-accountant's default-tolerance quad to its ~1e-9."""
    from prv_accountant.privacy_random_variables import PrivacyRandomVariableTruncated
    from scipy import integrate

    prv = _FastPoissonGaussianPRV(q, sigma)
    ours = _Truncated(prv, -L, L)
    theirs = PrivacyRandomVariableTruncated(prv, -L, L)
    points = [-L, *_Truncated._POINTS, L]
    tight = sum(float(hi * theirs.cdf(hi) - lo * theirs.cdf(lo))
                - integrate.quad(theirs.cdf, lo, hi, limit=5000, epsabs=1e-15, epsrel=1e-14)[0]
                for lo, hi in zip(points[:-1], points[1:]))
    assert ours.mean() == pytest.approx(tight, abs=1e-13)
    assert ours.mean() == pytest.approx(theirs.mean(), abs=1e-8)
    assert ours.remaining_mass == theirs.remaining_mass
    t = np.linspace(-L - 1, L + 1, 1001)
    np.testing.assert_array_equal(ours.cdf(t), theirs.cdf(t))


def test_one_step_over_the_target_is_zero_steps_under_prv():
    assert steps_for(target_epsilon=0.1, delta=1e-5, noise_multiplier=0.6, sample_rate=0.5) == 0
    assert steps_for(target_epsilon=50.0, delta=1e-5, noise_multiplier=0.6, sample_rate=0.5) >= 1


def test_a_budget_query_imports_no_scipy(tmp_path):
    """`dpwa ledger remaining --sigma` (the README's query) runs on numpy alone: scipy's
    imports took longer than the accounting itself."""
    from accounting import Ledger, PoissonGaussian, fingerprint

    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ledger.set_budget("cifar10", epsilon=10.0, delta=1e-5, size=50000)
    event = PoissonGaussian(noise_multiplier=10.0, sample_rate=0.08192, steps=875)
    ledger.reserve(run_id="r", dataset="cifar10", fingerprint=fingerprint(range(50000)), events=[event])
    ledger.commit("r", [event])
    ledger.close()
    probe = ("import sys, runpy; sys.argv = ['dpwa', 'ledger', 'remaining', '--dataset', 'cifar10', '--sigma', '10', "
             "'--sample-rate', '0.08192']\ntry:\n    runpy.run_module('dpwa', run_name='__main__')\nexcept SystemExit as e:\n"
             "    assert not e.code, e.code\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PATH": "/usr/bin:/bin", "DPWA_LEDGER": str(path), "DPWA_ACCOUNTING_CACHE": "off",
                              "HOME": str(tmp_path)})
    assert "steps allowed" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]", out.stdout
