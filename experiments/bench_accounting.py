#!/usr/bin/env python
"""Query times of the accounting package: epsilon of a 10-run heterogeneous ledger, and
calibrations, under each accountant. Prints a markdown table (and writes it with --out).

    python experiments/bench_accounting.py --out experiments/results/bench_accounting.md

"first" is the first call in this process, after imports (no RDP curve cached); "median" is
over --repeats later calls (per-mechanism RDP curves and discretised PRV spectra cached, as in
a long-lived process). "CLI" is the wall time of the whole command in a new process, imports
included.

The `dpwa ledger remaining --sigma` row is the README's example (a ledger of 2 committed
runs, budget epsilon 10 at delta 1e-5): the spend so far and the steps still allowed at
sigma 10, q 0.08192, as the verb computes them. Its "first" is timed in a fresh process
after imports (nothing cached), its median by repeating the query there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from accounting import (memo, Ledger, PoissonGaussian, fingerprint, noise_multiplier_for,  # noqa: E402
                        steps_for)

DELTA = 1e-5


def ten_runs(seed: int = 0) -> list[PoissonGaussian]:
    rng = np.random.default_rng(seed)
    return [PoissonGaussian(noise_multiplier=float(s), sample_rate=float(q), steps=int(n))
            for s, q, n in zip(rng.uniform(2, 10, 10), rng.uniform(0.005, 0.08, 10), rng.integers(200, 3000, 10))]


def timed(fn, repeats: int) -> tuple[float, float, object]:
    t = time.perf_counter()
    value = fn()
    first = time.perf_counter() - t
    times = [float("nan")]
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times[1:]) if repeats else float("nan"), value


def cli_time(args: list[str], env: dict, accounting_root: Path | None = None) -> float:
    """Wall time of one `dpwa` command; without the on-disk memo unless `env` names one; with
    the `accounting` package found under `accounting_root` if given (an earlier checkout's)."""
    command = [sys.executable, "-m", "dpwa", *args]
    if accounting_root is not None:
        command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(accounting_root)!r}); "
                   f"sys.argv = ['dpwa', *{args!r}]; from dpwa.cli import main; raise SystemExit(main())"]
    t = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "DPWA_ACCOUNTING_CACHE": "off", **env})
    return time.perf_counter() - t


README_RUNS = [("opacus-baseline", 0.6867, 0.02048, 637), ("wrn16-4-eps1", 10.0, 0.08192, 875)]

REMAINING_PROBE = """
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import dp_accounting.rdp, prv_accountant, scipy.fft, scipy.integrate, scipy.special  # noqa: imports not timed
from accounting import Ledger, steps_for
ledger = Ledger(sys.argv[2], create=False)

def query():
    record = ledger.dataset("cifar10")
    spent = ledger.spent("cifar10")
    n = steps_for(target_epsilon=record.budget_epsilon, delta=record.budget_delta, noise_multiplier=10.0,
                  sample_rate=0.08192, accountant=record.accountant, prior=ledger.counted_events("cifar10"))
    return spent, n

times = []
for _ in range(1 + int(sys.argv[3])):
    t = time.perf_counter()
    spent, n = query()
    times.append(time.perf_counter() - t)
print(json.dumps({"first": times[0], "median": statistics.median(times[1:]) if len(times) > 1 else None,
                  "spent": spent, "steps": n}))
"""


def readme_ledger(path: Path) -> None:
    ledger = Ledger(path)
    ledger.set_budget("cifar10", epsilon=10.0, delta=DELTA, size=50000)
    for run_id, sigma, q, steps in README_RUNS:
        event = PoissonGaussian(noise_multiplier=sigma, sample_rate=q, steps=steps)
        ledger.reserve(run_id=run_id, dataset="cifar10", fingerprint=fingerprint(range(50000)), events=[event])
        ledger.commit(run_id, [event])
    ledger.close()


