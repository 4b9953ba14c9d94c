"""Sparse masks for dynamic sparse training: which weights exist, and how that set moves.

Follows RigL (Evci, Gale, Menick, Castro & Elsen, ICML 2020, "Rigging the lottery: making all
tickets winners"; code: google-research/rigl `rigl/sparse_utils.py`, `sparse_optimizers_base.py`)
and SET (Mocanu et al. 2018, Nature Communications): a boolean mask per prunable weight, a
per-layer density meeting a global budget, and every Delta-T steps a drop of the smallest
active weights and a regrowth of as many inactive ones.

What is masked (`prunable`): the weights of the conv and linear layers, the tensors that hold
almost all of a model's parameters and whose entries are connections. Not biases and not
GroupNorm / FiLM scales and shifts (a few per channel; RigL and FreeTickets leave them dense),
and not the final classifier unless asked (`classifier=True`): it is small, ERK gives it a
density near 1 anyway (scatter_cnn's head: (1024 + 10) / (1024 * 10) against 0.002 for its
first conv), and its entries are the class scores' only inputs. The first layer is masked
(`prune_first_layer` defaults to true in RigL's ResNet generator; its CIFAR script sets it
false): in scatter_cnn it holds 75% of the weights, so an 80% sparse model with a dense first
layer does not exist.

Weight-standardised convolutions (`WSConv2d`, timm's `StdConv2d` / `ScaledStdConv2d`) are
refused: they convolve with (w - mean w) / std w, so a masked raw weight of 0 is an effective
weight of -mean / std and the network is not sparse. Use `model.weight_standardization: false`
(scatter_cnn, cnn_tanh) until a mask-aware standardisation exists.

Densities (`erk_densities`, `uniform_densities`) meet the budget exactly in counts
(`layer_counts`): the active weights number round(density x masked weights). ERK is
`get_sparsities_erdos_renyi` with `erk_power_scale` 1: layer l gets eps * sum(shape) /
prod(shape), eps solved for the budget, and a layer above density 1 made dense and eps solved
again over the rest, until none is. The reference then floors each layer's zeros, which misses
the budget by up to a weight per layer; here the layers with the largest fractional remainders
get one weight more, to the exact total.

Dense-to-sparse (GraNet: Liu, Chen, Chen, Atashgahi, Yin, Kou, Shen, Pechenizkiy, Wang & Mocanu,
NeurIPS 2021, "Sparse training via boosting pruning plasticity with neuroregeneration"; code:
Shiweiliuiiiiiiii/GraNet and luuyin/Sup-tickets `sparselearning/core.py`, `Masking.pruning`): the
masks start at a higher density (1: dense) and are pruned by global magnitude, at fixed steps,
to the density of Zhu & Gupta's cubic schedule (`gradual_density`), reaching the budget at the
schedule's end; the routine drop/grow (neuroregeneration) goes on beside it. The reference
misses the final density by its last term (it stops one prune early) and keeps |w| > the
threshold (fewer on ties); here the last prune is at the end step and counts are exact.

Privacy: everything here is post-processing. The initial masks come from public randomness
(a generator seeded by `train.seed`, in the checkpoint); the drop reads released weights, and
the growth scores are whatever the method passes: uniform noise (SET), or released gradients
(RigL). Masks are the same on every rank of a distributed run (the same seed and the same
all-reduced releases).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from .config import ConfigError
from .models.ws import WSConv2d

__all__ = ["Masks", "prunable", "erk_densities", "uniform_densities", "layer_counts", "DENSITIES",
           "drop_fraction", "is_update_step", "global_magnitude_masks", "gradual_density", "is_prune_step"]


def prunable(model: nn.Module, *, classifier: bool = False) -> dict[str, nn.Parameter]:
    """The trainable weights of `model`'s conv and linear layers, by parameter name, in module
    order; the last one (the classifier) left out unless `classifier`.

    Raises:
        ConfigError: a weight-standardised conv (not sparse when masked), or nothing to mask.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    layers = [m for m in model.modules()
              if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight.requires_grad]
    standardised = [type(m).__name__ for m in layers if isinstance(m, WSConv2d) or "StdConv" in type(m).__name__]
    if standardised:
        raise ConfigError(f"sparse masks need plain convolutions; this model has weight-standardised ones "
                          f"({standardised[0]}), which turn a masked weight of 0 into -mean / std: set "
                          "model.weight_standardization=false")
    found = [(names[id(m.weight)], m.weight) for m in layers]
    found = list(dict((n, (n, p)) for n, p in found).values())  # a shared layer once
    if not classifier:
        found = found[:-1]
    if not found:
        raise ConfigError("the model has no conv or linear weight to mask"
                         + ("" if classifier else " besides its classifier (method.sparsity_classifier=true masks it)"))
    return dict(found)


