"""DP-SGD (Abadi et al. 2016, "Deep learning with differential privacy"): one release per
step, applied by the configured optimizer (`dpwa.optimizers`: SGD with momentum, Adam, AdamW,
DP-AdamBC, Padam — DP-Adam is Adam on the same noisy gradient, post-processing; DP-AdamBC also
reads the public noise std)."""

from __future__ import annotations

from typing import Any

from ..optimizers import apply_release, make_optimizer
from . import Method, Step, register_method

__all__ = ["DPSGD"]


@register_method
class DPSGD(Method):
    name = "dpsgd"

    def __init__(self, cfg, model, *, noise_std: float = 0.0) -> None:
        super().__init__(cfg, model, noise_std=noise_std)
        self.optimizer = make_optimizer(cfg.optim, self.params, noise_std=noise_std)

    @classmethod
    def releases(cls, cfg, steps: int) -> int:
        return steps

    def step(self, step: Step) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = step.lr
        return apply_release(self.optimizer, step.release())

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
