"""Engines built on whole-model per-example gradients: dpwa's torch.func engine (any layer),
and Opacus's GradSampleModule with hooks or functorch, and Opacus's ghost clipping.

They instantiate a gradient per example (Opacus's: per augmented view, B x K x params of
memory, then summed per example), so they are the baselines of the dpwa-fast engine, and
torch-func is its fallback for layers it has no rule for. Every engine computes the loss with
`dpwa.rows.example_losses` on the chunk's explicit `Rows`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..rows import Rows, RowsError, example_losses, rows_of
from .errors import EngineError
from .rules import _sq_norms

__all__ = ["TorchFuncEngine", "OpacusEngine", "OpacusGhostEngine", "clip_and_sum", "clip_factors",
           "per_example_grads"]


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Opacus's clip rule, shared by every engine: c_b = min(1, C / (|g_b| + 1e-6))."""
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_and_sum(grads: dict[nn.Parameter, torch.Tensor], clip_norm: float
                 ) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor]:
    """Per-example gradients {param: (B, *shape)} -> ({param: sum_b c_b g_b}, norms), with
    Opacus's clip factor c_b = min(1, C / (|g_b| + 1e-6)). 0-dim parameters have (B,) gradients."""
    norms = torch.sqrt(sum(_sq_norms(g) for g in grads.values()))
    factors = clip_factors(norms, clip_norm)
    return {p: torch.einsum("b,b...->...", factors, g) for p, g in grads.items()}, norms


