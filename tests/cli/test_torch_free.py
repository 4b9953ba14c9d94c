"""Budget questions must start fast and run anywhere: no torch behind `import accounting`
or `dpwa budget`/`dpwa ledger`."""

import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import sys
import accounting
assert 'torch' not in sys.modules, 'import accounting pulled in torch'
from dpwa.cli import main
code = main(sys.argv[1:])
assert code == 0, code
assert 'torch' not in sys.modules, 'the command pulled in torch'
print('TORCH-FREE')
"""


def probe(*args):
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_budget_is_torch_free():
    out = probe("budget", "--sigma", "3", "--sample-rate", "0.08192", "--steps", "2468", "--delta", "1e-5")
    assert "TORCH-FREE" in out.stdout, out.stderr


def test_ledger_is_torch_free(tmp_path):
    out = probe("ledger", "show", "--ledger", str(tmp_path / "l.sqlite"))
    assert "TORCH-FREE" in out.stdout, out.stderr
