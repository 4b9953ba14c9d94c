"""DP-SAT (Park et al. 2023, "Differentially private sharpness-aware training", ICML;
code: JinseongP/DPSAT `src/optim/minimizer.py`): sharpness-aware minimisation whose ascent
step costs no privacy.

SAM (Foret et al. 2021) takes the gradient at w + rho g / ||g||, where g is the gradient at
w: two gradient queries per step, twice the privacy cost under DP. DP-SAT ascends along the
previous step's *released* noisy gradient instead, which is post-processing, and makes the
step's one release at the perturbed weights:

    e_t = rho g_{t-1} / ||g_{t-1}||   (e_0 = 0)
    g_t = release at w_t + e_t         (the mechanism's noisy mean gradient)
    w_{t+1} = optimizer step from w_t with g_t

So it releases exactly as many gradients as DP-SGD. At rho = 0 it would be DP-SGD, so the
config asks for rho > 0.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import Step, register_method
from .dpsgd import DPSGD

__all__ = ["DPSAT"]


@register_method
class DPSAT(DPSGD):
    name = "dpsat"

    def __init__(self, cfg, model, *, noise_std: float = 0.0) -> None:
        super().__init__(cfg, model, noise_std=noise_std)
        self.rho = cfg.method.rho
        self.previous: Optional[list[torch.Tensor]] = None  # the last released gradient (public)

    @torch.no_grad()
    def _ascent(self) -> Optional[list[torch.Tensor]]:
        if self.previous is None:
            return None
        norm = torch.sqrt(sum(g.double().square().sum() for g in self.previous))
        if not norm > 0:
            return None
        shift = [g * (self.rho / float(norm)) for g in self.previous]
        for p, e in zip(self.params, shift):
            p.add_(e)
        return shift

    def step(self, step: Step) -> dict[str, float]:
        shift = self._ascent()

        def release():  # the step's one release, at the perturbed weights; then back to w_t
            out = step.release()
            if shift is not None:
                with torch.no_grad():
                    for p, e in zip(self.params, shift):
                        p.sub_(e)
            self.previous = [out.grads[p].detach().clone() for p in self.params]
            return out

        return super().step(Step(index=step.index, lr=step.lr, release=release))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        previous = state.get("previous")  # loaded on the CPU; kept on the parameters' device
        self.previous = None if previous is None else [g.to(p.device) for g, p in zip(previous, self.params)]
