"""Kill -9 at random points, again and again: every resume continues from a valid checkpoint,
no file a resume reads is half-written, the ledger never counts less than the steps taken,
and the finished run equals an uninterrupted one (fixed test-only noise seed)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from accounting import Ledger, PoissonGaussian, epsilon
from tests.conftest import ROOT, run_dpwa

QUICK = ROOT / "configs" / "quickstart.yaml"
ARGS = [str(QUICK), "train.steps=300", "train.checkpoint_every=7", "train.batch_size=64",
        "train.physical_batch_size=64", "augmult.k=2", "privacy.noise_seed=5"]


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "dpwa", "train", *map(str, args), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def rows(run_dir):
    """Steps of the complete metrics rows (a kill may tear the last line; resume drops it)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return out


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
            seen = len(rows(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
            wait_until = time.time() + 60
            while len(rows(run_dir)) <= seen + 1 and time.time() < wait_until and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # What a resume reads is whole: the checkpoint loads (without pickled code) and is not ahead of the rows.
        ckpt = run_dir / "checkpoint.pt"
        step = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else 0
        assert step >= checkpoints[-1] and step % 7 == 0  # progress is never lost
        checkpoints.append(step)
        done = max(rows(run_dir), default=0)
        assert done >= step
        # The ledger never counts less than the steps taken (the reservation counts in full until commit).
        (run,) = Ledger(led).runs()
        assert run.status == "reserved"
        taken = PoissonGaussian(noise_multiplier=meta["noise_multiplier"], sample_rate=meta["sample_rate"],
                                steps=max(done, 1))
        assert Ledger(led).spent("digits", delta=1e-4) >= epsilon([taken], delta=1e-4) - 1e-9
        proc = start("--resume", run_dir, "--ledger", led)
    assert trial == 11 and checkpoints[-1] < 300, "the run finished before 12 kills: make it longer"
    assert len(set(checkpoints)) >= 4, f"too few kills landed mid-training: checkpoints {checkpoints}"
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()  # the last resume runs to the end
    # The finished run: one committed ledger entry with exactly the planned steps, every row once,
    # no temporary file left, and the weights of an uninterrupted run.
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent[0].steps == 300
    assert rows(run_dir) == list(range(1, 301))
    assert not list(run_dir.glob("*.tmp"))
    ref = run_dpwa("train", *ARGS, f"out_dir={tmp_path / 'ref'}", "--no-progress", "--ledger", tmp_path / "r.sqlite",
                   timeout=300)
    assert ref.returncode == 0, ref.stderr
    (ref_dir,) = (tmp_path / "ref").iterdir()
    a = torch.load(ref_dir / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
