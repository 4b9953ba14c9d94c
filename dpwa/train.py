"""The session loop: private training from a `RunConfig`, readable top to bottom.

    validate -> plan (releases from the method) -> probe -> reserve -> folder -> resume
    -> [feature statistics] -> steps (the method's) -> averages -> rows and checkpoints
    -> evaluate -> report -> commit

Ordered so that bad input costs no privacy and a crash never under-counts: everything that
can refuse (config, data, model, delta, the probe of the model and engine) does so before the
ledger reserves the whole plan; the gradient mechanism refuses any release beyond it; the
ledger's progress and commit are the mechanism's own count. A new algorithm is a method
(`dpwa/methods/`), not an edit of this loop. Under torchrun every rank runs the same loop on
its share of each batch; rank 0 alone writes (`dpwa.distributed`).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .alloc import retain_freed_memory
from .threads import set_threads  # before torch: it sets OMP_WAIT_POLICY=PASSIVE for OpenMP to read

import torch

from accounting import (Event, Gaussian, Ledger, PoissonGaussian, epsilon, noise_multiplier_for,
                        sample_rate_and_steps)
from accounting.errors import AccountantFailedError, AccountingError, LedgerError, StaleCheckpointError
from accounting.events import merge
from accounting.ledger import check_delta_below_1_over_n, default_ledger_path

from .augmult import augmult_views
from .averaging import length_problems, make_averagers, prediction_methods
from .config import ConfigError, RunConfig, config_to_yaml
from .curves import EpsilonCurve, draw_curves, log_row, release_grid, tensorboard_writer
from .data import HELD_OUT, Data, DataError, Source, carve_outside, load_data, outside_guarantee
from .distributed import DistributedError, World, world_from_env
from .engines import make_engine
from .errors import RefusalError, UsageError
from .evaluate import evaluate, evaluate_members
from .loader import BatchLoader
from .loss_query import check_holds_run
from .mechanism import GradientMechanism, PublicGradients
from .methods import METHODS, Step, make_method
from .models import resolved_model_config
from .models.from_config import build_model
from .models.standardize import Standardize, set_statistics
from .privacy import keyed_state, poisson_batches, secret_entropy, secret_generator, seed_state
from .probe import probe
from .run_folder import (CARRIED, RunFolder, RunFolderError, carried_runs, check_writable, new_run_id,
                         pretrained_runs)
from .schedules import Schedule
from .state import Coins, StateError, TrainState
from .statistics import RELEASES_PER_ESTIMATE, StatisticsMechanism
from .validation import FINAL, PERIODIC, ValidationAccuracy, validation_event

__all__ = ["train", "Plan", "plan_run", "build_model", "evaluate_methods", "RunFolderError"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run will do, fixed before it touches data: what the ledger reserves."""

    dataset_size: int
    sample_rate: float          # q = B / N
    steps: int                  # iterations
    releases: int               # noisy gradient releases (the method's count for `steps`)
    noise_multiplier: float
    statistics: Optional[Gaussian] = None  # the feature-statistics releases (model.input_norm=private)
    validation: Optional[Gaussian] = None  # the validation accuracies (train.eval_split=val, dpwa.validation)

    @property
    def event(self) -> PoissonGaussian:
        return PoissonGaussian(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                               steps=self.releases)

    @property
    def prior(self) -> list[Event]:
        """What the run releases besides its gradients (composed with them in the calibration)."""
        return [e for e in (self.statistics, self.validation) if e is not None]

    @property
    def events(self) -> list[Event]:
        """Everything the run releases: what the ledger reserves."""
        return [*self.prior, self.event]


_USE_RDP = "use privacy.accountant=rdp, a looser bound that is always computable"


def plan_run(cfg: RunConfig, dataset_size: int) -> Plan:
    """Sample rate, iterations, releases and noise for a config on `dataset_size` examples."""
    b = cfg.train.batch_size
    if b > dataset_size:
        raise ConfigError(f"train.batch_size={b} must be <= the training set size N={dataset_size}")
    q, steps = sample_rate_and_steps(batch_size=b, dataset_size=dataset_size, epochs=cfg.train.epochs or 0)
    steps = cfg.train.steps if cfg.train.steps is not None else steps
    releases = METHODS[cfg.method.name].releases(cfg, steps)
    p = cfg.privacy
    statistics = (Gaussian(noise_multiplier=cfg.feature_stats.noise_multiplier, count=RELEASES_PER_ESTIMATE)
                  if cfg.model.input_norm == "private" else None)
    validation = validation_event(cfg, steps)
    prior = [e for e in (statistics, validation) if e is not None]
    try:
        if p.enabled and p.noise_multiplier is None and prior:
            _check_prior(cfg, statistics, validation)
        sigma = 0.0 if not p.enabled else (  # public data: plain gradients (the config refuses this for private data)
            float(p.noise_multiplier) if p.noise_multiplier is not None else
            noise_multiplier_for(target_epsilon=p.epsilon, delta=p.delta, sample_rate=q, steps=releases,
                                 accountant=p.accountant, prior=prior))
    except AccountantFailedError as e:
        raise ConfigError(f"privacy.accountant={p.accountant} cannot calibrate the noise for epsilon {p.epsilon} "
                          f"(q {q:.4g}, {releases} releases: {e}); {_USE_RDP}") from None
    return Plan(dataset_size=dataset_size, sample_rate=q, steps=steps, releases=releases, noise_multiplier=sigma,
                statistics=statistics, validation=validation)


def _check_prior(cfg: RunConfig, statistics: Optional[Gaussian], validation: Optional[Gaussian]) -> None:
    """The releases besides the gradients must leave room for them under privacy.epsilon:
    refused by name otherwise (the calibration would find no noise multiplier)."""
    p = cfg.privacy
    parts = {"feature statistics (model.input_norm=private)": statistics,
             f"validation accuracies (train.eval_split=val: {validation and validation.count} of them, noise std "
             f"{cfg.train.val_noise:g} on {cfg.data.val_size} examples)": validation}
    alone = {what: epsilon([e], delta=p.delta, accountant=p.accountant) for what, e in parts.items() if e}
    together = epsilon([e for e in parts.values() if e], delta=p.delta, accountant=p.accountant)
    if together >= p.epsilon:
        spent = "; ".join(f"{what}: epsilon {eps:.3g}" for what, eps in alone.items())
        raise ConfigError(f"privacy.epsilon={p.epsilon} leaves nothing for the gradients: {spent} (together "
                          f"{together:.3g}). Raise train.val_noise, evaluate less often (train.eval_every), use a "
                          "larger data.val_size, or raise privacy.epsilon")


