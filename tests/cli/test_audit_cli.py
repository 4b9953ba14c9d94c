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


def test_a_violation_exits_3_and_a_failure_never_does(monkeypatch, capsys):
    """Exit 1 was both VIOLATION and any failure (an accountant's, an allocator's): a CI gate on
    it read a crash as a leak."""
    import functools

    import dpwa.audit
    from tests.audit.test_planted_bugs import no_noise

    with monkeypatch.context() as m:  # the planted bug "noise switched off", through the CLI
        m.setattr(dpwa.audit, "canary_run", functools.partial(dpwa.audit.canary_run, make_sgd=no_noise))
        assert main(["audit", QUICK, *SMALL]) == 3
    assert "VIOLATION" in capsys.readouterr().out
    # the PRV accountant cannot discretise sigma 0.3 over these steps: a failure, exit 1
    code = main(["audit", QUICK, *SMALL, "privacy.epsilon=null", "privacy.noise_multiplier=0.3"])
    assert code == 1, capsys.readouterr()


def test_canaries_past_the_memory_are_refused_by_name(capsys):
    """3e6 canaries asked ~18 GB per chunk: an allocator's traceback or the out-of-memory killer."""
    assert main(["audit", QUICK, "--canaries", "1000000000000"]) == 2
    err = capsys.readouterr().err
    assert "--canaries=1000000000000 needs ~" in err and "use --canaries <=" in err and "Traceback" not in err
