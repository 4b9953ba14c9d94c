#!/usr/bin/env python
"""Mode connectivity of DP solutions on CIFAR-10 at epsilon 8 (Garipov et al. 2018 under DP):
are two independently trained private models joined by a low-error curve, and how high is
the barrier on the straight segment between them?

    python experiments/cifar10_curves_eps8.py            # ~1 h on 2 cores: 4 private runs, then the evaluation
    python experiments/cifar10_curves_eps8.py --smoke    # the same pipeline on tiny synthetic data, < 1 min
    python experiments/cifar10_curves_eps8.py --table    # rebuild the results from the finished runs

Four private runs, each at epsilon 8 (delta 1e-5, PRV), all charged to one scratch ledger
(runs/cifar10-curves-ledger.sqlite, so that its composed spend is these four runs'):

* two endpoints: the ScatterNet + CNN recipe of `configs/cifar10_scatter_cpu_eps8.yaml`
  shortened to batch 2048 and 12 epochs (293 steps, lr 4, momentum 0.9), train.seed 0 and 1,
  with GroupNorm on the input features (model.input_norm=group: a curve needs both endpoints
  under one input normalisation, and two runs' privately released statistics differ);
* a Bezier and a PolyChain curve with one bend each between their last iterates: `dpwa
  curve A B --type T` (endpoint A's config, the curve's lr 8, twice the endpoints', as
  methods.md section 1 suggests: the bend sees b(t) times the release, E b(t)^2 = 2/15 for
  Bezier), one release per step at a point w(t), t public.

Then, for free, on the 9,000-image test set (`dpwa curve --eval`): test error along 21 values of
t for the segment and both curves, their barriers, the ensemble of the curve points t = 0.25,
0.5, 0.75 against the endpoints' ensemble, and the plane through the endpoints and the bend
(21 x 21 grid on 2,000 test images). Writes experiments/results/cifar10_curves_eps8.md and
the PNGs cifar10_curves_eps8_*.png. A finished run is reused, so a rerun charges nothing new.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from accounting import Ledger, epsilon  # noqa: E402
from dpwa.config import load_config  # noqa: E402
from dpwa.connectivity import curve_config, evaluate_curve, run_curve  # noqa: E402
from dpwa.train import train  # noqa: E402
from experiments.cifar10_scatter_sweep import cache_features  # noqa: E402

CONFIG = ROOT / "configs" / "cifar10_scatter_cpu_eps8.yaml"
OUT = ROOT / "runs" / "experiments" / "cifar10_curves"
LEDGER = ROOT / "runs" / "cifar10-curves-ledger.sqlite"
RESULTS = ROOT / "experiments" / "results"
NAME = "cifar10_curves_eps8"
N_TRAIN, BATCH, EPOCHS = 50_000, 2048, 12
TYPES = ("bezier", "polychain")


def endpoint_overrides(seed: int, steps: int, batch: int, lr: float) -> list[str]:
    return ["model.input_norm=group", "model.groups=27",  # GroupNorm(27) on the 243 feature channels (Tramer & Boneh)
            "feature_stats.second_moment_clip=1.0",  # feature_stats back to its defaults: nothing to release
            f"train.batch_size={batch}", "train.epochs=null", f"train.steps={steps}", f"optim.lr={lr}",
            f"averaging.polyak_start={steps // 2}", f"averaging.swa_start={3 * steps // 4}", f"train.seed={seed}",
            f"name=cifar10-curves-end{seed}"]


def _finished(folder: Path) -> Path | None:
    done = sorted(folder.glob("*/report.json"))
    return done[-1].parent if done else None


def _missing(folder: Path, make: bool) -> None:
    if not make:
        raise SystemExit(f"--table: no finished run in {folder}; run the experiment first")


def endpoints(out: Path, ledger: Path, extra: list[str], steps: int, batch: int, lr: float, *, make: bool = True
              ) -> list[Path]:
    dirs = []
    for seed in (0, 1):
        folder = out / f"end{seed}"
        run_dir = _finished(folder)
        if run_dir is None:
            _missing(folder, make)
            cfg = load_config(CONFIG, [*endpoint_overrides(seed, steps, batch, lr), *extra, f"out_dir={folder}"])
            run_dir = Path(train(cfg, ledger_path=str(ledger), progress=False)["run_dir"])
        print(f"# endpoint {seed}: {run_dir}", flush=True)
        dirs.append(run_dir)
    return dirs


def curves(out: Path, ledger: Path, ends: list[Path], curve_lr: float, *, make: bool = True) -> dict[str, Path]:
    dirs = {}
    for kind in TYPES:
        folder = out / kind
        run_dir = _finished(folder)
        if run_dir is None:
            _missing(folder, make)
            cfg = curve_config(ends[0], ends[1], curve_type=kind, bends=1,
                               overrides=[f"optim.lr={curve_lr}", f"out_dir={folder}", f"name=cifar10-curves-{kind}"])
            run_dir = Path(run_curve(cfg, ledger_path=str(ledger), progress=False)["run_dir"])
        print(f"# {kind}: {run_dir}", flush=True)
        dirs[kind] = run_dir
    return dirs


def _row(r: dict[str, Any], key: str) -> float:
    return max(x[key] for x in r)


def draw_all(evals: dict[str, dict], path: Path) -> Path:
    """Test error along t: the segment and every curve on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    first = next(iter(evals.values()))
    seg = first["segment"]
    ax.plot([x["t"] for x in seg], [100 * x["error"] for x in seg], "--", color="tab:gray", marker=".",
            label=f"segment (barrier {100 * first['barrier']['segment']['error']:.2f} pp)")
    for kind, e in evals.items():
        ax.plot([x["t"] for x in e["curve"]], [100 * x["error"] for x in e["curve"]], marker=".",
                label=f"{kind} (barrier {100 * e['barrier']['curve']['error']:.2f} pp)")
    ax.set_xlabel("t (0: endpoint A, 1: endpoint B)")
    ax.set_ylabel("test error (%)")
    ax.set_title("CIFAR-10 ScatterNet + CNN, every run at epsilon 8: test error along t", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(ends: list[Path], dirs: dict[str, Path], evals: dict[str, dict], ledger: Path, results: Path,
           dataset: str) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    runs = {f"endpoint {i}": d for i, d in enumerate(ends)} | {f"{k} curve": d for k, d in dirs.items()}
    led = Ledger(str(ledger), create=False)
    smoke = dataset != "cifar10"
    lines = [f"# Mode-connecting curves under DP: CIFAR-10 at epsilon 8{' (smoke: synthetic data)' if smoke else ''}",
             "", f"Command: `python experiments/{NAME}.py{' --smoke' if smoke else ''}`. Every run: epsilon 8 at delta 1e-5 (PRV), charged to "
             f"`{ledger.relative_to(ROOT) if ledger.is_relative_to(ROOT) else ledger}`. Test split: "
             f"{evals[TYPES[0]]['examples']} images (the plane: {evals[TYPES[0]]['plane']['examples']}); the "
             "evaluation is post-processing of the released weights and charges nothing.", "",
             "| run | method | steps | sigma | epsilon (own) | test accuracy (raw) | run folder |", "|---|---|---|---|---|---|---|"]
    events = []
    for label, d in runs.items():
        r = json.loads((d / "report.json").read_text())
        events += list(led.run(r["run_id"]).spent)
        lines.append(f"| {label} | {r['method']} | {r['steps']} | {r['noise_multiplier']:.3f} | {r['epsilon']:.3f} | "
                     f"{100 * r['test_raw']['accuracy']:.2f}% | `{d.name}` |")
    composed = epsilon(events, delta=1e-5, accountant="prv")
    lines += ["", "A curve run's raw model is its midpoint w(1/2) (what its run folder's weights hold).",
              "", f"Composed spend of these {len(runs)} runs on `{dataset}`: epsilon {composed:.3f} at delta 1e-5 "
              f"(PRV); the ledger's total for the dataset: {led.spent(dataset, delta=1e-5):.3f}. Two independent "
              "endpoints cost two runs; each curve is a run of its own (one release per step).", "",
              "| path | max test error | barrier (vs interpolation) | barrier (vs mean) | loss barrier | max NLL | length |",
              "|---|---|---|---|---|---|---|"]
    first = evals[TYPES[0]]
    paths = [("segment", first, "segment")] + [(kind, evals[kind], "curve") for kind in TYPES]
    for label, e, key in paths:
        b = e["barrier"][key]
        lines.append(f"| {label} | {100 * _row(e[key], 'error'):.2f}% | {100 * b['error']:.2f} pp | "
                     f"{100 * b['error_vs_mean']:.2f} pp | {b['loss']:.4f} | {_row(e[key], 'nll'):.4f} | "
                     f"{e['length'][key]:.3g} |")
    e0, e1 = first["curve"][0], first["curve"][-1]
    lines += ["", f"Endpoints: test error {100 * e0['error']:.2f}% (A) and {100 * e1['error']:.2f}% (B), NLL "
              f"{e0['nll']:.4f} / {e1['nll']:.4f}, ECE {100 * e0['ece']:.2f}% / {100 * e1['ece']:.2f}%.", "",
              "| ensemble (mean softmax) | t | test accuracy | NLL | ECE | Brier |", "|---|---|---|---|---|---|"]
    ens = [("endpoints A, B", first["ensembles"]["endpoints"]), ("segment points", first["ensembles"]["segment"])]
    ens += [(f"{kind} curve points", evals[kind]["ensembles"]["curve"]) for kind in TYPES]
    for label, m in ens:
        lines.append(f"| {label} | {', '.join(f'{t:g}' for t in m['t'])} | {100 * m['accuracy']:.2f}% | {m['nll']:.4f} | "
                     f"{100 * m['ece']:.2f}% | {m['brier']:.4f} |")
    png = draw_all(evals, results / f"{NAME}_error.png")
    lines += ["", f"![test error along t]({png.name})", ""]
    for kind in TYPES:
        target = results / f"{NAME}_{kind}_plane.png"
        shutil.copyfile(dirs[kind] / "curve_plane.png", target)
        lines += [f"![{kind}: the plane through A, B and the bend]({target.name})", ""]
    lines += ["Barrier: max over t of the test error minus its linear interpolation between the endpoints "
              "(`dpwa.connectivity.barrier`); 'vs mean': max over t minus the endpoints' mean error (Frankle et al. "
              "2020). Length: the path's length in weight space (sum of |w(t_i+1) - w(t_i)| over the grid)."]
    path = results / f"{NAME}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _synthetic(folder: Path, n_train: int = 640, n_test: int = 320, classes: int = 4) -> Path:
    """Tiny CIFAR-shaped data (32 x 32 x 3 uint8): class-dependent mean images plus noise."""
    rng = np.random.default_rng(0)
    means = rng.uniform(40, 215, size=(classes, 32, 32, 3))
    for part, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n)
        x = np.clip(means[y] + rng.normal(0, 80, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
        np.savez(folder / f"{part}.npz", x=x, y=y)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data, a temporary folder and ledger (< 1 min)")
    p.add_argument("--table", action="store_true", help="only rebuild the results from finished runs and evaluations")
    p.add_argument("--endpoint-lr", type=float, default=4.0)
    p.add_argument("--curve-lr", type=float, default=8.0)
    a = p.parse_args()
    cache_features()  # scattering once per process, shared by the runs and the evaluation
    if a.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="dpwa-curves-smoke-"))
        data = _synthetic(tmp)
        out, ledger, results, dataset = tmp / "runs", tmp / "ledger.sqlite", tmp / "results", "synthetic-smoke"
        extra = [f"data.root={data}", f"data.ledger_name={dataset}", "train.physical_batch_size=128"]
        steps, batch, eval_kw = 6, 128, dict(points=5, plane_points=5, plane_examples=None)
    else:
        out, ledger, results, dataset, extra = OUT, LEDGER, RESULTS, "cifar10", []
        steps, batch, eval_kw = math.ceil(EPOCHS * N_TRAIN / BATCH), BATCH, dict(points=21, plane_points=21,
                                                                                 plane_examples=2000)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ends = endpoints(out, ledger, extra, steps, batch, a.endpoint_lr, make=not a.table)
    dirs = curves(out, ledger, ends, a.curve_lr, make=not a.table)
    evals = {}
    for kind, d in dirs.items():
        done = d / "curve_eval.json"
        evals[kind] = json.loads(done.read_text()) if a.table and done.exists() else evaluate_curve(d, **eval_kw)
        print(f"# {kind}: segment barrier {100 * evals[kind]['barrier']['segment']['error']:.2f} pp, curve barrier "
              f"{100 * evals[kind]['barrier']['curve']['error']:.2f} pp", flush=True)
    path = report(ends, dirs, evals, ledger, results, dataset)
    print(path.read_text())
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