def per_example_grads(model: nn.Module, views: torch.Tensor, labels: torch.Tensor, rows: Optional[Rows] = None
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of each example's loss (`example_losses`: the mean cross-entropy over its rows),
    by vmap over examples of the whole model: each example goes through the model alone, so
    its rows cannot be confused with another example's.

    Args:
        model: any module without cross-example layers (no BatchNorm).
        views: (B, K, ...) float inputs.
        labels: (B,) int64.
        rows: the chunk's layout (default: from the model's declared tiling).

    Returns:
        ({param name: (B, *param.shape)}, per-example losses (B,)) for trainable params.
    """
    from torch.func import functional_call, grad_and_value, vmap

    rows = rows or rows_of(model, views)
    one = Rows(examples=1, views=rows.views, tiling=rows.tiling)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_of_one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x,))
        return example_losses(out, y.reshape(1), one)[0]

    grads, losses = vmap(grad_and_value(loss_of_one), in_dims=(None, 0, 0), randomness="different")(
        params, views, labels)
    return grads, losses


class TorchFuncEngine:
    """vmap(grad) over examples of the whole model: each example's K views go through the model
    together and its gradient is the mean over them. Handles any layer without cross-example
    interaction, and models that tile their batch."""

    name = "torch-func"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def clipped_sum(self, views: torch.Tensor, labels: torch.Tensor, clip_norm: float, rows: Optional[Rows] = None):
        grads, losses = per_example_grads(self.model, views, labels, rows)
        by_param = dict(self.model.named_parameters())
        sums, norms = clip_and_sum({by_param[n]: g for n, g in grads.items()}, clip_norm)
        return sums, losses.detach(), norms

    def remove(self) -> None:
        pass


def _untiled(model: nn.Module, views: torch.Tensor, rows: Optional[Rows], engine: str) -> Rows:
    rows = rows or rows_of(model, views)
    if rows.tiling.members != 1:
        raise EngineError(f"privacy.engine={engine} gives a gradient per input row and cannot fold the "
                          f"{rows.tiling.members} members of a model that tiles its batch; use "
                          "privacy.engine=dpwa-fast or torch-func")
    return rows


class OpacusEngine:
    """Opacus's GradSampleModule (hooks, or functorch per layer with `functorch=True`): one
    per-example gradient per augmented view, summed over an example's K views (each holds 1/K
    of its loss), then clipped."""

    def __init__(self, model: nn.Module, *, functorch: bool = False) -> None:
        self.model, self.functorch = model, functorch
        self.name = "opacus-functorch" if functorch else "opacus-hooks"

    def clipped_sum(self, views: torch.Tensor, labels: torch.Tensor, clip_norm: float, rows: Optional[Rows] = None):
        from opacus import GradSampleModule

        rows = _untiled(self.model, views, rows, self.name)
        b, k = rows.examples, rows.views
        # Hooks only for this call, so that copies of the model (EMA) never carry them.
        gsm = GradSampleModule(self.model, force_functorch=self.functorch, loss_reduction="sum")
        names = {p: n for n, p in self.model.named_parameters() if p.requires_grad}
        try:
            losses = example_losses(gsm(views.flatten(0, 1)), labels, rows)
            losses.sum().backward()
            unseen = [n for p, n in names.items() if getattr(p, "grad_sample", None) is None]
            if unseen:
                raise EngineError(f"privacy.engine={self.name} gives no per-example gradient for {', '.join(unseen)}: "
                                  "its layer's hooks never saw it (a parameter used outside its layer's forward, e.g. "
                                  "F.linear(x, self.fc.weight)); use privacy.engine=torch-func")
            grads = {}
            for p, name in names.items():
                gs = p.grad_sample
                if gs.shape[0] != b * k:
                    raise RowsError(f"opacus gave {name} {gs.shape[0]} per-row gradients for {b * k} rows")
                grads[p] = gs if k == 1 else gs.view(b, k, *p.shape).sum(1)  # rows hold (1/K) CE each
        finally:
            for p in names:
                p.grad_sample, p.grad = None, None
            gsm._close()
        sums, norms = clip_and_sum(grads, clip_norm)
        return sums, losses.detach(), norms

    def remove(self) -> None:
        pass


class OpacusGhostEngine:
    """Opacus's ghost clipping (GradSampleModuleFastGradientClipping): norms from a first
    backward pass, the clipped sum from a second one. It clips each row it is given, so it
    cannot average over augmented views first: K must be 1. Its norms come from hooks and its
    gradient from a full second backward, so a gradient the hooks do not see (a weight used
    outside its module, reflect padding) makes the clipped sum exceed C: the probe
    (`dpwa.probe`) compares its norms with the single-example loop and refuses such models."""

    name = "opacus-ghost"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def clipped_sum(self, views: torch.Tensor, labels: torch.Tensor, clip_norm: float, rows: Optional[Rows] = None):
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        rows = _untiled(self.model, views, rows, self.name)
        if rows.views != 1:
            raise EngineError(f"privacy.engine=opacus-ghost clips every augmented view separately; augmult.k="
                              f"{rows.views} needs the example-level clipping of dpwa-fast, torch-func or opacus-hooks")
        gsm = GradSampleModuleFastGradientClipping(self.model, max_grad_norm=clip_norm, use_ghost_clipping=True,
                                                   loss_reduction="sum")
        names = {p: n for n, p in self.model.named_parameters() if p.requires_grad}
        try:
            try:
                out = gsm(views[:, 0])
            except NotImplementedError as e:  # Opacus: "Parameter tying is not supported with Ghost Clipping"
                twice = [n for p, n in names.items() if getattr(p, "_forward_counter", 0) > 1]
                raise EngineError(f"privacy.engine=opacus-ghost: {', '.join(twice) or 'a parameter'} is used twice in "
                                  f"one forward pass (a layer called twice, or tied weights): {e}; use "
                                  "privacy.engine=torch-func") from None
            losses = example_losses(out, labels, rows)
            losses.sum().backward(retain_graph=True)
            unseen = [n for p, n in names.items() if not hasattr(p, "_norm_sample")]
            if unseen:
                raise EngineError(f"privacy.engine=opacus-ghost gives no per-example norm for {', '.join(unseen)}: "
                                  "its layer's hooks never saw it (a parameter used outside its layer's forward, e.g. "
                                  "F.linear(x, self.fc.weight)); use privacy.engine=torch-func")
            coeff = gsm.get_clipping_coef()
            norms = gsm.get_norm_sample()
            params = list(names)
            for p in params:
                p.grad = None
            gsm.disable_hooks()
            (coeff * losses).sum().backward()
            sums = {p: p.grad.detach().clone() for p in params if p.grad is not None}
            for p in params:
                p.grad = None
        finally:
            gsm._close()
        return sums, losses.detach(), norms

    def remove(self) -> None:
        pass
