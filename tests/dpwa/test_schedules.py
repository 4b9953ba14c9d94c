"""Learning-rate schedules: each one's shape at its key points, the cycle minima where
snapshots are taken, and the refusal of cycles that do not fit the run."""

import pytest

from dpwa.config import ConfigError, OptimConfig
from dpwa.schedules import Schedule, constant, cosine, cyclic, sgdr, swa, warmup


def test_constant_warmup_cosine_key_points():
    assert constant(5, lr=2.0) == 2.0
    assert warmup(0, lr=2.0, warmup_steps=4) == 0.5
    assert warmup(3, lr=2.0, warmup_steps=4) == 2.0 and warmup(9, lr=2.0, warmup_steps=4) == 2.0
    assert cosine(9, lr=2.0, total_steps=10) == pytest.approx(0.0)
    assert cosine(9, lr=2.0, total_steps=10, final_fraction=0.1) == pytest.approx(0.2)
    assert cosine(4, lr=2.0, total_steps=10) == pytest.approx(1.0)  # halfway


def test_swa_schedule_constant_then_linear_decay_then_swa_lr():
    f = [swa(s, lr=1.0, swa_lr=0.1, swa_start=100) for s in range(200)]
    assert f[0] == f[49] == 1.0                     # t = (s + 1) / 100 <= 0.5: lr
    assert f[69] == pytest.approx(0.55)             # t = 0.7: halfway down the linear decay
    assert f[89] == pytest.approx(0.1)              # t = 0.9: reaches swa_lr
    assert all(v == 0.1 for v in f[90:])            # then constant at swa_lr, through the averaging phase
    assert all(a >= b - 1e-12 for a, b in zip(f, f[1:]))  # never increases


def test_cyclic_triangle_minimum_at_mid_cycle():
    f = [cyclic(s, lr=1.0, min_lr=0.2, cycle_length=10, cycle_start=5) for s in range(30)]
    assert f[:5] == [1.0] * 5                       # before the cycles: lr
    assert f[5 + 4] == pytest.approx(0.2)           # step c/2 of each cycle: min_lr
    assert f[5 + 9] == pytest.approx(1.0) and f[15 + 9] == pytest.approx(1.0)  # end of a cycle: back to lr
    assert f[5 + 1] == pytest.approx(1.0 - 0.8 * 0.4)  # linear on the way down
    assert f[5:15] == f[15:25]                      # periodic
    o = OptimConfig(lr=1.0, min_lr=0.2, schedule="cyclic", cycle_start=5, cycle_length=10)
    assert Schedule(o, 20).minima() == [10, 20]     # iterates 5 + 5 and 15 + 5: after the min-lr steps
    assert all(f[m - 1] == pytest.approx(0.2) for m in Schedule(o, 20).minima())


def test_sgdr_restarts_and_cycle_lengths_multiply():
    f = [sgdr(s, lr=1.0, min_lr=0.0, t0=4, t_mult=2) for s in range(28)]
    ends = [3, 11, 27]                              # cycles of 4, 8, 16 steps
    assert all(f[e] == pytest.approx(0.0) for e in ends)
    assert f[4] > 0.9 and f[12] > 0.9               # warm restarts
    assert f[1] == pytest.approx(0.5)               # halfway through the first cycle
    o = OptimConfig(lr=1.0, schedule="sgdr", sgdr_t0=4, cycle_mult=2)
    assert Schedule(o, 28).minima() == [4, 12, 28]


@pytest.mark.parametrize("overrides, steps, message", [
    (dict(schedule="cyclic", cycle_length=7), 35, "must be even"),
    (dict(schedule="cyclic", cycle_length=10), 27, "use train.steps=25"),
    (dict(schedule="cyclic", cycle_length=10, cycle_start=50), 40, "beyond the run"),
    (dict(schedule="sgdr", sgdr_t0=4, cycle_mult=2), 20, "use train.steps=12"),
])
def test_cycles_that_do_not_fit_the_run_are_refused(overrides, steps, message):
    with pytest.raises(ConfigError, match=message):
        Schedule(OptimConfig(lr=1.0, **overrides), steps)


def test_swa_schedule_needs_a_start_inside_the_run():
    o = OptimConfig(lr=1.0, swa_lr=0.1, schedule="swa")
    with pytest.raises(ConfigError, match="swa_start=100"):
        Schedule(o, 100, swa_start=100)
    assert Schedule(o, 100, swa_start=60)(99) == 0.1


def test_bad_schedule_values_are_refused_by_the_config():
    with pytest.raises(ConfigError, match="sgdr_t0"):
        OptimConfig(schedule="sgdr")
    with pytest.raises(ConfigError, match="min_lr"):
        OptimConfig(lr=1.0, min_lr=2.0)
    with pytest.raises(ConfigError, match="known|must be one of"):
        OptimConfig(schedule="step")


@pytest.mark.parametrize("overrides, steps, swa_start, needle, fits", [
    # a minimum inside the warmup is not at min_lr: FGE / SWA at minima would collect iterates at warmup lr
    (dict(schedule="cyclic", min_lr=0.1, cycle_length=4, warmup_steps=4), 10, 0,
     "optim.warmup_steps=4 overlaps the cyclic cycles, which start at optim.cycle_start=0", dict(cycle_start=4)),
    (dict(schedule="sgdr", min_lr=0.1, sgdr_t0=3, warmup_steps=3, cycle_start=2), 12, 0,
     "set optim.cycle_start >= 3 or optim.warmup_steps=0", dict(cycle_start=3)),
    (dict(schedule="swa", swa_lr=0.1, warmup_steps=8), 20, 10, "runs into the swa schedule's decay",
     dict(warmup_steps=5)),
])
def test_a_warmup_that_runs_into_the_schedule_is_refused(overrides, steps, swa_start, needle, fits):
    with pytest.raises(ConfigError, match=None) as info:
        Schedule(OptimConfig(lr=1.0, **overrides), steps, swa_start=swa_start)
    assert needle in str(info.value)
    Schedule(OptimConfig(lr=1.0, **{**overrides, **fits}), steps, swa_start=swa_start)  # the way out it names


@pytest.mark.parametrize("overrides, needle", [
    (dict(warmup_steps=5), "optim.warmup_steps is for optim.schedule=warmup / cosine / swa / cyclic / sgdr, not "
                           "'constant'"),
    (dict(schedule="warmup", final_lr_fraction=0.1), "optim.final_lr_fraction is for optim.schedule=cosine"),
    (dict(schedule="sgdr", sgdr_t0=1), "optim.sgdr_t0=1 with optim.cycle_mult=1 makes every step a one-step cycle"),
    (dict(nesterov=True), "optim.nesterov=true needs optim.momentum > 0"),
])
def test_fields_without_effect_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=None) as info:
        OptimConfig(lr=1.0, **overrides)
    assert needle in str(info.value)
