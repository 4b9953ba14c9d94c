"""Loss landscapes of released weights: Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing
the loss landscape of neural nets" (NeurIPS; reference code tomgoldstein/loss-landscape,
`net_plotter.py`, `plot_surface.py`, `plot_2D.py`).

f(a) = L(theta + a d) (1D) and f(a, b) = L(theta + a d1 + b d2) (2D) on a grid, along:

* random filter-normalised directions (`random_direction`): Gaussian, then each output filter
  (dim 0 of a conv or linear weight) of d is rescaled to the norm of the same filter of theta,
  so that plots of networks with other weight scales compare (Li et al. section 4). Every other
  entry is zero: biases, GroupNorm affines, per-channel gains, frozen parameters, buffers such
  as `Standardize`'s released statistics. The role of an entry comes from its module's type and
  its name (`parameter_roles`), never from its shape: the reference's `ignore='biasbn'` keys on
  dim <= 1, so NF gains shaped (C, 1, 1, 1) get perturbed as if they were filters. A
  weight-standardised conv (`WSConv2d`, timm's StdConv2d / ScaledStdConv2d) computes with
  (v - mean v) / std v per filter, blind to a filter's mean and scale: its direction is centred
  per filter (a shift along the mean does nothing) and normalised against the centred weight.
* the direction towards another weight vector (`target_direction`): d = theta_2 - theta_1 over
  every floating entry, buffers included (two runs' released input statistics differ), so
  a = 1 is theta_2 exactly: the last iterate -> the EMA of one run, or the same method of two
  runs. A second direction (2D) is random and filter-normalised, as in the reference.
* the top principal directions of the saved trajectory (`pca_directions`, Li et al. section 7):
  a run folder keeps no iterate history but its FGE snapshots or SWAG's stored deviations.

Privacy: directions read only released weights, and a surface on the test split is
post-processing: free. A surface on the training split (or the validation split carved from
it) reads private examples: refused unless given its own budget, then each grid point's mean
loss is one release of `dpwa.loss_query.LossMechanism`, reserved and committed in the ledger
(methods.md R4). Values are filled by index into NaN arrays: a noisy loss <= 0 is a value, never
"not computed". The models are GroupNorm / WS / NF networks, so a perturbed weight vector needs
no batch-norm statistics recomputed on training data (R1).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from accounting import MIN_NOISE_MULTIPLIER

from .data import carve_outside, outside_guarantee
from .errors import UsageError
from .evaluate import metrics
from .models.ws import WSConv2d
from .rows import Rows, example_losses, tiling_of

__all__ = ["LandscapeError", "LandscapeSpec", "Grid", "FILTER", "CENTRED", "ZERO", "register_filter_layer",
           "parameter_roles", "state_of", "filter_normalize", "random_direction", "target_direction",
           "pca_directions", "surface", "Logits", "split_metrics", "private_loss", "subset_indices", "private_subset", "check_split",
           "landscape_run", "draw_1d", "draw_contours", "draw_surface"]

State = dict[str, torch.Tensor]
Measure = Callable[[nn.Module, Sequence[float]], dict[str, float]]  # (model at the point, coords)

FILTER, CENTRED, ZERO = "filter", "centred filter", "zero"
#: the layers whose `weight` is a bank of output filters, by class or by "module.QualName"
#: (timm's are named, so that timm is not imported to look them up); the most derived class wins
_LAYERS: dict[Any, str] = {
    nn.Linear: FILTER, nn.modules.conv._ConvNd: FILTER, WSConv2d: CENTRED,
    **{f"timm.layers.std_conv.{n}": CENTRED for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                                      "ScaledStdConv2dSame")}}
SINGLE_WEIGHT_METHODS = ("raw", "ema", "polyak", "swa")  # as dpwa.curvature: one weight vector each


class LandscapeError(UsageError):
    """The landscape cannot be computed as asked (exit 2, nothing charged); the message says why."""


def register_filter_layer(layer: type | str, *, standardized: bool = False) -> None:
    """Declare a layer type whose `weight` holds output filters along dim 0 (standardized: its
    forward standardises each filter, so directions are centred per filter)."""
    _LAYERS[layer] = CENTRED if standardized else FILTER


def _layer_role(module: nn.Module) -> Optional[str]:
    for cls in type(module).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            if key in _LAYERS:
                return _LAYERS[key]
    return None


def _entries(model: nn.Module) -> State:
    """The model's parameters and floating-point buffers, by name (the live tensors)."""
    out = dict(model.named_parameters())
    out.update((k, b) for k, b in model.named_buffers() if b.is_floating_point())
    return out


def state_of(model: nn.Module) -> State:
    """A detached CPU copy of the model's parameters and floating-point buffers."""
    return {k: v.detach().to("cpu", copy=True) for k, v in _entries(model).items()}


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """FILTER, CENTRED (a weight-standardised layer's weight) or ZERO for every entry of
    `state_of(model)`: only the trainable `weight` of a registered conv / linear layer moves."""
    roles = {k: ZERO for k in _entries(model)}
    for prefix, module in model.named_modules():
        role = _layer_role(module)
        weight = module._parameters.get("weight") if role else None
        key = f"{prefix}.weight" if prefix else "weight"
        if role and weight is not None and weight.requires_grad and weight.dim() >= 2 and key in roles:
            roles[key] = role
    return roles


