"""The training loop: private DP-SGD from a `RunConfig`, readable top to bottom.

Order of events, chosen so that bad input costs no privacy and a crash never under-counts:
load and validate everything (config, data, model, calibration) -> reserve the whole
planned spend in the ledger -> create the run folder -> train, writing a checkpoint and
recording progress in the ledger every `checkpoint_every` steps -> commit the steps taken
-> evaluate raw and averaged weights on the test (or validation) split -> report.json.
Under torchrun every rank runs the same loop on its share of each batch; rank 0 alone
writes (`dpwa.distributed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from accounting import Ledger, PoissonGaussian, epsilon, fingerprint, noise_multiplier_for
from accounting.errors import LedgerError

from .augmult import augmult_views
from .averaging import make_averagers, prediction_methods
from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint, save_weights
from .config import ConfigError, RunConfig, config_from_yaml_text, config_to_yaml
from .data import Data, load_data
from .evaluate import evaluate, evaluate_members
from .models import create_model
from .distributed import DistributedError, World, world_from_env
from .privacy import NonPrivateSGD, PrivateSGD, poisson_batches, secret_generator, secret_seed
from .optimizers import make_optimizer
from .schedules import Schedule

__all__ = ["train", "Plan", "plan_run", "build_model", "evaluate_methods", "RunFolderError"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run will do, fixed before it touches data: what the ledger reserves."""

    dataset_size: int
    sample_rate: float          # q = B / N
    steps: int
    noise_multiplier: float

    @property
    def event(self) -> PoissonGaussian:
        return PoissonGaussian(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)


def plan_run(cfg: RunConfig, dataset_size: int) -> Plan:
    """Sample rate, steps and noise for a config on a dataset of `dataset_size` examples."""
    b = cfg.train.batch_size
    if b > dataset_size:
        raise ConfigError(f"train.batch_size={b} must be <= the training set size N={dataset_size}")
    q = b / dataset_size
    steps = cfg.train.steps if cfg.train.steps is not None else math.ceil(cfg.train.epochs * dataset_size / b - 1e-9)
    if not cfg.privacy.enabled:
        sigma = 0.0  # public data, plain SGD (the config refuses this for private data)
    elif cfg.privacy.noise_multiplier is not None:
        sigma = float(cfg.privacy.noise_multiplier)
    else:
        sigma = noise_multiplier_for(target_epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, sample_rate=q,
                                     steps=steps, accountant=cfg.privacy.accountant)
    return Plan(dataset_size=dataset_size, sample_rate=q, steps=steps, noise_multiplier=sigma)


class _NoLedger:
    """The ledger where there is nothing to record: a non-private run on public data
    (`privacy.enabled: false`), and every rank of a distributed run but rank 0."""

    path = None

    def run(self, run_id: str) -> Any:
        return types.SimpleNamespace(status="reserved")  # always resumable: nothing was charged

    def reserve(self, **kwargs: Any) -> None: ...

    def progress(self, run_id: str, events: Any) -> None: ...

    def commit(self, run_id: str, events: Any) -> None: ...

    def release(self, run_id: str, reason: str) -> None: ...

    def spent(self, dataset: str, **kwargs: Any) -> None:
        return None


def build_model(cfg: RunConfig, data: Data, *, load_pretrained: bool = True) -> torch.nn.Module:
    """The config's model; `load_pretrained=False` skips reading pretrained weights (a
    checkpoint will overwrite them anyway, e.g. in `dpwa eval`)."""
    m = cfg.model
    return create_model(m.name, in_channels=data.in_channels, num_classes=data.num_classes, groups=m.groups,
                        weight_standardization=m.weight_standardization,
                        pretrained=m.pretrained if load_pretrained else None,
                        trainable=m.trainable, trainable_stages=m.trainable_stages)


