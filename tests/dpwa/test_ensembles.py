"""Averaging and ensembles wired into training and `dpwa eval`: no private data is read after
training, one ledger charge whatever averaging is on, resume mid-cycle reproduces the
averages, metrics against hand computation, and bad input refused before any charge."""

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn

import dpwa.train as train_module
from accounting import Ledger, fingerprint
from dpwa.cli import main
from dpwa.config import load_config
from dpwa.data import Data, PrivateDataAccess, Source, Split, Withheld, load_data
from dpwa.evaluate import evaluate_members, metrics, reliability_bins
from dpwa.privacy import poisson_batches
from dpwa.train import train
from tests.conftest import ROOT, ledger_snapshot

QUICK = ROOT / "configs" / "quickstart.yaml"
ALL = ["optim.schedule=cyclic", "optim.cycle_length=4", "optim.min_lr=0.2", "optim.warmup_steps=0",
       "averaging.swa=true", "averaging.swag=true", "averaging.swag_rank=3", "averaging.snapshots=true",
       "averaging.swag_samples=5"]


def tiny(tmp_path, *extra):
    return load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=14", "train.checkpoint_every=4",
                               "train.batch_size=64", "train.physical_batch_size=40", "privacy.noise_seed=1",
                               "augmult.k=2", *ALL, *extra])


class CountingExamples:
    """The private examples, counting every indexing (the loader keeps a reference to them and
    indexes one physical chunk at a time; holding the reference reads nothing)."""

    def __init__(self, inner: torch.Tensor, owner: "CountingSplit") -> None:
        self._inner, self._owner = inner, owner

    def __getitem__(self, index):
        object.__setattr__(self._owner, "reads", object.__getattribute__(self._owner, "reads") + 1)
        return self._inner[index]

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class CountingSplit(Split):
    """The private training split, counting every read of its examples or labels."""

    def __init__(self, inner: Split) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "reads", 0)

    def __len__(self) -> int:
        return len(self._inner)

    def __getattribute__(self, name):
        if name == "x":
            return CountingExamples(getattr(object.__getattribute__(self, "_inner"), "x"), self)
        if name == "y":
            object.__setattr__(self, "reads", object.__getattribute__(self, "reads") + 1)
            return getattr(object.__getattribute__(self, "_inner"), name)
        return object.__getattribute__(self, name)


def counting_loader(splits: list) -> Callable:
    """`load_data` whose training split counts its reads; each loaded split is appended to `splits`."""
    def counting_load(cfg, **kw):
        data = load_data(cfg, **kw)
        data.train = CountingSplit(data.train)
        splits.append(data.train)
        return data
    return counting_load


def test_private_data_is_read_only_by_the_dp_steps(tmp_path, monkeypatch):
    splits = []
    monkeypatch.setattr(train_module, "load_data", counting_loader(splits))
    cfg = tiny(tmp_path)
    report = train(cfg, ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    # Replay the sampler: each physical chunk reads the examples and the labels once, nothing else does.
    n = len(splits[0])
    batches = poisson_batches(n, cfg.train.batch_size / n, torch.Generator().manual_seed(cfg.train.seed + 1))
    chunks = sum(len(next(batches).split(cfg.train.physical_batch_size)) for _ in range(cfg.train.steps))
    assert splits[0].reads == 2 * chunks
    # Every method was evaluated after training, with no further read.
    assert report["methods"] == ["raw", "ema", "polyak", "swa", "fge"]  # SWAG's BMA: dpwa eval
    assert report["collected"]["fge"] == 4 and report["collected"]["swa"] == 4  # iterates 2, 6, 10, 14
    (run,) = Ledger(tmp_path / "l.sqlite").runs()  # one charge, whatever averaging is on
    assert run.status == "committed" and run.spent[0].steps == 14


def test_eval_cannot_read_the_private_split(tmp_path):
    data = load_data(load_config(QUICK).data, withhold_train=True)
    assert isinstance(data.train, Withheld) and len(data.train) == 1497 - 0
    with pytest.raises(PrivateDataAccess):
        data.train.x
    with pytest.raises(PrivateDataAccess):
        data.train.y
    # nor its labels through the ledger's identity of the source: only their fingerprint is kept
    full = load_data(load_config(QUICK).data)
    assert data.source == full.source == Source(fingerprint(full.train.y.tolist()), 1497)
    labels = full.train.y
    assert not any(isinstance(v, (torch.Tensor, np.ndarray)) and v.shape == labels.shape for v in vars(data).values())


def final_state(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_resume_mid_cycle_reproduces_every_average(tmp_path):
    full = train(tiny(tmp_path / "a"), ledger_path=str(tmp_path / "a.sqlite"), progress=False)
    # killed at step 9: the last checkpoint is step 8, inside the third cycle (steps 8-11, minimum at iterate 10)
    stopped = train(tiny(tmp_path / "b"), ledger_path=str(tmp_path / "b.sqlite"), progress=False, stop_after=9)
    resumed = train(resume=Path(stopped["run_dir"]), ledger_path=str(tmp_path / "b.sqlite"), progress=False)
    a, b = final_state(full["run_dir"]), final_state(resumed["run_dir"])
    assert_same(a["averagers"], b["averagers"], "averagers")
    assert_same(a["model"], b["model"], "model")
    for m in full["methods"]:
        assert resumed[f"test_{m}"] == full[f"test_{m}"], m


def test_dpwa_eval_reports_every_method_and_charges_nothing(tmp_path, capsys):
    led = tmp_path / "l.sqlite"
    r = train(tiny(tmp_path), ledger_path=str(led), progress=False)
    before = ledger_snapshot(led)
    assert main(["eval", r["run_dir"]]) == 0
    out = capsys.readouterr().out
    for m in ("raw", "ema", "polyak", "swa", "fge", "swag", "swag_diag"):
        assert f"  {m} " in out
    result = json.loads((Path(r["run_dir"]) / "eval.json").read_text())
    assert result["methods"]["fge"]["members"] == 4 and result["methods"]["swag"]["members"] == 5
    for m, s in result["methods"].items():
        assert 0 <= s["accuracy"] <= 1 and 0 <= s["ece"] <= 1 and 0 <= s["brier"] <= 2 and s["nll"] > 0, m
        if m in r["methods"]:
            assert s["accuracy"] == pytest.approx(r[f"test_{m}"]["accuracy"]), m  # same numbers as the train report
    png = Path(r["run_dir"]) / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ledger_snapshot(led) == before  # post-processing: no charge
    assert len(Ledger(led).runs()) == 1


def test_ensemble_prediction_is_the_mean_of_member_softmaxes():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8)
    split = Split(x, torch.randint(0, 3, (20,)))
    data = Data("t", split, split, None, torch.tensor([0.5]), torch.tensor([0.25]), 3,
                Source(fingerprint(split.y.tolist()), len(split)))
    members = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(3)]
    got = evaluate_members(members, split, data)
    xf = data.normalize(x)
    probs = torch.stack([m(xf).softmax(1) for m in members]).mean(0).detach()
    assert got == pytest.approx(metrics(probs, split.y))
    assert got["nll"] == pytest.approx(float(-probs[torch.arange(20), split.y].log().mean()), rel=1e-6)


