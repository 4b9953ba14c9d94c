#!/usr/bin/env bash
# Create .venv (if missing) and install dpwa with its training and test dependencies.
# Idempotent: a second run only re-checks the install. torch and torchvision are pinned
# exactly by scripts/constraints.txt (pip -c): Python 3.11 + pip find those builds on the
# local disk. To install into an environment of your own (a CUDA build of torch, say), run
# `pip install -e '.[train]'` there instead: pyproject.toml has lower bounds only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c scripts/constraints.txt -e '.[train,test]' 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import accounting, dpwa, torch, opacus" \
    || { echo "setup: the install is incomplete (see pip's output above)" >&2; exit 1; }