def evaluate_methods(model: torch.nn.Module, averagers: dict, split: Any, data: Data, cfg: RunConfig,
                     only: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    """Metrics of the last iterate and of every average / ensemble the run kept."""
    methods = prediction_methods(model, averagers, swag_samples=cfg.averaging.swag_samples, seed=cfg.train.seed)
    return {name: evaluate_members(members(), split, data) for name, members in methods.items()
            if only is None or name in only}


def _row_step(line: str) -> float:
    """The step of a metrics row; a row torn by a kill mid-write counts as never written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class RunFolderError(OSError):
    """The run folder cannot be written (disk full, permissions); the message says what the
    ledger holds for the run and how to go on."""


def _check_writable(out_dir: Path) -> None:
    """Can the run folder be made? Tried in out_dir's nearest existing ancestor, leaving nothing."""
    base = out_dir.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(f"{base} is not a folder")
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise ConfigError(f"out_dir={str(out_dir)!r} cannot hold run folders: {e}") from None


def _folder_error(e: OSError, ledger: Any, run_id: str, run_dir: Path, *, released: bool) -> RunFolderError:
    """After the reservation: a run that took no step gives its reservation back; one that did
    keeps it (counted in full, progress at its last checkpoint) and can be resumed."""
    if released:
        ledger.release(run_id, reason=f"run folder could not be written before the first step: {e}")
        return RunFolderError(f"{e}; no step was taken and run {run_id!r}'s reservation was released")
    return RunFolderError(f"{e}; run {run_id!r} stays reserved in the ledger (counted in full). Fix the cause, "
                          f"then `dpwa train --resume {run_dir}` continues from its last checkpoint")


def _config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()[:16]


def _device(name: str, world: World) -> torch.device:
    """The config's device; under torchrun each rank takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    if name == "cuda" and world.size > 1:
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def _chunks(data: Data, idx: torch.Tensor, cfg: RunConfig, gen: torch.Generator,
            device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """Physical chunks of (this rank's share of) a logical batch: K augmented, normalised views
    per example. Sampling and augmentation run on the CPU."""
    a = cfg.augmult
    for part in idx.split(cfg.train.physical_batch_size):
        if data.features != "none":  # fixed features: one view, no augmentation (config enforces k=1)
            views = data.train.x[part].unsqueeze(1)
        else:
            views = augmult_views(data.train.x[part], k=a.k, pad=a.pad, flip=a.flip, generator=gen)
        yield data.normalize(views).to(device), data.train.y[part].to(device)


def _augment_seed(cfg: RunConfig, step: int, rank: int) -> int:
    """Augmentation coins are a function of (seed, step, rank): no state to checkpoint, and a
    resumed (or distributed) run draws the views an uninterrupted one would. They are not
    secret: the guarantee holds for any choice of views."""
    return (cfg.train.seed + 2) * 1_000_003 + step * 4099 + rank


def _load_resume_state(ckpt_path: Path, run_dir: Path, run_id: str) -> Optional[dict[str, Any]]:
    if not ckpt_path.is_file():
        return None  # killed before its first checkpoint: start from step 0 under the same reservation
    try:
        return load_checkpoint(ckpt_path)
    except ConfigError as e:
        raise _resume_error(run_dir, run_id, e) from None


def _resume_error(run_dir: Path, run_id: str, why: Any) -> CheckpointError:
    return CheckpointError(f"Cannot resume {run_dir}: {why}. Run {run_id!r} stays reserved in the ledger (counted in "
                           f"full); `dpwa ledger release {run_id} --reason ...` gives back what it did not spend")


def train(cfg: Optional[RunConfig] = None, *, resume: Optional[Path] = None, ledger_path: Optional[str] = None,
          progress: bool = True, stop_after: Optional[int] = None) -> dict[str, Any]:
    """Train privately; returns the report (also written to RUN_DIR/report.json).

    Under torchrun (WORLD_SIZE > 1) every process runs this function: each clips its share of
    every logical batch, rank 0 adds the noise once and alone writes files and the ledger
    (`dpwa.distributed`). Every rank returns rank 0's report.

    Args:
        cfg: the run config (None with `resume`: read from the run folder).
        resume: a run folder to continue from its last checkpoint, under its reservation.
        ledger_path: overrides `privacy.ledger`.
        progress: show a tqdm progress bar.
        stop_after: stop (as if killed) after this many steps in total; for tests.
    """
    wall0 = time.time()
    if resume is not None:
        run_dir = Path(resume)
        meta_path = run_dir / "run.json"
        if not meta_path.is_file() or not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} is not a dpwa run folder (no run.json / config.yaml)")
        cfg = config_from_yaml_text((run_dir / "config.yaml").read_text())
        run_id = json.loads(meta_path.read_text())["run_id"]
    else:
        assert cfg is not None
        run_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    t = cfg.train
    world = world_from_env(t.dist_backend, t.device, t.dist_timeout_s)
    try:
        return _train(cfg, world, world.broadcast(run_id), resume, ledger_path, progress and world.main, stop_after,
                      wall0)
    finally:
        world.close()


def _train(cfg: RunConfig, world: World, run_id: str, resume: Optional[Path], ledger_path: Optional[str],
           progress: bool, stop_after: Optional[int], wall0: float) -> dict[str, Any]:
    run_dir = Path(resume) if resume is not None else Path(cfg.out_dir) / run_id
    torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    private = cfg.privacy.enabled

    # 1. Validate everything before any privacy is spent, on every rank; all ranks stop if one fails.
    failed: Optional[Exception] = None
    try:
        device = _device(cfg.train.device, world)
        if world.size > 1 and not private:
            raise ConfigError("privacy.enabled=false (public data) trains in one process; drop torchrun")
        if cfg.train.batch_size % world.size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the world size "
                              f"{world.size} (each rank's expected share of a logical batch is B / world size)")
        data = load_data(cfg.data, seed=cfg.train.seed)
        plan = plan_run(cfg, len(data.train))
        # A resumed run's checkpoint holds its weights: pretrained weights are read for a new run only.
        fresh = resume is None or not (run_dir / "checkpoint.pt").is_file()
        model = build_model(cfg, data, load_pretrained=fresh).to(device)
        schedule = Schedule(cfg.optim, plan.steps, swa_start=cfg.averaging.swa_start)  # refuses bad cycles
        averagers = make_averagers(cfg.averaging, model, total_steps=plan.steps, is_minimum=schedule.is_minimum)
        # The optimizer touches no data; its engine refuses layers it cannot clip, before any charge.
        o = cfg.optim
        optimizer = make_optimizer(o, (p for p in model.parameters() if p.requires_grad))
        noise = secret_generator(cfg.privacy.noise_seed, device)  # used by rank 0 alone
        sgd: PrivateSGD | NonPrivateSGD
        if private:
            sgd = PrivateSGD(model, optimizer, noise_multiplier=plan.noise_multiplier,
                             clip_norm=cfg.privacy.clip_norm, expected_batch_size=cfg.train.batch_size,
                             rescale_to_unit=cfg.privacy.rescale_to_unit, generator=noise,
                             engine=cfg.privacy.engine, world_size=world.size)
        else:
            sgd = NonPrivateSGD(model, optimizer)
        if resume is None and world.main:
            _check_writable(Path(cfg.out_dir))  # before the ledger: an unwritable folder costs nothing
    except Exception as e:  # noqa: BLE001 - re-raised by world.check, on every rank
        failed = e
    world.check(failed)
    world.agree("config", _config_hash(cfg))
    world.agree("training data", fingerprint(data.source_labels))
    n_source = len(data.source_labels)
    if private and cfg.privacy.delta >= 1 / n_source and world.main:
        warnings.warn(f"privacy.delta={cfg.privacy.delta:g} is not below 1/N = {1 / n_source:g}")
    dataset = cfg.data.ledger_name or cfg.data.name
    if not world.main:
        averagers = {}  # averages are post-processing: rank 0 keeps them
    ledger: Ledger | _NoLedger = (Ledger(ledger_path or cfg.privacy.ledger) if private and world.main
                                  else _NoLedger())

    def spent(steps: int) -> list[PoissonGaussian]:  # the mechanism events of `steps` DP steps
        return [plan.event.with_count(steps)] if private else []

    # 2. Rank 0 reserves the whole plan (or finds the reservation of the run being resumed) and
    #    makes the run folder; a refusal stops every rank.
    def reserve() -> None:
        if resume is not None:
            run = ledger.run(run_id)
            if run.status != "reserved":
                raise LedgerError(f"Run {run_id!r} is {run.status} in the ledger; there is nothing to resume")
            return
        ledger.reserve(run_id=run_id, dataset=dataset, fingerprint=fingerprint(data.source_labels),
                       events=spent(plan.steps), config_hash=_config_hash(cfg), size=n_source)
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
            atomic_write_text(run_dir / "run.json", json.dumps({
                "run_id": run_id, "dataset": dataset, "ledger": str(ledger.path) if private else None,
                "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": plan.steps,
                "delta": cfg.privacy.delta, "private": private and cfg.privacy.noise_seed is None,
                "world_size": world.size}, indent=2))
        except OSError as e:
            raise _folder_error(e, ledger, run_id, run_dir, released=True) from None

    world.on_main(reserve)

    # 3. The training state, from rank 0's checkpoint when resuming. The Poisson sampling is
    #    secret like the noise (known batches would void the amplification by subsampling): only
    #    test runs (a noise seed) and public-data runs draw it from train.seed and checkpoint its
    #    state, for exact resumes. Every rank draws the same batches from rank 0's seed.
    ckpt_path = run_dir / "checkpoint.pt"
    state = world.on_main(lambda: _load_resume_state(ckpt_path, run_dir, run_id)) if resume is not None else None
    reproducible = not private or cfg.privacy.noise_seed is not None
    sample_gen = secret_generator(cfg.train.seed + 1 if reproducible
                                  else world.broadcast(secret_seed() if world.main else None))
    aug_gen = torch.Generator()
    start, seen, train_time = 0, 0, 0.0
    if state is not None:
        try:  # tensors on the CPU; load_state_dict copies them over
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            for name, avg in averagers.items():
                avg.load_state_dict(state["averagers"][name])
            if "sample_rng" in state:  # else a private run: it goes on with fresh secret sampling
                sample_gen.set_state(state["sample_rng"])
            if "noise_rng" in state:  # only in test runs with a fixed noise seed
                noise.set_state(state["noise_rng"])
            start, seen, train_time = state["step"], state["examples_seen"], state["train_time_s"]
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise _resume_error(run_dir, run_id, f"{ckpt_path} does not match the run ({type(e).__name__}: {e})") \
                from None
    steps_done = 0  # in this process
    try:
        def checkpoint(step: int) -> None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "averagers": {name: avg.state_dict() for name, avg in averagers.items()},
                     "step": step, "examples_seen": seen, "train_time_s": train_time}
            if reproducible:  # never for private runs: it would reveal the batches
                state["sample_rng"] = sample_gen.get_state()
            if cfg.privacy.noise_seed is not None:
                state["noise_rng"] = noise.get_state()  # never for private runs: it would reveal the noise
            save_checkpoint(state, ckpt_path)
            ledger.progress(run_id, spent(step))

        def eps_at(step: int) -> Optional[float]:
            if not private:
                return None
            return epsilon([plan.event.with_count(step)], delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)

        eval_split = data.test if cfg.train.eval_split == "test" else data.val
        if cfg.train.eval_split == "val" and private and world.main:
            warnings.warn("train.eval_split=val: accuracy on examples held out of the private training data is not "
                          "covered by the DP guarantee; use it to tune locally, do not publish it")
        metrics_path = run_dir / "metrics.jsonl"
        if world.main and resume is not None and metrics_path.exists():  # drop rows of steps to be redone
            kept = [line for line in metrics_path.read_text().splitlines() if _row_step(line) <= start]
            atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))
        metrics = open(metrics_path, "a") if world.main else None  # rank 0 keeps the books
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=plan.steps, initial=start, desc=run_id, unit="step", dynamic_ncols=True)
        batches = poisson_batches(len(data.train), plan.sample_rate, sample_gen)
        eps_now = eps_at(start) if world.main and (start or not private) else 0.0

        # 4. Train.
        for step in range(start, plan.steps):
            if stop_after is not None and step >= stop_after:
                if metrics:
                    metrics.close()
                if bar:
                    bar.close()
                return {"stopped_at": step, "run_dir": str(run_dir), "run_id": run_id}
            t0 = time.time()
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = next(batches)  # the whole logical batch: the same on every rank
            aug_gen.manual_seed(_augment_seed(cfg, step, world.rank))
            try:
                stats = sgd.step(_chunks(data, world.shard(idx), cfg, aug_gen, device))
            except RuntimeError as e:  # a collective failed: another rank died or hung
                if world.size == 1:
                    raise
                raise world.failure(e, run_id, run_dir) from None
            done = steps_done = step + 1
            for avg in averagers.values():  # post-processing of the released iterate: no data
                avg.update(model, done)
            seen += len(idx)
            train_time += time.time() - t0
            if metrics is None:
                continue  # not rank 0: no averages, rows, checkpoints or epsilons to keep
            row: dict[str, Any] = {"step": done, "lr": lr, **stats, "batch_size": len(idx),
                                   "images_per_s": seen * cfg.augmult.k / max(train_time, 1e-9)}
            at_checkpoint = done % cfg.train.checkpoint_every == 0 or done == plan.steps
            if at_checkpoint:
                eps_now = eps_at(done)
                row["epsilon"] = eps_now
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != plan.steps:
                cheap = {"raw": model, **{n: a.model for n, a in averagers.items() if n in ("ema", "polyak", "swa")
                                          and a.count}}
                for name, m in cheap.items():
                    row.update({f"{cfg.train.eval_split}_{name}_{k}": v for k, v in evaluate(m, eval_split, data).items()})
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if at_checkpoint:  # after its row is on disk: a kill in between redoes the step, no row is lost
                os.fsync(metrics.fileno())
                checkpoint(done)
            if bar:
                shown = ({"private_loss": f"{stats['private_batch_loss_diagnostic']:.3f}", "eps": f"{eps_now:.2f}"}
                         if private else {"loss": f"{stats['train_batch_loss']:.3f}", "eps": "none (public)"})
                bar.set_postfix(**shown, img_s=f"{row['images_per_s']:.0f}")
                bar.update(1)
        if bar:
            bar.close()
        if metrics is None:
            return world.broadcast(None)  # rank 0's report
        metrics.close()

        # 5. Commit what was spent, then evaluate (on public/held-out data only) and report.
        ledger.commit(run_id, spent(plan.steps))
        # SWAG's Bayesian model averages cost swag_samples passes each: `dpwa eval` computes them.
        results = evaluate_methods(model, averagers, eval_split, data, cfg, only=["raw", "ema", "polyak", "swa", "fge"])
        report = {
            "run_id": run_id, "dataset": dataset, "private": private and cfg.privacy.noise_seed is None,
            "epsilon": eps_now, "delta": cfg.privacy.delta, "accountant": cfg.privacy.accountant,
            "dataset_epsilon_spent": ledger.spent(dataset, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant),
            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": plan.steps,
            "augmult_k": cfg.augmult.k, "eval_split": cfg.train.eval_split, "world_size": world.size,
            "methods": list(results), "collected": {name: avg.count for name, avg in averagers.items()},
            **{f"{cfg.train.eval_split}_{name}": r for name, r in results.items()},
            "examples_seen": seen, "per_example_gradient_evaluations": seen * cfg.augmult.k,
            "train_time_s": train_time, "wall_time_s": time.time() - wall0,
            "images_per_s": seen * cfg.augmult.k / max(train_time, 1e-9),
        }
        save_weights(model, run_dir / "weights.safetensors")  # the last iterate: model.pretrained can read it
        atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2))
        return world.broadcast({**report, "run_dir": str(run_dir)})
    except DistributedError:
        raise
    except OSError as e:  # disk full, permissions, a vanished folder: a clear error, a consistent ledger
        raise _folder_error(e, ledger, run_id, run_dir, released=resume is None and steps_done == 0) from None
