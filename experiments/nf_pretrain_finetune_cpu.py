#!/usr/bin/env python
"""Does pretraining pay off for private fine-tuning of an NF model? CPU scale, CIFAR-10 split by
class: classes 0-4 play the public pretraining set, classes 5-9 the private set.

    python experiments/nf_pretrain_finetune_cpu.py            # all four runs (~30-40 min on 2 cores)
    python experiments/nf_pretrain_finetune_cpu.py --table    # rebuild the table from finished runs

1. `dpwa train configs/cifar10_nfmicro_pretrain_public.yaml`: nf_micro (timm NormFreeNet),
   non-private, on the public classes (no ledger);
2. `dpwa finetune configs/cifar10_nfmicro_finetune_cpu_eps8.yaml model.pretrained=<1>/weights.safetensors`:
   all layers, privately, on the private classes at epsilon 8;
3. the same with `model.trainable=head` (a private linear probe of the pretrained features);
4. the same from scratch (`model.pretrained=null`): the baseline at the same epsilon.
Private runs reserve their spend in runs/experiments-ledger.sqlite. Writes
experiments/results/nf_pretrain_finetune_cpu.md. Test accuracy: the 4,485 test images of
classes 5-9 in ../shared/data/cifar10 (JPEG q75) for 2-4, of classes 0-4 for 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "experiments" / "nf_pretrain_finetune_cpu"
TABLE = ROOT / "experiments" / "results" / "nf_pretrain_finetune_cpu.md"
LEDGER = ROOT / "runs" / "experiments-ledger.sqlite"
PRETRAIN = "configs/cifar10_nfmicro_pretrain_public.yaml"
FINETUNE = "configs/cifar10_nfmicro_finetune_cpu_eps8.yaml"


def latest(name: str) -> Path:
    runs = [p for p in (OUT / name).glob("*") if (p / "report.json").is_file()]
    if not runs:
        raise SystemExit(f"no finished run under {OUT / name}")
    return max(runs, key=lambda p: p.stat().st_mtime)


def dpwa(verb: str, config: str, name: str, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "dpwa", verb, config, f"out_dir={OUT / name}", "--ledger", str(LEDGER),
           "--no-progress", *overrides]
    print("$ dpwa", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def variants() -> dict[str, tuple[str, str, list[str]]]:
    weights = str(latest("pretrain") / "weights.safetensors") if (OUT / "pretrain").exists() else "<pretrain>"
    return {
        "pretrain": ("train", PRETRAIN, []),
        "finetune": ("finetune", FINETUNE, [f"model.pretrained={weights}"]),
        "probe": ("finetune", FINETUNE, [f"model.pretrained={weights}", "model.trainable=head"]),
        "scratch": ("finetune", FINETUNE, ["model.pretrained=null"]),
    }


def table() -> str:
    rows = ["| run | data | privacy | trainable | steps | sigma | test raw | test EMA | train time (min) |",
            "|---|---|---|---|---|---|---|---|---|"]
    what = {"pretrain": ("classes 0-4 (public)", "all, from random init"),
            "finetune": ("classes 5-9 (private)", "all, from the public pretraining"),
            "probe": ("classes 5-9 (private)", "head only, on the public pretraining"),
            "scratch": ("classes 5-9 (private)", "all, from random init")}
    for name, (verb, config, overrides) in variants().items():
        r = json.loads((latest(name) / "report.json").read_text())
        priv = "none (public data)" if r["epsilon"] is None else f"epsilon {r['epsilon']:.2f}, delta {r['delta']:g}"
        shown = " ".join(o.replace(str(OUT), "runs/...") for o in overrides)
        rows.append(f"| {name}: `dpwa {verb} {Path(config).name} {shown}` | {what[name][0]} | {priv} | "
                    f"{what[name][1]} | {r['steps']} | {r['noise_multiplier']:.3f} | "
                    f"{100 * r['test_raw']['accuracy']:.2f}% | {100 * r['test_ema']['accuracy']:.2f}% | "
                    f"{r['train_time_s'] / 60:.1f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="only rebuild the table")
    p.add_argument("--only", nargs="*", choices=["pretrain", "finetune", "probe", "scratch"])
    a = p.parse_args()
    if not a.table:
        for name in a.only or ["pretrain", "finetune", "probe", "scratch"]:
            verb, config, overrides = variants()[name]
            dpwa(verb, config, name, *overrides)
    text = ("nf_micro (timm NormFreeNet, 38k parameters), CIFAR-10 split by class, 2 CPU cores; command: "
            "`python experiments/nf_pretrain_finetune_cpu.py`.\n\n" + table() + "\n")
    print(text)
    TABLE.write_text(text)


if __name__ == "__main__":
    main()
