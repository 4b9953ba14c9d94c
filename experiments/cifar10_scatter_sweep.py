#!/usr/bin/env python
"""Tuning the ScatterNet CIFAR-10 recipe at epsilon 8 without the test set, then the chosen
recipe on the test set.

    python experiments/cifar10_scatter_sweep.py --sweep            # validation sweep (TAN proxies)
    python experiments/cifar10_scatter_sweep.py --sweep --only A B # some variants
    python experiments/cifar10_scatter_sweep.py --final 3          # the shipped config, 3 test runs
    python experiments/cifar10_scatter_sweep.py --flip             # test-time flip: on val, then on test
    python experiments/cifar10_scatter_sweep.py --table            # rebuild the tables

Sweep: every variant is a *target* recipe (batch B, 60 epochs of the full 50,000-image train
set, epsilon 8, delta 1e-5, its sigma calibrated by the accountant, including the feature
statistics release where the recipe has one), measured by a TAN proxy (Sander et al. 2023,
"TAN without a burn"): the same number of steps and the same noise on the mean gradient,
sigma / B, at a batch `--shrink` times smaller, so at 1/shrink of the compute. Proxies train
on 45,000 images and are scored on a 5,000-image validation split carved from train.npz
(`data.val_size=5000`, seed 0); the test set is never read by the sweep. A proxy is not a
private run of its own (its sigma spends far more than epsilon 8); its spend goes to a
scratch ledger, runs/experiments-ledger.sqlite.

Final: `configs/cifar10_scatter_cpu_eps8.yaml` as shipped (all 50,000 train images), run
`--final N` times with fresh noise, scored on the 9,000-image JPEG test set, raw and free
averages. Every run is an in-process `dpwa.train`; the scattering features are computed once
per process and reused (a pure function of the public-normalised images).

Flip: `data.test_time_flip` (mean softmax of each image and its mirror image; free, as it only
changes how released models predict) is decided on validation, by `dpwa eval --data val` of the
proxy runs on disk with and without it, then measured on test on the final runs (which were
trained the same either way: the option does not touch training). Each run folder keeps its
two evaluations in flip.json.

Writes experiments/results/cifar10_scatter_sweep.md, cifar10_scatter_final.md and
cifar10_scatter_flip.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dpwa  # noqa: E402
from dpwa import features  # noqa: E402
from dpwa.config import load_config  # noqa: E402
from dpwa.evaluate_run import evaluate_run  # noqa: E402
from dpwa.train import plan_run  # noqa: E402

CONFIG = "configs/cifar10_scatter_cpu_eps8.yaml"
OUT = ROOT / "runs" / "experiments" / "cifar10_scatter_sweep"
#: Where --final keeps its runs; one folder per version of the shipped config (the recipe without
#: model.conv_norm kept its runs in "final": results/cifar10_scatter_final_no_conv_norm.md; with it,
#: before `Standardize` dropped the channels released with variance 0, in "final-conv-norm":
#: results/cifar10_scatter_final_var0_kept.md and cifar10_scatter_flip_var0_kept.md).
FINAL = OUT / "final-var0-dropped"
LEDGER = ROOT / "runs" / "experiments-ledger.sqlite"
RESULTS = ROOT / "experiments" / "results"
N_TRAIN = 50_000
IMAGENET = ["data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]
CIFAR = ["data.mean=[0.4914,0.4822,0.4465]", "data.std=[0.2470,0.2435,0.2616]"]
GROUP = ["model.input_norm=group"]
PRIVATE = ["model.input_norm=private", "feature_stats.noise_multiplier=8", "feature_stats.mean_clip=1.0",
           "feature_stats.second_moment_clip=1.5"]
B8K = ["train.batch_size=8192"]
B4K = ["train.batch_size=4096"]
B2K = ["train.batch_size=2048"]

# name -> overrides of CONFIG describing the *target* recipe (60 epochs, epsilon 8)
VARIANTS: dict[str, list[str]] = {
    "gn-cifar-lr4": [*GROUP, *CIFAR, *B8K, "optim.lr=4"],
    "gn-imagenet-lr4": [*GROUP, *IMAGENET, *B8K, "optim.lr=4"],
    "bn-imagenet-lr4": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=4"],
    "bn-imagenet-lr2": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=2"],
    "bn-imagenet-lr8": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=8"],
    "bn-imagenet-b4k-lr2": [*PRIVATE, *IMAGENET, *B4K, "optim.lr=2"],
    "bn-imagenet-b4k-lr4": [*PRIVATE, *IMAGENET, *B4K, "optim.lr=4"],
    "bn-imagenet-b2k-lr1": [*PRIVATE, *IMAGENET, *B2K, "optim.lr=1"],
    "bn-imagenet-b2k-lr2": [*PRIVATE, *IMAGENET, *B2K, "optim.lr=2"],
    "bn-imagenet-lr8-c0.05": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=8", "privacy.clip_norm=0.05"],
    "bn-imagenet-cos-lr4": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=4", "optim.schedule=cosine"],
    "bn-imagenet-cos-lr8": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=8", "optim.schedule=cosine"],
    "bn-imagenet-b16k-lr8": [*PRIVATE, *IMAGENET, "train.batch_size=16384", "optim.lr=8"],
    "bn-imagenet-b2k-lr1-ema0.998": [*PRIVATE, *IMAGENET, *B2K, "optim.lr=1", "averaging.ema_decay=0.998"],
    "bn-imagenet-lr12": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=12"],
    "bn-imagenet-lr16": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=16"],
    "gn-imagenet-lr8": [*GROUP, *IMAGENET, *B8K, "optim.lr=8"],
    "bn-imagenet-cos-lr16": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=16", "optim.schedule=cosine"],
    "bn-imagenet-b4k-lr8": [*PRIVATE, *IMAGENET, *B4K, "optim.lr=8"],
    "bn-imagenet-cos-lr24": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=24", "optim.schedule=cosine"],
    "bn-imagenet-cos-lr32": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=32", "optim.schedule=cosine"],
    "bn-imagenet-cos-lr16-sat0.01": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=16", "optim.schedule=cosine",
                                     "method.name=dpsat", "method.rho=0.01"],
    "bn-imagenet-b4k-cos-lr16": [*PRIVATE, *IMAGENET, *B4K, "optim.lr=16", "optim.schedule=cosine"],
    "gn-imagenet-cos-lr16": [*GROUP, *IMAGENET, *B8K, "optim.lr=16", "optim.schedule=cosine"],
    "bn-imagenet-b2k-lr4": [*PRIVATE, *IMAGENET, *B2K, "optim.lr=4"],
    "bn-imagenet-b16k-lr16": [*PRIVATE, *IMAGENET, "train.batch_size=16384", "optim.lr=16"],
    "bn-imagenet-lr8-sat0.01": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=8", "method.name=dpsat", "method.rho=0.01"],
    "bn-imagenet-lr8-sat0.003": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=8", "method.name=dpsat", "method.rho=0.003"],
    "bn-imagenet-lr4-sat0.01": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=4", "method.name=dpsat", "method.rho=0.01"],
    "bn-imagenet-lr4-sat0.03": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=4", "method.name=dpsat", "method.rho=0.03"],
    "bn-imagenet-lr4-sat0.1": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=4", "method.name=dpsat", "method.rho=0.1"],
    # a GroupNorm(16) after each conv (model.conv_norm): +0.4-0.9 points at 600k gradients in the
    # FiLM control of experiments/cifar10_sparse_ensembles_eps8.py
    "cn-bn-imagenet-lr8": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=8", "model.conv_norm=true"],
    "cn-bn-imagenet-lr12": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=12", "model.conv_norm=true"],
    "cn-bn-imagenet-lr16": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=16", "model.conv_norm=true"],
    "cn-bn-imagenet-lr24": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=24", "model.conv_norm=true"],
    "cn-bn-imagenet-cos-lr16": [*PRIVATE, *IMAGENET, *B8K, "optim.lr=16", "optim.schedule=cosine",
                                "model.conv_norm=true"],
    # the same recipe at more, smaller (or fewer, larger) steps, same gradient budget, lr by the linear rule:
    # what the free averages gain against the number of steps
    "cn-bn-imagenet-b2k-lr3": [*PRIVATE, *IMAGENET, *B2K, "optim.lr=3", "model.conv_norm=true"],
    "cn-bn-imagenet-b4k-lr6": [*PRIVATE, *IMAGENET, *B4K, "optim.lr=6", "model.conv_norm=true"],
    "cn-bn-imagenet-b16k-lr24": [*PRIVATE, *IMAGENET, "train.batch_size=16384", "optim.lr=24",
                                 "model.conv_norm=true"],
}
AVERAGES = ("raw", "ema", "polyak", "swa")


def cache_features() -> None:
    """Scattering once per process: a memo keyed by a hash of the (public-normalised) images."""
    compute, memo = features.FEATURES["scattering"], {}

    def cached(x, **kw):
        key = (tuple(x.shape), hashlib.blake2b(x.contiguous().numpy().tobytes(), digest_size=16).hexdigest())
        if key not in memo:
            memo[key] = compute(x, **kw)
        return memo[key].clone()

    features.FEATURES["scattering"] = cached


def target(overrides: list[str]):
    """The recipe the proxy stands for, and its plan on the full train set."""
    cfg = load_config(ROOT / CONFIG, [*overrides, "train.epochs=60", "privacy.epsilon=8", "data.val_size=0"])
    return cfg, plan_run(cfg, N_TRAIN)


def proxy_overrides(name: str, overrides: list[str], shrink: int) -> tuple[list[str], dict[str, Any]]:
    cfg, plan = target(overrides)
    b = cfg.train.batch_size // shrink
    info = {"target_batch": cfg.train.batch_size, "target_sigma": plan.noise_multiplier, "steps": plan.steps,
            "proxy_batch": b, "proxy_sigma": plan.noise_multiplier / shrink}
    return [*overrides, f"train.batch_size={b}", "train.epochs=null", f"train.steps={plan.steps}",
            "privacy.epsilon=null", f"privacy.noise_multiplier={plan.noise_multiplier / shrink}",
            "privacy.accountant=rdp",  # a proxy's own epsilon is meaningless (and PRV fails at tiny sigma)
            # the split and exact validation metrics as when the tables were made: tuning on the public
            # CIFAR-10 benchmark, outside the guarantee (warned); a private dataset would keep the charged default
            "data.val_size=5000", "data.val_carve=permutation", "train.eval_split=val", "train.val_noise=0",
            "train.checkpoint_every=100000",
            # free tail averages: Polyak over the second half, SWA over the last quarter (every step)
            f"averaging.polyak_start={plan.steps // 2}", "averaging.swa=true", f"averaging.swa_start={3 * plan.steps // 4}",
            "averaging.swa_every=1",
            f"name=sweep-{name}", f"out_dir={OUT / 'sweep' / name}"], info


def sweep(names: list[str], shrink: int) -> None:
    for name in names:
        overrides, info = proxy_overrides(name, VARIANTS[name], shrink)
        print(f"# {name}: {info}", flush=True)
        report = dpwa.train(load_config(ROOT / CONFIG, overrides), ledger_path=str(LEDGER), progress=False)
        (Path(report["run_dir"]) / "proxy.json").write_text(json.dumps({"name": name, "shrink": shrink, **info}))
        print(f"# {name}: val raw {report['val_raw']['accuracy']:.4f}", flush=True)


def final(runs: int) -> None:
    for i in range(runs):
        report = dpwa.train(load_config(ROOT / CONFIG, [f"out_dir={FINAL}", "name=final"]),
                            ledger_path=str(LEDGER), progress=False)
        print(f"# final {i}: test raw {report['test_raw']['accuracy']:.4f}", flush=True)


def _acc(r: dict[str, Any], split: str, name: str) -> str:
    m = r.get(f"{split}_{name}")
    return f"{100 * m['accuracy']:.2f}" if m else "-"


def sweep_table(previous: str = "") -> str:
    """The previous table's rows, then a row for each proxy run on disk that it lacks: runs
    deleted from this machine (or made on another) keep their rows; repeats get one row each."""
    rows = ["| variant | target B | target sigma | steps | proxy B | proxy sigma | val raw | val EMA | val Polyak | "
            "val SWA | per-example grads (proxy) | train min |", "|" + "---|" * 12]
    kept = [row for row in previous.splitlines()[4:] if row.startswith("| ")]
    for proxy in sorted((OUT / "sweep").glob("*/*/proxy.json")):
        p, r = json.loads(proxy.read_text()), json.loads((proxy.parent / "report.json").read_text())
        row = (f"| {p['name']} (`{' '.join(VARIANTS.get(p['name'], []))}`) | {p['target_batch']} | "
               f"{p['target_sigma']:.3f} | {p['steps']} | {p['proxy_batch']} | {p['proxy_sigma']:.4f} | "
               f"{_acc(r, 'val', 'raw')} | {_acc(r, 'val', 'ema')} | {_acc(r, 'val', 'polyak')} | {_acc(r, 'val', 'swa')} | "
               f"{r['expected_per_example_gradient_evaluations']:.0f} | {r['train_time_s'] / 60:.1f} |")
        if row not in kept:
            kept.append(row)
    return "\n".join(rows + kept)


def final_table() -> str:
    reports = [json.loads(p.read_text()) for p in sorted(FINAL.glob("*/report.json"))]
    rows = ["| run | epsilon (PRV) | sigma | steps | per-example grads | " + " | ".join(f"test {a}" for a in AVERAGES)
            + " | train min | wall min |", "|" + "---|" * (7 + len(AVERAGES))]
    for r in reports:
        rows.append(f"| {r['run_id']} | {r['epsilon']:.3f} | {r['noise_multiplier']:.3f} | {r['steps']} | "
                    f"{r['expected_per_example_gradient_evaluations']:.0f} | "
                    + " | ".join(_acc(r, "test", a) for a in AVERAGES)
                    + f" | {r['train_time_s'] / 60:.1f} | {r['wall_time_s'] / 60:.1f} |")
    if len(reports) > 1:
        cells = []
        for a in AVERAGES:
            accs = [100 * r[f"test_{a}"]["accuracy"] for r in reports if f"test_{a}" in r]
            cells.append(f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else "-")
        rows.append(f"| mean ± sd ({len(reports)} runs) | | | | | " + " | ".join(cells) + " | | |")
    return "\n".join(rows)


def flip(run_dir: Path, split: str, compute: bool) -> dict[str, Any] | None:
    """The run's accuracies on `split` without and with the test-time flip (cached in flip.json;
    None: not cached and not `compute`)."""
    cache = run_dir / "flip.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("exact") or cached.get("split") == "test":  # older validation caches may hold noisy ones
            return cached
    if not compute:
        return None
    out = {"split": split, "exact": True}
    for on in (False, True):
        # the proxies tune exactly on validation (train.val_noise=0, outside the guarantee): so does this
        result = evaluate_run(run_dir, split=split, methods=AVERAGES, test_time_flip=on,
                              val_noise=0.0 if split == "val" else None)
        out["flip" if on else "plain"] = {m: result["methods"][m]["accuracy"] for m in AVERAGES}
    cache.write_text(json.dumps(out))
    return out


def flip_table(compute: bool) -> str:
    """Validation (proxy runs) first: the decision; then the final runs on test. Without
    `compute`, only the runs already evaluated ("" if none)."""
    rows = ["| run | split | " + " | ".join(f"{a} | {a} + flip" for a in AVERAGES) + " |",
            "|" + "---|" * (2 + 2 * len(AVERAGES))]
    groups = (("val", sorted(p.parent for p in (OUT / "sweep").glob("*/*/proxy.json"))),
              ("test", sorted(p.parent for p in FINAL.glob("*/report.json"))))
    for split, runs in groups:
        pairs = [(run, flip(run, split, compute)) for run in runs]
        pairs = [(run, r) for run, r in pairs if r is not None]
        results = [r for _, r in pairs]
        for run, r in pairs:
            rows.append(f"| {run.name} | {split} | " + " | ".join(
                f"{100 * r['plain'][a]:.2f} | {100 * r['flip'][a]:.2f}" for a in AVERAGES) + " |")
        if len(results) > 1:
            cells = []
            for a in AVERAGES:
                for kind in ("plain", "flip"):
                    accs = [100 * r[kind][a] for r in results]
                    cells.append(f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}")
            gain = statistics.mean(100 * (r["flip"]["swa"] - r["plain"]["swa"]) for r in results)
            rows.append(f"| mean ± sd ({len(results)} runs; SWA + flip gains {gain:+.2f}) | {split} | "
                        + " | ".join(cells) + " |")
    return "\n".join(rows) if len(rows) > 2 else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="run the validation sweep")
    p.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="sweep only these variants")
    p.add_argument("--shrink", type=int, default=8, help="proxy batch = target batch / this (TAN)")
    p.add_argument("--final", type=int, default=0, help="test runs of the shipped config")
    p.add_argument("--flip", action="store_true", help="measure the test-time flip (val, then test)")
    p.add_argument("--table", action="store_true", help="only rebuild the tables")
    a = p.parse_args()
    if not a.table:
        cache_features()
        if a.sweep:
            sweep(a.only or list(VARIANTS), a.shrink)
        if a.final:
            final(a.final)
    RESULTS.mkdir(parents=True, exist_ok=True)
    head = ("CIFAR-10 ScatterNet + CNN at epsilon 8 (delta 1e-5, PRV), 2 CPU cores. Command: "
            "`python experiments/cifar10_scatter_sweep.py --sweep`; TAN proxies (same steps and sigma / B as the "
            "target, batch / 8), trained on 45,000 train images, scored on a 5,000-image validation split of "
            "train.npz. The test set is not read.\n\n")
    sweep_md = RESULTS / "cifar10_scatter_sweep.md"
    sweep_md.write_text(head + sweep_table(sweep_md.read_text() if sweep_md.exists() else "") + "\n")
    (RESULTS / "cifar10_scatter_final.md").write_text(
        f"CIFAR-10, `dpwa train {CONFIG}` (all 50,000 train images), fresh noise each run, scored on the 9,000-image "
        "JPEG test set as the config says: with its test-time flip, `data.test_time_flip` (each run without it: "
        "cifar10_scatter_flip.md; the runs of cifar10_scatter_final_var0_kept.md predate the flip and were scored "
        "without it). Command: `python experiments/cifar10_scatter_sweep.py --final 3`.\n\n"
        + final_table() + "\n")
    flips = flip_table(compute=a.flip)
    if flips:
        (RESULTS / "cifar10_scatter_flip.md").write_text(
            "CIFAR-10 ScatterNet + CNN: `data.test_time_flip` (the mean softmax of each image and its mirror image), "
            "decided on the 5,000-image validation split of the proxy runs, then measured on the 9,000-image test "
            "set on the final runs. Command: `python experiments/cifar10_scatter_sweep.py --flip`. Runs on this "
            "machine only: the proxies that decided it, and the finals before `Standardize` dropped the channels "
            "released with variance 0, are in cifar10_scatter_flip_var0_kept.md.\n\n"
            + flips + "\n")
    print((RESULTS / "cifar10_scatter_sweep.md").read_text())
    print((RESULTS / "cifar10_scatter_final.md").read_text())


if __name__ == "__main__":
    main()
