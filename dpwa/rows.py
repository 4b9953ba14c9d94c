"""Explicit per-example rows: the one definition of an example's loss, and the row layout
every engine is handed and checks.

A physical chunk holds `examples` examples, each with `views` augmented views (augmentation
multiplicity, De et al. 2022). The model sees examples x views input rows, example-major.
A model may tile its batch (a FiLM-style ensemble of `members` runs every row once per
member, Turkoglu et al. 2022) and then returns examples x views x members output rows, in
the order it declares (`Tiling`, set as the model's `dpwa_tiling` attribute). An example's
gradient is the gradient of its loss, the mean cross-entropy over *all* its rows, clipped
once: clipping each view or each member separately would give the example K (or M) times
the sensitivity (design rule 3). So the engines fold every row of an example before the norm,
and refuse an output whose row count does not match the layout, instead of guessing it
from `out.shape[0] // batch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError

__all__ = ["Tiling", "Rows", "RowsError", "tiling_of", "rows_of", "example_losses"]


class RowsError(UsageError):
    """A model's rows do not match the declared layout (the message gives the counts)."""


@dataclass(frozen=True)
class Tiling:
    """How a model tiles its batch: `members` output rows per input row.

    order="member-major": the model does `x.repeat(M, 1, 1, 1)` (all rows for member 0, then
    member 1, ...); "example-major": `x.repeat_interleave(M, 0)` (an input row's M copies are
    adjacent)."""

    members: int = 1
    order: Literal["member-major", "example-major"] = "example-major"

    def __post_init__(self) -> None:
        if self.members < 1 or self.order not in ("member-major", "example-major"):
            raise RowsError(f"Tiling needs members >= 1 and order member-major or example-major; got {self}")


@dataclass(frozen=True)
class Rows:
    """The rows of one chunk: examples x views input rows, x members output rows."""

    examples: int
    views: int = 1
    tiling: Tiling = Tiling()

    @property
    def inputs(self) -> int:
        return self.examples * self.views

    @property
    def per_example(self) -> int:
        """Output rows of one example: its views x the model's members."""
        return self.views * self.tiling.members

    @property
    def outputs(self) -> int:
        return self.inputs * self.tiling.members

    def check(self, n: int, what: str) -> None:
        if n not in (self.inputs, self.outputs):
            m = self.tiling.members
            tiled = f", or {self.outputs} for the {m} members it declares" if m > 1 else ""
            raise RowsError(
                f"{what} has {n} rows for {self.examples} examples x {self.views} views (expected {self.inputs}"
                f"{tiled}): a model that tiles its batch must declare it (model.dpwa_tiling = "
                "dpwa.rows.Tiling(members=M, order=...))")

    def fold(self, t: torch.Tensor, what: str = "the model's output") -> torch.Tensor:
        """Rows of `t` (in the model's order) -> (examples, rows per example, ...), example-major.
        Input rows (before a tiling) give (examples, views, ...)."""
        n = t.shape[0]
        self.check(n, what)
        if n == self.inputs or self.tiling.order == "example-major":
            return t.reshape(self.examples, n // self.examples, *t.shape[1:])
        m = self.tiling.members  # member-major: row j * inputs + i is member j of input row i
        return t.reshape(m, self.inputs, *t.shape[1:]).transpose(0, 1).reshape(self.examples, -1, *t.shape[1:])

    def example_major(self, t: torch.Tensor, what: str = "a layer's rows") -> torch.Tensor:
        """`fold` flattened back to rows: (examples * rows per example, ...), example-major."""
        return self.fold(t, what).flatten(0, 1)


def tiling_of(model: nn.Module) -> Tiling:
    """The model's declared tiling (`model.dpwa_tiling`), or none."""
    tiling = getattr(model, "dpwa_tiling", None)
    if tiling is None:
        return Tiling()
    if not isinstance(tiling, Tiling):
        raise RowsError(f"model.dpwa_tiling must be a dpwa.rows.Tiling, got {tiling!r}")
    return tiling


def rows_of(model: nn.Module, views: torch.Tensor) -> Rows:
    """The layout of a chunk of views (examples, K, ...) through `model`."""
    return Rows(examples=views.shape[0], views=views.shape[1], tiling=tiling_of(model))


def example_losses(out: torch.Tensor, labels: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The per-example loss, defined once for every engine: the mean cross-entropy over all of
    an example's rows (its views x the model's members). out: logits in the model's row order;
    labels: (examples,). Returns (examples,)."""
    if out.shape[0] != rows.outputs:
        rows.check(out.shape[0], "the model's output")
        raise RowsError(f"the model's output has {out.shape[0]} rows; the declared tiling "
                        f"({rows.tiling.members} members) gives {rows.outputs}")
    folded = rows.fold(out)                                  # (B, R, classes)
    per_row = F.cross_entropy(folded.flatten(0, 1), labels.repeat_interleave(rows.per_example), reduction="none")
    return per_row.view(rows.examples, rows.per_example).mean(1)