def filter_normalize(direction: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                     roles: Mapping[str, str]) -> State:
    """Li et al.'s filter normalisation: d_i <- d_i ||w_i|| / (||d_i|| + 1e-10) for each output
    filter i of a FILTER entry; centred first (d_i and w_i minus their means) for a CENTRED one;
    zero for every ZERO entry."""
    out = {}
    for k, d in direction.items():
        if roles[k] == ZERO:
            out[k] = torch.zeros_like(d)
            continue
        d2, w2 = d.flatten(1), weights[k].flatten(1).to(d)
        if roles[k] == CENTRED:
            d2, w2 = d2 - d2.mean(1, keepdim=True), w2 - w2.mean(1, keepdim=True)
        out[k] = (d2 * (w2.norm(dim=1, keepdim=True) / (d2.norm(dim=1, keepdim=True) + 1e-10))).view_as(d)
    return out


def random_direction(model: nn.Module, generator: torch.Generator) -> State:
    """A filter-normalised Gaussian direction (CPU), drawn from `generator` (public randomness:
    the seed is stored with the figure, and the direction itself beside it)."""
    weights, roles = state_of(model), parameter_roles(model)
    raw = {k: torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.dtype) if roles[k] != ZERO
           else torch.zeros_like(w) for k, w in weights.items()}
    return filter_normalize(raw, weights, roles)


def target_direction(origin: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> State:
    """target - origin, entry by entry (buffers too: a = 1 is the target model exactly).

    Raises:
        LandscapeError: the two do not have the same entries and shapes (other architectures).
    """
    bad = sorted(set(origin) ^ set(target)) + [k for k in origin if k in target and origin[k].shape != target[k].shape]
    if bad:
        raise LandscapeError(f"the two weight vectors are of different models: entries {bad[:4]} differ "
                             "(a direction between them needs the same architecture)")
    return {k: target[k].to(origin[k]) - origin[k] for k in origin}


def pca_directions(vectors: torch.Tensor, names: Sequence[str], like: Mapping[str, torch.Tensor], dims: int
                   ) -> tuple[list[State], list[float], torch.Tensor]:
    """The top `dims` principal directions (unit norm) of the rows of `vectors` (k x d, flat over
    `names` in order), centred by their mean as the reference's sklearn PCA does; entries of
    `like` outside `names` are zero. Returns the directions, their explained-variance ratios and
    the rows' coordinates in them ((k, dims), relative to the rows' mean).

    Raises:
        LandscapeError: fewer than dims + 1 rows, or rows that span fewer than `dims` directions.
    """
    k = vectors.shape[0]
    if k < dims + 1:
        raise LandscapeError(f"{dims} principal directions need at least {dims + 1} saved iterates, the run kept {k}")
    x = vectors.double()
    centred = x - x.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    if s[dims - 1] <= 1e-12 * max(float(s[0]), 1e-300):
        raise LandscapeError(f"the saved iterates span fewer than {dims} directions (singular values {s.tolist()})")
    ratios = (s ** 2 / (s ** 2).sum())[:dims].tolist()
    dirs = []
    for v in vh[:dims]:
        out, i = {n: torch.zeros_like(t) for n, t in like.items()}, 0
        for n in names:
            t = like[n]
            out[n] = v[i:i + t.numel()].view(t.shape).to(t.dtype)
            i += t.numel()
        dirs.append(out)
    return dirs, ratios, centred @ vh[:dims].T


@dataclasses.dataclass(frozen=True)
class Grid:
    """Grid coordinates: xs (1D), or xs x ys (2D; values[i, j] is at (xs[i], ys[j]), any nx, ny)."""

    xs: tuple[float, ...]
    ys: Optional[tuple[float, ...]] = None

    @classmethod
    def linspace(cls, x_range: Sequence[float], nx: int, y_range: Optional[Sequence[float]] = None,
                 ny: Optional[int] = None) -> "Grid":
        ys = None if y_range is None else tuple(np.linspace(*y_range, ny or nx).tolist())
        return cls(tuple(np.linspace(*x_range, nx).tolist()), ys)

    @property
    def dims(self) -> int:
        return 1 if self.ys is None else 2

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.xs),) if self.ys is None else (len(self.xs), len(self.ys))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def points(self) -> Iterator[tuple[tuple[int, ...], tuple[float, ...]]]:
        for i, x in enumerate(self.xs):
            if self.ys is None:
                yield (i,), (x,)
            else:
                for j, y in enumerate(self.ys):
                    yield (i, j), (x, y)


