"""dpwa.loader: folder images decoded in DataLoader workers, one Poisson batch ahead, change
nothing a step sees (indices, order, pixels, weights, kill-and-resume) and reveal nothing of
which examples a private batch drew (no file or index in errors, no output, no files)."""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpwa.config import ConfigError, DataConfig, config_to_yaml, load_config
from dpwa.data import DataError, ImageFiles, load_data
from dpwa.loader import BatchLoader
from dpwa.privacy import poisson_batches
from dpwa.train import train
from tests.conftest import ROOT

SIZE, CHUNK = 16, 5


def make_folder(root: Path, per_class: int = 12) -> Path:
    """A tiny ImageNet layout: 2 classes, PNG and JPEG files of varied sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    for part, n in (("train", per_class), ("val", 3)):
        for c, wnid in enumerate(("n001", "n002")):
            folder = root / part / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(18, 40)), int(rng.integers(18, 40))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 2 + 60 * c
                ext = "png" if i % 2 else "JPEG"
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i:02d}.{ext}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("imagenet"))


def images(root) -> ImageFiles:
    return load_data(DataConfig(name="imagefolder", root=str(root), image_size=SIZE)).train.x


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_loader_yields_the_batches_the_sampler_drew(folder, workers):
    x = images(folder)
    steps, q = 6, 0.4
    reference = poisson_batches(len(x), q, torch.Generator().manual_seed(3))  # the in-process path, no peeking
    expected = [next(reference) for _ in range(steps)]
    gen = torch.Generator().manual_seed(3)
    batches = poisson_batches(len(x), q, gen)
    global_rng = torch.get_rng_state()
    with BatchLoader(x, workers=workers, chunk_size=CHUNK, expected_batch=q * len(x)) as loader:
        for step in range(steps):
            idx = next(batches)
            ahead = batches.peek() if step + 1 < steps else None  # the last batch: nothing ahead
            chunks = list(loader.fetch(idx, ahead))
            assert torch.equal(idx, expected[step])  # same indices, same order: peeking moved nothing
            want = [x[part] for part in idx.split(CHUNK)]
            assert len(chunks) == len(want) and all(torch.equal(a, b) for a, b in zip(chunks, want))
        assert torch.equal(gen.get_state(), reference.generator.get_state())  # the sampler's state, as without
        assert torch.equal(torch.get_rng_state(), global_rng)  # the workers' seeds come from their own generator
        other = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])  # not the batch decoded ahead: fetched afresh
        assert all(torch.equal(a, b) for a, b in zip(loader.fetch(other, None), [x[other[:5]], x[other[5:]]]))
        empty = list(loader.fetch(torch.empty(0, dtype=torch.long)))
        assert len(empty) == 1 and empty[0].shape == (0, 3, SIZE, SIZE)


def test_nothing_is_read_before_the_first_chunk_is_asked_for(folder):
    class Counting(list):
        reads = 0

        def __getitem__(self, key):
            Counting.reads += 1
            return super().__getitem__(key)

    x = images(folder)
    x.files = Counting(x.files)
    with BatchLoader(x, workers=0, chunk_size=CHUNK, expected_batch=4) as loader:
        chunks = loader.fetch(torch.arange(8))  # a refused release never iterates its chunks
        assert Counting.reads == 0
        next(chunks)
        assert Counting.reads == CHUNK


def tiny(tmp_path, root, *extra):
    return load_config(ROOT / "configs" / "quickstart.yaml", [
        f"out_dir={tmp_path / 'runs'}", "data.name=imagefolder", f"data.root={root}", f"data.image_size={SIZE}",
        "train.steps=6", "train.checkpoint_every=2", "train.batch_size=8", f"train.physical_batch_size={CHUNK}",
        "privacy.noise_seed=1", "augmult.k=2", "augmult.pad=2", "augmult.flip=true", "model.groups=4", *extra])


def weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)


def assert_same_weights(a, b):
    for part in ("model", "ema"):
        sa, sb = ((x[part] if part == "model" else x["averagers"][part]["weights"]) for x in (a, b))
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (part, k)


def test_train_with_workers_is_bit_identical_and_resumes(folder, tmp_path, monkeypatch):
    started = []  # batches sent to the workers
    start = BatchLoader._start
    monkeypatch.setattr(BatchLoader, "_start", lambda self, idx: (started.append(len(idx)), start(self, idx))[1])
    plain = train(tiny(tmp_path / "w0", folder), ledger_path=str(tmp_path / "a.sqlite"), progress=False)
    assert started == []
    with_workers = train(tiny(tmp_path / "w2", folder, "train.workers=2"), ledger_path=str(tmp_path / "b.sqlite"),
                         progress=False)
    assert_same_weights(weights(plain["run_dir"]), weights(with_workers["run_dir"]))
    assert with_workers["test_ema"] == plain["test_ema"]
    assert len(started) == 6  # the first batch, then each next one ahead; nothing after the last release
    started.clear()
    # killed after step 3 (a batch decoded ahead, never released), resumed from the step-2 checkpoint
    led = str(tmp_path / "c.sqlite")
    stopped = train(tiny(tmp_path / "k", folder, "train.workers=2"), ledger_path=led, progress=False, stop_after=3)
    assert stopped["stopped_at"] == 3 and len(started) == 4  # batch 4 decoded ahead, never released
    resumed = train(resume=Path(stopped["run_dir"]), ledger_path=led, progress=False)
    assert_same_weights(weights(plain["run_dir"]), weights(resumed["run_dir"]))
    assert resumed["releases"] == plain["releases"] == 6


def test_workers_are_validated(folder, tmp_path):
    with pytest.raises(ConfigError, match="train.workers must be >= 0"):
        tiny(tmp_path, folder, "train.workers=-1")
    with pytest.raises(ConfigError, match="train.workers=2 .* data.name='digits' is held in memory"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["train.workers=2"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_reported_without_its_file_or_index(tmp_path, workers, capfd, caplog):
    root = make_folder(tmp_path / "data")
    bad = root / "train" / "n002" / "img05.png"
    bad.write_bytes(b"not an image at all")
    x = images(root)
    i = x.files.index(str(bad))
    idx = torch.tensor([0, 3, i, 20])
    caplog.set_level("INFO")
    with BatchLoader(x, workers=workers, chunk_size=CHUNK, expected_batch=4) as loader:
        with pytest.raises(DataError) as caught:
            list(loader.fetch(idx, torch.tensor([1, 2])))
    message = str(caught.value)
    assert "cannot decode" in message or "an image cannot be decoded" in message
    assert not any(ch.isdigit() for ch in message)  # no index (nor a worker's number or pid)
    assert "img05" not in message and str(root) not in message and "n002" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained worker traceback
    out, err = capfd.readouterr()
    assert "img05" not in out + err and not caplog.records  # nothing printed or logged, by any process
    assert x.unreadable() == [str(bad)]  # a pass over all files, independent of any batch, finds it


def test_a_run_on_a_corrupt_image_is_refused_before_the_reservation(tmp_path, capsys):
    """data.check_images (the default) decodes every private file once, before anything is
    reserved, and names the bad ones; without it, the step that draws one stops the run, which
    stays reserved (exit 1, not the 'nothing charged' of exit 2) and says how to go on."""
    from accounting import Ledger
    from dpwa.cli import main

    root = make_folder(tmp_path / "data")
    bad = root / "train" / "n002" / "img05.png"
    bad.write_bytes(b"not an image at all")
    led = tmp_path / "l.sqlite"
    args = ["train", str(ROOT / "configs" / "quickstart.yaml"), "--no-progress", "--ledger", str(led),
            f"out_dir={tmp_path / 'runs'}", "data.name=imagefolder", f"data.root={root}", f"data.image_size={SIZE}",
            "train.steps=40", "train.batch_size=8", "model.groups=4", "augmult.k=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"1 private image file(s) cannot be decoded: {bad}" in err and "nothing was reserved" in err
    assert not led.exists() and not (tmp_path / "runs").exists()
    assert main([*args, "data.check_images=false"]) == 1  # 40 steps at q = 1/3: the file is drawn
    err = capsys.readouterr().err
    (run,) = Ledger(led).runs()
    assert run.status == "reserved" and f"Run {run.run_id!r} stays reserved" in err and "--resume" in err
    assert "img05" not in err


@pytest.mark.parametrize("workers", [0, 2])
def test_decoding_a_batch_prints_and_logs_nothing_of_its_images(tmp_path, workers, capfd, monkeypatch):
    """PIL warns on a palette image with transparency and on one past MAX_IMAGE_PIXELS (naming its
    pixel count), and logs each PNG chunk's length at DEBUG: emitted as a private batch is decoded,
    in this process or a worker's, any of these would tell which examples the step drew."""
    root = make_folder(tmp_path / "data")
    palette = Image.fromarray(np.zeros((20, 20), np.uint8), "L").convert("P")
    palette.save(root / "train" / "n001" / "palette.png", transparency=b"\x00" * 256)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "train" / "n002" / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1599)  # 40 x 40 warns, the others are smaller; the fork carries it to the workers
    x = images(root)
    odd = [x.files.index(str(root / "train" / c / f)) for c, f in (("n001", "palette.png"), ("n002", "large.png"))]
    handler = logging.StreamHandler(sys.stderr)  # as `logging.basicConfig(level=DEBUG)`; workers inherit it
    logging.getLogger().addHandler(handler)
    monkeypatch.setattr(logging.getLogger(), "level", logging.DEBUG)
    try:
        with _no_warnings():
            with BatchLoader(x, workers=workers, chunk_size=CHUNK, expected_batch=4) as loader:
                chunks = list(loader.fetch(torch.tensor([0, odd[0], 3, odd[1], 20]), torch.tensor(odd)))
                chunks += list(loader.fetch(torch.tensor(odd), None))
    finally:
        logging.getLogger().removeHandler(handler)
    assert [c.shape[0] for c in chunks] == [5, 2]
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert logging.getLogger("PIL").disabled is False  # restored
    said = x.problems()  # the same warnings, from a pass over every file
    assert {f for f, _ in said} == {x.files[i] for i in odd}
    assert any("DecompressionBombWarning" in p and "1600 pixels" in p for _, p in said)
    assert any("Transparency" in p for _, p in said) and x.unreadable() == []


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert [str(w.message) for w in caught] == []


