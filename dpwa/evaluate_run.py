"""Evaluation of a finished (or checkpointed) run: the last iterate and every average and
ensemble it kept, with accuracy, NLL, ECE and Brier score, a reliability diagram, and
`eval.json`. Post-processing only: nothing is charged, and the private training split is
withheld (`data.Withheld`), so no method can read it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence


from .averaging import METHODS
from .checkpoint import atomic_write_text
from .config import ConfigError
from .data import outside_guarantee
from .errors import UsageError
from .evaluate import member_metrics, metrics, predict_members, reliability_bins
from .reliability import draw_reliability
from .run_folder import RunFolder, load_run

__all__ = ["evaluate_run", "EvalError"]

_NEEDS = {"swa": "averaging.swa: true", "fge": "averaging.snapshots: true (with a cyclic or sgdr schedule)",
          "swag": "averaging.swag: true", "swag_diag": "averaging.swag: true",
          "tickets": "method.name=edst or suptickets, and a ticket collected by the checkpoint",
          "suptickets": "method.name=suptickets, and a ticket collected by the checkpoint"}
_KEPT_BY = {"tickets": ("edst", "suptickets"), "suptickets": ("suptickets",)}  # models only these methods keep


class EvalError(ConfigError):
    """The run folder cannot give what was asked; the message says what is missing."""


def evaluate_run(run_dir: Path, *, split: str = "test", methods: Optional[Sequence[str]] = None,
                 swag_samples: Optional[int] = None, test_time_flip: Optional[bool] = None) -> dict[str, Any]:
    """Evaluate a run folder's last checkpoint; writes eval.json and reliability.png into it.
    `test_time_flip` (None: the run's `data.test_time_flip`) also averages the mirror images'
    softmax into every prediction.

    Raises:
        EvalError: not a run folder, no checkpoint, an unreadable checkpoint, a requested
            method the run did not keep (or has too few snapshots for), a missing split.
    """
    run_dir = Path(run_dir)
    unknown = [m for m in methods or () if m not in METHODS]
    if unknown:
        raise EvalError(f"Unknown method(s) {unknown}; known: {list(METHODS)}")
    try:
        cfg = RunFolder.existing(run_dir).config()
    except ConfigError as e:
        raise EvalError(str(e)) from None
    if cfg.method.name == "curve":  # its "raw" model is w(1/2) and its averages those of w(1/2): not the release
        raise EvalError(f"{run_dir} is a curve run (method.name=curve): it released a curve, not one model; "
                        f"`dpwa curve --eval {run_dir}` evaluates it along t, against the segment")
    if split == "val" and not cfg.data.val_size:
        raise EvalError("--data val: the run's config has data.val_size=0, so there is no validation split")
    try:
        run = load_run(run_dir, test_time_flip=test_time_flip)  # reads no private training data
    except UsageError as e:
        raise EvalError(str(e)) from None
    cfg, meta, data, averagers = run.cfg, run.meta, run.data, run.averagers
    steps, at = int(meta["steps"]), run.step

    minimum = {"swa": 1, "fge": 1, "swag": 2, "swag_diag": 2}
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
    wanted = list(methods) if methods else [m for m in available if m not in skipped]
    missing = [f"{m}: {skipped[m]}" for m in wanted if m in skipped]
    if missing:
        raise EvalError(f"{run_dir} lacks what these methods need: " + "; ".join(missing))

    target = data.test if split == "test" else data.val
    assert target is not None
    covered = split == "test" or not cfg.privacy.enabled
    if not covered:
        warnings.warn(outside_guarantee("--data val"), stacklevel=2)
    results: dict[str, dict[str, Any]] = {}
    bins: dict[str, list] = {}
    for name in wanted:
        counter = _Counted(available[name]())  # FGE / SWAG reuse one module: each member is used as it comes
        per_member = predict_members(counter, target, data)
        probs = per_member.mean(0)
        bins[name] = reliability_bins(probs, target.y)
        results[name] = {**metrics(probs, target.y), **member_metrics(per_member, target.y), "members": counter.n}
    out: dict[str, Any] = {
        "run_id": meta["run_id"], "step": at, "steps": steps, "split": split,
        "examples": len(target), "test_time_flip": cfg.data.test_time_flip, "private": meta.get("private", True),
        "epsilon": run.epsilon,  # None: a non-private run on public data
        "covered_by_guarantee": covered,  # False: the validation split of a private run
        "delta": meta["delta"], "collected": counts, "skipped": {k: v for k, v in skipped.items() if k not in wanted},
        "methods": results, "reliability": bins,
    }
    # the validation split's numbers go to files of their own, labelled, never in place of the test ones
    suffix = "" if split == "test" else f"-{split}"
    label = split if covered else f"{split}: outside the DP guarantee"
    png = draw_reliability(bins, results, run_dir / f"reliability{suffix}.png",
                           title=f"{meta['run_id']} ({label}, step {at})")
    out["reliability_diagram"] = str(png)
    out["eval_json"] = str(run_dir / f"eval{suffix}.json")
    atomic_write_text(Path(out["eval_json"]), json.dumps(out, indent=2))
    return out


class _Counted:
    def __init__(self, members) -> None:
        self.members, self.n = members, 0

    def __iter__(self):
        for m in self.members:
            self.n += 1
            yield m
