"""Evaluation of a finished (or checkpointed) run: the last iterate and every average and
ensemble it kept, with accuracy, NLL, ECE and Brier score, a reliability diagram, and
`eval.json`. On the test split it is post-processing: nothing is charged, and the private
training split is withheld (`data.Withheld`), so no method can read it. The validation split
of a private run was carved from its private data: each method's accuracy there is a noisy
count (`dpwa.validation`), charged to the run's ledger as a query of its own, unless asked
for exactly (`val_noise=0`: warned, outside the guarantee)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from accounting import MIN_NOISE_MULTIPLIER

from .averaging import METHODS
from .checkpoint import atomic_write_text
from .config import ConfigError, TrainConfig
from .data import carve_outside, outside_guarantee
from .errors import UsageError
from .evaluate import member_metrics, metrics, predict_members, reliability_bins
from .reliability import draw_reliability
from .run_folder import RunFolder, check_writable, curve_problem, load_run

__all__ = ["evaluate_run", "EvalError"]

_NEEDS = {"swa": "averaging.swa: true", "fge": "averaging.snapshots: true (with a cyclic or sgdr schedule)",
          "swag": "averaging.swag: true", "swag_diag": "averaging.swag: true",
          "tickets": "method.name=edst or suptickets, and a ticket collected by the checkpoint",
          "suptickets": "method.name=suptickets, and a ticket collected by the checkpoint",
          "pswa": "method.name=pswa, and an iterate averaged since its last restart by the checkpoint; "
                  "a run that ends on a restart has that average as raw"}
_KEPT_BY = {"tickets": ("edst", "suptickets"), "suptickets": ("suptickets",), "pswa": ("pswa",)}  # models only these methods keep


class EvalError(ConfigError):
    """The run folder cannot give what was asked; the message says what is missing."""


def evaluate_run(run_dir: Path, *, split: str = "test", methods: Optional[Sequence[str]] = None,
                 swag_samples: Optional[int] = None, test_time_flip: Optional[bool] = None,
                 val_noise: Optional[float] = None, ledger_path: Optional[str] = None,
                 noise_generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """Evaluate a run folder's last checkpoint; writes eval.json and reliability.png into it
    (eval-val.json, and reliability-val.png when exact, for the validation split).
    `test_time_flip` (None: the run's `data.test_time_flip`) also averages the mirror images'
    softmax into every prediction. On a private run's validation split, `val_noise` (None: the
    run's `train.val_noise`, or the default where that is 0) is the std of each released
    accuracy, charged to `ledger_path` (None: the run's ledger); 0 gives exact metrics outside
    the guarantee.

    Raises:
        EvalError: not a run folder, no checkpoint, an unreadable checkpoint, a requested
            method the run did not keep (or has too few snapshots for), a missing split, a
            bad val_noise.
        BudgetExceededError: the charged query would take the dataset past its budget.
    """
    run_dir = Path(run_dir)
    unknown = [m for m in methods or () if m not in METHODS]
    if unknown:
        raise EvalError(f"Unknown method(s) {unknown}; known: {list(METHODS)}")
    if val_noise is not None and not (math.isfinite(val_noise) and (val_noise == 0 or val_noise >= MIN_NOISE_MULTIPLIER)):
        raise EvalError(f"val_noise must be 0 or a finite number >= {MIN_NOISE_MULTIPLIER:g} (the std of a released "
                        f"accuracy; 0: exact, outside the DP guarantee), got {val_noise}")
    try:
        cfg = RunFolder.existing(run_dir).config()
    except ConfigError as e:
        raise EvalError(str(e)) from None
    if why := curve_problem(cfg, run_dir):
        raise EvalError(why)
    if split == "val" and not cfg.data.val_size:
        raise EvalError("--data val: the run's config has data.val_size=0, so there is no validation split")
    suffix = "" if split == "test" else f"-{split}"
    check_writable(run_dir, what="RUN_DIR", holds=f"eval{suffix}.json", files=(f"eval{suffix}.json",))  # before a charge
    try:
        run = load_run(run_dir, test_time_flip=test_time_flip)  # reads no private training data
    except UsageError as e:
        raise EvalError(str(e)) from None
    cfg, meta, data, averagers = run.cfg, run.meta, run.data, run.averagers
    steps, at = int(meta["steps"]), run.step

    minimum = {"ema": 1, "polyak": 1, "swa": 1, "fge": 1, "swag": 2, "swag_diag": 2}  # what members() needs
    available = run.prediction_methods(swag_samples)
    counts = {name: avg.count for name, avg in averagers.items()}
    counts["swag_diag"] = counts.get("swag", 0)
    skipped: dict[str, str] = {}
    relevant = [m for m in METHODS if m not in _KEPT_BY or cfg.method.name in _KEPT_BY[m] or m in (methods or ())]
    for m in relevant:
        if m in available and counts.get(m, 1) < minimum.get(m, 0):
            skipped[m] = f"collected {counts[m]} iterate(s) by step {at}, needs {minimum[m]}"
        elif m not in available and m in _NEEDS:
            skipped[m] = f"not kept by this run (needs {_NEEDS[m]})"
    wanted = list(dict.fromkeys(methods)) if methods else [m for m in available if m not in skipped]  # each once
    missing = [f"{m}: {skipped[m]}" for m in wanted if m in skipped]
    if missing:
        raise EvalError(f"{run_dir} lacks what these methods need: " + "; ".join(missing))

    target = data.test if split == "test" else data.val
    assert target is not None
    # charged unless 0 is asked for here: a run that evaluated exactly (or predates charged
    # validation, read as val_noise 0) gets the default noise, not its own exact evaluation
    noise = val_noise if val_noise is not None else (cfg.train.val_noise or TrainConfig().val_noise)
    charged: Any = split == "val" and cfg.privacy.enabled and noise > 0
    outside = carve_outside(cfg.data) if split == "val" and cfg.privacy.enabled else {}
    covered = (split == "test" or not cfg.privacy.enabled or charged) and not outside
    if split == "val" and cfg.privacy.enabled and not charged:
        warnings.warn(outside_guarantee("--data val with val noise 0"), stacklevel=2)
    for flag, what in outside.items():
        warnings.warn(outside_guarantee(flag, what), stacklevel=2)
    results: dict[str, dict[str, Any]] = {}
    bins: dict[str, list] = {}
    if charged:
        results, charged = _charged_accuracies(run, wanted, available, noise, ledger_path, noise_generator)
    for name in wanted if not charged else ():
        counter = _Counted(available[name]())  # FGE / SWAG reuse one module: each member is used as it comes
        per_member = predict_members(counter, target, data)
        probs = per_member.mean(0)
        bins[name] = reliability_bins(probs, target.y)
        results[name] = {**metrics(probs, target.y), **member_metrics(per_member, target.y), "members": counter.n}
    out: dict[str, Any] = {
        "run_id": meta["run_id"], "step": at, "steps": steps, "split": split,
        "examples": len(target), "test_time_flip": cfg.data.test_time_flip, "private": meta.get("private", True),
        "epsilon": run.epsilon,  # None: a non-private run on public data
        "covered_by_guarantee": covered,  # False: the validation split of a private run, exact
        "charged": charged,  # the query's ledger record (a private run's validation split), else False
        "delta": meta["delta"], "collected": counts, "skipped": {k: v for k, v in skipped.items() if k not in wanted},
        "methods": results, "reliability": bins,
    }
    # the validation split's numbers go to files of their own, labelled, never in place of the test ones
    label = split if covered else f"{split}: outside the DP guarantee"
    out["reliability_diagram"] = None if charged else str(draw_reliability(  # noisy accuracies have no bins
        bins, results, run_dir / f"reliability{suffix}.png", title=f"{meta['run_id']} ({label}, step {at})"))
    out["eval_json"] = str(run_dir / f"eval{suffix}.json")
    atomic_write_text(Path(out["eval_json"]), json.dumps(out, indent=2))
    return out


def _charged_accuracies(run: Any, wanted: Sequence[str], available: dict, noise: float,
                        ledger_path: Optional[str], generator: Optional[torch.Generator]
                        ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each wanted method's noisy validation accuracy, one charged release each, reserved as a
    query of the run's dataset before the split is read."""
    from accounting import Gaussian

    from .loss_query import reserved_query
    from .validation import ValidationAccuracy

    size = len(run.data.val)
    mech = ValidationAccuracy(noise=noise, size=size, releases=len(wanted), generator=generator)
    events = [Gaussian(noise_multiplier=mech.noise_multiplier, count=len(wanted))]
    results: dict[str, dict[str, Any]] = {}
    with reserved_query(run, events=events, spent=mech.events, purpose="eval-val", ledger_path=ledger_path) as record:
        for name in wanted:
            counter = _Counted(available[name]())
            results[name] = {"accuracy": mech.accuracy(counter, run.data.val, run.data), "members": counter.n}
    record.update(noise=noise, noise_multiplier=mech.noise_multiplier)
    return results, record


class _Counted:
    def __init__(self, members) -> None:
        self.members, self.n = members, 0

    def __iter__(self):
        for m in self.members:
            self.n += 1
            yield m
