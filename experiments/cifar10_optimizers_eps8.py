#!/usr/bin/env python
"""The seed papers' optimisers and training dynamics on CIFAR-10 at epsilon 8, at one
per-example gradient budget, and whether the batch-size / learning-rate scaling rules hold
under DP.

    python experiments/cifar10_optimizers_eps8.py --tune        # lr of each row, on validation
    python experiments/cifar10_optimizers_eps8.py --final 2     # each row at its lr, test set
    python experiments/cifar10_optimizers_eps8.py --scaling     # lr* against B, on validation
    python experiments/cifar10_optimizers_eps8.py --table       # rebuild the tables and the plot

Every row is the ScatterNet + CNN recipe of `configs/cifar10_scatter_cpu_eps8.yaml` (private
feature statistics, clip 0.1) at a smaller budget, the same for every row: batch 2048 (q =
0.04096), 12 epochs of the 50,000 train images (293 releases, ~600,000 per-example
gradients), epsilon 8 at delta 1e-5 (PRV) with sigma calibrated per row, the statistics
release included. Entropy-SGD makes L = 4 releases a step, so it takes 73 steps (292
releases) for the same budget. The rows:

* DP-SGD (momentum 0.9), its EMA (decay 0.99) and its SWA (every iterate of the last
  quarter): one run, the averages are free;
* Gadam: AdamW (decoupled weight decay 0.05) with the SWA schedule (lr, linear to lr/2
  between 50% and 90% of the IA start) and iterate averaging from 55% of the steps;
* DP-AdamBC (Tang et al. 2024): Adam with the noise variance (sigma C / B)^2 subtracted
  from v-hat, floored at 1e-11, no averaging;
* GadamX: Padam (p = 1/8) with decoupled weight decay 5e-5 (its lr is on the SGD scale, so
  lr x wd is about Gadam's), the SWA schedule and IA as Gadam;
* PSWA: DP-SGD restarted from its running average every 10% of the steps, over the last
  five periods (the run ends at an average);
* Entropy-SGD: L = 4 Langevin steps a step (inner lr = DP-SGD's lr, Nesterov 0.9, gamma
  0.03, scoping 1e-3), outer step x <- x - (x - mu).

Learning rates are chosen on validation (`--tune`): a TAN proxy of each row (Sander et al.
2023: the same steps and noise on the mean gradient, sigma / B, at batch / 8), trained on
45,000 train images and scored on the other 5,000 by the row's own model (IA for Gadam and
GadamX, the last iterate otherwise); a grid whose best lr is at its edge is extended by
factors of 2 (twice at most). The test set is read only by `--final`.
Proxies spend far more than epsilon 8 each; their spend goes to a scratch ledger
(runs/experiments-ledger.sqlite) and is not a private run of its own.

Scaling (`--scaling`): DP-SGD (momentum 0.9) and DP-Adam at B in {1024, 2048, 8192}, 12
epochs, epsilon 8, a factor-2 lr grid each (extended while its best is at an edge), scored by
their TAN proxies on validation; lr* (the
grid's best, refined by a parabola through the best three in log lr) is fitted by
log lr* = a + b log B. The linear rule says b = 1 for SGD, the square-root rule b = 1/2 for
Adam; under DP at fixed epochs and epsilon, sigma / B falls as B grows.

Writes experiments/results/cifar10_optimizers_eps8.md and cifar10_lr_scaling_eps8.{md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import dpwa  # noqa: E402
from dpwa.config import load_config  # noqa: E402
from dpwa.train import plan_run  # noqa: E402
from experiments.cifar10_scatter_sweep import cache_features  # noqa: E402

CONFIG = "configs/cifar10_scatter_cpu_eps8.yaml"
OUT = ROOT / "runs" / "experiments" / "cifar10_optimizers"
LEDGER = ROOT / "runs" / "experiments-ledger.sqlite"
RESULTS = ROOT / "experiments" / "results"
#: Every finished proxy and test run, one JSON line each (committed): the tables are rebuilt from
#: it, and a later session (a machine without runs/) adds runs to it instead of starting over.
RECORDS = RESULTS / "cifar10_optimizers_eps8_runs.jsonl"
#: The parts of a run's report the tables use.
KEPT = ("epsilon", "noise_multiplier", "steps", "releases", "expected_per_example_gradient_evaluations",
        "train_time_s", "wall_time_s")
N_TRAIN = 50_000
SHRINK = 8
BATCH, EPOCHS = 2048, 12
L_INNER = 4


def _budget(batch: int = BATCH, epochs: int = EPOCHS, inner: int = 1) -> tuple[int, int]:
    """(steps, releases) of the budget: `epochs` passes at batch `batch`, `inner` releases a step."""
    releases = math.ceil(epochs * N_TRAIN / batch)
    return releases // inner, releases


def row_overrides(row: str, lr: float, batch: int = BATCH) -> list[str]:
    """The target recipe of `row` at learning rate `lr` (60-epoch config cut to the budget)."""
    steps, _ = _budget(batch)
    outer = _budget(batch, inner=L_INNER if row == "entropy_sgd" else 1)[0]
    base = [f"train.batch_size={batch}", "train.epochs=null", f"train.steps={outer}", "train.checkpoint_every=100000",
            "averaging.ema_decay=0.99", f"averaging.polyak_start={steps // 2}", "averaging.swa=true",
            f"averaging.swa_start={3 * steps // 4}", "averaging.swa_every=1"]
    ia = [f"averaging.swa_start={int(0.55 * steps)}", "optim.schedule=swa"]
    rows = {
        "dpsgd": [f"optim.lr={lr}"],
        "adam": ["optim.name=adam", "optim.momentum=0", f"optim.lr={lr}"],
        "gadam": ["optim.name=adamw", "optim.momentum=0", f"optim.lr={lr}", f"optim.swa_lr={lr / 2}",
                  "optim.weight_decay=0.05", *ia],
        "adambc": ["optim.name=adambc", "optim.momentum=0", f"optim.lr={lr}", "optim.adambc_floor=1e-11"],
        "gadamx": ["optim.name=padam", "optim.momentum=0", f"optim.lr={lr}", f"optim.swa_lr={lr / 2}",
                   "optim.partial=0.125", "optim.weight_decay=5e-5", *ia],  # SGD-scale lr: lr wd ~ 1.5e-4
        "pswa": [f"optim.lr={lr}", "method.name=pswa", f"method.pswa_start={steps - 5 * (steps // 10)}",
                 f"method.pswa_period={steps // 10}"],  # 5 periods to the end: the run ends at an average
        "entropy_sgd": ["method.name=entropy_sgd", f"method.inner_steps={L_INNER}", f"method.inner_lr={lr}",
                        "method.inner_momentum=0.9", "optim.lr=1.0", "optim.momentum=0",
                        f"averaging.polyak_start={steps // (2 * L_INNER)}",
                        f"averaging.swa_start={3 * steps // (4 * L_INNER)}"],
    }
    return [*base, *rows[row]]


#: lr grids for the validation choice (per row), centred on the scale each optimiser needs on
#: DP gradients (optimizers.py, the Gadam/GadamX configs' notes).
GRIDS = {"dpsgd": [2.0, 4.0, 8.0], "gadam": [0.001, 0.002, 0.004], "adambc": [1e-4, 3e-4, 1e-3, 3e-3],
         "gadamx": [1.5, 3.0, 6.0], "pswa": [2.0, 4.0, 8.0], "entropy_sgd": [2.0, 4.0, 8.0]}
#: which model a row is judged by: its own prediction
HEADLINE = {"dpsgd": "raw", "gadam": "swa", "adambc": "raw", "gadamx": "swa", "pswa": "raw", "entropy_sgd": "raw"}
LABELS = [("dpsgd", "raw", "DP-SGD"), ("dpsgd", "ema", "DP-SGD + EMA"), ("dpsgd", "swa", "DP-SGD + SWA"),
          ("gadam", "swa", "Gadam (DP-AdamW + IA)"), ("adambc", "raw", "DP-AdamBC"),
          ("gadamx", "swa", "GadamX (DP-Padam + IA)"), ("pswa", "raw", "PSWA"), ("entropy_sgd", "raw", "Entropy-SGD")]
SCALING_BATCHES = [1024, 2048, 8192]
SCALING_GRIDS = {"dpsgd": [4.0, 8.0, 16.0, 32.0], "adam": [1e-3, 2e-3, 4e-3]}


def proxy(row: str, lr: float, batch: int, kind: str) -> dict[str, Any]:
    """Train the TAN proxy of (row, lr, batch) on the 45,000/5,000 split; its report."""
    target = load_config(ROOT / CONFIG, [*row_overrides(row, lr, batch), "data.val_size=0"])
    plan = plan_run(target, N_TRAIN)
    b = batch // SHRINK
    name = f"{row}-b{batch}-lr{lr:g}"
    done = [r for p, r in _reports(kind) if (p["row"], p["lr"], p["batch"]) == (row, lr, batch)]
    if done:  # already measured (the script resumes where it stopped)
        return done[0]
    overrides = [*row_overrides(row, lr, batch), f"train.batch_size={b}", "train.epochs=null",
                 f"train.steps={plan.steps}", "privacy.epsilon=null",
                 f"privacy.noise_multiplier={plan.noise_multiplier / SHRINK}", "privacy.accountant=rdp",
                 "data.val_size=5000", "data.val_carve=permutation", "train.eval_split=val", "train.val_noise=0",
                 f"name={kind}-{name}", f"out_dir={OUT / kind / name}"]
    if kind == "scaling":  # judged by the last iterate: no SWA to evaluate
        overrides += ["averaging.swa=false"]
    report = dpwa.train(load_config(ROOT / CONFIG, overrides), ledger_path=str(LEDGER), progress=False)
    info = {"row": row, "lr": lr, "batch": batch, "target_sigma": plan.noise_multiplier, "steps": plan.steps,
            "releases": plan.releases, "proxy_batch": b}
    _record(kind, info, report)
    print(f"# {kind} {name}: val raw {report['val_raw']['accuracy']:.4f}", flush=True)
    return report


def tune(row: str, extensions: int = 2) -> None:
    """The row's lr grid; while the best lr sits at an edge of the grid, one more lr twice as
    far out (at most `extensions` times), so that the choice is not the grid's bound."""
    lrs = list(GRIDS[row])
    for lr in lrs:
        proxy(row, lr, BATCH, "tune")
    for _ in range(extensions):
        best = tuned_lr(row)
        if best == max(lrs):
            lrs.append(2 * best)
        elif best == min(lrs):
            lrs.append(best / 2)
        else:
            return
        proxy(row, lrs[-1], BATCH, "tune")


