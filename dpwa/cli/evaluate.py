"""`dpwa eval RUN_DIR [--data test|val]`: accuracy, NLL, ECE and Brier score of the last
iterate and of every average and ensemble a run kept (EMA, Polyak, SWA, FGE, SWAG,
SWAG-diagonal, the tickets of EDST / Sup-tickets, Sup-tickets' pruned superposition, periodic
SWA's average since its last restart); writes
RUN_DIR/eval.json and a reliability diagram RUN_DIR/reliability.png.

On the test split evaluation is post-processing of the released iterates: it charges
nothing, and the private training split is withheld from it (any read raises). The
validation split of a private run was carved from its private data: there each method's
accuracy is released as a noisy count (std --val-noise; default the run's train.val_noise,
or 0.01 where that is 0), charged to the run's ledger as a query of its own, and nothing
else is computed; only --val-noise 0 gives exact metrics, outside the DP guarantee (warned). It reads the run's last
checkpoint, so a run still in progress is evaluated as of that checkpoint.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ._format import print_json, run_header

EXAMPLES = """examples:
  dpwa eval runs/cifar10-swa-cpu-eps8-20261125-101500-ab12
  dpwa eval RUN_DIR --methods raw swa swag --swag-samples 10
  dpwa eval RUN_DIR --data val      # needs data.val_size > 0 in the run's config; charged
  dpwa eval RUN_DIR --data val --val-noise 0.005 --methods ema   # less noise, one release
  dpwa eval RUN_DIR --test-time-flip  # also average the mirror images' predictions
"""

# dpwa.averaging.METHODS, repeated here: importing it would pull torch into every verb's start-up.
METHODS = ("raw", "ema", "polyak", "swa", "fge", "swag", "swag_diag", "tickets", "suptickets", "pswa")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run's last iterate, averages and ensembles", description=__doc__,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder of dpwa train")
    p.add_argument("--data", choices=("test", "val"), default="test",
                   help="split to evaluate on (never the private training split)")
    p.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                   help=f"only these ({', '.join(METHODS)}); default: all the run kept")
    p.add_argument("--swag-samples", type=int, help="models drawn for SWAG (default: averaging.swag_samples)")
    p.add_argument("--test-time-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average each image's and its mirror image's softmax (default: the run's "
                        "data.test_time_flip); free, as all evaluation")
    p.add_argument("--val-noise", type=float, metavar="S",
                   help="--data val on a private run: std of each released accuracy (default: the run's "
                        "train.val_noise, or 0.01 where that is 0); 0: exact metrics, outside the DP guarantee")
    p.add_argument("--ledger", help="ledger of a charged --data val query (default: the run's own, from run.json)")
    p.add_argument("--json", action="store_true", help="print eval.json")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> int:
    from accounting.errors import InvalidParameterError

    from dpwa.evaluate_run import evaluate_run

    if a.swag_samples is not None and a.swag_samples < 1:
        raise InvalidParameterError(f"--swag-samples must be >= 1, got {a.swag_samples}")
    if a.data != "val" and (a.val_noise is not None or a.ledger is not None):
        raise InvalidParameterError("--val-noise and --ledger go with --data val (the test split charges nothing)")
    if a.val_noise is not None and not (math.isfinite(a.val_noise) and a.val_noise >= 0):
        raise InvalidParameterError(f"--val-noise must be a finite number >= 0, got {a.val_noise}")
    result = evaluate_run(a.run_dir, split=a.data, methods=a.methods, swag_samples=a.swag_samples,
                          test_time_flip=a.test_time_flip, val_noise=a.val_noise, ledger_path=a.ledger)
    if a.json:
        print_json(result)
        return 0
    mirror = " and their mirror images" if result["test_time_flip"] else ""
    print(run_header(result, f"{result['examples']} examples{mirror}:"))
    c = result["charged"]
    if c:  # noisy accuracies alone
        print(f"  charged: query {c['query_run_id']} on dataset {c['dataset']!r} in {c['ledger']}: "
              f"Gaussian(noise_multiplier={c['noise_multiplier']:g}, count={c['events'][0]['count']}), noise std "
              f"of each accuracy {100 * c['noise']:g} points")
        print(f"  {'method':<10} {'members':>7} {'accuracy':>9}")
        for name, r in result["methods"].items():
            print(f"  {name:<10} {r['members']:>7} {100 * r['accuracy']:>8.2f}%")
        print(f"  wrote {result['eval_json']}")
        return 0
    film = any("member_disagreement" in r for r in result["methods"].values())
    extra = f" {'member acc':>10} {'disagree':>8}" if film else ""
    print(f"  {'method':<10} {'members':>7} {'accuracy':>9} {'NLL':>7} {'ECE':>7} {'Brier':>7}{extra}")
    for name, r in result["methods"].items():
        tail = (f" {100 * r['member_accuracy']:>9.2f}% {100 * r['member_disagreement']:>7.2f}%"
                if "member_disagreement" in r else "")
        print(f"  {name:<10} {r['members']:>7} {100 * r['accuracy']:>8.2f}% {r['nll']:>7.4f} "
              f"{100 * r['ece']:>6.2f}% {r['brier']:>7.4f}{tail}")
    if film:  # an implicit ensemble: its members' accuracy (mean) and disagreement (pairs)
        print("  (FiLM-Ensemble: accuracy of the members' mean softmax; member acc: their mean accuracy; "
              "disagree: examples two members predict differently, mean over pairs)")
    print(f"  wrote {result['eval_json']} and {result['reliability_diagram']}")
    return 0
