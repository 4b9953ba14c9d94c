"""Bad input to every verb (`dpwa train`, `finetune`, `eval`, `budget`, `ledger`): a clear
message naming the value, a non-zero exit code, no traceback, no change to the ledger and no
run folder."""

import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from accounting import Ledger, PoissonGaussian, fingerprint
from dpwa.cli import main
from tests.conftest import ROOT, ledger_snapshot, run_dpwa

QUICK = str(ROOT / "configs" / "quickstart.yaml")
TRAIN = ["--no-progress", "out_dir={tmp}/runs", "train.steps=2"]

FP = fingerprint(range(1000))
BASE = ["--sigma", "3", "--sample-rate", "0.08192", "--steps", "100", "--delta", "1e-5"]


def replace(args, flag, value):
    out = list(args)
    i = out.index(flag)
    if value is None:
        del out[i:i + 2]
    else:
        out[i + 1] = value
    return out


@pytest.fixture
def ledger(ledger_path):
    led = Ledger(ledger_path)
    led.set_budget("d", epsilon=2.0, delta=1e-5, size=1000)
    ev = PoissonGaussian(noise_multiplier=6.0, sample_rate=0.01, steps=500)
    led.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev])
    led.commit("r1", [ev])
    led.reserve(run_id="r2", dataset="d", fingerprint=FP, events=[ev])
    return ledger_path




