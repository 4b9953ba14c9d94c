"""Small output helpers shared by the CLI verbs: aligned tables and JSON."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> None:
    cells = [[str(c) for c in row] for row in ([header] if header else []) + list(rows)]
    if not cells:
        return
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if header and k == 0:
            print("  ".join("-" * w for w in widths))


def run_header(r: dict, what: str) -> str:
    """The first line of a verb that reads a run folder (`dpwa eval`, `dpwa curvature`)."""
    eps = "not private" if r["epsilon"] is None else f"epsilon {r['epsilon']:.3f}"
    split = f"{r['split']} split" + ("" if r.get("covered_by_guarantee", True) else " (outside the DP guarantee)")
    return f"run {r['run_id']} at step {r['step']} of {r['steps']} ({eps}), {split}, {what}"


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)