class _NoLedger:
    """The ledger where there is nothing to record: a public-data run, and every rank but 0."""

    path = None

    def run(self, run_id: str) -> Any:
        return types.SimpleNamespace(status="reserved")  # always resumable: nothing was charged

    def reserve(self, **kwargs: Any) -> None: ...

    def claim(self, run_id: str, holding: Any = None) -> None: ...

    @contextlib.contextmanager
    def held(self, run_id: str, session: Any) -> Iterator[None]:
        yield

    def progress(self, run_id: str, events: Any, session: Any = None) -> None: ...

    def checkpointed(self, run_id: str, events: Any) -> None: ...

    def commit(self, run_id: str, events: Any) -> None: ...

    def release(self, run_id: str, reason: str) -> None: ...

    def spent(self, dataset: str, **kwargs: Any) -> None:
        return None


def evaluate_methods(model: torch.nn.Module, averagers: dict, split: Any, data: Data, cfg: RunConfig,
                     only: Optional[list[str]] = None, validation: Optional[ValidationAccuracy] = None
                     ) -> dict[str, dict[str, float]]:
    """Metrics of the last iterate and of every average / ensemble the run kept; through
    `validation` (a charged validation split), their noisy accuracies alone."""
    methods = prediction_methods(model, averagers, swag_samples=cfg.averaging.swag_samples, seed=cfg.train.seed)
    chosen = {name: members for name, members in methods.items() if only is None or name in only}
    if validation is not None:
        return {name: {"accuracy": validation.accuracy(members(), split, data)} for name, members in chosen.items()}
    return {name: evaluate_members(members(), split, data) for name, members in chosen.items()}


def _config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()[:16]


