#!/usr/bin/env python
"""What each of dpwa-fast's per-layer options costs for one conv layer: per-example squared
norms plus the clipped sum, as a multiple of the layer's dense weight gradient (the work a
non-private backward does for it), on the conv shapes of WRN-16-4 and the tanh CNN. Prints a
markdown table; `dpwa.engines.rules` fits its cost model (`_GRAM_MATMUL`, `_GRAM_ENTRY`,
`_grouped_slowdown`, `_shifted_slowdown`, `_unfolded_slowdown`) to these numbers.

    python experiments/bench_layer_rules.py --out experiments/results/bench_layer_rules.md

Each option runs as dpwa-fast runs it on a CPU: instantiated per-example gradients on chunks of
examples whose tensors fit the cache, ghost norm on the whole batch (`dpwa.engines.fast.cache_chunk`). Options: ghost (ghost norm, book-kept sum: it includes one dense weight gradient), grouped
(per-example gradients as one convolution grouped by example), shifted (one GEMM per kernel
offset; stride-1 or 1x1 convs), unfolded (one batched matmul with the unfolded patches). The layer is a weight-standardised conv (WSConv2d). Times are
medians of --repeats interleaved rounds in one process.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import dpwa.engines.rules as rules  # noqa: E402
from dpwa.engines.fast import cache_chunk, even_chunks  # noqa: E402
from dpwa.alloc import retain_freed_memory  # noqa: E402
from dpwa.config import TrainConfig  # noqa: E402
from dpwa.models.ws import WSConv2d  # noqa: E402

#: (examples B, views K, input channels, output channels, input pixels per side, stride, kernel)
SHAPES = [
    (256, 1, 32, 32, 32, 1, 3), (256, 1, 32, 64, 16, 1, 3), (256, 1, 64, 64, 16, 1, 3), (256, 1, 64, 128, 8, 1, 3),
    (256, 1, 128, 128, 8, 1, 3), (256, 1, 64, 64, 32, 1, 3), (256, 1, 128, 128, 16, 1, 3), (256, 1, 256, 256, 8, 1, 3),
    (256, 1, 64, 128, 32, 2, 3), (256, 1, 128, 256, 16, 2, 1),
    (64, 1, 64, 64, 32, 1, 3), (64, 1, 128, 128, 16, 1, 3), (64, 1, 256, 256, 8, 1, 3),
    (16, 4, 64, 64, 32, 1, 3), (16, 4, 128, 128, 16, 1, 3), (16, 4, 256, 256, 8, 1, 3),
    # first layers (3 input channels: the tanh CNN's, WRN-16-4's stem) and WRN-16-4's first block (16 inputs)
    (256, 1, 3, 32, 32, 1, 3), (64, 1, 3, 16, 32, 1, 3), (16, 4, 3, 16, 32, 1, 3),
    (256, 1, 16, 64, 32, 1, 3), (64, 1, 16, 64, 32, 1, 3), (16, 4, 16, 64, 32, 1, 3), (64, 1, 16, 64, 32, 1, 1),
]
KINDS = ("grouped", "shifted", "unfolded")  # the instantiating options, each forced by its slowdown function


def _rule(layer, x, out, go, batch: int, mode: str):
    """The layer's rule as dpwa-fast runs it on a CPU: on chunks of examples sized to the cache
    (`dpwa.engines.fast.cache_chunk`: ghost norm's on the whole batch); returns (the rule,
    examples per chunk)."""
    k, shared = x.shape[0] // batch, {}  # the chunks share the standardised weight, as in a step

    def rule(i: int, j: int):
        return rules.DenseRule(rules.Record(layer, x[i * k:j * k], out[i * k:j * k], 0, shared=shared),
                               go[i * k:j * k], j - i, mode, rules.layer_of(layer))
    bounds = even_chunks(batch, cache_chunk(rule(0, 1), x[:k], go[:k]))
    return rules.Chunks([rule(i, j) for i, j in bounds], [j - i for i, j in bounds]), bounds[0][1]


def _run(layer, x, out, go, batch: int, kind: str) -> tuple[str, int]:
    """One option's norms and clipped sum; returns what the cost model would choose, and the
    examples per chunk."""
    saved = {f"_{name}_slowdown": getattr(rules, f"_{name}_slowdown") for name in KINDS}
    if kind in KINDS:
        for name in KINDS:
            setattr(rules, f"_{name}_slowdown", (lambda *a: 0.0) if name == kind else (lambda *a: float("inf")))
    try:
        mode = {"ghost": "ghost", "auto": "auto"}.get(kind, "instantiate")
        rule, chunk = _rule(layer, x, out, go, batch, mode)
        rule.norms2()
        rule.clipped_sum(torch.rand(batch))
    finally:
        for name, f in saved.items():
            setattr(rules, name, f)
    first = rule.rules[0]
    return first.how, chunk


def bench(shape: tuple, repeats: int) -> str:
    b, k, c, o, h, s, kernel = shape
    torch.manual_seed(0)
    layer = WSConv2d(c, o, kernel, stride=s, padding=kernel // 2)
    x = torch.randn(b * k, c, h, h)
    with torch.no_grad():
        out = layer(x)
    go = torch.randn_like(out)
    kinds = ["ghost", "grouped"] + (["shifted"] if s == 1 or kernel == 1 else []) + ["unfolded"]
    fns = {"dense": lambda: torch.nn.grad.conv2d_weight(x, layer.weight.shape, go, stride=s, padding=kernel // 2)}
    fns |= {kind: (lambda kind=kind: _run(layer, x, out, go, b, kind)) for kind in kinds}
    for f in fns.values():
        f()  # warm-up
    times: dict[str, list[float]] = {kind: [] for kind in fns}
    for r in range(repeats):
        order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for kind in order:
            t0 = time.perf_counter()
            fns[kind]()
            times[kind].append(time.perf_counter() - t0)
    base = statistics.median(times["dense"])
    ratio = {kind: statistics.median(times[kind]) / base for kind in kinds}
    chosen, chunk = _run(layer, x, out, go, b, "auto")
    best = min(ratio, key=ratio.get)
    cells = " | ".join(f"{ratio[kind]:.2f}" if kind in ratio else "n/a" for kind in ("ghost", *KINDS))
    return (f"| {b} | {k} | {c} -> {o} | {h}x{h} | {s} | {kernel}x{kernel} | {base * 1e3:.0f} | {cells} | {chosen} | {chunk} | "
            f"{ratio[chosen] / ratio[best]:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", type=int, nargs="*", help="indices into SHAPES (default: all)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    retain_freed_memory(TrainConfig.retain_freed_mb)  # as `dpwa train` and bench_dp_step.py run
    shapes = SHAPES if a.shapes is None else [SHAPES[i] for i in a.shapes]
    lines = [f"Per-layer cost of dpwa-fast's options, {a.threads} threads, medians of {a.repeats} interleaved rounds; "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
             f"Command: `python experiments/bench_layer_rules.py {shlex.join(sys.argv[1:])}`", "",
             "Norms plus clipped sum as multiples of the layer's dense weight gradient (ghost includes its book-kept "
             "weight gradient, 1.00), each option run as dpwa-fast runs it on a CPU: instantiated on chunks of examples sized to "
             "the cache, ghost norm on the whole batch; the dense weight gradient is the non-private backward's, on all B examples at once. "
             "*chosen* is what the cost model in `dpwa.engines.rules` picks, *chunk* its examples per chunk, "
             "*x best* its time over the fastest option's.", "",
             "| B | K | channels | input | stride | kernel | dense (ms) | ghost | grouped | shifted | unfolded | chosen | chunk | x best |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for shape in shapes:
        lines.append(bench(shape, a.repeats))
        print(lines[-1], flush=True)
    if a.out:
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
