"""`dpwa landscape RUN_DIR`: 1D and 2D loss surfaces around a run's released weights (Li et al.
2018, "Visualizing the loss landscape of neural nets"), along filter-normalised random
directions (the default), the direction between two weight vectors (--between raw ema, or
--to RUN_DIR2), or the top principal directions of the saved trajectory (--pca). Writes
KIND-{1,2}d-SPLIT.{json,npz,png} (2D: -contour.png and -surface.png) and the directions
(-directions.safetensors, with their seed) into RUN_DIR/landscape (or --out).

On the test split (public, held out) it is post-processing and charges nothing. The training
split, and the validation split carved from it, are private: refused (exit 2, nothing read or
charged) unless given their own budget with --train-noise-multiplier SIGMA --loss-clip B. Each
grid point's mean loss is then released by the Gaussian mechanism (losses clipped to [0, B],
noise std SIGMA * B on the sum), reserved in the ledger as a query run of its own under the
run's dataset before any private example is read (refused there if it would pass the budget),
and committed: one Gaussian(noise_multiplier=SIGMA, count=grid points) event.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._format import fmt, print_json, run_header

EXAMPLES = """examples:
  dpwa landscape RUN_DIR                                   2D, 21x21, filter-normalised, test split
  dpwa landscape RUN_DIR --dims 1 --range -1 1 --points 51
  dpwa landscape RUN_DIR --dims 1 --between raw ema        last iterate -> EMA, on [-0.5, 1.5]
  dpwa landscape RUN_DIR --to RUN_DIR2 --method ema        EMA of this run -> EMA of another run
  dpwa landscape RUN_DIR --pca --points 31 21 --range -20 20 -10 10
  dpwa landscape RUN_DIR --split train --train-noise-multiplier 150 --loss-clip 5   (charged)
"""

# dpwa.landscape.SINGLE_WEIGHT_METHODS, repeated: importing it would pull torch into every verb's start-up.
METHODS = ("raw", "ema", "polyak", "swa")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("landscape", help="1D/2D loss surfaces (filter-normalised) around a run's weights",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder of dpwa train")
    p.add_argument("--dims", type=int, default=2, choices=(1, 2), help="1D line or 2D plane (default: %(default)s)")
    p.add_argument("--method", choices=METHODS,
                   help="the centre: raw (last iterate), ema, polyak, swa (default: raw; with --between the "
                        "centre is FROM)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--between", nargs=2, choices=METHODS, metavar=("FROM", "TO"),
                      help="first direction from one method's weights to another's (e.g. raw ema)")
    kind.add_argument("--to", type=Path, metavar="RUN_DIR2",
                      help="first direction to the same --method of another run of the same model")
    kind.add_argument("--pca", action="store_true",
                      help="principal directions of the saved trajectory (FGE snapshots or SWAG deviations)")
    p.add_argument("--range", type=float, nargs="+", metavar="V",
                   help="XMIN XMAX [YMIN YMAX] (default: -1 1; -0.5 1.5 along --between / --to; "
                        "--pca: around the trajectory). Write a negative value as a decimal (-0.001): argparse takes "
                        "-1e-3 for an option")
    p.add_argument("--points", type=int, nargs="+", default=[21], metavar="N",
                   help="NX [NY] grid points (default: 21, i.e. 21x21 in 2D)")
    p.add_argument("--split", default="test", choices=("test", "train", "val"),
                   help="test (free); train / val are private: refused unless given a budget (default: %(default)s)")
    p.add_argument("--examples", type=int, help="a seeded random subset of the split (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions and the subset (default: 0)")
    p.add_argument("--batch-size", type=int, default=1000, help="examples per forward pass (default: %(default)s)")
    p.add_argument("--train-noise-multiplier", type=float, metavar="SIGMA",
                   help="private split: noise multiplier of each grid point's released mean loss")
    p.add_argument("--loss-clip", type=float, metavar="B", help="private split: per-example losses clipped to [0, B]")
    p.add_argument("--ledger", help="ledger of a private-split query (default: the run's own, from run.json)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: RUN_DIR/landscape)")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _spec(a: argparse.Namespace):
    from dpwa.landscape import LandscapeError, LandscapeSpec

    r = a.range
    if r is not None and len(r) not in (2, 4):
        raise LandscapeError(f"--range takes XMIN XMAX [YMIN YMAX], got {len(r)} values")
    return LandscapeSpec(dims=a.dims, method=a.method, between=tuple(a.between) if a.between else None,
                         to=str(a.to) if a.to else None, pca=a.pca, x_range=tuple(r[:2]) if r else None,
                         y_range=tuple(r[2:]) if r and len(r) == 4 else None, points=tuple(a.points), split=a.split,
                         examples=a.examples, seed=a.seed, batch_size=a.batch_size,
                         train_noise_multiplier=a.train_noise_multiplier, loss_clip=a.loss_clip)


def run(a: argparse.Namespace) -> int:
    from dpwa.landscape import landscape_run

    spec = _spec(a)  # refuses a private split without a budget before anything is read
    r = landscape_run(a.run_dir, spec, out=a.out, ledger_path=a.ledger, progress=not a.no_progress)
    if a.json:
        print_json(r)
        return 0
    grid = "x".join(str(len(v)) for v in r["grid"].values() if v)
    c = r["charged"]
    cost = "charges nothing" if not c else "charged to the ledger"
    print(run_header(r, f"{r['method']} weights, {r['directions']} directions, {grid} grid on "
                        f"{r['examples']} examples ({cost}):"))
    for name, values in r["values"].items():
        flat = [x for x in _flatten(values)]
        print(f"  {name}: min {fmt(min(flat))}, max {fmt(max(flat))}")
    if c:
        print(f"  query {c['query_run_id']} on dataset {c['dataset']!r} in {c['ledger']}: "
              f"Gaussian(noise_multiplier={c['noise_multiplier']:g}, count={c['events'][0]['count']}), "
              f"epsilon {fmt(c['epsilon'])} alone; dataset now at epsilon {fmt(c.get('dataset_epsilon'))}; "
              f"noise std of each mean loss {c['noise_std_of_mean']:.3g}")
    print("  wrote " + ", ".join(r["files"].values()))
    return 0


def _flatten(values):
    for v in values:
        if isinstance(v, list):
            yield from _flatten(v)
        else:
            yield v
