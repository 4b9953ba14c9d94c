#!/usr/bin/env bash
# Set up (if needed) and run the main job: private training of a small CNN on scikit-learn's
# digits (built in, no download) at epsilon 3, under a minute on 2 CPU cores. The run folder
# goes to runs/, the privacy spend to the ledger ($DPWA_LEDGER or ~/.dpwa/ledger.sqlite).
# Extra arguments are config overrides, e.g. `bash scripts/quickstart.sh privacy.epsilon=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/dpwa train configs/quickstart.yaml "$@"
.venv/bin/dpwa ledger show --dataset digits
