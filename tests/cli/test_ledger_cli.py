import json

import pytest

from accounting import Ledger, PoissonGaussian, fingerprint
from dpwa.cli import main

FP = fingerprint(range(1000))


def cli_json(capsys, *args):
    code = main(["ledger", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out) if captured.out.strip() else None


@pytest.fixture
def filled(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.set_budget("cifar10", epsilon=8.0, delta=1e-5, size=1000)
    a = PoissonGaussian(noise_multiplier=10.0, sample_rate=0.08192, steps=875)
    ledger.reserve(run_id="a", dataset="cifar10", fingerprint=FP, events=[a])
    ledger.commit("a", [a])
    ledger.reserve(run_id="b", dataset="cifar10", fingerprint=FP,
                   events=[PoissonGaussian(noise_multiplier=6.0, sample_rate=0.02, steps=1000)])
    return ledger_path


def test_show(capsys, filled):
    out = cli_json(capsys, "show")
    (d,) = out["datasets"]
    assert d["name"] == "cifar10" and [r["run_id"] for r in d["runs"]] == ["a", "b"]
    assert d["epsilon_spent"] == pytest.approx(Ledger(filled).spent("cifar10"))
    assert d["epsilon_remaining"] == pytest.approx(8.0 - d["epsilon_spent"])
    assert main(["ledger", "show"]) == 0
    text = capsys.readouterr().out
    assert "cifar10" in text and "reserved" in text and "committed" in text


def test_ledger_flag_overrides_env(capsys, filled, tmp_path):
    other = tmp_path / "other.sqlite"
    out = cli_json(capsys, "show", "--ledger", str(other))
    assert out["datasets"] == [] and not other.exists()


def test_show_at_another_delta_and_accountant(capsys, filled):
    out = cli_json(capsys, "show", "--dataset", "cifar10", "--delta", "1e-6", "--accountant", "rdp")
    assert out["datasets"][0]["accountant_reported"] == "rdp"
    assert out["datasets"][0]["epsilon_spent"] > cli_json(capsys, "show")["datasets"][0]["epsilon_spent"]


def test_remaining_and_steps_allowed(capsys, filled):
    out = cli_json(capsys, "remaining", "--dataset", "cifar10", "--sigma", "3", "--sample-rate", "0.08192")
    assert 0 < out["epsilon_remaining"] < 8 and out["steps_allowed"] > 0
    ledger = Ledger(filled)
    from accounting import epsilon

    events = ledger.counted_events("cifar10")
    step = PoissonGaussian(noise_multiplier=3.0, sample_rate=0.08192, steps=out["steps_allowed"])
    assert epsilon([*events, step], delta=1e-5) <= 8.0
    assert epsilon([*events, step.with_count(step.steps + 1)], delta=1e-5) > 8.0


def test_set_budget_and_release(capsys, filled):
    cli_json(capsys, "set-budget", "--dataset", "cifar10", "--epsilon", "9", "--delta", "1e-5")
    assert Ledger(filled).dataset("cifar10").budget_epsilon == 9.0
    out = cli_json(capsys, "release", "b", "--reason", "crashed before step 1")
    assert out["status"] == "released" and out["reason"] == "crashed before step 1"


def test_record_external_run(capsys, ledger_path, tmp_path):
    import numpy as np

    labels = np.arange(500) % 10
    np.savez(tmp_path / "train.npz", x=np.zeros((500, 1), np.uint8), y=labels)
    out = cli_json(capsys, "record", "--dataset", "toy", "--labels", str(tmp_path / "train.npz"), "--run-id",
                   "opacus-1", "--sigma", "1.1", "--sample-rate", "0.02", "--steps", "100")
    assert out["status"] == "committed"
    ledger = Ledger(ledger_path)
    assert ledger.dataset("toy").fingerprint == fingerprint(labels) and ledger.dataset("toy").size == 500


def test_export(capsys, filled, tmp_path):
    out = cli_json(capsys, "export")
    assert out["datasets"][0]["runs"][0]["planned"][0]["kind"] == "poisson_gaussian"
    target = tmp_path / "ledger.json"
    assert main(["ledger", "export", "--output", str(target)]) == 0
    assert json.loads(target.read_text()) == out


def test_set_budget_with_delta_above_1_over_n_needs_the_option(capsys, filled):
    args = ["set-budget", "--dataset", "cifar10", "--epsilon", "9", "--delta", "1e-3"]  # N = 1000
    assert main(["ledger", *args]) == 2
    err = capsys.readouterr().err
    assert "dpwa: error: delta=0.001 is not below 1/N" in err and "--accept-delta-above-1-over-n" in err
    assert Ledger(filled).dataset("cifar10").budget_epsilon == 8.0
    out = cli_json(capsys, *args, "--accept-delta-above-1-over-n")
    assert out["budget_delta"] == 1e-3 and out["budget_epsilon"] == 9.0


def test_a_subset_run_is_shown_on_its_parent(capsys, filled):
    cli_json(capsys, "record", "--dataset", "cifar10-classes-5-9", "--fingerprint", FP, "--run-id", "sub",
             "--sigma", "50", "--sample-rate", "0.01", "--steps", "10")
    (d,) = cli_json(capsys, "show")["datasets"]
    assert d["name"] == "cifar10" and d["aliases"] == ["cifar10-classes-5-9"]
    assert [r["run_id"] for r in d["runs"]] == ["a", "b", "sub"]
    by_alias = cli_json(capsys, "remaining", "--dataset", "cifar10-classes-5-9")
    assert by_alias == cli_json(capsys, "remaining", "--dataset", "cifar10")
    assert main(["ledger", "show"]) == 0
    assert "cifar10-classes-5-9" in capsys.readouterr().out


def test_release_on_a_missing_ledger_creates_nothing(capsys, tmp_path):
    path = tmp_path / "none.sqlite"
    assert main(["ledger", "release", "r1", "--reason", "x", "--ledger", str(path)]) == 1
    assert f"No ledger at {path}" in capsys.readouterr().err and not path.exists()
