import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

# `train.threads: auto` measures the machine's load; runs that tests compare bit for bit
# (kill-and-resume, torchrun against one process) need one thread count, subprocesses too.
os.environ["DPWA_THREADS"] = "1"  # set, not defaulted: a CI environment's own value must not leak in
# Tests compute every accountant value; tests/test_memo.py turns the on-disk memo on.
os.environ["DPWA_ACCOUNTING_CACHE"] = "off"
os.environ.pop("DPWA_LEDGER_TIMEOUT", None)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def ledger_path(tmp_path, monkeypatch):
    """A fresh ledger location; $DPWA_LEDGER points at it so nothing touches ~/.dpwa."""
    path = tmp_path / "ledger.sqlite"
    monkeypatch.setenv("DPWA_LEDGER", str(path))
    return path


@pytest.fixture(autouse=True)
def _no_home_ledger(tmp_path_factory, monkeypatch):
    """Never let a test write the user's real ledger, nor one $DPWA_LEDGER names outside."""
    monkeypatch.setenv("DPWA_LEDGER", str(tmp_path_factory.mktemp("home") / "ledger.sqlite"))


def run_dpwa(*args, env=None, timeout=600):  # 100x what they take here: the CI machine is shared
    """Run the real `dpwa` command in a subprocess (exit codes, stderr, imports)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dpwa", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=timeout)


def ledger_snapshot(path):
    """A hash of every ledger row (None if there is no file): proves a refusal wrote nothing."""
    if not Path(path).exists():
        return None
    with sqlite3.connect(path) as conn:
        rows = [conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("meta", "datasets", "runs")]
    return hashlib.sha256(repr(rows).encode()).hexdigest()