def remaining_query(package_root: Path, ledger_path: Path, repeats: int) -> dict:
    """The README's `ledger remaining --sigma` query, timed in a fresh process with the
    accounting package found under `package_root`."""
    import json

    out = subprocess.run([sys.executable, "-c", REMAINING_PROBE, str(package_root), str(ledger_path), str(repeats)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    p.add_argument("--before", type=Path,
                   help="a folder holding an earlier `accounting` package (e.g. `git archive HEAD accounting | "
                        "tar -x -C DIR`): time the README's `ledger remaining` query with it too")
    a = p.parse_args()

    import dp_accounting.pld  # noqa: F401  (imports are timed by the CLI column, not here)
    import dp_accounting.rdp  # noqa: F401
    import prv_accountant  # noqa: F401

    runs = ten_runs()
    tmp = Path(tempfile.mkdtemp())
    ledger_path = tmp / "ledger.sqlite"
    ledger = Ledger(ledger_path)
    for i, ev in enumerate(runs):
        ledger.reserve(run_id=f"run{i}", dataset="bench", fingerprint=fingerprint(range(50000)), events=[ev])
    env = {"DPWA_LEDGER": str(ledger_path)}

    rows = []
    for acc in ("prv", "rdp", "pld"):
        first, med, eps = timed(lambda: ledger.spent("bench", delta=DELTA, accountant=acc), a.repeats)
        cli = cli_time(["ledger", "show", "--accountant", acc, "--delta", str(DELTA)], env)
        rows.append(("epsilon of a 10-run heterogeneous ledger", acc, f"{eps:.4f}", first, med, cli))
        first, med, sigma = timed(lambda: noise_multiplier_for(target_epsilon=8.0, delta=DELTA, sample_rate=0.08192,
                                                               steps=2468, accountant=acc), a.repeats)
        cli = cli_time(["budget", "--epsilon", "8", "--delta", str(DELTA), "--sample-rate", "0.08192", "--steps",
                        "2468", "--accountant", acc], env)
        rows.append(("noise for epsilon 8 (q 0.08192, 2468 steps)", acc, f"sigma {sigma:.4f}", first, med, cli))
        first, med, n = timed(lambda: steps_for(target_epsilon=8.0, delta=DELTA, noise_multiplier=3.0,
                                                sample_rate=0.08192, accountant=acc), a.repeats)
        cli = cli_time(["budget", "--epsilon", "8", "--delta", str(DELTA), "--sample-rate", "0.08192", "--sigma",
                        "3", "--accountant", acc], env)
        rows.append(("steps for epsilon 8 (sigma 3, q 0.08192)", acc, f"{n} steps", first, med, cli))

    readme = tmp / "readme.sqlite"
    readme_ledger(readme)
    q = remaining_query(ROOT, readme, a.repeats)
    query_args = ["ledger", "remaining", "--dataset", "cifar10", "--sigma", "10", "--sample-rate", "0.08192"]
    plain = {"DPWA_LEDGER": str(readme)}

    def after_runs(r: int) -> dict:
        """As after the README's runs: their reservations, made by `dpwa train` with the command
        line's memo on, leave the ledger's spend and the mechanisms' RDP curves in the memo; the
        query itself has never run. A fresh ledger and memo for each call."""
        folder = tmp / f"after-runs-{r}"
        folder.mkdir()
        memo.enable(folder / "memo.sqlite")
        try:
            readme_ledger(folder / "ledger.sqlite")
        finally:
            memo.disable()
        return {"DPWA_LEDGER": str(folder / "ledger.sqlite"), "DPWA_ACCOUNTING_CACHE": str(folder / "memo.sqlite")}

    # The README query as a command, each variant a first call, interleaved (the machine
    # drifts) and reported as medians: no memo; the memo as after the runs; an earlier package.
    walls: dict[str, list[float]] = {"none": [], "after-runs": [], "before": []}
    for r in range(max(a.repeats, 1)):
        if a.before:
            walls["before"].append(cli_time(query_args, plain, a.before))
        walls["none"].append(cli_time(query_args, plain))
        env = after_runs(r)
        walls["after-runs"].append(cli_time(query_args, env))
    med = {k: statistics.median(v) if v else float("nan") for k, v in walls.items()}
    n_calls = max(a.repeats, 1)
    rows.append(("`ledger remaining --sigma 10 --sample-rate 0.08192` (README ledger), no memo: spent and steps "
                 f"allowed; CLI wall is the median of {n_calls} first calls",
                 "prv", f"{q['spent']:.5f}; {q['steps']} steps", q["first"], q["median"], med["none"]))
    rows.append(("the same, as after the README's runs (their reservations filled the on-disk memo; the query "
                 f"never ran): median of {n_calls} first calls, interleaved with the row above", "prv",
                 f"{q['steps']} steps", float("nan"), float("nan"), med["after-runs"]))
    cli = cli_time(["ledger", "remaining", "--dataset", "cifar10"], plain)
    rows.append(("`ledger remaining` without --sigma (README ledger): spent only", "prv", f"{q['spent']:.5f}",
                 float("nan"), float("nan"), cli))
    # The command line keeps accountant results on disk (accounting/memo.py): the same query
    # again, once it has run (the memo filled by a first call), costs imports and a lookup.
    memo_env = {**plain, "DPWA_ACCOUNTING_CACHE": str(tmp / "memo.sqlite")}
    cold = cli_time(query_args, memo_env)
    warm = statistics.median(cli_time(query_args, memo_env) for _ in range(n_calls))
    rows.append(("the same `ledger remaining --sigma` with the on-disk memo: CLI wall is the median of "
                 f"{n_calls} repeats after a first call of {cold:.2f} s", "prv",
                 f"{q['steps']} steps", float("nan"), float("nan"), warm))
    before = None
    if a.before:  # the same query with the accounting package of an earlier checkout
        before = remaining_query(a.before, readme, 0)
        before.update(cli_before=med["before"], cli_now=med["none"], pairs=n_calls)

    # prv-accountant's own PRVAccountant on the same ledger (its convolution tree), once:
    # why dpwa composes the discretised PRVs itself.
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    def library_prv() -> float:
        prvs = [PoissonSubsampledGaussianMechanism(noise_multiplier=e.noise_multiplier,
                                                   sampling_probability=e.sample_rate) for e in runs]
        lib = PRVAccountant(prvs=prvs, max_self_compositions=[e.steps for e in runs], eps_error=0.01,
                            delta_error=DELTA / 1000)
        return lib.compute_epsilon(delta=DELTA, num_self_compositions=[e.steps for e in runs])[2]

    first, _, eps = timed(library_prv, 0)
    rows.append(("epsilon of a 10-run heterogeneous ledger", "prv-accountant's PRVAccountant", f"{eps:.4f}",
                 first, float("nan"), float("nan")))

    command = " ".join(["python", "experiments/bench_accounting.py", *sys.argv[1:]])
    lines = [f"Accounting query times ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"python {platform.python_version()}); command: `{command}`", "",
             "| query | accountant | answer | first call (s) | median of later calls (s) | CLI wall, imports incl. (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {q} | {acc} | {ans} | {f:.3f} | {m:.3f} | {c:.2f} |" for q, acc, ans, f, m, c in rows]
    if before is not None:
        lines += ["", f"Before: the README's `ledger remaining --sigma` query with the earlier accounting package "
                      f"in `{a.before}` (fresh process, after imports): {before['first']:.2f} s, "
                      f"{'same answer' if before['steps'] == q['steps'] else 'answer'} "
                      f"({before['spent']:.5f}; {before['steps']} steps).",
                  "", f"As a command, no memo, interleaved ({before['pairs']} pairs, medians): before "
                      f"{before['cli_before']:.2f} s, now {before['cli_now']:.2f} s "
                      f"({before['cli_before'] / before['cli_now']:.2f}x)."]
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
