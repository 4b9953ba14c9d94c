"""SET (Mocanu, Mocanu, Stone, Nguyen, Gibescu & Liotta 2018, "Scalable training of artificial
neural networks with adaptive sparse connectivity inspired by network science", Nature
Communications) under DP, on the masks and schedule of RigL (Evci et al. 2020; `dpwa.sparsity`):
DP-SGD on a sparse network whose connections move.

    start:            random masks, ERK or uniform densities meeting method.sparsity_density
    every step t:     one release g (dense); the optimizer applies g * mask; weights and
                      optimizer state re-masked
    t = dT, 2 dT, ... < sparsity_end:
                      per layer, drop the k = floor(f(t) n) smallest |w| of its n active
                      weights and grow k others, chosen at random (SET) or by released
                      gradients (RigL, `rigl.py`); f(t) = alpha / 2 (1 + cos(pi t / end))

Every step is one release of the mechanism, as DP-SGD: `releases(steps)` = steps. The release
is of the dense per-example gradient: the engines clip each example's gradient over all the
coordinates of the masked weights, active or not. An inactive weight is 0 but its gradient is
not (input x backpropagated signal), so it takes part in the per-example norms and the clip:
the fast engine's ghost norms and instantiated gradients are of the dense tensors (skipping
inactive coordinates would break the ghost factorisation, and gains nothing on dense
kernels), and so are torch-func's and Opacus's. That is DP-correct whatever the masks (each
release is one Gaussian mechanism of sensitivity C on the dense gradient), it is what RigL's
dense-noisy growth needs, and its cost is that inactive coordinates share the clip budget.

Privacy: SET reads only released weights (the magnitude drop) and public randomness (the
masks and the regrowth, from a generator seeded by train.seed, in the checkpoint): the masks
are free, and the releases are DP-SGD's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from ..mechanism import Release
from ..optimizers import apply_release
from ..sparsity import Masks, drop_fraction, is_update_step
from . import Step, register_method
from .dpsgd import DPSGD

__all__ = ["SET"]


@register_method
class SET(DPSGD):
    name = "set"

    def __init__(self, cfg, model, *, noise_std: float = 0.0) -> None:
        super().__init__(cfg, model, noise_std=noise_std)
        m = cfg.method
        self.masks = Masks.for_model(model, density=m.sparsity_density, init=m.sparsity_init, seed=cfg.train.seed,
                                     classifier=m.sparsity_classifier)

    def step(self, step: Step) -> dict[str, float]:
        out, stats = self._masked_step(step)
        fraction = self._update_fraction(step.index + 1)
        grown = self.masks.update(fraction, self._grow_scores(out), self.optimizer) if fraction else 0
        return {**stats, "sparsity_drop_fraction": fraction, "sparsity_grown": float(grown)}

    def _masked_step(self, step: Step) -> tuple[Release, dict[str, float]]:
        """The step's one release, applied to the active weights; weights and optimizer state re-masked."""
        for group in self.optimizer.param_groups:
            group["lr"] = step.lr
        out = step.release()  # the step's one data access
        self._observe(out)
        stats = apply_release(self.optimizer, dataclasses.replace(out, grads=self.masks.masked(out.grads)))
        self.masks.apply(self.optimizer)
        return out, stats

    def _update_fraction(self, done: int) -> float:
        """The drop fraction of the routine mask update after iterate `done` (0: no update)."""
        m = self.cfg.method
        if not is_update_step(done, every=m.sparsity_update_every, end=m.sparsity_end):
            return 0.0
        return drop_fraction(done, fraction=m.sparsity_fraction, end=m.sparsity_end)

    def _observe(self, release: Release) -> None:
        """Every release, before it is applied (RigL's momentum growth keeps an average)."""

    def _grow_scores(self, release: Release) -> Sequence[torch.Tensor]:
        """Regrowth scores per masked weight, the largest grown: uniform noise for SET."""
        return self.masks.random_scores()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "masks": self.masks.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.masks.load_state_dict(state["masks"])
