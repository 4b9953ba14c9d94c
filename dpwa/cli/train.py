"""`dpwa train CONFIG [key=value ...]`: private training from a YAML config.

The run folder (`out_dir/RUN_ID`) receives config.yaml (resolved), run.json, metrics.jsonl,
checkpoint.pt (atomic) and report.json. The run reserves its whole privacy spend in the
ledger before its first step; `--resume RUN_DIR` continues a killed run from its last
checkpoint under the same reservation (no second charge).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._format import print_json

EXAMPLES = """examples:
  dpwa train configs/quickstart.yaml
  dpwa train configs/cifar10_wrn16_4_eps8.yaml optim.lr=4 augmult.k=8
  dpwa train configs/quickstart.yaml privacy.epsilon=1 train.steps=300 out_dir=/tmp/runs
  dpwa train --resume runs/quickstart-20261125-101500-ab12
"""


def add_parser(sub: argparse._SubParsersAction, verb: str = "train", help: str = "train a classifier with DP-SGD",
               description: str = __doc__, epilog: str = EXAMPLES) -> argparse.ArgumentParser:
    p = sub.add_parser(verb, help=help, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", type=Path, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2 augmult.k=4")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--ledger", help="ledger file (default: privacy.ledger, $DPWA_LEDGER or ~/.dpwa/ledger.sqlite)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, plan and probe, print what the run would spend; reserve and write nothing")
    p.set_defaults(run=run)
    return p


def run(a: argparse.Namespace) -> int:
    from accounting.errors import InvalidParameterError
    from dpwa.config import load_config

    if a.resume is not None:
        if a.config is not None or a.overrides:
            raise InvalidParameterError("--resume takes the run folder only: its config.yaml is the config")
        cfg = None
    else:
        if a.config is None:
            raise InvalidParameterError("Give a config file (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
        cfg = load_config(a.config, a.overrides)
        check = getattr(a, "check_config", None)
        if check is not None:
            check(cfg)
    from dpwa.train import train  # imports torch: only here, not for budget/ledger verbs

    report = train(cfg, resume=a.resume, ledger_path=a.ledger, progress=not a.no_progress, dry_run=a.dry_run,
                   announce=True)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 speaks for the run
    if a.json:
        print_json(report)
        return 0
    if a.dry_run:
        _print_dry_run(report)
        return 0
    split = report["eval_split"]
    if report["epsilon"] is None:
        print(f"run {report['run_id']}: NOT PRIVATE (privacy.enabled=false on public data), {report['steps']} steps")
    else:
        print(f"run {report['run_id']}: epsilon {report['epsilon']:.3f} at delta {report['delta']:g} "
              f"({report['accountant']}), {report['steps']} steps, sigma {report['noise_multiplier']:.4g}")
    validation = report.get("validation")  # a charged validation split: noisy accuracies alone
    for name in report["methods"]:
        r = report[f"{split}_{name}"]
        print(f"  {split} accuracy {name:<9} {100 * r['accuracy']:.2f}%" + (
            f"   (noisy: std {100 * validation['noise']:g} points, charged)" if validation else
            f"   NLL {r['nll']:.4f}   ECE {100 * r['ece']:.2f}%   Brier {r['brier']:.4f}"))
    print(f"  {report['expected_per_example_gradient_evaluations']:.0f} per-example gradient evaluations "
          f"(expected), {report['train_time_s']:.1f}s training ({report['probe_s']:.1f}s probe before it), "
          f"{report['expected_images_per_s']:.0f} img/s")
    print(f"  report: {Path(report['run_dir']) / 'report.json'}")
    if "swag" in report["collected"]:
        print(f"  SWAG and SWAG-diagonal (Bayesian model averages): dpwa eval {report['run_dir']}")
    return 0


def _print_dry_run(r: dict) -> None:
    if r["epsilon"] is None:
        print(f"dry run: NOT PRIVATE (public data), {r['steps']} steps; nothing reserved")
        return
    print(f"dry run ({r['method']}): epsilon {r['epsilon']:.3f} at delta {r['delta']:g} ({r['accountant']}): "
          f"sigma {r['noise_multiplier']:.4g}, q {r['sample_rate']:.4g}, {r['steps']} steps, {r['releases']} releases")
    if r.get("statistics_releases"):
        print(f"  plus {r['statistics_releases']} Gaussian releases of feature statistics (sigma "
              f"{r['statistics_noise_multiplier']:g}, model.input_norm=private), before the first step")
    if r.get("validation_releases"):
        print(f"  plus at most {r['validation_releases']} validation accuracies, each a Gaussian release of a count "
              f"(sigma {r['validation_noise_multiplier']:g}: accuracy noise std {r['validation_noise']:g}, "
              f"train.eval_split=val; epsilon {r['validation_epsilon']:.3f} alone, included above)")
    resumed = f" (run {r['resumed_run']!r}'s own reservation included: resuming adds nothing)" if r.get(
        "resumed_run") else ""
    print(f"  dataset {r['dataset']!r} in {r['ledger']}: epsilon {r['dataset_epsilon_spent']:.3f} spent{resumed}, "
          f"{r['dataset_epsilon_after']:.3f} after this run")
    if r["budget"] is not None:
        left = r["budget"]["epsilon"] - r["dataset_epsilon_after"]
        verdict = f"{left:.3f} left after it" if left >= 0 else f"PAST the budget by {-left:.3f}: it would be refused"
        print(f"  budget epsilon {r['budget']['epsilon']:g} at delta {r['budget']['delta']:g}: {verdict}")
    if r.get("built_on"):
        print(f"  carries the releases of {len(r['built_on'])} run(s) it starts from: "
              + ", ".join(run["run_id"] for run in r["built_on"]))
    if not r["private"]:
        print("  labelled NOT private: privacy.noise_seed is set, or a run it starts from was not private")
    print(f"  model probe passed ({r['probe_s']:.1f}s); nothing was reserved or written")