def test_metrics_against_hand_computation():
    probs = torch.tensor([[0.9, 0.1], [0.62, 0.38], [0.3, 0.7], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 0])
    m = metrics(probs, labels)
    assert m["accuracy"] == 0.75
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.38) + math.log(0.7) + math.log(0.55)) / 4)
    assert m["brier"] == pytest.approx((2 * 0.1 ** 2 + 2 * 0.62 ** 2 + 2 * 0.3 ** 2 + 2 * 0.45 ** 2) / 4)
    # 15 bins (k/15, (k+1)/15]: confidence 0.9 -> bin 13 (right), 0.62 -> 9 (wrong), 0.7 -> 10 (right),
    # 0.55 -> 8 (right)
    ece = (abs(1 - 0.9) + abs(0 - 0.62) + abs(1 - 0.7) + abs(1 - 0.55)) / 4
    assert m["ece"] == pytest.approx(ece, rel=1e-6)
    bins = reliability_bins(probs, labels)
    assert [b["count"] for b in bins] == [0] * 8 + [1, 1, 1, 0, 0, 1, 0]
    assert reliability_bins(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))[-1]["count"] == 1  # 1.0 in the last bin


@pytest.mark.parametrize("extra, message", [
    (["averaging.swa_start=20", "averaging.swa_every=1"], "swa_start=20 is beyond the run"),
    (["averaging.polyak_start=14"], "polyak_start=14 is beyond the run"),
    (["optim.cycle_length=5"], "must be even"),
    (["train.steps=12"], "use train.steps=10"),
    (["averaging.swag_rank=1"], "swag_rank must be >= 2"),
    (["optim.schedule=constant", "optim.min_lr=0", "optim.cycle_length=0"], "averaging.snapshots takes the iterate at each lr minimum"),
])
def test_bad_averaging_input_is_refused_before_any_charge(tmp_path, capsys, extra, message):
    led = tmp_path / "l.sqlite"
    args = ["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}",
            "train.steps=14", "train.batch_size=64", *ALL, *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert ledger_snapshot(led) is None and not (tmp_path / "runs").exists()


def test_run_length_problems_come_all_at_once_before_the_data(tmp_path, capsys):
    """With train.steps given, every averaging start beyond the run is named in one message,
    before the data is read (a CIFAR config's ScatterNet features take minutes): here the data
    folder does not even exist, and its error must not be the one shown."""
    led = tmp_path / "l.sqlite"
    args = ["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}",
            "train.steps=14", "train.batch_size=64", *ALL, "averaging.polyak_start=14", "averaging.swa_start=20",
            "averaging.swa_every=1", "data.name=npz", f"data.root={tmp_path / 'missing'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "polyak_start=14 is beyond the run" in err and "swa_start=20 is beyond the run" in err
    assert "missing" not in err
    assert ledger_snapshot(led) is None and not (tmp_path / "runs").exists()


def test_exact_eval_on_the_validation_split_says_it_is_outside_the_guarantee(tmp_path, capsys):
    """The validation split is carved from the private source but held out of DP training:
    `dpwa eval --data val --val-noise 0` (exact metrics, uncharged) warns, as training's
    eval_split=val with val_noise=0 does, says so in its header and diagram title, and writes
    eval-val.json (covered_by_guarantee: false) next to, never over, the test split's eval.json.
    (The charged default: tests/dpwa/test_validation.py.)"""
    from dpwa.evaluate_run import evaluate_run

    run = train(load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=2", "train.batch_size=64",
                                    "data.val_size=100"]), ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    run_dir = Path(run["run_dir"])
    assert evaluate_run(run_dir)["covered_by_guarantee"] is True
    test = (run_dir / "eval.json").read_text()
    with pytest.warns(UserWarning, match="--data val with val noise 0: .* not covered by the DP guarantee"):
        val = evaluate_run(run_dir, split="val", val_noise=0)
    assert val["covered_by_guarantee"] is False and json.loads((run_dir / "eval-val.json").read_text()) == val
    assert (run_dir / "eval.json").read_text() == test and (run_dir / "reliability-val.png").exists()
    assert main(["eval", str(run_dir), "--data", "val", "--val-noise", "0"]) == 0
    out = capsys.readouterr()
    assert "val split (outside the DP guarantee)" in out.out and "not covered by the DP guarantee" in out.err


def test_eval_refuses_runs_that_lack_what_it_needs(tmp_path, capsys):
    led = str(tmp_path / "l.sqlite")
    plain = train(load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=4", "train.checkpoint_every=2",
                                      "train.batch_size=64", "privacy.noise_seed=1"]), ledger_path=led, progress=False)
    assert main(["eval", plain["run_dir"], "--methods", "fge"]) == 2
    assert "fge: not kept by this run (needs averaging.snapshots: true" in capsys.readouterr().err
    assert main(["eval", plain["run_dir"], "--data", "val"]) == 2
    assert "data.val_size=0" in capsys.readouterr().err
    assert main(["eval", plain["run_dir"]]) == 0  # raw, ema, polyak only
    assert set(json.loads((Path(plain["run_dir"]) / "eval.json").read_text())["methods"]) == {"raw", "ema", "polyak"}
    # a run killed before its first checkpoint has nothing to evaluate
    early = train(tiny(tmp_path / "e"), ledger_path=led, progress=False, stop_after=2)
    assert main(["eval", early["run_dir"]]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    # a run killed before its first lr minimum has no snapshot yet: asked for, refused; by default, skipped
    mid = train(tiny(tmp_path / "m"), ledger_path=led, progress=False, stop_after=5)  # checkpoint at step 4
    (Path(mid["run_dir"]) / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", mid["run_dir"]]) == 2
    assert "Cannot read" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a dpwa run folder" in capsys.readouterr().err


def test_eval_of_a_partial_run_skips_methods_without_enough_snapshots(tmp_path, capsys):
    led = str(tmp_path / "l.sqlite")
    # cycles of 8: the first minimum is iterate 4, the checkpoint at step 3 has none yet
    cfg = tiny(tmp_path, "optim.cycle_length=8", "train.steps=12", "train.checkpoint_every=3")
    mid = train(cfg, ledger_path=led, progress=False, stop_after=3)
    assert main(["eval", mid["run_dir"], "--methods", "swag"]) == 2
    assert "swag: collected 0 iterate(s) by step 3, needs 2" in capsys.readouterr().err
    assert main(["eval", mid["run_dir"], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["methods"]) == {"raw", "ema", "polyak"} and set(result["skipped"]) == {"swa", "fge", "swag",
                                                                                               "swag_diag"}


def test_eval_of_a_run_stopped_before_polyak_starts_skips_it_and_charges_nothing_for_it(tmp_path, capsys):
    """Polyak collects from averaging.polyak_start on: a checkpoint before it has no average.
    Skipped by default, refused by name, before the charged validation query is reserved."""
    led = tmp_path / "l.sqlite"
    cfg = tiny(tmp_path, "train.checkpoint_every=3", "averaging.polyak_start=8",
               "data.val_size=100")
    mid = train(cfg, ledger_path=str(led), progress=False, stop_after=4)  # checkpoint at step 3
    before = ledger_snapshot(led)
    assert main(["eval", mid["run_dir"], "--methods", "polyak", "--data", "val", "--ledger", str(led)]) == 2
    assert "polyak: collected 0 iterate(s) by step 3, needs 1" in capsys.readouterr().err
    assert ledger_snapshot(led) == before
    assert main(["eval", mid["run_dir"], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "polyak" not in result["methods"] and "polyak" in result["skipped"]


def test_eval_cli_lists_the_same_methods_as_the_averagers():
    from dpwa.averaging import METHODS
    from dpwa.cli.evaluate import METHODS as CLI_METHODS

    assert CLI_METHODS == METHODS
