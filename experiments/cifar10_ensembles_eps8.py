#!/usr/bin/env python
"""What free averaging and ensembling of DP iterates buy on CIFAR-10 at epsilon 8 (delta 1e-5),
2 CPU cores: last iterate vs EMA, Polyak, SWA, FGE, SWAG and SWAG-diagonal, from one DP
trajectory per schedule (the snapshots are free, so every method reuses the same run).

    python experiments/cifar10_ensembles_eps8.py --only fge   # one trajectory (~45 min): train, then eval
    python experiments/cifar10_ensembles_eps8.py              # both schedules, one after the other
    python experiments/cifar10_ensembles_eps8.py --table      # rebuild the table from finished runs

Each variant runs `dpwa train CONFIG` (spend reserved in runs/experiments-ledger.sqlite) and
then `dpwa eval RUN_DIR` (no charge). Writes experiments/results/cifar10_ensembles_eps8.md and
the reliability diagrams experiments/results/cifar10_ensembles_eps8_<variant>.png. Accuracy
is on the 9,000-image test set of ../shared/data/cifar10 (JPEG q75; see its README).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "experiments" / "cifar10_ensembles_eps8"
RESULTS = ROOT / "experiments" / "results"
TABLE = RESULTS / "cifar10_ensembles_eps8.md"
VARIANTS = {  # name -> config
    "fge": "configs/cifar10_scatter_fge_cpu_eps8.yaml",  # constant lr, then triangular cycles
    "swa": "configs/cifar10_scatter_swa_cpu_eps8.yaml",  # Izmailov et al.'s SWA schedule
}


def dpwa(*args: str) -> None:
    cmd = [sys.executable, "-m", "dpwa", *args]
    print("$ dpwa", " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def run(name: str, config: str) -> None:
    dpwa("train", config, f"out_dir={OUT / name}", "--ledger", str(ROOT / "runs" / "experiments-ledger.sqlite"),
         "--no-progress")
    run_dir = max((OUT / name).iterdir(), key=lambda p: p.stat().st_mtime)
    dpwa("eval", str(run_dir))


def table() -> str:
    parts = []
    for name, config in VARIANTS.items():
        for ev in sorted((OUT / name).glob("*/eval.json")):
            e = json.loads(ev.read_text())
            r = json.loads((ev.parent / "report.json").read_text())
            png = RESULTS / f"cifar10_ensembles_eps8_{name}.png"
            shutil.copyfile(ev.parent / "reliability.png", png)
            raw = e["methods"]["raw"]
            parts.append(
                f"### {name}: `dpwa train {config}` then `dpwa eval RUN_DIR`\n\n"
                f"epsilon {e['epsilon']:.3f} (PRV), delta {e['delta']:g}, {r['steps']} steps, sigma "
                f"{r['noise_multiplier']:.3f}, train {r['train_time_s'] / 60:.1f} min, wall {r['wall_time_s'] / 60:.1f} min; "
                f"iterates collected: {e['collected']}. Reliability diagrams: `{png.relative_to(ROOT)}`.\n\n"
                "| method | members | accuracy | vs last iterate | NLL | ECE (15 bins) | Brier |\n"
                "|---|---|---|---|---|---|---|\n"
                + "".join(f"| {m} | {s['members']} | {100 * s['accuracy']:.2f}% | "
                          f"{100 * (s['accuracy'] - raw['accuracy']):+.2f} | {s['nll']:.4f} | {100 * s['ece']:.2f}% | "
                          f"{s['brier']:.4f} |\n" for m, s in e["methods"].items()))
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="only rebuild the table")
    p.add_argument("--only", choices=sorted(VARIANTS), nargs="*", help="run only these variants")
    a = p.parse_args()
    if not a.table:
        for name in a.only or VARIANTS:
            run(name, VARIANTS[name])
    text = ("CIFAR-10, epsilon 8, delta 1e-5, 2 CPU cores, ScatterNet + CNN; command: "
            "`python experiments/cifar10_ensembles_eps8.py`. All methods of a variant come from one DP run.\n\n"
            + table())
    print(text)
    TABLE.write_text(text)


if __name__ == "__main__":
    main()
