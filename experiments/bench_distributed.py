"""Throughput of data-parallel DP-SGD: 1 process against 2 (torchrun, gloo) on this machine.

    python experiments/bench_distributed.py [--out experiments/results/bench_distributed.md]

Each setting trains the same config (its own temporary ledger and run folder) and reads
images/s (per-example gradient evaluations over training time, start-up excluded) and the
wall time of the whole command from its report. Settings, run one after the other:
1 process with 2 threads, 1 process with 1 thread, 2 processes with 1 thread each.
Workloads: the quickstart (digits, cnn_small, augmult 4) and, when ../shared/data is there,
the tanh CNN on CIFAR-10 (batch 1024, K = 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"

WORKLOADS = {
    "quickstart (digits, cnn_small, K=4, batch 256)": ["configs/quickstart.yaml", "train.steps=150"],
    "tanh CNN (CIFAR-10, K=1, batch 1024)": ["configs/cifar10_cnn_cpu_eps8.yaml", "train.steps=12",
                                            "train.physical_batch_size=256", "augmult.k=1", "train.eval_every=0"],
}
SETTINGS = {
    "1 process x 2 threads": (1, 2),
    "1 process x 1 thread": (1, 1),
    "2 processes x 1 thread (gloo)": (2, 1),
}


def run(args: list[str], procs: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                  if procs > 1 else [sys.executable])
        cmd = [*launch, "-m", "dpwa", "train", *args, f"train.threads={threads}", f"out_dir={tmp}/runs",
               "--ledger", f"{tmp}/l.sqlite", "--no-progress"]
        t0 = time.time()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        wall = time.time() - t0
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        (report,) = Path(tmp, "runs").glob("*/report.json")
        return {**json.loads(report.read_text()), "command_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "bench_distributed.md")
    a = ap.parse_args()
    lines = [f"Command: `python experiments/bench_distributed.py`; {os.cpu_count()} CPU cores, settings run one after "
             "the other on a quiet machine.", "",
             "| workload | setting | images/s | vs 1 process x 2 threads | training time | command wall time |",
             "|---|---|---|---|---|---|"]
    for name, args in WORKLOADS.items():
        if "cifar10" in args[0] and not CIFAR.exists():
            print(f"skipped {name}: {CIFAR} not found")
            continue
        base = None
        for setting, (procs, threads) in SETTINGS.items():
            r = run(args, procs, threads)
            base = base or r["images_per_s"]
            row = (f"| {name} | {setting} | {r['images_per_s']:.0f} | {r['images_per_s'] / base:.2f}x | "
                   f"{r['train_time_s']:.1f} s | {r['command_wall_s']:.1f} s |")
            print(row, flush=True)
            lines.append(row)
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