def test_the_loader_writes_no_file(folder, tmp_path, monkeypatch, capfd):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where multiprocessing would put anything
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.chdir(tmp_path)

    def snapshot():
        return {(p, s.st_size, s.st_mtime_ns) for base in (folder, tmp_path)
                for p, s in ((p, p.stat()) for p in Path(base).rglob("*"))}

    before = snapshot()
    x = images(folder)
    batches = poisson_batches(len(x), 0.5, torch.Generator().manual_seed(0))
    with BatchLoader(x, workers=2, chunk_size=CHUNK, expected_batch=12) as loader:
        for _ in range(3):
            list(loader.fetch(next(batches), batches.peek()))
    assert snapshot() == before and not os.listdir(tmp)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_a_signal_to_the_process_group_stops_at_a_step_boundary(folder, tmp_path):
    """SIGTERM to the whole group (a scheduler's preemption): the workers leave it to the
    training process, which checkpoints and exits 143; no worker outlives it."""
    led, runs = tmp_path / "l.sqlite", tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cfg = tiny(tmp_path, folder, "train.workers=2", "train.steps=2000", "train.checkpoint_every=1000")
    (tmp_path / "c.yaml").write_text(config_to_yaml(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "dpwa", "train", str(tmp_path / "c.yaml"), "--no-progress",
                             "--ledger", str(led)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 600  # rows reach the disk at the checkpoint of step 1000: the handler is in place
    while time.time() < deadline and not (list(runs.glob("*/metrics.jsonl")) and
                                          len(next(runs.glob("*/metrics.jsonl")).read_text().splitlines()) >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err
    assert "SIGTERM: stopped after step" in err and "Traceback" not in err
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the group is empty: the workers are gone too
        os.killpg(proc.pid, 0)


def test_exiting_with_the_loader_open_does_not_hang(folder):
    code = ("import sys, torch; from dpwa.config import DataConfig; from dpwa.data import load_data; "
            "from dpwa.loader import BatchLoader; "
            f"x = load_data(DataConfig(name='imagefolder', root={str(folder)!r}, image_size=16)).train.x; "
            "loader = BatchLoader(x, workers=2, chunk_size=4, expected_batch=8); "
            "list(loader.fetch(torch.arange(8), torch.arange(8, 16))); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 3, done.stderr


def test_a_16_bit_greyscale_image_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips I;16 pixels at 255 (all near-white); the top 8 bits are kept."""
    from dpwa.data import _decode

    pixels = (np.arange(400).reshape(20, 20) * 150).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    got = _decode(str(tmp_path / "deep.png"))
    assert got.shape == (3, 20, 20) and got.dtype == torch.uint8
    assert torch.equal(got[0], torch.from_numpy((pixels >> 8).astype(np.uint8))) and torch.equal(got[0], got[2])
