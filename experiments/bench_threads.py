#!/usr/bin/env python
"""Threads on a shared machine: train.threads = 1, 2 and auto, with and without one core kept
busy by another process (`yes > /dev/null`), for the quickstart and one CIFAR tanh-CNN step.

    python experiments/bench_threads.py --out experiments/results/bench_threads.md   # ~5 min on 2 quiet cores

Settings: "2, spin" is the old default (2 threads, OpenMP's default wait policy: idle
threads spin for ~300k iterations, GOMP_SPINCOUNT=300000, before they sleep); the others run
with OMP_WAIT_POLICY=PASSIVE, which dpwa sets when `dpwa.threads` is imported before torch.
Every measurement is a fresh process (the OpenMP runtime reads its policy once, at load),
started by a launcher that imports `dpwa.threads` first. Quickstart: `dpwa train
configs/quickstart.yaml train.steps=N`, the training time of its report and the command's
wall time. CIFAR: `cnn_tanh` (GroupNorm) on random 3x32x32 images, B examples per step
through `dpwa.privacy.PrivateSGD` (dpwa-fast engine), after a warm-up step. Repeats are
interleaved (repeat, load, workload, setting; orders rotated) and the table gives medians.
"Load" is what `dpwa.threads.busy_cores` saw just before each measurement: other users of
this machine count too.
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

SETTINGS = {  # name -> (train.threads, wait policy)
    "2, spin (old default)": ("2", "spin"),
    "1": ("1", "passive"),
    "2": ("2", "passive"),
    "auto": ("auto", "passive"),
}
LOADS = ("quiet", "one core busy")
WORKLOADS = ("quickstart", "cifar cnn_tanh step")
# dpwa.threads before torch (what `import dpwa` does once dpwa/__init__ imports it), and its log line on stderr
LAUNCH = ("import logging, sys; import dpwa.threads; logging.basicConfig(level=logging.WARNING); "
          "logging.getLogger('dpwa.threads').setLevel(logging.INFO); ")


def child_env(policy: str) -> dict[str, str]:
    drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "DPWA_THREADS")  # DPWA_THREADS would pin auto
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if policy == "spin":
        env["GOMP_SPINCOUNT"] = "300000"  # libgomp's default when OMP_WAIT_POLICY is unset; dpwa keeps it
    return env


def chosen(stderr: str) -> str:
    m = re.search(r"threads: (.*?); OpenMP wait policy", stderr)
    return m.group(1) if m else "?"


def run_quickstart(threads: str, policy: str, steps: int, tmp: Path) -> dict:
    cmd = [sys.executable, "-c", LAUNCH + "from dpwa.cli import main; sys.exit(main(sys.argv[1:]))",
           "train", "configs/quickstart.yaml", f"train.steps={steps}", f"train.threads={threads}", "--no-progress",
           "--ledger", str(tmp / f"ledger-{time.time_ns()}.sqlite"), f"out_dir={tmp / 'runs'}"]  # one run each
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=child_env(policy), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"quickstart failed:\n{out.stderr[-3000:]}")
    report = re.search(r"report: (\S+)", out.stdout)
    train_s = json.loads(Path(report.group(1)).read_text())["train_time_s"] if report else float("nan")
    return {"seconds": train_s, "wall": wall, "choice": chosen(out.stderr)}


def run_cnn(threads: str, policy: str, batch: int, steps: int) -> dict:
    cmd = [sys.executable, "-c", LAUNCH + "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
           "run_name='__main__')", __file__, "--cnn-child", threads, "--batch", str(batch), "--steps", str(steps)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=child_env(policy), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"cnn step failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"seconds": r["step_s"], "wall": wall, "choice": chosen(out.stderr)}


def cnn_child(threads: str, batch: int, steps: int) -> None:
    """In a fresh process: median seconds of one DP step of cnn_tanh on B random CIFAR-shaped images."""
    from dpwa.threads import set_threads

    set_threads(int(threads) if threads.isdigit() else threads)
    import torch

    from dpwa.models import create_model
    from dpwa.privacy import PrivateSGD

    torch.manual_seed(0)
    model = create_model("cnn_tanh", in_channels=3, num_classes=10, groups=8, weight_standardization=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd = PrivateSGD(model, opt, noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=batch)
    views, labels = torch.randn(batch, 1, 3, 32, 32), torch.randint(0, 10, (batch,))
    sgd.step([(views, labels)])  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sgd.step([(views, labels)])
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": statistics.median(times)}))


def busy_now() -> float:
    from dpwa.threads import busy_cores

    return busy_cores(0.2)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quickstart-steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64, help="CIFAR examples per step")
    ap.add_argument("--cnn-steps", type=int, default=3, help="timed CIFAR steps per process (median)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cnn-child", metavar="THREADS", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cnn_child:
        cnn_child(a.cnn_child, a.batch, a.steps)
        return

    results: dict = {}
    load_seen: dict = {load: [] for load in LOADS}
    t_start = time.time()
    names = list(SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for load in (LOADS if r % 2 == 0 else LOADS[::-1]):
                hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if load != "quiet" else None
                try:
                    time.sleep(0.5 if hog else 0.0)
                    for workload in (WORKLOADS if r % 2 == 0 else WORKLOADS[::-1]):
                        for name in names[r % len(names):] + names[:r % len(names)]:
                            threads, policy = SETTINGS[name]
                            load_seen[load].append(busy_now())
                            res = (run_quickstart(threads, policy, a.quickstart_steps, Path(tmp))
                                   if workload == "quickstart" else run_cnn(threads, policy, a.batch, a.cnn_steps))
                            results.setdefault((workload, name, load), []).append(res)
                            print(f"[{time.time() - t_start:6.0f}s] repeat {r + 1} {load:13s} {workload:20s} "
                                  f"{name:22s} {res['seconds']:8.3f}s  wall {res['wall']:6.1f}s  {res['choice']}",
                                  file=sys.stderr, flush=True)
                finally:
                    if hog:
                        hog.kill()
                        hog.wait()

    def med(key, field="seconds"):
        return statistics.median(x[field] for x in results[key])

    def picks(key):
        counts = [re.search(r"-> (\d+)$", x["choice"]) for x in results[key]]
        return "/".join(m.group(1) if m else "?" for m in counts)

    command = " ".join(["python experiments/bench_threads.py", *sys.argv[1:]])
    lines = [f"`{command}` on {os.cpu_count()} CPUs "
             f"(affinity {len(os.sched_getaffinity(0))}), {time.strftime('%Y-%m-%d')}; medians of {a.repeats} "
             f"interleaved repeats, each a fresh process. Busy core: `yes > /dev/null`. Background load seen by "
             f"`dpwa.threads.busy_cores` before each measurement (median, other users included): quiet "
             f"{statistics.median(load_seen['quiet']):.2f} cores, one core busy "
             f"{statistics.median(load_seen['one core busy']):.2f} cores.", ""]
    units = {"quickstart": f"quickstart, {a.quickstart_steps} steps: training seconds (command wall seconds)",
             "cifar cnn_tanh step": f"CIFAR cnn_tanh, one DP step of B = {a.batch}: seconds"}
    for workload in WORKLOADS:
        lines += [f"**{units[workload]}**", "",
                  "| train.threads | quiet | one core busy | busy / quiet | vs threads=1, quiet | vs threads=1, busy "
                  "| slowest, quiet | slowest, busy | auto chose (quiet; busy) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            q, b = med((workload, name, "quiet")), med((workload, name, "one core busy"))
            q1, b1 = med((workload, "1", "quiet")), med((workload, "1", "one core busy"))
            if workload == "quickstart":
                cell = lambda load: f"{med((workload, name, load)):.2f} ({med((workload, name, load), 'wall'):.1f})"
            else:
                cell = lambda load: f"{med((workload, name, load)):.3f}"
            auto = f"{picks((workload, name, 'quiet'))}; {picks((workload, name, 'one core busy'))}" \
                if name == "auto" else ""
            worst = [max(x["seconds"] for x in results[(workload, name, load)]) for load in LOADS]
            lines.append(f"| {name} | {cell('quiet')} | {cell('one core busy')} | {b / q:.2f} | {q / q1:.2f} | "
                         f"{b / b1:.2f} | {worst[0]:.3g} | {worst[1]:.3g} | {auto} |")
        lines.append("")
    lines.append(f"Total bench time {time.time() - t_start:.0f} s. `2, spin` is the old default (OpenMP's default "
                 "wait policy, GOMP_SPINCOUNT=300000); the other rows run with OMP_WAIT_POLICY=PASSIVE. \"quiet\": no "
                 "`yes` started, other users of the machine as they were; \"slowest\": the worst of the repeats. "
                 "auto's picks are listed per repeat.")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)


if __name__ == "__main__":
    main()
