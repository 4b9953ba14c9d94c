"""Kill -9 at random points, again and again: every resume continues from a valid checkpoint,
no file a resume reads is half-written, the ledger never counts less than the steps taken,
and the finished run equals an uninterrupted one (fixed test-only noise seed). Disk-full and
unwritable folders leave the ledger consistent; the noise seed is written nowhere."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from accounting import Ledger, PoissonGaussian, epsilon
from dpwa.cli import main
from dpwa.config import load_config
from dpwa.train import train
from tests.conftest import ROOT, ledger_snapshot, run_dpwa

QUICK = ROOT / "configs" / "quickstart.yaml"
# Long enough that 12 kills land before the end: ~130 steps/s on 2 cores, so 300 steps (2.3 s) no longer were.
STEPS = 1000
ARGS = [str(QUICK), f"train.steps={STEPS}", "train.checkpoint_every=7", "train.batch_size=64",
        "train.physical_batch_size=64", "augmult.k=2", "privacy.noise_seed=5"]


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "dpwa", "train", *map(str, args), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def rows(run_dir):
    """Steps of the complete metrics rows (a kill may tear the last line; resume drops it)."""
    out, path = [], run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return out


@pytest.mark.slow  # 12 kills and resumes plus an uninterrupted reference run
def test_random_kills_never_lose_progress_or_undercount(tmp_path):
    led = tmp_path / "l.sqlite"
    rng = random.Random(0)
    proc = start(*ARGS, f"out_dir={tmp_path / 'runs'}", "--ledger", led)
    deadline = time.time() + 120
    while not list((tmp_path / "runs").glob("*/run.json")) and time.time() < deadline:
        time.sleep(0.02)
    (run_dir,) = (tmp_path / "runs").iterdir()
    meta = json.loads((run_dir / "run.json").read_text())
    checkpoints = [0]
    for trial in range(12):
        if trial % 3 == 0:  # during start-up: imports, data, model, checkpoint load, ledger
            time.sleep(rng.uniform(0.2, 3.0))
        else:  # mid-training, around the checkpoint writes (every 7 steps)
            seen = len(rows(run_dir))
            wait_until = time.time() + 60
            while len(rows(run_dir)) <= seen + 1 and time.time() < wait_until and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # What a resume reads is whole: the checkpoint loads (without pickled code) and is not ahead of
        # the rows it covers: those on disk, and those it holds until they are written (a kill between
        # the checkpoint and `MetricsLog.publish` leaves them in it alone; resume writes them).
        ckpt = run_dir / "checkpoint.pt"
        saved = torch.load(ckpt, weights_only=True) if ckpt.exists() else {"step": 0}
        step = saved["step"]
        assert step >= checkpoints[-1] and step % 7 == 0  # progress is never lost
        checkpoints.append(step)
        on_disk, held = rows(run_dir), [row["step"] for row in json.loads(saved.get("rows", "[]"))]
        assert set(range(1, step + 1)) <= set(on_disk) | set(held), f"rows lost below the checkpoint's step {step}"
        done = max([*on_disk, *held], default=0)
        # The ledger never counts less than the steps taken (the reservation counts in full until commit).
        (run,) = Ledger(led).runs()
        assert run.status == "reserved"
        taken = PoissonGaussian(noise_multiplier=meta["noise_multiplier"], sample_rate=meta["sample_rate"],
                                steps=max(done, 1))
        assert Ledger(led).spent("digits", delta=1e-4) >= epsilon([taken], delta=1e-4) - 1e-9
        proc = start("--resume", run_dir, "--ledger", led)
    assert trial == 11 and checkpoints[-1] < STEPS, "the run finished before 12 kills: make it longer"
    assert len(set(checkpoints)) >= 4, f"too few kills landed mid-training: checkpoints {checkpoints}"
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()  # the last resume runs to the end
    # The finished run: one committed ledger entry with exactly the planned steps, every row once,
    # no temporary file left, and the weights of an uninterrupted run.
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent[0].steps == STEPS
    assert rows(run_dir) == list(range(1, STEPS + 1))
    assert not list(run_dir.glob("*.tmp"))
    ref = run_dpwa("train", *ARGS, f"out_dir={tmp_path / 'ref'}", "--no-progress", "--ledger", tmp_path / "r.sqlite",
                   timeout=300)
    assert ref.returncode == 0, ref.stderr
    (ref_dir,) = (tmp_path / "ref").iterdir()
    a = torch.load(ref_dir / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- I/O failures, corrupt checkpoints, and the secrecy of the noise --------------------------------

TINY = ["train.steps=12", "train.checkpoint_every=4", "train.batch_size=64", "train.physical_batch_size=64",
        "augmult.k=2"]


def call(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_unwritable_out_dir_is_refused_before_any_charge(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    led = tmp_path / "l.sqlite"
    code, err = call(["train", QUICK, *TINY, f"out_dir={tmp_path / 'file' / 'runs'}", "--no-progress",
                      "--ledger", led], capsys)
    assert code == 2 and "cannot hold run folders" in err and "Traceback" not in err
    assert ledger_snapshot(led) is None  # no ledger, no reservation


def test_disk_full_mid_run_keeps_the_ledger_consistent_and_the_run_resumable(tmp_path, capsys, monkeypatch):
    """ENOSPC at the second checkpoint: exit 1 with the cause and what to do; the run stays
    reserved (never less than the steps taken), its last checkpoint intact; after the "disk is
    freed" the resume finishes with one ledger charge."""
    import errno

    import dpwa.run_folder as train_module

    real, calls = train_module.save_checkpoint, []

    def full_disk(state, path):
        calls.append(state["step"])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")
        real(state, path)

    monkeypatch.setattr(train_module, "save_checkpoint", full_disk)
    led = tmp_path / "l.sqlite"
    code, err = call(["train", QUICK, *TINY, f"out_dir={tmp_path / 'runs'}", "--no-progress", "--ledger", led], capsys)
    assert code == 1 and "No space left on device" in err and "--resume" in err and "Traceback" not in err
    (run_dir,) = (tmp_path / "runs").iterdir()
    (run,) = Ledger(led).runs()
    assert run.status == "reserved" and run.planned[0].steps == 12  # counted in full
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train_module, "save_checkpoint", real)
    code, err = call(["train", "--resume", run_dir, "--no-progress", "--ledger", led], capsys)
    assert code == 0, err
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent[0].steps == 12
    assert rows(run_dir) == list(range(1, 13))


