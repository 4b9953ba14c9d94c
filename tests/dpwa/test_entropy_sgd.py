"""Entropy-SGD under DP (method.name=entropy_sgd): inner_steps Langevin steps per step, each
one release of the mechanism, then an outer step toward their average."""

import math

import pytest
import torch
import torch.nn as nn

from accounting import Ledger
from dpwa.config import ConfigError, load_config
from dpwa.mechanism import Release
from dpwa.methods import METHODS, Step, make_method
from dpwa.train import train
from tests.dpwa.test_train import tiny

ENTROPY = ["method.name=entropy_sgd", "method.inner_steps=2", "method.gamma=0.5", "method.scoping=0.1",
           "method.inner_lr=0.1", "method.inner_momentum=0.5", "method.mean_decay=0.75"]


def reference(x, grads, lr):
    """The Lua `optim.entropysgd` (momentum 0.9 -> 0.5 here, Nesterov, dampening 0, no L2, no
    extra noise), written out: returns the iterates and the points each gradient was taken at."""
    asked, out, queue = [], [], iter(grads)
    for t in range(2):
        gamma = 0.5 * 1.1 ** (t + 1)
        xp, mu, m = x.clone(), x.clone(), torch.zeros_like(x)
        for _ in range(2):
            asked.append(xp)
            g = next(queue)
            m = 0.5 * m + g
            d = g + 0.5 * m - gamma * (x - xp)
            xp = xp - 0.1 * d
            mu = 0.75 * mu + 0.25 * xp
        x = x - lr * (x - mu)
        out.append(x)
    return out, asked


def test_inner_langevin_steps_and_outer_step_match_the_reference():
    model = nn.Linear(3, 1, bias=False)
    x0 = torch.tensor([[1.0, 2.0, 3.0]])
    with torch.no_grad():
        model.weight.copy_(x0)
    cfg = load_config(None, [*ENTROPY, "optim.lr=0.5", "privacy.epsilon=1", "train.steps=2"])
    method = make_method(cfg, model)
    grads = [torch.tensor([[3.0, 0.0, 4.0]]), torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[-1.0, 2.0, 0.5]]),
             torch.tensor([[0.0, -3.0, 1.0]])]
    asked = []

    def release():
        asked.append(model.weight.detach().clone())
        return Release({model.weight: grads[len(asked) - 1]}, 0.0, 0)

    expected, expected_asked = reference(x0, grads, lr=0.5)
    for t in range(2):
        stats = method.step(Step(index=t, lr=0.5, release=release))
        torch.testing.assert_close(model.weight.detach(), expected[t])
        assert stats["entropy_gamma"] == pytest.approx(0.5 * 1.1 ** (t + 1))
    assert len(asked) == 4  # L releases per step, no discarded first query
    for a, b in zip(asked, expected_asked):
        torch.testing.assert_close(a, b)


def test_the_extra_langevin_noise_has_the_reference_scale_and_resumes_exactly():
    """Zero gradients, no coupling, one inner step, outer lr 1: x <- mu = x + (1 - b)(x' - x),
    x' - x = -eta' eps / sqrt(eta' / 2) xi, so the step has std (1 - b) eps sqrt(2 eta')."""
    model = nn.Linear(20_000, 1, bias=False)
    nn.init.zeros_(model.weight)
    cfg = load_config(None, ["method.name=entropy_sgd", "method.inner_steps=1", "method.gamma=0", "method.inner_lr=0.02",
                             "method.langevin_noise=0.01", "optim.lr=1", "privacy.epsilon=1", "train.steps=2"])
    method = make_method(cfg, model)
    zero = lambda: Release({model.weight: torch.zeros_like(model.weight)}, 0.0, 0)  # noqa: E731
    method.step(Step(index=0, lr=1.0, release=zero))
    std = float(model.weight.detach().std())
    assert std == pytest.approx(0.25 * 0.01 * math.sqrt(2 * 0.02), rel=0.03)
    state, w1 = method.state_dict(), model.weight.detach().clone()
    method.step(Step(index=1, lr=1.0, release=zero))
    w2 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.copy_(w1)
    fresh = make_method(cfg, model)
    fresh.load_state_dict(state)
    fresh.step(Step(index=1, lr=1.0, release=zero))
    assert torch.equal(model.weight.detach(), w2)


def test_the_ledger_holds_inner_steps_times_steps_releases(tmp_path):
    cfg = load_config(None, [*ENTROPY, "method.inner_steps=3", "privacy.epsilon=1", "train.steps=4"])
    assert METHODS["entropy_sgd"].releases(cfg, 4) == 12
    reports = {}
    for name, extra in (("dpsgd", []), ("entropy_sgd", ["method.name=entropy_sgd", "method.inner_steps=3",
                                                         "train.steps=4"])):
        led = tmp_path / f"{name}.sqlite"
        reports[name] = train(tiny(tmp_path / name, *extra), ledger_path=str(led), progress=False)
        reports[name]["spent"] = Ledger(str(led)).run(reports[name]["run_id"]).spent
    entropy, dpsgd = reports["entropy_sgd"], reports["dpsgd"]  # 4 steps x 3 releases against 12 steps x 1
    assert entropy["releases"] == dpsgd["releases"] == 12 and entropy["spent"][0].steps == 12
    assert entropy["spent"] == dpsgd["spent"]  # the noise is calibrated for the 12 releases
    assert entropy["epsilon"] == dpsgd["epsilon"]
    # the per-example gradient budget counts every inner release
    assert entropy["expected_per_example_gradient_evaluations"] == dpsgd["expected_per_example_gradient_evaluations"]


def test_entropy_sgd_fields_belong_to_entropy_sgd():
    with pytest.raises(ConfigError, match="method.inner_steps is for method.name=entropy_sgd, not 'pswa'"):
        load_config(None, ["method.name=pswa", "method.inner_steps=5", "privacy.epsilon=1", "train.steps=2"])
    with pytest.raises(ConfigError, match="method.inner_steps must be >= 1, got 0"):
        load_config(None, ["method.name=entropy_sgd", "method.inner_steps=0", "privacy.epsilon=1", "train.steps=2"])
    with pytest.raises(ConfigError, match="method.langevin_noise must be >= 0"):
        load_config(None, ["method.name=entropy_sgd", "method.langevin_noise=-1", "privacy.epsilon=1",
                           "train.steps=2"])
