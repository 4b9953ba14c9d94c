"""Charged validation accuracy (`dpwa.validation`): each released accuracy is the count of
correct single-example predictions plus the mechanism's noise, counted before it leaves and
refused beyond the reservation; `train.eval_split=val` reserves, calibrates for and commits
exactly what it released, a resumed run never draws its final accuracies twice, and
`dpwa eval --data val` is a charged query of its own."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from accounting import Gaussian, Ledger, epsilon
from dpwa.cli import main
from dpwa.config import ConfigError, DataConfig, load_config
from dpwa.data import ImageFiles, Split, carve, load_data
from dpwa.evaluate_run import evaluate_run
from dpwa.mechanism import ReleaseRefused
from dpwa.run_folder import load_run
from dpwa.train import plan_run, train
from dpwa.validation import ValidationAccuracy, planned_releases
from tests.conftest import ROOT, ledger_snapshot

QUICK = ROOT / "configs" / "quickstart.yaml"


def tiny(tmp_path, *extra):
    return load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=6", "train.checkpoint_every=3",
                               "train.batch_size=64", "train.physical_batch_size=64", "augmult.k=1",
                               "data.val_size=100", "train.eval_split=val", "train.val_noise=0.2", *extra])


def _outside_warnings(record):
    return [str(w.message) for w in record if "not covered by the DP guarantee" in str(w.message)]


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(name="digits", val_size=60))


def test_a_released_accuracy_is_the_count_of_single_example_predictions_plus_its_noise(digits):
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(64, 10)) for _ in range(2)]
    val = digits.val
    mech = ValidationAccuracy(noise=0.05, size=len(val), releases=2, generator=torch.Generator().manual_seed(5))
    released = [mech.accuracy([models[0]], val, digits), mech.accuracy(models, val, digits)]

    reference_noise = torch.Generator().manual_seed(5)
    for members, got in zip(([models[0]], models), released):
        correct = 0
        for i in range(len(val)):  # one example at a time, float64: the ensemble's mean softmax
            x = digits.normalize(val.x[i:i + 1]).double()
            probs = sum(m.double()(x).softmax(-1) for m in members) / len(members)
            correct += int(probs.argmax(1).item() == int(val.y[i]))
        for m in members:
            m.float()
        noise = torch.normal(0.0, 0.05 * len(val), size=(1,), dtype=torch.float64, generator=reference_noise)
        assert got == pytest.approx(min(max((correct + float(noise[0])) / len(val), 0.0), 1.0), abs=1e-12)
    assert mech.released == 2 and mech.events() == [Gaussian(noise_multiplier=0.05 * len(val), count=2)]


def test_a_release_beyond_the_reservation_reads_nothing(digits):
    mech = ValidationAccuracy(noise=0.01, size=len(digits.val), releases=1)
    mech.accuracy([nn.Sequential(nn.Flatten(), nn.Linear(64, 10))], digits.val, digits)

    def untouchable():
        raise AssertionError("a refused release read a model")
        yield

    with pytest.raises(ReleaseRefused, match="validation accuracy refused: the ledger reserved 1 releases and all were made"):
        mech.accuracy(untouchable(), digits.val, digits)
    assert mech.released == 1


def test_a_noisy_accuracy_is_clipped_to_0_1(digits):
    mech = ValidationAccuracy(noise=100.0, size=len(digits.val), releases=20, generator=torch.Generator().manual_seed(0))
    values = [mech.accuracy([nn.Sequential(nn.Flatten(), nn.Linear(64, 10))], digits.val, digits) for _ in range(20)]
    assert set(values) <= {0.0, 1.0} and len(set(values)) == 2


def test_val_noise_is_checked_by_name(tmp_path):
    with pytest.raises(ConfigError, match="train.val_noise must be 0 or a finite number >= 1e-50.*got -0.1"):
        tiny(tmp_path, "train.val_noise=-0.1")


def test_the_plan_counts_every_validation_accuracy_and_calibrates_with_them(tmp_path):
    cfg = tiny(tmp_path, "train.eval_every=2", "averaging.swa=true", "averaging.swa_start=2", "averaging.swa_every=1",
               "privacy.epsilon=3", "train.val_noise=0.2")
    assert planned_releases(cfg, 6) == 2 * 4 + 4  # steps 2 and 4: raw, EMA, Polyak, SWA; the end: the same
    plan = plan_run(cfg, 1497 - 100)
    assert plan.validation == Gaussian(noise_multiplier=0.2 * 100, count=12)
    assert plan.events == [plan.validation, plan.event]
    assert epsilon(plan.events, delta=1e-4, accountant="prv") == pytest.approx(3.0, rel=1e-2)
    without = plan_run(tiny(tmp_path, "train.eval_every=2", "privacy.epsilon=3", "train.eval_split=test"), 1397)
    assert without.validation is None and without.noise_multiplier < plan.noise_multiplier
    assert plan_run(tiny(tmp_path, "train.val_noise=0"), 1397).validation is None


def test_validation_accuracies_that_alone_spend_the_target_are_refused_by_name(tmp_path):
    cfg = tiny(tmp_path, "train.eval_every=1", "privacy.epsilon=3", "train.val_noise=0.01")
    with pytest.raises(ConfigError, match=r"leaves nothing for the gradients: validation accuracies "
                                          r"\(train.eval_split=val: 18 of them, noise std 0.01 on 100 examples\)"):
        plan_run(cfg, 1397)
    assert main(["train", str(QUICK), f"out_dir={tmp_path / 'runs'}", "data.val_size=100", "train.eval_split=val",
                 "train.eval_every=1", "train.val_noise=0.01", f"privacy.ledger={tmp_path / 'l.sqlite'}"]) == 2
    assert not (tmp_path / "l.sqlite").exists() and not (tmp_path / "runs").exists()


def test_a_run_on_the_validation_split_commits_exactly_the_accuracies_it_released(tmp_path):
    led = tmp_path / "l.sqlite"
    cfg = tiny(tmp_path, "train.eval_every=2", "averaging.swa=true", "averaging.swa_start=3", "averaging.swa_every=1")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = train(cfg, ledger_path=str(led), progress=False)
    assert not _outside_warnings(record) and report["outside_guarantee"] == []
    v = report["validation"]
    # step 2: raw, EMA, Polyak (SWA has collected nothing); step 4: + SWA; the end: raw, EMA, Polyak, SWA
    assert (v["releases"], v["reserved"], v["noise_multiplier"]) == (3 + 4 + 4, 12, pytest.approx(20.0))
    run = Ledger(led).run(report["run_id"])
    assert run.status == "committed"
    assert Gaussian(noise_multiplier=20.0, count=11) in run.spent and Gaussian(noise_multiplier=20.0, count=12) in run.planned
    assert report["val_raw"].keys() == {"accuracy"}  # only the charged accuracy: no exact NLL, ECE or Brier
    assert report["epsilon"] == pytest.approx(epsilon(list(run.spent), delta=1e-4, accountant="prv"))
    assert load_run(Path(report["run_dir"])).epsilon == pytest.approx(report["epsilon"])
    without = epsilon([e for e in run.spent if not isinstance(e, Gaussian)], delta=1e-4, accountant="prv")
    assert report["epsilon"] > without  # the accuracies count
    rows = [json.loads(line) for line in (Path(report["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    evaluated = sorted(k for r in rows for k in r if k.startswith("val_"))
    assert evaluated == sorted(["val_raw_accuracy", "val_ema_accuracy", "val_polyak_accuracy"] * 2
                               + ["val_swa_accuracy"])


def test_a_rows_epsilon_counts_the_accuracies_released_so_far(tmp_path):
    """Exact at checkpoints; in between an upper bound of what was released by then, with the
    accuracies released so far counted (rounded up on a grid), not every planned one."""
    import dataclasses

    from accounting.events import PoissonGaussian

    led = tmp_path / "l.sqlite"
    cfg = tiny(tmp_path, "train.steps=9", "train.eval_every=1", "train.checkpoint_every=4")
    report = train(cfg, ledger_path=str(led), progress=False)
    run = Ledger(led).run(report["run_id"])
    (grad,) = [e for e in run.spent if isinstance(e, PoissonGaussian)]
    (acc,) = [e for e in run.spent if isinstance(e, Gaussian)]
    (planned,) = [e for e in run.planned if isinstance(e, Gaussian)]
    rows = [json.loads(line) for line in (Path(report["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    released, looser = 0, 0
    for r in rows:
        released += sum(k.startswith("val_") for k in r)
        exact = epsilon([dataclasses.replace(grad, steps=r["step"]), dataclasses.replace(acc, count=released)],
                        delta=1e-4, accountant="prv")
        every_planned = epsilon([dataclasses.replace(grad, steps=r["step"]), planned], delta=1e-4, accountant="prv")
        if r["step"] % 4 == 0:
            assert r["epsilon"] == pytest.approx(exact, rel=1e-6)
        else:
            assert exact * (1 - 1e-6) <= r["epsilon"]
            looser += r["epsilon"] < every_planned * (1 - 1e-3)
    assert released == 24 and planned.count == 27 and looser >= 3


def test_exact_validation_metrics_warn_and_are_listed_outside_the_guarantee(tmp_path):
    led = tmp_path / "l.sqlite"
    with pytest.warns(UserWarning, match="train.val_noise=0: accuracy on examples held out"):
        report = train(tiny(tmp_path, "train.val_noise=0"), ledger_path=str(led), progress=False)
    assert report["outside_guarantee"] == ["train.eval_split=val with train.val_noise=0"]
    assert "nll" in report["val_raw"] and "validation" not in report
    assert len(Ledger(led).run(report["run_id"]).spent) == 1  # the gradients alone


def test_a_run_killed_after_its_report_reports_the_same_accuracies_on_resume_and_charges_them_once(tmp_path,
                                                                                                monkeypatch):
    """Killed between report.json and the commit: the released accuracies are on disk, so the
    resumed run must show them again, not a second draw that the ledger would count in their place."""
    from dpwa.run_folder import RunFolder

    led = tmp_path / "l.sqlite"
    publish = RunFolder.publish

    def killed(self, staged):
        publish(self, staged)
        if any(p.name.endswith("report.json") for p in staged):
            raise KeyboardInterrupt  # report.json in place, before the commit

    monkeypatch.setattr(RunFolder, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path), ledger_path=str(led), progress=False)
    (run_dir,) = (tmp_path / "runs").iterdir()
    (run,) = Ledger(led).runs()
    assert run.status == "reserved" and Gaussian(noise_multiplier=20.0, count=3) in run.spent  # kept at once
    written = json.loads((run_dir / "report.json").read_text())

    monkeypatch.undo()
    report = train(resume=run_dir, ledger_path=str(led), progress=False)
    assert [report[f"val_{name}"] for name in report["methods"]] == [written[f"val_{name}"] for name in
                                                                     written["methods"]]  # the same draw
    assert report["validation"]["releases"] == 3
    assert Gaussian(noise_multiplier=20.0, count=3) in Ledger(led).run(report["run_id"]).spent


def test_a_seeded_run_resumed_draws_the_validation_noise_an_uninterrupted_one_draws(tmp_path):
    """A test run with privacy.noise_seed (marked not private) keeps its validation generator's
    state in the checkpoint: a resumed run is the uninterrupted run, and no noise draw is
    used twice (two accuracies with one draw would give the exact difference of two counts)."""
    def val_rows(run_dir):
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], k, v) for r in rows for k, v in sorted(r.items()) if k.startswith("val_")]

    extra = ("privacy.noise_seed=3", "train.eval_every=1")
    whole = train(tiny(tmp_path / "a", *extra), ledger_path=str(tmp_path / "a.sqlite"), progress=False)
    stopped = train(tiny(tmp_path / "b", *extra), ledger_path=str(tmp_path / "b.sqlite"), progress=False,
                    stop_after=3)
    resumed = train(resume=Path(stopped["run_dir"]), ledger_path=str(tmp_path / "b.sqlite"), progress=False)
    assert len(val_rows(whole["run_dir"])) == 15 and val_rows(resumed["run_dir"]) == val_rows(whole["run_dir"])
    assert [resumed[f"val_{m}"] for m in resumed["methods"]] == [whole[f"val_{m}"] for m in whole["methods"]]


def test_eval_on_the_validation_split_is_a_charged_query(tmp_path, capsys):
    led = tmp_path / "l.sqlite"
    report = train(tiny(tmp_path, "train.eval_split=test"), ledger_path=str(led), progress=False)
    run_dir = Path(report["run_dir"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = evaluate_run(run_dir, split="val", val_noise=0.02)
    assert not _outside_warnings(record) and out["covered_by_guarantee"]
    assert set(out["methods"]) == {"raw", "ema", "polyak"}
    assert all(r.keys() == {"accuracy", "members"} for r in out["methods"].values())
    q = out["charged"]
    query = Ledger(led).run(q["query_run_id"])
    assert query.status == "committed" and list(query.spent) == [Gaussian(noise_multiplier=0.02 * 100, count=3)]
    assert out["reliability_diagram"] is None and Path(out["eval_json"]).name == "eval-val.json"

    assert main(["eval", str(run_dir), "--data", "val", "--ledger", str(tmp_path / "other.sqlite")]) == 2
    assert "is not in ledger" in capsys.readouterr().err
    before = ledger_snapshot(led)
    assert main(["eval", str(run_dir), "--data", "val", "--val-noise", "1e-300"]) == 2  # under the accountants' floor
    assert "val_noise must be 0 or a finite number >= 1e-50" in capsys.readouterr().err and ledger_snapshot(led) == before
    (run_dir / "eval-val.json").rename(run_dir / "kept.json")
    (run_dir / "eval-val.json").mkdir()  # in the way: the accuracies would be released, then lost
    assert main(["eval", str(run_dir), "--data", "val"]) == 2
    assert "is in the way, not a file" in capsys.readouterr().err and ledger_snapshot(led) == before
    (run_dir / "eval-val.json").rmdir()
    assert not (tmp_path / "other.sqlite").exists()
    assert main(["eval", str(run_dir), "--data", "val", "--methods", "raw", "raw"]) == 0  # one release, not two
    assert "charged" in capsys.readouterr().out
    assert Ledger(led).run(report["run_id"]).status == "committed" and len(Ledger(led).runs()) == 3
    (last,) = [r for r in Ledger(led).runs() if r.run_id not in (report["run_id"], q["query_run_id"])]
    assert list(last.spent) == [Gaussian(noise_multiplier=0.2 * 100, count=1)]  # the run's val_noise


def test_eval_on_the_validation_split_past_the_budget_is_refused_before_anything_is_read(tmp_path):
    led = tmp_path / "l.sqlite"
    report = train(tiny(tmp_path, "train.eval_split=test"), ledger_path=str(led), progress=False)
    ledger = Ledger(led)
    ledger.set_budget(report["dataset"], epsilon=report["dataset_epsilon_spent"] + 1e-3, delta=1e-4)
    assert main(["eval", report["run_dir"], "--data", "val", "--val-noise", "0.001"]) == 1
    assert len(Ledger(led).runs()) == 1
    assert not (Path(report["run_dir"]) / "eval-val.json").exists()


def test_a_run_folder_from_before_charged_validation_resumes_as_it_was_reserved(tmp_path):
    """Its config.yaml has no train.val_noise: it evaluated exactly and reserved no accuracies,
    so it reads as val_noise=0 and resumes under its reservation."""
    led = tmp_path / "l.sqlite"
    with pytest.warns(UserWarning, match="train.val_noise=0"):
        stopped = train(tiny(tmp_path, "train.val_noise=0"), ledger_path=str(led), progress=False, stop_after=3)
    config = Path(stopped["run_dir"]) / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.strip().startswith("val_noise:")))
    with pytest.warns(UserWarning, match="train.val_noise=0"):
        report = train(resume=Path(stopped["run_dir"]), ledger_path=str(led), progress=False)
    assert Ledger(led).run(report["run_id"]).status == "committed" and "validation" not in report


def test_a_run_whose_statistics_and_accuracies_share_a_noise_multiplier_resumes(tmp_path):
    """The ledger merges equal mechanisms (feature statistics at sigma 8, validation accuracies
    at 0.08 x 100 = 8): the resume check compares the plan as the ledger holds it."""
    from tests.dpwa.test_statistics import PRIVATE

    led = tmp_path / "l.sqlite"
    cfg = tiny(tmp_path, *PRIVATE, "train.val_noise=0.08", "privacy.epsilon=8")
    stopped = train(cfg, ledger_path=str(led), progress=False, stop_after=3)
    assert Ledger(led).run(stopped["run_id"]).planned[0] == Gaussian(noise_multiplier=8.0, count=2 + 3)
    report = train(resume=Path(stopped["run_dir"]), ledger_path=str(led), progress=False)
    assert Ledger(led).run(report["run_id"]).status == "committed" and report["validation"]["releases"] == 3


def test_eval_of_a_run_that_evaluated_exactly_is_charged_unless_0_is_asked_for(tmp_path):
    led = tmp_path / "l.sqlite"
    with pytest.warns(UserWarning, match="train.val_noise=0"):
        report = train(tiny(tmp_path, "train.val_noise=0"), ledger_path=str(led), progress=False)
    out = evaluate_run(Path(report["run_dir"]), split="val")
    assert out["charged"]["noise"] == 0.01 and out["covered_by_guarantee"]
    assert list(Ledger(led).run(out["charged"]["query_run_id"]).spent) == [Gaussian(noise_multiplier=1.0, count=3)]


def test_a_curve_between_runs_that_evaluated_exactly_charges_its_own_accuracies(tmp_path):
    from dpwa.connectivity import curve_config

    led = tmp_path / "l.sqlite"
    ends = []
    for seed in (0, 1):
        with pytest.warns(UserWarning, match="train.val_noise=0"):
            ends.append(train(tiny(tmp_path, "train.val_noise=0", f"train.seed={seed}"), ledger_path=str(led),
                              progress=False)["run_dir"])
    assert curve_config(*ends).train.val_noise == 0.01
    assert curve_config(*ends, overrides=["train.val_noise=0"]).train.val_noise == 0


def test_budget_rescaling_counts_the_validation_accuracies_of_the_new_length(tmp_path, capsys):
    """At a smaller batch the same epochs take more steps; the table tells to scale
    train.eval_every with them (the same evaluations per epoch), and the sigma it gives must
    spend the target for the config that follows that advice."""
    from dpwa.train import plan_run

    config = tmp_path / "val.yaml"
    config.write_text((QUICK.read_text() + "\n").replace("train:\n", "train:\n  eval_split: val\n  eval_every: 25\n"
                                                         "  val_noise: 0.05\n").replace("data:\n", "data:\n  val_size: 300\n"))
    assert main(["budget", "--config", str(config), "--batch-size", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    same, current = out["same_epochs"], out["current"]
    assert out["step_keys"]["train.eval_every"] == 25
    every = out["same_epochs_eval_every"]
    assert every == int(25 * same["steps"] / current["steps"] + 0.5)  # scaled, rounded half up
    cfg = load_config(config, ["train.batch_size=64", f"train.steps={same['steps']}", "privacy.epsilon=null",
                               f"train.eval_every={every}", f"privacy.noise_multiplier={same['noise_multiplier']}"])
    plan = plan_run(cfg, 1497 - 300)
    before = planned_releases(load_config(config), current["steps"])
    assert every > 25 and abs(plan.validation.count - before) <= 3  # about as many evaluations as before
    assert epsilon(plan.events, delta=1e-4, accountant="prv") == pytest.approx(3.0, rel=0.02)


def _carved(split, size, seed, how):
    from dpwa.data import _example_keys

    keys = _example_keys(split)
    v, t = carve(split, size, seed, how)
    return {keys[i] for i in v.tolist()}, {keys[i] for i in t.tolist()}


def test_the_stable_carve_moves_at_most_one_other_example_when_one_is_added():
    """Neighbouring data (one example more) gives neighbouring splits: the validation split
    changes by at most one swap, the training split by the one example (or the one swapped
    out). The permutation carve of earlier versions reshuffles both."""
    whole = load_data(DataConfig(name="digits")).train
    new = whole.x[:1].flip(-1)  # an image the data does not hold
    at = 700
    plus = Split(torch.cat([whole.x[:at], new, whole.x[at:]]), torch.cat([whole.y[:at], whole.y[:1], whole.y[at:]]))
    for seed in range(10):
        (v0, t0), (v1, t1) = _carved(whole, 100, seed, "stable"), _carved(plus, 100, seed, "stable")
        assert len(v0) == len(v1) == 100 and len(v0 ^ v1) in (0, 2)
        assert len(t1 - t0) == 1 and not t0 - t1
    (v0, _), (v1, _) = _carved(whole, 100, 0, "permutation"), _carved(plus, 100, 0, "permutation")
    assert len(v0 ^ v1) > 150  # nearly every validation example changed


def test_the_stable_carve_is_a_function_of_the_examples_and_the_seed():
    whole = load_data(DataConfig(name="digits")).train
    shuffled = torch.randperm(len(whole), generator=torch.Generator().manual_seed(3))
    moved = Split(whole.x[shuffled], whole.y[shuffled])
    assert _carved(whole, 100, 1, "stable") == _carved(moved, 100, 1, "stable")  # the order does not matter
    assert _carved(whole, 100, 1, "stable")[0] != _carved(whole, 100, 2, "stable")[0]
    v, t = carve(whole, 100, 1)
    assert sorted(torch.cat([v, t]).tolist()) == list(range(len(whole)))  # a partition, each part in order
    assert v.tolist() == sorted(v.tolist()) and t.tolist() == sorted(t.tolist())
    # image files: their path below the split's folder, wherever the data lies (no decoding)
    files = [f"c{i % 2}/img{i}.png" for i in range(50)]
    labels = torch.arange(50) % 2
    here, there = (Split(ImageFiles([f"{root}/train/{f}" for f in files], 8, f"{root}/train"), labels)
                   for root in ("/data", "/mnt/copy"))
    assert here.x.names() == files and here.x.take([3]).names() == files[3:4]
    assert carve(here, 10, 0)[0].tolist() == carve(there, 10, 0)[0].tolist()
    # nested folders inside a class folder: two files of one name in different sub-folders differ
    nested = ImageFiles(["/d/train/c0/a/x.png", "/d/train/c0/b/x.png"], 8, "/d/train/")
    assert nested.names() == ["c0/a/x.png", "c0/b/x.png"]
    assert ImageFiles(["/d/train/c0/a/x.png"], 8).names() == ["a/x.png"]  # no root: the last two parts


def test_the_carve_seed_is_its_own_so_runs_of_different_seeds_hold_out_one_split(tmp_path):
    from dpwa.config import config_from_yaml_text, config_to_yaml

    cfg = DataConfig(name="digits", val_size=50)
    a, b = (load_data(cfg).val for _ in range(2))
    assert torch.equal(a.x, b.x)
    other = load_data(DataConfig(name="digits", val_size=50, val_seed=7)).val
    assert not torch.equal(a.x, other.x)
    for seed in (2**63, -2**63 - 1):
        with pytest.raises(ConfigError, match=rf"data.val_seed must fit in 64 bits \(-2\*\*63 <= seed < 2\*\*63\), got {seed}"):
            DataConfig(val_seed=seed)
    assert DataConfig(val_seed=2**63 - 1).val_seed == 2**63 - 1
    # a run folder from before data.val_seed was carved with its train.seed
    text = config_to_yaml(tiny(tmp_path, "train.seed=5"))
    assert config_from_yaml_text(text).data.val_seed == 0
    old = "".join(line for line in text.splitlines(keepends=True) if "val_seed" not in line)
    assert config_from_yaml_text(old).data.val_seed == 5
    uncarved = config_to_yaml(tiny(tmp_path, "train.seed=5", "data.val_size=0", "train.eval_split=test"))
    old = "".join(line for line in uncarved.splitlines(keepends=True) if "val_seed" not in line)
    assert config_from_yaml_text(old).data.val_seed == 0  # no split was carved: its seed chose nothing


def test_a_private_run_on_a_permutation_carve_warns_and_lists_it_outside_the_guarantee(tmp_path):
    """So do the charged queries that read its splits afterwards: they assume neighbouring
    splits, which the permutation carve does not give."""
    from dpwa.landscape import LandscapeSpec, landscape_run

    led = tmp_path / "l.sqlite"
    permuted = "data.val_carve=permutation: the choice of the validation split"
    with pytest.warns(UserWarning, match=permuted):
        report = train(tiny(tmp_path, "data.val_carve=permutation"), ledger_path=str(led), progress=False)
    assert report["outside_guarantee"] == ["data.val_carve=permutation"]
    run_dir = Path(report["run_dir"])
    with pytest.warns(UserWarning, match=permuted):
        assert evaluate_run(run_dir, split="val", ledger_path=str(led))["covered_by_guarantee"] is False
    assert evaluate_run(run_dir, split="test")["covered_by_guarantee"] is True  # the test split is public
    spec = LandscapeSpec(dims=1, points=(2,), split="val", examples=20, train_noise_multiplier=2.0, loss_clip=2.0)
    with pytest.warns(UserWarning, match=permuted):
        assert landscape_run(run_dir, spec, out=tmp_path / "ls", ledger_path=str(led))["outside_guarantee"] == [
            "data.val_carve=permutation"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = train(tiny(tmp_path, "data.val_carve=permutation", "data.val_size=0", "train.eval_split=test"),
                       ledger_path=str(led), progress=False)
    assert not _outside_warnings(record) and report["outside_guarantee"] == []  # no split carved: nothing to warn


def test_run_folders_from_before_the_stable_carve_read_as_permutation(tmp_path):
    from dpwa.config import config_from_yaml_text, config_to_yaml

    text = config_to_yaml(tiny(tmp_path))
    assert config_from_yaml_text(text).data.val_carve == "stable"
    old = "".join(line for line in text.splitlines(keepends=True) if "val_carve" not in line)
    assert config_from_yaml_text(old).data.val_carve == "permutation"
    with pytest.raises(ConfigError, match="data.val_carve must be stable or permutation, got 'random'"):
        tiny(tmp_path, "data.val_carve=random")
