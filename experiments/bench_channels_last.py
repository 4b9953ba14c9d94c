#!/usr/bin/env python
"""Does channels-last memory format speed up a step on this CPU? Non-private and dpwa-fast
steps of WRN-16-4 WS+GN (64 images), contiguous vs channels_last, interleaved, medians.

    python experiments/bench_channels_last.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from experiments.bench_dp_step import build, make_step  # noqa: E402


def main(repeats: int = 3) -> None:
    torch.set_num_threads(2)
    steps = {}
    for engine in ("non-private", "dpwa-fast"):
        for fmt in ("contiguous", "channels_last"):
            model, views, labels = build("WRN-16-4 WS+GN", 64)
            if fmt == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                views = views[:, 0].contiguous(memory_format=torch.channels_last).unsqueeze(1)  # K = 1
            step = make_step(engine, model, views, labels)
            step()
            steps[(engine, fmt)] = step
    times = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    print("| engine | memory format | median step (s) |\n|---|---|---|")
    for (engine, fmt), ts in times.items():
        print(f"| {engine} | {fmt} | {statistics.median(ts):.3f} |")


if __name__ == "__main__":
    main()