def test_a_folder_that_fails_before_the_first_step_gives_the_reservation_back(tmp_path, capsys, monkeypatch):
    import dpwa.run_folder as train_module

    def broken(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(train_module, "atomic_write_text", broken)
    led = tmp_path / "l.sqlite"
    code, err = call(["train", QUICK, *TINY, f"out_dir={tmp_path / 'runs'}", "--no-progress", "--ledger", led], capsys)
    assert code == 1 and "Permission denied" in err and "released" in err
    (run,) = Ledger(led).runs()
    assert run.status == "released" and not run.spent  # nothing counted: no step was taken
    assert Ledger(led).spent("digits", delta=1e-4) == 0


def test_a_private_run_writes_its_noise_seed_nowhere(tmp_path, monkeypatch):
    """The seeds of the noise and of the Poisson sampling come from os.urandom and never reach a
    file: neither their value, nor a generator's state, in the run folder or the ledger."""
    import dpwa.privacy as privacy

    secret = bytes.fromhex("8badf00ddeadbeef")
    monkeypatch.setattr(privacy.os, "urandom", lambda n: (secret * (n // 8 + 1))[:n])
    seed = int.from_bytes(secret, "little") & ((1 << 63) - 1)
    led = tmp_path / "l.sqlite"
    report = train(load_config(QUICK, [*TINY, f"out_dir={tmp_path / 'runs'}"]), ledger_path=str(led), progress=False)
    assert report["private"] is True
    run_dir = Path(report["run_dir"])
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert "noise_rng" not in state and "sample_rng" not in state
    # the CPU generators' Mersenne-Twister words, as torch's state holds them (privacy.seed_state)
    g = privacy.seed_state(torch.Generator(), privacy.secret_entropy())
    fingerprint_bytes = g.get_state().numpy().tobytes()[24:88]
    for path in [*run_dir.iterdir(), led]:
        blob = path.read_bytes()
        assert str(seed).encode() not in blob and secret not in blob and secret[::-1] not in blob, path.name
        assert fingerprint_bytes not in blob, path.name


def test_the_ledger_records_a_checkpoints_releases_before_it_is_saved(tmp_path, monkeypatch):
    """A kill between the two must leave the ledger ahead of the checkpoint: a checkpoint whose
    weights hold releases the ledger has not recorded would be under-counted by
    `dpwa ledger release`, which keeps only the recorded steps."""
    from dpwa.run_folder import RunFolder

    led = tmp_path / "l.sqlite"
    seen = []
    save = RunFolder.stage_state

    def recording(self, state):
        run_id = json.loads((self.path / "run.json").read_text())["run_id"]
        seen.append((sum(e.steps for e in Ledger(led).run(run_id).spent), state["mechanism"]["released"]))
        return save(self, state)

    monkeypatch.setattr(RunFolder, "stage_state", recording)
    train(load_config(QUICK, [*TINY, f"out_dir={tmp_path / 'runs'}"]), ledger_path=str(led), progress=False)
    assert len(seen) >= 2 and all(recorded == released for recorded, released in seen), seen


def test_an_older_copy_of_a_run_cannot_resume_past_what_the_ledger_counts(tmp_path):
    """A backup of the folder at step 4 while the run went on to step 8, then resumed, would
    release steps 5-8 a second time under a reservation that counts each release once; so would
    a checkpoint whose count was edited down. Both are refused before any step, charging nothing;
    the newest copy resumes. (A ledger from before run_checkpoints has no record to refuse by.)"""
    import shutil

    import torch

    from dpwa.errors import UsageError

    led = str(tmp_path / "l.sqlite")
    cfg = load_config(QUICK, ["train.steps=12", "train.checkpoint_every=4", "train.batch_size=64",
                              "train.physical_batch_size=64", f"out_dir={tmp_path / 'runs'}"])
    early = train(cfg, ledger_path=led, progress=False, stop_after=4)
    backup = tmp_path / "backup"
    shutil.copytree(early["run_dir"], backup)
    later = train(resume=Path(early["run_dir"]), ledger_path=led, progress=False, stop_after=8)
    before = ledger_snapshot(led)
    with pytest.raises(UsageError, match=r"it holds 4 of the 8 PoissonGaussian releases .* an older copy of the run"):
        train(resume=backup, ledger_path=led, progress=False)
    edited = Path(later["run_dir"]) / "checkpoint.pt"
    state = torch.load(edited, weights_only=False)
    torch.save({**state, "mechanism": {**state["mechanism"], "released": 0}}, edited)
    with pytest.raises(UsageError, match=r"it holds 0 of the 8 PoissonGaussian releases"):
        train(resume=Path(later["run_dir"]), ledger_path=led, progress=False)
    assert ledger_snapshot(led) == before
    torch.save(state, edited)
    assert train(resume=Path(later["run_dir"]), ledger_path=led, progress=False)["releases"] == 12


def test_private_batches_are_secret_and_test_batches_reproducible(tmp_path):
    """Two private runs of one config draw different Poisson batches (the sampling seed is
    secret, not train.seed); two test runs with a noise seed draw the same ones."""
    def batch_sizes(name, *extra):
        report = train(load_config(QUICK, [*TINY, f"out_dir={tmp_path / name}", "train.private_diagnostics=true",
                                           *extra]),
                       ledger_path=str(tmp_path / f"{name}.sqlite"), progress=False)
        lines = (Path(report["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["private_batch_size_diagnostic"] for line in lines]

    assert batch_sizes("a") != batch_sizes("b")
    assert batch_sizes("c", "privacy.noise_seed=3") == batch_sizes("d", "privacy.noise_seed=3")


def test_private_augmentation_coins_are_secret_and_test_ones_reproducible(tmp_path, monkeypatch):
    """A row's views follow its position in the batch: with known coins one more example would
    move the other examples' views and clipped gradients (sensitivity above C). So a private
    run's coins come from OS entropy, not train.seed, as a whole mt19937 state per release (a
    seed would give 32 bits); a test run's from train.seed."""
    import dpwa.train as train_module

    states, real = [], train_module.augmult_views

    def recording(x, *, generator, **kw):
        states.append((generator.initial_seed(), generator.get_state().numpy().tobytes()))
        return real(x, generator=generator, **kw)

    monkeypatch.setattr(train_module, "augmult_views", recording)

    def coins(name, *extra):
        states.clear()
        train(load_config(QUICK, [*TINY, f"out_dir={tmp_path / name}", *extra]),
              ledger_path=str(tmp_path / f"{name}.sqlite"), progress=False)
        return list(states)

    def seeded(seed):  # the state of a generator seeded with `seed`, as manual_seed leaves it
        return torch.Generator().manual_seed(seed).get_state().numpy().tobytes()

    public = train_module._augment_coins(torch.Generator(), 0, 0, 0)
    public = (public.initial_seed(), public.get_state().numpy().tobytes())
    a, b = coins("a"), coins("b")
    assert len(a) >= 12 and a != b and public[1] not in [s for _, s in a + b] and len(set(a)) == len(a)
    assert all(state != seeded(seed) for seed, state in a)  # a whole state (keyed_state), not a seed's
    assert coins("c", "privacy.noise_seed=3") == coins("d", "privacy.noise_seed=3")
    assert coins("e", "privacy.noise_seed=3")[0] == public == (2_000_006, seeded(2_000_006))  # (0 + 2) * 1_000_003


def test_resume_on_other_training_data_is_refused(tmp_path):
    """The reservation was charged to one dataset (its fingerprint and size): a resume that
    finds other data under the same name would spend on uncharged data, and is refused before
    any step; the run stays reserved, its spent steps unchanged."""
    import numpy as np

    from dpwa.errors import UsageError

    root = tmp_path / "npz"
    root.mkdir()

    def write(seed):
        g = np.random.default_rng(seed)
        for part, n in (("train", 600), ("test", 100)):
            np.savez(root / f"{part}.npz", x=g.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8), y=g.integers(0, 10, n))

    write(0)
    cfg = load_config(QUICK, ["data.name=npz", f"data.root={root}", "train.steps=10", "train.checkpoint_every=5",
                              "train.batch_size=64", "privacy.accountant=rdp", f"out_dir={tmp_path / 'runs'}"])
    led = str(tmp_path / "l.sqlite")
    stopped = train(cfg, ledger_path=led, progress=False, stop_after=5)
    before = ledger_snapshot(led)
    write(1)
    with pytest.raises(UsageError, match="its training data is not the data reserved in the ledger"):
        train(resume=Path(stopped["run_dir"]), ledger_path=led, progress=False)
    assert ledger_snapshot(led) == before
    write(0)  # the reserved data back: the run resumes and finishes
    assert train(resume=Path(stopped["run_dir"]), ledger_path=led, progress=False)["releases"] == 10


def test_rows_reach_the_disk_only_once_a_checkpoint_covers_their_releases(tmp_path, monkeypatch):
    """A row shows its iterate's accuracy and epsilon: derived from releases. A run killed
    between checkpoints redoes those releases on resume, so their rows must never have been
    written (they would be releases the ledger never counts). The checkpoint holds the rows it
    covers until they are written: a kill between the two loses none."""
    from dpwa.run_folder import MetricsLog, RunFolder

    cfg = load_config(QUICK, ["train.steps=12", "train.checkpoint_every=5", "train.eval_every=1",
                              "train.batch_size=64", f"out_dir={tmp_path / 'runs'}"])
    led = str(tmp_path / "l.sqlite")
    stopped = train(cfg, ledger_path=led, progress=False, stop_after=8)  # killed after step 8
    folder = RunFolder(Path(stopped["run_dir"]))
    assert [r["step"] for r in folder.rows()] == [1, 2, 3, 4, 5]  # steps 6-8 released nothing to the disk
    assert all(any(k.startswith("test_raw_") for k in r) for r in folder.rows())  # an accuracy in each

    real, calls = MetricsLog.publish, []

    def killed_after_the_checkpoint(self):  # the second checkpoint (step 10) is saved, then the process dies
        calls.append(len(self.pending))
        if len(calls) == 2:  # the first: rows held by the checkpoint resumed from (none)
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(MetricsLog, "publish", killed_after_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(resume=folder.path, ledger_path=led, progress=False)
    assert folder.load_state()["step"] == 10 and [r["step"] for r in folder.rows()] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(MetricsLog, "publish", real)
    report = train(resume=folder.path, ledger_path=led, progress=False)
    assert [r["step"] for r in folder.rows()] == list(range(1, 13)) and report["releases"] == 12
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent[-1].steps == 12


def test_a_run_released_while_training_stops_at_its_next_checkpoint_before_writing_anything(tmp_path, monkeypatch):
    """`dpwa ledger release` on a run still training: the ledger then counts what its last
    checkpoint recorded, so nothing of the later releases may reach the disk."""
    from accounting import RunStateError
    from dpwa.run_folder import MetricsLog, RunFolder

    cfg = load_config(QUICK, [*TINY, f"out_dir={tmp_path / 'runs'}"])
    led = tmp_path / "l.sqlite"
    real = MetricsLog.write

    def released_at_step_6(self, row):
        if row["step"] == 6:
            (run,) = Ledger(led).runs()
            Ledger(led).release(run.run_id, reason="by mistake, while it trained")
        return real(self, row)

    monkeypatch.setattr(MetricsLog, "write", released_at_step_6)
    with pytest.raises(RunStateError, match="released"):
        train(cfg, ledger_path=str(led), progress=False)
    (folder,) = (RunFolder(p) for p in (tmp_path / "runs").iterdir())
    (run,) = Ledger(led).runs()
    assert run.status == "released" and run.spent[0].steps == 4  # its checkpoint at step 4
    assert folder.load_state()["step"] == 4 and [r["step"] for r in folder.rows()] == [1, 2, 3, 4]
    assert not (folder.path / "weights.safetensors").exists() and not (folder.path / "report.json").exists()


def test_a_fresh_run_holds_its_folder_so_a_resume_beside_it_is_refused(tmp_path, monkeypatch):
    """Only a resumed session held its folder: a requeued `--resume` of a run still in its first
    session trained beside it, both releasing under the one reservation."""
    from dpwa.run_folder import MetricsLog, RunFolderInUseError

    cfg = load_config(QUICK, [*TINY, f"out_dir={tmp_path / 'runs'}"])
    led = str(tmp_path / "l.sqlite")
    real, refused = MetricsLog.write, []

    def resumed_beside_at_step_6(self, row):
        if row["step"] == 6:
            with pytest.raises(RunFolderInUseError, match="is in use by another dpwa process") as info:
                train(resume=Path(self.file.name).parent, ledger_path=led, progress=False)
            refused.append(info.value)
        return real(self, row)

    monkeypatch.setattr(MetricsLog, "write", resumed_beside_at_step_6)
    report = train(cfg, ledger_path=led, progress=False)
    (run,) = Ledger(led).runs()
    assert refused and run.status == "committed" and run.spent[0].steps == report["releases"] == 12


def test_of_two_copies_resumed_at_once_only_the_last_to_claim_the_run_writes(tmp_path, monkeypatch):
    """Two copies of a reserved folder (on two hosts, where a folder lock does not reach) resumed
    at once both passed every check and trained to the end under one reservation. Now the copy
    resumed second claims the run in the ledger; the first stops at its next checkpoint with
    SessionLostError, writing nothing (what it released since its last checkpoint never reaches
    the disk), and the copy, resumed again, finishes the run: one charge of 12 releases."""
    import shutil

    from accounting import SessionLostError
    from dpwa.run_folder import STAGED, MetricsLog, RunFolder

    led = str(tmp_path / "l.sqlite")
    stopped = train(load_config(QUICK, [*TINY, f"out_dir={tmp_path / 'runs'}"]), ledger_path=led, progress=False,
                    stop_after=6)  # its checkpoint: step 4
    first = Path(stopped["run_dir"])
    copy = tmp_path / "elsewhere" / first.name
    shutil.copytree(first, copy)
    real, other = MetricsLog.write, []

    def copy_resumed_at_step_5(self, row):
        if row["step"] == 5 and Path(self.file.name).parent == first and not other:
            # the copy claims the run and trains steps 5-6 beside it, its run still reserved
            other.append(train(resume=copy, ledger_path=led, progress=False, stop_after=6))
        return real(self, row)

    monkeypatch.setattr(MetricsLog, "write", copy_resumed_at_step_5)
    with pytest.raises(SessionLostError, match="resumed by another session"):
        train(resume=first, ledger_path=led, progress=False)  # its checkpoint at step 8 is refused
    assert other[0]["stopped_at"] == 6
    (run,) = Ledger(led).runs()
    assert run.status == "reserved" and run.spent[0].steps <= 8
    folder = RunFolder(first)  # the first session wrote nothing after the copy claimed the run
    assert folder.load_state()["step"] == 4 and [r["step"] for r in folder.rows()] == [1, 2, 3, 4]
    assert not (first / "weights.safetensors").exists() and not list(first.glob(f"{STAGED}*"))
    monkeypatch.setattr(MetricsLog, "write", real)
    assert train(resume=copy, ledger_path=led, progress=False)["releases"] == 12
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent[0].steps == 12


def test_another_runs_checkpoint_copied_into_a_folder_is_refused(tmp_path, capsys):
    """X's weights (epsilon 3) in Y's folder were evaluated, and resumed, under Y's epsilon."""
    import shutil

    led = str(tmp_path / "l.sqlite")
    x, y = (train(load_config(QUICK, [*TINY, f"out_dir={tmp_path / name}"]), ledger_path=led, progress=False,
                  stop_after=6)["run_dir"] for name in ("x", "y"))
    shutil.copy(Path(x) / "checkpoint.pt", Path(y) / "checkpoint.pt")
    before = ledger_snapshot(led)
    for args in (["eval", y], ["train", "--resume", y, "--ledger", led, "--no-progress"]):
        assert main(args) == 2, args
        assert f"is the checkpoint of run {Path(x).name!r}, not of this folder's run {Path(y).name!r}" in \
            capsys.readouterr().err
    assert ledger_snapshot(led) == before


@pytest.mark.parametrize("name, edit, needle", [
    ("run.json", lambda t: t[:-5], "run.json is not readable JSON"),
    ("run.json", lambda t: t.replace('"steps"', '"stepz"'), "run.json lacks steps"),
    ("config.yaml", lambda t: t.replace("train:", "train: [", 1), "config.yaml is not readable YAML"),
    # the same parameter shapes, another model: eval scored it under the run's name
    ("config.yaml", lambda t: t.replace("groups: 8", "groups: 4"), "is not the config ledger"),
])
def test_a_damaged_or_edited_run_folder_is_refused_by_name(tmp_path, capsys, name, edit, needle):
    led = str(tmp_path / "l.sqlite")
    run_dir = Path(train(load_config(QUICK, [*TINY, f"out_dir={tmp_path / 'runs'}"]), ledger_path=led,
                         progress=False)["run_dir"])
    path = run_dir / name
    path.write_text(edit(path.read_text()))
    assert main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_a_resume_uses_the_ledger_its_run_json_names_and_creates_none(tmp_path, monkeypatch, capsys):
    """$DPWA_LEDGER pointing elsewhere at resume time created an empty ledger there and refused
    the run as unknown; a --ledger naming a missing file created it."""
    led = str(tmp_path / "l.sqlite")
    stopped = train(load_config(QUICK, [*TINY, f"out_dir={tmp_path / 'runs'}"]), ledger_path=led, progress=False,
                    stop_after=6)
    elsewhere = tmp_path / "other.sqlite"
    assert main(["train", "--resume", stopped["run_dir"], "--ledger", str(elsewhere), "--no-progress"]) == 2
    assert f"the ledger it was charged to, {elsewhere}, does not exist" in capsys.readouterr().err
    assert not elsewhere.exists()
    monkeypatch.setenv("DPWA_LEDGER", str(elsewhere))
    assert train(resume=Path(stopped["run_dir"]), progress=False)["releases"] == 12
    assert not elsewhere.exists() and Ledger(led).runs()[0].status == "committed"


def test_a_failed_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A disk that fills mid-write left a half checkpoint.pt.tmp behind (atomic_write_text's
    files did not)."""
    import errno

    import dpwa.checkpoint as checkpoint

    def half_then_full(state, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint({"step": 1}, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_public_run_resumes_too(tmp_path):
    """A public-data run has no ledger (`_NoLedger`): its resume took the private path's claim
    arguments, and failed."""
    cfg = load_config(QUICK, [*TINY, f"out_dir={tmp_path / 'runs'}", "privacy.enabled=false", "data.public=true"])
    stopped = train(cfg, progress=False, stop_after=6)
    report = train(resume=Path(stopped["run_dir"]), progress=False)
    assert report["private"] is False and report["steps"] == 12
    assert (Path(stopped["run_dir"]) / "weights.safetensors").exists()
