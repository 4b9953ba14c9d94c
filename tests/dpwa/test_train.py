"""End-to-end training: the quickstart, kill-and-resume, and bad input (no ledger charge)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from accounting import Ledger
from dpwa.cli import main
from dpwa.config import DataConfig, load_config
from dpwa.data import DataError, load_data
from dpwa.models import MODELS, register_model
from dpwa.train import train
from tests.conftest import ROOT, SHARED_DATA, ledger_snapshot, run_dpwa

QUICK = ROOT / "configs" / "quickstart.yaml"


def tiny(tmp_path, *extra):
    return load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=12", "train.checkpoint_every=4",
                               "train.batch_size=64", "train.physical_batch_size=40", "privacy.noise_seed=1",
                               "augmult.k=2", *extra])




def test_quickstart_end_to_end(tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    out = run_dpwa("train", QUICK, f"out_dir={tmp_path / 'runs'}", "--no-progress", "--ledger", ledger, timeout=300)
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "run.json", "metrics.jsonl", "checkpoint.pt",
                                                   "report.json"}
    report = json.loads((run_dir / "report.json").read_text())
    assert 2.9 < report["epsilon"] <= 3.0 and report["private"] is True
    assert report["test_ema"]["accuracy"] > 0.8 and report["test_raw"]["accuracy"] > 0.8
    assert "private_batch_loss_diagnostic" not in json.dumps(report)  # diagnostics stay out of the report
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 150 and not any(k.startswith("private_") for r in rows for k in r)  # kept in the process
    # once, in the first row: how the engine computes each layer's norms (chosen from shapes)
    assert rows[0]["engine"]["name"] == "dpwa-fast" and all("engine" not in r for r in rows[1:])
    assert set(rows[0]["engine"]["layers"].values()) <= {"ghost norm", "instantiated", "GroupNormRule"}
    assert rows[0]["engine"]["memory"] in {"fast", "lean"}
    assert len(rows[0]["engine"]["layers"]) >= 3
    runs = Ledger(ledger).runs()
    assert len(runs) == 1 and runs[0].status == "committed" and runs[0].spent[0].steps == 150
    assert runs[0].spent[0].sample_rate == pytest.approx(256 / 1497)  # q = B / N exactly
    assert report["epsilon"] == pytest.approx(Ledger(ledger).spent("digits", delta=1e-4))


def final_weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    led_a, led_b = str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite")
    full = train(tiny(tmp_path / "a"), ledger_path=led_a, progress=False)
    stopped = train(tiny(tmp_path / "b"), ledger_path=led_b, progress=False, stop_after=6)  # "killed" at step 6
    assert stopped["stopped_at"] == 6
    (run,) = Ledger(led_b).runs()
    assert run.status == "reserved" and run.spent[0].steps == 4  # progress at the last checkpoint
    resumed = train(resume=Path(stopped["run_dir"]), ledger_path=led_b, progress=False)
    a, b = final_weights(full["run_dir"]), final_weights(resumed["run_dir"])
    for part in ("model", "ema", "polyak"):
        sa, sb = ((x[part] if part == "model" else x["averagers"][part]["weights"]) for x in (a, b))
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (part, k)
    runs = Ledger(led_b).runs()
    assert len(runs) == 1 and runs[0].status == "committed" and runs[0].spent[0].steps == 12  # one charge
    assert resumed["epsilon"] == pytest.approx(full["epsilon"])
    assert resumed["test_ema"] == full["test_ema"]


def test_resume_of_a_finished_run_is_refused(tmp_path, capsys):
    led = str(tmp_path / "l.sqlite")
    r = train(tiny(tmp_path), ledger_path=led, progress=False)
    before = ledger_snapshot(led)
    assert main(["train", "--resume", r["run_dir"], "--ledger", led, "--no-progress"]) == 1
    assert "nothing to resume" in capsys.readouterr().err
    assert ledger_snapshot(led) == before


@register_model("test_batchnorm_cnn")
def _bn_model(*, in_channels, num_classes, groups, weight_standardization):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(num_classes))


BAD = [
    (["nonsense.key=1"], 2, "nonsense"),
    (["optim.lrr=2"], 2, "optim.lrr"),
    (["privacy.delta=1"], 2, "privacy.delta must be in (0, 1)"),
    (["train.batch_size=5000"], 2, "train.batch_size=5000 must be <= the training set size N=1497"),
    (["augmult.k=0"], 2, "augmult.k must be >= 1"),
    (["optim.lr=-0.5"], 2, "optim.lr must be > 0"),
    (["data.name=npz", "data.root=/nonexistent/folder"], 2, "data.root='/nonexistent/folder'"),
    (["model.name=test_batchnorm_cnn"], 2, "GroupNorm"),
    (["model.name=resnet9000"], 2, "Unknown model 'resnet9000'"),
    pytest.param(["train.device=cuda"], 2, "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
]


@pytest.mark.parametrize("overrides, code, needle", BAD,
                         ids=[(b.values[2] if hasattr(b, "values") else b[2])[:30] for b in BAD])
def test_bad_input_costs_nothing(tmp_path, capsys, overrides, code, needle):
    led = tmp_path / "l.sqlite"
    Ledger(led).set_budget("digits", epsilon=10.0, delta=1e-4)
    before = ledger_snapshot(led)
    got = main(["train", str(QUICK), f"out_dir={tmp_path / 'runs'}", *overrides, "--ledger", str(led),
                "--no-progress"])
    err = capsys.readouterr().err
    assert got == code and needle in err, err
    assert ledger_snapshot(led) == before
    assert not (tmp_path / "runs").exists()


def test_exhausted_budget_is_refused_before_training(tmp_path, capsys):
    led = tmp_path / "l.sqlite"
    Ledger(led).set_budget("digits", epsilon=1.0, delta=1e-4)
    before = ledger_snapshot(led)
    assert main(["train", str(QUICK), f"out_dir={tmp_path / 'runs'}", "--ledger", str(led), "--no-progress"]) == 1
    assert "past its budget" in capsys.readouterr().err
    assert ledger_snapshot(led) == before and not (tmp_path / "runs").exists()


def test_missing_cifar_names_data_root(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_data(DataConfig(name="cifar10", root=str(tmp_path), download=False))


@pytest.mark.skipif(not (SHARED_DATA / "cifar10" / "train.npz").exists(), reason="../shared/data is absent")
def test_npz_cifar10_and_validation_split():
    data = load_data(DataConfig(name="npz", root=str(SHARED_DATA / "cifar10"), val_size=5000))
    assert data.train.x.shape == (45000, 3, 32, 32) and len(data.val) == 5000 and len(data.test) == 9000
    assert data.source.size == 50000 and data.num_classes == 10
    train_ids = {bytes(x.numpy().tobytes()) for x in data.train.x[:200]}
    assert not train_ids & {bytes(x.numpy().tobytes()) for x in data.val.x}  # disjoint (on a sample)


def test_models_registry_lists_known_names():
    assert {"cnn_small", "cnn_tanh", "wrn16_4", "wrn40_4", "wrn28_10"} <= set(MODELS)


def test_sigkill_and_resume_from_the_command_line(tmp_path):
    """A real kill -9 mid-run: resuming from the last checkpoint finishes with the weights of an
    uninterrupted run (fixed test-only noise seed) and one ledger entry."""
    import os
    import signal
    import subprocess
    import sys
    import time

    steps = 160  # the kill lands at 15 rows: 145 steps (~2 s here) before the report could be written
    args = [str(QUICK), f"train.steps={steps}", "train.checkpoint_every=5", "train.batch_size=64",
            "train.physical_batch_size=64", "augmult.k=2", "privacy.noise_seed=3"]
    led = tmp_path / "l.sqlite"
    ref = run_dpwa("train", *args, f"out_dir={tmp_path / 'ref'}", "--no-progress", "--ledger", tmp_path / "r.sqlite")
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([sys.executable, "-m", "dpwa", "train", *args, f"out_dir={tmp_path / 'killed'}",
                             "--no-progress", "--ledger", str(led)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = list((tmp_path / "killed").glob("*/metrics.jsonl"))
        if metrics and len(metrics[0].read_text().splitlines()) >= 12:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (run_dir,) = (tmp_path / "killed").iterdir()
    assert not (run_dir / "report.json").exists()
    assert Ledger(led).runs()[0].status == "reserved"
    out = run_dpwa("train", "--resume", run_dir, "--no-progress", "--ledger", led)
    assert out.returncode == 0, out.stderr
    (ref_dir,) = (tmp_path / "ref").iterdir()
    a, b = final_weights(ref_dir)["model"], final_weights(run_dir)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    runs = Ledger(led).runs()
    assert len(runs) == 1 and runs[0].status == "committed" and runs[0].spent[0].steps == steps
    rows = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, steps + 1))  # no duplicated rows for the redone steps


def test_overrides_may_follow_the_options(tmp_path, capsys):
    led = str(tmp_path / "l.sqlite")
    got = main(["train", str(QUICK), "--no-progress", "--ledger", led, f"out_dir={tmp_path / 'runs'}",
                "train.steps=2", "augmult.k=1", "--json"])
    assert got == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_unknown_options_are_still_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", str(QUICK), "--no-progress", "--bogus"])
    assert info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_an_accountant_that_cannot_calibrate_is_a_usage_error_with_the_way_out():
    """PRV's discretisation fails for some small-data plans (N=600, q=0.107, 10 steps at
    epsilon 3): a usage error (exit 2) naming the accountant and the plan, pointing to rdp,
    before anything is reserved; rdp calibrates the same plan."""
    from dpwa.config import ConfigError
    from dpwa.train import plan_run

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["train.steps=10", "train.batch_size=64"])
    with pytest.raises(ConfigError, match=r"privacy.accountant=prv cannot calibrate the noise for epsilon 3.0 "
                                          r"\(q 0.1067, 10 releases: .*use privacy.accountant=rdp"):
        plan_run(cfg, 600)
    rdp = load_config(ROOT / "configs" / "quickstart.yaml", ["train.steps=10", "train.batch_size=64",
                                                             "privacy.accountant=rdp"])
    assert plan_run(rdp, 600).noise_multiplier > 0


def test_a_run_folder_records_the_model_defaults_it_was_built_with(tmp_path):
    """model.groups / model.weight_standardization left out: config.yaml says what was built
    (cnn_small's 8 groups and WS convs), so a later change of a model's defaults cannot rebuild
    an old run's weights into another architecture of the same parameter shapes."""
    from dpwa.run_folder import RunFolder

    report = train(tiny(tmp_path, "model.groups=null", "model.weight_standardization=null", "train.steps=2"),
                   ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    saved = RunFolder(Path(report["run_dir"])).config().model
    assert (saved.groups, saved.weight_standardization) == (8, True)
