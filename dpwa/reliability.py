"""Reliability diagrams (DeGroot & Fienberg 1983; Guo et al. 2017): per confidence bin, the
accuracy against the mean confidence; a calibrated model sits on the diagonal. One panel per
method, drawn with matplotlib into a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["draw_reliability"]


def draw_reliability(bins: Mapping[str, Sequence[Mapping[str, float]]], scores: Mapping[str, Mapping[str, float]],
                     path: Path, *, title: str = "") -> Path:
    """Write a PNG with one reliability panel per method.

    Args:
        bins: method -> `evaluate.reliability_bins` output.
        scores: method -> metrics (accuracy and ece are printed in the panel title).
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = list(bins)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        b = [x for x in bins[name] if x["count"]]
        width = bins[name][0]["high"] - bins[name][0]["low"]
        ax.bar([x["low"] for x in b], [x["accuracy"] for x in b], width=width, align="edge", edgecolor="black",
               linewidth=0.5, color="tab:blue", label="accuracy")
        ax.bar([x["low"] for x in b], [abs(x["confidence"] - x["accuracy"]) for x in b],
               bottom=[min(x["accuracy"], x["confidence"]) for x in b], width=width, align="edge", fill=False,
               edgecolor="tab:red", hatch="///", linewidth=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{name}: acc {100 * scores[name]['accuracy']:.1f}%, ECE {100 * scores[name]['ece']:.1f}%")
        ax.title.set_fontsize(9)
    axes.flat[0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