def _record(kind: str, info: dict, report: dict) -> None:
    """Append a finished run to RECORDS: its kind, what it stands for, and its scores."""
    kept = {k: report[k] for k in KEPT if k in report}
    kept.update({k: report[k] for k in report if k.startswith(("val_", "test_"))})
    RECORDS.parent.mkdir(parents=True, exist_ok=True)
    with RECORDS.open("a") as f:
        f.write(json.dumps({"kind": kind, "info": info, "report": kept}) + "\n")


def _reports(kind: str) -> list[tuple[dict, dict]]:
    """(info, report) of every recorded run of `kind` ("tune", "scaling" or "final")."""
    if not RECORDS.exists():
        return []
    lines = [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]
    return [(r["info"], r["report"]) for r in lines if r["kind"] == kind]


def tuned_lr(row: str) -> float:
    """The grid lr whose proxy scores best on validation (the row's headline model)."""
    scored = [(r[f"val_{HEADLINE[row]}"]["accuracy"], p["lr"]) for p, r in _reports("tune") if p["row"] == row]
    if not scored:
        raise SystemExit(f"no validation proxies of {row!r}: run --tune first")
    return max(scored)[1]


def final(runs: int, rows: list[str]) -> None:
    for i in range(runs):
        for row in rows:
            lr = tuned_lr(row)
            overrides = [*row_overrides(row, lr), f"name=final-{row}", f"out_dir={OUT / 'final' / row}"]
            report = dpwa.train(load_config(ROOT / CONFIG, overrides), ledger_path=str(LEDGER), progress=False)
            _record("final", {"row": row, "lr": lr}, report)
            print(f"# final {row} {i}: lr {lr:g} test {HEADLINE[row]} "
                  f"{report[f'test_{HEADLINE[row]}']['accuracy']:.4f}", flush=True)


