#!/usr/bin/env python
"""What the model probe (`dpwa.probe`) costs next to one DP-SGD step of the same model, in
one process, interleaved (probe, step, probe, step, ...), medians over --repeats rounds
(these machines' speed drifts up to 2.5x between identical runs). The probe runs once per
run, before the reservation; a step runs thousands of times. Prints a markdown table.

    python experiments/bench_probe.py --out experiments/results/bench_probe.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

CASES = {  # name -> (model, in channels, image size, classes, groups, K, logical batch)
    "cnn_small, digits 8x8, K=4, B=256 (quickstart)": ("cnn_small", 1, 8, 10, 8, 4, 256),
    "WRN-16-4, CIFAR 32x32, K=1, B=256": ("wrn16_4", 3, 32, 10, 16, 1, 256),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="dpwa-fast")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from dpwa.models import create_model
    from dpwa.privacy import PrivateSGD
    from dpwa.probe import probe

    lines = ["| model | engine | probe (s) | one DP step (s) | probe / step |", "|---|---|---|---|---|"]
    for case, (name, c, size, classes, groups, k, b) in CASES.items():
        torch.manual_seed(0)
        model = create_model(name, in_channels=c, num_classes=classes, groups=groups)
        sgd = PrivateSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, clip_norm=1.0,
                         expected_batch_size=b, engine=a.engine)
        views, labels = torch.randn(b, k, c, size, size), torch.randint(0, classes, (b,))
        sgd.step([(views, labels)])  # warm-up
        probes, steps = [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            probe(model, a.engine, example_shape=(c, size, size), views=k, num_classes=classes)
            probes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sgd.step((views[i:i + 128], labels[i:i + 128]) for i in range(0, b, 128))
            steps.append(time.perf_counter() - t0)
        p, s = statistics.median(probes), statistics.median(steps)
        lines.append(f"| {case} | {a.engine} | {p:.2f} | {s:.2f} | {p / s:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + f"\n\nMedians of {a.repeats} interleaved rounds, {a.threads} threads, " \
                              "`python experiments/bench_probe.py`.\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
