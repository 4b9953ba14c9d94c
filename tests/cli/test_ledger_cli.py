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
    assert main(["ledger", "show", "--ledger", str(other)]) == 0  # a mistyped path is not an empty ledger
    assert f"no ledger at {other}" in capsys.readouterr().out and not other.exists()


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


@pytest.mark.parametrize("delta", ["nan", "0.5"])
def test_record_with_a_bad_delta_makes_no_ledger_file(capsys, tmp_path, delta):
    import numpy as np

    np.savez(tmp_path / "train.npz", x=np.zeros((500, 1), np.uint8), y=np.arange(500) % 10)
    path = tmp_path / "new.sqlite"
    assert main(["ledger", "record", "--ledger", str(path), "--dataset", "toy", "--labels", str(tmp_path / "train.npz"),
                 "--run-id", "r", "--sigma", "1.1", "--sample-rate", "0.02", "--steps", "10", "--delta", delta]) == 2
    assert "delta" in capsys.readouterr().err and not path.exists()


def test_record_external_run(capsys, ledger_path, tmp_path):
    import numpy as np

    labels = np.arange(500) % 10
    np.savez(tmp_path / "train.npz", x=np.zeros((500, 1), np.uint8), y=labels)
    out = cli_json(capsys, "record", "--dataset", "toy", "--labels", str(tmp_path / "train.npz"), "--run-id",
                   "opacus-1", "--sigma", "1.1", "--sample-rate", "0.02", "--steps", "100")
    assert out["status"] == "committed"
    ledger = Ledger(ledger_path)
    assert ledger.dataset("toy").fingerprint == ledger.keyed(fingerprint(labels)) and ledger.dataset("toy").size == 500


def test_export(capsys, filled, tmp_path):
    out = cli_json(capsys, "export")
    assert out["datasets"][0]["runs"][0]["planned"][0]["kind"] == "poisson_gaussian"
    target = tmp_path / "ledger.json"
    assert main(["ledger", "export", "--output", str(target)]) == 0
    assert json.loads(target.read_text()) == out
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["ledger", "export", "--output", str(folder)]) != 0
    assert "it is a folder" in capsys.readouterr().err and list(tmp_path.glob("*.tmp")) == []


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


# ---------------------------------------------------------------- help, deltas without a budget, history

def _verbs(parser, *path):
    """The subparsers under `dpwa PATH...`, by name."""
    import argparse

    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return parser, ({} if sub is None else dict(sub.choices)), sub


def _options_without_help(parser):
    import argparse

    return [a.option_strings or [a.dest] for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not (a.help or "").strip()]


def test_every_ledger_and_budget_option_has_help():
    from dpwa.cli import build_parser

    root = build_parser()
    ledger, verbs, sub = _verbs(root, "ledger")
    assert {"show", "history", "set-budget", "remaining", "export", "record", "release"} <= set(verbs)
    assert all((c.help or "").strip() for c in sub._choices_actions), "a ledger verb has no help line"
    for name, parser in verbs.items():
        assert _options_without_help(parser) == [], f"dpwa ledger {name}"
    budget, _, _ = _verbs(root, "budget")
    assert _options_without_help(budget) == [], "dpwa budget"


def test_show_without_a_budget_reports_at_the_delta_the_runs_recorded(capsys, ledger_path):
    cli_json(capsys, "record", "--dataset", "toy", "--fingerprint", FP, "--run-id", "r1", "--sigma", "1.2",
             "--sample-rate", "0.05", "--steps", "300", "--delta", "1e-4")
    (d,) = cli_json(capsys, "show")["datasets"]
    assert d["delta_reported"] == 1e-4 and d["delta_source"] == "runs" and d["runs"][0]["delta"] == 1e-4
    assert d["epsilon_spent"] == pytest.approx(Ledger(ledger_path).spent("toy", delta=1e-4))
    assert d["epsilon_remaining"] is None
    assert main(["ledger", "show"]) == 0
    text = capsys.readouterr().out
    assert "at delta 0.0001 (prv); delta: the delta its runs recorded, no budget set" in text


