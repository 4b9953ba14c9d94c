"""The dpwa-fast engine: per-example clipping from one forward and one backward pass.

Forward hooks record each trainable layer's input and output. One `autograd.grad` call asks
only for the gradients of those outputs, so autograd skips the weight-gradient work of
backprop altogether. Each layer's rule (`rules.py`) then turns (input, output gradient)
into per-example squared norms, by instantiating per-example gradients or by ghost norm,
whichever is cheaper for its shape; with the clip factors known, each layer's clipped sum
is one weight-gradient contraction (book-keeping, Bu et al. 2023). Augmentation
multiplicity costs nothing extra: an example's K views are more positions of the same
example in every contraction, so memory is per example, never per view.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..rows import Rows, example_losses, rows_of
from .errors import EngineError
from .reference import clip_factors
from .rules import Record, problem, rule_for

__all__ = ["FastEngine", "EngineError", "unsupported_parameters"]


def unsupported_parameters(model: nn.Module) -> list[str]:
    """Every trainable parameter the engine cannot give a per-example gradient, with the reason.

    A layer without a rule for its exact forward (`rules.problem`) is refused, and so is a
    parameter held by two layers (tied weights): its per-example gradient is the sum of both
    layers' parts, whose norm the per-layer rules cannot give. A parameter of a supported layer
    used outside it (`F.linear(x, self.fc.weight)`) shows only at run time: `clipped_sum`
    refuses it when the layer is never called, the probe (`dpwa.probe`) when it is."""
    out, owner = [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        why = problem(module) if own else None
        full = [f"{name}.{n}" if name else n for n, _ in own]
        if why:
            out += [f"{f} ({why})" for f in full]
        for f, (_, p) in zip(full, own):
            if id(p) in owner and owner[id(p)] != f:
                out.append(f"{f} (the same Parameter as {owner[id(p)]}: tied weights)")
            owner.setdefault(id(p), f)
    return sorted(set(out), key=out.index)


class FastEngine:
    """Args:
        model: a model whose trainable parameters all sit directly in layers with a rule for
            their exact forward (`rules.RULES`).
        mode: "auto" (cheaper of ghost norm and instantiation per layer), "ghost" or
            "instantiate" (all layers; for tests and benchmarks).
    """

    name = "dpwa-fast"

    def __init__(self, model: nn.Module, *, mode: str = "auto") -> None:
        if mode not in ("auto", "ghost", "instantiate"):
            raise ValueError(f"mode must be auto, ghost or instantiate, got {mode!r}")
        self.model, self.mode = model, mode
        self.names = {m: n for n, m in model.named_modules()}
        self.layers: dict[nn.Module, dict[str, nn.Parameter]] = {}
        for module in self.names:
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            self.layers[module] = own
        bad = unsupported_parameters(model)
        if bad:
            raise EngineError(f"privacy.engine=dpwa-fast cannot give per-example gradients for {len(bad)} trainable "
                              f"parameter(s): {', '.join(bad)}; use privacy.engine=torch-func, which handles any "
                              "layer, or freeze them")
        self._records: Optional[list[Record]] = None
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._records is None or not torch.is_grad_enabled():
            return  # evaluation, EMA copies, non-private forward passes
        if any(r.module is module for r in self._records):
            raise EngineError(f"privacy.engine=dpwa-fast: layer {self._name(module)} is called twice in one forward "
                              "pass (shared weights), and its rule sees one call; use privacy.engine=torch-func")
        x = inputs[0].detach()
        self._records.append(Record(module, x, output, output._version, x._version))

    def _name(self, module: nn.Module) -> str:
        return f"{self.names.get(module, '?')!r} ({type(module).__name__})"

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def clipped_sum(self, views: torch.Tensor, labels: torch.Tensor, clip_norm: float, rows: Optional[Rows] = None
                    ) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Sum over examples of their clipped gradients (the gradient of the mean loss over all
        their rows, clipped to `clip_norm`), for views (B, K, ...) and labels (B,).

        Every layer's rows are put example-major with the chunk's `rows` (a model that tiles its
        batch member-major has its rows regrouped by example) before its rule sees them.

        Returns ({param: clipped sum}, per-example losses (B,), per-example norms (B,)).
        """
        rows = rows or rows_of(self.model, views)
        b = rows.examples
        self._records = []
        try:
            out = self.model(views.flatten(0, 1))
        finally:
            records, self._records = self._records, None
        losses = example_losses(out, labels, rows)
        # Parameters of layers that were never called are asked for too (none, usually): one that
        # still reaches the loss is used outside its layer (F.linear(x, self.fc.weight)), unseen by
        # any rule.
        called = {id(r.module) for r in records}
        uncalled = [(m, n, p) for m, own in self.layers.items() if id(m) not in called for n, p in own.items()]
        grads = torch.autograd.grad(losses.sum(), [r.out for r in records] + [p for _, _, p in uncalled],
                                    allow_unused=True)
        outside = [f"{self.names[m]}.{n}" for (m, n, _), g in zip(uncalled, grads[len(records):]) if g is not None]
        if outside:
            raise EngineError(f"privacy.engine=dpwa-fast: {', '.join(outside)} reach the loss although their layer is "
                              "never called (a parameter used outside its layer's forward, e.g. F.linear(x, "
                              "self.fc.weight), which no per-layer rule sees); call the layer, or use "
                              "privacy.engine=torch-func")
        gos = list(grads[:len(records)])
        rules, norms2 = [], torch.zeros(b, dtype=out.dtype, device=out.device)
        del out
        for i, rec in enumerate(records):
            for kind, t, v in (("output", rec.out, rec.version), ("input", rec.x, rec.x_version)):
                if t._version != v:
                    raise EngineError(f"privacy.engine=dpwa-fast: the {kind} of layer {self._name(rec.module)} is "
                                      "modified in place after the layer (e.g. ReLU(inplace=True)), which corrupts "
                                      "what its rule reads; make that operation out of place")
            go = gos[i] if gos[i] is not None else torch.zeros_like(rec.out)
            gos[i] = records[i] = None  # from here on the rule holds only what it still needs
            what = f"the input of layer {self._name(rec.module)}"
            rec = Record(rec.module, rows.example_major(rec.x, what), rows.example_major(rec.out.detach(), what),
                         rec.version)
            go = rows.example_major(go, what)
            rule = rule_for(rec, go.detach(), b, self.mode)
            del go, rec
            norms2 += rule.norms2()
            rules.append(rule)
        norms = torch.sqrt(torch.clamp(norms2, min=0))
        factors = clip_factors(norms, clip_norm)
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for rule in rules:
            for name, value in rule.clipped_sum(factors).items():
                param = self.layers[rule.m][name]
                sums[param] = value.reshape(param.shape)
        return sums, losses.detach(), norms
