"""What a user meets around a run: the dry run, Ctrl-C, a kill before the report, the curves."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accounting import Ledger
from dpwa.cli import main
from dpwa.config import load_config
from dpwa.run_folder import RunFolder
from dpwa.train import train
from tests.conftest import ROOT, ledger_snapshot

QUICK = ROOT / "configs" / "quickstart.yaml"
SMALL = ["train.batch_size=64", "train.physical_batch_size=64", "augmult.k=2"]


def test_the_dry_run_charges_nothing_and_predicts_the_runs_epsilon(tmp_path, capsys):
    led = tmp_path / "l.sqlite"
    args = ["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}",
            "train.steps=8", *SMALL]
    assert main([*args, "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert not led.exists() and not (tmp_path / "runs").exists()  # nothing reserved, nothing written
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert planned["epsilon"] == pytest.approx(report["epsilon"], rel=1e-9)
    assert planned["noise_multiplier"] == report["noise_multiplier"] and planned["releases"] == 8
    Ledger(led).set_budget("digits", epsilon=10.0, delta=1e-4)
    before = ledger_snapshot(led)
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing was reserved" in out and f"{report['epsilon']:.3f} spent" in out and "left after it" in out
    assert ledger_snapshot(led) == before


def test_the_dry_run_of_a_resume_counts_its_own_reservation_once(tmp_path, capsys):
    """The run's reservation is in the ledger already: resuming adds nothing, and a budget just
    above the dataset's spend admits the resume (the run itself is not refused)."""
    led = str(tmp_path / "l.sqlite")
    cfg = load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=8", "train.checkpoint_every=4", *SMALL])
    stopped = train(cfg, ledger_path=led, progress=False, stop_after=5)
    spent = Ledger(led).spent("digits", delta=1e-4)
    Ledger(led).set_budget("digits", epsilon=spent + 0.1, delta=1e-4)
    before = ledger_snapshot(led)
    dry = train(resume=Path(stopped["run_dir"]), ledger_path=led, progress=False, dry_run=True)
    assert dry["dataset_epsilon_after"] == pytest.approx(dry["dataset_epsilon_spent"], rel=1e-9)
    assert dry["dataset_epsilon_spent"] == pytest.approx(spent, rel=1e-9) and dry["resumed_run"] == stopped["run_id"]
    assert main(["train", "--resume", stopped["run_dir"], "--ledger", led, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "own reservation included: resuming adds nothing" in out and "left after it" in out
    assert ledger_snapshot(led) == before
    assert train(resume=Path(stopped["run_dir"]), ledger_path=led, progress=False)["steps"] == 8


def test_a_run_resumed_while_another_process_holds_it_is_refused_and_charged_nothing(tmp_path, capsys):
    """Two resumes of one run at once (a scheduler's requeue beside the running job) would both
    release under its one reservation: the second is refused before anything is read or charged,
    and resumes once the first lets go of the folder."""
    import fcntl

    led = str(tmp_path / "l.sqlite")
    cfg = load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=8", "train.checkpoint_every=4", *SMALL])
    stopped = train(cfg, ledger_path=led, progress=False, stop_after=5)
    before = ledger_snapshot(led)
    fd = os.open(stopped["run_dir"], os.O_RDONLY)  # what a running session holds (RunFolder.hold)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert main(["train", "--resume", stopped["run_dir"], "--ledger", led, "--no-progress"]) == 1
        assert "is in use by another dpwa process" in capsys.readouterr().err
        assert ledger_snapshot(led) == before
    finally:
        os.close(fd)
    assert train(resume=Path(stopped["run_dir"]), ledger_path=led, progress=False)["steps"] == 8


def test_the_dry_run_refuses_what_the_run_would_refuse(tmp_path, capsys):
    code = main(["train", str(QUICK), "--dry-run", "--ledger", str(tmp_path / "l.sqlite"), "privacy.delta=0.01"])
    assert code == 2 and "not below 1/N" in capsys.readouterr().err


def test_sigint_checkpoints_says_how_to_resume_and_the_resumed_run_commits_once(tmp_path):
    led, runs = tmp_path / "l.sqlite", tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dpwa", "train", str(QUICK), "--no-progress", "--ledger", str(led),
                             f"out_dir={runs}", "train.steps=400", "train.checkpoint_every=50", *SMALL],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = list(runs.glob("*/metrics.jsonl"))
        if metrics and len(metrics[0].read_text().splitlines()) >= 50:  # rows appear at checkpoints
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    (run_dir,) = runs.iterdir()
    assert proc.returncode == 130, err
    assert f"dpwa: run {run_dir.name} in {run_dir}" in err  # announced at the start
    assert "SIGINT: stopped after step" in err and f"dpwa train --resume {run_dir}" in err and "Traceback" not in err
    state = RunFolder(run_dir).load_state()
    step = state["step"]
    assert 50 <= step < 400 and len(RunFolder(run_dir).rows()) == step  # checkpoint at the boundary, rows to it
    (run,) = Ledger(led).runs()
    assert run.status == "reserved" and run.spent[0].steps == step
    resumed = subprocess.run([sys.executable, "-m", "dpwa", "train", "--resume", str(run_dir), "--no-progress",
                              "--ledger", str(led)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent[0].steps == 400


def test_a_run_killed_between_its_last_step_and_its_report_gets_it_back(tmp_path, monkeypatch):
    led = tmp_path / "l.sqlite"
    cfg = load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=6", "train.checkpoint_every=3",
                              "privacy.noise_seed=1", *SMALL])

    import os

    def killed(self, staged):
        if any(p.name.endswith("report.json") for p in staged):
            os.replace(staged[0], self.path / "weights.safetensors")  # the first rename done, then
            raise KeyboardInterrupt  # a kill: no cleanup, no commit
        return publish(self, staged)

    publish = RunFolder.publish
    monkeypatch.setattr(RunFolder, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, ledger_path=str(led), progress=False)
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "runs").iterdir()
    (run,) = Ledger(led).runs()
    assert run.status == "reserved" and not (run_dir / "report.json").exists()
    assert (run_dir / "weights.safetensors").exists()  # put in place before the report and the commit
    report = train(resume=run_dir, ledger_path=str(led), progress=False)
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent[0].steps == 6 and report["releases"] == 6
    assert json.loads((run_dir / "report.json").read_text())["epsilon"] == report["epsilon"]
    assert (run_dir / "curves.png").stat().st_size > 10_000


