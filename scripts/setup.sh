#!/usr/bin/env bash
# Create .venv (if missing) and install dpwa with its training and test dependencies.
# Idempotent: a second run only re-checks the install. Python 3.11 + pip find the pinned
# torch/torchvision builds on the local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[train,test]' 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import accounting, dpwa, torch, opacus" \
    || { echo "setup: the install is incomplete (see pip's output above)" >&2; exit 1; }
