"""`dpwa curve ENDPOINT_A ENDPOINT_B [key=value ...]`: train a mode-connecting curve (Bezier or
PolyChain, Garipov et al. 2018) between two released runs under DP, then evaluate it;
`dpwa curve --eval RUN_DIR` evaluates a curve run again.

The curve run is a private run of its own (`method.name=curve`): its config is endpoint A's
(data, model, privacy, optimizer, run length) with the curve on top and the overrides after
that; it is planned, reserved and committed like `dpwa train`, under the endpoints' dataset,
in the ledger that holds their runs (or --ledger; refused if it does not hold them), so the
dataset's spend composes the endpoints and the curve. Each step releases one noisy gradient
at a point w(t) of the curve (t public), so the curve costs what DP-SGD of the same length
costs. The endpoints cost nothing more: two models of one run (--endpoint-model raw ema)
were paid by that run, two independent runs each paid its own way. Endpoints of another
dataset, data or model config are refused before anything is reserved (exit 2).

The evaluation is free (released weights on the public test split): test error, NLL, ECE
along t for the curve and the segment, their barriers, the curve's ensemble against the
endpoints', and the error on the plane through the endpoints and the middle bend. It writes
curve_eval.json, curve_error.png and curve_plane.png into the curve's run folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._format import print_json

EXAMPLES = """examples:
  dpwa curve runs/cifar10-a runs/cifar10-b                        Bezier, 1 bend, A's config
  dpwa curve runs/A runs/B --type polychain --bends 3 optim.lr=8 train.epochs=20
  dpwa curve runs/A runs/A --endpoint-model raw ema               two models of one run
  dpwa curve runs/A runs/B --dry-run                              what the curve would spend
  dpwa curve --eval runs/cifar10-a-bezier-20261125-101500-ab12 --plane-points 11
"""

# dpwa.config.ENDPOINT_MODELS and dpwa.methods.curve.CURVES, repeated: importing them would pull torch in.
ENDPOINT_MODELS = ("raw", "ema", "polyak", "swa")
TYPES = ("bezier", "polychain")


class _EndpointModels(argparse.Action):
    """--endpoint-model MODEL [MODEL]: the key=value overrides that follow it (`--endpoint-model
    raw ema train.steps=4`, as the synopsis orders them) go back to the overrides, not to it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        models = [v for v in values if "=" not in v]
        bad = [v for v in models if v not in ENDPOINT_MODELS]
        if bad or not models:
            parser.error(f"argument --endpoint-model: choose one or two of {', '.join(ENDPOINT_MODELS)}; got {values}")
        setattr(namespace, self.dest, models)
        namespace.trailing_overrides = [v for v in values if "=" in v]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curve", help="train a mode-connecting curve between two runs (charged), evaluate it (free)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("endpoint_a", nargs="?", type=Path, metavar="ENDPOINT_A", help="run folder (its config is the base)")
    p.add_argument("endpoint_b", nargs="?", type=Path, metavar="ENDPOINT_B", help="run folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the curve's config, e.g. optim.lr=8")
    p.add_argument("--type", choices=TYPES, default="bezier", help="curve type (default: %(default)s)")
    p.add_argument("--bends", type=int, default=1, help="trained control points between the endpoints "
                   "(default: %(default)s)")
    p.add_argument("--endpoint-model", nargs="+", action=_EndpointModels, default=["raw"], metavar="MODEL",
                   help=f"which model of each endpoint run ({', '.join(ENDPOINT_MODELS)}); one for both or one each")
    p.add_argument("--ledger", help="ledger file (default: the one holding the endpoints' runs)")
    p.add_argument("--dry-run", action="store_true", help="plan and probe, print what the curve would spend; "
                   "reserve and write nothing")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--eval", type=Path, metavar="RUN_DIR", help="evaluate this curve run (free), train nothing")
    p.add_argument("--points", type=int, default=21, help="points of the t grid (default: %(default)s)")
    p.add_argument("--plane-points", type=int, default=21, help="G of the G x G plane grid; 0: no plane "
                   "(default: %(default)s)")
    p.add_argument("--plane-examples", type=int, default=2000,
                   help="test images on the plane, a seeded subset; 0: all (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report / curve_eval.json")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> int:
    from accounting.errors import InvalidParameterError

    if len(a.endpoint_model) > 2:
        raise InvalidParameterError(f"--endpoint-model takes one model or two, got {a.endpoint_model}")
    if a.eval is not None:
        if a.endpoint_a is not None or a.overrides:
            raise InvalidParameterError("--eval takes the curve run folder only")
        result = _evaluate(a, a.eval)
        if a.json:
            print_json(result)
        return 0
    if a.endpoint_b is None:
        raise InvalidParameterError("Give two endpoint run folders (ENDPOINT_A ENDPOINT_B), or --eval RUN_DIR")
    if "=" in str(a.endpoint_b):  # `dpwa curve A key=value`: argparse took the override for endpoint B
        raise InvalidParameterError(f"Give two endpoint run folders before the overrides; got {a.endpoint_b}")
    from dpwa.connectivity import check_evaluation, curve_config, run_curve

    if not (a.dry_run or a.no_eval):  # the evaluation's arguments, before the curve is trained and charged
        check_evaluation(points=a.points, plane_points=a.plane_points, plane_examples=_plane_examples(a))
    cfg = curve_config(a.endpoint_a, a.endpoint_b, curve_type=a.type, bends=a.bends, endpoint_models=a.endpoint_model,
                       overrides=[*a.overrides, *getattr(a, "trailing_overrides", [])])
    report = run_curve(cfg, ledger_path=a.ledger, progress=not a.no_progress, dry_run=a.dry_run, announce=True)
    if a.dry_run:
        if a.json:
            print_json(report)
        else:
            from .train import _print_dry_run

            _print_dry_run(report)
            print(f"  endpoints: {report['endpoints_paid']}")
        return 0
    if not a.json:
        _print_training(report, cfg)
    result = None if a.no_eval else _evaluate(a, Path(report["run_dir"]))
    if a.json:
        print_json(report if result is None else {"train": report, "eval": result})
    return 0


