"""Averagers against their definitions: EMA's warm-up, Polyak and SWA are arithmetic means of
the collected iterates, FGE collects exactly at the cycle minima, SWAG samples have the
mean and covariance of Maddox et al.'s formula, and every averager resumes exactly."""

import pytest
import torch
import torch.nn as nn

from dpwa.averaging import EMA, SWA, SWAG, AtMinima, Every, Polyak, Snapshots, make_averagers
from dpwa.config import AveragingConfig, ConfigError, OptimConfig
from dpwa.schedules import Schedule


def iterates(n, seed=0, shape=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def model_with(weight):
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        m.weight.copy_(weight)
    return m


def feed(averager, ws, model=None, first=1):
    """Hand the averager iterate t = first, first + 1, ... (the loop's `done` count)."""
    model = model or model_with(ws[0])
    for t, w in enumerate(ws, start=first):
        with torch.no_grad():
            model.weight.copy_(w)
        averager.update(model, t)
    return model


def test_polyak_is_the_arithmetic_mean_after_start():
    ws = iterates(7)
    avg = Polyak(model_with(ws[0]), start=2)
    feed(avg, ws)
    assert torch.allclose(avg.model.weight, torch.stack(ws[2:]).mean(0), atol=1e-6) and avg.count == 5


def test_swa_equals_the_mean_of_the_collected_iterates():
    ws = iterates(20)
    avg = SWA(model_with(ws[0]), rule=Every(start=6, every=3))
    feed(avg, ws)
    collected = [w for t, w in enumerate(ws, start=1) if t > 6 and (t - 6) % 3 == 0]  # iterates 9, 12, ..., 18
    assert len(collected) == 4 and avg.count == 4
    assert torch.allclose(avg.model.weight, torch.stack(collected).mean(0), atol=1e-6)


def test_ema_warmup_matches_de_et_al():
    ws = iterates(30)
    ema = EMA(model_with(ws[0]), decay=0.9)
    ref = ws[0].clone()
    for t, w in enumerate(ws):
        d = min(0.9, (1 + t) / (10 + t))
        ref = d * ref + (1 - d) * w
    feed(ema, ws)
    assert torch.allclose(ema.model.weight, ref, atol=1e-6)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1000) == 0.9


@pytest.mark.parametrize("optim", [
    OptimConfig(lr=1.0, min_lr=0.1, schedule="cyclic", cycle_start=4, cycle_length=6),
    OptimConfig(lr=1.0, min_lr=0.0, schedule="sgdr", sgdr_t0=3, cycle_mult=2),
])
def test_fge_collects_exactly_at_cycle_minima(optim):
    steps = 19 if optim.schedule == "cyclic" else 21
    sched = Schedule(optim, steps)
    ws = iterates(steps)
    fge = Snapshots(model_with(ws[0]), rule=AtMinima(sched.is_minimum))
    feed(fge, ws)
    lowest = [t for t in range(1, steps + 1) if sched(t - 1) == min(sched(s) for s in range(steps))]
    assert fge.steps == sched.minima() == lowest  # the iterates made with the lowest lr, and only those
    assert fge.steps == ([7, 13, 19] if optim.schedule == "cyclic" else [3, 9, 21])
    for t, v in zip(fge.steps, fge.vectors):
        assert torch.equal(v, ws[t - 1].flatten())
    members = [m.weight.clone() for m in fge.members()]
    assert all(torch.equal(a, ws[t - 1]) for a, t in zip(members, fge.steps))


def test_swag_diagonal_samples_have_the_iterates_mean_and_std():
    # Iterates with known per-coordinate mean and std 2: SWAG-Diagonal is N(mean, Sigma_diag) (Maddox et
    # al. 2019), so a sample has std 2, whatever full SWAG's scale; not sqrt(0.5) * 2 = 1.41 (the scale of
    # full SWAG applied to its diagonal term alone) nor 4 (the variance taken for the std).
    torch.manual_seed(0)
    mu, sd = torch.tensor([[1.0, -3.0], [0.5, 10.0]]), 2.0
    ws = [mu + sd * torch.randn(2, 2) for _ in range(4000)]
    swag = SWAG(model_with(ws[0]), rule=Every(0, 1), rank=5, scale=0.5)
    feed(swag, ws)
    assert torch.allclose(swag.mean.view(2, 2), torch.stack(ws).mean(0), atol=1e-4)
    assert torch.allclose(swag.variance, torch.stack(ws).view(4000, -1).var(0, unbiased=False), rtol=1e-3)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([swag.sample(g, diagonal=True) for _ in range(4000)])
    assert torch.allclose(draws.mean(0), mu.flatten(), atol=0.1)
    assert torch.allclose(draws.std(0), torch.full((4,), sd), rtol=0.04)


