"""Curves of a run: epsilon at every step, cheaply, and a picture of the run at its end.

Epsilon is monotone in the number of releases, so a row's epsilon is that of the smallest
point of a fixed grid at or above the releases made so far: an upper bound, computed once
per grid point (32 accountant calls over a whole run, spread as it goes), exact at every
grid point and at checkpoints (where the loop asks for the exact value).

`draw_curves` plots metrics.jsonl: the learning rate, or the private batches' losses where
`train.private_diagnostics=true` kept them (labelled: outside the guarantee), the evaluations
on the test or held-out split, and epsilon.
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["EpsilonCurve", "release_grid", "draw_curves", "tensorboard_writer"]


def release_grid(releases: int, points: int) -> list[int]:
    """About `points` counts in [1, releases], spread geometrically, `releases` among them.

    >>> release_grid(100, 3)
    [1, 10, 100]
    """
    grid = {releases} | {max(1, round(releases ** (i / (points - 1)))) for i in range(points)}
    return sorted(g for g in grid if 1 <= g <= releases)


class EpsilonCurve:
    """Upper bounds of epsilon after n releases, 0 <= n <= releases.

    >>> calls = []
    >>> curve = EpsilonCurve(lambda n: calls.append(n) or n / 10, releases=1000, points=8)
    >>> curve.at(0), curve.at(3), curve.at(1000)
    (0.0, 0.3, 100.0)
    >>> curve.at(300) >= 30.0 and len(calls) == 4
    True
    """

    def __init__(self, epsilon_of: Callable[[int], float], *, releases: int, points: int = 32) -> None:
        self.epsilon_of = epsilon_of
        self.grid = release_grid(releases, points)
        self.cache: dict[int, float] = {}

    def exact(self, n: int) -> float:
        n = max(n, 0)  # 0 releases may still spend: a run's other mechanisms (feature statistics)
        if n not in self.cache:
            self.cache[n] = float(self.epsilon_of(n))
        return self.cache[n]

    def at(self, n: int) -> float:
        """Epsilon of the smallest grid point >= n: >= the exact value, by monotonicity."""
        if n <= 0:
            return self.exact(0)
        i = bisect.bisect_left(self.grid, n)
        return self.exact(self.grid[min(i, len(self.grid) - 1)] if i < len(self.grid) else n)


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def draw_curves(rows: Sequence[dict[str, Any]], path: Path, *, title: str = "",
                final: Optional[dict[str, float]] = None) -> Path:
    """private batch loss (when kept) or learning rate | evaluation accuracy | epsilon,
    against steps, as one PNG;
    `final`: the end-of-run accuracies by method, drawn at the last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps, loss = _series(rows, "private_batch_loss_diagnostic")
    if loss:  # train.private_diagnostics=true (or a public run)
        axes[0].plot(steps, loss, lw=0.8, color="tab:gray")
        axes[0].set_title("private batch loss\n(local diagnostic, outside the DP guarantee)", fontsize=9)
    else:  # the learning rate, public
        steps, lr = _series(rows, "lr")
        axes[0].plot(steps, lr, lw=0.8, color="tab:gray")
        axes[0].set_title("learning rate\n(private batch losses: train.private_diagnostics=true)", fontsize=9)
    accuracy = sorted({k for r in rows for k in r if k.endswith("_accuracy")})
    colors: dict[str, str] = {}

    def color(name: str) -> str:  # one colour per method, for its curve and its final star
        return colors.setdefault(name, f"C{len(colors)}")

    for key in accuracy:
        s, v = _series(rows, key)
        name = key.removesuffix("_accuracy").split("_", 1)[-1]
        axes[1].plot(s, [100 * x for x in v], marker=".", color=color(name), label=name)
    last = rows[-1]["step"] if rows else 0
    for name, acc in (final or {}).items():
        axes[1].scatter([last], [100 * acc], marker="*", s=70, color=color(name), label=f"{name} (end)")
    axes[1].set_title("accuracy (%) on the evaluation split" +
                      ("" if accuracy else "\n(train.eval_every=0: at the end only)"), fontsize=9)
    if accuracy or final:
        axes[1].legend(fontsize=7)
    s, eps = _series(rows, "epsilon")
    axes[2].plot(s, eps, color="tab:red")
    axes[2].set_title("epsilon (exact at checkpoints,\nan upper bound from a grid between)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def tensorboard_writer(enabled: bool):
    """A `SummaryWriter` factory for `train.tensorboard: true`, or None; refuses (a usage
    error, before any charge) when the optional `tensorboard` package is missing."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from .config import ConfigError

        raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard); "
                          "or set train.tensorboard=false (curves.png is written either way)") from None
    return SummaryWriter


def log_row(writer: Any, row: dict[str, Any]) -> None:
    """The numbers of a metrics row as scalars at its step (diagnostics keep their names)."""
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(key, value, row["step"])
