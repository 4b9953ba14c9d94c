#!/usr/bin/env python
"""Does channels-last memory format speed up a step on this CPU? Non-private and dpwa-fast
steps, contiguous vs channels-last (the model's weights and the input batch), interleaved,
medians, with the channels-last step's time as a ratio of the contiguous one.

    python experiments/bench_channels_last.py --out experiments/results/bench_channels_last.md

dpwa's mechanism hands its engine contiguous input batches (the probe checks engines on
those), so channels-last reaches a DP step through the weights: every activation after
the first convolution is channels-last.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dpwa.alloc import retain_freed_memory  # noqa: E402
from dpwa.config import TrainConfig  # noqa: E402
from experiments.bench_dp_step import CASES, build, make_step  # noqa: E402

DEFAULT_ROWS = [("cnn_tanh (small CNN)", 256), ("scatter_cnn (ScatterNet features)", 256), ("WRN-16-4 WS+GN", 64)]
FORMATS = ("contiguous", "channels_last")


def time_row(case: str, images: int, repeats: int) -> dict[tuple[str, str], list[float]]:
    steps = {}
    for engine in ("non-private", "dpwa-fast"):
        for fmt in FORMATS:
            model, views, labels = build(case, images)
            if fmt == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                views = views.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # each view channels-last
            step = make_step(engine, model, views, labels)
            step()  # warm-up (and, for dpwa-fast, the probe)
            steps[(engine, fmt)] = step
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", metavar="CASE=IMAGES",
                   default=[f"{c}={i}" for c, i in DEFAULT_ROWS],
                   help=f"cases (of {', '.join(CASES)}) and images per step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(2)
    retain_freed_memory(TrainConfig.retain_freed_mb)  # as bench_dp_step's timing process and `dpwa train`
    lines = [f"2 threads, medians of {a.repeats} interleaved rounds, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}.\nCommand: `python experiments/bench_channels_last.py "
             f"{shlex.join(sys.argv[1:])}`\n",
             "| model | images / step | engine | contiguous (s) | channels-last (s) | channels-last / contiguous |",
             "|---|---|---|---|---|---|"]
    for row in a.rows:
        case, images = row.rsplit("=", 1)
        if case not in CASES:
            p.error(f"--rows: unknown case {case!r}; expected one of {', '.join(CASES)}")
        times = time_row(case, int(images), a.repeats)
        for engine in ("non-private", "dpwa-fast"):
            c, cl = (statistics.median(times[(engine, f)]) for f in FORMATS)
            lines.append(f"| {case} | {images} | {engine} | {c:.3f} | {cl:.3f} | {cl / c:.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
