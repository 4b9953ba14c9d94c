"""Mode-connecting curves trained under DP (Garipov, Izmailov, Podoprikhin, Vetrov & Wilson
2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs", NeurIPS; code:
timgaripov/dnn-mode-connectivity, `curves.py`, `train.py`).

A curve between two trained weight vectors w_A, w_B with K = bends + 2 control points
theta_0 = w_A, theta_1..theta_{K-2} (trained), theta_{K-1} = w_B:

    w(t) = sum_j b_j(t) theta_j,  t in [0, 1]
    Bezier:    b_j(t) = C(K-1, j) t^j (1-t)^(K-1-j)          (Bernstein coefficients)
    PolyChain: b_j(t) = max(0, 1 - |t (K-1) - j|)             (a broken line through the theta_j)

Objective: E_{t ~ U(0,1)} L(w(t)), with one t per step as the reference draws one per
minibatch. The bends start on the segment, theta_j = w_A + j / (K-1) (w_B - w_A) (its
`init_linear`), so the initial curve is the segment for both types.

Under DP a step is an ordinary release followed by the chain rule (methods.md section 1):

    t ~ U[0, 1] from public randomness (seeded by train.seed: the same on every rank; in the
        checkpoint), so t and w(t) are public;
    the model's weights <- w(t); g = the step's one release at w(t) (clipped at w(t));
    grad theta_j = b_j(t) (g + wd w(t));  the optimizer steps on the bends.

Everything after the release is post-processing, so a step costs one DP-SGD release:
`releases(steps) = steps`. The weight decay wd = optim.weight_decay is the reference's
0.5 wd |w(t)|^2 (`curves.l2_regularizer`) and goes on the point of the curve, not on the
bends; it is added after the noise, since Opacus (and any per-example clipping) drops
loss-side regularisers (opacus#249); the optimizer's own weight decay is 0, as in the
reference. The effective clip in bend space is C b_j(t), and so is the noise.

Between steps the model holds the curve's midpoint w(1/2), a point of the released curve:
the loop's evaluations, its averages (of w(1/2): linear in the bends) and weights.safetensors
are those of that point. The released curve itself is the control points in the checkpoint
(`state["method"]["points"]`); `dpwa curve --eval` evaluates it along t (`dpwa.connectivity`).

Endpoints are released models of finished runs (their last iterate, EMA, Polyak or SWA
average: `method.curve_endpoint_models`), read from their checkpoints: post-processing. They
must share the curve's dataset, data and model config; `check_endpoints` refuses otherwise,
before anything is reserved. Only trainable parameters are on the curve; frozen parameters
and buffers must agree between the endpoints. model.input_norm=private is refused: the curve
run would release new feature statistics and evaluate every point under them, not under the
statistics its endpoints were trained with.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..config import ConfigError, RunConfig
from ..models import resolved_model_config
from ..optimizers import make_optimizer
from . import Method, Step, register_method

__all__ = ["CURVES", "bezier", "polychain", "combine", "Endpoint", "check_endpoints", "load_endpoints", "Curve"]


def bezier(t: float, points: int) -> list[float]:
    """Bernstein coefficients of a Bezier curve with `points` control points.

    >>> bezier(0.5, 3)
    [0.25, 0.5, 0.25]
    """
    n = points - 1
    return [math.comb(n, j) * t ** j * (1 - t) ** (n - j) for j in range(points)]


def polychain(t: float, points: int) -> list[float]:
    """Hat coefficients of a broken line through `points` nodes at t = j / (points - 1).

    >>> polychain(0.25, 3)
    [0.5, 0.5, 0.0]
    """
    n = points - 1
    return [max(0.0, 1.0 - abs(t * n - j)) for j in range(points)]


CURVES: dict[str, Callable[[float, int], list[float]]] = {"bezier": bezier, "polychain": polychain}


def combine(points: list[list[torch.Tensor]], coeffs: list[float]) -> list[torch.Tensor]:
    """sum_j coeffs[j] points[j], tensor by tensor (points[j]: one tensor per parameter)."""
    out = [torch.zeros_like(x) for x in points[0]]
    for c, point in zip(coeffs, points):
        if c:
            for o, x in zip(out, point):
                o.add_(x, alpha=c)
    return out


@dataclasses.dataclass
class Endpoint:
    """One endpoint as released: its run folder, config, run.json and checkpoint state."""

    path: Path
    which: str          # raw | ema | polyak | swa
    cfg: RunConfig
    meta: dict[str, Any]
    state: dict[str, Any]

    def trainable(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The chosen model's trainable tensors by name."""
        if self.which == "raw":
            source = self.state["model"]
        else:
            avg = self.state.get("averagers", {}).get(self.which)
            if avg is None or not avg.get("count"):
                raise ConfigError(f"curve endpoint {self.path}: the run kept no {self.which} model "
                                  f"(method.curve_endpoint_models); its checkpoint has "
                                  f"{', '.join(['raw', *self.state.get('averagers', {})])}")
            source = avg["weights"]
        missing = [n for n in names if n not in source]
        if missing:
            raise ConfigError(f"curve endpoint {self.path}: its {self.which} weights lack {missing[:3]}: not the "
                              "curve's model")
        return {n: source[n] for n in names}


