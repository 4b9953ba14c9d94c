#!/usr/bin/env bash
# Set up (if needed) and run the main job. Until the training side lands, the main job
# is the accounting one: budget questions for De et al.'s CIFAR-10 recipe, then a
# throw-away ledger (in a temporary folder) that records runs and refuses to overspend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PATH="$PWD/.venv/bin:$PATH"
export DPWA_LEDGER="$(mktemp -d)/ledger.sqlite"
set -x
dpwa budget --sigma 3 --sample-rate 0.08192 --steps 2468 --delta 1e-5
dpwa budget --epsilon 8 --delta 1e-5 --batch-size 4096 --dataset-size 50000 --epochs 200
dpwa ledger set-budget --dataset cifar10 --epsilon 8 --delta 1e-5 --dataset-size 50000
dpwa ledger record --dataset cifar10 --fingerprint n50000-demo --run-id wrn16-4-eps1 \
    --sigma 10 --sample-rate 0.08192 --steps 875
dpwa ledger record --dataset cifar10 --fingerprint n50000-demo --run-id cnn-eps3 \
    --sigma 3 --sample-rate 0.02048 --steps 1200
dpwa ledger remaining --dataset cifar10 --sigma 3 --sample-rate 0.08192
dpwa ledger show
# A run that would pass the budget is refused, and nothing is recorded:
! dpwa ledger record --dataset cifar10 --fingerprint n50000-demo --run-id too-much \
    --sigma 3 --sample-rate 0.08192 --steps 5000
