"""Evaluation of a finished (or checkpointed) run: the last iterate and every average and
ensemble it kept, with accuracy, NLL, ECE and Brier score, a reliability diagram, and
`eval.json`. Post-processing only: nothing is charged, and the private training split is
withheld (`data.Withheld`), so no method can read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from accounting import PoissonGaussian, epsilon

from .averaging import METHODS, prediction_methods, make_averagers
from .checkpoint import atomic_write_text, load_checkpoint
from .config import ConfigError, config_from_yaml_text
from .data import load_data
from .evaluate import metrics, predict_proba, reliability_bins
from .reliability import draw_reliability
from .schedules import Schedule
from .train import build_model

__all__ = ["evaluate_run", "EvalError"]

_NEEDS = {"swa": "averaging.swa: true", "fge": "averaging.snapshots: true (with a cyclic or sgdr schedule)",
          "swag": "averaging.swag: true", "swag_diag": "averaging.swag: true"}


class EvalError(ConfigError):
    """The run folder cannot give what was asked; the message says what is missing."""


def evaluate_run(run_dir: Path, *, split: str = "test", methods: Optional[Sequence[str]] = None,
                 swag_samples: Optional[int] = None) -> dict[str, Any]:
    """Evaluate a run folder's last checkpoint; writes eval.json and reliability.png into it.

    Raises:
        EvalError: not a run folder, no checkpoint, an unreadable checkpoint, a requested
            method the run did not keep (or has too few snapshots for), a missing split.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "run.json").is_file():
        raise EvalError(f"{run_dir} is not a dpwa run folder (no config.yaml / run.json)")
    cfg = config_from_yaml_text((run_dir / "config.yaml").read_text())
    meta = json.loads((run_dir / "run.json").read_text())
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        raise EvalError(f"{run_dir} has no checkpoint.pt: the run stopped before its first checkpoint "
                        f"(train.checkpoint_every={cfg.train.checkpoint_every}); nothing to evaluate")
    if split == "val" and not cfg.data.val_size:
        raise EvalError(f"--data val: the run's config has data.val_size=0, so there is no validation split")
    unknown = [m for m in methods or () if m not in METHODS]
    if unknown:
        raise EvalError(f"Unknown method(s) {unknown}; known: {list(METHODS)}")
    state = load_checkpoint(ckpt)  # CheckpointError (exit 2) if unreadable

    torch.set_num_threads(cfg.train.threads)
    data = load_data(cfg.data, seed=cfg.train.seed, withhold_train=True)
    steps = int(meta["steps"])
    model = build_model(cfg, data, load_pretrained=False)  # the checkpoint holds the weights
    schedule = Schedule(cfg.optim, steps, swa_start=cfg.averaging.swa_start)
    averagers = make_averagers(cfg.averaging, model, total_steps=steps, is_minimum=schedule.is_minimum)
    try:
        model.load_state_dict(state["model"])
        for name, avg in averagers.items():
            avg.load_state_dict(state["averagers"][name])
    except (KeyError, RuntimeError, ValueError) as e:
        raise EvalError(f"{ckpt} does not match the run's config: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None

    minimum = {"swa": 1, "fge": 1, "swag": 2, "swag_diag": 2}
    available = prediction_methods(model, averagers, seed=cfg.train.seed,
                                   swag_samples=swag_samples or cfg.averaging.swag_samples)
    counts = {name: avg.count for name, avg in averagers.items()}
    counts["swag_diag"] = counts.get("swag", 0)
    skipped: dict[str, str] = {}
    for m in METHODS:
        if m in available and counts.get(m, 1) < minimum.get(m, 0):
            skipped[m] = f"collected {counts[m]} iterate(s) by step {state['step']}, needs {minimum[m]}"
        elif m not in available and m in _NEEDS:
            skipped[m] = f"not kept by this run (needs {_NEEDS[m]})"
    wanted = list(methods) if methods else [m for m in available if m not in skipped]
    missing = [f"{m}: {skipped[m]}" for m in wanted if m in skipped]
    if missing:
        raise EvalError(f"{run_dir} lacks what these methods need: " + "; ".join(missing))

    target = data.test if split == "test" else data.val
    assert target is not None
    results: dict[str, dict[str, Any]] = {}
    bins: dict[str, list] = {}
    for name in wanted:
        counter = _Counted(available[name]())  # FGE / SWAG reuse one module: each member is used as it comes
        probs = predict_proba(counter, target, data)
        bins[name] = reliability_bins(probs, target.y)
        results[name] = {**metrics(probs, target.y), "members": counter.n}
    eps: Optional[float] = None  # a non-private run on public data has no epsilon
    if cfg.privacy.enabled:
        event = PoissonGaussian(noise_multiplier=meta["noise_multiplier"], sample_rate=meta["sample_rate"],
                                steps=int(state["step"]))
        eps = epsilon([event], delta=meta["delta"], accountant=cfg.privacy.accountant) if state["step"] else 0.0
    out: dict[str, Any] = {
        "run_id": meta["run_id"], "step": int(state["step"]), "steps": steps, "split": split,
        "examples": len(target), "private": meta.get("private", True),
        "epsilon": eps,
        "delta": meta["delta"], "collected": counts, "skipped": {k: v for k, v in skipped.items() if k not in wanted},
        "methods": results, "reliability": bins,
    }
    png = draw_reliability(bins, results, run_dir / "reliability.png",
                           title=f"{meta['run_id']} ({split}, step {state['step']})")
    out["reliability_diagram"] = str(png)
    atomic_write_text(run_dir / "eval.json", json.dumps(out, indent=2))
    return out


class _Counted:
    def __init__(self, members) -> None:
        self.members, self.n = members, 0

    def __iter__(self):
        for m in self.members:
            self.n += 1
            yield m
