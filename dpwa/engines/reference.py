"""Engines built on whole-model per-example gradients: dpwa's torch.func engine (any layer),
and Opacus's GradSampleModule with hooks or functorch, and Opacus's ghost clipping.

They instantiate a gradient per example (Opacus's: per augmented view, B x K x params of
memory, then averaged per example), so they are the baselines of the dpwa-fast engine, and
torch-func is its fallback for layers it has no rule for.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TorchFuncEngine", "OpacusEngine", "OpacusGhostEngine", "clip_and_sum", "clip_factors"]


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Opacus's clip rule, shared by every engine: c_b = min(1, C / (|g_b| + 1e-6))."""
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_and_sum(grads: dict[nn.Parameter, torch.Tensor], clip_norm: float
                 ) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor]:
    """Per-example gradients {param: (B, *shape)} -> ({param: sum_b c_b g_b}, norms), with
    Opacus's clip factor c_b = min(1, C / (|g_b| + 1e-6))."""
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))
    factors = clip_factors(norms, clip_norm)
    return {p: torch.einsum("b,b...->...", factors, g) for p, g in grads.items()}, norms


class TorchFuncEngine:
    """vmap(grad) over examples of the whole model: each example's K views go through the model
    together and its gradient is the mean over them. Handles any layer without cross-example
    interaction."""

    name = "torch-func"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def clipped_sum(self, views: torch.Tensor, labels: torch.Tensor, clip_norm: float):
        from ..privacy import per_example_grads

        grads, losses = per_example_grads(self.model, views, labels)
        by_param = dict(self.model.named_parameters())
        sums, norms = clip_and_sum({by_param[n]: g for n, g in grads.items()}, clip_norm)
        return sums, losses.detach(), norms

    def remove(self) -> None:
        pass


class OpacusEngine:
    """Opacus's GradSampleModule (hooks, or functorch per layer with `functorch=True`): one
    per-example gradient per augmented view, summed over an example's K views (each holds 1/K
    of its loss), then clipped."""

    def __init__(self, model: nn.Module, *, functorch: bool = False) -> None:
        self.model, self.functorch = model, functorch
        self.name = "opacus-functorch" if functorch else "opacus-hooks"

    def clipped_sum(self, views: torch.Tensor, labels: torch.Tensor, clip_norm: float):
        from opacus import GradSampleModule

        b, k = views.shape[:2]
        # Hooks only for this call, so that copies of the model (EMA) never carry them.
        gsm = GradSampleModule(self.model, force_functorch=self.functorch, loss_reduction="sum")
        try:
            out = gsm(views.flatten(0, 1))
            losses = F.cross_entropy(out, labels.repeat_interleave(k), reduction="none").view(b, k).mean(1)
            losses.sum().backward()
            params = [p for p in self.model.parameters() if p.requires_grad]
            grads = {p: p.grad_sample.view(b, k, *p.shape).sum(1) for p in params}  # rows hold (1/K) CE each
            for p in params:
                p.grad_sample, p.grad = None, None
        finally:
            gsm._close()
        sums, norms = clip_and_sum(grads, clip_norm)
        return sums, losses.detach(), norms

    def remove(self) -> None:
        pass


class OpacusGhostEngine:
    """Opacus's ghost clipping (GradSampleModuleFastGradientClipping): norms from a first
    backward pass, the clipped sum from a second one. It clips each row it is given, so it
    cannot average over augmented views first: K must be 1."""

    name = "opacus-ghost"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def clipped_sum(self, views: torch.Tensor, labels: torch.Tensor, clip_norm: float):
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        b, k = views.shape[:2]
        if k != 1:
            raise ValueError(f"privacy.engine=opacus-ghost clips every augmented view separately; augmult.k={k} "
                             "needs the example-level clipping of dpwa-fast, torch-func or opacus-hooks")
        gsm = GradSampleModuleFastGradientClipping(self.model, max_grad_norm=clip_norm, use_ghost_clipping=True,
                                                   loss_reduction="sum")
        try:
            losses = F.cross_entropy(gsm(views[:, 0]), labels, reduction="none")
            losses.sum().backward(retain_graph=True)
            coeff = gsm.get_clipping_coef()
            norms = gsm.get_norm_sample()
            params = [p for p in self.model.parameters() if p.requires_grad]
            for p in params:
                p.grad = None
            gsm.disable_hooks()
            (coeff * losses).sum().backward()
            sums = {p: p.grad.detach().clone() for p in params}
            for p in params:
                p.grad = None
        finally:
            gsm._close()
        return sums, losses.detach(), norms

    def remove(self) -> None:
        pass
