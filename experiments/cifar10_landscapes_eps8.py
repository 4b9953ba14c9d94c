#!/usr/bin/env python
"""Loss landscapes (Li et al. 2018, filter-normalised random directions) of a private and a
non-private run of the same model on CIFAR-10: 1D (51 points on [-1, 1]) and 2D (21 x 21 on
[-1, 1]^2) test-loss surfaces, on the 9,000-image test split (free: post-processing).

    python experiments/cifar10_landscapes_eps8.py --private RUN_DIR --nonprivate RUN_DIR
    python experiments/cifar10_landscapes_eps8.py --smoke     # two tiny digits runs, seconds, results in /tmp

The two run folders come from (about 15 min each on 2 cores; the non-private run is a research
comparison, legitimate because CIFAR-10 is public; it cannot use the privately released input
statistics, so it normalises the ScatterNet features with GroupNorm, which has no parameters:
both models have the same trainable parameters; its lr must be chosen for unclipped, noiseless
gradients):

    dpwa train configs/cifar10_scatter_cpu_eps8.yaml
    dpwa train configs/cifar10_scatter_cpu_eps8.yaml privacy.enabled=false data.public=true \\
        model.input_norm=group feature_stats.second_moment_clip=1.0 optim.lr=LR

Both runs get the same seed, so the same Gaussian draws, each rescaled to its own filters.
Writes experiments/results/cifar10_landscapes_eps8.md, cifar10_landscapes_eps8_1d.png and
cifar10_landscapes_eps8_2d.png (the per-run files stay in RUN_DIR/landscape). The table's
sharpness proxy is f(+-r) - f(0) along the 1D direction (Hussain & Fang 2025 find that DP
reduces sharpness), and the mean rise of the 2D surface over the disc of radius 0.5 and over
the whole square.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "results"
NAME = "cifar10_landscapes_eps8"


def _label(run_dir: Path) -> str:
    from dpwa.run_folder import load_run

    run = load_run(run_dir)
    return "non-private" if run.epsilon is None else f"private (eps {run.epsilon:.2f})"


def _check_same_model(a: Path, b: Path) -> None:
    from dpwa.landscape import state_of
    from dpwa.run_folder import load_run

    ra, rb = load_run(a), load_run(b)
    pa = {k: tuple(v.shape) for k, v in state_of(ra.model).items() if k in dict(ra.model.named_parameters())}
    pb = {k: tuple(v.shape) for k, v in state_of(rb.model).items() if k in dict(rb.model.named_parameters())}
    if ra.cfg.model.name != rb.cfg.model.name or pa != pb:
        raise SystemExit(f"{a} and {b} are not runs of the same model ({ra.cfg.model.name} vs {rb.cfg.model.name})")


def rise(xs, f, r: float) -> float:
    """f(+-r) - f(0), interpolated, mean of both sides."""
    xs, f = np.asarray(xs), np.asarray(f)
    return float((np.interp(r, xs, f) + np.interp(-r, xs, f)) / 2 - np.interp(0.0, xs, f))


def plane_rise(xs, ys, z, radius: float | None) -> float:
    """The mean of f - f(0) over the points within `radius` (None: the whole grid)."""
    a, b = np.meshgrid(xs, ys, indexing="ij")
    z = np.asarray(z)
    centre = z[np.unravel_index(np.argmin(a ** 2 + b ** 2), z.shape)]
    mask = np.ones_like(z, bool) if radius is None else (a ** 2 + b ** 2 <= radius ** 2)
    return float((z[mask] - centre).mean())


def run(runs: dict[str, Path], command: str, *, points_1d: int, points_2d: int, examples: int | None, seed: int,
        method: str, results: Path) -> str:
    """Both landscapes of each run (`runs`: label -> run folder), the figures and the table."""
    from dpwa.landscape import LandscapeSpec, draw_1d, draw_contours, landscape_run

    results.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict] = {}
    for name, run_dir in runs.items():
        t0 = time.time()
        one = landscape_run(run_dir, LandscapeSpec(dims=1, method=method, points=(points_1d,), examples=examples,
                                                   seed=seed), progress=True)
        t1 = time.time()
        two = landscape_run(run_dir, LandscapeSpec(dims=2, method=method, points=(points_2d,), examples=examples,
                                                   seed=seed), progress=True)
        out[name] = {"1d": one, "2d": two, "s1": t1 - t0, "s2": time.time() - t1}
    first = next(iter(out.values()))
    xs, (gx, gy) = first["1d"]["grid"]["x"], (first["2d"]["grid"]["x"], first["2d"]["grid"]["y"])
    fig1 = draw_1d({n: {k: np.asarray(v) for k, v in o["1d"]["values"].items()} for n, o in out.items()}, xs,
                   results / f"{NAME}_1d.png", title=f"test split, {method} weights, filter-normalised, seed {seed}",
                   xlabel="filter-normalised random direction", marks={"centre": 0.0})
    fig2 = draw_contours({f"{n}: test loss": np.asarray(o["2d"]["values"]["loss"]) for n, o in out.items()}, gx, gy,
                         results / f"{NAME}_2d.png", shared_levels=True, marks={"centre": (0.0, 0.0)},
                         labels=("direction 1", "direction 2"),
                         title=f"test loss, {method} weights, filter-normalised, seed {seed} (one colour scale)")
    rows = []
    for n, o in out.items():
        v1, v2 = o["1d"]["values"], np.asarray(o["2d"]["values"]["loss"])
        i0 = int(np.argmin(np.abs(np.asarray(xs))))
        rows.append(f"| {n} | `{o['1d']['run_id']}` | {o['1d']['step']} | {v1['loss'][i0]:.4f} | "
                    f"{100 * v1['accuracy'][i0]:.2f}% | {rise(xs, v1['loss'], 0.25):+.4f} | "
                    f"{rise(xs, v1['loss'], 0.5):+.4f} | {plane_rise(gx, gy, v2, 0.5):+.4f} | "
                    f"{plane_rise(gx, gy, v2, None):+.4f} | {o['s1']:.0f} s + {o['s2']:.0f} s |")
    n_ex = first["1d"]["examples"]
    text = (f"# Loss landscapes of a private vs a non-private run (Li et al. 2018)\n\n"
            f"Command: `{command}`; runs made as the script's docstring says. Test split ({n_ex} examples, free), "
            f"{method} weights, filter-normalised random directions (seed {seed}; biases and norm parameters zeroed), "
            f"1D {points_1d} points on [-1, 1], 2D {points_2d}x{points_2d} on [-1, 1]^2. "
            f"Figures: `{fig1.name}`, `{fig2.name}`.\n\n"
            "| run | run id | step | test loss at 0 | test accuracy at 0 | 1D f(+-0.25) - f(0) | 1D f(+-0.5) - f(0) | "
            "2D mean rise, r <= 0.5 | 2D mean rise, square | time 1D + 2D |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    (results / f"{NAME}.md").write_text(text)
    return text


def smoke(results: Path) -> str:
    """Two tiny digits runs (private, and non-private on data declared public), a few grid points."""
    from dpwa.config import load_config
    from dpwa.train import train

    tmp = Path(tempfile.mkdtemp(prefix="landscapes-smoke-"))
    base = [f"out_dir={tmp / 'runs'}", "train.steps=12", "train.batch_size=64", "train.physical_batch_size=64",
            "train.checkpoint_every=12", "augmult.k=1"]
    config = ROOT / "configs" / "quickstart.yaml"
    ledger = str(tmp / "ledger.sqlite")
    private = train(load_config(config, base), ledger_path=ledger, progress=False)["run_dir"]
    public = train(load_config(config, [*base, "privacy.enabled=false", "data.public=true"]), ledger_path=ledger,
                   progress=False)["run_dir"]
    _check_same_model(Path(private), Path(public))
    runs = {_label(Path(d)): Path(d) for d in (private, public)}
    return run(runs, f"python experiments/{NAME}.py --smoke", points_1d=5, points_2d=4, examples=100, seed=0,
               method="raw", results=results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--private", type=Path, help="run folder of the private run")
    p.add_argument("--nonprivate", type=Path, help="run folder of the non-private run of the same model")
    p.add_argument("--points-1d", type=int, default=51)
    p.add_argument("--points-2d", type=int, default=21)
    p.add_argument("--examples", type=int, help="a seeded subset of the test split (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="raw", choices=("raw", "ema", "polyak", "swa"))
    p.add_argument("--results", type=Path, help=f"output folder (default: {RESULTS}; --smoke: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic check (digits, seconds)")
    a = p.parse_args()
    if a.smoke:
        results = a.results or Path(tempfile.mkdtemp(prefix="landscapes-results-"))
        print(smoke(results))
        print(f"smoke results in {results}")
        return
    if not (a.private and a.nonprivate):
        p.error("give --private RUN_DIR and --nonprivate RUN_DIR (or --smoke)")
    _check_same_model(a.private, a.nonprivate)
    command = " ".join(["python", f"experiments/{NAME}.py", *sys.argv[1:]])
    runs = {_label(d): d for d in (a.private, a.nonprivate)}
    print(run(runs, command, points_1d=a.points_1d, points_2d=a.points_2d, examples=a.examples, seed=a.seed,
              method=a.method, results=a.results or RESULTS))


if __name__ == "__main__":
    main()
