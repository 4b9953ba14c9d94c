"""Averages and ensembles of the DP-SGD iterates: post-processing, so free of privacy cost.

Every method here reads only the parameters the training loop hands it, never data, and
collects iterates by schedule (a step rule), never by a metric on private data (design rules
1 and 5). All share one interface: `update(model, step)` after each DP step (`step` = steps
done, so iterate t), `members()` the models whose mean softmax is the method's prediction,
and `state_dict`/`load_state_dict` so that a resumed run continues them exactly.

* `EMA`: De et al. 2022, warm-up decay_t = min(decay, (1 + t) / (10 + t)) (jax_privacy).
* `Polyak`: uniform average of every iterate after a start step (Polyak & Juditsky 1992).
* `SWA`: uniform average of the iterates a collection rule picks (Izmailov et al. 2018).
* `Snapshots`: FGE (Garipov et al. 2018) / SGDR snapshot ensembles (Huang et al. 2017): the
  iterates at the lr minima of the cycles; prediction = mean of the members' softmaxes.
* `SWAG`: Maddox et al. 2019, "A simple baseline for Bayesian uncertainty in deep learning":
  running mean and variance of the collected iterates plus the last K deviations from the
  mean (a d x K factor, never a d x d matrix); samples
  theta = mean + sqrt(scale) * (diag_std * z1 + D z2 / sqrt(K - 1)), and SWAG-diagonal
  (the first term only); Bayesian model averaging over N samples. Its memory is
  (rank + 2) x d floats in host memory: 20 x 2.7M for WRN-16-4 (0.2 GB), but 20 GB for an
  NFNet-F3, where a small rank must be chosen.
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
from torch.nn.utils import parameters_to_vector

from .config import AveragingConfig, ConfigError

__all__ = ["Averager", "EMA", "Polyak", "SWA", "Snapshots", "SWAG", "Every", "AtMinima", "make_averagers",
           "prediction_methods", "METHODS"]

Rule = Callable[[int], bool]  # steps done -> collect this iterate?


@dataclass(frozen=True)
class Every:
    """Collect iterate t when t > start and (t - start) is a multiple of `every`."""

    start: int
    every: int

    def __call__(self, t: int) -> bool:
        return t > self.start and (t - self.start) % self.every == 0


@dataclass(frozen=True)
class AtMinima:
    """Collect iterate t when step t - 1 took a cycle's lowest lr (`Schedule.is_minimum`) and t > start."""

    is_minimum: Callable[[int], bool]
    start: int = 0

    def __call__(self, t: int) -> bool:
        return t > self.start and self.is_minimum(t - 1)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A copy for the averaged weights that shares the live model's frozen parameters (a
    head-only fine-tune of a large NFNet must not hold its frozen trunk once per averager) and
    its buffers (never averaged; e.g. the released input statistics of `Standardize`, set in
    place after the averagers exist and restored in place on resume)."""
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in model.buffers()})
    out = copy.deepcopy(model, memo).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _flat(params: list[nn.Parameter]) -> torch.Tensor:
    """Parameters as one vector on the CPU (snapshots and moments live in host memory)."""
    return parameters_to_vector([p.detach() for p in params]).to("cpu", copy=True)


@torch.no_grad()
def _load_flat(vector: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Copy a flat vector into parameters, on their device (unlike `vector_to_parameters`,
    which would rebind them to the vector's device)."""
    i = 0
    for p in params:
        p.copy_(vector[i:i + p.numel()].view_as(p))
        i += p.numel()