def test_show_without_budget_or_run_delta_uses_a_labelled_default(capsys, ledger_path):
    ledger = Ledger(ledger_path)  # what the quickstart leaves: a run on a dataset of known size, no budget
    ledger.reserve(run_id="q", dataset="digits", fingerprint=FP, size=1000,
                   events=[PoissonGaussian(noise_multiplier=1.0, sample_rate=0.05, steps=100)])
    (d,) = cli_json(capsys, "show")["datasets"]
    assert d["delta_reported"] == pytest.approx(1e-4) and d["delta_source"] == "default"
    assert d["epsilon_spent"] == pytest.approx(ledger.spent("digits", delta=1e-4)) and d["epsilon_spent"] > 0
    assert main(["ledger", "show"]) == 0
    assert "1/(10N), a display default" in capsys.readouterr().out
    # Nothing to go by at all (a fingerprint that says no size): the table says so and how to get a number.
    cli_json(capsys, "record", "--dataset", "toy", "--fingerprint", "abc", "--run-id", "t", "--sigma", "1",
             "--sample-rate", "0.1", "--steps", "5")
    assert main(["ledger", "show", "--dataset", "toy"]) == 0
    assert "1 run(s) recorded; epsilon needs a delta: pass --delta" in capsys.readouterr().out


def test_history_lists_the_cumulative_spend_run_by_run(capsys, filled):
    cli_json(capsys, "record", "--dataset", "cifar10", "--fingerprint", FP, "--run-id", "c", "--sigma", "8",
             "--sample-rate", "0.01", "--steps", "200")
    out = cli_json(capsys, "history", "--dataset", "cifar10")
    ledger = Ledger(filled)
    assert out["delta"] == 1e-5 and out["delta_source"] == "budget" and out["accountant"] == "prv"
    assert [r["run_id"] for r in out["runs"]] == ["a", "b", "c"]
    assert [r["status"] for r in out["runs"]] == ["committed", "reserved", "committed"]
    rows = ledger.history("cifar10", delta=1e-5)
    assert [r["epsilon_cumulative"] for r in out["runs"]] == [total for _, _, total in rows]
    assert out["runs"][-1]["epsilon_cumulative"] == pytest.approx(ledger.spent("cifar10"))
    assert out["runs"][0]["epsilon_cumulative"] < out["runs"][1]["epsilon_cumulative"] < \
        out["runs"][2]["epsilon_cumulative"]
    assert main(["ledger", "history", "--dataset", "cifar10", "--delta", "1e-6", "--accountant", "rdp"]) == 0
    text = capsys.readouterr().out
    assert "epsilon (so far)" in text and "1e-06 (from --delta)" in text and "rdp" in text


def test_history_plot_is_a_png(capsys, filled, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "spend.png"
    out = cli_json(capsys, "history", "--dataset", "cifar10", "--plot", str(target))
    assert out["plot"] == str(target) and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["ledger", "history", "--dataset", "cifar10", "--plot", str(tmp_path / "spend.pdf")]) == 2
    assert "--plot writes a PNG" in capsys.readouterr().err and not (tmp_path / "spend.pdf").exists()


def test_history_of_an_unknown_dataset_is_a_clear_error(capsys, filled):
    assert main(["ledger", "history", "--dataset", "nope"]) == 1
    assert "Unknown dataset 'nope'" in capsys.readouterr().err


def test_ledger_verbs_import_neither_torch_nor_matplotlib(filled):
    import subprocess
    import sys

    from tests.conftest import ROOT

    probe = ("import sys\nimport accounting\nassert 'matplotlib' not in sys.modules\nfrom dpwa.cli import main\n"
             "assert main(['ledger', 'history', '--dataset', 'cifar10']) == 0\n"
             "assert main(['ledger', 'show']) == 0\n"
             "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]\nassert not bad, bad\nprint('CLEAN')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "CLEAN" in out.stdout, out.stderr


def test_show_says_which_dataset_an_accountant_cannot_compose_and_shows_the_others(capsys, ledger_path):
    ledger = Ledger(ledger_path)
    for name, steps in (("huge", 10**12), ("small", 10)):
        ledger.reserve(run_id=name, dataset=name, fingerprint=fingerprint(range(len(name))),
                       events=[PoissonGaussian(noise_multiplier=1.0, sample_rate=0.1, steps=steps)])
    assert main(["ledger", "show", "--ledger", str(ledger_path), "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "cannot be computed at delta 1e-05 (prv)" in out and "use the RDP accountant" in out
    assert "epsilon 2.86486 at delta 1e-05 (prv)" in out