def _print_training(r: dict, cfg) -> None:
    m = cfg.method
    what = f"{m.curve_type} curve, {m.curve_bends} bend(s)"
    if r["epsilon"] is None:
        print(f"run {r['run_id']}: {what}, NOT PRIVATE (public data), {r['steps']} steps")
    else:
        print(f"run {r['run_id']}: {what}, epsilon {r['epsilon']:.3f} at delta {r['delta']:g} ({r['accountant']}), "
              f"{r['steps']} steps, sigma {r['noise_multiplier']:.4g}")
        print(f"  charged to dataset {r['dataset']!r}: epsilon {r['dataset_epsilon_spent']:.3f} spent on it in all "
              "(its runs composed, the endpoints' included)")
    for end, model in zip(r["endpoints"], r["endpoint_models"]):
        print(f"  endpoint {model:<6} {end}")
    print(f"  endpoints: {r['endpoints_paid']}")


def _plane_examples(a: argparse.Namespace):
    return None if a.plane_examples == 0 else a.plane_examples  # 0: the whole test split


def _evaluate(a: argparse.Namespace, run_dir: Path) -> dict:
    """Evaluate (free) and print the summary unless --json; the result."""
    from dpwa.connectivity import evaluate_curve

    r = evaluate_curve(run_dir, points=a.points, plane_points=a.plane_points, plane_examples=_plane_examples(a),
                       progress=not a.no_progress)
    if a.json:
        return r
    print(f"curve {r['run_id']} ({r['curve_type']}, {r['bends']} bend(s)) on the test split, {r['examples']} "
          f"examples, {len(r['t'])} values of t (charges nothing):")
    print(f"  {'path':<8} {'max error':>9} {'barrier':>9} {'vs mean':>9} {'max NLL':>8} {'length':>8}")
    for name in ("segment", "curve"):
        rs, b = r[name], r["barrier"][name]
        print(f"  {name:<8} {100 * max(x['error'] for x in rs):>8.2f}% {100 * b['error']:>7.2f}pp "
              f"{100 * b['error_vs_mean']:>7.2f}pp {max(x['nll'] for x in rs):>8.4f} {r['length'][name]:>8.3g}")
    e0, e1 = r["curve"][0]["error"], r["curve"][-1]["error"]
    print(f"  endpoints: test error {100 * e0:.2f}% (A), {100 * e1:.2f}% (B)")
    for name, ens in r["ensembles"].items():
        print(f"  ensemble {name:<9} t = {', '.join(f'{t:g}' for t in ens['t']):<16} accuracy "
              f"{100 * ens['accuracy']:.2f}%  NLL {ens['nll']:.4f}  ECE {100 * ens['ece']:.2f}%")
    print(f"  wrote {r['json']} and {', '.join(r['pictures'].values())}")
    return r
