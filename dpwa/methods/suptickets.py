"""Sup-tickets (Yin, Menkovski, Fang, Huang, Pei, Pechenizkiy, Mocanu & Liu, UAI 2022,
"Superposing many tickets into one: a performance booster for sparse neural network training";
code: luuyin/Sup-tickets `CIFAR/main_suptickets.py`) under DP: a sparse DP-SGD phase, then
cycles of a cosine lr, each ending in a ticket; the running average of the tickets (their
superposition), pruned back to the density budget by global magnitude, is one sparse model.

    steps 1..S            the sparse phase: SET / RigL (`set.py`, `rigl.py`) at the schedule's lr
    cycle c = 1..C        L steps of a cosine from f1 optim.lr down to f2 optim.lr
      its start           re-exploration: drop suptickets_jump of each layer's active weights by
                          |w|, regrow as many by method.tickets_grow (0: none)
      its last iterate    ticket c, at the cycle's lowest lr
    superposition         the mean of the tickets (and of the iterate S, suptickets_from_start:
                          the reference's CAA, whose first member is the sparse phase's endpoint)
    output                the superposition with its masked weights pruned to the budget's count,
                          the largest |w| over all masked layers (`dpwa eval`: `suptickets`)

S = method.suptickets_start, C = method.suptickets_cycles, L = method.suptickets_cycle_length,
(f1, f2) = method.suptickets_lr_fractions; train.steps must be S + C L. The training model goes
on from its own ticket; the superposition is an accumulator beside it. `dpwa eval` also gives
`tickets`, the mean softmax of the tickets (the superposition's members).

What differs from the reference, on purpose:
- The cycle lr is the cyclic *cosine* the paper and the README describe (`schedules.sgdr`, one
  restart per cycle, the ticket at its minimum); the code's `cyclic_learning_rate` is FGE's
  triangle (lr_1 at the ends, lr_2 at mid-cycle).
- Re-exploration grows by method.tickets_grow; the reference's `truncate_weights` always calls
  `gradient_growth`, so `--growth random` (its SET recipe) still regrows by gradient.
- The superposition is the plain mean of the tickets, pruned once for the output. CAA averages
  the new ticket with the *pruned* previous superposition (1 - 1/(k+1)) prev + ticket / (k+1),
  so pruning decisions compound; without the prune both are the same mean.
- The prune keeps exactly the budget's count (ties by position), not |w| >= a threshold.
- Tickets by schedule, never by accuracy on a split of the training data (R4), and no
  `update_bn` on training data (R1: GroupNorm models need none).
- The sparse phase is the reference's DST (SET / RigL masks at the budget from the start) or,
  with method.sparsity_init_density, its GraNet (`--method GraNet`: dense or denser masks
  pruned by global magnitude along the cubic schedule, `set.py`), which must reach the budget
  by suptickets_start (method.sparsity_prune_end <= it): the tickets and their superposition
  are then all at the budget's density.

Privacy: one DP-SGD run, one release per step (`releases(steps)` = steps): re-exploration, the
tickets, the superposition and its prune are post-processing of released weights and gradients.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..averaging import SWA
from ..schedules import sgdr
from ..sparsity import global_magnitude_masks
from . import Step, register_method
from .edst import TicketsDST

__all__ = ["SupTickets", "pruned_superposition"]


@torch.no_grad()
def pruned_superposition(average: SWA, masked: Sequence[str], count: int) -> nn.Module:
    """A copy of the superposition `average.model` whose `masked` weights keep only the `count`
    largest |w| over all of them (the reference's global magnitude prune to `final_density`)."""
    model = copy.deepcopy(average.model)
    params = dict(model.named_parameters())
    weights = [params[n] for n in masked]
    for w, keep in zip(weights, global_magnitude_masks(weights, count)):
        w.masked_fill_(~keep, 0.0)
    return model


@register_method
class SupTickets(TicketsDST):
    name = "suptickets"
    length = "method.suptickets_start + method.suptickets_cycles x method.suptickets_cycle_length"
    step_keys = (*TicketsDST.step_keys, "suptickets_start", "suptickets_cycle_length")

    def __init__(self, cfg, model, *, noise_std: float = 0.0) -> None:
        super().__init__(cfg, model, noise_std=noise_std)
        self.superposition = SWA(model, rule=self.ticket_steps.__contains__)  # the running mean of the tickets

    @classmethod
    def layout(cls, cfg) -> tuple[int, Sequence[int], Sequence[int], float]:
        m = cfg.method
        starts = [m.suptickets_start + c * m.suptickets_cycle_length for c in range(m.suptickets_cycles + 1)]
        tickets = starts if m.suptickets_from_start else starts[1:]
        return starts[-1], tickets, starts[:-1] if m.suptickets_jump else [], m.suptickets_jump

    def lr(self, step: Step) -> float:
        m = self.cfg.method
        at = step.index - m.suptickets_start  # steps into the cycles
        if at < 0:
            return step.lr
        high, low = (f * self.cfg.optim.lr for f in m.suptickets_lr_fractions)
        return sgdr(at, lr=high, min_lr=low, t0=m.suptickets_cycle_length)

    def _collect(self, done: int) -> None:
        super()._collect(done)
        self.superposition.update(self.model, done)

    def output(self) -> nn.Module:
        """The run's sparse model: the superposition pruned to the budget (a copy)."""
        return pruned_superposition(self.superposition, self.masks.names, sum(self.masks.active))

    @classmethod
    def released_models(cls, cfg, model, state: dict[str, Any]) -> dict:
        out = super().released_models(cfg, model, state)
        average = SWA(model, rule=lambda step: False)
        average.load_state_dict(state["superposition"])
        if average.count:
            masks = state["masks"]["masks"]  # the budget: Masks keep its count exactly
            pruned = pruned_superposition(average, list(masks), sum(int(m.sum()) for m in masks.values()))
            out["suptickets"] = lambda: iter([pruned])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "superposition": self.superposition.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.superposition.load_state_dict(state["superposition"])
