#!/usr/bin/env python
"""Images per second of fetching Poisson batches of folder images (`dpwa.loader.BatchLoader`,
decode + resize + centre crop) from ../shared/data/imagenette-small, with 0, 1 and 2 DataLoader
workers (`train.workers`). Two columns: fetching alone, and fetching with a simulated step
(a sleep of --step-s per batch: a GPU step leaves the CPU to the workers) after which the
workers have decoded the next batch ahead. One loader per worker count, started and warmed up
once (as in a run); interleaved rounds (0, 1, 2, 0, 1, 2, ...), medians over --repeats rounds
(these machines' speed drifts between identical runs). Each round starts with an untimed cold
batch and decodes nothing ahead into another configuration's round. Prints a markdown table.

    python experiments/bench_loader.py --out experiments/results/bench_loader.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "imagenette-small"
WORKERS = (0, 1, 2)


def images_per_s(loader, batches, count: int, step_s: float) -> float:
    """Images / second over `count` batches in a run's steady state: each one decoded ahead
    (workers > 0) while the previous one's step ran; the cold first batch is not timed."""
    sum(len(chunk) for chunk in loader.fetch(next(batches), batches.peek()))
    n, t0 = 0, time.perf_counter()
    for i in range(count):
        time.sleep(step_s)  # the previous batch's step
        idx = next(batches)
        n += sum(len(chunk) for chunk in loader.fetch(idx, batches.peek() if i + 1 < count else None))
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128, help="expected logical batch B (q = B / N)")
    ap.add_argument("--chunk", type=int, default=32, help="physical batch: images per worker task")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per configuration and round")
    ap.add_argument("--step-s", type=float, default=0.2, help="simulated step time per batch, seconds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if not (a.data / "train").is_dir():
        print(f"bench_loader: {a.data} is absent (expected the ImageNet layout, train/<class>/*.JPEG); "
              "see ../shared/data/README.md", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # the training process's decoding (workers=0) on one thread, as workers run
    from dpwa.config import DataConfig
    from dpwa.data import load_data
    from dpwa.loader import BatchLoader
    from dpwa.privacy import poisson_batches

    x = load_data(DataConfig(name="imagefolder", root=str(a.data), image_size=a.image_size)).train.x
    q = a.batch_size / len(x)
    loaders = {w: BatchLoader(x, workers=w, chunk_size=a.chunk, expected_batch=a.batch_size) for w in WORKERS}
    batches = {w: poisson_batches(len(x), q, torch.Generator().manual_seed(w)) for w in WORKERS}
    for w in WORKERS:  # start the workers and warm the file cache
        images_per_s(loaders[w], batches[w], 1, 0.0)
    rates: dict[tuple[int, str], list[float]] = {(w, m): [] for w in WORKERS for m in ("fetch", "step")}
    for _ in range(a.repeats):
        for mode, step_s in (("fetch", 0.0), ("step", a.step_s)):
            for w in WORKERS:
                rates[w, mode].append(images_per_s(loaders[w], batches[w], a.batches, step_s))
    for loader in loaders.values():
        loader.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    lines = [f"| workers | fetch alone (images/s) | vs 0 | fetch + {a.step_s:g} s step (images/s) | vs 0 |",
             "|---|---|---|---|---|"]
    for w in WORKERS:
        lines.append(f"| {w} | {med[w, 'fetch']:.0f} | {med[w, 'fetch'] / med[0, 'fetch']:.2f}x "
                     f"| {med[w, 'step']:.0f} | {med[w, 'step'] / med[0, 'step']:.2f}x |")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = ("\n".join(lines) + f"\n\nimagenette-small train ({len(x)} JPEGs, shorter side 224) at "
            f"image_size {a.image_size}, Poisson batches of expected size {a.batch_size} in chunks of {a.chunk}, "
            f"{a.batches} timed batches per configuration and round (after an untimed cold one), medians of {a.repeats} interleaved rounds, "
            f"{cores} CPU cores; `python experiments/bench_loader.py`.\n")
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
