#!/usr/bin/env python
"""Sparse and implicit ensembles under DP on CIFAR-10 at epsilon 8, one gradient budget for
every row: dense DP-SGD (+ EMA, SWA), FGE of a dense run, SET, RigL (growth by the step's
dense noisy gradient, and by the momentum of the releases), the EDST ensemble, Sup-tickets
(on a sparse phase of RigL, and on GraNet's dense-to-sparse one), and FiLM-Ensemble (M = 4).

    python experiments/cifar10_sparse_ensembles_eps8.py --runs 1        # every row once, test set
    python experiments/cifar10_sparse_ensembles_eps8.py --rows film     # only some rows
    python experiments/cifar10_sparse_ensembles_eps8.py --table         # rebuild the table

Every row is the ScatterNet + CNN recipe of `configs/cifar10_scatter_cpu_eps8.yaml` (private
feature statistics, clip 0.1, momentum 0.9) at the budget of
`experiments/cifar10_optimizers_eps8.py`: batch 2048, 293 releases (~600k per-example
gradients; FiLM's 4 members are 4 rows of one example, one gradient), epsilon 8 (sigma
calibrated, the statistics release included), lr 8 (DP-SGD's choice on validation there; not
re-tuned per row). Sparse rows: 80% sparsity of the conv kernels (ERK), their schedules the
shipped configs' (`configs/cifar10_scatter_{rigl,edst,suptickets}_cpu_eps8.yaml`) scaled
from 367 to 293 steps. FGE: constant lr to step 158, then 4.5 triangular cycles of 30 steps
(lr 8 -> 0.8), a snapshot at each minimum. FiLM: scatter_cnn with a GroupNorm(16) after each
conv (`model.conv_norm`), each followed by 4 members' FiLM; "dense + conv norm" is the same
network without FiLM. Tickets and snapshots are collected by schedule, never by a metric.

Each row is scored on the 9,000-image JPEG test set by `dpwa eval` (accuracy, NLL, ECE,
Brier; member accuracy and disagreement for FiLM). Runs are appended to
`experiments/results/cifar10_sparse_ensembles_eps8_runs.jsonl` (committed), the table is
rebuilt from it: `experiments/results/cifar10_sparse_ensembles_eps8.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dpwa  # noqa: E402
from dpwa.config import load_config  # noqa: E402
from dpwa.evaluate_run import evaluate_run  # noqa: E402
from experiments.cifar10_optimizers_eps8 import CONFIG, LEDGER, _mean_sd, row_overrides  # noqa: E402
from experiments.cifar10_scatter_sweep import cache_features  # noqa: E402

OUT = ROOT / "runs" / "experiments" / "cifar10_sparse_ensembles"
RESULTS = ROOT / "experiments" / "results"
RECORDS = RESULTS / "cifar10_sparse_ensembles_eps8_runs.jsonl"
LR = 8.0
STEPS = 293
SPARSE = ["method.sparsity_density=0.2", "method.sparsity_init=erk"]

#: row -> (overrides on top of the DP-SGD row at lr 8, the dpwa eval methods to report)
ROWS: dict[str, tuple[list[str], list[str]]] = {
    "dense": ([], ["raw", "ema", "swa"]),
    "fge": (["optim.schedule=cyclic", f"optim.min_lr={LR / 10}", "optim.cycle_start=158", "optim.cycle_length=30",
             "averaging.snapshots=true", "averaging.swa_start=158", "averaging.swa_every=2"], ["raw", "swa", "fge"]),
    "set": (["method.name=set", *SPARSE, "method.sparsity_update_every=12", "method.sparsity_fraction=0.3",
             "method.sparsity_end=220"], ["raw", "swa"]),
    "rigl_noisy": (["method.name=rigl", *SPARSE, "method.sparsity_update_every=12", "method.sparsity_fraction=0.3",
                    "method.sparsity_end=220", "method.rigl_grow=dense_noisy"], ["raw", "swa"]),
    "rigl_momentum": (["method.name=rigl", *SPARSE, "method.sparsity_update_every=12", "method.sparsity_fraction=0.3",
                       "method.sparsity_end=220", "method.rigl_grow=momentum"], ["raw", "swa"]),
    "edst": (["method.name=edst", *SPARSE, "method.sparsity_update_every=12", "method.sparsity_fraction=0.5",
              "method.sparsity_end=146", "method.tickets_grow=momentum", "method.edst_exploration=146",
              "method.edst_phases=3", "method.edst_phase_steps=49", "method.edst_jump=0.8",
              "method.edst_lr_fractions=[0.1,0.01]", "averaging.swa=false"], ["raw", "tickets"]),
    "suptickets": (["method.name=suptickets", *SPARSE, "method.sparsity_update_every=12",
                    "method.sparsity_fraction=0.3", "method.sparsity_end=233", "method.tickets_grow=momentum",
                    "method.suptickets_start=233", "method.suptickets_cycles=4",
                    "method.suptickets_cycle_length=15", "method.suptickets_jump=0.5",
                    "method.suptickets_lr_fractions=[0.05,0.01]", "method.suptickets_from_start=true",
                    "averaging.swa=false"], ["raw", "tickets", "suptickets"]),
    # Sup-tickets on GraNet's dense-to-sparse phase: dense masks pruned by the cubic schedule to
    # 20% by step 146, then the same routine updates, cycles and tickets as the row above
    "suptickets_granet": (["method.name=suptickets", *SPARSE, "method.sparsity_init_density=1.0",
                           "method.sparsity_prune_end=146", "method.sparsity_update_every=12",
                           "method.sparsity_fraction=0.3", "method.sparsity_end=233", "method.tickets_grow=momentum",
                           "method.suptickets_start=233", "method.suptickets_cycles=4",
                           "method.suptickets_cycle_length=15", "method.suptickets_jump=0.5",
                           "method.suptickets_lr_fractions=[0.05,0.01]", "method.suptickets_from_start=true",
                           "averaging.swa=false"], ["raw", "tickets", "suptickets"]),
    "film": (["model.conv_norm=true", "model.film_members=4", "model.film_gain=1.0"], ["raw", "ema", "swa"]),
    "dense_convnorm": (["model.conv_norm=true"], ["raw", "ema", "swa"]),
}
LABELS = {"dense": "dense DP-SGD", "fge": "dense DP-SGD, cyclic lr (FGE)", "set": "SET (80% sparse)",
          "rigl_noisy": "RigL, growth by the step's noisy gradient", "rigl_momentum": "RigL, growth by momentum",
          "edst": "EDST (3 tickets)", "suptickets": "Sup-tickets",
          "suptickets_granet": "Sup-tickets on GraNet (dense to 80% sparse)", "film": "FiLM-Ensemble (M = 4)",
          "dense_convnorm": "dense + conv norm (FiLM's network, M = 1)"}


def run_row(row: str) -> None:
    extra, methods = ROWS[row]
    overrides = [*row_overrides("dpsgd", LR), *extra, f"name=sparse-{row}", f"out_dir={OUT / row}"]
    report = dpwa.train(load_config(ROOT / CONFIG, overrides), ledger_path=str(LEDGER), progress=False)
    result = evaluate_run(Path(report["run_dir"]), split="test", methods=methods)
    keep = {k: report[k] for k in ("epsilon", "noise_multiplier", "steps", "releases",
                                   "expected_per_example_gradient_evaluations", "train_time_s") if k in report}
    record = {"row": row, "lr": LR, "report": keep, "methods": result["methods"]}
    RECORDS.parent.mkdir(parents=True, exist_ok=True)
    with RECORDS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"# {row}: " + ", ".join(f"{m} {100 * r['accuracy']:.2f}" for m, r in result["methods"].items()), flush=True)


def table() -> str:
    records = [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()] if RECORDS.exists() else []
    lines = ["| row | prediction | runs | epsilon | sigma | releases | per-example grads | test accuracy (%) | "
             "NLL | ECE (%) | Brier | member accuracy (%) | member disagreement (%) | train min |",
             "|" + "---|" * 14]
    for row in ROWS:
        reps = [r for r in records if r["row"] == row]
        if not reps:
            continue
        r0 = reps[0]["report"]
        for method in ROWS[row][1]:
            got = [r["methods"][method] for r in reps if method in r["methods"]]
            if not got:
                continue
            lines.append(
                f"| {LABELS[row]} | {method} | {len(got)} | {r0['epsilon']:.3f} | {r0['noise_multiplier']:.3f} | "
                f"{r0['releases']} | {r0['expected_per_example_gradient_evaluations']:.0f} | "
                f"{_mean_sd([g['accuracy'] for g in got])} | {_mean_sd([g['nll'] for g in got], 1.0, 3)} | "
                f"{_mean_sd([g['ece'] for g in got])} | {_mean_sd([g['brier'] for g in got], 1.0, 4)} | "
                f"{_mean_sd([g['member_accuracy'] for g in got if 'member_accuracy' in g])} | "
                f"{_mean_sd([g['member_disagreement'] for g in got if 'member_disagreement' in g])} | "
                f"{statistics.mean(r['report']['train_time_s'] for r in reps) / 60:.1f} |")
    head = ("CIFAR-10 at epsilon 8 (delta 1e-5, PRV), ScatterNet + CNN, 2 CPU cores; every row at batch 2048, "
            f"{STEPS} releases (~600k per-example gradients), lr {LR:g}; test: the 9,000-image JPEG test set via "
            "`dpwa eval`. Command: `python experiments/cifar10_sparse_ensembles_eps8.py --runs N`. Predictions: raw "
            "(last iterate), ema, swa (last quarter), fge (snapshots at the cycle minima), tickets (the "
            "tickets' ensemble), suptickets (their pruned superposition).\n\n")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=0, help="runs of every row (appended)")
    p.add_argument("--rows", nargs="*", choices=list(ROWS), help="only these rows")
    p.add_argument("--table", action="store_true", help="only rebuild the table")
    a = p.parse_args()
    if not a.table:
        cache_features()
        for _ in range(a.runs):
            for row in a.rows or ROWS:
                run_row(row)
    text = table()
    (RESULTS / "cifar10_sparse_ensembles_eps8.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
