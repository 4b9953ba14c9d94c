#!/usr/bin/env python
"""One DP-SGD step against the same non-private step, per model and per-example engine:
median step time and peak memory, with ratios to non-private. Prints a markdown table.

    python experiments/bench_dp_step.py --out experiments/results/bench_dp_step.md
    python experiments/bench_dp_step.py --profile "WRN-16-4 WS+GN"   # where dpwa-fast's time goes

Time: all engines of a model live in one process and take turns step by step (A B C D E,
A B C D E, ...) for --repeats rounds after a warm-up step each, and the table gives
medians, because these machines' speed drifts up to 2.5x between identical runs.
Memory: each (model, engine) runs alone in a fresh process; "peak" is the growth of the
resident set during one step (sampled every millisecond) above what the process holds
before it (model, batch, optimizer state, after a warm-up step). Those processes have glibc
mmap every block above 64 KB, so freed memory leaves the resident set and the peak is what
the step holds live; the timing process keeps freed memory for reuse instead, as a training
run does (`train.retain_freed_mb`, dpwa.alloc; `--glibc-malloc`: glibc's own thresholds).
A DP step is `PrivateSGD.step` (per-example clipping, noise, momentum SGD); the non-private
step is forward, mean loss, backward, momentum SGD on the same views. Every model sees the
same number of images per step (--images): K=1 uses B=images examples, K=4 and K=16 use
images/K examples with K views each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dpwa.alloc import retain_freed_memory  # noqa: E402
from dpwa.config import TrainConfig  # noqa: E402

ENGINES = ["non-private", "opacus-plain", "opacus-hooks", "opacus-functorch", "opacus-ghost", "dpwa-fast", "dpwa-lean"]
#: Why an engine has no row for a case with K > 1 views per example.
NO_VIEWS = {"opacus-ghost": "clips each view, not each example",
            "opacus-plain": "Opacus as users write it has no augmentation multiplicity"}
CASES = {  # name -> (model, weight standardisation, K)
    "cnn_tanh (small CNN)": ("cnn_tanh", False, 1),
    "scatter_cnn (ScatterNet features)": ("scatter_cnn", False, 1),
    "WRN-16-4 WS+GN": ("wrn16_4", True, 1),
    "WRN-16-4 WS+GN, K=4": ("wrn16_4", True, 4),
    "WRN-16-4 WS+GN, K=16": ("wrn16_4", True, 16),
}
#: Input of one view: images, or the ScatterNet features of one (dpwa.features: 3 x 81 x 8 x 8).
SHAPES = {"scatter_cnn": (243, 8, 8)}
GROUPS = {"scatter_cnn": 27, "cnn_tanh": 8}


def build(case: str, images: int, seed: int = 0):
    from dpwa.models import create_model

    name, ws, k = CASES[case]
    torch.manual_seed(seed)
    shape = SHAPES.get(name, (3, 32, 32))
    model = create_model(name, in_channels=shape[0], num_classes=10, groups=GROUPS.get(name, 16),
                         weight_standardization=ws)
    for p in model.parameters():  # WRN's zero-init head would make most gradients zero
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
    b = images // k
    views = torch.randn(b, k, *shape)
    labels = torch.randint(0, 10, (b,))
    return model, views, labels


def make_step(engine: str, model, views, labels):
    """A callable doing one full optimisation step; None when the engine cannot do this case."""
    from dpwa.privacy import PrivateSGD

    k = views.shape[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if engine == "non-private":
        flat, rep = views.flatten(0, 1), labels.repeat_interleave(k)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(flat), rep).backward()
            opt.step()
        return step
    if engine in NO_VIEWS and k > 1:
        return None
    if engine == "opacus-plain":
        return _opacus_plain_step(model, opt, views[:, 0], labels)
    sgd = PrivateSGD(model, opt, noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=len(labels),
                     engine=engine)
    return lambda: sgd.step([(views, labels)])


def _opacus_plain_step(model, opt, x, labels):
    """Opacus as its users write it (../shared/baselines/opacus_cifar10_cpu.py): PrivacyEngine,
    make_private with Opacus's default hooks, its DPOptimizer's clipping and noise. The
    `opacus-*` engines run Opacus's per-sample gradients inside dpwa's mechanism; this row
    shows whether they are slower than Opacus itself."""
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about the secure RNG and the accountant
        model, opt, _ = PrivacyEngine(accountant="prv").make_private(
            module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, labels), batch_size=len(labels)),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks")

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # its per-sample gradients go now, not at the next step
    return step


def time_case(case: str, images: int, repeats: int, engines: list[str]) -> dict[str, list[float]]:
    import copy

    model, views, labels = build(case, images)
    steps = {}
    for engine in engines:
        step = make_step(engine, copy.deepcopy(model), views, labels)
        if step is not None:
            step()  # warm-up
            steps[engine] = step
    times: dict[str, list[float]] = {e: [] for e in steps}
    for r in range(repeats):
        order = list(steps)[r % len(steps):] + list(steps)[:r % len(steps)]  # rotate who goes first
        for engine in order:
            t0 = time.perf_counter()
            steps[engine]()
            times[engine].append(time.perf_counter() - t0)
    return times


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def memory_child(case: str, engine: str, images: int) -> None:
    """In a fresh process: peak resident-set growth (MB) during one step (after a warm-up
    step), sampled every millisecond by a thread."""
    import threading

    model, views, labels = build(case, images)
    step = make_step(engine, model, views, labels)
    if step is None:
        print(json.dumps(None))
        return
    step()
    before, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
    print(json.dumps(max(peak[0], _rss_mb()) - before))


def memory(case: str, engine: str, images: int, threads: int) -> float | None:
    out = subprocess.run([sys.executable, __file__, "--memory-child", case, engine, "--images", str(images),
                          "--threads", str(threads)], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})  # big blocks go back to the OS
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(case: str, images: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, views, labels = build(case, images)
    lines = []
    for engine in ("non-private", "dpwa-fast", "dpwa-lean"):
        step = make_step(engine, model, views, labels)
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        lines.append(f"### {engine}\n\n```\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=15)}\n```")
    return "\n\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    p.add_argument("--images", type=int, nargs="+", default=[64, 256],
                   help="images (examples x views) per physical step: a row per value")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=ENGINES,
                   help="the engines to run (non-private always runs: it is the baseline)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--profile", choices=list(CASES), help="profile non-private vs dpwa-fast on this case")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="time under glibc's own malloc thresholds, not dpwa's default train.retain_freed_mb")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    engines = ["non-private", *(e for e in a.engines if e != "non-private")]
    torch.set_num_threads(a.threads)
    if a.memory_child:
        memory_child(*a.memory_child, a.images[0])
        return
    allocator = retain_freed_memory(0 if a.glibc_malloc else TrainConfig.retain_freed_mb)  # every engine alike
    if a.profile:
        print(profile(a.profile, a.images[0]))
        return
    header = (f"One step, {a.threads} threads, medians of {a.repeats} interleaved rounds; "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}."
              f"\nTimed under one allocator setting for every engine: {allocator} (dpwa.alloc)."
              f"\nCommand: `python experiments/bench_dp_step.py {shlex.join(sys.argv[1:])}`\n")
    rows = ["| model | images / step | engine | step time (s) | x non-private | peak memory (MB) | x non-private |",
            "|---|---|---|---|---|---|---|"]
    versus = ["| model | images / step | fastest Opacus engine | its step (s) | dpwa-fast step (s) | dpwa-fast faster by |",
              "|---|---|---|---|---|---|"]
    for images in a.images:
        for case in a.cases:
            times = time_case(case, images, a.repeats, engines)
            base_t = statistics.median(times["non-private"])
            base_m = memory(case, "non-private", images, a.threads)
            for engine in engines:
                if engine not in times:
                    rows.append(f"| {case} | {images} | {engine} | n/a ({NO_VIEWS[engine]}) | | | |")
                    continue
                t = statistics.median(times[engine])
                m = base_m if engine == "non-private" else memory(case, engine, images, a.threads)
                rows.append(f"| {case} | {images} | {engine} | {t:.3f} | {t / base_t:.2f} | {m:.0f} | "
                            f"{m / base_m:.2f} |")
                print(rows[-1], flush=True)
            opacus = {e: statistics.median(v) for e, v in times.items() if e.startswith("opacus")}
            if opacus and "dpwa-fast" in times:
                best = min(opacus, key=opacus.get)
                fast = statistics.median(times["dpwa-fast"])
                versus.append(f"| {case} | {images} | {best} | {opacus[best]:.3f} | {fast:.3f} | "
                              f"{opacus[best] / fast:.2f}x |")
    text = header + "\n" + "\n".join(rows) + "\n"
    if len(versus) > 2:
        text += "\ndpwa-fast against the fastest Opacus engine of each row, from the same interleaved timings:\n\n"
        text += "\n".join(versus) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)


if __name__ == "__main__":
    main()
