"""SET (Mocanu, Mocanu, Stone, Nguyen, Gibescu & Liotta 2018, "Scalable training of artificial
neural networks with adaptive sparse connectivity inspired by network science", Nature
Communications) under DP, on the masks and schedule of RigL (Evci et al. 2020; `dpwa.sparsity`):
DP-SGD on a sparse network whose connections move.

    start:            random masks, ERK or uniform densities meeting method.sparsity_density
    every step t:     one release g (dense); the optimizer applies g * mask; weights and
                      optimizer state re-masked
    GraNet (method.sparsity_init_density, Liu et al. 2021): the masks start at that density (1:
                      dense) and after steps prune_start + dT, + 2 dT, ... and prune_end are
                      cut by global |w| to the cubic schedule's density (`sparsity.gradual_density`),
                      the budget from prune_end on; then the routine update below
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

Privacy: SET reads only released weights (the magnitude drop and GraNet's prune) and public randomness (the
masks and the regrowth, from a generator seeded by train.seed, in the checkpoint): the masks
are free, and the releases are DP-SGD's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import torch

from ..mechanism import Release
from ..optimizers import apply_release
from ..sparsity import Masks, drop_fraction, gradual_density, is_prune_step, is_update_step
from . import Step, register_method
from .dpsgd import DPSGD

__all__ = ["SET"]


@register_method
class SET(DPSGD):
    name = "set"
    step_keys = ("sparsity_end", "sparsity_update_every", "sparsity_prune_start", "sparsity_prune_end")
    routine_updates: ClassVar[bool] = True  # the masks must move before sparsity_end (not so for tickets' jumps)

    @classmethod
    def length_problems(cls, cfg, steps: int) -> list[str]:
        m, out = cfg.method, []
        if m.sparsity_end > steps:
            out.append(f"method.sparsity_end={m.sparsity_end} is beyond the run ({steps} steps): the drop fraction's "
                       "cosine would not reach 0 and the masks would never be fixed (RigL: 75% of the steps)")
        elif cls.routine_updates and m.sparsity_update_every >= m.sparsity_end:
            out.append(f"method.sparsity_update_every={m.sparsity_update_every} leaves no mask update before "
                       f"method.sparsity_end={m.sparsity_end}: method.name={cls.name} would be static sparse training")
        if m.sparsity_init_density is not None and m.sparsity_prune_end > steps:
            out.append(f"method.sparsity_prune_end={m.sparsity_prune_end} is beyond the run ({steps} steps): the "
                       f"pruning would stop above method.sparsity_density={m.sparsity_density}")
        return out

    def __init__(self, cfg, model, *, noise_std: float = 0.0) -> None:
        super().__init__(cfg, model, noise_std=noise_std)
        m = cfg.method
        start = m.sparsity_density if m.sparsity_init_density is None else m.sparsity_init_density
        self.masks = Masks.for_model(model, density=start, init=m.sparsity_init, seed=cfg.train.seed,
                                     classifier=m.sparsity_classifier)
        # the active weights at the end (what Masks at the budget's density hold)
        self.budget = round(m.sparsity_density * sum(p.numel() for p in self.masks.params))

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
        pruned = self._prune(step.index + 1)
        return out, {**stats, **({"sparsity_pruned": float(pruned), "sparsity_density": self.masks.density}
                                 if pruned else {})}

    def _prune(self, done: int) -> int:
        """GraNet's gradual prune after iterate `done`, if it is a prune step: the active weights
        cut to the cubic schedule's count by global magnitude (method.sparsity_init_density)."""
        m = self.cfg.method
        if m.sparsity_init_density is None or not is_prune_step(
                done, every=m.sparsity_update_every, start=m.sparsity_prune_start, end=m.sparsity_prune_end):
            return 0
        density = gradual_density(done, initial=m.sparsity_init_density, final=m.sparsity_density,
                                  start=m.sparsity_prune_start, end=m.sparsity_prune_end)
        total = sum(p.numel() for p in self.masks.params)
        count = self.budget if done >= m.sparsity_prune_end else max(self.budget, round(density * total))
        return self.masks.prune_global(count, self.optimizer)

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
