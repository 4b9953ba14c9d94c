"""A run folder, and the released run it holds.

    RUN_DIR/config.yaml          the config (resume and eval read it back)
    RUN_DIR/run.json             run id, dataset, the planned mechanism (sigma, q, steps, delta)
    RUN_DIR/metrics.jsonl        one row per step, written at checkpoints (loss and batch size: local diagnostics)
    RUN_DIR/checkpoint.pt        the training state (`dpwa.state`), written atomically
    RUN_DIR/weights.safetensors  the last iterate
    RUN_DIR/report.json          the final report

`load_run(run_dir)` is how every tool after training (`dpwa eval`, landscapes, curve
endpoints) gets a run: its config, weights, averages and the epsilon its releases spent.
It reads no private training data (the training split is withheld).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from accounting import Gaussian, PoissonGaussian, epsilon

from .checkpoint import CheckpointError, atomic_write_text, fsync_dir, load_checkpoint, save_checkpoint, save_weights
from .config import ConfigError, RunConfig, config_from_yaml_text, config_to_yaml
from .errors import RefusalError, UsageError

__all__ = ["RunFolder", "RunFolderError", "RunFolderInUseError", "RunFolderProvenanceError", "MetricsLog", "ReleasedRun", "load_run",
           "check_writable", "curve_problem", "carried_runs", "pretrained_runs", "new_run_id", "CARRIED"]


class RunFolderProvenanceError(UsageError):
    """Weights whose released runs cannot be told (a copied-out dpwa checkpoint from before
    checkpoints recorded them, or a record dpwa did not write): refused before any charge."""


class RunFolderInUseError(RefusalError):
    """Another process holds the run folder (`RunFolder.hold`): refused before anything is
    read or charged (exit 1)."""


class RunFolderError(RefusalError, OSError):
    """The run folder cannot be written (disk full, permissions) after the reservation; the
    message says what the ledger holds for the run and how to go on (exit 1)."""


def check_writable(out_dir: Path, *, what: str = "out_dir", holds: str = "run folders",
                   files: Sequence[str] = ()) -> None:
    """Can `out_dir` (or a folder to be made there) hold `files`? Tried in its nearest existing
    ancestor, leaving nothing; before the ledger, so an unwritable folder costs nothing (a
    charged query's values would otherwise be released and then lost). `what` names the
    option in the message."""
    base = Path(out_dir).absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(f"{base} is not a folder")
        blocked = [f for f in files if (Path(out_dir) / f).exists() and not (Path(out_dir) / f).is_file()]
        if blocked:
            raise IsADirectoryError(f"{Path(out_dir) / blocked[0]} is in the way, not a file")
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise ConfigError(f"{what}={str(out_dir)!r} cannot hold {holds}: {e}") from None


def _row_step(line: str) -> float:
    """The step of a metrics row; a row torn by a kill mid-write counts as never written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl. A row is derived from releases (its iterate's accuracy, its epsilon) and
    reaches the file only once a checkpoint covers them (`publish`, after the checkpoint
    that holds `pending`): a run killed in between redoes those releases on resume, and rows
    of the lost ones, had anyone seen them, would be releases the ledger never counts. The
    checkpoint keeps the rows it covers until they are written (`held`), so a kill between
    the two loses none."""

    def __init__(self, path: Path, *, after_step: int, held: Sequence[dict[str, Any]] = ()) -> None:
        kept = []
        if path.exists():  # drop rows of steps to be redone and any torn row
            kept = [line for line in path.read_text().splitlines() if _row_step(line) <= after_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        last = max((_row_step(line) for line in kept), default=-math.inf)
        self.file = open(path, "a")
        self.pending: list[dict[str, Any]] = [row for row in held if row["step"] > last]

    def write(self, row: dict[str, Any]) -> None:
        """Hold the row until the checkpoint that covers its step (`publish`)."""
        self.pending.append(row)

    def publish(self) -> list[dict[str, Any]]:
        """Write the held rows, durably; call once a checkpoint holds them. Returns them."""
        import os

        rows, self.pending = self.pending, []
        for row in rows:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        return rows

    def close(self) -> None:
        self.file.close()


class RunFolder:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoint_path = self.path / "checkpoint.pt"

    @classmethod
    def existing(cls, path: Path) -> "RunFolder":
        folder = cls(path)
        if not (folder.path / "run.json").is_file() or not (folder.path / "config.yaml").is_file():
            raise ConfigError(f"{folder.path} is not a dpwa run folder (no run.json / config.yaml)")
        return folder

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the folder for one session (an exclusive flock on the folder itself, which is
        never replaced; the OS drops it when the process dies, killed or not). Two resumes of
        one run at once (a scheduler's requeue while the first still runs) would both release
        under its single reservation: the second is refused instead."""
        import fcntl

        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunFolderInUseError(
                    f"{self.path} is in use by another dpwa process (resuming it beside that one would release "
                    "twice under its one reservation): wait for it to end, or stop it, then resume") from None
            for left in self.path.glob(f"{STAGED}*"):  # a killed session's, never published
                left.unlink(missing_ok=True)
            yield
        finally:
            os.close(fd)

    def create(self, cfg: RunConfig, meta: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=False)
        atomic_write_text(self.path / "config.yaml", config_to_yaml(cfg))
        atomic_write_text(self.path / "run.json", json.dumps(meta, indent=2))

    def config(self) -> RunConfig:
        path = self.path / "config.yaml"
        try:
            return config_from_yaml_text(path.read_text())
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - YAML that does not parse: a damaged or hand-edited file
            raise ConfigError(f"{path} is not readable YAML ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "restore the file the run wrote") from None

    def meta(self) -> dict[str, Any]:
        path = self.path / "run.json"
        try:
            meta = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not readable JSON ({e}); restore the file the run wrote") from None
        missing = [k for k in ("run_id", "steps") if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise ConfigError(f"{path} lacks {', '.join(missing)}; restore the file the run wrote")
        return meta

    def metrics(self, *, after_step: int, held: Sequence[dict[str, Any]] = ()) -> MetricsLog:
        return MetricsLog(self.path / "metrics.jsonl", after_step=after_step, held=held)

    def rows(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl (a torn last row is skipped)."""
        path = self.path / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if _row_step(line) != math.inf]

    def stage_state(self, state: dict[str, Any]) -> list[Path]:
        """The checkpoint, written whole to its staged name (`publish` puts it in place)."""
        path = self.path / f"{STAGED}{self.checkpoint_path.name}"
        save_checkpoint(state, path)
        return [path]

    def stage_final(self, model: torch.nn.Module, carried: Sequence[dict[str, Any]], report: dict[str, Any],
                    curves: Callable[[Path], Any]) -> list[Path]:
        """The finished run's files under their staged names: the last iterate, with the runs it
        carries (this one first) in the file's header, so that a copy of the file outside this
        folder still carries them (`pretrained_runs`); report.json; `curves(path)` draws curves.png."""
        weights, text, png = (self.path / f"{STAGED}{name}" for name in ("weights.safetensors", "report.json",
                                                                           "curves.png"))
        save_weights(model, weights, metadata={CARRIED: json.dumps(list(carried))})
        atomic_write_text(text, json.dumps(report, indent=2))
        curves(png)
        return [weights, text, png]

    def publish(self, staged: Sequence[Path]) -> None:
        """Staged files into their places (renames: each whole, at once)."""
        for path in staged:
            os.replace(path, self.path / path.name[len(STAGED):])
        fsync_dir(self.path)

    @staticmethod
    def discard(staged: Sequence[Path]) -> None:
        for path in staged:
            path.unlink(missing_ok=True)

    def load_state(self) -> Optional[dict[str, Any]]:
        """The last checkpoint, or None (killed before its first one). CheckpointError
        (a usage error) if it cannot be read."""
        if not self.checkpoint_path.is_file():
            return None
        state = load_checkpoint(self.checkpoint_path)
        self._check_own(state)
        return state

    def _check_own(self, state: dict[str, Any]) -> None:
        """Refuse another run's checkpoint copied in: its weights would be published, or
        trained on, under this run's epsilon (checkpoints record their run first in `CARRIED`)."""
        try:
            runs = json.loads(state.get(CARRIED) or "[]")
            own = runs[0]["run_id"] if runs else None
        except (TypeError, ValueError, KeyError, IndexError):
            raise CheckpointError(f"{self.checkpoint_path}: its {CARRIED!r} record is damaged") from None
        run_id = self.meta()["run_id"]
        if own is not None and own != run_id:
            raise CheckpointError(f"{self.checkpoint_path} is the checkpoint of run {own!r}, not of this folder's run "
                                  f"{run_id!r} (run.json): restore the folder's own checkpoint")


@dataclasses.dataclass
class ReleasedRun:
    """A run as released: what may be published and post-processed for free."""

    folder: RunFolder
    cfg: RunConfig
    meta: dict[str, Any]
    data: Any            # dpwa.data.Data with the training split withheld
    model: torch.nn.Module
    averagers: dict      # name -> Averager
    step: int            # iterations made
    releases: int        # noisy releases made
    epsilon: Optional[float]  # what the releases spent (None: a public-data run)
    method_state: Optional[dict] = None  # the method's checkpointed state (EDST / Sup-tickets keep tickets there)

    def prediction_methods(self, swag_samples: Optional[int] = None) -> dict:
        """The last iterate, the averages and ensembles, and the models the method kept."""
        from .averaging import prediction_methods
        from .methods import METHODS

        kept = METHODS[self.cfg.method.name].released_models(self.cfg, self.model, self.method_state or {})
        return {**prediction_methods(self.model, self.averagers, seed=self.cfg.train.seed,
                                     swag_samples=swag_samples or self.cfg.averaging.swag_samples), **kept}


def pretrained_folder(pretrained: Optional[str]) -> Optional[Path]:
    """The dpwa run folder a `model.pretrained` file lies in (its weights.safetensors or
    checkpoint; through symbolic links; a relative path from the current directory), else
    None: a run that starts from those weights carries that run's releases, as a curve
    carries its endpoints'."""
    if not pretrained or pretrained == "cache":
        return None
    folder = Path(pretrained).expanduser().resolve().parent
    return folder if (folder / "run.json").is_file() and (folder / "config.yaml").is_file() else None


def new_run_id(prefix: str) -> str:
    """`prefix`-YYYYmmdd-HHMMSS-<4 random bytes>: a run's (or a charged query's) id. Two made in
    one second meet once in 4e9 (2 bytes met once in 65536)."""
    import secrets
    import time

    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


_CARRIED_KEYS = ("run_id", "dataset", "ledger", "private")
# The key under which weights.safetensors (its header) and checkpoint.pt record the released
# runs their weights carry: the run itself and its "built_on", as `carried_runs` lists them.
CARRIED = "dpwa.carried"
# What a session writes before the ledger lets it publish (`RunFolder.publish`, inside
# `Ledger.held`): the files under this prefix until then, so that the ledger's lock is held only
# for the renames, not for the writes.
STAGED = ".staged-"


def pretrained_runs(pretrained: Optional[str]) -> list[dict[str, Any]]:
    """The released runs a `model.pretrained` file carries (as `carried_runs` lists them):
    those of the run folder it lies in; else those the file records (`CARRIED`: dpwa writes
    them into every weights.safetensors and checkpoint.pt, so that a copy made elsewhere
    keeps them); else none: weights from outside dpwa (timm's, a torch.save of one's own).

    Raises:
        RunFolderProvenanceError: a dpwa checkpoint outside its run folder that records none
            (written before dpwa recorded them), or a record that is not dpwa's.
    """
    folder = pretrained_folder(pretrained)
    if folder is not None:
        return carried_runs([folder])
    path = Path(pretrained).expanduser() if pretrained and pretrained != "cache" else None
    if path is None or not path.is_file():
        return []  # the cache (timm's), or a missing file: load_weights refuses it by name
    record, dpwa_checkpoint = _recorded_runs(path)
    if record is None:
        if dpwa_checkpoint:
            raise RunFolderProvenanceError(
                f"model.pretrained={pretrained!r} is a dpwa checkpoint outside its run folder, written before "
                f"checkpoints recorded the runs their weights carry: name it where it lies in its run folder (next "
                f"to run.json), so that the spend of those runs composes with this one's")
        return []
    try:
        runs = json.loads(record)
    except ValueError:
        runs = None
    if not (isinstance(runs, list) and all(isinstance(r, dict) and set(_CARRIED_KEYS) <= set(r) for r in runs)):
        raise RunFolderProvenanceError(f"model.pretrained={pretrained!r}: its {CARRIED!r} record is not a list of "
                                       f"runs with {list(_CARRIED_KEYS)}; it was not written by dpwa")
    return [{k: r[k] for k in _CARRIED_KEYS} for r in runs]


def _recorded_runs(path: Path) -> tuple[Optional[str], bool]:
    """A weights file's `CARRIED` record (None: none or unreadable, which load_weights
    refuses by name), and whether it is a dpwa checkpoint (a training state)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get(CARRIED), False
        except Exception:  # noqa: BLE001 - not a safetensors file: load_weights says so
            return None, False
    try:
        state = load_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a torch file: load_weights says so
        return None, False
    if not isinstance(state, dict):
        return None, False
    record = state.get(CARRIED)
    return (record if isinstance(record, str) else None), {"model", "mechanism", "step"} <= set(state)


def carried_runs(folders: Sequence[Path], recorded: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Every released run whose weights a run carries: the run folders it starts from (a
    curve's endpoints, the folder of model.pretrained) and, from each, the runs it carried,
    whatever their dataset: its run.json "built_on", or for a folder from before "built_on"
    the folder of its own model.pretrained, followed in turn; then the runs `recorded` (those
    a weights file outside a run folder records: `pretrained_runs`). Each as run_id, dataset,
    ledger, private, once: what the new run's run.json records as its own "built_on"."""
    out: dict[str, dict[str, Any]] = {}
    todo, seen = [Path(f).resolve() for f in folders], set()
    while todo:
        folder = todo.pop(0)
        if folder in seen:
            continue
        seen.add(folder)
        meta = RunFolder(folder).meta()
        recorded = meta.get("built_on")
        for run in (meta, *(recorded or ())):
            out.setdefault(str(run.get("run_id")), {k: run.get(k) for k in _CARRIED_KEYS})
        if recorded is None:  # written before run.json listed what a run carries
            up = pretrained_folder(RunFolder(folder).config().model.pretrained)
            todo += [up] if up is not None else []
    for run in recorded:
        out.setdefault(str(run.get("run_id")), {k: run.get(k) for k in _CARRIED_KEYS})
    return list(out.values())


def curve_problem(cfg: RunConfig, run_dir: Path) -> Optional[str]:
    """Why a tool of single models cannot take this run: a curve run's "raw" model is w(1/2)
    and its averages those of w(1/2), not what it released (None for any other run)."""
    if cfg.method.name != "curve":
        return None
    return (f"{run_dir} is a curve run (method.name=curve): it released a curve, not one model; "
            f"`dpwa curve --eval {run_dir}` evaluates it along t, against the segment")


def _check_against_ledger(folder: RunFolder, meta: dict[str, Any], events: Sequence[Any]) -> None:
    """The mechanisms run.json and config.yaml give for the run's epsilon must be the ones its
    ledger reserved, where that ledger can be read (an edited run.json showed a smaller epsilon).
    A folder moved away from its ledger is read as it is."""
    from accounting import Ledger
    from accounting.errors import AccountingError

    path = meta.get("ledger")
    if not path or not Path(path).is_file():
        return
    try:
        record = Ledger(path, create=False).run(meta["run_id"])
    except AccountingError:
        return
    text = (folder.path / "config.yaml").read_bytes()
    if record.config_hash and "releases" in meta and record.config_hash != hashlib.sha256(text).hexdigest()[:16]:
        # (a folder from before run.json's "releases" hashed its config in an older layout)
        raise ConfigError(f"{folder.path}/config.yaml is not the config ledger {path} reserved run "
                          f"{meta['run_id']!r} with (its hash differs): the file was edited; restore it")
    reserved = {e.with_count(0) for e in record.planned}
    other = [e for e in events if e.with_count(0) not in reserved]
    if other:
        raise ConfigError(f"{folder.path}: its run.json and config.yaml give {other[0].with_count(0)} for the run's "
                          f"releases, but ledger {path} reserved {list(record.planned)} for run {meta['run_id']!r}: "
                          "the files were edited")


def load_run(run_dir: Path, *, test_time_flip: Optional[bool] = None) -> ReleasedRun:
    """The released run in `run_dir` (from its last checkpoint; runs made before versioned
    checkpoints load too). `test_time_flip` overrides the run's `data.test_time_flip`: how its
    val / test predictions are made is post-processing, free to choose after training.

    Raises:
        ConfigError: not a run folder, no checkpoint (stopped before its first), or a
            checkpoint that does not fit the run's config.
    """
    from .averaging import make_averagers
    from .data import load_data
    from .models.from_config import build_model
    from .schedules import Schedule
    from .state import StateError, upgrade
    from .threads import set_threads

    folder = RunFolder.existing(run_dir)
    cfg, meta = folder.config(), folder.meta()
    if test_time_flip is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_time_flip=test_time_flip))
    raw = folder.load_state()
    if raw is None:
        raise ConfigError(f"{folder.path} has no checkpoint.pt: the run stopped before its first checkpoint "
                          f"(train.checkpoint_every={cfg.train.checkpoint_every}); nothing was released")
    state = upgrade(raw)
    set_threads(cfg.train.threads)
    data = load_data(cfg.data, withhold_train=True)
    model = build_model(cfg, data, load_pretrained=False)  # the checkpoint holds the weights
    missing = [k for k in ("noise_multiplier", "sample_rate", "delta") if k not in meta] if cfg.privacy.enabled else []
    if missing:
        raise ConfigError(f"{folder.path}/run.json lacks {', '.join(missing)}; restore the file the run wrote")
    steps = int(meta["steps"])
    schedule = Schedule(cfg.optim, steps, swa_start=cfg.averaging.swa_start)
    averagers = make_averagers(cfg.averaging, model, total_steps=steps, is_minimum=schedule.is_minimum)
    try:
        model.load_state_dict(state["model"])
        for name, avg in averagers.items():
            avg.load_state_dict(state["averagers"][name])
        releases = int(state["mechanism"]["released"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise StateError(f"{folder.checkpoint_path} does not match the run's config: {type(e).__name__}: "
                         f"{str(e).splitlines()[0]}") from None
    eps: Optional[float] = None
    if cfg.privacy.enabled:  # every release the run made: feature statistics, validation accuracies, gradients
        stats = int(state.get("statistics", {}).get("released", 0))
        events = [Gaussian(noise_multiplier=cfg.feature_stats.noise_multiplier, count=stats)] if stats else []
        accuracies = int(state.get("validation", {}).get("released", 0))
        if accuracies:
            events.append(Gaussian(noise_multiplier=cfg.train.val_noise * cfg.data.val_size, count=accuracies))
        if releases:
            events.append(PoissonGaussian(noise_multiplier=meta["noise_multiplier"], sample_rate=meta["sample_rate"],
                                          steps=releases))
        _check_against_ledger(folder, meta, events)
        eps = epsilon(events, delta=meta["delta"], accountant=cfg.privacy.accountant) if events else 0.0
    return ReleasedRun(folder, cfg, meta, data, model, averagers, int(state["step"]), releases, eps,
                       state.get("method"))
