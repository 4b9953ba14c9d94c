"""Data-parallel DP-SGD with 2 processes (torchrun, gloo, CPU): the same clipped sum as one
process, noise of the full standard deviation added once per step (not once per rank), one
ledger charge with the single-process epsilon, and clear refusals (batch not divisible by the
world size, ranks with different configs, a rank dying mid-run) that never under-count.

Every test that starts processes is marked slow (`-m slow`; `.ci/run` runs them)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dpwa
from accounting import Ledger
from dpwa.distributed import World
from tests.conftest import ROOT, ledger_snapshot, run_dpwa

QUICK = ROOT / "configs" / "quickstart.yaml"
PACKAGE = Path(dpwa.__file__).resolve().parent
SMALL = ["train.steps=12", "train.checkpoint_every=4", "train.batch_size=64", "train.physical_batch_size=32",
         "train.threads=1", "--no-progress"]


def torchrun(*args, timeout=300, nproc=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def dpwa_frames(stderr):
    """The traceback frames in dpwa's own files: torchrun prints its own traceback (through
    torch's files), and the interpreter's path may contain "/dpwa/" (a clone named dpwa)."""
    files = re.findall(r'^\s*File "([^"]+)", line \d+', stderr, flags=re.M)
    return [f for f in files if Path(f).resolve().is_relative_to(PACKAGE)]


def worker(mode, out):
    done = torchrun(ROOT / "tests" / "dpwa" / "dist_worker.py", mode, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_shards_partition_the_poisson_batch():
    idx = torch.tensor([3, 9, 11, 12, 40, 41, 77])
    shards = [World(rank=r, size=3).shard(idx) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == idx.tolist()
    assert sum(len(s) for s in shards) == len(idx)


@pytest.mark.slow
def test_two_processes_release_the_single_process_clipped_sum(tmp_path):
    r0, r1 = worker("sum", tmp_path)
    assert torch.equal(r0["idx"], r1["idx"])  # both ranks drew the same Poisson batch from rank 0's seed
    assert sorted(torch.cat([r0["mine"], r1["mine"]]).tolist()) == r0["idx"].tolist()  # disjoint shards, union = batch
    assert len(r0["mine"]) and len(r1["mine"])
    torch.testing.assert_close(r0["released"], r0["single"], rtol=1e-12, atol=1e-15)
    assert torch.equal(r0["released"], r1["released"])  # every rank applies the same update
    # the private diagnostics (train.private_diagnostics) are the whole batch's, not rank 0's share
    for r in (r0, r1):
        assert r["stats"]["private_batch_size_diagnostic"] == len(r0["idx"])
        assert r["stats"]["private_batch_loss_diagnostic"] == pytest.approx(
            r0["single_stats"]["private_batch_loss_diagnostic"], rel=1e-6)


@pytest.mark.slow
def test_noise_is_added_once_with_the_full_standard_deviation(tmp_path):
    """Zero gradients: the update is the noise / B. 300 steps x 640 coordinates: its std must be
    sigma C / B within 1.5% (once per rank would be sqrt(2) larger, per-rank shares smaller)."""
    r0, r1 = worker("noise", tmp_path)
    assert torch.equal(r0["released"], r1["released"])
    std, expected = r0["released"].std().item(), r0["expected_std"]
    assert abs(std / expected - 1) < 0.015, (std, expected)
    # the noise is secret (unseeded): at 5 sigma this fails by chance once in 1.7 million runs
    assert abs(r0["released"].mean().item()) < 5 * expected / r0["released"].numel() ** 0.5


@pytest.mark.slow
def test_torchrun_train_charges_the_ledger_once_like_one_process(tmp_path):
    led, single = tmp_path / "l.sqlite", tmp_path / "s.sqlite"
    done = torchrun("-m", "dpwa", "train", QUICK, *SMALL, "augmult.k=2", f"out_dir={tmp_path / 'runs'}", "--ledger", led)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy raw") == 1  # rank 0 speaks for the run
    (run_dir,) = (tmp_path / "runs").iterdir()  # one run folder, written by rank 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 12
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent[0].steps == 12
    ref = run_dpwa("train", QUICK, *SMALL, "augmult.k=2", f"out_dir={tmp_path / 'ref'}", "--ledger", single)
    assert ref.returncode == 0, ref.stderr
    (one,) = Ledger(single).runs()
    assert run.spent == one.spent  # same mechanism: sigma, q = B/N, steps
    assert Ledger(led).spent("digits", delta=1e-4) == pytest.approx(Ledger(single).spent("digits", delta=1e-4))


@pytest.mark.slow
def test_batch_not_divisible_by_the_world_size_is_refused(tmp_path):
    led = tmp_path / "l.sqlite"
    done = torchrun("-m", "dpwa", "train", QUICK, *SMALL, "train.batch_size=63", f"out_dir={tmp_path / 'runs'}",
                    "--ledger", led)
    assert done.returncode != 0
    assert done.stderr.count("train.batch_size=63 must be divisible by the world size 2") == 2  # both ranks say it
    assert dpwa_frames(done.stderr) == [], done.stderr[-3000:]  # a refusal, not a crash inside dpwa
    assert ledger_snapshot(led) is None and not (tmp_path / "runs").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, port, *args):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dpwa", *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_ranks_with_different_configs_are_refused(tmp_path):
    led, port = tmp_path / "l.sqlite", _free_port()
    common = ["train", QUICK, *SMALL, f"out_dir={tmp_path / 'runs'}", "--ledger", led]
    procs = [_rank(0, port, *common, "optim.lr=2"), _rank(1, port, *common, "optim.lr=1")]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err
        assert "ranks disagree on the config" in err and "Traceback" not in err
    assert ledger_snapshot(led) is None and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_rank_dying_mid_run_never_undercounts_and_the_run_resumes(tmp_path):
    led, port = tmp_path / "l.sqlite", _free_port()
    args = ["train", QUICK, "train.steps=400", "train.checkpoint_every=5", "train.batch_size=64",
            "train.physical_batch_size=32", "train.threads=1", "--no-progress", f"out_dir={tmp_path / 'runs'}",
            "--ledger", led]
    procs = [_rank(0, port, *args), _rank(1, port, *args)]
    deadline = time.time() + 180
    while time.time() < deadline:
        rows = list((tmp_path / "runs").glob("*/metrics.jsonl"))
        if rows and len(rows[0].read_text().splitlines()) >= 12:
            break
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)  # rank 1 dies mid-run
    _, err = procs[0].communicate(timeout=120)
    procs[1].wait()
    assert procs[0].returncode == 1, err
    assert "stopped answering" in err and "--resume" in err and "Traceback" not in err
    (run_dir,) = (tmp_path / "runs").iterdir()
    (run,) = Ledger(led).runs()
    assert run.status == "reserved" and run.planned[0].steps == 400  # counted in full until the run commits
    step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 10 and run.spent[0].steps == step  # progress at the last checkpoint
    done = torchrun("-m", "dpwa", "train", "--resume", run_dir, "--no-progress", "--ledger", led, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent[0].steps == 400
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 401))


@pytest.mark.slow
def test_torchrun_finetune(tmp_path):
    led = tmp_path / "l.sqlite"
    done = torchrun("-m", "dpwa", "finetune", QUICK, "model.name=nf_micro", *SMALL, f"out_dir={tmp_path / 'runs'}",
                    "--ledger", led)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "report.json").read_text())["world_size"] == 2
    assert (run_dir / "weights.safetensors").exists()
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent[0].steps == 12


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_close_frees_the_process_group_before_interpreter_exit(tmp_path):
    """`dpwa finetune` once ended in SIGABRT ("terminate called without an active exception"):
    timm, imported after init_process_group, imported torch.distributed.nn, whose default
    arguments kept the group alive after destroy_process_group, and a gloo worker still
    releasing a broadcast's tensors was killed while Python finalized. Once closed, no gloo
    thread may remain."""
    for r in worker("close", tmp_path):
        assert r["after"] <= r["before"], r


def test_nodes_whose_copies_of_the_data_differ_in_order_are_refused(tmp_path):
    """Each node of a multi-node run may read its own copy of the data: one class's examples in
    another order share the labels' fingerprint, so the examples are compared too, in order
    (an example at index i on one node and i + 1 on another could be drawn twice in a step).
    Image folders by their files' names (wherever the folder lies), arrays by their pixels."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    from dpwa.config import ConfigError
    from dpwa.data import ImageFiles, Split, content_digest
    from dpwa.distributed import World
    from dpwa.train import _agree_on_data

    @dataclasses.dataclass(frozen=True)
    class TwoNodes(World):
        """Rank 0 of 2, the other node answering what `replies` says (in call order)."""

        replies: list = dataclasses.field(default_factory=list)

        def gather(self, obj):
            return [obj, self.replies.pop(0)]

    labels = torch.tensor([0, 0, 1, 1])
    files = [f"/data/train/{c}/{n}.jpg" for c in ("cat", "dog") for n in ("a", "b")]
    pixels = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2)
    for x, swapped, same in (
            (ImageFiles(files, 8, root="/data/train"),  # same labels, two files swapped; another root
             ImageFiles([files[1], files[0], *files[2:]], 8, root="/mnt/copy/train"),
             ImageFiles([f.replace("/data", "/mnt/copy") for f in files], 8, root="/mnt/copy/train")),
            (pixels, pixels[[1, 0, 2, 3]], pixels.clone())):  # an npz whose class was shuffled on one node
        mine = SimpleNamespace(source=SimpleNamespace(fingerprint="n4-x", content=content_digest(Split(x, labels))))
        _agree_on_data(TwoNodes(rank=0, size=2, replies=["n4-x", content_digest(Split(same, labels))]), mine)
        with pytest.raises(ConfigError, match=r"the 2 ranks disagree on the training examples \(their order"):
            _agree_on_data(TwoNodes(rank=0, size=2, replies=["n4-x", content_digest(Split(swapped, labels))]), mine)
        with pytest.raises(ConfigError, match="disagree on the training data"):
            _agree_on_data(TwoNodes(rank=0, size=2, replies=["n4-y"]), mine)


def test_a_timeout_past_what_torch_distributed_takes_is_a_config_error(monkeypatch):
    """train.dist_timeout_s=1e20 was an OverflowError traceback on every rank."""
    from dpwa.config import ConfigError
    from dpwa.distributed import world_from_env

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="train.dist_timeout_s=1e\\+20 is more than torch.distributed can wait for"):
        world_from_env("gloo", "cpu", 1e20)