# data keys that choose nothing when no validation split is carved (data.val_size=0 on both)
_CARVE_ONLY = ("val_carve", "val_seed")


# model keys a curve may differ in from its endpoints: they give every weight
_WEIGHTS_ONLY = ("pretrained",)


def _differences(a: Any, b: Any, ignore: Sequence[str] = ()) -> list[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    same = (*ignore, *(_CARVE_ONLY if da.get("val_size", 1) == db.get("val_size", 1) == 0 else ()))
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k] and k not in same]


def check_endpoints(cfg: RunConfig) -> list[Endpoint]:
    """Read and check the two endpoints of a curve config: run folders with a checkpoint, not
    curve runs, the chosen models kept, the curve's dataset (ledger name), data and model config.
    Reads no data: called before anything is reserved.

    Raises:
        ConfigError: the message says which endpoint and what differs.
    """
    from ..run_folder import RunFolder
    from ..state import upgrade

    m = cfg.method
    if cfg.model.input_norm == "private":
        raise ConfigError("method.name=curve with model.input_norm=private: the curve run would release (and pay "
                          "for) new feature statistics and evaluate every point of the curve under them, not under "
                          "the statistics its endpoints were trained with; train the endpoints with "
                          "model.input_norm=group")
    if cfg.optim.name == "adambc":
        raise ConfigError("method.name=curve with optim.name=adambc: the noise on bend j is b_j(t) times the "
                          "release's, so its std changes with t, and AdamBC subtracts a fixed one; use adam or sgd")
    dataset = cfg.data.ledger_name or cfg.data.name
    ends = []
    for label, path, which in zip("AB", m.curve_endpoints, m.curve_endpoint_models):
        folder = RunFolder.existing(Path(path))
        ecfg, meta = folder.config(), folder.meta()
        where = f"curve endpoint {label} ({path})"
        if ecfg.method.name == "curve":
            raise ConfigError(f"{where} is a curve run: its release is a curve, not one model; give the runs it "
                              "connects, or a run of one model")
        raw = folder.load_state()
        if raw is None:
            raise ConfigError(f"{where} has no checkpoint: it stopped before its first one, nothing was released")
        if meta.get("dataset") != dataset:
            raise ConfigError(f"{where} was trained on dataset {meta.get('dataset')!r} and the curve run would be "
                              f"charged to {dataset!r}: a curve connects runs of one dataset")
        for what, own, theirs, ignore in (("data", cfg.data, ecfg.data, ()),
                                          ("model", resolved_model_config(cfg.model),
                                           resolved_model_config(ecfg.model), _WEIGHTS_ONLY)):
            diff = _differences(own, theirs, ignore)
            if diff:
                raise ConfigError(f"{where}: its {what} config differs from the curve's ({'; '.join(diff)}): a curve "
                                  f"connects runs of one dataset and one model")
        ends.append(Endpoint(Path(path), which, ecfg, meta, upgrade(raw)))
    a, b = ends
    if a.path.resolve() == b.path.resolve() and a.which == b.which:
        raise ConfigError(f"the curve's endpoints are one model ({a.which} of {a.path}); give two runs, or two "
                          "models of one run (method.curve_endpoint_models)")
    return ends


