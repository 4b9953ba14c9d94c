import pytest

from accounting import Gaussian, InvalidParameterError, PoissonGaussian, event_from_dict, merge


def test_round_trip():
    e = PoissonGaussian(noise_multiplier=3.0, sample_rate=0.08192, steps=2468)
    assert event_from_dict(e.to_dict()) == e
    g = Gaussian(noise_multiplier=20.0, count=3)
    assert event_from_dict(g.to_dict()) == g


def test_keyword_only():
    with pytest.raises(TypeError):
        PoissonGaussian(3.0, 0.1, 10)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(noise_multiplier=0.0, sample_rate=0.1, steps=1), "noise_multiplier=0.0"),
    (dict(noise_multiplier=-1.0, sample_rate=0.1, steps=1), "noise_multiplier=-1.0"),
    (dict(noise_multiplier=float("nan"), sample_rate=0.1, steps=1), "noise_multiplier=nan"),
    (dict(noise_multiplier=float("inf"), sample_rate=0.1, steps=1), "noise_multiplier=inf"),
    (dict(noise_multiplier=1.0, sample_rate=0.0, steps=1), "sample_rate=0.0"),
    (dict(noise_multiplier=1.0, sample_rate=1.5, steps=1), "sample_rate=1.5"),
    (dict(noise_multiplier=1.0, sample_rate=-0.1, steps=1), "sample_rate=-0.1"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, steps=-1), "steps=-1"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, steps=2.5), "2.5"),
    (dict(noise_multiplier="3", sample_rate=0.1, steps=1), "'3'"),
    (dict(noise_multiplier=True, sample_rate=0.1, steps=1), "True"),
])
def test_validation_names_the_value(kwargs, needle):
    with pytest.raises(InvalidParameterError, match=None) as info:
        PoissonGaussian(**kwargs)
    assert needle in str(info.value)


def test_noise_below_the_floor_is_refused_and_at_the_floor_no_accountant_undercounts():
    """Near sigma = 1e-153 dp-accounting's subsampled-Gaussian RDP overflows into NaN and wrong
    finite values: an RDP bound of 0. Such events cannot be made; at the floor every accountant
    gives a huge epsilon or says it cannot."""
    from accounting import AccountantFailedError, MIN_NOISE_MULTIPLIER, epsilon

    for make in (lambda s: PoissonGaussian(noise_multiplier=s, sample_rate=0.01, steps=10),
                 lambda s: Gaussian(noise_multiplier=s, count=3)):
        with pytest.raises(InvalidParameterError, match="noise_multiplier=1e-153"):
            make(1e-153)
        for accountant in ("rdp", "prv", "pld"):
            try:
                assert epsilon([make(MIN_NOISE_MULTIPLIER)], delta=1e-5, accountant=accountant) > 1e100
            except AccountantFailedError:
                pass


def test_gaussian_validation():
    with pytest.raises(InvalidParameterError, match="count=-2"):
        Gaussian(noise_multiplier=1.0, count=-2)


@pytest.mark.parametrize("data", [{"kind": "laplace", "b": 1}, {"kind": "gaussian", "noise_multiplier": 1.0,
                                                                  "extra": 1}, "nonsense", {"noise_multiplier": 1}])
def test_from_dict_rejects_bad_data(data):
    with pytest.raises(InvalidParameterError):
        event_from_dict(data)


def test_merge_groups_identical_mechanisms_and_drops_empty():
    a = PoissonGaussian(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    b = PoissonGaussian(noise_multiplier=2.0, sample_rate=0.1, steps=3)
    merged = merge([a, b, a.with_count(7), b.with_count(0), Gaussian(noise_multiplier=5.0, count=0)])
    assert merged == [a.with_count(12), b]


def test_sample_rate_one_is_the_gaussian_mechanism():
    merged = merge([PoissonGaussian(noise_multiplier=2.0, sample_rate=1.0, steps=4),
                    Gaussian(noise_multiplier=2.0, count=1)])
    assert merged == [Gaussian(noise_multiplier=2.0, count=5)]
