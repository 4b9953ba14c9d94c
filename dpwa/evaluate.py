"""Accuracy and calibration of a model or an ensemble on public or held-out data (never
private training data: that would be an uncharged data access, design rule 5).

An ensemble's prediction is the mean of its members' softmaxes (FGE, SWAG's Bayesian model
averaging). Metrics: accuracy; NLL, -log p(y) of that mean; expected calibration error over
15 equal-width confidence bins (Guo et al. 2017, "On calibration of modern neural
networks"); Brier score, sum over classes of (p_c - 1[y = c])^2, averaged over examples
(Brier 1950).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .data import Data, Split
from .rows import Rows, tiling_of

__all__ = ["predict_proba", "metrics", "evaluate", "evaluate_members", "reliability_bins"]

ECE_BINS = 15


def _proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax per example; a model that tiles its batch into members (`model.dpwa_tiling`)
    predicts the mean of its members' softmaxes (an implicit ensemble)."""
    rows = Rows(examples=len(x), views=1, tiling=tiling_of(model))
    return rows.fold(model(x).float().softmax(-1)).mean(1).cpu()


@torch.no_grad()
def predict_proba(members: Iterable[nn.Module], split: Split, data: Data, *, batch_size: int = 1000
                  ) -> torch.Tensor:
    """Mean softmax over `members` (each consumed once, in order) on every example of `split`: (N, classes)."""
    total, n = None, 0
    for model in members:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        probs = torch.cat([_proba(model, data.normalize(split.x[i:i + batch_size]).to(device))
                           for i in range(0, len(split), batch_size)])
        model.train(was_training)
        total = probs if total is None else total.add_(probs)
        n += 1
    if total is None:
        raise ValueError("an ensemble needs at least one member")
    return total / n


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
                     ) -> list[dict[str, float]]:
    """Per equal-width confidence bin: count, mean confidence, accuracy (empty bins included)."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(conf.double(), edges[1:-1])  # bin i holds (edge_i, edge_i+1]
    out = []
    for i in range(bins):
        mask = which == i
        k = int(mask.sum())
        out.append({"low": float(edges[i]), "high": float(edges[i + 1]), "count": k,
                    "confidence": float(conf.double()[mask].mean()) if k else 0.0,
                    "accuracy": float(correct[mask].mean()) if k else 0.0})
    return out


def metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, ECE (15 bins) and Brier score of predicted probabilities (N, classes)."""
    n = len(labels)
    p = probs.double()
    nll = float(-p[torch.arange(n), labels].clamp_min(1e-12).log().mean())
    onehot = torch.nn.functional.one_hot(labels, p.shape[1]).double()
    brier = float(((p - onehot) ** 2).sum(1).mean())
    ece = sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, labels))
    return {"accuracy": float((p.argmax(1) == labels).double().mean()), "nll": nll, "ece": float(ece),
            "brier": brier}


def evaluate_members(members: Iterable[nn.Module], split: Split, data: Data) -> dict[str, float]:
    return metrics(predict_proba(members, split, data), split.y)


def evaluate(model: nn.Module, split: Split, data: Data) -> dict[str, float]:
    """Metrics of one model."""
    return evaluate_members([model], split, data)
