"""DP-SAT (method.name=dpsat): the same releases as DP-SGD, taken at the weights moved rho
along the previous released gradient (rho > 0: at 0 it would be DP-SGD)."""


import pytest
import torch
import torch.nn as nn

from accounting import Ledger
from dpwa.config import ConfigError, load_config
from dpwa.mechanism import Release
from dpwa.methods import METHODS, Step, make_method
from dpwa.train import train
from tests.dpwa.test_train import tiny


def test_releases_as_many_gradients_as_dpsgd(tmp_path):
    cfg = load_config(None, ["method.name=dpsat", "method.rho=0.05", "train.steps=10", "privacy.epsilon=1"])
    assert METHODS["dpsat"].releases(cfg, 10) == METHODS["dpsgd"].releases(cfg, 10) == 10
    reports = {}
    for name, extra in (("dpsgd", []), ("dpsat", ["method.name=dpsat", "method.rho=0.05"])):
        led = tmp_path / f"{name}.sqlite"
        reports[name] = train(tiny(tmp_path / name, *extra), ledger_path=str(led), progress=False)
        reports[name]["spent"] = Ledger(str(led)).run(reports[name]["run_id"]).spent
    assert reports["dpsat"]["releases"] == reports["dpsgd"]["releases"] == 12
    assert reports["dpsat"]["spent"] == reports["dpsgd"]["spent"]
    assert reports["dpsat"]["epsilon"] == reports["dpsgd"]["epsilon"]


def test_the_release_is_taken_at_the_ascended_weights_and_the_step_from_the_original():
    """A scripted mechanism: the release records where it was asked and returns set gradients."""
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    cfg = load_config(None, ["method.name=dpsat", "method.rho=0.5", "optim.lr=0.1", "privacy.epsilon=1", "train.steps=2"])
    method = make_method(cfg, model)
    asked, grads = [], [torch.tensor([[3.0, 0.0, 4.0]]), torch.tensor([[1.0, 1.0, 1.0]])]

    def release():
        asked.append(model.weight.detach().clone())
        return Release({model.weight: grads[len(asked) - 1]}, 0.0, 0)

    method.step(Step(index=0, lr=0.1, release=release))  # no previous gradient: no ascent
    torch.testing.assert_close(asked[0], torch.tensor([[1.0, 2.0, 3.0]]))
    w1 = torch.tensor([[1.0, 2.0, 3.0]]) - 0.1 * grads[0]
    torch.testing.assert_close(model.weight.detach(), w1)
    method.step(Step(index=1, lr=0.1, release=release))
    torch.testing.assert_close(asked[1], w1 + 0.5 * grads[0] / 5.0)  # rho g_prev / ||g_prev||, ||(3,0,4)|| = 5
    torch.testing.assert_close(model.weight.detach(), w1 - 0.1 * grads[1])  # stepped from w1, not the ascent
    state = method.state_dict()
    fresh = make_method(cfg, model)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.previous[0], grads[1])


def test_rho_belongs_to_dpsat():
    with pytest.raises(ConfigError, match="method.rho is for method.name=dpsat"):
        load_config(None, ["method.rho=0.1", "privacy.epsilon=1", "train.steps=2"])
    with pytest.raises(ConfigError, match="method.rho must be >= 0"):
        load_config(None, ["method.name=dpsat", "method.rho=-1", "privacy.epsilon=1", "train.steps=2"])
    with pytest.raises(ConfigError, match="method.name=dpsat needs method.rho > 0 .* at method.rho=0 it is DP-SGD"):
        load_config(None, ["method.name=dpsat", "privacy.epsilon=1", "train.steps=2"])  # the default rho, 0


def test_a_resumed_run_keeps_the_previous_gradient_on_the_parameters_device():
    """Checkpoints load on the CPU; the ascent adds `previous` to the parameters in place, which
    fails across devices (a CUDA run could not resume). A meta-device model stands in for the GPU."""
    cfg = load_config(None, ["method.name=dpsat", "method.rho=0.5", "optim.lr=0.1", "privacy.epsilon=1", "train.steps=2"])
    model = nn.Linear(3, 1, bias=False)
    method = make_method(cfg, model)
    method.step(Step(index=0, lr=0.1, release=lambda: Release({model.weight: torch.ones(1, 3)}, 0.0, 0)))
    on_meta = make_method(cfg, nn.Linear(3, 1, bias=False).to("meta"))
    on_meta.load_state_dict(method.state_dict())
    assert [g.device.type for g in on_meta.previous] == ["meta"]