def test_swag_low_rank_samples_have_maddox_covariance():
    ws = iterates(12, seed=3, shape=(2, 2))
    swag = SWAG(model_with(ws[0]), rule=Every(0, 1), rank=4, scale=0.5)
    feed(swag, ws)
    flat = torch.stack([w.flatten() for w in ws])
    # the deviation rows are the last 4 iterates minus the running mean at their time
    running = [flat[:i + 1].mean(0) for i in range(12)]
    expected_rows = torch.stack([flat[i] - running[i] for i in range(8, 12)])
    assert torch.allclose(swag.deviations[[0, 1, 2, 3]].sort(0).values, expected_rows.sort(0).values, atol=1e-6)
    d = expected_rows
    cov = 0.5 * (torch.diag(flat.var(0, unbiased=False)) + d.T @ d / 3)  # scale (diag + D D^T / (K - 1))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([swag.sample(g) for _ in range(40000)]).double()
    assert torch.allclose(draws.mean(0), flat.mean(0).double(), atol=0.02)
    assert torch.allclose(torch.cov(draws.T), cov.double(), atol=0.02)


def test_swag_stores_a_low_rank_factor_only():
    m = nn.Linear(100, 50)
    swag = SWAG(m, rule=Every(0, 1), rank=20)
    d = sum(p.numel() for p in m.parameters())
    assert swag.deviations.shape == (20, d)
    assert all(t.numel() <= 20 * d for t in swag.state_dict().values() if isinstance(t, torch.Tensor))


def test_swag_rank_below_two_is_refused():
    with pytest.raises(ValueError, match="rank >= 2"):
        SWAG(nn.Linear(2, 2), rule=Every(0, 1), rank=1)
    with pytest.raises(ConfigError, match="swag_rank must be >= 2"):
        AveragingConfig(swag=True, swag_rank=1)


def test_state_dict_round_trip_continues_exactly():
    ws = iterates(30)
    sched = Schedule(OptimConfig(lr=1.0, schedule="cyclic", cycle_length=4), 30)
    make = lambda w: [EMA(model_with(w), decay=0.95), Polyak(model_with(w), start=3),  # noqa: E731
                      SWA(model_with(w), rule=Every(2, 2)), Snapshots(model_with(w), rule=AtMinima(sched.is_minimum)),
                      SWAG(model_with(w), rule=AtMinima(sched.is_minimum), rank=3)]
    straight, first = make(ws[0]), make(ws[0])
    for a in straight:
        feed(a, ws)
    for a in first:
        feed(a, ws[:13])
    resumed = make(torch.zeros(3, 2))
    for a, b in zip(first, resumed):
        b.load_state_dict(a.state_dict())
        feed(b, ws[13:], first=14)
    for a, b in zip(straight, resumed):
        sa, sb = a.state_dict(), b.state_dict()
        for k in sa:
            va, vb = sa[k], sb[k]
            if isinstance(va, dict):
                assert all(torch.equal(va[x], vb[x]) for x in va), k
            elif isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), k
            else:
                assert va == vb, k


def test_make_averagers_refuses_starts_beyond_the_run():
    sched = Schedule(OptimConfig(lr=1.0), 50)
    m = nn.Linear(2, 2)
    kw = dict(total_steps=50, is_minimum=sched.is_minimum)
    with pytest.raises(ConfigError, match="polyak_start=50 is beyond the run"):
        make_averagers(AveragingConfig(polyak_start=50), m, **kw)
    with pytest.raises(ConfigError, match="swa_start=60 is beyond the run"):
        make_averagers(AveragingConfig(swa=True, swa_start=60, swa_every=1), m, **kw)
    with pytest.raises(ConfigError, match="SWAG needs at least 2"):
        make_averagers(AveragingConfig(swag=True, swa_start=40, swa_every=10), m, **kw)
    got = make_averagers(AveragingConfig(swa=True, swag=True, swa_start=30, swa_every=10), m, **kw)
    assert set(got) == {"ema", "polyak", "swa", "swag"}
