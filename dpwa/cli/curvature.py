"""`dpwa curvature RUN_DIR`: the Hessian spectrum of a run's released weights on the test
split, by stochastic Lanczos quadrature (Ghorbani et al. 2019; Granziol et al. 2022), and the
learning rates it suggests: 2 / (lambda_max + lambda_median) (Granziol's curvature learner)
and the Cauchy step g'g / g'Hg along the test-loss gradient g. Writes curvature.json and a
spectral density plot curvature.png into RUN_DIR (or --out).

Post-processing of the released weights on public, held-out data: it charges nothing. The
private training split and the validation split carved from it are refused before anything
is read (their Hessian-vector products would be charged queries; that version is not built).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._format import fmt, print_json, print_table, run_header

EXAMPLES = """examples:
  dpwa curvature runs/cifar10-swa-cpu-eps8-20261125-101500-ab12
  dpwa curvature RUN_DIR --method raw swa --iterations 50 --examples 5000
  dpwa curvature RUN_DIR --out /tmp/spectra --json
"""

# dpwa.curvature.SINGLE_WEIGHT_METHODS, repeated: importing it would pull torch into every verb's start-up.
METHODS = ("raw", "ema", "polyak", "swa")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curvature", help="Hessian spectrum (SLQ) of a run's weights on the test split",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder of dpwa train")
    p.add_argument("--split", default="test",
                   help="only test: train and val are private and refused (exit 2)")
    p.add_argument("--method", nargs="+", choices=METHODS, metavar="METHOD",
                   help=f"only these ({', '.join(METHODS)}); default: all the run kept")
    p.add_argument("--iterations", type=int, default=30, help="Lanczos steps per start (default: %(default)s)")
    p.add_argument("--starts", type=int, default=3, help="random starts of SLQ (default: %(default)s)")
    p.add_argument("--examples", type=int, default=2000,
                   help="test examples in the loss, a seeded random subset (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and the starts (default: %(default)s)")
    p.add_argument("--out", type=Path, metavar="DIR", help="folder for curvature.json/png (default: RUN_DIR)")
    p.add_argument("--json", action="store_true", help="print curvature.json")
    p.set_defaults(run=run)


def run(a: argparse.Namespace) -> int:
    from dpwa.curvature import check_split, curvature_run

    check_split(a.split)  # refuse a private split before anything is read
    r = curvature_run(a.run_dir, split=a.split, methods=a.method, iterations=a.iterations, starts=a.starts,
                      examples=a.examples, seed=a.seed, out=a.out)
    if a.json:
        print_json(r)
        return 0
    print(run_header(r, f"{r['examples']} examples, {r['iterations']} Lanczos steps x {r['starts']} starts "
                        "(charges nothing):"))
    rows = [[name, fmt(m["loss"]), fmt(m["lambda_max"]), fmt(m["lambda_min"]), fmt(m["lambda_median"]),
             fmt(m["spectral_median"]), fmt(m["lr_lanczos"]), fmt(m["lr_cauchy"])] for name, m in r["methods"].items()]
    print_table(rows, header=["method", "loss", "lambda_max", "lambda_min", "median |ritz|", "spectral median",
                              "2/(max+median)", "g'g/g'Hg"])
    for name, m in r["methods"].items():
        print(f"  {name}: top eigenvalues {', '.join(fmt(x) for x in m['top_eigenvalues'])}")
    print("  learning rates are for plain SGD on the mean loss (with momentum mu, multiply by 1 - mu)")
    print(f"  wrote {r['json']} and {r['density_plot']}")
    return 0