def load_endpoints(cfg: RunConfig, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The endpoints' trainable tensors in `model`'s parameter order, on its device; loads the
    endpoints' frozen parameters and buffers (refused unless both agree) into `model`."""
    a, b = check_endpoints(cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = a.state["model"]
    rest = [k for k in model.state_dict() if k not in names]
    differ = [k for k in rest if k in state and k in b.state["model"] and not torch.equal(state[k], b.state["model"][k])]
    if differ:
        raise ConfigError(f"the curve's endpoints differ in frozen parameters or buffers ({', '.join(differ[:3])}): "
                          "a curve connects the trainable parameters only, the rest must be one")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"curve endpoint {a.path} does not fit the curve's model: {str(e).splitlines()[0]}") from None
    params = dict(model.named_parameters())
    out = []
    for end in (a, b):
        tensors = end.trainable(names)
        bad = [n for n in names if tensors[n].shape != params[n].shape]
        if bad:
            raise ConfigError(f"curve endpoint {end.path}: {bad[:3]} do not fit the curve's model")
        out.append([tensors[n].to(params[n]) for n in names])
    return out[0], out[1]


@register_method
class Curve(Method):
    name = "curve"

    def __init__(self, cfg, model, *, noise_std: float = 0.0) -> None:
        super().__init__(cfg, model, noise_std=noise_std)
        m = cfg.method
        self.basis = CURVES[m.curve_type]
        a, b = load_endpoints(cfg, model)
        k = m.curve_bends + 2
        with torch.no_grad():  # theta_j on the segment (Garipov's init_linear)
            bends = [[(x + (y - x) * (j / (k - 1))).requires_grad_(True) for x, y in zip(a, b)] for j in range(1, k - 1)]
        self.points = [a, *bends, b]
        self.weight_decay = cfg.optim.weight_decay  # on w(t), after the noise
        self.optimizer = make_optimizer(dataclasses.replace(cfg.optim, weight_decay=0.0),
                                        [p for bend in bends for p in bend])
        self.t_generator = torch.Generator().manual_seed(cfg.train.seed)  # public: t is no secret
        self._load(0.5)

    @classmethod
    def releases(cls, cfg, steps: int) -> int:
        return steps

    @classmethod
    def built_on(cls, cfg) -> list[Path]:
        from ..run_folder import RunFolder

        return [RunFolder.existing(Path(path)).path for path in cfg.method.curve_endpoints]

    @torch.no_grad()
    def _load(self, t: float) -> list[float]:
        """The model's trainable weights <- w(t); returns the coefficients b_j(t)."""
        coeffs = self.basis(t, len(self.points))
        for p, w in zip(self.params, combine(self.points, coeffs)):
            p.copy_(w)
        return coeffs

    def step(self, step: Step) -> dict[str, float]:
        t = float(torch.rand((), generator=self.t_generator, dtype=torch.float64))
        coeffs = self._load(t)
        out = step.release()  # the one release, at w(t)
        with torch.no_grad():
            for c, bend in zip(coeffs[1:-1], self.points[1:-1]):  # the chain rule
                for theta, p in zip(bend, self.params):
                    g = out.grads[p] + self.weight_decay * p if self.weight_decay else out.grads[p]
                    theta.grad = c * g
        for group in self.optimizer.param_groups:
            group["lr"] = step.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._load(0.5)
        return {"private_batch_loss_diagnostic": out.loss_diagnostic,  # at w(t)
                "private_batch_size_diagnostic": out.batch_size_diagnostic, "curve_t": t}

    def state_dict(self) -> dict[str, Any]:
        return {"points": [[x.detach().clone() for x in point] for point in self.points],
                "optimizer": self.optimizer.state_dict(), "t_generator": self.t_generator.get_state(),
                "curve_type": self.cfg.method.curve_type}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["points"]) != len(self.points):
            raise ValueError(f"the checkpoint holds {len(state['points'])} control points, the config "
                             f"{len(self.points)}")
        with torch.no_grad():
            for point, saved in zip(self.points, state["points"]):
                for x, s in zip(point, saved, strict=True):
                    x.copy_(s)
        self.optimizer.load_state_dict(state["optimizer"])
        self.t_generator.set_state(state["t_generator"])
        self._load(0.5)