def _device(name: str, world: World) -> torch.device:
    """The config's device; under torchrun each rank takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    return torch.device("cuda", world.local_rank) if name == "cuda" and world.size > 1 else torch.device(name)


def _chunks(data: Data, idx: torch.Tensor, images: Iterator[torch.Tensor], cfg: RunConfig, gen: torch.Generator,
            device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """Physical chunks of (this rank's share of) a logical batch: K augmented, normalised views
    per example, from the images of `idx.split(physical_batch_size)` (`BatchLoader.fetch`).
    Sampling and augmentation run on the CPU, in this process."""
    a = cfg.augmult
    for part, x in zip(idx.split(cfg.train.physical_batch_size), images):
        if data.features != "none":  # fixed features: one view, no augmentation (config enforces k=1)
            views = x.unsqueeze(1)
        else:
            views = augmult_views(x, k=a.k, pad=a.pad, flip=a.flip, generator=gen)
        yield data.normalize(views).to(device), data.train.y[part].to(device)


def _augment_coins(gen: torch.Generator, base: int | bytes, release: int, rank: int) -> torch.Generator:
    """Augmentation coins are a function of (base, release, rank): no state to checkpoint.

    They are secret in a private run (`base`: 32 bytes of OS entropy, broadcast from rank 0,
    written nowhere; each release's whole mt19937 state is a hash of it, `keyed_state`), like the
    sampling: a row's coins follow its position in the batch, so with known coins adding one
    example would move the views, and the clipped gradients, of the examples after it
    (sensitivity above C). Secret coins drawn independently of the batch leave every other
    example's views identically distributed. A reproducible run (a test noise seed, public data)
    takes base = train.seed and draws the views an uninterrupted one would."""
    if isinstance(base, bytes):
        return keyed_state(gen, base, release, rank)
    return gen.manual_seed(((base + 2) * 1_000_003 + release * 4099 + rank) % 2**64)


def _check_padding(cfg: RunConfig, data: Data) -> None:
    """Reflect padding needs pad < the image's height and width: a step would fail on it, after
    the reservation, naming the size of the secret batch."""
    pad, (height, width) = cfg.augmult.pad, tuple(data.train.x.shape[-2:])
    if data.features == "none" and pad and pad >= min(height, width):
        raise ConfigError(f"augmult.pad={pad} must be below the training images' height and width "
                          f"({height} x {width}): the crops reflect-pad each side by it")


def _check_images(cfg: RunConfig, data: Data) -> None:
    """Every private image file decodes (data.check_images): one pass over all of them in order,
    which depends on no secret batch, so it may name them. A file found by a step instead would
    stop the run reserved, at a step that tells it was drawn."""
    if cfg.data.name != "imagefolder" or not cfg.data.check_images:
        return
    bad = [f for split in (data.train, data.val) if split is not None for f in split.x.unreadable()]
    if bad:
        raise DataError(f"{len(bad)} private image file(s) cannot be decoded: {', '.join(bad[:5])}"
                        f"{' ...' if len(bad) > 5 else ''}; fix or remove them (nothing was reserved)")


def _check_delta(cfg: RunConfig, n: int) -> None:
    """delta >= 1/N allows publishing an example outright: refused unless accepted by name."""
    check_delta_below_1_over_n(cfg.privacy.delta, n, accept=cfg.privacy.accept_delta_above_1_over_n,
                               what="privacy.delta", accept_hint="privacy.accept_delta_above_1_over_n=true")


def _folder_error(e: OSError, ledger: Any, run_id: str, run_dir: Path, *, released: bool) -> RunFolderError:
    """After the reservation: a run that released nothing gives its reservation back; one that
    did keeps it (counted in full, progress at its last checkpoint) and can be resumed."""
    if released:
        ledger.release(run_id, reason=f"run folder could not be written before the first release: {e}")
        return RunFolderError(f"{e}; nothing was released and run {run_id!r}'s reservation was given back")
    return RunFolderError(f"{e}; run {run_id!r} stays reserved in the ledger (counted in full). Fix the cause, "
                          f"then `dpwa train --resume {run_dir}` continues from its last checkpoint")


def _check_resume_plan(folder: RunFolder, run: Any, cfg: RunConfig, plan: Plan) -> None:
    """A resumed run must be the run that was reserved: its config hash and its mechanism
    (sigma, q, releases) as the ledger and run.json hold them. An edited config.yaml is refused
    before any step."""
    meta = folder.meta()
    planned = {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
               "releases": plan.releases}
    recorded = {k: meta.get(k, meta["steps"] if k == "releases" else None) for k in planned}
    # runs from before the session loop hashed their config in the v1 layout: their plan is checked
    # the hash of config.yaml as written at the reservation: its text, not a re-serialisation,
    # so a dpwa that added config fields since still resumes an unedited run
    text = (folder.path / "config.yaml").read_text()
    same_config = run.config_hash in (_config_hash(cfg), hashlib.sha256(text.encode()).hexdigest()[:16]) \
        or "releases" not in meta
    if not same_config or recorded != planned or list(run.planned) != merge(plan.events):  # as the ledger holds them
        why = ("its hash differs from the one the ledger recorded at the reservation: the file was edited"
               if same_config is False and recorded == planned else
               f"reserved: {recorded}; the config now gives {planned}")
        raise StateError(f"Cannot resume {folder.path}: its config.yaml no longer matches the run reserved in the "
                         f"ledger ({why}). Restore the config the run started with; run {run.run_id!r} stays "
                         "reserved (counted in full)")


def _check_resume_data(folder: RunFolder, run: Any, ledger: Any, source: Source) -> None:
    """A resumed run trains on the data its reservation was charged to: the same fingerprint
    (in the ledger's keyed form) and size as the ledger's record of its dataset (other data would
    be spent on uncharged)."""
    record, now = ledger.dataset(run.dataset), ledger.keyed(source.fingerprint)
    if record.fingerprint != now or record.size != source.size:
        raise StateError(f"Cannot resume {folder.path}: its training data is not the data reserved in the ledger "
                         f"(dataset {run.dataset!r}: fingerprint {record.fingerprint}, {record.size} examples; the "
                         f"data now: {now}, {source.size} examples). Restore the data "
                         f"the run started on; run {run.run_id!r} stays reserved (counted in full)")


def _older_checkpoint(e: StaleCheckpointError) -> str:
    """Why the checkpoint is older than the newest one the run wrote (`Ledger.claim` found it):
    a copy of the folder made earlier, or a rolled-back file. Resuming it would release again
    what the newer checkpoint released, under a reservation that counts each release once."""
    newest = e.newest
    return (f"it holds {e.held} of the {newest.count} {type(newest).__name__} releases (noise multiplier "
            f"{newest.noise_multiplier:g}) that the run's "
            "newest checkpoint held (the ledger recorded it): this is an older copy of the run, or a rolled-back "
            "file, and resuming it would release past what the ledger counts. Resume the folder with the newest "
            "checkpoint")


def _resume_error(run_dir: Path, run_id: str, why: Any) -> StateError:
    return StateError(f"Cannot resume {run_dir}: {why}. Run {run_id!r} stays reserved in the ledger (counted in "
                      f"full); `dpwa ledger release {run_id} --reason ...` gives back what it did not spend")


@dataclasses.dataclass(frozen=True)
class Options:
    """How `train` runs (not what: that is the config)."""

    resume: Optional[Path] = None
    ledger_path: Optional[str] = None
    progress: bool = True
    stop_after: Optional[int] = None
    dry_run: bool = False
    announce: bool = False
    model: Optional[torch.nn.Module] = None


class Interrupted(RefusalError):
    """SIGINT / SIGTERM: the run stopped at a step boundary after a checkpoint; it stays
    reserved and `dpwa train --resume` continues it. Exit 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def train(cfg: Optional[RunConfig] = None, *, resume: Optional[Path] = None, ledger_path: Optional[str] = None,
          progress: bool = True, stop_after: Optional[int] = None, dry_run: bool = False, announce: bool = False,
          model: Optional[torch.nn.Module] = None) -> dict[str, Any]:
    """Train privately; returns the report (also written to RUN_DIR/report.json).

    >>> import dpwa, tempfile                                            # doctest: +SKIP
    >>> cfg = dpwa.load_config("configs/quickstart.yaml", ["train.steps=20"])  # doctest: +SKIP
    >>> dpwa.train(cfg, ledger_path=tempfile.mktemp())["epsilon"]          # doctest: +SKIP

    Args:
        cfg: the run config (None with `resume`: read from the run folder).
        resume: a run folder to continue from its last checkpoint, under its reservation.
        ledger_path: overrides `privacy.ledger`.
        progress: show a tqdm progress bar.
        stop_after: stop (as if killed) after this many steps in total; for tests.
        dry_run: validate, plan and probe, then return what the run would spend (sigma, q,
            steps, epsilon, the dataset's remaining budget) without reserving anything.
        announce: print the run folder to stderr when it is made (the CLI does).
        model: your own `nn.Module` instead of `model.name` (probed like any other; give the
            same module again to resume).
    """
    wall0 = time.time()
    if resume is not None:
        folder = RunFolder.existing(resume)
        cfg, run_id = folder.config(), folder.meta()["run_id"]
    else:
        assert cfg is not None
        # what the model's defaults are now is written down: config.yaml and the hash say what ran
        cfg = dataclasses.replace(cfg, model=resolved_model_config(cfg.model))
        run_id = new_run_id(cfg.name)
    t = cfg.train
    world = world_from_env(t.dist_backend, t.device, t.dist_timeout_s)
    opts = Options(resume, ledger_path, progress and world.main, stop_after, dry_run, announce, model)
    try:
        with _signals(world) as stop, contextlib.ExitStack() as held:
            return _session(cfg, world, world.broadcast(run_id), opts, stop, wall0, held)
    finally:
        world.close()


@contextlib.contextmanager
def _signals(world: World) -> Iterator[list[int]]:
    """SIGINT / SIGTERM set a flag the loop reads at each step boundary (one process, main
    thread only; under torchrun the launcher's signals stop the ranks as before)."""
    stop: list[int] = []
    if world.size > 1 or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: stop.append(signum))
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _session(cfg: RunConfig, world: World, run_id: str, opts: Options, stop: list[int], wall0: float,
             held: contextlib.ExitStack) -> dict[str, Any]:
    resume, ledger_path, show_progress, stop_after = opts.resume, opts.ledger_path, opts.progress, opts.stop_after
    folder = RunFolder(Path(resume) if resume is not None else Path(cfg.out_dir) / run_id)
    thread_choice = set_threads(cfg.train.threads)  # count and reason, for the report
    allocator = retain_freed_memory(cfg.train.retain_freed_mb)  # the config checked the limit
    torch.manual_seed(cfg.train.seed)
    private, p = cfg.privacy.enabled, cfg.privacy

    # 1. Validate, plan and probe on every rank, before any privacy is spent; all stop if one fails.
    failed: Optional[Exception] = None
    try:
        if resume is not None and world.main:  # one session at a time resumes a run: until `held` closes
            held.enter_context(folder.hold())
        device = _device(cfg.train.device, world)
        if world.size > 1 and not private:
            raise ConfigError("privacy.enabled=false (public data) trains in one process; drop torchrun")
        if cfg.train.batch_size % world.size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the world size "
                              f"{world.size} (each rank's expected share of a logical batch is B / world size)")
        if cfg.train.steps is not None:  # the length is known before the data: refuse a bad one before loading it
            _check_length(cfg, cfg.train.steps)
        data = load_data(cfg.data, digest=world.size > 1)  # the ranks agree on it (`_agree_on_data`)
        _check_padding(cfg, data)
        _check_images(cfg, data)
        n_source = data.source.size
        if private:
            _check_delta(cfg, n_source)
        plan = plan_run(cfg, len(data.train))
        if cfg.train.steps is None:  # train.epochs: the length is known only now
            _check_length(cfg, plan.steps)
        planned_epsilon = _planned_epsilon(cfg, plan) if private else None
        fresh = resume is None or not folder.checkpoint_path.is_file()  # a checkpoint holds the weights
        model = (opts.model if opts.model is not None else build_model(cfg, data, load_pretrained=fresh)).to(device)
        views = 1 if data.features != "none" else cfg.augmult.k
        model.train()  # the mode the mechanism trains in, and the one the probe checks
        probe_s = probe(model, p.engine, example_shape=tuple(data.train.x.shape[1:]), views=views,
                        num_classes=data.num_classes, batch=cfg.train.physical_batch_size).seconds if private else 0.0
        schedule = Schedule(cfg.optim, plan.steps, swa_start=cfg.averaging.swa_start)  # refuses bad cycles
        noise_std = plan.noise_multiplier * (1.0 if p.rescale_to_unit else p.clip_norm) / cfg.train.batch_size
        method = make_method(cfg, model, noise_std=noise_std if private else 0.0)  # public: std of a release's noise
        # after the method, which may move the weights (a curve to w(1/2), sparse masks): EMA
        # starts from the copy it takes here, which must be the run's first iterate
        averagers = make_averagers(cfg.averaging, model, total_steps=plan.steps, is_minimum=schedule.is_minimum)
        coins = Coins(noise=secret_generator(p.noise_seed, device),  # the noise: used by rank 0 alone
                      sampling=torch.Generator(), reproducible=not private or p.noise_seed is not None,
                      validation=secret_generator(None if p.noise_seed is None else p.noise_seed + 11, "cpu")
                      if plan.validation else None)
        engine = make_engine(p.engine, model) if private else None
        if hasattr(engine, "plan_memory"):  # dpwa-fast's memory=auto: chosen now, for a public chunk size
            dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)
            engine.plan_memory(torch.zeros(1, views, *data.train.x.shape[1:], device=device, dtype=dtype),
                               cfg.train.physical_batch_size)
        mechanism = (GradientMechanism(model, engine=engine, clip_norm=p.clip_norm,
                                       noise_multiplier=plan.noise_multiplier,
                                       expected_batch_size=cfg.train.batch_size, sample_rate=plan.sample_rate,
                                       releases=plan.releases, generator=coins.noise, world=world,
                                       rescale_to_unit=p.rescale_to_unit)
                     if private else PublicGradients(model, releases=plan.releases))
        # released runs whose weights this run carries, transitively: a method's (a curve's
        # endpoints) and the run folder model.pretrained lies in. Each that was charged must be
        # in this run's ledger, whatever its dataset's name (aliases, subsets), so that the
        # spend on their data composes with this run's; a public-data run (no ledger) charged
        # nothing, but what it carried counts. A resumed run has them in its run.json.
        built_on = [] if resume is not None else carried_runs(METHODS[cfg.method.name].built_on(cfg),
                                                              recorded=pretrained_runs(cfg.model.pretrained))
        charged = [meta for meta in built_on if meta.get("ledger")]
        if private and world.main and charged:  # their spend composes with this run's, in one ledger
            charged_to = Ledger(ledger_path or p.ledger, create=False)  # read, never created here
            for meta in charged:
                check_holds_run(charged_to, meta, f"{cfg.method.name} run {run_id!r}, built on released run "
                                                  f"{meta['run_id']!r} (a curve endpoint, or model.pretrained)")
        statistics = _statistics_mechanism(cfg, plan, model, len(data.train))
        validation = _validation_mechanism(cfg, plan, coins)
        tensorboard = tensorboard_writer(cfg.train.tensorboard)  # refused here if the package is missing
        if resume is None and world.main:
            check_writable(Path(cfg.out_dir))
    except Exception as e:  # noqa: BLE001 - re-raised by world.check, on every rank
        failed = e
    world.check(failed)
    world.agree("config", _config_hash(cfg))
    _agree_on_data(world, data)
    dataset = cfg.data.ledger_name or cfg.data.name
    # private: DP noise from a secret seed, on released runs that were private (or public-data
    # runs, which read nothing private); a resumed run also keeps what its run.json recorded
    # when it started, wherever its model.pretrained has gone since
    is_private = private and p.noise_seed is None and (
        world.on_main(lambda: bool(folder.meta().get("private"))) if resume is not None
        else all(m.get("private") for m in charged))
    if opts.dry_run:  # everything up to the reservation: nothing is charged or written
        return {**_dry_run(cfg, plan, dataset, ledger_path, probe_s, resumed=run_id if resume is not None else None),
                "private": is_private, "built_on": built_on}
    averagers = averagers if world.main else {}  # averages are post-processing: rank 0 keeps them
    # a resumed run's ledger is the one its run.json names (unless --ledger moves it), and is never
    # created: a new, empty file would only say that the run is not in it
    where = Path(ledger_path or (folder.meta().get("ledger") if resume is not None else None) or p.ledger
                 or default_ledger_path()).expanduser()
    if private and world.main and not where.exists():
        if resume is not None:
            raise _resume_error(folder.path, run_id, f"the ledger it was charged to, {where}, does not exist (moved, "
                                "or on another machine): give --ledger PATH of the ledger that holds the run")
        if opts.announce:
            print(f"dpwa: creating a new ledger at {where} (no budget and no other run's spend: if you meant an "
                  "existing one, stop and give --ledger)", file=sys.stderr)
    ledger: Any = Ledger(where, create=resume is None) if private and world.main else _NoLedger()
    # what the run writes that the guarantee does not cover (warned, and listed in the report)
    outside = {flag: what for flag, what, on in (
        ("train.eval_split=val with train.val_noise=0", HELD_OUT,
         cfg.train.eval_split == "val" and cfg.train.val_noise == 0),
        ("train.private_diagnostics=true", "each private batch's loss and realised size (in metrics.jsonl and "
         "curves.png)", cfg.train.private_diagnostics)) if on and private} | (carve_outside(cfg.data) if private else {})

    # 2. Rank 0 reserves the whole plan (or finds the reservation of the run being resumed) and
    #    makes the run folder, which it holds (`RunFolder.hold`) until the session ends; a refusal
    #    stops every rank. It claims the run (`Ledger.claim`; a resume's claim is refused from a
    #    checkpoint older than the newest recorded one): rank 0 writes checkpoints and the final
    #    weights only while it holds the run, so of two copies of a folder resumed at once only the
    #    last to claim goes on.
    session: list[Any] = [None]

    def reserve() -> None:
        if resume is not None:  # the reservation, not the folder's (editable) config, is the plan
            run = ledger.run(run_id)
            if run.status != "reserved":
                raise LedgerError(f"Run {run_id!r} is {run.status} in the ledger; there is nothing to resume")
            if private:
                _check_resume_plan(folder, run, cfg, plan)
                _check_resume_data(folder, run, ledger, data.source)
            return
        ledger.reserve(run_id=run_id, dataset=dataset, fingerprint=data.source.fingerprint,
                       events=plan.events if private else [], config_hash=_config_hash(cfg), size=n_source,
                       delta=p.delta)
        try:
            folder.create(cfg, {"run_id": run_id, "dataset": dataset, "ledger": str(ledger.path) if private else None,
                                "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                                "steps": plan.steps, "releases": plan.releases, "delta": p.delta,
                                "private": is_private, "world_size": world.size,
                                "method": cfg.method.name, "built_on": built_on})
        except OSError as e:
            raise _folder_error(e, ledger, run_id, folder.path, released=True) from None
        held.enter_context(folder.hold())  # a resume of it while this session runs is refused at once
        session[0] = ledger.claim(run_id)

    world.on_main(reserve)
    # what its weights carry (it, then its "built_on"), recorded in its checkpoints and weights
    carried = world.on_main(lambda: carried_runs([folder.path]))
    if opts.announce and world.main:
        print(f"dpwa: run {run_id} in {folder.path}", file=sys.stderr, flush=True)

    # 3. Resume from rank 0's checkpoint. The Poisson sampling is secret like the noise; every
    #    rank draws the same batches from rank 0's secret state (test and public runs: from train.seed).
    #    So are the augmentation coins (`_augment_coins`): their key comes with the sampling state,
    #    in one broadcast.
    if coins.reproducible:
        coins.sampling.manual_seed(cfg.train.seed + 1)
        augment_base = cfg.train.seed
    else:  # the whole mt19937 state, rank 0's, on every rank (a seed gives it 32 bits: `seed_state`)
        entropy, augment_base = world.broadcast((secret_entropy(), os.urandom(32)) if world.main else None)
        seed_state(coins.sampling, entropy)
    state = TrainState(model, method, averagers, mechanism, coins, statistics=statistics, validation=validation)

    def spent() -> list[Event]:  # what the mechanisms released so far: the ledger's progress and commit
        return [*(statistics.events() if statistics else []), *(validation.events() if validation else []),
                *mechanism.events()]

    def keep(**extra: str) -> None:  # rank 0: a checkpoint, between the ledger's two records of its count
        # the count first: a kill between the two leaves the ledger ahead of the checkpoint
        # (over-counting), never a checkpoint's weights ahead of what a release of the run keeps;
        # then, once it is on disk, that it holds them: an older copy of the run can no longer resume
        held = spent()
        ledger.progress(run_id, held, session=session[0])
        publish(folder.stage_state({**state.state_dict(), CARRIED: json.dumps(carried), **extra}),
                lambda: ledger.checkpointed(run_id, held))

    def publish(staged: list[Path], record: Callable[[], Any]) -> None:
        """Written files into place and their record in the ledger, in one short ledger
        transaction that finds this session still holding the run (`Ledger.held`, which checked
        the claim: `record` need not again, and no other session's claim can fall between them);
        files of a session that lost the run are deleted."""
        try:
            with ledger.held(run_id, session[0]):
                folder.publish(staged)
                record()
        except BaseException:
            folder.discard(staged)
            raise

    held_rows: list[dict[str, Any]] = []
    final: Optional[dict[str, Any]] = None  # a resumed run's released final validation accuracies
    if resume is not None:
        try:  # a private run's checkpoint holds no generator state: it goes on with fresh secret coins
            saved = world.on_main(folder.load_state)  # None: killed before its first checkpoint
            if saved is not None:
                state.load_state_dict(saved)
                held_rows = json.loads(saved.get("rows", "[]"))  # covered by it, perhaps not yet written
                final = json.loads(saved["final"]) if "final" in saved else None
        except UsageError as e:  # unreadable, or not this run's
            why = str(e) if str(folder.checkpoint_path) in str(e) else f"{folder.checkpoint_path}: {e}"
            raise _resume_error(folder.path, run_id, why) from None

        def claim() -> Optional[str]:  # refused, in the claim's own transaction, from an older checkpoint
            try:
                session[0] = ledger.claim(run_id, holding=spent() if saved is not None else [])
            except StaleCheckpointError as e:
                return _older_checkpoint(e)
            return None

        behind = world.on_main(claim)
        if behind:
            raise _resume_error(folder.path, run_id, f"{folder.checkpoint_path}: {behind}") from None
    if statistics is not None and statistics.released == 0:  # before the first step; a resumed run has them
        _release_statistics(statistics, data, model, world)
        if world.main:  # kept at once: a kill before the first checkpoint must not release them again
            keep()
    start = state.step
    batches = poisson_batches(len(data.train), plan.sample_rate, coins.sampling)
    loader = BatchLoader(data.train.x, workers=cfg.train.workers, chunk_size=cfg.train.physical_batch_size,
                         expected_batch=cfg.train.batch_size / world.size)
    aug_gen = torch.Generator()

    def release():  # the next secret batch, this rank's share, through the mechanism
        idx = world.shard(next(batches))
        # with train.workers: decoded while the previous release computed, and the next batch (peeked
        # from a copy of the sampler: it stays put) while this one does, if the ledger reserved it
        ahead = (world.shard(batches.peek()) if loader.workers and mechanism.released + 1 < mechanism.releases
                 else None)
        images = loader.fetch(idx, ahead)
        _augment_coins(aug_gen, augment_base, mechanism.released, world.rank)
        try:
            return mechanism.release(_chunks(data, idx, images, cfg, aug_gen, device))
        except DataError as e:  # an image decoded in the step (data.check_images=false): the run stays reserved
            raise RefusalError(f"{e}. Run {run_id!r} stays reserved in the ledger (counted in full); fix the "
                               f"file(s) (data.check_images=true lists them before a run) and resume it with "
                               f"`dpwa train --resume {folder.path}`") from None
        except RuntimeError as e:  # a collective failed: another rank died or hung
            if world.size == 1:
                raise
            raise world.failure(e, run_id, folder.path) from None

    try:
        metrics = folder.metrics(after_step=start, held=held_rows) if world.main else None  # rank 0 keeps the books
        board = tensorboard(str(folder.path / "tensorboard")) if tensorboard and world.main else None

        def checkpoint() -> None:  # rank 0: the state, then the rows it covers
            keep(rows=json.dumps(metrics.pending))
            for covered in metrics.publish():
                if board:
                    log_row(board, covered)

        if metrics is not None:
            for covered in metrics.publish():  # rows the checkpoint resumed from holds, if a kill kept them back
                if board:
                    log_row(board, covered)
        eval_split = data.test if cfg.train.eval_split == "test" else data.val
        for flag, what in outside.items() if world.main else ():
            warnings.warn(outside_guarantee(flag, what), stacklevel=2)
        bar = None
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(total=plan.steps, initial=start, desc=run_id, unit="step", dynamic_ncols=True)
        # Between checkpoints an upper bound of what was released so far: the gradient releases
        # counted at the grid point at or above theirs, the validation accuracies at the point of
        # a coarser grid at or above theirs (one curve per such point, made when first needed).
        prior = statistics.events() if statistics else []
        accuracies = release_grid(plan.validation.count, 8) if validation else []
        curves: dict[int, EpsilonCurve] = {}

        def bound() -> float:
            v = validation.released if validation else 0
            v = v and accuracies[bisect.bisect_left(accuracies, v)]
            if v not in curves:
                counted = [*prior, *([dataclasses.replace(plan.validation, count=v)] if v else [])]
                curves[v] = EpsilonCurve(lambda n: _epsilon([*counted, *mechanism.events(n)], p, planned_epsilon),
                                         releases=plan.releases)
            return curves[v].at(mechanism.released)

        def exact_epsilon() -> Optional[float]:  # of what was released so far
            return _epsilon(spent(), p, planned_epsilon) if private and world.main else None

        eps_now = exact_epsilon()

        # 4. The method's steps; averages, rows and checkpoints after each.
        for step in range(start, plan.steps):
            if (stop_after is not None and step >= stop_after) or stop:
                if stop and metrics is not None:  # SIGINT / SIGTERM: checkpoint at this step boundary
                    checkpoint()
                for closable in (metrics, bar, board):
                    if closable:
                        closable.close()
                if stop:  # then say how to go on
                    raise _interrupted(stop[0], state, folder, eps_now)
                return {"stopped_at": step, "run_dir": str(folder.path), "run_id": run_id}
            t0 = time.time()
            lr = schedule(step)
            stats = method.step(Step(index=step, lr=lr, release=release))
            state.step = done = step + 1
            for avg in averagers.values():  # post-processing of the released iterate: no data
                avg.update(model, done)
            state.train_time_s += time.time() - t0
            if metrics is None:
                continue  # not rank 0: no averages, rows, checkpoints or epsilons to keep
            if private and not cfg.train.private_diagnostics:  # the private batch's loss and size stay here
                stats = {k: v for k, v in stats.items() if not k.startswith("private_")}
            row: dict[str, Any] = {"step": done, "lr": lr, **stats}
            if step == start and private:  # once: how the engine computes each layer's norms (shapes only)
                engine = getattr(mechanism, "engine", None)
                row["engine"] = {"name": p.engine, "layers": dict(getattr(engine, "plan", None) or {})}
                if hasattr(engine, "memory"):
                    row["engine"]["memory"] = engine.memory  # dpwa-fast: "fast" or "lean", as chosen
            at_checkpoint = done % cfg.train.checkpoint_every == 0 or done == plan.steps
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != plan.steps:
                row.update(_cheap_evaluations(cfg, model, averagers, eval_split, data, validation))
            if private:  # exact at checkpoints, an upper bound from a grid in between
                eps_now = row["epsilon"] = exact_epsilon() if at_checkpoint else bound()
            metrics.write(row)  # held back until the checkpoint that covers its releases
            if at_checkpoint:
                checkpoint()
            if bar:
                loss = stats.get("private_batch_loss_diagnostic")
                bar.set_postfix(**({} if loss is None else {"loss": f"{loss:.3f}"}),
                                eps="public" if not private else f"{eps_now:.2f}")
                bar.update(1)
        if bar:
            bar.close()
        if metrics is None:
            return world.broadcast(None)  # rank 0's report
        metrics.close()
        if board:
            board.close()

        # 5. Evaluate (on public/held-out data), write weights, report and curves, then commit
        #    what the mechanism released: a kill before the commit leaves a resumable run.
        if final is None:
            final = evaluate_methods(model, averagers, eval_split, data, cfg, only=list(FINAL), validation=validation)
            if validation is not None:  # released: counted and kept before anything is written, so that a
                keep(final=json.dumps(final))  # resumed run reports these, never a second draw
        if validation is not None:
            eps_now = exact_epsilon()  # with the final accuracies
        results = final
        report = {"run_id": run_id, "dataset": dataset, "private": is_private,
                  "outside_guarantee": list(outside),
                  "epsilon": eps_now, **_dataset_spent(ledger, dataset, p),
                  **_plan_report(cfg, plan, mechanism, statistics, validation, world), "methods": list(results),
                  "collected": {name: avg.count for name, avg in averagers.items()},
                  **{f"{cfg.train.eval_split}_{name}": r for name, r in results.items()},
                  **_counts_report(cfg, plan, state, probe_s, wall0), "threads": dataclasses.asdict(thread_choice),
                  "allocator": allocator}
        accuracies = {name: r["accuracy"] for name, r in results.items()}
        staged = folder.stage_final(model, carried, report, lambda png: draw_curves(  # the last iterate, the
            folder.rows(), png, title=f"{run_id} ({dataset})", final=accuracies))  # report and the curves
        publish(staged, lambda: ledger.commit(run_id, spent()))
        finished = {**report, "run_dir": str(folder.path)}
        try:
            return world.broadcast(finished)
        except DistributedError:  # committed and written: the run is done, whatever another rank did
            warnings.warn(f"run {run_id} finished and was committed; another rank stopped answering at the end "
                          "(nothing is left to do)", stacklevel=2)
            return finished
    except DistributedError:
        raise
    except OSError as e:  # disk full, permissions, a vanished folder: a clear error, a consistent ledger
        # the reservation is given back only if nothing at all was released (not: no step was
        # completed; a step of several releases, or the statistics before the first, release too)
        nothing = mechanism.released == 0 and not (statistics and statistics.released) and not (
            validation and validation.released)
        raise _folder_error(e, ledger, run_id, folder.path, released=resume is None and nothing) from None
    finally:
        loader.close()  # its workers stop; a batch decoded ahead and never released is dropped


