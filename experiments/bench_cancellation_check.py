#!/usr/bin/env python
"""What dpwa-fast's cancellation check costs (`dpwa.engines.fast.cancels`: each rule's
`terms2`, the squared norm without cancellation between positions, on every step): a whole
DP step with the check against the same step with the dense layers' `terms2` switched off
(in the fast mode: ghost norm's, from its Gram matrices' diagonals; the lean mode's
`DenseRule._terms2` too), and the non-private step, on `bench_dp_step.py`'s cases, interleaved rounds in one process, medians.

    python experiments/bench_cancellation_check.py --out experiments/results/bench_cancellation_check.md
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dpwa.engines import rules  # noqa: E402
from experiments.bench_dp_step import build, make_step  # noqa: E402

CASES = {"cnn_tanh (small CNN)": 256, "WRN-16-4 WS+GN": 64, "WRN-16-4 WS+GN, K=4": 64}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(2)
    with_terms, with_diagonal = rules.DenseRule._terms2, rules._diagonal_terms
    rows = []
    for case, images in CASES.items():
        steps = {}
        for kind in ("non-private", "dpwa-fast", "dpwa-fast, check off"):
            model, views, labels = build(case, images)
            steps[kind] = make_step("non-private" if kind == "non-private" else "dpwa-fast", model, views, labels)
        times: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(a.repeats + 1):  # round 0 warms up; the order flips every round (no order bias)
            for kind, step in (list(steps.items()) if r % 2 else list(steps.items())[::-1]):
                off = kind.endswith("check off")
                rules.DenseRule._terms2 = (lambda self: self.go.new_zeros(self.batch)) if off else with_terms
                rules._diagonal_terms = (lambda a, g: a.new_zeros(a.shape[0])) if off else with_diagonal
                t0 = time.perf_counter()
                step()
                if r:
                    times[kind].append(time.perf_counter() - t0)
        rules.DenseRule._terms2, rules._diagonal_terms = with_terms, with_diagonal
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(f"| {case} | {images} | {med['non-private']:.3f} | {med['dpwa-fast']:.3f} "
                    f"({med['dpwa-fast'] / med['non-private']:.2f}x) | {med['dpwa-fast, check off']:.3f} "
                    f"({med['dpwa-fast, check off'] / med['non-private']:.2f}x) | "
                    f"{med['dpwa-fast'] / med['dpwa-fast, check off']:.3f} |")
        print(rows[-1], flush=True)
    text = (f"Command: `{shlex.join(['python', 'experiments/bench_cancellation_check.py', *sys.argv[1:]])}` "
            f"(torch {torch.__version__}, 2 CPU threads, medians of {a.repeats} interleaved rounds, the order reversed "
            "every other round; seconds per step).\n\n"
            "| case | images | non-private | dpwa-fast | dpwa-fast, check off | with / without the check |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
