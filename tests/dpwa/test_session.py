"""The session loop's privacy structure: methods plug in and cannot overspend, delta >= 1/N
is refused before any charge, the state and run folder (old ones too) load through
`load_run`, and averagers keep trainable parameters only."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from accounting import Ledger
from accounting.errors import DeltaAboveOneOverNError
from dpwa.averaging import SWAG, EMA, Every, Snapshots
from dpwa.cli import main
from dpwa.config import ConfigError, load_config
from dpwa.mechanism import ReleaseRefused
from dpwa.methods import METHODS, register_method
from dpwa.methods.dpsgd import DPSGD
from dpwa.run_folder import load_run
from dpwa.train import train
from tests.conftest import ROOT, ledger_snapshot

QUICK = ROOT / "configs" / "quickstart.yaml"
PRECHANGE = Path(__file__).parent.parent / "fixtures" / "prechange_run"


def tiny(tmp_path, *extra):
    return load_config(QUICK, [f"out_dir={tmp_path / 'runs'}", "train.steps=6", "train.checkpoint_every=3",
                               "train.batch_size=64", "train.physical_batch_size=64", "augmult.k=2", *extra])


@pytest.fixture
def greedy_method():
    """A method that declares one release per step but takes a second one at step 5."""

    @register_method
    class Greedy(DPSGD):
        name = "test-greedy"

        def step(self, step):
            out = super().step(step)
            if step.index == 4:
                step.release()  # undeclared: must be refused
            return out

    yield Greedy
    del METHODS["test-greedy"]


def test_a_release_beyond_the_reservation_is_refused_and_the_ledger_holds_the_reservation(tmp_path, greedy_method):
    led = tmp_path / "l.sqlite"
    cfg = tiny(tmp_path, "method.name=test-greedy")
    with pytest.raises(ReleaseRefused, match="release 7 refused: the ledger reserved 6"):
        train(cfg, ledger_path=str(led), progress=False)
    (run,) = Ledger(led).runs()
    assert run.status == "reserved"  # counted in full: exactly the reservation, never more
    assert [e.steps for e in run.planned] == [6] and [e.steps for e in run.counted] == [6]
    assert [e.steps for e in run.spent] == [3]  # progress at the last checkpoint, from the mechanism's count


def test_the_cli_exits_1_on_an_overrun(tmp_path, capsys, greedy_method):
    led = tmp_path / "l.sqlite"
    code = main(["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}",
                 "train.steps=6", "train.batch_size=64", "method.name=test-greedy"])
    assert code == 1 and "release 7 refused" in capsys.readouterr().err


def test_dpsgd_reserves_and_commits_exactly_its_releases(tmp_path):
    led = tmp_path / "l.sqlite"
    report = train(tiny(tmp_path, "privacy.noise_seed=1"), ledger_path=str(led), progress=False)
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and [e.steps for e in run.spent] == [6] == [report["releases"]]
    assert report["outside_guarantee"] == []
    assert "examples_seen" not in report and report["expected_examples"] == pytest.approx(6 * 64)
    rows = [json.loads(x) for x in (Path(report["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert not any("batch_size" in k or "loss" in k for r in rows for k in r)  # the private batch's stay here


def test_private_diagnostics_are_written_only_when_asked_for_and_warn(tmp_path):
    """Each private batch's mean loss and realised size are measured on private data without
    the mechanism: kept out of metrics.jsonl, TensorBoard and curves.png unless asked for."""
    led = tmp_path / "l.sqlite"
    with pytest.warns(UserWarning, match="train.private_diagnostics=true: each private batch's loss and realised "
                                         "size .* not covered by the DP guarantee"):
        report = train(tiny(tmp_path, "privacy.noise_seed=1", "train.private_diagnostics=true"), ledger_path=str(led),
                       progress=False)
    rows = [json.loads(x) for x in (Path(report["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all({"private_batch_loss_diagnostic", "private_batch_size_diagnostic"} <= set(r) for r in rows)
    assert "private_batch" not in (Path(report["run_dir"]) / "report.json").read_text()
    assert report["outside_guarantee"] == ["train.private_diagnostics=true"]


@pytest.mark.parametrize("delta", [1e-3, 0.5])
def test_delta_at_or_above_1_over_n_is_refused_before_any_charge(tmp_path, capsys, delta):
    led = tmp_path / "l.sqlite"
    args = ["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}",
            "train.steps=4", "train.batch_size=64", f"privacy.delta={delta}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"privacy.delta={delta:g} is not below 1/N" in err and "privacy.accept_delta_above_1_over_n" in err
    assert ledger_snapshot(led) is None and not (tmp_path / "runs").exists()
    with pytest.raises(DeltaAboveOneOverNError):
        train(tiny(tmp_path, f"privacy.delta={delta}"), ledger_path=str(led), progress=False)


def test_delta_above_1_over_n_trains_when_accepted_by_name(tmp_path):
    with pytest.warns(UserWarning, match="accepted by privacy.accept_delta_above_1_over_n"):
        report = train(tiny(tmp_path, "privacy.delta=1e-3", "privacy.accept_delta_above_1_over_n=true"),
                       ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    assert report["delta"] == 1e-3


def test_load_run_returns_the_released_run(tmp_path):
    report = train(tiny(tmp_path, "privacy.noise_seed=1", "averaging.swa=true", "averaging.swa_start=2",
                        "averaging.swa_every=1"), ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    run = load_run(Path(report["run_dir"]))
    assert run.step == run.releases == 6 and run.epsilon == pytest.approx(report["epsilon"])
    assert set(run.averagers) == {"ema", "polyak", "swa"} and run.averagers["swa"].count == 4
    ckpt = torch.load(Path(report["run_dir"]) / "checkpoint.pt", weights_only=True)
    assert ckpt["version"] == 2 and ckpt["mechanism"] == {"released": 6, "releases": 6}
    assert ckpt["coins"]  # a test run (noise seed): its generators may be written ...
    meta_path = Path(report["run_dir"]) / "run.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "noise_multiplier": 50.0}))  # an edit that would show a smaller epsilon
    with pytest.raises(ConfigError, match=r"give PoissonGaussian\(noise_multiplier=50.0.* the files were edited"):
        load_run(Path(report["run_dir"]))
    (tmp_path / "l.sqlite").rename(tmp_path / "moved.sqlite")  # away from its ledger: read as it is
    assert load_run(Path(report["run_dir"])).epsilon < run.epsilon


def test_a_resumed_run_is_private_only_if_it_was_and_its_noise_is_still_secret(tmp_path):
    """The label on resume: what run.json recorded at the start (the runs it was built on may
    have moved since) and the config it resumes with (a folder from before run.json kept its
    release count is not hash-checked, so a noise seed set there must still count)."""
    led = str(tmp_path / "l.sqlite")
    stopped = train(tiny(tmp_path), ledger_path=led, progress=False, stop_after=3)
    run_dir = Path(stopped["run_dir"])
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "releases"}))
    text = (run_dir / "config.yaml").read_text()
    assert "  noise_seed: null\n" in text
    (run_dir / "config.yaml").write_text(text.replace("  noise_seed: null\n", "  noise_seed: 5\n"))
    assert train(resume=run_dir, ledger_path=led, progress=False)["private"] is False


def test_a_private_checkpoint_holds_no_generator_state(tmp_path):
    report = train(tiny(tmp_path), ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    ckpt = torch.load(Path(report["run_dir"]) / "checkpoint.pt", weights_only=True)
    assert ckpt["coins"] == {} and "sample_rng" not in ckpt and "noise_rng" not in ckpt  # ... a private one's never


def test_a_private_run_takes_no_generator_state_from_a_checkpoint():
    """Known coins void the guarantee: a crafted checkpoint's, or the sample_rng (seeded from
    train.seed + 1) that version 1 checkpoints held for private runs too. A reproducible run
    (a noise seed, public data) resumes where its generators stood."""
    from dpwa.state import Coins, upgrade

    known = torch.Generator().manual_seed(1)
    saved = {"sample_rng": known.get_state(), "noise_rng": known.get_state()}
    private = Coins(sampling=torch.Generator().manual_seed(7), noise=torch.Generator().manual_seed(8), reproducible=False)
    fresh = (private.sampling.get_state(), private.noise.get_state())
    private.load_state_dict(saved)
    private.load_state_dict(upgrade({"model": {}, "optimizer": {}, "step": 3, **saved})["coins"])
    assert torch.equal(private.sampling.get_state(), fresh[0]) and torch.equal(private.noise.get_state(), fresh[1])
    public = Coins(sampling=torch.Generator().manual_seed(7), noise=torch.Generator().manual_seed(8), reproducible=True)
    public.load_state_dict(saved)
    assert torch.equal(public.sampling.get_state(), known.get_state())


def test_a_run_folder_from_before_versioned_checkpoints_still_evaluates(tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(PRECHANGE, old)
    assert "version" not in torch.load(old / "checkpoint.pt", weights_only=True)  # the old layout
    run = load_run(old)
    assert run.step == run.releases == 6 and 0 < run.epsilon < 3
    assert main(["eval", str(old), "--json"]) == 0
    out = json.loads((old / "eval.json").read_text())
    assert out["step"] == 6 and {"raw", "ema", "polyak", "swa"} <= set(out["methods"])
    assert out["epsilon"] == pytest.approx(run.epsilon)


def test_a_newer_checkpoint_version_is_refused_with_a_message(tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(PRECHANGE, old)
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    torch.save({**state, "version": 99}, old / "checkpoint.pt")
    assert main(["eval", str(old)]) == 2
    assert "state version 99; this dpwa reads up to 2" in capsys.readouterr().err


def test_averagers_keep_trainable_parameters_only_and_share_the_frozen_ones():
    model = nn.Sequential(nn.Linear(50, 40), nn.Linear(40, 3))
    model[0].requires_grad_(False)  # a frozen trunk, a trainable head
    rule = Every(0, 1)
    ema, snaps, swag = EMA(model, decay=0.9), Snapshots(model, rule=rule), SWAG(model, rule=rule, rank=2)
    head = 40 * 3 + 3
    assert ema.model[0].weight is model[0].weight  # shared, not copied once per averager
    for t in range(1, 4):
        with torch.no_grad():
            model[1].weight.add_(1.0)
        for avg in (ema, snaps, swag):
            avg.update(model, t)
    assert set(ema.state_dict()["weights"]) == {"1.weight", "1.bias"}
    assert snaps.state_dict()["vectors"].shape == (3, head) and swag.mean.shape == (head,)
    assert torch.equal(next(snaps.members()) [0].weight, model[0].weight)
    fresh = EMA(model, decay=0.9)
    fresh.load_state_dict(ema.state_dict())
    assert torch.equal(fresh.model[1].weight, ema.model[1].weight)
    fresh.load_state_dict({"count": 1, "weights": {k: v for k, v in ema.model.state_dict().items()}})  # old layout


def test_the_optimizer_registry_trains_adam_and_refuses_another_optimizers_fields(tmp_path, capsys):
    report = train(tiny(tmp_path, "privacy.noise_seed=1", "optim.name=adamw", "optim.lr=0.01",
                        "optim.weight_decay=0.01", "optim.schedule=constant", "optim.warmup_steps=0"),
                   ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    assert report["releases"] == 6
    led = tmp_path / "l2.sqlite"
    for bad, needle in ((["optim.name=adam", "optim.momentum=0.9"], "optim.momentum / optim.nesterov are for sgd"),
                        (["optim.name=lion"], "optim.name must be one of adam, adambc, adamw, padam, sgd; got 'lion'"),
                        (["method.name=entropy"], "method.name must be one of")):
        assert main(["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'r2'}",
                     *bad]) == 2
        assert needle in capsys.readouterr().err
    assert ledger_snapshot(led) is None and not (tmp_path / "r2").exists()


@pytest.mark.parametrize("edit", ["privacy.noise_multiplier: 0.1", "steps: 12"])
def test_resume_refuses_a_config_edited_after_the_reservation(tmp_path, capsys, edit):
    led = tmp_path / "l.sqlite"
    cfg = tiny(tmp_path, "privacy.epsilon=null", "privacy.noise_multiplier=1.0", "train.checkpoint_every=2")
    stopped = train(cfg, ledger_path=str(led), progress=False, stop_after=4)
    run_dir = Path(stopped["run_dir"])
    text = (run_dir / "config.yaml").read_text()
    key, value = edit.split(": ")
    section, field = key.split(".") if "." in key else ("train", key)
    lines, inside = [], False
    for line in text.splitlines():  # edit `field` inside `section:`
        if not line.startswith(" "):
            inside = line.startswith(f"{section}:")
        if inside and line.strip().startswith(f"{field}:"):
            line = line.split(":")[0] + f": {value}"
        lines.append(line)
    (run_dir / "config.yaml").write_text("\n".join(lines) + "\n")
    before = ledger_snapshot(led)
    assert main(["train", "--resume", str(run_dir), "--no-progress", "--ledger", str(led)]) == 2
    assert "no longer matches the run reserved in the ledger" in capsys.readouterr().err
    assert ledger_snapshot(led) == before
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["mechanism"]["released"] == 4


def test_private_sgd_probes_the_model_before_its_first_release():
    from dpwa.privacy import PrivateSGD
    from dpwa.probe import ProbeError

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 3))
    sgd = PrivateSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, clip_norm=1.0,
                     expected_batch_size=8, releases=5)
    with pytest.raises(ProbeError, match="mixes examples"):
        sgd.step([(torch.randn(8, 1, 16), torch.randint(0, 3, (8,)))])
    assert sgd.mechanism.released == 0  # refused before the release


def test_private_sgd_probes_batch_independence_at_its_expected_batch_size():
    """A model that mixes examples only in batches above 8 passes a probe of 4 examples; the
    expected batch size B (public) is probed too, never the realised (secret) one."""
    from dpwa.privacy import PrivateSGD
    from dpwa.probe import ProbeError

    class MixesLargeBatches(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            out = self.fc(x.flatten(1))
            return out - out.mean(0, keepdim=True) if len(out) > 8 else out

    sgd = PrivateSGD(MixesLargeBatches(), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
                     noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=16, releases=5)
    with pytest.raises(ProbeError, match="mixes examples"):
        sgd.step([(torch.randn(5, 1, 16), torch.randint(0, 3, (5,)))])
    assert sgd.mechanism.released == 0
    large = PrivateSGD(nn.Linear(16, 3), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), noise_multiplier=1.0,
                       clip_norm=1.0, expected_batch_size=8192, physical_batch_size=64)
    assert large.probe_batch == 64  # a logical batch is never probed in one pass: its chunks are what fits


def test_a_long_ledger_history_where_prv_fails_still_reports_with_rdp(tmp_path, monkeypatch):
    import dpwa.train as train_module

    def prv_fails(self, dataset, *, delta=None, accountant=None):
        if accountant == "prv":
            raise RuntimeError("PRV discretisation failed: discrete mean differs from continuous mean")
        return 5.0

    monkeypatch.setattr(train_module.Ledger, "spent", prv_fails)
    report = train(tiny(tmp_path, "privacy.noise_seed=1"), ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    assert report["dataset_epsilon_spent"] == 5.0 and report["dataset_epsilon_spent_accountant"].startswith("rdp")
    (run,) = Ledger(tmp_path / "l.sqlite").runs()
    assert run.status == "committed"


def test_a_plan_the_accountant_cannot_compose_is_refused_before_the_reservation(tmp_path, capsys):
    led = tmp_path / "l.sqlite"
    args = ["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'r'}",
            "train.batch_size=8", "train.physical_batch_size=8", "train.steps=1465", "privacy.epsilon=null",
            "privacy.noise_multiplier=0.1"]
    assert main(args) == 2
    assert "privacy.accountant=prv cannot compute the epsilon of this run" in capsys.readouterr().err
    assert ledger_snapshot(led) is None and not (tmp_path / "r").exists()
    assert main([*args, "privacy.accountant=rdp", "train.steps=2"]) == 0  # RDP always composes


def test_resume_reads_the_hash_of_config_yaml_as_written(tmp_path, monkeypatch):
    """A dpwa that added config fields since the reservation re-serialises the config
    differently; an unedited config.yaml still resumes (its text is what was hashed)."""
    import dpwa.train as session

    led = tmp_path / "l.sqlite"
    stopped = train(tiny(tmp_path), ledger_path=str(led), progress=False, stop_after=3)
    monkeypatch.setattr(session, "_config_hash", lambda cfg: "0" * 16)  # a changed serialisation
    report = train(resume=Path(stopped["run_dir"]), ledger_path=str(led), progress=False)
    assert Ledger(str(led)).run(report["run_id"]).status == "committed"


def test_exact_metrics_on_the_validation_split_warn_and_are_listed_outside_the_guarantee(tmp_path):
    with pytest.warns(UserWarning, match="train.eval_split=val with train.val_noise=0: accuracy on examples held out"):
        report = train(tiny(tmp_path, "privacy.noise_seed=1", "data.val_size=100", "train.eval_split=val",
                            "train.val_noise=0"), ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    assert report["outside_guarantee"] == ["train.eval_split=val with train.val_noise=0"]
