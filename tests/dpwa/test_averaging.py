import pytest
import torch
import torch.nn as nn

from dpwa.averaging import EMA, Polyak
from dpwa.schedules import constant, cosine, lr_at, warmup


def iterates(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, generator=g) for _ in range(n)]


def model_with(weight):
    m = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        m.weight.copy_(weight)
    return m


def test_polyak_is_the_arithmetic_mean_from_start():
    ws = iterates(7)
    m = model_with(ws[0])
    avg = Polyak(m, start=2)
    for t, w in enumerate(ws):
        with torch.no_grad():
            m.weight.copy_(w)
        avg.update(m, t)
    assert torch.allclose(avg.model.weight, torch.stack(ws[2:]).mean(0), atol=1e-6)


def test_ema_warmup_matches_de_et_al():
    ws = iterates(30)
    m = model_with(ws[0])
    ema = EMA(m, decay=0.9)
    ref = ws[0].clone()
    for t, w in enumerate(ws):
        with torch.no_grad():
            m.weight.copy_(w)
        ema.update(m)
        d = min(0.9, (1 + t) / (10 + t))
        ref = d * ref + (1 - d) * w
    assert torch.allclose(ema.model.weight, ref, atol=1e-6)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1000) == 0.9


def test_state_dict_round_trip_continues_exactly():
    ws = iterates(10)
    m = model_with(ws[0])
    a, b = EMA(m, decay=0.95), Polyak(m)
    for t, w in enumerate(ws[:5]):
        with torch.no_grad():
            m.weight.copy_(w)
        a.update(m)
        b.update(m, t)
    a2, b2 = EMA(model_with(torch.zeros(3, 2)), decay=0.95), Polyak(model_with(torch.zeros(3, 2)))
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    for t, w in enumerate(ws[5:], start=5):
        with torch.no_grad():
            m.weight.copy_(w)
        for x, y in ((a, a2), (b, b2)):
            x.update(m) if isinstance(x, EMA) else x.update(m, t)
            y.update(m) if isinstance(y, EMA) else y.update(m, t)
    assert torch.equal(a.model.weight, a2.model.weight) and torch.equal(b.model.weight, b2.model.weight)


def test_schedules_key_points():
    assert constant(5, lr=2.0, total_steps=10) == 2.0
    assert warmup(0, lr=2.0, total_steps=10, warmup_steps=4) == 0.5
    assert warmup(3, lr=2.0, total_steps=10, warmup_steps=4) == 2.0
    assert warmup(9, lr=2.0, total_steps=10, warmup_steps=4) == 2.0
    assert cosine(9, lr=2.0, total_steps=10) == pytest.approx(0.0)
    assert cosine(9, lr=2.0, total_steps=10, final_fraction=0.1) == pytest.approx(0.2)
    assert cosine(4, lr=2.0, total_steps=10) == pytest.approx(1.0)  # halfway
    with pytest.raises(ValueError, match="known schedules"):
        lr_at("step", 0, lr=1.0, total_steps=1)