def _dataset_spent(ledger: Any, dataset: str, p: Any) -> dict[str, Any]:
    """The dataset's spend for the report. PRV's discretisation can fail on a long history of
    runs (a known limit of the accountant): the report then gives the RDP bound, labelled,
    instead of failing at the end of a run."""
    try:
        return {"dataset_epsilon_spent": ledger.spent(dataset, delta=p.delta, accountant=p.accountant)}
    except (AccountingError, RuntimeError) as e:  # RuntimeError: the PRV discretisation check
        return {"dataset_epsilon_spent": ledger.spent(dataset, delta=p.delta, accountant="rdp"),
                "dataset_epsilon_spent_accountant": f"rdp ({p.accountant} failed: {e})"}


def _cheap_evaluations(cfg: RunConfig, model: torch.nn.Module, averagers: dict, split: Any,
                       data: Data, validation: Optional[ValidationAccuracy]) -> dict[str, float]:
    """Metrics of the raw weights and the single-model averages for a metrics row (through
    `validation`: their noisy accuracies alone)."""
    cheap = {"raw": model, **{n: a.model for n, a in averagers.items() if n in PERIODIC and a.count}}
    if validation is not None:
        return {f"val_{name}_accuracy": validation.accuracy([m], split, data) for name, m in cheap.items()}
    return {f"{cfg.train.eval_split}_{name}_{k}": v for name, m in cheap.items()
            for k, v in evaluate(m, split, data).items()}


