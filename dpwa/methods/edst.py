"""EDST, the ensemble of FreeTickets (Liu, Chen, Chen, Atashgahi, Yin, Kou, Shen, Pechenizkiy,
Wang & Mocanu, ICLR 2022, "Deep ensembling with no overhead for either training or testing: the
all-round blessings of dynamic sparsity"; code: VITA-Group/FreeTickets `main_EDST.py`,
`sparselearning/core.py`) under DP: one dynamic sparse DP-SGD run that yields M sparse
subnetworks (tickets), whose mean softmax is the prediction.

    steps 1..E          exploration: SET / RigL (`set.py`, `rigl.py`) at the schedule's lr
    phase k = 1..M      P steps at f1 optim.lr, from step ceil(P / 2) of the phase at f2 optim.lr
      its last iterate  ticket k, collected by schedule
      then, if k < M    the jump: drop edst_jump of each layer's active weights by |w|, regrow as many
    prediction          the mean softmax of the M tickets (`dpwa eval`: `tickets`)

E = method.edst_exploration, P = method.edst_phase_steps, M = method.edst_phases, (f1, f2) =
method.edst_lr_fractions, and train.steps must be E + M P: the run ends at its last ticket
(steps after it would spend privacy on nothing collected). The README recipe of the reference
(`--epochs 450 --epochs-explo 150 --model-num 3 --large-death-rate 0.8 --nolrsche`) is E = 1/3
of the run at lr 0.1 (`optim.schedule: constant`), then 3 phases at 0.01 / 0.001: f = 0.1, 0.01.
Routine mask updates (method.sparsity_*) go on inside the phases, as there, except after a
ticket, where the masks change only by the jump: a ticket is the trained weights of a topology,
and the last one is the run's last iterate.

What differs from the reference, on purpose:
- A ticket is the last iterate of its phase (at the phase's lowest lr), not the checkpoint of
  best accuracy on `valid_split`, a split of the training data: that selection reads private
  data (methods.md R4).
- The routine drop fraction's cosine decay acts (`sparsity.drop_fraction`): `Masking.step`
  computes the decayed rate and then calls `truncate_weights(self.args.death_rate)`.
- Regrown weights start at 0 with zero optimizer state (`Masks.update`); the reference never
  calls `reset_momentum`, so a regrown weight starts with the momentum its dense gradients built.
- Densities and regrowth meet the budget exactly; the reference draws ERK masks and random
  growth Bernoulli, so counts hold in expectation only.
- Growth (routine and jumps) follows method.tickets_grow: random (SET), or a released gradient
  (RigL's dense_noisy or momentum signal); the reference's `gradient_growth` reads the dense
  gradient of the last batch, which under DP only the release may give.

Privacy: one DP-SGD run, one release per step (`releases(steps)` = steps): the jumps, the
tickets and their ensemble are post-processing of released weights and gradients. FreeTickets'
DST Ensemble (M independent runs) would cost M runs (methods.md R5); EDST costs one.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar, Sequence

import torch

from ..averaging import Snapshots
from . import Step, register_method
from .rigl import RigL

__all__ = ["EDST", "TicketsDST"]


def _never(step: int) -> bool:
    return False


class TicketsDST(RigL):
    """Dynamic sparse DP-SGD (SET / RigL's masks and routine updates, growth by
    method.tickets_grow) that collects tickets at fixed iterates and jumps to a new topology
    after others: what EDST and Sup-tickets share. A subclass gives `layout` and `lr`.

    Each step: set the lr (`lr`), one release applied to the active weights, re-mask; if the
    iterate is a ticket, collect it (`_collect`); then the jump if the iterate is a jump step,
    else the routine update unless it is a ticket.
    """

    def __init__(self, cfg, model, *, noise_std: float = 0.0) -> None:
        super().__init__(cfg, model, noise_std=noise_std)
        self.grow = cfg.method.tickets_grow
        self.momentum = [torch.zeros_like(p) for p in self.masks.params] if self.grow == "momentum" else None
        _, tickets, jumps, self.jump = self.layout(cfg)
        self.ticket_steps, self.jump_steps = frozenset(tickets), frozenset(jumps)
        self.tickets = Snapshots(model, rule=self.ticket_steps.__contains__)

    @classmethod
    @abc.abstractmethod
    def layout(cls, cfg) -> tuple[int, Sequence[int], Sequence[int], float]:
        """(the run's steps, the iterates that are tickets, the iterates after which the masks
        jump, the jump's drop/grow fraction), from the config alone."""

    routine_updates = False  # the jumps move the masks between tickets; routine updates are optional
    length: ClassVar[str]    # the sum train.steps must be, in the method's keys

    @classmethod
    def length_problems(cls, cfg, steps: int) -> list[str]:
        """SET's, and (refused before any charge) a run that does not end at its last ticket, or
        a cyclic schedule (the phases set their own lr; its minima would not be theirs)."""
        out, total = super().length_problems(cfg, steps), cls.layout(cfg)[0]
        if steps != total:
            out.append(f"method.name={cls.name} ends at its last ticket: train.steps must be {cls.length} = {total}, "
                       f"got {steps} (steps after the last ticket would spend privacy on nothing collected)")
        if cfg.optim.schedule in ("cyclic", "sgdr"):
            out.append(f"method.name={cls.name} sets the lr of its phases itself; optim.schedule="
                       f"{cfg.optim.schedule} would put lr minima (and snapshots) elsewhere: use constant, warmup "
                       "or cosine for the phase before them")
        return out

    @abc.abstractmethod
    def lr(self, step: Step) -> float:
        """The lr of `step`: the schedule's before the phases, the method's in them."""

    def step(self, step: Step) -> dict[str, float]:
        lr = self.lr(step)
        out, stats = self._masked_step(dataclasses.replace(step, lr=lr))
        done = step.index + 1
        if done in self.ticket_steps:
            self._collect(done)
        if done in self.jump_steps:
            fraction = self.jump
        else:
            fraction = 0.0 if done in self.ticket_steps else self._update_fraction(done)
        grown = self.masks.update(fraction, self._grow_scores(out), self.optimizer) if fraction else 0
        return {**stats, "lr": lr, "sparsity_drop_fraction": fraction, "sparsity_grown": float(grown),
                "tickets": float(self.tickets.count)}

    def _collect(self, done: int) -> None:
        """Iterate `done` is a ticket: keep its weights (before any jump)."""
        self.tickets.update(self.model, done)

    def _grow_scores(self, release):
        return self.masks.random_scores() if self.grow == "random" else super()._grow_scores(release)

    @classmethod
    def released_models(cls, cfg, model, state: dict[str, Any]) -> dict:
        tickets = Snapshots(model, rule=_never)
        tickets.load_state_dict(state["tickets"])
        return {"tickets": tickets.members} if tickets.count else {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tickets": self.tickets.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tickets.load_state_dict(state["tickets"])


@register_method
class EDST(TicketsDST):
    name = "edst"
    length = "method.edst_exploration + method.edst_phases x method.edst_phase_steps"
    step_keys = (*TicketsDST.step_keys, "edst_exploration", "edst_phase_steps")

    @classmethod
    def layout(cls, cfg) -> tuple[int, Sequence[int], Sequence[int], float]:
        m = cfg.method
        ends = [m.edst_exploration + k * m.edst_phase_steps for k in range(1, m.edst_phases + 1)]
        return ends[-1], ends, ends[:-1], m.edst_jump

    def lr(self, step: Step) -> float:
        m = self.cfg.method
        at = step.index - m.edst_exploration  # steps into the refinement phases
        if at < 0:
            return step.lr
        first, second = m.edst_lr_fractions
        return self.cfg.optim.lr * (first if at % m.edst_phase_steps < math.ceil(m.edst_phase_steps / 2) else second)
