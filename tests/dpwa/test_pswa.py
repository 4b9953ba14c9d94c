"""Periodic SWA (method.name=pswa): DP-SGD restarted from the running average of its iterates
every pswa_period steps, with fresh momentum; the releases of DP-SGD."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from accounting import Ledger
from dpwa.cli import main
from dpwa.config import ConfigError, load_config
from dpwa.evaluate import metrics
from dpwa.mechanism import Release
from dpwa.methods import METHODS, Step, make_method
from dpwa.run_folder import load_run
from dpwa.train import train
from tests.conftest import ledger_snapshot
from tests.dpwa.test_train import final_weights, tiny

GRADS = [torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]]), torch.tensor([[-1.0, 0.0]]),
         torch.tensor([[2.0, 1.0]]), torch.tensor([[0.0, -1.0]]), torch.tensor([[1.0, 1.0]]),
         torch.tensor([[-0.5, 2.0]]), torch.tensor([[1.5, -0.5]])]


def reference(w, lr, momentum, start, period, restarts):
    """SGD with heavy-ball momentum; after `start`, the mean of the iterates since the last
    restart (a direct mean of a list); every `period` of them, restart there with no momentum."""
    buf, since, out = None, [], []
    for t, g in enumerate(GRADS):
        buf = g.clone() if buf is None else momentum * buf + g
        w = w - lr * buf
        done = t + 1
        if done > start:
            since.append(w)
            rounds, rest = divmod(done - start, period)
            if rest == 0 and (restarts == 0 or rounds <= restarts):
                w, buf, since = torch.stack(since).mean(0), None, []
        out.append((w, torch.stack(since).mean(0) if since else None))
    return out


@pytest.mark.parametrize("restarts", [0, 1])
def test_restarts_from_the_average_of_the_iterates_with_fresh_momentum(restarts):
    model = nn.Linear(2, 1, bias=False)
    w0 = torch.tensor([[1.0, 2.0]])
    with torch.no_grad():
        model.weight.copy_(w0)
    cfg = load_config(None, ["method.name=pswa", "method.pswa_start=1", "method.pswa_period=3",
                             f"method.pswa_restarts={restarts}", "optim.lr=0.1", "optim.momentum=0.5",
                             "privacy.epsilon=1", "train.steps=8"])
    method = make_method(cfg, model)
    expected = reference(w0, 0.1, 0.5, start=1, period=3, restarts=restarts)
    for t, g in enumerate(GRADS):
        stats = method.step(Step(index=t, lr=0.1, release=lambda g=g: Release({model.weight: g}, 0.0, 0)))
        w, average = expected[t]
        torch.testing.assert_close(model.weight.detach(), w)
        assert stats["pswa_averaged"] == method.count
        if average is None:
            assert method.average is None and method.count == 0
        else:
            torch.testing.assert_close(method.average[0], average)
    # restarts after iterates 4 and 7 (PSWA), or only after 4 (DSWA: then averaging to the end)
    assert method.count == (1 if restarts == 0 else 4)
    fresh = make_method(cfg, model)
    fresh.load_state_dict(method.state_dict())
    torch.testing.assert_close(fresh.average[0], method.average[0])
    assert fresh.count == method.count


def test_releases_as_many_gradients_as_dpsgd_and_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    cfg = load_config(None, ["method.name=pswa", "privacy.epsilon=1", "train.steps=10"])
    assert METHODS["pswa"].releases(cfg, 10) == METHODS["dpsgd"].releases(cfg, 10) == 10
    pswa = ["method.name=pswa", "method.pswa_start=1", "method.pswa_period=5", "optim.momentum=0.9"]
    runs = {}
    for name, extra in (("dpsgd", ["optim.momentum=0.9"]), ("pswa", pswa)):
        led = tmp_path / f"{name}.sqlite"
        runs[name] = train(tiny(tmp_path / name, *extra), ledger_path=str(led), progress=False)
        runs[name]["spent"] = Ledger(str(led)).run(runs[name]["run_id"]).spent
    assert runs["pswa"]["releases"] == runs["dpsgd"]["releases"] == 12
    assert runs["pswa"]["spent"] == runs["dpsgd"]["spent"] and runs["pswa"]["epsilon"] == runs["dpsgd"]["epsilon"]

    # restarts after iterates 6 and 11; killed at step 10, it resumes from the checkpoint of step 8,
    # two iterates into an average and with momentum built since the restart
    led = str(tmp_path / "b.sqlite")
    stopped = train(tiny(tmp_path / "b", *pswa), ledger_path=led, progress=False, stop_after=10)
    saved = final_weights(stopped["run_dir"])
    assert saved["step"] == 8 and saved["method"]["count"] == 2
    resumed = train(resume=Path(stopped["run_dir"]), ledger_path=led, progress=False)
    a, b = final_weights(runs["pswa"]["run_dir"]), final_weights(resumed["run_dir"])
    assert a["method"]["count"] == b["method"]["count"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for x, y in zip(a["method"]["average"], b["method"]["average"]):
        assert torch.equal(x, y)
    assert Ledger(led).run(resumed["run_id"]).spent == runs["pswa"]["spent"]
    a_dpsgd = final_weights(runs["dpsgd"]["run_dir"])["model"]
    assert any(not torch.equal(v, a["model"][k]) for k, v in a_dpsgd.items())  # the restarts changed the path


def test_dpwa_eval_gives_the_average_since_the_last_restart_for_free(tmp_path, capsys):
    """DSWA (R = 1): restart after iterate 6, then the average of iterates 7..12 is the method's
    output; the last iterate (raw) is a DP-SGD iterate. PSWA ending on a restart keeps no average."""
    led = str(tmp_path / "ledger.sqlite")
    dswa = train(tiny(tmp_path / "dswa", "method.name=pswa", "method.pswa_start=1", "method.pswa_period=5",
                      "method.pswa_restarts=1"), ledger_path=led, progress=False)
    state = final_weights(dswa["run_dir"])["method"]
    assert state["count"] == 6
    before = ledger_snapshot(led)
    assert main(["eval", dswa["run_dir"], "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["methods"]
    assert ledger_snapshot(led) == before  # post-processing: no charge
    run = load_run(Path(dswa["run_dir"]))
    average = copy.deepcopy(run.model).eval()
    with torch.no_grad():
        for p, a in zip([p for p in average.parameters() if p.requires_grad], state["average"]):
            p.copy_(a)
        probs = average(run.data.normalize(run.data.test.x)).softmax(1)
    assert got["pswa"] == pytest.approx({**metrics(probs, run.data.test.y), "members": 1}, rel=1e-5)
    assert got["pswa"] != got["raw"]

    pswa = train(tiny(tmp_path / "pswa", "method.name=pswa", "method.pswa_start=2", "method.pswa_period=5"),
                 ledger_path=led, progress=False)  # restarts after iterates 7 and 12: ends on one
    assert main(["eval", pswa["run_dir"], "--methods", "pswa"]) == 2
    assert "pswa: not kept by this run (needs method.name=pswa, and an iterate averaged" in capsys.readouterr().err
    assert main(["eval", pswa["run_dir"], "--json"]) == 0
    assert "pswa" not in json.loads(capsys.readouterr().out)["methods"]


def test_pswa_fields_belong_to_pswa():
    with pytest.raises(ConfigError, match="method.pswa_period is for method.name=pswa"):
        load_config(None, ["method.pswa_period=5", "privacy.epsilon=1", "train.steps=2"])
    with pytest.raises(ConfigError, match="method.pswa_period must be >= 1, got 0"):
        load_config(None, ["method.name=pswa", "method.pswa_period=0", "privacy.epsilon=1", "train.steps=2"])


def test_more_restarts_than_the_run_holds_are_refused():
    """R restarts every P steps after the start need start + R P < steps, or the last round of
    averaging (DSWA's output) never starts and no pswa model is released."""
    from dpwa.methods import METHODS

    def problems(restarts):
        cfg = load_config(None, ["method.name=pswa", "method.pswa_start=2", "method.pswa_period=3",
                                 f"method.pswa_restarts={restarts}", "privacy.epsilon=1", "train.steps=12"])
        return METHODS["pswa"].length_problems(cfg, 12)

    assert problems(0) == problems(3) == []  # 2 + 9 = 11 < 12: one step of the last round
    (why,) = problems(4)
    assert "method.pswa_restarts=4" in why and "need more than 14 steps, and the run has 12" in why
