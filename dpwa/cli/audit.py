"""`dpwa audit CONFIG [key=value ...]`: an empirical lower bound on epsilon for a config's mechanism.

Runs the config's DP-SGD mechanism (its noise multiplier, sample rate, steps, clip norm,
augmult K, clipping engine and physical batch) once with white-box gradient canaries, and
prints two lower bounds on epsilon, each with its confidence, next to the accountant's
epsilon: Clopper-Pearson over independent canaries, and Steinke et al.'s one-run audit.
A lower bound above the accountant's epsilon means the implementation leaks more than
claimed: the command then exits with code 3 (VIOLATION), a code no failure uses (bad input
exits 2, a failed run 1), so that a CI gate cannot read a crash as a leak. The audit reads no
private data and charges no ledger (only the training set's size, for q = B/N).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._format import print_json

#: the exit code of an audit whose lower bound exceeds the accountant's epsilon
VIOLATION = 3

EXAMPLES = """examples:
  dpwa audit configs/quickstart.yaml
  dpwa audit configs/cifar10_wrn16_4_eps8.yaml --canaries 2000 --json
  dpwa audit configs/quickstart.yaml privacy.epsilon=8 --confidence 0.99
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("audit", help="empirical lower bound on epsilon (canaries)", description=__doc__,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. privacy.epsilon=8")
    p.add_argument("--canaries", type=int, default=1000, help="number of canaries, each in with probability 1/2 "
                   "(default 1000, at least 100; more tighten the bounds, and cost more than linearly: every "
                   "physical chunk carries all of them)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bounds (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="randomness of the audit (it reads no private data)")
    p.add_argument("--json", action="store_true", help="print the audit as JSON")
    p.set_defaults(run=run)
    return p


def run(a: argparse.Namespace) -> int:
    import dataclasses

    from accounting.errors import InvalidParameterError
    from dpwa.config import load_config

    if a.canaries < 100:  # fewer than 4 of 100 drawn in has probability 4e-25
        raise InvalidParameterError(f"--canaries must be >= 100, got {a.canaries}")
    if not 0 <= a.seed < 2 ** 63:
        raise InvalidParameterError(f"--seed must be in [0, 2^63), got {a.seed}")
    if not 0.5 <= a.confidence < 1:
        raise InvalidParameterError(f"--confidence must be in [0.5, 1), got {a.confidence}")
    cfg = load_config(a.config, a.overrides)
    if not cfg.privacy.enabled:
        raise InvalidParameterError("privacy.enabled=false: a non-private run has no guarantee to audit")
    _check_memory(a.canaries, cfg)

    from dpwa.audit import Mechanism, audit
    from dpwa.data import load_data
    from dpwa.train import _check_delta, plan_run

    # Only the training set's size is needed (q = B/N): no features are computed.
    size = len(load_data(dataclasses.replace(cfg.data, features="none")).train)
    _check_delta(cfg, size)  # the claim audited is one `dpwa train` would make
    plan = plan_run(cfg, size)
    p = cfg.privacy
    mech = Mechanism(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.releases,
                     clip_norm=p.clip_norm, augmult_k=cfg.augmult.k, engine=p.engine,
                     physical_batch_size=cfg.train.physical_batch_size, rescale_to_unit=p.rescale_to_unit,
                     members=max(cfg.model.film_members, 1))
    result = audit(mech, delta=p.delta, accountant=p.accountant, canaries=a.canaries, confidence=a.confidence,
                   seed=a.seed)
    if a.json:
        print_json({"config": str(a.config), "name": cfg.name, **result.to_dict()})
    else:
        _print(cfg.name, result)
    return VIOLATION if result.violated else 0


def _check_memory(canaries: int, cfg) -> None:
    """Refuse an audit whose physical chunk cannot fit: every chunk carries every canary's
    coordinate (physical batch x K views x (16 + m) float64 inputs, and as many per-example
    gradient entries per class), which for 3e6 canaries asked ~18 GB and was an allocator's
    traceback, or the out-of-memory killer."""
    import os

    from accounting.errors import InvalidParameterError

    rows = cfg.train.physical_batch_size * cfg.augmult.k
    need = 3 * rows * (16 + canaries) * 8  # inputs, and two classes' per-example gradients
    try:
        have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform: no check
        return
    if need > have / 2:
        fits = max(100, int(have / 2 / (3 * rows * 8)) - 16)
        raise InvalidParameterError(
            f"--canaries={canaries} needs ~{need / 2**30:.1f} GiB per physical chunk (train.physical_batch_size="
            f"{cfg.train.physical_batch_size} x augmult.k={cfg.augmult.k} rows of {16 + canaries} float64 values, "
            f"and their gradients), more than half of the {have / 2**30:.1f} GiB available: use --canaries <= "
            f"{fits}, or a smaller train.physical_batch_size")


def _print(name: str, r) -> None:
    m, conf = r.mechanism, f"{100 * r.bounds[0].confidence:g}%"
    print(f"audit of {name}: DP-SGD with sigma {m.noise_multiplier:.4g}, q {m.sample_rate:.4g}, {m.steps} steps, "
          f"C {m.clip_norm:g}, augmult {m.augmult_k}, engine {m.engine}")
    print(f"white-box gradient canaries: {len(r.run.scores)} ({int(r.run.included.sum())} in), "
          f"{r.run.base_examples} ordinary examples, {r.run.seconds:.1f}s")
    print(f"  {'accountant (' + r.accountant + ')':<27} epsilon <= {r.claimed_epsilon:.4g} at delta {r.delta:g}")
    cp, one = r.bounds
    d = cp.detail
    print(f"  {'Clopper-Pearson':<27} epsilon >= {cp.epsilon:.4g}  ({conf} confidence; {d['true_positives']}/{d['in']} "
          f"in and {d['false_positives']}/{d['out']} out above threshold {d['threshold']:.4g}, "
          f"{d['rule']}; best of {d['tests']} tests)   {cp.epsilon / r.claimed_epsilon:.2f} of the accountant's")
    d = one.detail
    print(f"  {'one run (Steinke et al.)':<27} epsilon >= {one.epsilon:.4g}  ({conf} confidence; {d['correct']} of "
          f"{d['guesses']} guesses right)   {one.epsilon / r.claimed_epsilon:.2f} of the accountant's")
    verdict = f"{100 * r.verdict_confidence:g}% confidence for the verdict, either bound"
    if r.violated:
        print("  VIOLATION: a lower bound exceeds the accountant's epsilon; the implementation leaks more than claimed "
              f"({verdict})")
    else:
        print(f"  consistent: no lower bound exceeds the accountant's epsilon ({verdict})")
