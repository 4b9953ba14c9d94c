#!/usr/bin/env python
"""Throughput of plain Opacus (../shared/baselines/opacus_cifar10_cpu.py, its timing mode)
against `dpwa train` on the same tanh CNN, the same logical batch (1024) and data, run side
by side: the two alternate, `--rounds` times, and the table gives medians.

    python experiments/baseline_throughput.py            # 3 rounds, ~8 min on 2 cores
    python experiments/baseline_throughput.py --rounds 1

Opacus: `--mode timing --max-steps 8 --batch-size 1024 --max-physical 256` (functorch
per-sample gradients, its default) on 2 threads. dpwa: `configs/cifar10_cnn_cpu_eps8.yaml
train.steps=8` with physical batch 256 (Opacus's) and 64 (the config's), 2 threads; its
images/s is the report's expected images over training time. Both spend into scratch
ledgers. Opacus runs twice: as users run it (glibc's own malloc thresholds), and with
freed memory kept for reuse as `dpwa train` keeps it by default. Writes
experiments/results/baseline_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpwa.config import TrainConfig  # noqa: E402
BASELINE = ROOT.parent / "shared" / "baselines" / "opacus_cifar10_cpu.py"
CONFIG = "configs/cifar10_cnn_cpu_eps8.yaml"
TABLE = ROOT / "experiments" / "results" / "baseline_throughput.md"


def opacus(retain: bool = False) -> float:
    """The baseline as users run it, or (retain) with freed memory kept for reuse as `dpwa
    train` keeps it by default: glibc's mmap and trim thresholds at `train.retain_freed_mb`, set
    through the environment (the baseline script calls no mallopt; `dpwa.alloc` leaves such a
    setting alone)."""
    env = dict(os.environ)
    if retain:
        limit = str(TrainConfig.retain_freed_mb << 20)
        env.update(MALLOC_MMAP_THRESHOLD_=limit, MALLOC_TRIM_THRESHOLD_=limit)
    out = subprocess.run([sys.executable, str(BASELINE), "--mode", "timing", "--epochs", "13", "--max-steps", "8",
                          "--batch-size", "1024", "--max-physical", "256", "--threads", "2"],
                         capture_output=True, text=True, check=True, cwd=BASELINE.parent, env=env)
    return float(re.search(r"TIMING \d+ imgs in [\d.]+s = ([\d.]+) img/s", out.stdout).group(1))


def dpwa(physical: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "dpwa", "train", CONFIG, "train.steps=8", "train.threads=2",
                        f"train.physical_batch_size={physical}", f"out_dir={tmp}/runs", "--no-progress",
                        "--ledger", f"{tmp}/l.sqlite"], capture_output=True, text=True, check=True, cwd=ROOT)
        (report,) = Path(tmp, "runs").glob("*/report.json")
        return json.loads(report.read_text())["expected_images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    runs = {"opacus (functorch, physical 256)": opacus,
            "opacus, freed memory kept for reuse as dpwa does": lambda: opacus(retain=True),
            "dpwa (dpwa-fast, physical 256)": lambda: dpwa(256),
            "dpwa (dpwa-fast, physical 64)": lambda: dpwa(64)}
    got: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(a.rounds):
        for name, fn in runs.items():
            got[name].append(fn())
            print(f"round {r}: {name}: {got[name][-1]:.0f} images/s", flush=True)
    base = statistics.median(got["opacus (functorch, physical 256)"])
    rows = ["| engine | images/s (median) | runs | vs Opacus |", "|---|---|---|---|"]
    for name, values in got.items():
        m = statistics.median(values)
        rows.append(f"| {name} | {m:.0f} | {', '.join(f'{v:.0f}' for v in values)} | {m / base:.2f}x |")
    text = (f"Plain Opacus against dpwa on the tanh CNN (`{CONFIG}`), logical batch 1024, 8 steps each, "
            f"{a.rounds} interleaved rounds on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}. Command: "
            f"`python experiments/baseline_throughput.py --rounds {a.rounds}`.\n\n" + "\n".join(rows) + "\n")
    TABLE.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
