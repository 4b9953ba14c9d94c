"""Accuracy and loss of a model on public or held-out data (never private training data:
that would be an uncharged data access, design rule 5)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Data, Split

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, data: Data, *, batch_size: int = 1000) -> dict[str, float]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    for i in range(0, len(split), batch_size):
        x = data.normalize(split.x[i:i + batch_size]).to(device)
        y = split.y[i:i + batch_size].to(device)
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    n = max(len(split), 1)
    return {"accuracy": correct / n, "loss": loss / n}