def _agree_on_data(world: World, data: Data) -> None:
    """The ranks train on one dataset: its labels' fingerprint and, each node holding its own
    copy, its examples in order (`content_digest`: pixels, or image files' names). Two orders of
    one class's examples share a fingerprint, and an example at index i on one node and i + 1 on
    another could be drawn twice in one step (sensitivity 2 C)."""
    world.agree("training data", data.source.fingerprint)
    if world.size > 1:
        world.agree("training examples (their order and content)", data.source.content)


def _check_length(cfg: RunConfig, steps: int) -> None:
    """The schedule's and the averagers' settings against a `steps`-step run, every problem
    in one message (they are checked again where they are built, once the data gives the
    length of a run set in epochs)."""
    problems, is_minimum = [], None
    try:
        is_minimum = Schedule(cfg.optim, steps, swa_start=cfg.averaging.swa_start).is_minimum
    except ConfigError as e:
        problems.append(str(e))
    problems += length_problems(cfg.averaging, total_steps=steps, is_minimum=is_minimum)
    problems += METHODS[cfg.method.name].length_problems(cfg, steps)
    if problems:
        raise ConfigError("; ".join(problems))


def _plan_report(cfg: RunConfig, plan: Plan, mechanism: Any, statistics: Optional[StatisticsMechanism],
                 validation: Optional[ValidationAccuracy], world: World) -> dict[str, Any]:
    p = cfg.privacy
    stats = {} if statistics is None else {"feature_statistics": {
        "noise_multiplier": statistics.noise_multiplier, "releases": statistics.released,
        "mean_clip": statistics.mean_clip, "second_moment_clip": statistics.second_moment_clip}}
    if validation is not None:  # each accuracy's noise std, its count's noise multiplier, how many were released
        stats["validation"] = {"noise": validation.noise, "noise_multiplier": validation.noise_multiplier,
                               "releases": validation.released, "reserved": validation.releases}
    return {"method": cfg.method.name, "delta": p.delta, "accountant": p.accountant,
            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": plan.steps,
            "releases": mechanism.released, **stats, "augmult_k": cfg.augmult.k, "eval_split": cfg.train.eval_split,
            "world_size": world.size}


