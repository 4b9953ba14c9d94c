"""`dpwa audit`: both lower bounds and the accountant's epsilon for a config, no privacy charge."""

import json

from dpwa.cli import main
from tests.conftest import ROOT, ledger_snapshot

QUICK = str(ROOT / "configs" / "quickstart.yaml")
SMALL = ["train.steps=40", "--canaries", "300"]


def test_audit_prints_both_bounds_next_to_the_accountant(ledger_path, capsys):
    code = main(["audit", QUICK, *SMALL])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "accountant (prv)" in out and "epsilon <=" in out
    assert "Clopper-Pearson" in out and "one run (Steinke et al.)" in out and "95% confidence" in out
    assert "of the accountant's" in out and "consistent" in out
    assert ledger_snapshot(ledger_path) is None  # an audit reads no private data and charges nothing


def test_audit_json(capsys):
    code = main(["audit", QUICK, *SMALL, "--json", "--confidence", "0.9"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["mechanism"]["steps"] == 40 and report["mechanism"]["augmult_k"] == 4
    assert report["mechanism"]["sample_rate"] == 256 / 1497
    assert 0 < report["claimed_epsilon"] and report["violated"] is False
    assert {b["method"] for b in report["bounds"]} == {"clopper-pearson", "one-run"}
    assert all(b["confidence"] == 0.9 and 0 <= b["epsilon"] <= report["claimed_epsilon"] for b in report["bounds"])
    assert report["canaries"] == 300
