"""The `dpwa` command: one module per verb, each with `add_parser(subparsers)` and `run(args)`.

Exit codes: 0 success; 1 a refusal or failure at run time (budget exceeded, locked or
corrupt ledger, a run folder that cannot be written, an audit that finds a violation); 2 bad
input (argparse's convention). dpwa's errors say which by their base (`dpwa.errors.UsageError`
or `RefusalError`), accounting's by theirs (`InvalidParameterError` is bad input). Errors
print one clear line on stderr and change nothing.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from accounting import memo
from accounting.errors import AccountingError, InvalidParameterError

from dpwa.errors import DpwaError, exit_code

from . import audit, budget, curvature, curve, evaluate, finetune, landscape, ledger, train

__all__ = ["main", "build_parser"]

_VERBS = (train, finetune, evaluate, curvature, curve, landscape, audit, budget, ledger)

DESCRIPTION = """\
dpwa: differentially private training of image classifiers (DP-SGD on Opacus), free
averages and ensembles of the private iterates, and a privacy ledger that records what
every run spends on every dataset."""

EPILOG = """\
examples (`dpwa VERB --help` says more):
  dpwa train configs/quickstart.yaml privacy.epsilon=1     private training from a YAML config
  dpwa finetune CONFIG model.pretrained=FILE               private fine-tuning of an NF model
  dpwa train configs/quickstart.yaml --dry-run             what a run would spend; charges nothing
  dpwa train --resume runs/RUN_ID                          continue a stopped or killed run
  dpwa eval runs/RUN_ID                                    accuracy, NLL, ECE, Brier of its models
  dpwa curvature runs/RUN_ID                               Hessian spectrum (SLQ) on the test split
  dpwa curve runs/RUN_A runs/RUN_B --type bezier           a mode-connecting curve, trained under DP
  dpwa landscape runs/RUN_ID --dims 2                      filter-normalised loss surface on the test split
  dpwa audit configs/quickstart.yaml                       empirical lower bound on epsilon
  dpwa budget --sigma 3 --sample-rate 0.01 --steps 1000 --delta 1e-5
  dpwa ledger show                                         spend and budgets per dataset

Configs ship in configs/; README.md explains them. The ledger is ~/.dpwa/ledger.sqlite
unless $DPWA_LEDGER or --ledger names another file. Exit codes: 0 done; 1 refused or
failed at run time (e.g. the budget would be exceeded); 2 bad input, nothing charged;
130 / 143 stopped by SIGINT / SIGTERM after a checkpoint (resume it)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: usage line + message, exit 2
        self.print_usage(sys.stderr)
        self.exit(2, f"dpwa: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpwa", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from dpwa import __version__

    parser.add_argument("--version", action="version", version=f"dpwa {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb in _VERBS:
        verb.add_parser(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"dpwa: warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also follow the options (`dpwa train C --no-progress optim.lr=2`).
    if extra:
        bad = [t for t in extra if t.startswith("-") or "=" not in t]
        if not hasattr(args, "overrides") or bad:
            parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")  # name only the offenders
        args.overrides = [*args.overrides, *extra]
    warnings.showwarning = _show_warning
    memo.enable_from_environment()  # repeated budget queries are instant (accounting/memo.py)
    try:
        return int(args.run(args) or 0)
    except DpwaError as e:  # the exit code is the error's explicit base (usage 2, refusal 1)
        return _fail(e, exit_code(e))
    except AccountingError as e:
        return _fail(e, 2 if isinstance(e, InvalidParameterError) else 1)
    except BrokenPipeError:  # `dpwa ledger export | head`
        return 0
    except OSError as e:  # an unexpected OS failure (disk full, permissions): the message says what
        return _fail(e, 1)


def _fail(error: BaseException, code: int) -> int:
    print(f"dpwa: error: {error}", file=sys.stderr)
    return code
