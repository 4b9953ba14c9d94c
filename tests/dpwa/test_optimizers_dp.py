"""DP-AdamBC (optim.name=adambc) and Padam (optim.name=padam): each against a hand-written
float64 reference and against torch's Adam / AdamW where it reduces to them; a run with either
releases exactly what DP-SGD releases (post-processing)."""

import copy

import pytest
import torch
import torch.nn as nn

import dpwa.train
from accounting import Ledger
from dpwa.config import ConfigError, OptimConfig, load_config
from dpwa.optimizers import make_optimizer
from dpwa.train import train
from tests.dpwa.test_train import tiny

STEPS = 20


def gradients(shape=(3, 4), steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def run(optimizer, w, grads, lrs=None):
    """The iterates of `optimizer` over `w` fed `grads` (lr set per step, as DPSGD does)."""
    out = []
    for t, g in enumerate(grads):
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs[t]
        w.grad = g.clone()
        optimizer.step()
        out.append(w.detach().clone())
    return out


def reference(w0, grads, *, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.0, noise_var=None, floor=1e-8, partial=None):
    """By hand: Adam's moments with decoupled weight decay; the denominator is DP-AdamBC's
    sqrt(max(v_hat - noise_var, floor)) + eps, or Padam's (max_s v_s / (1 - b2^t))^p + eps."""
    b1, b2 = betas
    w, m, v, v_max, out = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0), torch.zeros_like(w0), []
    for t, g in enumerate(grads, start=1):
        w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        if partial is None:
            denom = torch.sqrt(torch.clamp(v / (1 - b2 ** t) - noise_var, min=floor)) + eps
        else:
            v_max = torch.maximum(v_max, v)
            denom = (v_max / (1 - b2 ** t)) ** partial + eps
        w = w - lr * m_hat / denom
        out.append(w)
    return out


def param(seed=1):
    return nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adambc_without_noise_is_adam_w(wd):
    grads, lrs = gradients(), [0.01 * (1 - t / STEPS) for t in range(STEPS)]
    ours, theirs = param(), param()
    opt = make_optimizer(OptimConfig(name="adambc", lr=0.01, weight_decay=wd), [ours], noise_std=0.0)
    ref = torch.optim.AdamW([theirs], lr=0.01, weight_decay=wd) if wd else torch.optim.Adam([theirs], lr=0.01)
    for a, b in zip(run(opt, ours, grads, lrs), run(ref, theirs, grads, lrs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_adambc_subtracts_the_noise_variance():
    noise_std, grads = 0.8, gradients()
    w = param()
    opt = make_optimizer(OptimConfig(name="adambc", lr=0.01, weight_decay=0.05, adambc_floor=1e-3), [w],
                         noise_std=noise_std)
    expected = reference(param(), grads, lr=0.01, wd=0.05, noise_var=noise_std ** 2, floor=1e-3)
    for a, b in zip(run(opt, w, grads), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    v_hat = opt.state[w]["exp_avg_sq"] / (1 - 0.999 ** STEPS)
    assert 0 < int((v_hat - noise_std ** 2 < 1e-3).sum()) < w.numel()  # the floor binds for some coordinates only


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_padam_at_one_half_is_amsgrad_adam_w(wd):
    grads = gradients()
    ours, theirs = param(), param()
    opt = make_optimizer(OptimConfig(name="padam", lr=0.01, weight_decay=wd, partial=0.5), [ours])
    ref = torch.optim.AdamW([theirs], lr=0.01, weight_decay=wd, amsgrad=True)
    for a, b in zip(run(opt, ours, grads), run(ref, theirs, grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_padam_is_partially_adaptive():
    grads = [g * s for g, s in zip(gradients(), torch.linspace(2.0, 0.1, STEPS))]  # shrinking: v_max differs from v
    w = param()
    opt = make_optimizer(OptimConfig(name="padam", lr=0.05, weight_decay=0.01), [w])  # default p = 0.125
    expected = reference(param(), grads, lr=0.05, wd=0.01, partial=0.125)
    for a, b in zip(run(opt, w, grads), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["adambc", "padam"])
def test_state_round_trips(name):
    """A resumed optimizer continues exactly (checkpoints hold the optimizer state)."""
    grads = gradients()
    w, again = param(), param()
    cfg = OptimConfig(name=name, lr=0.01)
    opt = make_optimizer(cfg, [w], noise_std=0.5)
    run(opt, w, grads[:10])
    with torch.no_grad():
        again.copy_(w)
    fresh = make_optimizer(cfg, [again], noise_std=0.5)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint: no shared tensors
    for a, b in zip(run(opt, w, grads[10:]), run(fresh, again, grads[10:])):
        assert torch.equal(a, b)


def test_a_run_gets_the_public_noise_std(tmp_path, monkeypatch):
    seen = {}
    real = dpwa.train.make_method

    def spy(cfg, model, *, noise_std=0.0):
        seen["noise_std"] = noise_std
        return real(cfg, model, noise_std=noise_std)

    monkeypatch.setattr(dpwa.train, "make_method", spy)
    cfg = tiny(tmp_path, "optim.name=adambc", "optim.lr=0.01", "privacy.clip_norm=0.5")
    report = train(cfg, ledger_path=str(tmp_path / "l.sqlite"), progress=False, dry_run=True)
    assert seen["noise_std"] == pytest.approx(report["noise_multiplier"] * 0.5 / 64)  # sigma C / B
    train(tiny(tmp_path, "optim.name=adambc", "optim.lr=0.01", "privacy.clip_norm=0.5", "privacy.rescale_to_unit=true"),
          ledger_path=str(tmp_path / "l.sqlite"), progress=False, dry_run=True)
    assert seen["noise_std"] == pytest.approx(report["noise_multiplier"] / 64)  # sigma / B


def test_releases_as_many_gradients_as_dpsgd(tmp_path):
    reports = {}
    for name, extra in (("dpsgd", []), ("adambc", ["optim.name=adambc", "optim.lr=0.01"]),
                        ("padam", ["optim.name=padam", "optim.lr=0.01", "optim.weight_decay=0.01"])):
        led = tmp_path / f"{name}.sqlite"
        reports[name] = train(tiny(tmp_path / name, *extra), ledger_path=str(led), progress=False)
        reports[name]["spent"] = Ledger(str(led)).run(reports[name]["run_id"]).spent
    for name in ("adambc", "padam"):
        assert reports[name]["releases"] == reports["dpsgd"]["releases"] == 12
        assert reports[name]["spent"] == reports["dpsgd"]["spent"]
        assert reports[name]["epsilon"] == reports["dpsgd"]["epsilon"]


@pytest.mark.parametrize("overrides, message", [
    (["optim.partial=0.25"], "optim.partial is for optim.name=padam, not 'sgd'; got 0.25"),
    (["optim.name=adamw", "optim.partial=0.25"], "optim.partial is for optim.name=padam, not 'adamw'"),
    (["optim.name=padam", "optim.partial=0.75"], r"optim.partial must be in \(0, 0.5\], got 0.75"),
    (["optim.name=padam", "optim.partial=0"], r"optim.partial must be in \(0, 0.5\], got 0"),
    (["optim.name=adam", "optim.adambc_floor=1e-6"], "optim.adambc_floor is for optim.name=adambc, not 'adam'"),
    (["optim.name=adambc", "optim.adambc_floor=0"], "optim.adambc_floor must be > 0, got 0"),
    (["optim.name=padam", "optim.momentum=0.9"], "optim.momentum / optim.nesterov are for sgd"),
])
def test_fields_belong_to_their_optimizer(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*overrides, "privacy.epsilon=1", "train.steps=2"])