def test_epsilon_is_in_every_row_exact_at_checkpoints_and_never_below_the_truth(tmp_path):
    from accounting import PoissonGaussian, epsilon

    report = train(load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=40", "train.checkpoint_every=10",
                                       "privacy.noise_seed=1", *SMALL]), ledger_path=str(tmp_path / "l"),
                   progress=False)
    rows = RunFolder(Path(report["run_dir"])).rows()
    assert [r["step"] for r in rows] == list(range(1, 41))
    for r in rows:
        exact = epsilon([PoissonGaussian(noise_multiplier=report["noise_multiplier"],
                                         sample_rate=report["sample_rate"], steps=r["step"])], delta=1e-4)
        assert r["epsilon"] >= exact - 1e-9
        if r["step"] % 10 == 0:
            assert r["epsilon"] == pytest.approx(exact, rel=1e-9)


def test_tensorboard_is_optional_and_refused_before_any_charge_when_missing(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    led = tmp_path / "l.sqlite"
    code = main(["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}",
                 "train.tensorboard=true", "train.steps=3", *SMALL])
    assert code == 2 and "pip install tensorboard" in capsys.readouterr().err
    assert not led.exists() and not (tmp_path / "runs").exists()


def test_tensorboard_scalars_are_written_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    report = train(load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=4", "train.tensorboard=true",
                                       "privacy.noise_seed=1", *SMALL]), ledger_path=str(tmp_path / "l"),
                   progress=False)
    assert list((Path(report["run_dir"]) / "tensorboard").glob("events.out.tfevents.*"))


def test_a_new_ledger_is_announced_where_a_misspelt_path_would_make_one(tmp_path, capsys):
    """A typo in --ledger trained under a fresh, budgetless ledger in silence."""
    typo = tmp_path / "ledgr" / "ledger.sqlite"
    args = ["train", str(QUICK), f"out_dir={tmp_path / 'runs'}", "train.steps=2", *SMALL, "--ledger", str(typo),
            "--no-progress"]
    assert main(args) == 0
    assert f"dpwa: creating a new ledger at {typo}" in capsys.readouterr().err
    assert main(args) == 0
    assert "creating a new ledger" not in capsys.readouterr().err
