#!/usr/bin/env python
"""CIFAR-10 at epsilon 8 (delta 1e-5) on 2 CPU cores: raw vs EMA weights, with and without
augmentation multiplicity, at about the same compute (per-example gradient evaluations).

    python experiments/cifar10_cpu_eps8.py            # runs all four (35-50 min each), writes the table
    python experiments/cifar10_cpu_eps8.py --table    # only rebuild the table from finished runs

Runs `dpwa train` on configs/cifar10_cnn_cpu_eps8.yaml and configs/cifar10_scatter_cpu_eps8.yaml
with the variants below, one after the other; each reserves its spend in runs/experiments-ledger.sqlite. Writes
experiments/results/cifar10_cpu_eps8.md from the runs' report.json files. Accuracy is on the
9,000-image test set of ../shared/data/cifar10 (JPEG q75; see its README).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "experiments" / "cifar10_cpu_eps8"
TABLE = ROOT / "experiments" / "results" / "cifar10_cpu_eps8.md"
CNN = "configs/cifar10_cnn_cpu_eps8.yaml"
SCATTER = "configs/cifar10_scatter_cpu_eps8.yaml"
# name -> (config, overrides). k1/k4: end-to-end tanh CNN, same batch (1024) and about the same
# number of per-example gradients (K=4 takes a quarter of the steps, so it needs less noise).
# scatter: ScatterNet features + CNN (Tramer & Boneh 2021's CIFAR-10 hyper-parameters).
VARIANTS = {
    "k1": (CNN, ["augmult.k=1", "train.steps=550"]),
    "k4": (CNN, ["augmult.k=4", "train.steps=140"]),
    "scatter": (SCATTER, ["train.epochs=40"]),
    "scatter60": (SCATTER, []),  # the config: Tramer & Boneh's 60 epochs (more steps, more noise)
}


def run(name: str, config: str, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "dpwa", "train", config, f"out_dir={OUT / name}", f"name=cifar10-cpu-{name}",
           *overrides, "--ledger", str(ROOT / "runs" / "experiments-ledger.sqlite"), "--no-progress"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def table() -> str:
    rows = ["| variant | K | steps | sigma | epsilon (PRV) | test acc raw | test acc EMA | test acc Polyak | "
            "per-example grads | train time (min) | wall time (min) | grads/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (config, overrides) in VARIANTS.items():
        for report_path in sorted((OUT / name).glob("*/report.json")):
            r = json.loads(report_path.read_text())
            rows.append(f"| {name} (`{Path(config).name} {' '.join(overrides)}`) | {r['augmult_k']} | {r['steps']} | "
                        f"{r['noise_multiplier']:.3f} | {r['epsilon']:.3f} | {100 * r['test_raw']['accuracy']:.2f}% | "
                        f"{100 * r['test_ema']['accuracy']:.2f}% | {100 * r['test_polyak']['accuracy']:.2f}% | "
                        f"{r['per_example_gradient_evaluations']} | {r['train_time_s'] / 60:.1f} | {r['wall_time_s'] / 60:.1f} | "
                        f"{r['images_per_s']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="only rebuild the table")
    p.add_argument("--only", choices=sorted(VARIANTS), nargs="*", help="run only these variants")
    a = p.parse_args()
    if not a.table:
        for name in a.only or VARIANTS:
            run(name, *VARIANTS[name])
    text = (f"CIFAR-10, epsilon 8, delta 1e-5, 2 CPU cores; command: `python experiments/cifar10_cpu_eps8.py` "
            f"(configs `{CNN}`, `{SCATTER}`).\n\n" + table() + "\n")
    print(text)
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    TABLE.write_text(text)


if __name__ == "__main__":
    main()
