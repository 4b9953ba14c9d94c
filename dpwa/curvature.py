"""The Hessian spectrum of a released model's test loss, and the learning rates it suggests.

Stochastic Lanczos quadrature (SLQ; Golub & Meurant 2009; Ghorbani, Krishnan & Xiao 2019,
"An investigation into neural net optimization via Hessian eigenvalue density"; Granziol
et al. 2022, "Learning rates as a function of batch size", JMLR): m Lanczos steps from a
random unit vector v give a tridiagonal T whose eigenvalues (Ritz values) theta_k and the
squared first components w_k of its eigenvectors make a quadrature rule, sum_k w_k f(theta_k)
~ v^T f(H) v. Averaged over a few random starts and smoothed by a Gaussian it estimates the
spectral density of H; the extreme Ritz values converge first, to lambda_max and lambda_min.
Each step is one Hessian-vector product by double backward (Pearlmutter 1994); every Lanczos
vector is re-orthogonalised against all the previous ones (twice), so Ritz values do not
repeat spuriously (Paige's loss of orthogonality).

Two learning rates follow, both for plain SGD on the mean loss:
* 2 / (lambda_max + lambda_median), Granziol's curvature learner (`run_ssgd_fastanddirty.py`,
  the median of |Ritz values|): the step that balances the sharpest and a typical direction
  (`spectral_median`, the quadrature-weighted median, is reported beside it: the Ritz median
  leans to the spectrum's ends);
* the Cauchy step g^T g / g^T H g along the gradient g (Granziol's `lr_sgd.py`): the exact
  minimiser of the quadratic model along -g (undefined where g^T H g <= 0).

Privacy: only the test split (public, held out) is used, so nothing is charged. Curvature on
the private training split (or the validation split carved from it) would be a sequence of
adaptive queries on private data, each to be clipped and noised (methods.md section 9a);
that charged version is not built, and those splits are refused before any data is read.
The models are GroupNorm (or NF) networks: no batch-norm statistics to recompute (R1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call

from .errors import UsageError
from .rows import Rows, example_losses, tiling_of

__all__ = ["CurvatureError", "MeanLoss", "lanczos", "ritz", "slq", "density", "learning_rates",
           "check_split", "curvature_run", "SINGLE_WEIGHT_METHODS"]

#: methods whose prediction is one weight vector (an ensemble has no single Hessian)
SINGLE_WEIGHT_METHODS = ("raw", "ema", "polyak", "swa")


class CurvatureError(UsageError):
    """The curvature cannot be computed as asked (exit 2); the message says why."""


def check_split(split: str) -> None:
    """Refuse the private splits before anything is read (design rule 1)."""
    if split == "test":
        return
    if split in ("train", "val"):
        which = "the training split" if split == "train" else \
            "the validation split, carved from the training split (data.val_size),"
        raise CurvatureError(f"--split {split}: {which} is private: its Hessian-vector products would be charged "
                             "queries (each Lanczos step clipped and noised), and a charged version is not built; "
                             "use --split test")
    raise CurvatureError(f"--split {split!r}: only 'test' is available")


class MeanLoss:
    """The mean per-example loss (`dpwa.rows.example_losses`) of `model` over fixed batches,
    as a function of its flattened trainable parameters `names` (default: those requiring
    grad). The model is not modified: the parameters are substituted with `functional_call`.

    batches: (x, y) pairs; `inputs` maps a stored x to the model's input (normalise, move)."""

    def __init__(self, model: nn.Module, batches: Sequence[tuple[Any, torch.Tensor]], *,
                 names: Optional[Sequence[str]] = None, inputs: Callable[[Any], torch.Tensor] = lambda x: x) -> None:
        own = dict(model.named_parameters())
        self.names = list(names) if names is not None else [n for n, p in own.items() if p.requires_grad]
        self.shapes = [own[n].shape for n in self.names]
        self.theta = torch.cat([own[n].detach().reshape(-1) for n in self.names]).requires_grad_(True)
        self.model, self.batches, self.inputs = model, list(batches), inputs
        self.examples = sum(len(y) for _, y in self.batches)

    @property
    def dim(self) -> int:
        return self.theta.numel()

    def _chunk_loss(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """This batch's share of the mean loss (its sum over examples / all examples)."""
        parts = self.theta.split([math.prod(s) for s in self.shapes])
        params = {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}
        xin = self.inputs(x)
        out = functional_call(self.model, params, (xin,))
        rows = Rows(examples=len(y), views=1, tiling=tiling_of(self.model))
        return example_losses(out, y.to(out.device), rows).sum() / self.examples

    def value_and_grad(self) -> tuple[float, torch.Tensor]:
        loss, grad = 0.0, torch.zeros_like(self.theta)
        for x, y in self.batches:
            part = self._chunk_loss(x, y)
            grad += torch.autograd.grad(part, self.theta)[0]
            loss += float(part.detach())
        return loss, grad

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v, by double backward, accumulated batch by batch (memory of one batch)."""
        out = torch.zeros_like(self.theta)
        for x, y in self.batches:
            (g,) = torch.autograd.grad(self._chunk_loss(x, y), self.theta, create_graph=True)
            out += torch.autograd.grad(g, self.theta, grad_outputs=v)[0]
        return out


def lanczos(hvp: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, iterations: int
            ) -> tuple[list[float], list[float]]:
    """Lanczos with full re-orthogonalisation: the diagonal alpha (k values) and off-diagonal
    beta (k - 1) of T, k <= min(iterations, dim). Stops early at an invariant subspace
    (beta ~ 0): T's eigenvalues are then exact eigenvalues of H."""
    dim = v0.numel()
    m = min(iterations, dim)
    basis = v0.new_zeros((m, dim))
    v = v0 / v0.norm()
    alphas: list[float] = []
    betas: list[float] = []
    tol, scale = torch.finfo(v0.dtype).eps ** 0.75, 0.0
    for j in range(m):
        basis[j] = v
        w = hvp(v)
        alpha = float(w @ v)
        alphas.append(alpha)
        for _ in range(2):  # classical Gram-Schmidt twice ("twice is enough", Parlett)
            w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        beta = float(w.norm())
        scale = max(scale, abs(alpha), beta)
        if j == m - 1 or beta <= tol * scale:
            break
        betas.append(beta)
        v = w / beta
    return alphas, betas


def ritz(alphas: Sequence[float], betas: Sequence[float]) -> tuple[list[float], list[float]]:
    """Ritz values of the tridiagonal T and their quadrature weights (squared first
    components of T's eigenvectors; they sum to 1).

    >>> theta, w = ritz([2.0, 2.0], [1.0])
    >>> [round(x, 9) for x in theta], [round(x, 9) for x in w]
    ([1.0, 3.0], [0.5, 0.5])
    """
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    theta, u = torch.linalg.eigh(t)
    return theta.tolist(), (u[0] ** 2).tolist()


def slq(hvp: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, *, iterations: int = 30, starts: int = 3,
        seed: int = 0) -> list[tuple[list[float], list[float]]]:
    """(Ritz values, weights) from `starts` Gaussian random starts (seeded: public randomness),
    shaped, typed and placed like `like`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(starts):
        v0 = torch.randn(like.numel(), generator=g, dtype=torch.float64).to(like.dtype).to(like.device)
        out.append(ritz(*lanczos(hvp, v0, iterations)))
    return out


def density(runs: Sequence[tuple[Sequence[float], Sequence[float]]], grid: torch.Tensor, width: float
            ) -> torch.Tensor:
    """The SLQ spectral density on `grid`: the mean over starts of sum_k w_k N(t; theta_k, width^2)
    (Ghorbani et al. 2019, eq. 4). It integrates to 1 over a grid that covers the Ritz values."""
    total = torch.zeros_like(grid, dtype=torch.float64)
    for theta, w in runs:
        th, wt = torch.tensor(theta, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)
        z = (grid.double()[:, None] - th[None, :]) / width
        total += (wt[None, :] * torch.exp(-0.5 * z ** 2)).sum(1) / (width * math.sqrt(2 * math.pi))
    return total / len(runs)


def learning_rates(runs: Sequence[tuple[Sequence[float], Sequence[float]]], g_dot_g: float, g_h_g: float
                   ) -> dict[str, Optional[float]]:
    """lambda_max, lambda_min, the median |Ritz value| (Granziol's), the spectral median, and
    the two learning rates.

    `lambda_median` is Granziol's: the plain median of the Ritz values' magnitudes. Ritz values
    crowd the ends of the spectrum (the extremes converge first), so it overstates a typical
    eigenvalue and moves with the number of Lanczos steps. `spectral_median` weighs each Ritz
    value by its quadrature weight (averaged over the starts): the median |eigenvalue| of the
    SLQ density, the estimate of the spectrum's median. The learning rate keeps Granziol's.

    >>> r = learning_rates([([1.0, 2.0, 7.0], [0.6, 0.3, 0.1])], g_dot_g=4.0, g_h_g=8.0)
    >>> r["lambda_max"], r["lambda_median"], r["spectral_median"], r["lr_lanczos"], r["lr_cauchy"]
    (7.0, 2.0, 1.0, 0.2222222222222222, 0.5)
    """
    values = [x for theta, _ in runs for x in theta]
    lam_max, lam_min = max(values), min(values)
    magnitudes = torch.tensor([abs(x) for x in values], dtype=torch.float64)
    med = float(magnitudes.median())
    weights = torch.tensor([w for _, ws in runs for w in ws], dtype=torch.float64)  # each start's sum to 1
    order = magnitudes.argsort()
    half = torch.searchsorted(weights[order].cumsum(0), 0.5 * weights.sum())
    spectral = float(magnitudes[order][min(int(half), len(values) - 1)])
    denom = lam_max + med
    return {"lambda_max": lam_max, "lambda_min": lam_min, "lambda_median": med, "spectral_median": spectral,
            "lr_lanczos": 2 / denom if denom > 0 else None,
            "lr_cauchy": g_dot_g / g_h_g if g_h_g > 0 else None}  # g'Hg <= 0: no minimum along -g


@dataclass
class _Spectrum:
    runs: list
    loss: float
    grad_norm: float
    g_h_g: float


def _spectrum(loss: MeanLoss, *, iterations: int, starts: int, seed: int) -> _Spectrum:
    value, g = loss.value_and_grad()
    g_h_g = float(g @ loss.hvp(g))
    return _Spectrum(slq(loss.hvp, loss.theta.detach(), iterations=iterations, starts=starts, seed=seed),
                     value, float(g.norm()), g_h_g)


def _device(name: str) -> torch.device:
    """train.device, where it exists here (a run trained on a GPU is analysed on a CPU too)."""
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda" if name == "auto" else name)


def curvature_run(run_dir: Path, *, split: str = "test", methods: Optional[Sequence[str]] = None,
                  iterations: int = 30, starts: int = 3, examples: int = 2000, seed: int = 0,
                  out: Optional[Path] = None) -> dict[str, Any]:
    """SLQ on the test loss of each single-weight model of a run folder (its last checkpoint);
    writes curvature.json and curvature.png into `out` (default: the run folder). Charges nothing.

    Raises:
        CurvatureError: a private split, bad sizes, a method the run did not keep.
        ConfigError: not a run folder, no checkpoint.
    """
    check_split(split)  # before anything is read
    for name, value in (("iterations", iterations), ("starts", starts), ("examples", examples)):
        if value < 1:
            raise CurvatureError(f"--{name} must be >= 1, got {value}")
    if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise CurvatureError(f"--seed must lie in -2**63 <= seed < 2**64, got {seed}")
    bad = [m for m in methods or () if m not in SINGLE_WEIGHT_METHODS]
    if bad:
        raise CurvatureError(f"{bad}: curvature is of one weight vector; choose from {list(SINGLE_WEIGHT_METHODS)}")
    from .run_folder import check_writable, curve_problem, load_run

    run = load_run(Path(run_dir))  # withholds the private training split
    if why := curve_problem(run.cfg, run_dir):
        raise CurvatureError(why)
    target = Path(out) if out is not None else Path(run_dir)
    check_writable(target, what="--out", holds="curvature.json and curvature.png", files=("curvature.json",))
    available = run.prediction_methods()
    wanted = list(methods) if methods else [m for m in SINGLE_WEIGHT_METHODS if m in available]
    missing = [m for m in wanted if m not in available]
    if missing:
        raise CurvatureError(f"{run_dir} did not keep {missing} (kept: {list(available)})")
    device = _device(run.cfg.train.device)
    test = run.data.test
    n = min(examples, len(test))
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    chunk = run.cfg.train.physical_batch_size
    batches = [(test.x[pick[i:i + chunk]], test.y[pick[i:i + chunk]]) for i in range(0, n, chunk)]
    trainable = [name for name, p in run.model.named_parameters() if p.requires_grad]

    results: dict[str, dict[str, Any]] = {}
    for name in wanted:
        try:
            model = next(iter(available[name]()))
        except ValueError as e:  # an average that has collected nothing yet
            raise CurvatureError(f"{name}: {e}") from None
        model = model.to(device).eval()
        loss = MeanLoss(model, batches, names=trainable, inputs=lambda x: run.data.normalize(x).to(device))
        s = _spectrum(loss, iterations=iterations, starts=starts, seed=seed)
        rates = learning_rates(s.runs, s.grad_norm ** 2, s.g_h_g)
        top = [sorted(theta, reverse=True)[:5] for theta, _ in s.runs]
        k = min(len(t) for t in top)
        results[name] = {"loss": s.loss, "grad_norm": s.grad_norm, "g_h_g": s.g_h_g, **rates,
                         "top_eigenvalues": [sum(t[i] for t in top) / len(top) for i in range(k)],
                         "ritz": [{"values": theta, "weights": w} for theta, w in s.runs],
                         "parameters": loss.dim}
    target.mkdir(parents=True, exist_ok=True)
    png = _plot({m: r["ritz"] for m, r in results.items()}, target / "curvature.png",
                title=f"{run.meta['run_id']} ({split}, step {run.step}, {n} examples)")
    report = {"run_id": run.meta["run_id"], "step": run.step, "steps": int(run.meta["steps"]), "split": split,
              "examples": n, "iterations": iterations, "starts": starts, "seed": seed, "epsilon": run.epsilon,
              "charged": False, "methods": results, "density_plot": str(png)}
    from .checkpoint import atomic_write_text

    atomic_write_text(target / "curvature.json", json.dumps(report, indent=2))
    report["json"] = str(target / "curvature.json")
    return report


def density_grid(runs: Sequence[tuple[Sequence[float], Sequence[float]]], *, points: int = 1000,
                 width_fraction: float = 0.01) -> tuple[torch.Tensor, float]:
    """A grid over the Ritz values with 5 smoothing widths either side, and the width:
    `width_fraction` of the spectrum's range (Ghorbani et al. smooth the spectrum rescaled to
    [-1, 1] with variance 1e-5, i.e. a width of ~0.16% of the range; 1% reads better with few starts)."""
    values = [x for theta, _ in runs for x in theta]
    lo, hi = min(values), max(values)
    width = width_fraction * max(hi - lo, 1e-12 * max(abs(hi), 1.0), 1e-30)
    return torch.linspace(lo - 5 * width, hi + 5 * width, points, dtype=torch.float64), width


def _plot(spectra: dict[str, list[dict]], path: Path, *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, ritz_runs in spectra.items():
        runs = [(r["values"], r["weights"]) for r in ritz_runs]
        grid, width = density_grid(runs)
        p = density(runs, grid, width)
        ax.semilogy(grid.numpy(), p.clamp_min(p.max() * 1e-12).numpy(), label=name, linewidth=1)
    ax.set_xlabel("eigenvalue of the test-loss Hessian")
    ax.set_ylabel("density (SLQ, Gaussian-smoothed)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