def _statistics_mechanism(cfg: RunConfig, plan: Plan, model: torch.nn.Module, n: int
                          ) -> Optional[StatisticsMechanism]:
    """The statistics mechanism of model.input_norm=private (its noise on the CPU, from its own
    secret generator), after checking the model has a layer to take them."""
    if plan.statistics is None:
        return None
    if not any(isinstance(m, Standardize) for m in model.modules()):
        raise ConfigError("model.input_norm=private needs a dpwa.models.standardize.Standardize layer in the model "
                          "to take the released statistics; this model has none")
    f, seed = cfg.feature_stats, cfg.privacy.noise_seed
    return StatisticsMechanism(noise_multiplier=f.noise_multiplier, mean_clip=f.mean_clip,
                               second_moment_clip=f.second_moment_clip, dataset_size=n,
                               releases=plan.statistics.count,
                               generator=secret_generator(None if seed is None else seed + 7, "cpu"))


def _validation_mechanism(cfg: RunConfig, plan: Plan, coins: Coins) -> Optional[ValidationAccuracy]:
    """The mechanism of a charged validation split (its noise from its own generator in `coins`)."""
    if plan.validation is None:
        return None
    return ValidationAccuracy(noise=cfg.train.val_noise, size=cfg.data.val_size, releases=plan.validation.count,
                              generator=coins.validation)


