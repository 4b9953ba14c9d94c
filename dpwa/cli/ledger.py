"""`dpwa ledger`: what every private run has spent on each dataset, and budgets.

The ledger file is `--ledger PATH`, else `$DPWA_LEDGER`, else `~/.dpwa/ledger.sqlite`.
Epsilons are recomputed from the stored mechanism events at `--delta`, else the dataset's
budget delta, else (no budget) the delta its runs recorded, else 1/(10N) for N examples,
labelled as a display default; with the dataset's accountant (or `--accountant`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from accounting import accountants, calibrate
from accounting.errors import AccountantFailedError, InvalidParameterError, LedgerError
from accounting.events import Event, Gaussian, PoissonGaussian
from accounting.ledger import TIMEOUT_ENV, Ledger, RunRecord, check_delta_below_1_over_n, fingerprint_size

from ._format import fmt, print_json, print_table

EXAMPLES = """examples:
  dpwa ledger set-budget --dataset cifar10 --epsilon 8 --delta 1e-5 --dataset-size 50000
  dpwa ledger show
  dpwa ledger show --dataset cifar10 --json
  dpwa ledger history --dataset cifar10 --plot cifar10-spend.png   # cumulative spend, run by run
  dpwa ledger remaining --dataset cifar10
  dpwa ledger remaining --dataset cifar10 --sigma 3 --sample-rate 0.08192   # steps still allowed
  dpwa ledger record --dataset cifar10 --labels train.npz --run-id opacus-1 --sigma 1.1 --sample-rate 0.02 --steps 600
  dpwa ledger release RUN_ID --reason "crashed before the first step"
  dpwa ledger export --output ledger.json
