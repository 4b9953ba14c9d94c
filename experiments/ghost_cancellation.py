#!/usr/bin/env python
"""How far dpwa-fast's float32 per-example norms are from float64 ones, against how much of
their terms cancel, and how often real data trips the engine's cancellation check
(`dpwa.engines.fast.cancels`, which redoes such examples alone).

    python experiments/ghost_cancellation.py --out experiments/results/ghost_cancellation.md

The engine runs in its lean mode, where every rule gives `terms2` (the fast mode asks it only
of ghost norm, whose norm and clipped sum are two computations, so it redoes a subset of the
examples counted here). For each example the engine sums per-layer squared norms (ghost norm: sum over pairs of
positions of (a_p . a_q)(go_p . go_q); instantiated gradients) and their `terms2` (the
squared norm with no cancellation between positions: sum_p |a_p|^2 |go_p|^2). Their ratio
says how much cancelled. The float32 norms before the check are compared with the float64
engine's (exact to ~1e-15 against a loop over single examples, tests/dpwa/test_engines.py).

1. Real images: the first CIFAR-10 training images (../shared/data/cifar10; synthetic uniform
   images where that folder is absent, said in the table) through the tanh CNN and WRN-16-4
   (WS + GroupNorm), and their ScatterNet features through scatter_cnn, at initialisation and
   with weights perturbed like the probe's.
2. Near-constant images, 1 + noise / r: a conv before GroupNorm, where ghost norm cancels (a
   helper's review found float32 gave norm 0, contribution 6.7 C, at r = 4000).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import dpwa.engines.fast as fast  # noqa: E402
from dpwa.engines import FastEngine  # noqa: E402
from dpwa.models import create_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train.npz"


def images(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(n, 3, 32, 32) float CIFAR-10 training images normalised with the published statistics, labels."""
    if DATA.exists():
        with np.load(DATA) as f:
            x, y, source = torch.from_numpy(f["x"][:n]).permute(0, 3, 1, 2), torch.from_numpy(f["y"][:n]), "CIFAR-10"
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 256, (n, 3, 32, 32), generator=g), torch.randint(0, 10, (n,), generator=g)
        source = "synthetic uniform"
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std, y.long(), source


def measured(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """The float32 engine's squared norms before the check, their terms2, and the float64
    engine's squared norms, per example."""
    seen = {}

    def spy(norms2, terms2):
        seen["norms2"], seen["terms2"] = norms2.detach().clone(), terms2.detach().clone()
        return fast.cancels(norms2, terms2)

    out = {}
    for dtype in (torch.float32, torch.float64):
        work = copy.deepcopy(model).to(dtype)
        eng = FastEngine(work, memory="lean", redo=spy)  # every rule's terms2 (the fast mode: ghost norm's only)
        try:
            eng.clipped_sum(x.to(dtype).unsqueeze(1), y, 1e9)
        finally:
            eng.remove()
        out[dtype] = {k: v.double().numpy() for k, v in seen.items()}
    f32, f64 = out[torch.float32], out[torch.float64]
    result = {"norms2": f32["norms2"], "terms2": f32["terms2"], "exact": f64["norms2"]}
    worst = int(np.argmax(np.abs(result["norms2"] - result["exact"]) / result["exact"]))
    plain = {}
    for dtype in (torch.float32, torch.float64):  # that example by plain autograd, in the same batch
        work = copy.deepcopy(model).to(dtype)
        params = [q for q in work.parameters() if q.requires_grad]
        logits = work(x.to(dtype))[worst:worst + 1]  # the batch's kernels (rows do not mix: GroupNorm)
        grads = torch.autograd.grad(nn.functional.cross_entropy(logits, y[worst:worst + 1]), params)
        plain[dtype] = float(sum(g.double().square().sum() for g in grads))
    result["plain_error"] = abs(plain[torch.float32] - plain[torch.float64]) / plain[torch.float64]
    return result


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """As the probe perturbs weights: zero-initialised heads hide nothing behind them."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * (p.abs().mean() + 0.1) * torch.randn(p.shape, generator=g))
    return model


def row(name: str, m: dict[str, np.ndarray]) -> str:
    ratio = m["exact"] / m["terms2"]
    err = np.abs(m["norms2"] - m["exact"]) / m["exact"]
    limit = fast._CANCEL_ULPS * float(torch.finfo(torch.float32).eps)
    flagged = m["norms2"] < limit * m["terms2"]
    return (f"| {name} | {len(ratio)} | {ratio.min():.3g} | {np.median(ratio):.3g} | {int(flagged.sum())} | "
            f"{err.max():.2g} | {m['plain_error']:.2g} | {(err / (1 / ratio)).max():.2g} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x, y, source = images(a.images)
    head = ("| case | examples | min norm^2 / terms2 | median | redone alone (float32) | max rel. error of norm^2 "
            "(float32, before the check) | that example's, plain float32 autograd | max error / (terms2 / norm^2) |"
            "\n|---|---|---|---|---|---|---|---|")
    rows = []
    models = {"cnn_tanh": (create_model("cnn_tanh", in_channels=3, num_classes=10), x),
              "wrn16_4": (create_model("wrn16_4", in_channels=3, num_classes=10), x[:32])}
    from dpwa.features import scattering

    feats = scattering(x)
    models["scatter_cnn"] = (create_model("scatter_cnn", in_channels=feats.shape[1], num_classes=10), feats)
    for name, (model, inputs) in models.items():
        for state, net in (("init", model), ("perturbed", perturbed(model, 1))):
            rows.append(row(f"{name} ({state}), {source}", measured(net, inputs, y[:len(inputs)])))
            print(rows[-1], flush=True)
    conv = nn.Sequential(nn.Conv2d(32, 32, 3, bias=False), nn.GroupNorm(32, 32), nn.Tanh(), nn.Flatten(),
                         nn.Linear(32 * 16, 5))
    conv[1].requires_grad_(False)
    conv[4].requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for r in (10, 100, 1000, 4000):
        near = 1.0 + torch.randn(30, 32, 6, 6, generator=g) / r
        rows.append(row(f"conv + GroupNorm, near-constant 1 + noise / {r}", measured(conv, near, torch.randint(
            0, 5, (30,), generator=g))))
        print(rows[-1], flush=True)
    text = (f"Command: `{shlex.join(['python', 'experiments/ghost_cancellation.py', *sys.argv[1:]])}` "
            f"(torch {torch.__version__}, CPU). dpwa-fast (mode auto, memory lean: every rule gives terms2; the fast "
            "mode redoes a subset of these, its terms2 being ghost norm's alone) per-example squared norms, "
            "float32 before the cancellation check, against the float64 engine. terms2: the squared norm with no "
            "cancellation between positions. Redone alone: norm^2 < "
            f"{fast._CANCEL_ULPS:g} x float32 eps x terms2 = {fast._CANCEL_ULPS * torch.finfo(torch.float32).eps:.3g}"
            " x terms2. The last column, relative error times norm^2 / terms2, is the rounding in units of terms2: "
            "what the check's threshold is measured against. The error includes the float32 forward and backward's own "
            "rounding, which the check need not catch (a norm and its clipped sum from one float32 backward agree): "
            "the column before it is the same example's squared norm by plain float32 autograd (the whole batch's "
            "forward, that example's loss) against float64.\n\n" + head + "\n" + "\n".join(rows) + "\n")
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