def _release_statistics(statistics: StatisticsMechanism, data: Data, model: torch.nn.Module, world: World) -> None:
    """Rank 0 releases the statistics of the training features and every rank takes them."""
    released = world.on_main(lambda: statistics.release(data.train.x))
    if not world.main:  # rank 0's mechanism counted the release; the other ranks record that it was made
        statistics.released = statistics.releases
    set_statistics(model, released.mean, released.var)


def _counts_report(cfg: RunConfig, plan: Plan, state: TrainState, probe_s: float, wall0: float) -> dict[str, Any]:
    """Expected counts only: the realised ones depend on the secret sampling."""
    expected = plan.sample_rate * plan.dataset_size * plan.releases  # Entropy-SGD: L releases a step
    return {"expected_examples": expected, "expected_per_example_gradient_evaluations": expected * cfg.augmult.k,
            "probe_s": probe_s, "train_time_s": state.train_time_s, "wall_time_s": time.time() - wall0,
            "expected_images_per_s": expected * cfg.augmult.k / max(state.train_time_s, 1e-9)}


def _epsilon(events: list[Event], p: Any, planned: Optional[float] = None) -> float:
    """Epsilon of what was released so far; where the accountant cannot compose a part of the
    plan (PRV at some extreme mechanisms), the whole plan's epsilon, an upper bound."""
    events = [e for e in events if e.count]
    try:
        return epsilon(events, delta=p.delta, accountant=p.accountant) if events else 0.0
    except AccountantFailedError:
        if planned is None:
            raise
        return planned


