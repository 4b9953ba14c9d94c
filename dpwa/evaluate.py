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

__all__ = ["predict_proba", "predict_members", "metrics", "member_metrics", "evaluate", "evaluate_members",
           "reliability_bins"]

ECE_BINS = 15


def _member_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax per member and example, (M, n, classes): M = 1 for a plain model, the M members
    of a model that tiles its batch (`model.dpwa_tiling`, an implicit ensemble: FiLM)."""
    rows = Rows(examples=len(x), views=1, tiling=tiling_of(model))
    return rows.fold(model(x).float().softmax(-1)).transpose(0, 1).cpu()


def _batch_proba(model: nn.Module, split: Split, data: Data, start: int, batch_size: int,
                 device: torch.device) -> torch.Tensor:
    """_member_proba on split.x[start:start + batch_size]; with a test-time flip
    (`data.test_time_flip`), the mean of it and of the mirror images' softmax."""
    x = split.x[start:start + batch_size]
    probs = _member_proba(model, data.normalize(x).to(device))
    mirror = data.mirrored(split, x, start)
    if mirror is not None:
        probs = (probs + _member_proba(model, data.normalize(mirror).to(device))) / 2
    return probs


@torch.no_grad()
def predict_members(members: Iterable[nn.Module], split: Split, data: Data, *, batch_size: int = 1000
                    ) -> torch.Tensor:
    """Per tiled member, the mean softmax over the models `members` (each consumed once, in
    order) on every example of `split`: (M, N, classes), M = 1 unless the models tile."""
    total, n = None, 0
    for model in members:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        probs = torch.cat([_batch_proba(model, split, data, i, batch_size, device)
                           for i in range(0, len(split), batch_size)], dim=1)
        model.train(was_training)
        total = probs if total is None else total.add_(probs)
        n += 1
    if total is None:
        raise ValueError("an ensemble needs at least one member")
    return total / n


def predict_proba(members: Iterable[nn.Module], split: Split, data: Data, *, batch_size: int = 1000
                  ) -> torch.Tensor:
    """Mean softmax over `members` (and over a tiled model's members) on `split`: (N, classes)."""
    return predict_members(members, split, data, batch_size=batch_size).mean(0)


def member_metrics(per_member: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """For an implicit ensemble of M >= 2 members ((M, N, classes) softmaxes): the members'
    mean accuracy and their disagreement, the fraction of examples on which two members'
    predictions differ, averaged over pairs (Fort et al. 2019). Empty for M = 1."""
    m = per_member.shape[0]
    if m < 2:
        return {}
    pred = per_member.argmax(-1)                                      # (M, N)
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    disagreement = sum(float((pred[i] != pred[j]).double().mean()) for i, j in pairs) / len(pairs)
    return {"member_accuracy": float((pred == labels).double().mean()), "member_disagreement": disagreement}


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
    """Metrics of the ensemble of `members` (its members' own, for a tiled model)."""
    per_member = predict_members(members, split, data)
    return {**metrics(per_member.mean(0), split.y), **member_metrics(per_member, split.y)}


def evaluate(model: nn.Module, split: Split, data: Data) -> dict[str, float]:
    """Metrics of one model."""
    return evaluate_members([model], split, data)