def surface(model: nn.Module, origin: Mapping[str, torch.Tensor], directions: Sequence[Mapping[str, torch.Tensor]],
            grid: Grid, measure: Measure, *, progress: bool = False, desc: str = "landscape") -> dict[str, np.ndarray]:
    """`measure(model, coords)` at every grid point, with the model's weights set in place to
    origin + sum_k c_k d_k (one model reused; only entries that some direction moves are
    copied). Returns one array of grid.shape per measured quantity. The model is left at origin.
    """
    if len(directions) != grid.dims:
        raise LandscapeError(f"a {grid.dims}D grid needs {grid.dims} directions, got {len(directions)}")
    params = _entries(model)
    moving = _moving(origin, directions)
    base = {k: origin[k].to(params[k]) for k in moving}
    dirs = [{k: d[k].to(params[k]) for k in moving} for d in directions]
    values: dict[str, np.ndarray] = {}
    from tqdm import tqdm

    bar = tqdm(total=grid.size, desc=desc, unit="point", disable=not progress, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for index, coords in grid.points():
                for k in moving:
                    new = base[k].clone()
                    for c, d in zip(coords, dirs):
                        new.add_(d[k], alpha=float(c))
                    params[k].copy_(new)
                for name, value in measure(model, coords).items():
                    values.setdefault(name, np.full(grid.shape, np.nan))[index] = value
                bar.update(1)
    finally:
        bar.close()
        with torch.no_grad():
            for k in moving:
                params[k].copy_(base[k])
    return values


def check_representable(model: nn.Module, origin: Mapping[str, torch.Tensor],
                        directions: Sequence[Mapping[str, torch.Tensor]], grid: Grid) -> None:
    """Refuse a grid whose farthest point, origin + sum_k c_k d_k, does not fit the model's dtype:
    `surface` would stop there with an overflow, after a private query had paid for the points
    before it. A bound, in float64: max|origin| + sum_k max_c |c| max|d_k| per entry."""
    params = _entries(model)
    axes = [grid.xs] + ([grid.ys] if grid.ys is not None else [])
    reach = [max(abs(c) for c in axis) for axis in axes]
    for k in _moving(origin, directions):
        top = torch.finfo(params[k].dtype).max
        far = origin[k].double().abs().max().item() + sum(
            r * d[k].double().abs().max().item() for r, d in zip(reach, directions))
        if not (max(reach) <= top and far <= top):
            raise LandscapeError(
                f"the grid reaches coordinate {max(reach):g}, where {k!r} would be ~{far:.3g}, beyond "
                f"{params[k].dtype}'s largest value {top:.3g}: choose a smaller --range")


def _moving(origin: Mapping[str, torch.Tensor], directions: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    return [k for k in origin if any(bool(d[k].any()) for d in directions)]


Batches = Sequence[tuple[Any, torch.Tensor]]
_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # exact types: a subclass (WSConv2d) may not be linear in w


class Logits:
    """The logits of fixed batches at a grid point (`surface` has set the model's weights there).

    An exact shortcut, used when it fits in `max_cache_bytes`: in an `nn.Sequential` whose first
    moving layer is a plain conv or linear layer (ScatterNet + CNN: the 243-channel conv is ~95% of
    the forward cost), that layer's output is linear in its (weight, bias), so at origin +
    sum_k c_k d_k it is y_0 + sum_k c_k y_k with y_0 = layer(z; origin) and y_k = layer(z; d_k), z
    the output of the layers before it (which do not move). The 1 + dims outputs are computed once
    per batch; each grid point then runs only the layers after it. Build it with the model at
    origin.
    """

    def __init__(self, model: nn.Module, batches: Batches, inputs: Callable[[Any], torch.Tensor],
                 origin: Mapping[str, torch.Tensor], directions: Sequence[Mapping[str, torch.Tensor]], *,
                 max_cache_bytes: int = 1 << 30) -> None:
        self.batches, self.inputs = batches, inputs
        self.head = _linear_head(model, _moving(origin, directions))
        self.cache: Optional[list[list[torch.Tensor]]] = None
        if self.head is not None and batches:
            self.cache = self._outputs(model, origin, directions, max_cache_bytes)

    @torch.no_grad()
    def _outputs(self, model: nn.Module, origin: Mapping[str, torch.Tensor],
                 directions: Sequence[Mapping[str, torch.Tensor]], limit: int) -> Optional[list[list[torch.Tensor]]]:
        from torch.func import functional_call

        k = self.head
        layer, prefix = model[k], model[:k]
        own = [n for n, _ in layer.named_parameters()]
        device = next(layer.parameters()).device
        weights = [{n: v[f"{k}.{n}"].to(device) for n in own} for v in (origin, *directions)]
        cache, total = [], sum(len(y) for _, y in self.batches)
        for x, _ in self.batches:
            z = prefix(self.inputs(x))
            outs = [functional_call(layer, w, (z,)) for w in weights]
            if not cache and outs[0][0].numel() * outs[0].element_size() * len(outs) * total > limit:
                return None  # too big to keep: the plain forward
            cache.append(outs)
        return cache

    def __call__(self, model: nn.Module, coords: Sequence[float]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b, (x, y) in enumerate(self.batches):
            if self.cache is None:
                yield model(self.inputs(x)), y
                continue
            y0, *ys = self.cache[b]
            out = y0.clone()
            for c, part in zip(coords, ys):
                out.add_(part, alpha=float(c))
            yield model[self.head + 1:](out), y


def _linear_head(model: nn.Module, moving: Sequence[str]) -> Optional[int]:
    """The index of the first moving layer of an nn.Sequential if it is a plain conv / linear
    layer in which only weight and bias move (else None: no shortcut)."""
    if not isinstance(model, nn.Sequential) or not moving:
        return None
    for k, layer in enumerate(model):
        mine = {n.split(".", 1)[1] for n in moving if n.split(".", 1)[0] == str(k)}
        if mine:
            return k if type(layer) in _LINEAR and mine <= {"weight", "bias"} else None
    return None


def _examples(model: nn.Module, logits: Iterable[tuple[torch.Tensor, torch.Tensor]]
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch: the per-example losses (`dpwa.rows.example_losses`, the training loss), the
    predicted probabilities (a tiled model's mean over its members, as dpwa.evaluate) and labels."""
    for out, y in logits:
        rows = Rows(examples=len(y), views=1, tiling=tiling_of(model))
        yield (example_losses(out, y.to(out.device), rows).double().cpu(),
               rows.fold(out.float().softmax(-1)).mean(1).cpu(), y)


def split_metrics(logits: Logits) -> Measure:
    """Mean loss, accuracy, NLL and ECE (dpwa.evaluate.metrics) over public batches."""
    def measure(model: nn.Module, coords: Sequence[float]) -> dict[str, float]:
        losses, probs, labels = zip(*_examples(model, logits(model, coords)))
        m = metrics(torch.cat(probs), torch.cat(labels))
        return {"loss": float(torch.cat(losses).mean()), "accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"]}

    return measure


def private_loss(logits: Logits, mechanism: Any) -> Measure:
    """The released mean loss of private batches (`dpwa.loss_query.LossMechanism`), one release per point."""
    def measure(model: nn.Module, coords: Sequence[float]) -> dict[str, float]:
        return {"loss": mechanism.release(loss for loss, _, _ in _examples(model, logits(model, coords)))}

    return measure


def subset_indices(total: int, examples: Optional[int], seed: int) -> torch.Tensor:
    """A sorted random subset of `examples` of `total` indices (all if None), from public seed:
    for the public test split only (one example more reshuffles which positions are kept)."""
    if examples is None or examples >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:examples].sort().values


def private_subset(split: Any, examples: Optional[int], seed: int) -> torch.Tensor:
    """The sorted indices of `examples` examples of a private split (all if None), chosen by
    `dpwa.data.lowest_scores`: on neighbouring data the subsets are neighbours (at most one
    example in and one out), so the mean loss over them keeps its sensitivity B / n. A seeded
    permutation of positions would not: one example added shifts every position after it."""
    from .data import lowest_scores

    if examples is None or examples >= len(split):
        return torch.arange(len(split))
    return lowest_scores(split, examples, seed).nonzero().flatten()


def check_split(split: str, noise_multiplier: Optional[float], loss_clip: Optional[float]) -> None:
    """Refuse a private split without its own budget, before anything is read (design rule 5).

    Raises:
        LandscapeError: an unknown split; train / val without both --train-noise-multiplier and
            --loss-clip (or with values <= 0); a budget given for the free test split.
    """
    budget = (noise_multiplier, loss_clip)
    if split == "test":
        if budget != (None, None):
            raise LandscapeError("--train-noise-multiplier / --loss-clip charge a private split; the test split is "
                                 "public and free: drop them, or add --split train")
        return
    if split not in ("train", "val"):
        raise LandscapeError(f"--split {split!r}: choose test (free), train or val (private, charged)")
    which = "the training split" if split == "train" else "the validation split (carved from the training split)"
    if None in budget:
        raise LandscapeError(
            f"--split {split}: {which} is private, and a loss surface on it is a query of every grid point: "
            "give it its own budget with --train-noise-multiplier SIGMA --loss-clip B (each point's mean loss "
            "released by the Gaussian mechanism, charged to the ledger), or use --split test (free)")
    if not (MIN_NOISE_MULTIPLIER <= noise_multiplier < math.inf and 0 < loss_clip < math.inf):  # type: ignore[operator]
        raise LandscapeError(f"--train-noise-multiplier must be finite and >= {MIN_NOISE_MULTIPLIER:g} (the "
                             f"accountants' floor) and --loss-clip finite and > 0, got {noise_multiplier} and {loss_clip}")


@dataclasses.dataclass(frozen=True)
class LandscapeSpec:
    """What `landscape_run` computes; validated at construction (a LandscapeError, exit 2)."""

    dims: int = 2
    method: Optional[str] = None               # the centre theta: raw (last iterate; None) | ema | polyak | swa
    between: Optional[tuple[str, str]] = None  # direction from one method's weights to another's
    to: Optional[str] = None                   # direction to the same method of another run folder
    pca: bool = False                          # principal directions of the saved trajectory
    x_range: Optional[tuple[float, float]] = None  # default (-1, 1); (-0.5, 1.5) towards a target
    y_range: Optional[tuple[float, float]] = None  # default (-1, 1)
    points: tuple[int, ...] = (21,)            # nx [ny]
    split: str = "test"
    examples: Optional[int] = None             # a seeded subset of the split; all if None
    seed: int = 0                              # random directions and the subset (private: 64 bits, signed)
    batch_size: int = 1000                     # examples per forward pass
    train_noise_multiplier: Optional[float] = None  # sigma of each released private mean loss
    loss_clip: Optional[float] = None          # B: per-example losses clipped to [0, B]

    def __post_init__(self) -> None:
        check_split(self.split, self.train_noise_multiplier, self.loss_clip)
        if self.dims not in (1, 2):
            raise LandscapeError(f"--dims must be 1 or 2, got {self.dims}")
        if sum([self.between is not None, self.to is not None, self.pca]) > 1:
            raise LandscapeError("choose one kind of direction: --between, --to or --pca (default: random)")
        if self.between is not None and (len(self.between) != 2 or self.between[0] == self.between[1]):
            raise LandscapeError(f"--between takes two different methods, got {list(self.between)}")
        if self.between is not None and self.method is not None:
            raise LandscapeError(f"--method {self.method} with --between {' '.join(self.between)}: the centre is FROM "
                                 f"({self.between[0]}); drop --method")
        for name in (self.centre, *(self.between or ())):
            if name not in SINGLE_WEIGHT_METHODS:
                raise LandscapeError(f"{name!r}: a landscape is centred on one weight vector; choose from "
                                     f"{list(SINGLE_WEIGHT_METHODS)}")
        if not 1 <= len(self.points) <= self.dims or min(self.points) < 2:
            raise LandscapeError(f"--points takes {'NX' if self.dims == 1 else 'NX [NY]'}, each >= 2; got "
                                 f"{list(self.points)}")
        for name, r in (("--range x", self.x_range), ("--range y", self.y_range)):
            if r is not None and not (len(r) == 2 and all(map(math.isfinite, r)) and r[0] < r[1]):
                raise LandscapeError(f"{name} takes finite MIN MAX with MIN < MAX, got {list(r)}")
        if self.y_range is not None and self.dims == 1:
            raise LandscapeError("a y range needs --dims 2")
        if (self.examples is not None and self.examples < 1) or self.batch_size < 1:
            raise LandscapeError(f"--examples and --batch-size must be >= 1, got {self.examples}, {self.batch_size}")
        if self.charged and not -2**63 <= self.seed < 2**63:  # it keys the private subset's hash
            raise LandscapeError(f"--seed must fit in 64 bits on a private split (-2**63 <= seed < 2**63), "
                                 f"got {self.seed}")
        if not -2**63 <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise LandscapeError(f"--seed must lie in -2**63 <= seed < 2**64, got {self.seed}")

    @property
    def centre(self) -> str:
        """The weights the landscape is centred on: FROM of --between, else --method (raw)."""
        return self.between[0] if self.between else self.method or "raw"

    @property
    def kind(self) -> str:
        return "between" if self.between else "to" if self.to else "pca" if self.pca else "random"

    @property
    def charged(self) -> bool:
        return self.split != "test"

    def grid(self, defaults: Optional[Sequence[tuple[float, float]]] = None) -> Grid:
        """The grid; `defaults`: the ranges where none was given (PCA: around the trajectory)."""
        towards = self.kind in ("between", "to")
        x, y = defaults or ((-0.5, 1.5) if towards else (-1.0, 1.0), (-1.0, 1.0))
        if self.dims == 1:
            return Grid.linspace(self.x_range or x, self.points[0])
        return Grid.linspace(self.x_range or x, self.points[0], self.y_range or y, self.points[-1])


def _member(run: Any, name: str, run_dir: Path) -> nn.Module:
    available = run.prediction_methods()
    if name not in available:
        raise LandscapeError(f"{run_dir} did not keep {name!r} (kept: {list(available)})")
    try:
        return next(iter(available[name]()))
    except ValueError as e:  # an average that has collected nothing yet
        raise LandscapeError(f"{name}: {e}") from None


def _trajectory(run: Any, run_dir: Path, dims: int) -> tuple[torch.Tensor, list[str], str, bool]:
    """The saved iterates: FGE snapshots (points of the trajectory) or SWAG's stored deviations."""
    fge, swag = run.averagers.get("fge"), run.averagers.get("swag")
    found = []
    if fge is not None:
        found.append((fge.count, lambda: (torch.stack(fge.vectors), fge.names,
                                          f"{fge.count} FGE snapshots (steps {fge.steps})", True)))
    if swag is not None:
        found.append((swag.stored, lambda: (swag.deviations[:swag.stored], swag.names,
                                            f"SWAG's last {swag.stored} deviations from its running mean", False)))
    for count, get in found:
        if count >= dims + 1:
            return get()
    kept = ", ".join(f"{name} ({avg.count} iterates)" for name, avg in run.averagers.items())
    raise LandscapeError(
        f"{run_dir} keeps no trajectory of {dims + 1}+ iterates for {dims} principal directions: its folder holds the "
        f"last checkpoint, whose averages are {kept}. Train with averaging.snapshots: true (FGE snapshots at the "
        "lr minima of a cyclic schedule) or averaging.swag: true (its last swag_rank deviations), or use random "
        "directions")


def _covering(coords: torch.Tensor, margin: float = 0.25) -> tuple[float, float]:
    """A range over the centre (0) and every coordinate, widened by `margin` of its span each side
    (Li et al. choose their PCA plots' ranges to cover the trajectory)."""
    lo, hi = min(float(coords.min()), 0.0), max(float(coords.max()), 0.0)
    pad = margin * max(hi - lo, 1e-12)
    return lo - pad, hi + pad


def _flat(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1) for n in names]).double()


def _private_examples(run: Any, split: str, examples: Optional[int], seed: int) -> Any:
    """The chosen examples of a private split, read only now (after the reservation). They are
    chosen on the images (`private_subset`: keyed by pixels, as the carve is) and then given
    the run's fixed features, so that the choice never depends on how a feature extractor's
    floating point rounds in a batch of other examples."""
    from .data import PrivateDataAccess, Split, _take, load_data
    from .features import FEATURES

    cfg = run.cfg.data
    raw = load_data(dataclasses.replace(cfg, features="none"))
    if raw.source != run.data.source:
        raise PrivateDataAccess("the training data changed since the reservation (fingerprint differs): refused")
    part = raw.train if split == "train" else raw.val
    idx = private_subset(part, examples, seed)
    x = _take(part.x, idx)
    if cfg.features != "none":
        x = FEATURES[cfg.features](raw.normalize(x))
    return Split(x, part.y[idx])


def landscape_run(run_dir: Path, spec: LandscapeSpec, *, out: Optional[Path] = None, ledger_path: Optional[str] = None,
                  progress: bool = False, noise_generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """A 1D or 2D surface around a run folder's released weights (last checkpoint); writes
    STEM.json, STEM.npz, STEM-directions.safetensors and the PNGs into `out` (default
    RUN_DIR/landscape), STEM = KIND-{1,2}d-SPLIT. Charges nothing on the test split; a private
    split is reserved in the ledger as a query of its own before it is read, and committed.

    Args:
        noise_generator: TESTS ONLY, the loss mechanism's noise (default: secret).

    Raises:
        LandscapeError: what the run cannot give (a method, a trajectory, a validation split).
        ConfigError: not a run folder, no checkpoint.
        BudgetExceededError: the private query would pass the dataset's budget (nothing reserved).
    """
    from .curvature import _device
    from .run_folder import check_writable, curve_problem, load_run

    run_dir = Path(run_dir)
    run = load_run(run_dir)  # withholds the private training split
    if why := curve_problem(run.cfg, run_dir):
        raise LandscapeError(why)
    folder = Path(out) if out is not None else run_dir / "landscape"
    check_writable(folder, what="--out", holds="the landscape's files")  # before a query is charged and lost
    if spec.split == "val" and run.data.val is None:
        raise LandscapeError("--split val: the run's config has data.val_size=0, so there is no validation split")
    device = _device(run.cfg.train.device)
    centre = spec.centre
    model = copy.deepcopy(_member(run, centre, run_dir)).to(device).eval()  # its own tensors: nothing shared
    origin, gen = state_of(model), torch.Generator().manual_seed(spec.seed)
    info: dict[str, Any] = {}
    defaults = None
    labels = ["filter-normalised direction 1", "filter-normalised direction 2"]
    if spec.kind == "random":
        dirs = [random_direction(model, gen) for _ in range(spec.dims)]
    elif spec.kind == "pca":
        vectors, names, info["trajectory"], points = _trajectory(run, run_dir, spec.dims)
        dirs, ratios, coords = pca_directions(vectors, names, origin, spec.dims)
        info["explained_variance_ratio"] = ratios
        if points:  # the snapshots in the plane, relative to the centre (the directions are orthonormal)
            basis = torch.stack([_flat(d, names) for d in dirs])
            coords = (vectors.double() - _flat(origin, names)) @ basis.T
            info["trajectory_coordinates"] = coords.tolist()
        defaults = ([_covering(coords[:, k]) for k in range(spec.dims)] + [(-1.0, 1.0)])[:2]
        labels = [f"PC{i + 1} ({100 * r:.1f}% of the variance)" for i, r in enumerate(ratios)]
    else:
        if spec.kind == "between":
            target = state_of(_member(run, spec.between[1], run_dir))
            labels[0] = f"{spec.between[0]} -> {spec.between[1]}"
        else:
            other = load_run(Path(spec.to))
            if why := curve_problem(other.cfg, Path(spec.to)):
                raise LandscapeError(f"--to {spec.to}: {why}")
            target = state_of(_member(other, centre, Path(spec.to)))
            info["to"] = {"run_dir": str(spec.to), "run_id": other.meta["run_id"], "step": other.step,
                          "epsilon": other.epsilon}
            labels[0] = f"{centre}: this run -> {other.meta['run_id']}"
        towards = target_direction(origin, target)
        if not any(bool(d.any()) for d in towards.values()):  # a flat, meaningless surface along x
            raise LandscapeError(f"the direction {labels[0]} is zero: both ends are the same weights")
        dirs = [towards] + [random_direction(model, gen) for _ in range(spec.dims - 1)]
    grid = spec.grid(defaults)
    check_representable(model, origin, dirs, grid)  # before a private query is charged for nothing
    inputs = (lambda x: run.data.normalize(x).to(device))

    def batches_of(split: Any, idx: torch.Tensor) -> list[tuple[Any, torch.Tensor]]:
        b = spec.batch_size
        return [(split.x[idx[i:i + b]], split.y[idx[i:i + b]]) for i in range(0, len(idx), b)]

    charged: Any = False
    desc = f"{spec.kind} {spec.dims}D {spec.split}"
    outside = carve_outside(run.cfg.data) if spec.charged and run.cfg.privacy.enabled else {}
    for flag, what in outside.items():
        warnings.warn(outside_guarantee(flag, what), stacklevel=2)
    if not spec.charged:
        idx = subset_indices(len(run.data.test), spec.examples, spec.seed)
        logits = Logits(model, batches_of(run.data.test, idx), inputs, origin, dirs)
        values = surface(model, origin, dirs, grid, split_metrics(logits), progress=progress, desc=desc)
    else:
        from accounting import AccountingError, Gaussian, epsilon

        from .loss_query import LossMechanism, reserved_query

        size = len(run.data.train if spec.split == "train" else run.data.val)  # public N (Withheld knows it)
        count = size if spec.examples is None else min(spec.examples, size)
        mech = LossMechanism(noise_multiplier=spec.train_noise_multiplier, loss_clip=spec.loss_clip,
                             dataset_size=count, releases=grid.size, generator=noise_generator)
        events = [Gaussian(noise_multiplier=spec.train_noise_multiplier, count=grid.size)]
        with reserved_query(run, events=events, spent=mech.events, purpose="landscape",
                            ledger_path=ledger_path) as charged:
            chosen = _private_examples(run, spec.split, spec.examples, spec.seed)
            assert len(chosen) == count, (len(chosen), count)
            idx = torch.arange(count)
            logits = Logits(model, batches_of(chosen, idx), inputs, origin, dirs)
            values = surface(model, origin, dirs, grid, private_loss(logits, mech), progress=progress, desc=desc)
        try:
            charged["epsilon"] = epsilon(events, delta=run.meta["delta"], accountant=run.cfg.privacy.accountant)
        except AccountingError:
            charged["epsilon"] = None
        charged.update(noise_multiplier=spec.train_noise_multiplier, loss_clip=spec.loss_clip,
                       noise_std_of_mean=spec.train_noise_multiplier * spec.loss_clip / len(idx))
    report = {"run_id": run.meta["run_id"], "step": run.step, "steps": int(run.meta["steps"]), "epsilon": run.epsilon,
              "split": spec.split, "examples": len(idx), "dims": spec.dims, "directions": spec.kind,
              "method": centre, "between": list(spec.between) if spec.between else None, "seed": spec.seed,
              "grid": {"x": list(grid.xs), "y": list(grid.ys) if grid.ys else None},
              "values": {k: v.tolist() for k, v in values.items()}, "charged": charged,
              "outside_guarantee": list(outside), **info,
              "axis_labels": labels[:spec.dims]}
    return _write(report, dirs, grid, values, folder)


def _write(report: dict[str, Any], dirs: Sequence[State], grid: Grid, values: dict[str, np.ndarray], target: Path
           ) -> dict[str, Any]:
    from safetensors.torch import save_file

    from .checkpoint import atomic_write_text

    target.mkdir(parents=True, exist_ok=True)
    stem = target / f"{report['directions']}-{report['dims']}d-{report['split']}"
    files = {"json": f"{stem}.json", "npz": f"{stem}.npz", "directions": f"{stem}-directions.safetensors"}
    tensors = {f"{axis}/{k}": v.contiguous() for axis, d in zip("xy", dirs) for k, v in d.items()}
    save_file(tensors, files["directions"], metadata={
        "seed": str(report["seed"]), "directions": report["directions"], "run_id": report["run_id"],
        "method": report["method"], "step": str(report["step"]), "normalisation": "filter (Li et al. 2018), by role"})
    arrays = {"x": np.asarray(grid.xs)} | ({"y": np.asarray(grid.ys)} if grid.ys else {})
    noisy = " (noisy: Gaussian mechanism)" if report["charged"] else ""
    title = (f"{report['run_id']}\n{report['method']} at step {report['step']}, {report['split']} split "
             f"({report['examples']} examples){noisy}, {report['directions']} directions, seed {report['seed']}")
    labels = report["axis_labels"]
    towards = report["directions"] in ("between", "to")
    if grid.ys is None:
        files["plot"] = str(draw_1d({report["method"]: values}, grid.xs, Path(f"{stem}.png"), title=title,
                                    xlabel=labels[0], marks={"centre": 0.0} | ({"target": 1.0} if towards else {})))
    else:
        marks = {"centre": (0.0, 0.0)} | ({"target": (1.0, 0.0)} if towards else {})
        panels = {"loss": values["loss"]} | ({"accuracy (%)": 100 * values["accuracy"]} if "accuracy" in values else {})
        files["contour"] = str(draw_contours(panels, grid.xs, grid.ys, Path(f"{stem}-contour.png"), title=title,
                                             labels=labels, marks=marks,
                                             path_points=report.get("trajectory_coordinates")))
        files["surface"] = str(draw_surface(values["loss"], grid.xs, grid.ys, Path(f"{stem}-surface.png"),
                                            title=title, labels=labels))
    report["files"] = files
    np.savez(files["npz"], **arrays, **values, meta=np.array(json.dumps({k: v for k, v in report.items()
                                                                          if k != "values"})))
    atomic_write_text(Path(files["json"]), json.dumps(report, indent=2))
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def draw_1d(curves: Mapping[str, Mapping[str, np.ndarray]], xs: Sequence[float], path: Path, *, title: str = "",
            xlabel: str = "", marks: Optional[Mapping[str, float]] = None) -> Path:
    """Loss (left) and, where measured, accuracy (right) along one direction; one line per
    label; `marks`: named positions drawn as vertical lines (the centre, a target at 1)."""
    plt = _pyplot()
    with_acc = any("accuracy" in v for v in curves.values())
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(10 if with_acc else 5.5, 3.8), squeeze=False)
    for label, v in curves.items():
        axes[0, 0].plot(xs, v["loss"], marker=".", label=label)
        if with_acc and "accuracy" in v:
            axes[0, 1].plot(xs, 100 * np.asarray(v["accuracy"]), marker=".", label=label)
    for ax, name in zip(axes[0], ("loss", "accuracy (%)")):
        for k, (mark, at) in enumerate((marks or {}).items()):
            ax.axvline(at, color=f"C{7 + k}", lw=0.8, ls="--", label=mark)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _levels(z: np.ndarray, count: int = 16) -> Optional[np.ndarray]:
    """Contour levels at quantiles of z: readable whether the bowl is shallow or steep."""
    finite = z[np.isfinite(z)]
    if finite.size == 0:  # nothing to draw levels for (every point overflowed): an empty panel, not a crash
        return None
    levels = np.unique(np.quantile(finite, np.linspace(0, 1, count)))
    return levels if len(levels) >= 2 else None


def draw_contours(panels: Mapping[str, np.ndarray], xs: Sequence[float], ys: Sequence[float], path: Path, *,
                  title: str = "", labels: Sequence[str] = ("", ""), marks: Optional[Mapping[str, tuple]] = None,
                  path_points: Optional[Sequence[Sequence[float]]] = None, shared_levels: bool = False) -> Path:
    """One filled contour plot per panel (arrays (nx, ny), values[i, j] at (xs[i], ys[j]));
    shared_levels: one colour scale for all panels (comparing runs)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    common = _levels(np.concatenate([np.ravel(z) for z in panels.values()])) if shared_levels else None
    for ax, (name, z) in zip(axes[0], panels.items()):
        z = np.asarray(z, dtype=float).T  # matplotlib wants (ny, nx)
        levels = common if shared_levels else _levels(z)
        if levels is not None:
            filled = ax.contourf(xs, ys, z, levels=levels, cmap="viridis", extend="both")
            ax.contour(xs, ys, z, levels=levels, colors="k", linewidths=0.4)
            fig.colorbar(filled, ax=ax, label=name)
        if path_points:
            p = np.asarray(path_points, dtype=float)
            ax.plot(p[:, 0], p[:, 1], "w.-", ms=6, lw=0.8, label="trajectory")
        for mark, (mx, my) in (marks or {}).items():
            ax.plot([mx], [my], marker="*" if mark == "centre" else "o", color="red", ms=10, label=mark)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1] if len(labels) > 1 else "")
        if marks or path_points:
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw_surface(z: np.ndarray, xs: Sequence[float], ys: Sequence[float], path: Path, *, title: str = "",
                 labels: Sequence[str] = ("", ""), zlabel: str = "loss") -> Path:
    """The loss as a 3D surface (values (nx, ny))."""
    plt = _pyplot()
    fig = plt.figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot(projection="3d")
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    ax.plot_surface(gx, gy, np.asarray(z, dtype=float), cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel(labels[0], fontsize=7)
    ax.set_ylabel(labels[1] if len(labels) > 1 else "", fontsize=7)
    ax.set_zlabel(zlabel)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