"""

DELTA_HELP = ("report epsilon at this delta (default: the budget's; without a budget, the delta its runs "
              "recorded, else 1/(10N))")


def add_parser(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", type=_ledger_path, default=None,
                        help="ledger file (default: $DPWA_LEDGER or ~/.dpwa/ledger.sqlite)")
    common.add_argument("--lock-timeout", type=float, default=None,
                        help=f"seconds to wait for another process's lock (default: ${TIMEOUT_ENV} or 30)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("ledger", help="privacy spent per dataset; budgets; releasing reservations",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="ledger_verb", metavar="ACTION", parser_class=type(p))
    verbs.required = True

    show = verbs.add_parser("show", parents=[common], help="datasets, their spend and their runs",
                            epilog="example: dpwa ledger show --dataset cifar10")
    show.add_argument("--dataset", help="only this dataset (a name or an alias)")
    show.add_argument("--delta", type=float, help=DELTA_HELP)
    show.add_argument("--accountant", choices=sorted(accountants.ACCOUNTANTS),
                      help="accountant (default: the dataset's)")
    show.set_defaults(run=_show)

    hist = verbs.add_parser(
        "history", parents=[common], help="a dataset's spend over time: cumulative epsilon after each run",
        epilog="example: dpwa ledger history --dataset cifar10 --plot cifar10-spend.png")
    hist.add_argument("--dataset", required=True, help="the dataset (a name or an alias)")
    hist.add_argument("--delta", type=float, help=DELTA_HELP)
    hist.add_argument("--accountant", choices=sorted(accountants.ACCOUNTANTS),
                      help="accountant (default: the dataset's)")
    hist.add_argument("--plot", type=Path, metavar="PNG",
                      help="also draw cumulative epsilon against the runs' reservation times to this PNG "
                           "(needs matplotlib)")
    hist.set_defaults(run=_history)

    sb = verbs.add_parser("set-budget", parents=[common], help="set a dataset's (epsilon, delta) budget",
                          epilog="example: dpwa ledger set-budget --dataset cifar10 --epsilon 8 --delta 1e-5")
    sb.add_argument("--dataset", required=True, help="the dataset (a name or an alias); created if new")
    sb.add_argument("--epsilon", type=float, required=True, help="budget epsilon, > 0")
    sb.add_argument("--delta", type=float, required=True, help="budget delta, below 1/N")
    sb.add_argument("--accountant", default=accountants.DEFAULT_ACCOUNTANT, choices=sorted(accountants.ACCOUNTANTS),
                    help="accountant that enforces the budget (default: %(default)s)")
    sb.add_argument("--dataset-size", type=int, help="number of examples (to check delta < 1/N)")
    sb.add_argument("--force", action="store_true", help="set a budget below what is already spent")
    sb.add_argument("--accept-delta-above-1-over-n", action="store_true",
                    help="accept a delta >= 1/N, which allows releasing whole examples (refused without it)")
    sb.set_defaults(run=_set_budget)

    rem = verbs.add_parser("remaining", parents=[common], help="budget left on a dataset",
                           epilog="example: dpwa ledger remaining --dataset cifar10 --sigma 3 --sample-rate 0.08192")
    rem.add_argument("--dataset", required=True, help="the dataset (a name or an alias); it needs a budget")
    rem.add_argument("--sigma", "--noise-multiplier", dest="sigma", type=float,
                     help="with --sample-rate: how many more DP-SGD steps the budget allows")
    rem.add_argument("--sample-rate", type=float, help="with --sigma: the Poisson sample rate q in (0, 1]")
    rem.set_defaults(run=_remaining)

    ex = verbs.add_parser("export", parents=[common], help="the whole ledger as JSON",
                          epilog="example: dpwa ledger export --output ledger.json")
    ex.add_argument("--output", type=Path, help="write to this file instead of stdout")
    ex.set_defaults(run=_export)

    rec = verbs.add_parser(
        "record", parents=[common], help="charge a run made outside dpwa (e.g. plain Opacus)",
        epilog="example: dpwa ledger record --dataset cifar10 --labels train.npz --run-id opacus-baseline "
               "--sigma 1.1 --sample-rate 0.02048 --steps 635")
    rec.add_argument("--dataset", required=True, help="the dataset the run trained on (a name or an alias)")
    fp = rec.add_mutually_exclusive_group(required=True)
    fp.add_argument("--labels", type=Path, help=".npz (array 'y') or .npy file of the dataset's labels, in order")
    fp.add_argument("--fingerprint", help="the dataset's fingerprint, as `dpwa ledger show` prints it for this ledger "
                                           "(a keyed one from another ledger is refused)")
    rec.add_argument("--run-id", required=True, help="a new, unique id for the run")
    rec.add_argument("--sigma", "--noise-multiplier", dest="sigma", type=float, required=True,
                     help="the run's noise multiplier")
    rec.add_argument("--sample-rate", type=float, required=True, help="the run's Poisson sample rate q in (0, 1]")
    rec.add_argument("--steps", type=int, required=True, help="the number of DP-SGD steps the run took")
    rec.add_argument("--delta", type=float,
                     help="the delta the run reports its epsilon at (recorded; `show` uses it without a budget); "
                          "refused at or above 1/N when N is known")
    rec.add_argument("--accept-delta-above-1-over-n", action="store_true",
                     help="accept a --delta at or above 1/N (it allows releasing whole examples)")
    rec.set_defaults(run=_record)

    rel = verbs.add_parser("release", parents=[common], help="give back a reservation that will not be used",
                           epilog='example: dpwa ledger release 20261125-cifar10-a1b2 --reason "OOM before step 1"')
    rel.add_argument("run_id", help="the reserved run to release (as `dpwa ledger show` lists it)")
    rel.add_argument("--reason", required=True, help="why (kept in the ledger)")
    rel.set_defaults(run=_release)


def _ledger_path(text: str) -> Path:
    if not text.strip():  # Path("") is ".", the working folder: say what is wrong instead
        raise argparse.ArgumentTypeError("--ledger is empty; give a file path")
    return Path(text)


def _open(a: argparse.Namespace, *, create: bool) -> Ledger:
    return Ledger(a.ledger, timeout=a.lock_timeout, create=create)


def _describe(events: tuple[Event, ...] | list[Event]) -> str:
    parts = []
    for e in events:
        if isinstance(e, PoissonGaussian):
            parts.append(f"{e.steps} steps @ sigma {fmt(float(e.noise_multiplier))}, q {fmt(float(e.sample_rate))}")
        elif isinstance(e, Gaussian):
            parts.append(f"{e.count} x gaussian @ sigma {fmt(float(e.noise_multiplier))}")
    return "; ".join(parts) or "nothing"


#: How `show` and `history` label the delta they report at (see `Ledger.reporting_delta`).
DELTA_SOURCES = {
    "given": "from --delta",
    "budget": "the budget's",
    "runs": "the delta its runs recorded, no budget set",
    "default": "1/(10N), a display default: no budget, no run recorded its delta",
}


def _delta_label(delta: float | None, source: str) -> str:
    if delta is None:
        return "-"
    return f"{fmt(delta)} ({DELTA_SOURCES[source]})"


def _dataset_summary(ledger: Ledger, name: str, delta: float | None, accountant: str | None
                     ) -> tuple[dict, list[RunRecord]]:
    record = ledger.dataset(name)
    d, source = ledger.reporting_delta(name, delta)
    acc = accountant or record.accountant
    runs = ledger.runs(name)
    failed = None

    def epsilon_of(compute):  # an accountant that cannot compose one dataset's events fails its line only
        nonlocal failed
        try:
            return compute() if d is not None else None
        except AccountantFailedError as e:
            failed = str(e)
            return None

    spent = epsilon_of(lambda: ledger.spent(name, delta=d, accountant=acc))
    remaining = None
    if record.budget_epsilon is not None and spent is not None and (d, acc) == (record.budget_delta,
                                                                                record.accountant):
        remaining = max(record.budget_epsilon - spent, 0.0)
    summary = {**record.to_dict(), "fingerprint": ledger.shown(record.fingerprint), "delta_reported": d,
               "delta_source": source if d is not None else None, "accountant_reported": acc, "epsilon_spent": spent, "epsilon_remaining": remaining, "runs": [
                   {**r.to_dict(), "epsilon_counted": epsilon_of(lambda r=r: accountants.epsilon(
                       r.counted, delta=d, accountant=acc))} for r in runs]}
    summary["epsilon_error"] = failed
    return summary, runs


def _show(a: argparse.Namespace) -> int:
    if a.delta is not None:
        accountants.check_delta(a.delta)
    ledger = _open(a, create=False)
    names = [a.dataset] if a.dataset is not None else [d.name for d in ledger.datasets()]
    shown = [_dataset_summary(ledger, n, a.delta, a.accountant) for n in names]
    if a.json:
        print_json({"ledger": str(ledger.path), "datasets": [s for s, _ in shown]})
        return 0
    if not shown:  # a mistyped --ledger / $DPWA_LEDGER must not read as an empty ledger
        print(f"ledger {ledger.path}: no datasets yet" if ledger.exists else
              f"no ledger at {ledger.path} (nothing recorded there yet; is --ledger / $DPWA_LEDGER the one meant?)")
        return 0
    print(f"ledger {ledger.path}")
    for s, runs in shown:
        budget = (f"epsilon {fmt(s['budget_epsilon'])} at delta {fmt(s['budget_delta'])}"
                  if s["budget_epsilon"] is not None else "none")
        if s["epsilon_spent"] is not None:
            spent = f"epsilon {fmt(s['epsilon_spent'])} at delta {fmt(s['delta_reported'])} ({s['accountant_reported']})"
            if s["delta_source"] not in ("budget", "given"):
                spent += f"; delta: {DELTA_SOURCES[s['delta_source']]}"
        elif s["epsilon_error"]:
            spent = f"cannot be computed at delta {fmt(s['delta_reported'])} ({s['accountant_reported']}): " \
                    f"{s['epsilon_error']}"
        else:
            spent = f"{len(runs)} run(s) recorded; epsilon needs a delta: pass --delta (no budget, run delta or size)"
        print()
        print_table([("dataset", s["name"]), ("also named", ", ".join(s["aliases"]) or "-"),
                     ("fingerprint", s["fingerprint"] or "-"), ("size", fmt(s["size"])),
                     ("budget", budget), ("spent", spent), ("remaining", fmt(s["epsilon_remaining"]))])
        if runs:
            print()
            print_table([(r.run_id, r.status, fmt(row["epsilon_counted"]), _describe(r.counted),
                          r.created_at[:19].replace("T", " "), r.reason or "")
                         for r, row in zip(runs, s["runs"])],
                        header=("run", "status", "epsilon", "counted", "created (UTC)", "reason"))
    return 0


def _history(a: argparse.Namespace) -> int:
    if a.delta is not None:
        accountants.check_delta(a.delta)
    if a.plot is not None and a.plot.suffix.lower() != ".png":
        raise InvalidParameterError(f"--plot writes a PNG; give a file name ending in .png, got {str(a.plot)!r}")
    ledger = _open(a, create=False)
    record = ledger.dataset(a.dataset)
    d, source = ledger.reporting_delta(a.dataset, a.delta)
    if d is None:
        raise InvalidParameterError(f"Dataset {record.name!r} has no budget, its runs recorded no delta and its "
                                    "size is unknown: pass --delta")
    acc = a.accountant or record.accountant
    rows = ledger.history(a.dataset, delta=d, accountant=acc)
    budget = record.budget_epsilon if record.budget_delta == d else None
    result = {"dataset": record.name, "delta": d, "delta_source": source, "accountant": acc,
              "budget_epsilon": record.budget_epsilon, "budget_delta": record.budget_delta,
              "runs": [{"run_id": r.run_id, "status": r.status, "created_at": r.created_at,
                        "counted": [e.to_dict() for e in r.counted], "epsilon_run": alone,
                        "epsilon_cumulative": total} for r, alone, total in rows]}
    if a.plot is not None:
        _plot_history(a.plot, record.name, rows, d, source, acc, budget)
        result["plot"] = str(a.plot)
    if a.json:
        print_json(result)
        return 0
    print_table([("dataset", record.name), ("delta", _delta_label(d, source)), ("accountant", acc),
                 ("budget", f"epsilon {fmt(record.budget_epsilon)} at delta {fmt(record.budget_delta)}"
                  if record.budget_epsilon is not None else "none")])
    print()
    if not rows:
        print("no runs yet")
    else:
        print_table([(str(i), r.run_id, r.status, r.created_at[:19].replace("T", " "), _describe(r.counted),
                      fmt(alone), fmt(total)) for i, (r, alone, total) in enumerate(rows, 1)],
                    header=("#", "run", "status", "created (UTC)", "counted", "epsilon (run)", "epsilon (so far)"))
    if a.plot is not None:
        print(f"\nwrote {a.plot}", file=sys.stderr)
    return 0


def _plot_history(path: Path, name: str, rows: list, delta: float, source: str, accountant: str,
                  budget: float | None) -> None:
    """Cumulative epsilon against reservation time, one marker per run (hollow: still reserved,
    counted in full). matplotlib is imported here only: `dpwa ledger` and the accounting
    package do not need it."""
    import datetime as dt

    try:
        import matplotlib
    except ImportError:
        raise InvalidParameterError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    times = [dt.datetime.fromisoformat(r.created_at) for r, _, _ in rows]
    totals = [total for _, _, total in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    if rows:
        ax.step([times[0], *times], [0.0, *totals], where="post", color="C0", lw=1.5)
        for (r, _, total), t in zip(rows, times):
            reserved = r.status == "reserved"
            ax.plot([t], [total], "o", color="C0", mfc="white" if reserved else "C0", ms=6)
            if len(rows) <= 20:
                ax.annotate(r.run_id, (t, total), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if budget is not None:
        ax.axhline(budget, color="C3", ls="--", lw=1, label=f"budget epsilon {fmt(budget)}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("run reserved at (UTC)")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title(f"{name}: spend run by run ({accountant}, delta {fmt(delta)}: {DELTA_SOURCES[source]})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise LedgerError(f"Cannot write {path}: {e}") from None
    finally:
        plt.close(fig)


def _set_budget(a: argparse.Namespace) -> int:
    # Validate before opening (and so before creating) the ledger file.
    accountants.check_delta(a.delta)
    calibrate.check_target_epsilon(a.epsilon)
    ledger = _open(a, create=True)
    record = ledger.set_budget(a.dataset, epsilon=a.epsilon, delta=a.delta, accountant=a.accountant,
                               size=a.dataset_size, force=a.force,
                               accept_delta_above_1_over_n=a.accept_delta_above_1_over_n,
                               accept_hint="--accept-delta-above-1-over-n")
    if a.json:
        print_json(record.to_dict())
    else:
        print(f"budget of {record.name!r}: epsilon {fmt(record.budget_epsilon)} at delta "
              f"{fmt(record.budget_delta)} ({record.accountant}); ledger {ledger.path}")
    return 0


def _remaining(a: argparse.Namespace) -> int:
    if (a.sigma is None) != (a.sample_rate is None):
        raise InvalidParameterError("--sigma and --sample-rate go together")
    if a.sigma is not None:
        PoissonGaussian(noise_multiplier=a.sigma, sample_rate=a.sample_rate, steps=0)  # validates
    ledger = _open(a, create=False)
    record = ledger.dataset(a.dataset)
    if record.budget_epsilon is None:
        raise LedgerError(f"Dataset {a.dataset!r} has no budget; set one with `dpwa ledger set-budget`")
    spent = ledger.spent(a.dataset)  # at the budget's delta, with the budget's accountant
    result = {"dataset": record.name, "budget_epsilon": record.budget_epsilon, "budget_delta": record.budget_delta,
              "accountant": record.accountant, "epsilon_spent": spent,
              "epsilon_remaining": max(record.budget_epsilon - spent, 0.0)}
    if a.sigma is not None:
        result["noise_multiplier"] = a.sigma
        result["sample_rate"] = a.sample_rate
        result["steps_allowed"] = calibrate.steps_for(
            target_epsilon=record.budget_epsilon, delta=record.budget_delta, noise_multiplier=a.sigma,
            sample_rate=a.sample_rate, accountant=record.accountant, prior=ledger.counted_events(a.dataset))
    if a.json:
        print_json(result)
        return 0
    rows = [("dataset", record.name),
            ("budget", f"epsilon {fmt(record.budget_epsilon)} at delta {fmt(record.budget_delta)} ({record.accountant})"),
            ("spent", fmt(spent)), ("remaining", fmt(result["epsilon_remaining"]))]
    if a.sigma is not None:
        rows.append(("steps allowed", f"{result['steps_allowed']} at sigma {fmt(a.sigma)}, q {fmt(a.sample_rate)}"))
    print_table(rows)
    return 0


def _export(a: argparse.Namespace) -> int:
    ledger = _open(a, create=False)
    data = ledger.export()
    if a.output is None:
        print_json(data)
        return 0
    if a.output.is_dir():
        raise LedgerError(f"Cannot write {a.output}: it is a folder; name a file (--output {a.output}/ledger.json)")
    tmp = a.output.with_name(a.output.name + ".tmp")  # as dpwa.checkpoint.atomic_write_text, which imports torch
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, a.output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LedgerError(f"Cannot write {a.output}: {e}") from None
    if not a.json:
        print(f"wrote {sum(len(d['runs']) for d in data['datasets'])} runs on {len(data['datasets'])} "
              f"datasets to {a.output}", file=sys.stderr)
    return 0


def _labels(path: Path) -> list[int]:
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
        labels = data["y"] if isinstance(data, np.lib.npyio.NpzFile) else data
        return [int(v) for v in np.asarray(labels).reshape(-1)]
    except (OSError, ValueError, KeyError) as e:
        raise InvalidParameterError(f"Cannot read labels from {path}: {e}") from None


def _recorded_size(a: argparse.Namespace) -> int | None:
    """N of the data `--fingerprint` names (its `n{N}-` prefix), else of `--dataset` as the
    ledger knows it (None: neither says)."""
    size = fingerprint_size(a.fingerprint or "")
    if size is not None:
        return size
    with _open(a, create=False) as known:
        try:
            return known.dataset(a.dataset).size
        except LedgerError:
            return None


def _record(a: argparse.Namespace) -> int:
    from accounting.ledger import fingerprint

    event = PoissonGaussian(noise_multiplier=a.sigma, sample_rate=a.sample_rate, steps=a.steps)  # validates
    labels = _labels(a.labels) if a.labels is not None else None
    fp = fingerprint(labels) if labels is not None else a.fingerprint
    if a.delta is not None:  # all checks before the ledger file is opened (or made)
        accountants.check_delta(a.delta)
        size = len(labels) if labels is not None else _recorded_size(a)
        if size:
            check_delta_below_1_over_n(a.delta, size, what="--delta", accept=a.accept_delta_above_1_over_n,
                                       accept_hint="--accept-delta-above-1-over-n")
    ledger = _open(a, create=True)
    ledger.reserve(run_id=a.run_id, dataset=a.dataset, fingerprint=fp, events=[event],
                   config_hash="external", size=len(labels) if labels is not None else None, delta=a.delta)
    run = ledger.commit(a.run_id, [event])
    if a.json:
        print_json(run.to_dict())
    else:
        print(f"recorded {run.run_id!r} on {run.dataset!r}: {_describe(run.spent)}")
    return 0


def _release(a: argparse.Namespace) -> int:
    ledger = _open(a, create=False)
    if not ledger.exists:  # releasing must not create an empty ledger file
        raise LedgerError(f"No ledger at {ledger.path}")
    run = ledger.release(a.run_id, reason=a.reason)
    if a.json:
        print_json(run.to_dict())
    else:
        print(f"released {run.run_id!r} on {run.dataset!r}: it now counts {_describe(run.spent)}"
              + ("" if not run.spent else " (what its checkpoints recorded; a `dpwa train` still running on it "
                 "stops at its next checkpoint, before writing anything, and can no longer be resumed)"))
    return 0
