"""RigL (Evci, Gale, Menick, Castro & Elsen, ICML 2020, "Rigging the lottery: making all tickets
winners"; code: google-research/rigl `sparse_optimizers_base.py`, `SparseRigLOptimizerBase`)
under DP: SET's schedule and magnitude drop (`set.py`), with regrowth by gradient magnitude,
where the gradient is one the mechanism already released. No extra gradient query is made.

`method.rigl_grow` says which released gradient ranks the inactive weights (methods.md
section 3, signals (a) and (b)):

    dense_noisy  |g| of the mask-update step's own release: the release is of the dense
                 clipped per-example gradient (`set.py`), the optimizer applies its active part
                 and growth ranks its inactive part. RigL's signal (the gradient of the current
                 batch w.r.t. the masked weights), with the DP noise on it: at scatter_cnn's
                 sigma 2.06, C 0.1, B 8192 the noise std is 2.5e-5 per coordinate against
                 gradients of about 7e-5.
    momentum     |m| with m <- beta m + g over every step's dense release: the momentum buffer
                 torch's SGD keeps for dense gradients (beta = optim.momentum, or Adam's
                 beta1, whose first moment is (1 - beta1) m: the same ranking). Averaging
                 over ~1 / (1 - beta) releases cuts the noise by about sqrt(1 / (1 - beta));
                 FreeTickets' `momentum_growth`. The optimizer's own state is masked (a weight
                 that does not exist has no momentum), so the method keeps m itself.

The reference applies a mask update *instead of* that step's gradient step
(`SparseRigLOptimizerBase.apply_gradients`, `cond_mask_update_op`); here the mask update
follows the step's optimizer update, so the release is used rather than wasted: drop by |w|
of the new iterate, grow by the scores, new connections at 0 with zero optimizer state.

Privacy: the releases are DP-SGD's, one per step; the drop, the growth ranking and m are
post-processing of released weights and gradients, so `releases(steps)` = steps.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..mechanism import Release
from . import register_method
from .set import SET

__all__ = ["RigL", "growth_momentum"]


def growth_momentum(optim) -> float:
    """beta of the `momentum` growth signal: the optimizer's momentum (SGD) or beta1 (Adam family)."""
    return optim.momentum if optim.name == "sgd" else optim.betas[0]


@register_method
class RigL(SET):
    name = "rigl"

    def __init__(self, cfg, model, *, noise_std: float = 0.0) -> None:
        super().__init__(cfg, model, noise_std=noise_std)
        self.grow = cfg.method.rigl_grow
        self.beta = growth_momentum(cfg.optim)
        self.momentum = ([torch.zeros_like(p) for p in self.masks.params] if self.grow == "momentum" else None)

    @torch.no_grad()
    def _observe(self, release: Release) -> None:
        if self.momentum is not None:
            for buf, p in zip(self.momentum, self.masks.params):
                buf.mul_(self.beta).add_(release.grads[p])

    def _grow_scores(self, release: Release) -> Sequence[torch.Tensor]:
        if self.momentum is not None:
            return [buf.abs() for buf in self.momentum]
        return [release.grads[p].abs() for p in self.masks.params]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "growth_momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state["growth_momentum"]
        self.momentum = None if saved is None else [m.to(p.device) for m, p in zip(saved, self.masks.params)]