class Averager(abc.ABC):
    """The common interface. `count` is the number of iterates collected so far. Only the
    trainable parameters are averaged and stored; the frozen ones are the model's own."""

    name = "averager"

    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.model = _frozen_copy(model)  # the averaged (or sampled) weights, usable as a model
        own = dict(self.model.named_parameters())
        self.params = [own[n] for n in self.names]  # the averaged ones, in the live model's order
        self.count = 0

    @abc.abstractmethod
    def update(self, model: nn.Module, step: int) -> None:
        """Take iterate `step` (the number of DP steps done) into account, or not, by rule."""

    def members(self, generator: Optional[torch.Generator] = None) -> Iterator[nn.Module]:
        """The models whose mean softmax is this method's prediction (one for an average)."""
        if self.count == 0:
            raise ValueError(f"{self.name} has collected no iterate yet")
        yield self.model

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "weights": {n: p.detach().clone() for n, p in zip(self.names, self.params)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also reads checkpoints written before averagers kept trainable parameters only
        (their `weights` are a whole state dict: the trainable entries are taken)."""
        weights = state["weights"]
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise KeyError(f"{self.name} state lacks parameters {missing[:3]}")
        for n, p in zip(self.names, self.params):
            p.copy_(weights[n])
        self.count = int(state["count"])


class EMA(Averager):
    """theta_ema <- d_t theta_ema + (1 - d_t) theta, d_t = min(decay, (1 + t) / (10 + t)) with warm-up."""

    name = "ema"

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool = True) -> None:
        super().__init__(model)
        self.decay, self.warmup = decay, warmup

    def decay_at(self, t: int) -> float:
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.decay_at(self.count)
        for avg, p in zip(self.params, _trainable(model)):
            avg.mul_(d).add_(p.detach(), alpha=1 - d)
        self.count += 1


class SWA(Averager):
    """Uniform average of the iterates that `rule` collects."""

    name = "swa"

    def __init__(self, model: nn.Module, *, rule: Rule) -> None:
        super().__init__(model)
        self.rule = rule

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if not self.rule(step):
            return
        self.count += 1
        for avg, p in zip(self.params, _trainable(model)):
            avg.add_(p.detach() - avg, alpha=1 / self.count)


class Polyak(SWA):
    """Uniform average of every iterate after `start` steps."""

    name = "polyak"

    def __init__(self, model: nn.Module, *, start: int = 0) -> None:
        super().__init__(model, rule=Every(start, 1))


class Snapshots(Averager):
    """The iterates that `rule` collects (FGE: the lr minima of the cycles), kept as flat
    parameter vectors; `members()` loads each in turn."""

    name = "fge"

    def __init__(self, model: nn.Module, *, rule: Rule) -> None:
        super().__init__(model)
        self.rule = rule
        self.vectors: list[torch.Tensor] = []
        self.steps: list[int] = []

    def update(self, model: nn.Module, step: int) -> None:
        if self.rule(step):
            self.vectors.append(_flat(_trainable(model)))
            self.steps.append(step)
            self.count += 1

    @torch.no_grad()
    def members(self, generator: Optional[torch.Generator] = None) -> Iterator[nn.Module]:
        if not self.vectors:
            raise ValueError(f"{self.name} has collected no snapshot yet")
        for v in self.vectors:
            _load_flat(v, self.params)
            yield self.model

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "steps": list(self.steps),
                "vectors": torch.stack(self.vectors) if self.vectors else torch.empty(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.steps = int(state["count"]), [int(s) for s in state["steps"]]
        self.vectors = [v.clone() for v in state["vectors"]] if self.count else []


class SWAG(Averager):
    """Moments of the iterates that `rule` collects: mean, diagonal variance (Welford's update,
    which avoids the cancellation of E[theta^2] - E[theta]^2 in float32) and the last `rank`
    deviations theta_i - mean_i (a rank x d ring buffer)."""

    name = "swag"

    def __init__(self, model: nn.Module, *, rule: Rule, rank: int = 20, scale: float = 0.5,
                 diagonal: bool = False) -> None:
        if rank < 2:
            raise ValueError(f"SWAG needs rank >= 2 (it divides by rank - 1), got {rank=}")
        super().__init__(model)
        self.rule, self.rank, self.scale, self.diagonal = rule, rank, scale, diagonal
        d = sum(p.numel() for p in self.params)
        dtype = self.params[0].dtype
        self.mean = torch.zeros(d, dtype=dtype)
        self.m2 = torch.zeros(d, dtype=dtype)                # sum of squared deviations (Welford)
        self.deviations = torch.zeros(rank, d, dtype=dtype)  # rows: the last `rank` deviations, a ring buffer
        self.stored = 0                         # rows in use (<= rank)

    def update(self, model: nn.Module, step: int) -> None:
        if not self.rule(step):
            return
        theta = _flat(_trainable(model))
        self.count += 1
        delta = theta - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (theta - self.mean)
        self.deviations[(self.count - 1) % self.rank] = theta - self.mean
        self.stored = min(self.count, self.rank)

    @property
    def variance(self) -> torch.Tensor:
        return (self.m2 / max(self.count, 1)).clamp_min(1e-30)

    def sample(self, generator: Optional[torch.Generator] = None, *, diagonal: Optional[bool] = None
               ) -> torch.Tensor:
        """One flat parameter vector theta = mean + sqrt(scale) (std * z1 + D^T z2 / sqrt(K - 1)),
        K the number of stored deviations; diagonal: theta = mean + std * z1, SWAG-Diagonal's
        N(mean, Sigma_diag) (Maddox et al. 2019, section 3: the scale 1/2 of full SWAG shares its
        covariance between the two terms, and is not applied to the diagonal one alone)."""
        diagonal = self.diagonal if diagonal is None else diagonal
        z1 = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        draw = self.variance.sqrt() * z1
        if not diagonal:
            if self.stored < 2:
                raise ValueError(f"SWAG needs >= 2 collected iterates for its low-rank part, has {self.stored}")
            z2 = torch.randn(self.stored, generator=generator, dtype=self.mean.dtype)
            draw += self.deviations[: self.stored].T @ z2 / (self.stored - 1) ** 0.5
        return self.mean + (1.0 if diagonal else self.scale ** 0.5) * draw

    @torch.no_grad()
    def members(self, generator: Optional[torch.Generator] = None, *, samples: int = 30,
                diagonal: Optional[bool] = None) -> Iterator[nn.Module]:
        if self.count < 2:
            raise ValueError(f"{self.name} needs >= 2 collected iterates, has {self.count}")
        for _ in range(samples):
            _load_flat(self.sample(generator, diagonal=diagonal), self.params)
            yield self.model

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.clone(), "m2": self.m2.clone(),
                "deviations": self.deviations.clone(), "stored": self.stored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["deviations"].shape != self.deviations.shape:
            raise ValueError(f"SWAG state has deviations of shape {tuple(state['deviations'].shape)}, "
                             f"expected {tuple(self.deviations.shape)} (rank x parameters)")
        self.count, self.stored = int(state["count"]), int(state["stored"])
        self.mean, self.m2 = state["mean"].clone(), state["m2"].clone()
        self.deviations = state["deviations"].clone()


def _collected(rule: Rule, total_steps: int) -> int:
    return sum(rule(t) for t in range(1, total_steps + 1))


def length_problems(cfg: AveragingConfig, *, total_steps: int,
                    is_minimum: Optional[Callable[[int], bool]] = None) -> list[str]:
    """Every way the averagers a config asks for would not fit a `total_steps`-step run (each
    must collect at least one iterate, SWAG two), as messages naming the setting. Without
    `is_minimum` (the schedule's lr minima, when the schedule itself is refused) the checks
    that need it are skipped."""
    out = []
    if cfg.polyak_start >= total_steps:
        out.append(f"averaging.polyak_start={cfg.polyak_start} is beyond the run ({total_steps} steps)")
    if cfg.swa or cfg.swag:
        if cfg.swa_start >= total_steps:
            out.append(f"averaging.swa_start={cfg.swa_start} is beyond the run ({total_steps} steps)")
        elif cfg.swa_every or is_minimum is not None:
            rule: Rule = Every(cfg.swa_start, cfg.swa_every) if cfg.swa_every else AtMinima(is_minimum, cfg.swa_start)
            n = _collected(rule, total_steps)
            if n < (2 if cfg.swag else 1):
                how = f"every {cfg.swa_every} steps" if cfg.swa_every else "at the lr minima of the cycles"
                out.append(f"SWA/SWAG would collect {n} iterate(s) after averaging.swa_start={cfg.swa_start} {how} "
                           f"in a {total_steps}-step run; " + ("SWAG needs at least 2" if cfg.swag else
                                                                "it needs at least 1"))
    if cfg.snapshots and is_minimum is not None and _collected(AtMinima(is_minimum), total_steps) < 1:
        out.append(f"averaging.snapshots: no lr minimum falls within the {total_steps}-step run")
    return out


def make_averagers(cfg: AveragingConfig, model: nn.Module, *, total_steps: int,
                   is_minimum: Callable[[int], bool]) -> dict[str, Averager]:
    """The averagers a config asks for, checked against the run's length before any privacy
    is spent (`length_problems`).

    Raises:
        ConfigError: a start beyond the run, or a rule that collects too little (every one found).
    """
    problems = length_problems(cfg, total_steps=total_steps, is_minimum=is_minimum)
    if problems:
        raise ConfigError("; ".join(problems))
    out: dict[str, Averager] = {"ema": EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup),
                                "polyak": Polyak(model, start=cfg.polyak_start)}
    rule: Rule = Every(cfg.swa_start, cfg.swa_every) if cfg.swa_every else AtMinima(is_minimum, cfg.swa_start)
    if cfg.swa:
        out["swa"] = SWA(model, rule=rule)
    if cfg.swag:
        out["swag"] = SWAG(model, rule=rule, rank=cfg.swag_rank, scale=cfg.swag_scale)
    if cfg.snapshots:
        out["fge"] = Snapshots(model, rule=AtMinima(is_minimum))
    return out


# in report order; tickets, suptickets and pswa are kept by methods (dpwa/methods/edst.py, suptickets.py, pswa.py),
# not averagers
METHODS = ("raw", "ema", "polyak", "swa", "fge", "swag", "swag_diag", "tickets", "suptickets", "pswa")


def prediction_methods(model: nn.Module, averagers: dict[str, Averager], *, swag_samples: int = 30,
                       seed: int = 0) -> dict[str, Callable[[], Iterator[nn.Module]]]:
    """For each method the averagers support, a function returning the models to ensemble:
    `raw` is the last iterate; SWAG draws `swag_samples` models from a generator seeded with
    `seed` (sampling is post-processing: the seed may be public)."""
    out: dict[str, Callable[[], Iterator[nn.Module]]] = {"raw": lambda: iter([model])}
    for name, avg in averagers.items():
        if name == "swag":
            swag = avg
            assert isinstance(swag, SWAG)
            for key, diag in (("swag", False), ("swag_diag", True)):
                out[key] = (lambda diag=diag: swag.members(torch.Generator().manual_seed(seed),
                                                           samples=swag_samples, diagonal=diag))
        else:
            out[name] = avg.members
    return {k: out[k] for k in METHODS if k in out}
