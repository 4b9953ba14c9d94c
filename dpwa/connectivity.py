"""Mode connectivity of released runs (Garipov et al. 2018, "Loss surfaces, mode connectivity,
and fast ensembling of DNNs"; code: timgaripov/dnn-mode-connectivity, `train.py`,
`eval_curve.py`, `plane.py`): the curve run between two endpoints, and its evaluation.

Training. `curve_config` builds a curve run's config from endpoint A's (its data, model,
privacy, optimizer and run length; the averaging is reset, since A's is tied to A's length),
and `run_curve` runs it through `dpwa.train`: a private run of its own (`dpwa.methods.curve`),
planned, reserved and committed under the endpoints' dataset in the ledger that holds their
runs, so that the dataset's spend composes all three. The endpoints cost nothing more: two
models of one run were paid by that run, two independent runs each paid its own way.

Evaluation. `evaluate_curve` is post-processing of released weights on the public test
split, so it charges nothing (the training split is withheld by `load_run`). The models are
GroupNorm / NF networks, so no point needs a batch-norm update (the reference's `update_bn`
on training data would be a private query). It writes RUN_DIR/curve_eval.json and two
pictures:

* along t (a grid, default 21 points) for the curve w(t) and for the segment
  (1 - t) w_A + t w_B: loss (NLL + 0.5 wd |w|^2, the curve's objective, wd =
  optim.weight_decay), NLL, accuracy, error, ECE and Brier score (`dpwa.evaluate.metrics`);
  curve_error.png;
* the barrier of each path, for the error and the loss:
      barrier = max_t [ e(t) - ((1 - t) e(0) + t e(1)) ],
  the largest excess over the linear interpolation of the endpoints' values (Garipov et al.
  read it off their plots; Frankle et al. 2020, "Linear mode connectivity and the lottery
  ticket hypothesis", take max_t e(t) - mean(e(0), e(1)), also reported as `barrier_vs_mean`;
  the two agree when e(0) = e(1)). Garipov et al. call a path connecting when it is near 0;
* ensembles (mean softmax): the endpoints against points of the curve (default t = 0.25,
  0.5, 0.75) and the same points of the segment;
* the plane through three weight vectors (`Plane`, their `plane.py`): u = (w2 - w1) / |.|,
  v = (w3 - w1) minus its projection on u, normalised, and P = w1 + x u + y v; for a curve,
  w1, w2 = the endpoints and w3 = its middle control point (the bend of a 1-bend curve, not
  w(1/2)). A curve with 3 control points is an affine combination of them, so it lies in that
  plane exactly; a longer curve is drawn as its projection (the residual is reported). The
  test error on a G x G grid (default 21, on a seeded subset of the test split) is
  curve_plane.png, the curve and the segment drawn on it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .checkpoint import atomic_write_text
from .config import AveragingConfig, ConfigError, MethodConfig, RunConfig, TrainConfig, config_to_yaml, load_config
from .data import Split
from .errors import UsageError
from .evaluate import metrics, predict_proba
from .methods.curve import CURVES, check_endpoints
from .run_folder import ReleasedRun, RunFolder, load_run

__all__ = ["CurveError", "curve_config", "run_curve", "Plane", "plane", "barrier", "load_curve", "evaluate_curve"]


class CurveError(UsageError):
    """The curve cannot be trained or evaluated as asked (exit 2); the message says why."""


def curve_config(endpoint_a: Path, endpoint_b: Path, *, curve_type: str = "bezier", bends: int = 1,
                 endpoint_models: Sequence[str] = ("raw", "raw"), overrides: Sequence[str] = ()) -> RunConfig:
    """The config of a curve run between two run folders: endpoint A's config with
    method.name=curve, default averaging, charged validation (A's train.val_noise, the default
    where A evaluated exactly) and the name `<A's name>-<curve_type>`, then `overrides`
    (dotted, as `dpwa train`'s).

    Raises:
        ConfigError: not a run folder, or an invalid override.
    """
    base = RunFolder.existing(Path(endpoint_a)).config()
    if len(endpoint_models) == 1:
        endpoint_models = [endpoint_models[0]] * 2
    method = MethodConfig(name="curve", curve_type=curve_type, curve_bends=bends,
                          curve_endpoints=[str(Path(p).resolve()) for p in (endpoint_a, endpoint_b)],
                          curve_endpoint_models=list(endpoint_models))
    # a new run: its validation accuracies are charged unless its own overrides say val_noise=0
    train = dataclasses.replace(base.train, val_noise=base.train.val_noise or TrainConfig().val_noise)
    # every weight comes from the endpoints (the runs they started from are carried through
    # theirs): nothing is read from a pretrained file
    cfg = dataclasses.replace(base, name=f"{base.name}-{curve_type}", method=method, averaging=AveragingConfig(),
                              train=train, model=dataclasses.replace(base.model, pretrained=None))
    with tempfile.TemporaryDirectory() as tmp:  # overrides merge as on `dpwa train CONFIG key=value`
        path = Path(tmp) / "curve.yaml"
        path.write_text(config_to_yaml(cfg))
        return load_config(path, overrides)


def _curve_ledger(cfg: RunConfig, ends: Sequence[Any], ledger_path: Optional[str]) -> Optional[str]:
    """The ledger the curve is charged to: the one asked for, else the one its endpoints were
    charged to. Refused unless it holds every private endpoint run, so that the dataset's spend
    there composes the endpoints and the curve."""
    from accounting import Ledger

    from .loss_query import check_holds_run

    recorded = sorted({e.meta["ledger"] for e in ends if e.meta.get("ledger")})
    chosen = ledger_path or cfg.privacy.ledger or (recorded[0] if len(recorded) == 1 else None)
    if not cfg.privacy.enabled:
        return chosen
    ledger = Ledger(chosen, create=False)
    for e in ends:
        check_holds_run(ledger, e.meta, f"curve endpoint {e.path}")
    return str(ledger.path)


def run_curve(cfg: RunConfig, *, ledger_path: Optional[str] = None, progress: bool = True, dry_run: bool = False,
              announce: bool = False) -> dict[str, Any]:
    """Train a curve run (`curve_config`) through `dpwa.train`; its report, with how the
    endpoints were paid for. Everything that can refuse does so before the reservation."""
    from .train import train

    if cfg.method.name != "curve":
        raise ConfigError(f"run_curve trains method.name=curve, got {cfg.method.name!r}")
    a, b = check_endpoints(cfg)
    ledger = _curve_ledger(cfg, (a, b), ledger_path)
    same = a.meta.get("run_id") == b.meta.get("run_id")
    report = train(cfg, ledger_path=ledger, progress=progress, dry_run=dry_run, announce=announce)
    return {**report, "endpoints": [str(a.path), str(b.path)], "endpoint_models": [a.which, b.which],
            "endpoints_paid": "two models of one run: its own budget, charged once" if same else
            "two independent runs: each charged on its own"}


# --- geometry -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plane:
    """The plane w1 + x u + y v through three weight vectors (flat, float64), u and v orthonormal."""

    origin: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    def coordinates(self, w: torch.Tensor) -> tuple[float, float]:
        d = w.double() - self.origin
        return float(d @ self.u), float(d @ self.v)

    def point(self, x: float, y: float) -> torch.Tensor:
        return self.origin + x * self.u + y * self.v

    def residual(self, w: torch.Tensor) -> float:
        """The distance from w to the plane."""
        return float((w.double() - self.point(*self.coordinates(w))).norm())


def plane(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> Plane:
    """Garipov et al.'s plane: u = (w2 - w1) / |w2 - w1|, v = (w3 - w1) minus its projection
    on u, normalised. w1 is at (0, 0), w2 at (|w2 - w1|, 0), w3 at (<w3 - w1, u>, |v before
    normalising|).

    Raises:
        CurveError: the three vectors are (numerically) on one line.
    """
    o = w1.double()
    u = w2.double() - o
    dx = float(u.norm())
    if not dx > 0:
        raise CurveError("the plane needs w1 != w2")
    u = u / dx
    v = w3.double() - o
    v = v - (v @ u) * u
    dy = float(v.norm())
    if not dy > 1e-9 * dx:
        raise CurveError("w3 lies on the line through w1 and w2: they span no plane")
    return Plane(o, u, v / dy)


def barrier(ts: Sequence[float], values: Sequence[float]) -> float:
    """max_t [v(t) - ((1 - t) v(0) + t v(1))] over a grid that holds t = 0 and t = 1.

    >>> barrier([0.0, 0.5, 1.0], [0.1, 0.4, 0.3])
    0.2
    """
    at = dict(zip(ts, values))
    v0, v1 = at[0.0], at[1.0]
    return round(max(v - ((1 - t) * v0 + t * v1) for t, v in at.items()), 12)


# --- evaluation -----------------------------------------------------------------------------

def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.detach().reshape(-1).float().cpu() for x in tensors])


class _Evaluator:
    """One model reused for every weight vector (its trainable parameters overwritten)."""

    def __init__(self, run: ReleasedRun) -> None:
        self.run = run
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        self.wd = run.cfg.optim.weight_decay

    @torch.no_grad()
    def probs(self, w: torch.Tensor, split: Split) -> torch.Tensor:
        i = 0
        for p in self.params:
            p.copy_(w[i:i + p.numel()].view_as(p))
            i += p.numel()
        return predict_proba([self.run.model], split, self.run.data)

    def row(self, w: torch.Tensor, probs: torch.Tensor, split: Split) -> dict[str, float]:
        m = metrics(probs, split.y)
        return {**m, "error": 1 - m["accuracy"], "loss": m["nll"] + 0.5 * self.wd * float(w.double().square().sum())}


def load_curve(run_dir: Path) -> tuple[ReleasedRun, list[torch.Tensor], Callable[[float], torch.Tensor]]:
    """A curve run as released: `load_run`'s run (its model holds w(1/2)), its control points
    (flat), and w(t) as a function of t.

    Raises:
        CurveError: not a curve run.
    """
    from .state import upgrade

    run = load_run(Path(run_dir))
    if run.cfg.method.name != "curve":
        raise CurveError(f"{run_dir} is a run of method.name={run.cfg.method.name}, not a curve run; train one with "
                         "`dpwa curve ENDPOINT_A ENDPOINT_B`")
    points = [_flat(p) for p in upgrade(run.folder.load_state())["method"]["points"]]
    basis = CURVES[run.cfg.method.curve_type]

    def at(t: float) -> torch.Tensor:
        return sum(c * p for c, p in zip(basis(t, len(points)), points) if c)  # type: ignore[return-value]

    return run, points, at


def _subset(split: Split, examples: Optional[int], seed: int) -> Split:
    """A seeded random subset of a public split (the plane's grid is many evaluations)."""
    if examples is None or examples >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:examples].sort().values
    return Split(split.x[idx], split.y[idx])


def plane_grid(evaluator: Any, split: Split, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, *,
               grid: int = 21, margin: float = 0.2, paths: Optional[dict[str, list[torch.Tensor]]] = None,
               progress: bool = False) -> dict[str, Any]:
    """Test error and NLL on a grid x grid lattice of the plane through w1, w2, w3 that covers
    the three points and the projections of `paths` (name -> weight vectors) with a margin of
    `margin` times the covered width on each side."""
    pl = plane(w1, w2, w3)
    marks = {"w1": pl.coordinates(w1), "w2": pl.coordinates(w2), "w3": pl.coordinates(w3)}
    drawn = {name: [pl.coordinates(w) for w in ws] for name, ws in (paths or {}).items()}
    residual = {name: max(pl.residual(w) for w in ws) for name, ws in (paths or {}).items()}
    xy = [*marks.values(), *(c for cs in drawn.values() for c in cs)]
    axes = []
    for k in (0, 1):
        lo, hi = min(c[k] for c in xy), max(c[k] for c in xy)
        pad = margin * (hi - lo)
        axes.append([lo - pad + (hi - lo + 2 * pad) * i / (grid - 1) for i in range(grid)])
    error = [[0.0] * grid for _ in range(grid)]
    nll = [[0.0] * grid for _ in range(grid)]
    cells = [(i, j) for i in range(grid) for j in range(grid)]
    if progress:
        from tqdm import tqdm

        cells = tqdm(cells, desc="plane", unit="point", dynamic_ncols=True)
    for i, j in cells:
        w = pl.point(axes[0][i], axes[1][j]).float()
        r = evaluator.row(w, evaluator.probs(w, split), split)
        error[i][j], nll[i][j] = r["error"], r["nll"]
    return {"grid": grid, "margin": margin, "examples": len(split), "x": axes[0], "y": axes[1], "error": error,
            "nll": nll, "points": {k: list(v) for k, v in marks.items()},
            "paths": {k: [list(c) for c in v] for k, v in drawn.items()},
            "distance_to_plane": residual, "distance_w1_w2": float((w2.double() - w1.double()).norm())}


def check_evaluation(*, points: int = 21, ensemble_t: Sequence[float] = (0.25, 0.5, 0.75), plane_points: int = 21,
                     plane_examples: Optional[int] = 2000) -> None:
    """`evaluate_curve`'s arguments, checked before a curve is trained (and charged) for it.

    Raises:
        CurveError: a bad argument, named with its value.
    """
    if points < 2 or plane_points == 1 or plane_points < 0:
        raise CurveError(f"Expected points >= 2 and plane_points = 0 or >= 2; got {points=}, {plane_points=}")
    if any(not 0 <= t <= 1 for t in ensemble_t):
        raise CurveError(f"ensemble_t must lie in [0, 1], got {list(ensemble_t)}")
    if plane_examples is not None and plane_examples < 1:
        raise CurveError(f"--plane-examples must be >= 1 (0 on the command line: all), got {plane_examples}")


def evaluate_curve(run_dir: Path, *, points: int = 21, ensemble_t: Sequence[float] = (0.25, 0.5, 0.75),
                   plane_points: int = 21, plane_examples: Optional[int] = 2000, plane_margin: float = 0.2,
                   seed: int = 0, out: Optional[Path] = None, progress: bool = False) -> dict[str, Any]:
    """Evaluate a curve run on the test split (free): along t, the segment, barriers,
    ensembles and the plane (module docstring). Writes curve_eval.json, curve_error.png and
    (unless plane_points=0) curve_plane.png into `out` (default: the run folder).

    Args:
        points: t grid size (t = i / (points - 1)), >= 2.
        ensemble_t: the points of the curve (and of the segment) whose softmaxes are averaged.
        plane_points: G, the plane's G x G grid (0: no plane).
        plane_examples: a seeded subset of the test split for the plane (None: all of it).

    Raises:
        CurveError: not a curve run, or bad arguments.
    """
    check_evaluation(points=points, ensemble_t=ensemble_t, plane_points=plane_points, plane_examples=plane_examples)
    run, ctrl, at = load_curve(run_dir)
    out = Path(out) if out is not None else run.folder.path
    out.mkdir(parents=True, exist_ok=True)
    test, ev = run.data.test, _Evaluator(run)
    a, b = ctrl[0], ctrl[-1]
    ts = sorted({round(i / (points - 1), 12) for i in range(points)} | {round(float(t), 12) for t in ensemble_t})
    paths: dict[str, Callable[[float], torch.Tensor]] = {"curve": at, "segment": lambda t: (1 - t) * a + t * b}
    rows: dict[str, list[dict[str, float]]] = {}
    probs: dict[str, dict[float, torch.Tensor]] = {}
    for name, path in paths.items():
        rows[name], probs[name] = [], {}
        for t in ts:
            w = path(t)
            probs[name][t] = ev.probs(w, test)
            rows[name].append({"t": t, **ev.row(w, probs[name][t], test)})
    y = test.y
    ensembles = {"endpoints": {**metrics((probs["curve"][0.0] + probs["curve"][1.0]) / 2, y), "t": [0.0, 1.0]}}
    for name in paths:
        chosen = [round(float(t), 12) for t in ensemble_t]
        mean = torch.stack([probs[name][t] for t in chosen]).mean(0)
        ensembles[name] = {**metrics(mean, y), "t": chosen}
    barriers = {name: {key: barrier(ts, [r[key] for r in rs]) for key in ("error", "loss")} for name, rs in rows.items()}
    for name, rs in rows.items():
        errors = [r["error"] for r in rs]
        barriers[name]["error_vs_mean"] = max(errors) - (errors[0] + errors[-1]) / 2
    m = run.cfg.method
    result: dict[str, Any] = {
        "run_id": run.meta["run_id"], "curve_type": m.curve_type, "bends": m.curve_bends,
        "endpoints": list(m.curve_endpoints), "endpoint_models": list(m.curve_endpoint_models),
        "step": run.step, "steps": int(run.meta["steps"]), "epsilon": run.epsilon, "delta": run.meta["delta"],
        "split": "test", "examples": len(test), "charged": "nothing: released weights on the public test split",
        "t": ts, "curve": rows["curve"], "segment": rows["segment"], "barrier": barriers, "ensembles": ensembles,
        "length": {name: sum(float((path(t1) - path(t0)).norm()) for t0, t1 in zip(ts, ts[1:]))
                   for name, path in paths.items()},
    }
    result["pictures"] = {"error": str(_draw_error(result, out / "curve_error.png"))}
    if plane_points:
        split, fine = _subset(test, plane_examples, seed), [i / 100 for i in range(101)]
        try:
            result["plane"] = plane_grid(ev, split, a, b, ctrl[len(ctrl) // 2], grid=plane_points,
                                         margin=plane_margin, paths={"curve": [at(t) for t in fine], "segment": [a, b]},
                                         progress=progress)
        except CurveError as e:  # a bend still on the segment (e.g. lr too small to move it): no plane
            result["plane"] = {"skipped": str(e)}
        else:
            result["plane"]["w3"] = f"control point {len(ctrl) // 2} of {len(ctrl)}"
            result["pictures"]["plane"] = str(_draw_plane(result, out / "curve_plane.png"))
    path = out / "curve_eval.json"
    atomic_write_text(path, json.dumps(result, indent=2))
    result["json"] = str(path)
    return result


# --- pictures -------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(r: dict[str, Any]) -> str:
    eps = "not private" if r["epsilon"] is None else f"curve run epsilon {r['epsilon']:.2f}"
    return f"{r['run_id']}\n{r['curve_type']}, {r['bends']} bend(s) ({eps}; evaluation on test, free)"


def _draw_error(r: dict[str, Any], path: Path) -> Path:
    """Test error and NLL along t, the curve against the segment."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, style in (("segment", dict(ls="--", color="tab:gray")), ("curve", dict(color="tab:blue"))):
        rs = r[name]
        label = f"{name} (barrier {100 * r['barrier'][name]['error']:.2f} pp)"
        axes[0].plot([x["t"] for x in rs], [100 * x["error"] for x in rs], marker=".", label=label, **style)
        axes[1].plot([x["t"] for x in rs], [x["nll"] for x in rs], marker=".", label=name, **style)
    for ax, what in zip(axes, ("test error (%)", "test NLL")):
        ax.set_xlabel("t")
        ax.set_title(what, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(r), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw_plane(r: dict[str, Any], path: Path) -> Path:
    """Contours of test error on the plane, with the curve, the segment and the three points."""
    plt = _pyplot()
    p = r["plane"]
    z = torch.tensor(p["error"]).T.numpy() * 100  # contourf wants (y, x)
    fig, ax = plt.subplots(figsize=(6.2, 5))
    lo, hi = float(z.min()), float(z.max())
    levels = [lo + (hi - lo) * (i / 20) ** 2 for i in range(21)] if hi > lo else 10  # finer near the minimum
    cs = ax.contourf(p["x"], p["y"], z, levels=levels, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="test error (%)")
    for name, style in (("segment", dict(ls="--", color="white", lw=1.2)), ("curve", dict(color="tab:red", lw=2))):
        xs, ys = zip(*p["paths"][name])
        off = p["distance_to_plane"][name] > 1e-6 * p["distance_w1_w2"]  # more than 3 control points
        ax.plot(xs, ys, label=f"{name} (projected)" if off else name, **style)
    for key, label in (("w1", "A"), ("w2", "B"), ("w3", "bend")):
        x, y = p["points"][key]
        ax.scatter([x], [y], color="black", zorder=3, s=25)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=9)
    ax.set_xlabel("x (distance along u = B - A)")
    ax.set_ylabel("y (distance along v)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(_title(r) + f"\nplane through A, B and {p['w3']}; {p['examples']} test images", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