def uniform_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Every layer at `density` (RigL's 'random' / uniform)."""
    return [float(density)] * len(shapes)


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Erdos-Renyi-Kernel densities whose weighted mean is `density` (Evci et al. 2020, eq. in
    section 3; `sparse_utils.get_sparsities_erdos_renyi`): density_l = eps sum(shape_l) /
    prod(shape_l), with the layers that would exceed 1 made dense, the largest ratio first, and
    eps re-solved over the others.

    scatter_cnn's two convs and its head at density 0.2 (the head goes dense):

    >>> [round(d, 4) for d in erk_densities([(64, 243, 3, 3), (64, 64, 3, 3), (10, 1024)], 0.2)]
    [0.1359, 0.221, 1.0]
    """
    if density >= 1:
        return [1.0] * len(shapes)  # dense (GraNet's start)
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, sizes)]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        divisor = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        if budget <= 0 or divisor <= 0:
            raise ValueError(f"ERK cannot meet density {density} over layers {list(shapes)}")
        eps = budget / divisor
        largest = max(raw[i] for i in range(len(sizes)) if i not in dense)
        if eps * largest <= 1:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        dense |= {i for i in range(len(sizes)) if i not in dense and raw[i] == largest}


DENSITIES: dict[str, Callable[[Sequence[Sequence[int]], float], list[float]]] = {
    "erk": erk_densities, "uniform": uniform_densities}


def layer_counts(sizes: Sequence[int], densities: Sequence[float], density: float) -> list[int]:
    """Active weights per layer: floor(density_l n_l), plus one for the layers with the largest
    fractional parts until the total is round(density x sum n_l) exactly."""
    exact = [d * n for d, n in zip(densities, sizes)]
    counts = [min(n, math.floor(x)) for x, n in zip(exact, sizes)]
    rest = round(density * sum(sizes)) - sum(counts)
    order = sorted((i for i in range(len(sizes)) if counts[i] < sizes[i]), key=lambda i: counts[i] - exact[i])
    for i in order[:max(rest, 0)]:
        counts[i] += 1
    return counts


def drop_fraction(t: int, *, fraction: float, end: int) -> float:
    """The fraction of a layer's active weights an update after iterate t drops and regrows:
    alpha / 2 (1 + cos(pi t / end)) (RigL's 'cosine' anneal, begin step 0), 0 from `end` on."""
    return 0.0 if t >= end else fraction / 2 * (1 + math.cos(math.pi * t / end))


def is_update_step(t: int, *, every: int, end: int) -> bool:
    """Masks change after iterates t = every, 2 every, ... before `end` (a fixed schedule: an
    adaptive trigger would read private data)."""
    return 0 < t < end and t % every == 0


def gradual_density(t: int, *, initial: float, final: float, start: int, end: int) -> float:
    """The density after iterate t of gradual magnitude pruning (Zhu & Gupta 2018, "To prune,
    or not to prune", eq. 1; GraNet's `pruning`): `initial` up to `start`, then
    final + (initial - final) (1 - (t - start) / (end - start))^3, `final` from `end` on.

    >>> [round(gradual_density(t, initial=1.0, final=0.2, start=0, end=10), 4) for t in (0, 5, 10, 11)]
    [1.0, 0.3, 0.2, 0.2]
    """
    if t <= start:
        return initial
    if t >= end:
        return final
    return final + (initial - final) * (1 - (t - start) / (end - start)) ** 3


def is_prune_step(t: int, *, every: int, start: int, end: int) -> bool:
    """Gradual pruning after iterates start + every, start + 2 every, ... before `end`, and
    after `end` itself, where the budget is reached exactly (a fixed schedule)."""
    return start < t <= end and ((t - start) % every == 0 or t == end)


def _ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of a flat tensor; ties by index (reproducible)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def global_magnitude_masks(weights: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Masks keeping the `count` largest |w| over all `weights` together, exactly (ties by
    position): Sup-tickets' prune of the superposition back to the budget (Yin et al. 2022;
    the reference keeps |w| >= the count-th largest, more than `count` on ties). Global, so a
    layer's density can move away from its ERK share.

    >>> [m.tolist() for m in global_magnitude_masks([torch.tensor([3., -1.]), torch.tensor([0.5, -2.])], 2)]
    [[True, False], [False, True]]
    """
    flat = torch.cat([w.detach().abs().reshape(-1).float() for w in weights])
    if not 0 <= count <= flat.numel():
        raise ValueError(f"Expected 0 <= {count=} <= {flat.numel()} weights")
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[_ranked(flat, count)] = True
    return [m.view(w.shape) for m, w in zip(keep.split([w.numel() for w in weights]), weights)]


class Masks:
    """Boolean masks over named weights (`prunable`), with random initial masks of the
    `init` densities ('erk' or 'uniform') meeting `density` exactly.

    Args:
        params: name -> weight, the tensors to mask (in a fixed order).
        density: the fraction of their entries that are active, in (0, 1].
        init: a key of `DENSITIES`.
        seed: seeds the public generator of the initial masks (and of SET's regrowth).
    """

    def __init__(self, params: dict[str, nn.Parameter], *, density: float, init: str = "erk", seed: int = 0) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"Expected 0 < {density=} <= 1")
        if init not in DENSITIES:
            raise ValueError(f"init must be one of {', '.join(DENSITIES)}; got {init!r}")
        self.names, self.params = list(params), list(params.values())
        self.generator = torch.Generator().manual_seed(seed)
        sizes = [p.numel() for p in self.params]
        counts = layer_counts(sizes, DENSITIES[init]([tuple(p.shape) for p in self.params], density), density)
        if empty := [name for name, count in zip(self.names, counts) if count == 0]:  # its output ignores its input
            raise ConfigError(f"method.sparsity_density={density} with method.sparsity_init={init} leaves no active "
                              f"weight in {', '.join(empty)}: raise the density, or use erk")
        self.masks = []
        for p, n, count in zip(self.params, sizes, counts):
            flat = torch.zeros(n, dtype=torch.bool)
            flat[torch.randperm(n, generator=self.generator)[:count]] = True
            self.masks.append(flat.view(p.shape).to(p.device))
        self.apply()

    @classmethod
    def for_model(cls, model: nn.Module, *, density: float, init: str = "erk", seed: int = 0,
                  classifier: bool = False) -> "Masks":
        return cls(prunable(model, classifier=classifier), density=density, init=init, seed=seed)

    @property
    def active(self) -> list[int]:
        """Active weights per layer."""
        return [int(m.sum()) for m in self.masks]

    @property
    def density(self) -> float:
        return sum(self.active) / sum(m.numel() for m in self.masks)

    def masked(self, grads: dict[nn.Parameter, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
        """`grads` with the inactive coordinates of the masked weights set to 0 (what the
        optimizer applies: its moments of inactive weights then stay 0)."""
        by_param = {id(p): m for p, m in zip(self.params, self.masks)}
        return {p: g.masked_fill(~by_param[id(p)], 0.0) if id(p) in by_param else g for p, g in grads.items()}

    @torch.no_grad()
    def apply(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Zero the inactive weights and their optimizer state (momentum, Adam moments: every
        state tensor of a weight's shape), after every step: weight decay and momentum must
        not move a weight that does not exist (TimDettmers/sparse_learning#21)."""
        for p, m in zip(self.params, self.masks):
            p.masked_fill_(~m, 0.0)
            if optimizer is not None:
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.masked_fill_(~m, 0.0)

    def random_scores(self) -> list[torch.Tensor]:
        """Uniform scores from the public generator: SET's random regrowth."""
        return [torch.rand(p.shape, generator=self.generator).to(p.device) for p in self.params]

    @torch.no_grad()
    def update(self, fraction: float, grow_scores: Sequence[torch.Tensor],
               optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Drop and regrow in every layer (RigL `_get_update_op`): keep the n - k largest |w|
        of its n active weights, k = floor(fraction n), and grow the k largest `grow_scores`
        among all the others (just-dropped ones included). A grown weight that was inactive
        starts at 0 with zero optimizer state (RigL's grow_init 'zeros' and `reset_momentum`);
        one dropped and regrown at once keeps its value and state (`reinit_when_same=False`).
        Returns the number of weights that became active."""
        grown = 0
        for i, (p, mask, score) in enumerate(zip(self.params, self.masks, grow_scores)):
            flat = mask.view(-1)
            n = int(flat.sum())
            k = int(fraction * n)
            if k == 0:
                continue
            kept = torch.zeros_like(flat)
            kept[_ranked(p.detach().abs().view(-1).masked_fill(~flat, -1.0), n - k)] = True
            new = kept.clone()
            new[_ranked(score.detach().reshape(-1).float().masked_fill(kept, -math.inf), k)] = True
            fresh = (new & ~flat).view(p.shape)
            self.masks[i] = new.view(p.shape)
            p.masked_fill_(fresh, 0.0)
            if optimizer is not None:
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.masked_fill_(fresh, 0.0)
            grown += int(fresh.sum())
        self.apply(optimizer)  # the dropped weights and their state
        return grown

    @torch.no_grad()
    def prune_global(self, count: int, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Keep the `count` largest |w| of the active weights over all layers together (GraNet's
        global magnitude prune; a layer's density can move away from its initial share), zero
        the others and their optimizer state. Returns the number of weights pruned."""
        active = sum(self.active)
        if count >= active:
            return 0
        flat = torch.cat([p.detach().abs().reshape(-1).float().masked_fill(~m.reshape(-1), -1.0)
                          for p, m in zip(self.params, self.masks)])  # an inactive weight ranks last
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[_ranked(flat, count)] = True
        self.masks = [k.view(p.shape) for k, p in zip(keep.split([p.numel() for p in self.params]), self.params)]
        self.apply(optimizer)
        return active - count

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.cpu() for n, m in zip(self.names, self.masks)}, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        if list(masks) != self.names or any(masks[n].shape != p.shape for n, p in zip(self.names, self.params)):
            raise ValueError(f"mask state for {list(masks)[:3]}... does not fit the weights {self.names[:3]}...")
        self.masks = [masks[n].to(device=p.device, dtype=torch.bool) for n, p in zip(self.names, self.params)]
        self.generator.set_state(state["generator"])