def _mean_sd(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "-"
    m = statistics.mean(values) * scale
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def final_table() -> str:
    finals: dict[str, list[dict]] = {}
    for info, report in _reports("final"):
        finals.setdefault(info["row"], []).append({**report, "lr": info["lr"]})
    lines = ["| row | lr (validation) | runs | epsilon | sigma | steps | releases | per-example grads | "
             "test accuracy (%) | test NLL | test ECE (%) |", "|" + "---|" * 11]
    for row, model, label in LABELS:
        reps = finals.get(row, [])
        if not reps:
            continue
        scores = [r[f"test_{model}"] for r in reps if f"test_{model}" in r]
        r0 = reps[0]
        lines.append(f"| {label} | {r0['lr']:g} | {len(scores)} | "
                     f"{statistics.mean(r['epsilon'] for r in reps):.3f} | {r0['noise_multiplier']:.3f} | {r0['steps']} | "
                     f"{r0['releases'] if 'releases' in r0 else '-'} | "
                     f"{r0['expected_per_example_gradient_evaluations']:.0f} | "
                     f"{_mean_sd([s['accuracy'] for s in scores])} | {_mean_sd([s['nll'] for s in scores], 1.0, 3)} | "
                     f"{_mean_sd([s['ece'] for s in scores])} |")
    return "\n".join(lines)


def tune_table() -> str:
    lines = ["| row | lr | target sigma | steps | proxy B | val raw | val EMA | val SWA |", "|" + "---|" * 8]
    for p, r in sorted(_reports("tune"), key=lambda pr: (pr[0]["row"], pr[0]["lr"])):
        cells = [f"{100 * r[f'val_{m}']['accuracy']:.2f}" if f"val_{m}" in r else "-" for m in ("raw", "ema", "swa")]
        lines.append(f"| {p['row']} | {p['lr']:g} | {p['target_sigma']:.3f} | {p['steps']} | {p['proxy_batch']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lr_star(points: list[tuple[float, float]]) -> float:
    """The best lr of a grid, refined by a parabola in log lr through the best point and its
    neighbours (the grid's best when it sits at an edge or the parabola opens upwards)."""
    points = sorted(points)
    i = max(range(len(points)), key=lambda j: points[j][1])
    if i == 0 or i == len(points) - 1:
        return points[i][0]
    x = np.log([points[j][0] for j in (i - 1, i, i + 1)])
    y = np.array([points[j][1] for j in (i - 1, i, i + 1)])
    a, b, _ = np.polyfit(x, y, 2)
    return float(math.exp(-b / (2 * a))) if a < 0 else points[i][0]


def scaling_fit() -> tuple[str, dict]:
    by: dict[tuple[str, int], list[tuple[float, float]]] = {}
    sigma: dict[tuple[str, int], float] = {}
    # DP-SGD at B = 2048 is the tuning grid of the dpsgd row (the same proxies: raw accuracy)
    reused = [(p, r) for p, r in _reports("tune") if p["row"] == "dpsgd" and p["batch"] in SCALING_BATCHES]
    for p, r in [*_reports("scaling"), *reused]:
        by.setdefault((p["row"], p["batch"]), []).append((p["lr"], r["val_raw"]["accuracy"]))
        sigma[(p["row"], p["batch"])] = p["target_sigma"]
    lines = ["| optimiser | B | sigma (epsilon 8) | sigma / B | lr grid: val raw accuracy (%) | lr* |", "|" + "---|" * 6]
    fits = {}
    for opt in SCALING_GRIDS:
        xs, ys = [], []
        for b in SCALING_BATCHES:
            pts = by.get((opt, b))
            if not pts:
                continue
            star = _lr_star(pts)
            xs.append(math.log(b))
            ys.append(math.log(star))
            grid = ", ".join(f"{lr:g}: {100 * acc:.1f}" for lr, acc in sorted(pts))
            lines.append(f"| {opt} | {b} | {sigma[(opt, b)]:.3f} | {sigma[(opt, b)] / b:.2e} | {grid} | {star:.3g} |")
        if len(xs) >= 2:
            slope, intercept = np.polyfit(xs, ys, 1)
            fits[opt] = {"slope": float(slope), "intercept": float(intercept), "log_b": xs, "log_lr": ys}
    rule = {"dpsgd": "linear (1)", "adam": "square root (0.5)"}
    lines += ["", "| optimiser | fitted exponent b in lr* ~ B^b | the rule says |", "|---|---|---|"]
    lines += [f"| {opt} | {f['slope']:.2f} | {rule[opt]} |" for opt, f in fits.items()]
    return "\n".join(lines), fits


def scaling_plot(fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fits), figsize=(5 * max(len(fits), 1), 4), squeeze=False)
    for ax, (opt, f) in zip(axes[0], fits.items()):
        b = np.exp(f["log_b"])
        ax.loglog(b, np.exp(f["log_lr"]), "o", label="lr* (validation)")
        ax.loglog(b, np.exp(f["intercept"] + f["slope"] * np.array(f["log_b"])), "-",
                  label=f"fit: lr* ~ B^{f['slope']:.2f}")
        rule = 1.0 if opt == "dpsgd" else 0.5
        ax.loglog(b, np.exp(f["log_lr"][0]) * (b / b[0]) ** rule, "--", label=f"rule: B^{rule:g}")
        ax.set_xlabel("batch size B (12 epochs, epsilon 8)")
        ax.set_ylabel("lr*")
        ax.set_title({"dpsgd": "DP-SGD (momentum 0.9)", "adam": "DP-Adam"}[opt])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tune", action="store_true", help="validation proxies of every row's lr grid")
    p.add_argument("--rows", nargs="*", choices=sorted(GRIDS), help="only these rows (--tune, --final)")
    p.add_argument("--final", type=int, default=0, help="test runs of every row at its chosen lr")
    p.add_argument("--scaling", action="store_true", help="lr* against B (DP-SGD, DP-Adam), validation proxies")
    p.add_argument("--only-opt", nargs="*", choices=sorted(SCALING_GRIDS), help="scaling: only these optimisers")
    p.add_argument("--batches", nargs="*", type=int, help="scaling: only these batch sizes")
    p.add_argument("--table", action="store_true", help="only rebuild the tables")
    a = p.parse_args()
    if not a.table:
        cache_features()
        if a.tune:
            for row in a.rows or GRIDS:
                tune(row)
        if a.scaling:
            for opt in a.only_opt or SCALING_GRIDS:
                for b in SCALING_BATCHES:
                    if opt == "dpsgd" and b == BATCH:  # measured by --tune (the dpsgd row's grid)
                        continue
                    if a.batches and b not in a.batches:
                        continue
                    lrs = list(SCALING_GRIDS[opt])
                    scores = {lr: proxy(opt, lr, b, "scaling")["val_raw"]["accuracy"] for lr in lrs}
                    for _ in range(2):  # extend the grid by factors of 2 while its best is at an edge
                        best = max(scores, key=scores.get)
                        lr = 2 * best if best == max(scores) else best / 2 if best == min(scores) else None
                        if lr is None:
                            break
                        scores[lr] = proxy(opt, lr, b, "scaling")["val_raw"]["accuracy"]
        if a.final:
            final(a.final, a.rows or list(GRIDS))
    RESULTS.mkdir(parents=True, exist_ok=True)
    steps, releases = _budget()
    head = (f"CIFAR-10 at epsilon 8 (delta 1e-5, PRV), ScatterNet + CNN, 2 CPU cores; every row at batch {BATCH}, "
            f"{EPOCHS} epochs ({releases} releases, ~{releases * BATCH / 1e3:.0f}k per-example gradients). "
            "Command: `python experiments/cifar10_optimizers_eps8.py --tune --final N` (N runs per row: the runs "
            "column). Test: the 9,000-image JPEG test set, mean ± sd over fresh-noise runs; the lr of each row chosen on a 5,000-image validation split "
            "of train by TAN proxies (batch / 8), table below.\n\n")
    text = head + final_table() + "\n\nValidation proxies (lr choice; the test set is not read):\n\n" + tune_table() + "\n"
    (RESULTS / "cifar10_optimizers_eps8.md").write_text(text)
    table, fits = scaling_fit()
    (RESULTS / "cifar10_lr_scaling_eps8.md").write_text(
        "Learning rate against batch size under DP: CIFAR-10 ScatterNet + CNN, 12 epochs, epsilon 8 (sigma "
        "calibrated per B), lr* chosen on a 5,000-image validation split by TAN proxies (batch / 8). Command: "
        "`python experiments/cifar10_optimizers_eps8.py --scaling`.\n\n" + table + "\n")
    if fits:
        scaling_plot(fits, RESULTS / "cifar10_lr_scaling_eps8.png")
    print(text)
    print(table)


if __name__ == "__main__":
    main()