def call(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


CASES = [
    # (id, argv, expected code, text the message must contain)
    ("delta zero", ["budget", *replace(BASE, "--delta", "0")], 2, "delta=0.0"),
    ("delta one", ["budget", *replace(BASE, "--delta", "1")], 2, "delta=1.0"),
    ("delta negative", ["budget", *replace(BASE, "--delta", "-0.00001")], 2, "delta=-1e-05"),
    ("sample rate zero", ["budget", *replace(BASE, "--sample-rate", "0")], 2, "sample_rate=0.0"),
    ("sample rate above one", ["budget", *replace(BASE, "--sample-rate", "1.01")], 2, "sample_rate=1.01"),
    ("noise zero", ["budget", *replace(BASE, "--sigma", "0")], 2, "noise_multiplier=0.0"),
    ("noise negative", ["budget", *replace(BASE, "--sigma", "-2")], 2, "noise_multiplier=-2.0"),
    ("noise nan", ["budget", *replace(BASE, "--sigma", "nan")], 2, "noise_multiplier=nan"),
    ("steps negative", ["budget", *replace(BASE, "--steps", "-5")], 2, "steps=-5"),
    ("steps not an integer", ["budget", *replace(BASE, "--steps", "2.5")], 2, "'2.5'"),
    ("unknown accountant", ["budget", *BASE, "--accountant", "moments"], 2, "'moments'"),
    ("epsilon negative", ["budget", *replace(BASE, "--sigma", None), "--epsilon", "-1"], 2, "target_epsilon=-1.0"),
    ("two unknowns", ["budget", *replace(replace(BASE, "--sigma", None), "--delta", None), "--epsilon", "1"], 2,
     "missing: sigma, delta"),
    ("no unknown", ["budget", *BASE, "--epsilon", "1"], 2, "leave out exactly one"),
    ("no sample rate", ["budget", *replace(BASE, "--sample-rate", None)], 2, "--sample-rate"),
    ("sample rate twice", ["budget", *BASE, "--batch-size", "10", "--dataset-size", "100"], 2, "not both"),
    ("batch above dataset", ["budget", *replace(BASE, "--sample-rate", None), "--batch-size", "200",
                             "--dataset-size", "100"], 2, "batch_size=200 <= dataset_size=100"),
    ("epochs without sizes", ["budget", *replace(BASE, "--steps", None), "--epochs", "3"], 2, "--epochs needs"),
    ("unknown flag", ["budget", *BASE, "--sigma-x", "3"], 2, "unrecognized arguments"),
    ("budget exceeded", ["ledger", "set-budget", "--dataset", "d", "--epsilon", "0.1", "--delta", "1e-5"], 1,
     "already spent"),
    ("budget epsilon zero", ["ledger", "set-budget", "--dataset", "d", "--epsilon", "0", "--delta", "1e-5"], 2,
     "epsilon=0.0"),
    ("budget delta one", ["ledger", "set-budget", "--dataset", "d", "--epsilon", "1", "--delta", "1"], 2,
     "delta=1.0"),
    ("budget delta at 1/N", ["ledger", "set-budget", "--dataset", "d", "--epsilon", "1", "--delta", "1e-3"], 2,
     "delta=0.001 is not below 1/N = 0.001 (N=1000 examples)"),
    ("budget delta above 1/N names the option", ["ledger", "set-budget", "--dataset", "new", "--epsilon", "1",
                                                 "--delta", "0.5", "--dataset-size", "10"], 2,
     "pass --accept-delta-above-1-over-n"),
    ("budget unknown accountant", ["ledger", "set-budget", "--dataset", "d", "--epsilon", "1", "--delta", "1e-5",
                                   "--accountant", "x"], 2, "invalid choice"),
    ("record over budget", ["ledger", "record", "--dataset", "d", "--fingerprint", FP, "--run-id", "r3",
                            "--sigma", "1", "--sample-rate", "0.1", "--steps", "1000"], 1, "past its budget"),
    ("record other data", ["ledger", "record", "--dataset", "d", "--fingerprint", "n5-x", "--run-id", "r3",
                           "--sigma", "50", "--sample-rate", "0.1", "--steps", "1"], 1, "fingerprint"),
    ("record duplicate run", ["ledger", "record", "--dataset", "d", "--fingerprint", FP, "--run-id", "r1",
                              "--sigma", "50", "--sample-rate", "0.1", "--steps", "1"], 1, "already"),
    ("record bad noise", ["ledger", "record", "--dataset", "d", "--fingerprint", FP, "--run-id", "r3",
                          "--sigma", "-1", "--sample-rate", "0.1", "--steps", "1"], 2, "noise_multiplier=-1.0"),
    ("record missing labels", ["ledger", "record", "--dataset", "d", "--labels", "/nonexistent/y.npz", "--run-id",
                               "r3", "--sigma", "5", "--sample-rate", "0.1", "--steps", "1"], 2, "/nonexistent/y.npz"),
    ("release unknown run", ["ledger", "release", "nope", "--reason", "x"], 1, "'nope'"),
    ("release committed run", ["ledger", "release", "r1", "--reason", "x"], 1, "committed"),
    ("release without reason", ["ledger", "release", "r2", "--reason", " "], 2, "reason"),
    ("remaining unknown dataset", ["ledger", "remaining", "--dataset", "nope"], 1, "Unknown dataset 'nope'"),
    ("remaining sigma alone", ["ledger", "remaining", "--dataset", "d", "--sigma", "3"], 2, "go together"),
    ("show bad delta", ["ledger", "show", "--delta", "2"], 2, "delta=2.0"),
    ("show unknown dataset", ["ledger", "show", "--dataset", "nope"], 1, "Unknown dataset 'nope'"),
    ("show empty dataset", ["ledger", "show", "--dataset", ""], 1, "Unknown dataset ''"),
    ("empty ledger path", ["ledger", "show", "--ledger", ""], 2, "--ledger is empty"),
    ("record delta above 1/N", ["ledger", "record", "--dataset", "d", "--fingerprint", FP, "--run-id", "r3",
                                "--sigma", "50", "--sample-rate", "0.1", "--steps", "1", "--delta", "0.5"], 2,
     "--delta=0.5 is not below 1/N = 0.001 (N=1000 examples)"),
    ("record delta above the fingerprint's 1/N", ["ledger", "record", "--dataset", "new-name", "--fingerprint",
                                                  "n1000-0123456789abcdef", "--run-id", "r3", "--sigma", "50",
                                                  "--sample-rate", "0.1", "--steps", "1", "--delta", "0.01"], 2,
     "--delta=0.01 is not below 1/N = 0.001 (N=1000 examples)"),
    ("record foreign keyed fingerprint", ["ledger", "record", "--dataset", "copy", "--fingerprint",
                                          "n1000-k0123456789abcdef", "--run-id", "r3", "--sigma", "50",
                                          "--sample-rate", "0.1", "--steps", "1"], 2, "no dataset in ledger"),
    ("no verb", ["ledger"], 2, "required"),
    # training verbs: nothing may be reserved, no run folder may appear ({tmp} is the test's folder)
    ("train unparsable yaml", ["train", "{tmp}/bad.yaml", *TRAIN], 2, "Cannot parse {tmp}/bad.yaml"),
    ("train yaml list", ["train", "{tmp}/list.yaml", *TRAIN], 2, "must hold a mapping"),
    ("train missing config", ["train", "{tmp}/none.yaml", *TRAIN], 2, "{tmp}/none.yaml does not exist"),
    ("train config folder", ["train", "{tmp}", *TRAIN], 2, "Config file {tmp} is a folder; give a YAML file"),
    ("train epsilon infinite", ["train", QUICK, *TRAIN, "privacy.epsilon=inf"], 2,
     "privacy.epsilon must be finite and > 0, got inf"),
    ("train no config", ["train", "--no-progress"], 2, "Give a config file"),
    ("train unknown key", ["train", QUICK, *TRAIN, "optim.lrr=1"], 2, "optim.lrr"),
    ("train wrong type", ["train", QUICK, *TRAIN, "train.batch_size=many"], 2, "many"),
    ("train delta out of range", ["train", QUICK, *TRAIN, "privacy.delta=2"], 2,
     "privacy.delta must be in (0, 1), got 2.0"),
    ("train epsilon negative", ["train", QUICK, *TRAIN, "privacy.epsilon=-1"], 2, "privacy.epsilon must be finite and > 0"),
    ("train clip zero", ["train", QUICK, *TRAIN, "privacy.clip_norm=0"], 2, "privacy.clip_norm must be > 0"),
    ("train clip infinite", ["train", QUICK, *TRAIN, "privacy.clip_norm=inf"], 2, "privacy.clip_norm must be finite"),
    ("train lr infinite", ["train", QUICK, *TRAIN, "optim.lr=inf"], 2, "optim.lr must be finite, got inf"),
    ("train weight decay infinite", ["train", QUICK, *TRAIN, "optim.name=adamw", "optim.weight_decay=inf"], 2,
     "optim.weight_decay must be finite"),
    ("train betas infinite", ["train", QUICK, *TRAIN, "optim.name=adam", "optim.betas=[0.9,-inf]"], 2,
     "optim.betas must be"),
    ("train rigl with no mask update", ["train", QUICK, "--no-progress", "out_dir={tmp}/runs", "train.steps=20",
                                        "method.name=rigl", "method.sparsity_end=15", "method.sparsity_update_every=100"],
     2, "method.sparsity_update_every=100 leaves no mask update before method.sparsity_end=15"),
    ("train rigl schedule beyond the run", ["train", QUICK, *TRAIN, "method.name=rigl", "method.sparsity_end=10000"], 2,
     "method.sparsity_end=10000 is beyond the run (2 steps)"),
    ("train granet pruning beyond the run", ["train", QUICK, *TRAIN, "method.name=set", "method.sparsity_end=2",
                                             "method.sparsity_init_density=1", "method.sparsity_prune_end=500"], 2,
     "method.sparsity_prune_end=500 is beyond the run (2 steps)"),
    ("train pswa with no restart", ["train", QUICK, *TRAIN, "method.name=pswa", "method.pswa_start=500"], 2,
     "no restart from the average would fall within it"),
    ("train pswa with no restart, epochs", ["train", QUICK, "--no-progress", "out_dir={tmp}/runs", "train.epochs=1",
                                            "method.name=pswa", "method.pswa_period=50"], 2,
     "method.pswa_start=0 + method.pswa_period=50 is beyond the run (6 steps)"),
    ("train entropy-sgd with adambc", ["train", QUICK, *TRAIN, "method.name=entropy_sgd", "optim.name=adambc"], 2,
     "use optim.name=adamw"),
    ("train pad past the image", ["train", QUICK, *TRAIN, "augmult.pad=8"], 2,
     "augmult.pad=8 must be below the training images' height and width (8 x 8)"),
    ("train missing data", ["train", QUICK, *TRAIN, "data.name=npz", "data.root={tmp}/nodata"], 2,
     "{tmp}/nodata/train.npz does not exist"),
    ("train batch above N", ["train", QUICK, *TRAIN, "train.batch_size=100000"], 2,
     "train.batch_size=100000 must be <= the training set size N=1497"),
    ("train resume not a run", ["train", "--resume", "{tmp}", "--no-progress"], 2, "is not a dpwa run folder"),
    ("train resume with overrides", ["train", "--resume", "{tmp}", "optim.lr=2"], 2,
     "--resume takes the run folder only"),
    ("train unknown option", ["train", QUICK, *TRAIN, "--fast"], 2, "unrecognized arguments: --fast"),
    ("finetune unknown model", ["finetune", QUICK, *TRAIN, "model.name=nfnet_zz"], 2, "Unknown model 'nfnet_zz'"),
    ("finetune missing weights", ["finetune", QUICK, *TRAIN, "model.name=nf_micro", "data.image_size=32",
                                  "model.pretrained={tmp}/w.safetensors"], 2, "{tmp}/w.safetensors': no such file"),
    ("finetune private data without privacy", ["finetune", QUICK, *TRAIN, "model.name=nf_micro",
                                               "privacy.enabled=false"], 2, "not marked public"),
    ("eval not a run", ["eval", "{tmp}"], 2, "is not a dpwa run folder"),
    ("eval unknown method", ["eval", "{tmp}", "--methods", "best"], 2, "invalid choice: 'best'"),
    ("eval no samples", ["eval", "{tmp}", "--swag-samples", "0"], 2, "--swag-samples must be >= 1, got 0"),
    ("audit missing config", ["audit", "{tmp}/none.yaml"], 2, "{tmp}/none.yaml does not exist"),
    ("audit unknown key", ["audit", QUICK, "privacy.epsilonn=3"], 2, "privacy.epsilonn"),
    ("audit too few canaries", ["audit", QUICK, "--canaries", "20"], 2, "--canaries must be >= 100, got 20"),
    ("audit seed too large", ["audit", QUICK, "--seed", "99999999999999999999999"], 2,
     "--seed must be in [0, 2^63), got 99999999999999999999999"),
    ("audit seed negative", ["audit", QUICK, "--seed", "-1"], 2, "--seed must be in [0, 2^63), got -1"),
    ("audit delta above 1/N", ["audit", QUICK, "privacy.delta=0.01"], 2, "privacy.delta=0.01"),
    ("audit confidence above one", ["audit", QUICK, "--confidence", "1.5"], 2, "--confidence must be in [0.5, 1)"),
    ("audit non-private run", ["audit", QUICK, "privacy.enabled=false", "data.public=true"], 2,
     "a non-private run has no guarantee to audit"),
    ("audit missing data", ["audit", QUICK, "data.name=npz", "data.root={tmp}/nodata"], 2,
     "{tmp}/nodata/train.npz does not exist"),
]


@pytest.mark.parametrize("argv, code, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(ledger, tmp_path, capsys, argv, code, needle):
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = ledger_snapshot(ledger)
    got, err = call(argv, capsys)
    assert got == code, err
    assert needle.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err
    assert ledger_snapshot(ledger) == before
    assert not (tmp_path / "runs").exists()


def test_train_with_a_corrupt_ledger_writes_nothing(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"\x00garbage" * 500)
    code, err = call(["train", QUICK, "--no-progress", "--ledger", str(path), f"out_dir={tmp_path / 'runs'}",
                      "train.steps=2"], capsys)
    assert code == 1 and "not a readable SQLite file" in err
    assert path.read_bytes() == b"\x00garbage" * 500 and not (tmp_path / "runs").exists()


def test_corrupt_ledger_file(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"\x00garbage" * 500)
    before = path.read_bytes()
    for argv in (["ledger", "show"], ["ledger", "set-budget", "--dataset", "d", "--epsilon", "1", "--delta", "1e-5"],
                 ["ledger", "release", "r", "--reason", "x"], ["ledger", "export"]):
        code, err = call([*argv, "--ledger", str(path)], capsys)
        assert code == 1 and str(path) in err and "not a readable SQLite file" in err
    assert path.read_bytes() == before


def test_locked_ledger(ledger, capsys):
    holder = sqlite3.connect(ledger, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        code, err = call(["ledger", "set-budget", "--dataset", "d", "--epsilon", "5", "--delta", "1e-5",
                          "--lock-timeout", "0.2"], capsys)
        assert code == 1 and "locked by another process" in err
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert Ledger(ledger).dataset("d").budget_epsilon == 2.0


def test_ledger_path_is_a_directory(tmp_path, capsys):
    code, err = call(["ledger", "show", "--ledger", str(tmp_path)], capsys)
    assert code == 1 and "is a directory" in err


def test_exit_codes_from_a_real_process(ledger):
    bad = run_dpwa("budget", *replace(BASE, "--delta", "0"))
    assert bad.returncode == 2 and "delta=0.0" in bad.stderr and bad.stdout == ""
    refused = run_dpwa("ledger", "set-budget", "--dataset", "d", "--epsilon", "0.1", "--delta", "1e-5")
    assert refused.returncode == 1 and "already spent" in refused.stderr


def _pickled_code(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model": Payload()}, path)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run killed at step 6 (checkpoint at 4), still reserved in its ledger."""
    from dpwa.config import load_config
    from dpwa.train import train

    tmp = tmp_path_factory.mktemp("stopped")
    led = tmp / "l.sqlite"
    stopped = train(load_config(QUICK, ["train.steps=12", "train.checkpoint_every=4", "train.batch_size=64",
                                        f"out_dir={tmp / 'runs'}"]), ledger_path=str(led), progress=False,
                    stop_after=6)
    return Path(stopped["run_dir"]), led


@pytest.mark.parametrize("verb", ["train --resume", "eval"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickled code", "wrong model"])
def test_corrupt_checkpoint_is_refused_and_changes_nothing(stopped_run, tmp_path, capsys, verb, damage):
    source, led_source = stopped_run
    run_dir, led = tmp_path / source.name, tmp_path / "l.sqlite"
    shutil.copytree(source, run_dir)
    with sqlite3.connect(led_source) as src, sqlite3.connect(led) as dst:  # WAL-mode ledger: copy via the API
        src.backup(dst)
    ckpt, marker = run_dir / "checkpoint.pt", tmp_path / "executed"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif damage == "garbage":
        ckpt.write_bytes(b"\x00garbage" * 100)
    elif damage == "pickled code":
        _pickled_code(ckpt, marker)
    else:
        state = torch.load(ckpt, weights_only=True)
        state["model"] = {"weight": torch.zeros(3)}
        torch.save(state, ckpt)
    before, data = ledger_snapshot(led), ckpt.read_bytes()
    argv = (["train", "--resume", str(run_dir), "--no-progress", "--ledger", str(led)] if verb.startswith("train")
            else ["eval", str(run_dir)])
    code, err = call(argv, capsys)
    assert code == 2 and "Traceback" not in err and str(ckpt) in err
    if verb.startswith("train"):
        assert "Cannot resume" in err and "stays reserved" in err
    assert ledger_snapshot(led) == before and ckpt.read_bytes() == data
    assert not marker.exists()  # the pickled code never ran


@pytest.mark.parametrize("content", ["pickled code", "pickled object", "text", "not safetensors"])
def test_pretrained_file_that_is_not_weights_is_refused_in_dpwas_words(ledger, tmp_path, capsys, content):
    """A model.pretrained file that is not a state dict of tensors: dpwa's own message, never
    PyTorch's advice to load it with weights_only=False (that would run the file's code)."""
    import argparse

    weights, marker = tmp_path / ("w.safetensors" if content == "not safetensors" else "w.pt"), tmp_path / "ran"
    if content == "pickled code":
        _pickled_code(weights, marker)
    elif content == "pickled object":
        torch.save({"args": argparse.Namespace(lr=1.0), "w": torch.zeros(2)}, weights)  # a training script's habit
    else:
        weights.write_text("these are not weights\n")
    before = ledger_snapshot(ledger)
    code, err = call(["finetune", QUICK, *[a.replace("{tmp}", str(tmp_path)) for a in TRAIN], "model.name=nf_micro",
                      "data.image_size=32", f"model.pretrained={weights}"], capsys)
    assert code == 2 and f"Cannot read pretrained weights {weights}" in err, err
    assert "weights_only" not in err and "Traceback" not in err
    if content == "not safetensors":
        assert "not a valid .safetensors file" in err
    else:
        assert "state dict of tensors" in err and "no code inside a file runs" in err
    if content == "pickled object":
        assert "argparse.Namespace" in err  # names what the file holds
    assert not marker.exists()  # the pickled code never ran
    assert ledger_snapshot(ledger) == before and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["finetune", "--help"]])
def test_help_is_for_users_and_names_only_configs_that_exist(capsys, argv):
    import re

    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "add_parser" not in out and "one module per verb" not in out  # no developer docstring
    named = re.findall(r"configs/[\w.-]+\.yaml", out)
    assert named or argv == ["--help"]
    assert [c for c in named if not (ROOT / c).is_file()] == []
    if argv == ["--help"]:
        assert all(verb in out for verb in ("dpwa train", "dpwa finetune", "dpwa eval", "dpwa audit", "dpwa budget",
                                            "dpwa ledger"))