def _planned_epsilon(cfg: RunConfig, plan: Plan) -> float:
    """The epsilon of the whole plan, before anything is reserved: a plan the accountant cannot
    compose is refused here rather than fail mid-run."""
    p = cfg.privacy
    try:
        return epsilon(plan.events, delta=p.delta, accountant=p.accountant)
    except AccountantFailedError as e:
        raise ConfigError(f"privacy.accountant={p.accountant} cannot compute the epsilon of this run (sigma "
                          f"{plan.noise_multiplier:.4g}, q {plan.sample_rate:.4g}, {plan.releases} releases: {e}); "
                          f"{_USE_RDP}") from None


def _interrupted(signum: int, state: TrainState, folder: RunFolder, eps: Optional[float]) -> Interrupted:
    """How to go on after a signal (the step boundary reached is checkpointed)."""
    spent = "nothing (public data)" if eps is None else f"epsilon {eps:.3f} so far"
    return Interrupted(f"{signal.Signals(signum).name}: stopped after step {state.step}, checkpoint written in "
                       f"{folder.path} ({spent}; the run stays reserved in the ledger, counted in full until it "
                       f"commits). Continue it with `dpwa train --resume {folder.path}`", signum)


def _dry_run(cfg: RunConfig, plan: Plan, dataset: str, ledger_path: Optional[str], probe_s: float,
             resumed: Optional[str] = None) -> dict[str, Any]:
    """What the run would spend and what the dataset would have left; reads the ledger only
    (a missing ledger file is not created). A resumed run's own reservation is in the ledger
    already: the spend after it composes the plan with the other runs only."""
    p = cfg.privacy
    out: dict[str, Any] = {"dry_run": True, "dataset": dataset, "private": p.enabled, "method": cfg.method.name,
                           "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                           "steps": plan.steps, "releases": plan.releases, "delta": p.delta,
                           "accountant": p.accountant, "probe_s": probe_s, "epsilon": None,
                           **({"statistics_releases": plan.statistics.count,
                               "statistics_noise_multiplier": plan.statistics.noise_multiplier}
                              if plan.statistics else {}),
                           **({"validation_releases": plan.validation.count,
                               "validation_noise_multiplier": plan.validation.noise_multiplier,
                               "validation_noise": cfg.train.val_noise,
                               "validation_epsilon": epsilon([plan.validation], delta=p.delta, accountant=p.accountant)}
                              if plan.validation and p.enabled else {})}
    if not p.enabled:
        return out
    out["epsilon"] = epsilon(plan.events, delta=p.delta, accountant=p.accountant)
    ledger = Ledger(ledger_path or p.ledger, create=False)  # a missing file stays missing
    out["ledger"] = str(ledger.path)
    nothing = {**out, "dataset_epsilon_spent": 0.0, "dataset_epsilon_after": out["epsilon"], "budget": None}
    if not ledger.exists:
        return nothing
    try:
        record = ledger.dataset(dataset)
    except LedgerError:
        return nothing
    prior = list(ledger.counted_events(dataset))
    others = prior if resumed is None else [e for r in ledger.runs(dataset) if r.run_id != resumed for e in r.counted]
    out["dataset_epsilon_spent"] = epsilon(prior, delta=p.delta, accountant=p.accountant) if prior else 0.0
    out["dataset_epsilon_after"] = epsilon([*others, *plan.events], delta=p.delta, accountant=p.accountant)
    out["resumed_run"] = resumed  # its reservation is counted in "spent" already
    out["budget"] = None if record.budget_epsilon is None else {"epsilon": record.budget_epsilon,
                                                               "delta": record.budget_delta}
    return out


class _CallableModule(types.ModuleType):
    """`dpwa.train(cfg)` is the function even when `dpwa.train` resolves to this module
    (Python binds a package's submodule to its attribute once `dpwa.train` is imported)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
