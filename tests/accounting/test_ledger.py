import json
import multiprocessing as mp
import sqlite3
import stat

import pytest

from tests.conftest import ledger_snapshot
from accounting import (BudgetExceededError, DatasetMismatchError, DeltaAboveOneOverNError, Gaussian,
                        InvalidParameterError, Ledger, LedgerCorruptError, LedgerLockedError, PoissonGaussian,
                        RunStateError, UnknownRunError, epsilon, fingerprint)
from accounting.ledger import check_delta_below_1_over_n

Q, DELTA = 0.08192, 1e-5
FP = fingerprint(range(1000))


def ev(sigma=3.0, steps=100, q=Q):
    return PoissonGaussian(noise_multiplier=sigma, sample_rate=q, steps=steps)




def test_fingerprint_depends_on_size_order_and_values():
    assert fingerprint([0, 1, 2]) != fingerprint([0, 1])
    assert fingerprint([0, 1, 2]) != fingerprint([2, 1, 0])
    assert fingerprint([0, 1, 2]) == fingerprint(iter([0, 1, 2]))
    assert fingerprint(range(5)).startswith("n5-")


def test_run_life_cycle(ledger_path):
    ledger = Ledger(ledger_path)
    plan = ev(steps=1000)
    run = ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[plan], config_hash="abc")
    assert run.status == "reserved" and run.counted == (plan,) and run.spent == ()
    ledger.progress("r1", [ev(steps=300)])
    assert ledger.run("r1").counted == (plan,)  # the reservation still counts in full
    ledger.commit("r1", [ev(steps=600)])
    assert ledger.run("r1").status == "committed" and ledger.run("r1").counted == (ev(steps=600),)
    with pytest.raises(RunStateError, match="committed"):
        ledger.commit("r1", [ev(steps=700)])
    with pytest.raises(RunStateError, match="committed"):
        ledger.release("r1", reason="oops")
    assert ledger.spent("d", delta=DELTA) == pytest.approx(epsilon([ev(steps=600)], delta=DELTA))


def test_spend_cannot_exceed_the_reservation(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev(steps=100)])
    with pytest.raises(RunStateError, match="reservation"):
        ledger.progress("r1", [ev(steps=101)])
    with pytest.raises(RunStateError, match="reservation"):
        ledger.commit("r1", [ev(sigma=2.0, steps=10)])
    with pytest.raises(UnknownRunError, match="'nope'"):
        ledger.commit("nope", [])


def test_recorded_spend_never_goes_down(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev(steps=1000)])
    ledger.progress("r1", [ev(steps=600)])
    assert ledger.progress("r1", [ev(steps=10)]).spent == (ev(steps=600),)
    assert ledger.commit("r1", [ev(steps=10)]).spent == (ev(steps=600),)
    ledger.reserve(run_id="r2", dataset="d", fingerprint=FP, events=[ev(steps=1000)])
    ledger.progress("r2", [ev(steps=900)])
    ledger.progress("r2", [])
    assert ledger.release("r2", reason="test").counted == (ev(steps=900),)


def test_release_keeps_recorded_progress(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev(steps=1000)])
    ledger.progress("r1", [ev(steps=50)])
    with pytest.raises(InvalidParameterError, match="reason"):
        ledger.release("r1", reason="  ")
    run = ledger.release("r1", reason="diverged")
    assert run.status == "released" and run.reason == "diverged" and run.counted == (ev(steps=50),)


def test_ledger_composition_equals_one_accountant(ledger_path):
    """Two runs recorded in the ledger give the same epsilon as one accountant fed both events."""
    a, b = ev(sigma=10.0, steps=875), PoissonGaussian(noise_multiplier=1.1, sample_rate=0.02048, steps=600)
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="a", dataset="d", fingerprint=FP, events=[a])
    ledger.commit("a", [a])
    ledger.reserve(run_id="b", dataset="d", fingerprint=FP, events=[b])
    for name in ("prv", "rdp", "pld"):
        assert ledger.spent("d", delta=DELTA, accountant=name) == pytest.approx(
            epsilon([a, b], delta=DELTA, accountant=name), rel=1e-12)


def test_persists_across_instances(ledger_path):
    Ledger(ledger_path).reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()])
    again = Ledger(ledger_path)
    assert [r.run_id for r in again.runs("d")] == ["r1"]
    assert again.dataset("d").fingerprint == again.keyed(FP) != FP


def test_budget_refuses_a_run_before_it_starts(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.set_budget("d", epsilon=2.0, delta=DELTA)
    ledger.reserve(run_id="ok", dataset="d", fingerprint=FP, events=[ev(sigma=6.0, steps=1000)])
    before = ledger_snapshot(ledger_path)
    with pytest.raises(BudgetExceededError, match=r"'big'.*past its budget epsilon=2"):
        ledger.reserve(run_id="big", dataset="d", fingerprint=FP, events=[ev(sigma=6.0, steps=1000)])
    assert ledger_snapshot(ledger_path) == before
    # Committing less than planned frees budget for the next run.
    ledger.commit("ok", [ev(sigma=6.0, steps=10)])
    ledger.reserve(run_id="big", dataset="d", fingerprint=FP, events=[ev(sigma=6.0, steps=1000)])
    assert ledger.remaining("d") >= 0


def test_set_budget_below_spend_needs_force(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev(sigma=3.0, steps=2468)])
    before = ledger_snapshot(ledger_path)
    with pytest.raises(BudgetExceededError, match="already spent epsilon=6.5"):
        ledger.set_budget("d", epsilon=1.0, delta=DELTA)
    assert ledger_snapshot(ledger_path) == before
    ledger.set_budget("d", epsilon=1.0, delta=DELTA, force=True)
    assert ledger.remaining("d") == 0.0
    with pytest.raises(BudgetExceededError):
        ledger.reserve(run_id="r2", dataset="d", fingerprint=FP, events=[Gaussian(noise_multiplier=100.0)])


def test_one_name_one_dataset(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="cifar10", fingerprint=FP, events=[ev()])
    before = ledger_snapshot(ledger_path)
    with pytest.raises(DatasetMismatchError, match="fingerprint"):
        ledger.reserve(run_id="r2", dataset="cifar10", fingerprint=fingerprint(range(999)), events=[ev()])
    assert ledger_snapshot(ledger_path) == before


def test_budget_set_before_first_run_binds_on_first_run(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.set_budget("d", epsilon=8.0, delta=DELTA, size=1000)
    assert ledger.dataset("d").fingerprint is None
    ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()])
    assert ledger.dataset("d").fingerprint == ledger.keyed(FP)


def test_duplicate_run_id_is_refused(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()])
    with pytest.raises(RunStateError, match="already"):
        ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()])


def test_a_second_name_for_the_same_data_composes_with_the_first(ledger_path):
    """A class subset is fingerprinted by its source's labels, so whatever name its run gives,
    it is charged to the parent: spend grows and the parent's budget counts both."""
    ledger = Ledger(ledger_path)
    one = ev(sigma=6.0, steps=1000)
    budget = (epsilon([one] * 2, delta=DELTA) + epsilon([one] * 3, delta=DELTA)) / 2  # admits two runs
    ledger.set_budget("cifar10", epsilon=budget, delta=DELTA, size=1000)
    ledger.reserve(run_id="whole", dataset="cifar10", fingerprint=FP, events=[one], size=1000)
    alone = ledger.spent("cifar10")
    run = ledger.reserve(run_id="subset", dataset="cifar10-classes-5-9", fingerprint=FP, events=[one], size=1000)
    assert run.dataset == "cifar10"
    assert [d.name for d in ledger.datasets()] == ["cifar10"]
    assert ledger.dataset("cifar10").aliases == ("cifar10-classes-5-9",)
    assert ledger.dataset("cifar10-classes-5-9") == ledger.dataset("cifar10")
    both = epsilon([one, one], delta=DELTA)
    assert ledger.spent("cifar10") == ledger.spent("cifar10-classes-5-9") == pytest.approx(both)
    assert both > alone
    assert [r.run_id for r in ledger.runs("cifar10-classes-5-9")] == ["whole", "subset"]
    # The budget refuses a third run by counting both, under either name.
    before = ledger_snapshot(ledger_path)
    for name in ("cifar10-classes-5-9", "cifar10-classes-0-4", "cifar10"):
        with pytest.raises(BudgetExceededError, match=r"dataset 'cifar10'.*already spent or reserved: "
                                                      f"{both:.4f}"):
            ledger.reserve(run_id="third", dataset=name, fingerprint=FP, events=[one])
    assert ledger_snapshot(ledger_path) == before and ledger.dataset("cifar10").aliases == ("cifar10-classes-5-9",)
    # A budget set through the alias is the parent's.
    ledger.set_budget("cifar10-classes-5-9", epsilon=50.0, delta=DELTA)
    assert ledger.dataset("cifar10").budget_epsilon == 50.0
    assert Ledger(ledger_path).remaining("cifar10-classes-5-9") == pytest.approx(50.0 - both)


def test_an_alias_is_still_one_name_one_dataset(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="cifar10", fingerprint=FP, events=[ev()])
    ledger.reserve(run_id="r2", dataset="sub", fingerprint=FP, events=[ev()])
    before = ledger_snapshot(ledger_path)
    with pytest.raises(DatasetMismatchError, match=r"'sub' \(an alias of 'cifar10'\)"):
        ledger.reserve(run_id="r3", dataset="sub", fingerprint=fingerprint(range(999)), events=[ev()])
    assert ledger_snapshot(ledger_path) == before
    # A name made by set-budget, not bound to data yet, does not silently split a dataset's spend.
    ledger.set_budget("other", epsilon=1.0, delta=DELTA)
    before = ledger_snapshot(ledger_path)
    with pytest.raises(DatasetMismatchError, match="is dataset 'cifar10'"):
        ledger.reserve(run_id="r3", dataset="other", fingerprint=FP, events=[ev()])
    assert ledger_snapshot(ledger_path) == before and ledger.dataset("other").fingerprint is None


def _unkeyed(ledger_path, fp):
    """Turn a file written by this dpwa back into a version 2 one: no key, plain fingerprints."""
    with sqlite3.connect(ledger_path) as conn:
        conn.execute("DELETE FROM meta WHERE key='fingerprint_key'")
        conn.execute("UPDATE datasets SET fingerprint=? WHERE fingerprint IS NOT NULL", (fp,))
        conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")


def _version(ledger_path):
    with sqlite3.connect(ledger_path) as conn:
        return conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]


def test_a_version_1_ledger_is_read_and_upgraded_by_its_first_write(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()])
    ledger.close()
    _unkeyed(ledger_path, FP)
    with sqlite3.connect(ledger_path) as conn:  # what dpwa wrote before aliases existed
        conn.execute("DROP TABLE aliases")
        conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    old = Ledger(ledger_path)
    assert old.dataset("d").aliases == () and old.spent("d", delta=DELTA) > 0
    assert old.dataset("d").fingerprint == old.keyed(FP) == FP  # not keyed before the first write
    old.reserve(run_id="r2", dataset="d-subset", fingerprint=FP, events=[ev()])
    assert old.dataset("d").aliases == ("d-subset",) and len(old.runs("d")) == 2
    assert old.dataset("d").fingerprint == old.keyed(FP) != FP and _version(ledger_path) == "3"


def test_a_ledger_written_before_run_deltas_is_read_and_gains_them_on_its_first_write(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()], delta=1e-6)
    ledger.close()
    _unkeyed(ledger_path, FP)
    with sqlite3.connect(ledger_path) as conn:  # a version 2 file of an earlier dpwa
        conn.execute("DROP TABLE run_deltas")
    old = Ledger(ledger_path, create=False)
    assert old.run("r1").delta is None and old.spent("d", delta=DELTA) > 0
    old.reserve(run_id="r2", dataset="d", fingerprint=FP, events=[ev()], delta=1e-6)
    assert [r.delta for r in old.runs("d")] == [None, 1e-6] and _version(ledger_path) == "3"


def test_stored_fingerprints_are_keyed_and_a_version_2_file_is_keyed_by_its_first_write(ledger_path, tmp_path):
    """The plain fingerprint is a hash of the labels: who knew every label but one could find
    the last by hashing each class. The ledger stores, shows and exports it keyed under a secret
    of its file, which differs between files and is not exported; the same data still composes."""
    labels = [i % 10 for i in range(1000)]
    known = labels[:-1]  # all but the last
    ledger = Ledger(ledger_path)
    one = ev(sigma=6.0, steps=1000)
    budget = (epsilon([one] * 2, delta=DELTA) + epsilon([one] * 3, delta=DELTA)) / 2  # admits two runs
    ledger.set_budget("d", epsilon=budget, delta=DELTA, size=1000)
    ledger.reserve(run_id="r1", dataset="d", fingerprint=fingerprint(labels), events=[one])
    exported = json.dumps(ledger.export())
    with sqlite3.connect(ledger_path) as conn:
        key = conn.execute("SELECT value FROM meta WHERE key='fingerprint_key'").fetchone()[0]
    assert len(bytes.fromhex(key)) == 32 and key not in exported
    guesses = {fingerprint([*known, c]) for c in range(10)}
    assert fingerprint(labels) in guesses and not any(g in exported for g in guesses)
    assert ledger.dataset("d").fingerprint in exported and ledger.dataset("d").fingerprint.startswith("n1000-k")
    other = Ledger(tmp_path / "other.sqlite")
    other.reserve(run_id="r1", dataset="d", fingerprint=fingerprint(labels), events=[one])
    assert other.dataset("d").fingerprint != ledger.dataset("d").fingerprint  # another file, another key
    before = ledger_snapshot(tmp_path / "other.sqlite")
    for foreign in (ledger.dataset("d").fingerprint, "n5-k0123456789abcdef"):  # not issued by `other`: refused
        with pytest.raises(InvalidParameterError, match="keyed form, but no dataset in ledger"):
            other.reserve(run_id="r2", dataset="copy", fingerprint=foreign, events=[one])
    with pytest.raises(InvalidParameterError, match="non-empty fingerprint"):
        other.reserve(run_id="r2", dataset="copy", fingerprint="", events=[one])
    assert ledger_snapshot(tmp_path / "other.sqlite") == before
    # The keyed form, as `dpwa ledger show` prints it, names the same data.
    ledger.reserve(run_id="r2", dataset="alias", fingerprint=ledger.dataset("d").fingerprint, events=[one])
    assert ledger.dataset("alias") == ledger.dataset("d")
    # A version 2 file (plain fingerprints, no key) is read as it is and keyed by its first write,
    # and its runs still count against the budget of the same data.
    ledger.close()
    _unkeyed(ledger_path, fingerprint(labels))
    old = Ledger(ledger_path)
    assert old.dataset("d").fingerprint == fingerprint(labels) and _version(ledger_path) == "2"
    assert fingerprint(labels) not in json.dumps(old.export())  # shown hidden until the file is keyed
    assert old.export()["datasets"][0]["fingerprint"].startswith("n1000-(plain, hidden")
    with pytest.raises(BudgetExceededError, match="already spent or reserved"):
        old.reserve(run_id="r3", dataset="d", fingerprint=fingerprint(labels), events=[one])
    assert _version(ledger_path) == "2"  # the refused reservation rolled the upgrade back too
    old.release("r2", reason="test")
    old.reserve(run_id="r3", dataset="renamed", fingerprint=fingerprint(labels), events=[one])
    assert old.dataset("renamed").name == "d" and _version(ledger_path) == "3"
    assert old.dataset("d").fingerprint == old.keyed(fingerprint(labels)) != fingerprint(labels)


def test_the_upgrade_merges_datasets_a_version_1_file_kept_apart_for_the_same_data(ledger_path):
    """Version 1 made a dataset per name, so one data could sit under two names, each
    counting only its own runs. The first write of this version makes the later one an alias
    of the oldest: one spend, one budget (the tighter of theirs)."""
    ledger = Ledger(ledger_path)
    one = ev(sigma=6.0, steps=1000)
    ledger.reserve(run_id="r1", dataset="cifar", fingerprint=FP, events=[one])
    ledger.reserve(run_id="r2", dataset="other", fingerprint=fingerprint(range(999)), events=[one])
    ledger.close()
    with sqlite3.connect(ledger_path) as conn:  # what version 1 allowed: a second name, bound to the same data
        conn.execute("UPDATE datasets SET name='cifar-copy', created_at='9999' WHERE name='other'")
        conn.execute("UPDATE runs SET dataset='cifar-copy' WHERE run_id='r2'")
    budget = (epsilon([one] * 2, delta=DELTA) + epsilon([one] * 3, delta=DELTA)) / 2  # admits two runs
    with sqlite3.connect(ledger_path) as conn:
        conn.execute("UPDATE datasets SET budget_epsilon=?, budget_delta=? WHERE name='cifar-copy'", (budget, DELTA))
    _unkeyed(ledger_path, FP)
    with sqlite3.connect(ledger_path) as conn:
        conn.execute("DROP TABLE aliases")
        conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    old = Ledger(ledger_path)
    assert [d.name for d in old.datasets()] == ["cifar", "cifar-copy"]
    with pytest.raises(BudgetExceededError, match="dataset 'cifar'.*named 'cifar-copy'"):  # both runs count
        old.reserve(run_id="r3", dataset="cifar-copy", fingerprint=FP, events=[one])
    assert [d.name for d in old.datasets()] == ["cifar", "cifar-copy"]  # refused: nothing written, not upgraded
    old.commit("r1", [one])  # a write: the upgrade
    assert [d.name for d in old.datasets()] == ["cifar"] and old.dataset("cifar").aliases == ("cifar-copy",)
    assert old.dataset("cifar").budget_epsilon == budget  # the oldest had none: the copy's is kept
    assert [r.run_id for r in old.runs("cifar")] == ["r1", "r2"]
    assert old.spent("cifar", delta=DELTA) == pytest.approx(epsilon([one, one], delta=DELTA))


def test_merged_budgets_at_two_deltas_become_one_that_implies_both(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="cifar", fingerprint=FP, events=[ev()])
    ledger.reserve(run_id="r2", dataset="other", fingerprint=fingerprint(range(999)), events=[ev()])
    ledger.set_budget("cifar", epsilon=10.0, delta=1e-5)
    ledger.set_budget("other", epsilon=3.0, delta=1e-6)
    ledger.close()
    with sqlite3.connect(ledger_path) as conn:
        conn.execute("UPDATE datasets SET name='cifar-copy', created_at='9999' WHERE name='other'")
        conn.execute("UPDATE runs SET dataset='cifar-copy' WHERE run_id='r2'")
    _unkeyed(ledger_path, FP)
    old = Ledger(ledger_path)
    old.commit("r1", [ev()])
    record = old.dataset("cifar")
    assert record.aliases == ("cifar-copy",) and (record.budget_epsilon, record.budget_delta) == (3.0, 1e-6)


def test_a_new_ledger_file_is_its_owners_alone(tmp_path):
    """It holds the fingerprint key: 0600, and SQLite gives its WAL file the same mode."""
    path = tmp_path / "new.sqlite"
    Ledger(path).reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tmp_path.glob("new.sqlite-*"))
    _unkeyed(path, FP)  # a version 2 file, readable by all: its first write keys it and hides it from others
    for p in tmp_path.glob("new.sqlite*"):
        p.chmod(0o644)
    Ledger(path).commit("r1", [ev()])
    assert _version(path) == "3" and stat.S_IMODE(path.stat().st_mode) == 0o640  # a sharing group keeps it
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in tmp_path.glob("new.sqlite-*"))
    empty = tmp_path / "touched.sqlite"  # an empty file made by `touch` or mktemp gets the key on opening
    empty.write_bytes(b"")
    empty.chmod(0o644)
    Ledger(empty)
    assert stat.S_IMODE(empty.stat().st_mode) == 0o640


def test_a_newer_ledger_is_refused(ledger_path):
    Ledger(ledger_path).reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()])
    with sqlite3.connect(ledger_path) as conn:
        conn.execute("UPDATE meta SET value='4' WHERE key='schema_version'")
    with pytest.raises(LedgerCorruptError, match="schema version '4'.*reads versions 1, 2, 3"):
        Ledger(ledger_path).spent("d", delta=DELTA)


def test_a_run_records_its_delta_and_budget_checks_ignore_it(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.set_budget("d", epsilon=1.0, delta=DELTA, size=1000)
    run = ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev(sigma=10.0)], delta=1e-4)
    assert run.delta == 1e-4 and run.to_dict()["delta"] == 1e-4 and ledger.run("r1").delta == 1e-4
    assert ledger.export()["datasets"][0]["runs"][0]["delta"] == 1e-4
    with pytest.raises(InvalidParameterError, match="delta=1.5"):
        ledger.reserve(run_id="r2", dataset="d", fingerprint=FP, events=[ev()], delta=1.5)
    assert [r.run_id for r in ledger.runs("d")] == ["r1"]


def test_reporting_delta_prefers_given_then_budget_then_runs_then_a_default(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()], size=1000)
    assert ledger.reporting_delta("d") == (1 / 10_000, "default")
    ledger.reserve(run_id="r2", dataset="d", fingerprint=FP, events=[ev()], delta=1e-5)
    ledger.reserve(run_id="r3", dataset="d", fingerprint=FP, events=[ev()], delta=1e-6)
    assert ledger.reporting_delta("d") == (1e-6, "runs")  # the smallest: the largest epsilon
    ledger.set_budget("d", epsilon=50.0, delta=1e-5)
    assert ledger.reporting_delta("d") == (1e-5, "budget")
    assert ledger.reporting_delta("d", 1e-7) == (1e-7, "given")
    ledger.reserve(run_id="x", dataset="no-size", fingerprint="0123456789abcdef", events=[ev()])  # says no N
    assert ledger.reporting_delta("no-size") == (None, "none")
    ledger.reserve(run_id="y", dataset="five", fingerprint=fingerprint(range(5)), events=[ev()])  # says N=5
    assert ledger.reporting_delta("five") == (0.02, "default")


def test_history_is_the_spend_after_each_run_in_order(ledger_path):
    ledger = Ledger(ledger_path)
    a, b, c = ev(sigma=2.0, steps=200), ev(sigma=4.0, steps=300, q=0.02), ev(sigma=2.0, steps=100)
    ledger.reserve(run_id="a", dataset="d", fingerprint=FP, events=[a])
    ledger.commit("a", [a])
    ledger.reserve(run_id="b", dataset="d", fingerprint=FP, events=[b])          # reserved: counts in full
    ledger.reserve(run_id="c", dataset="d", fingerprint=FP, events=[c])
    ledger.release("c", reason="never started")                                   # counts nothing
    rows = ledger.history("d", delta=DELTA)
    assert [r.run_id for r, _, _ in rows] == ["a", "b", "c"]
    assert [alone for _, alone, _ in rows] == [epsilon([a], delta=DELTA), epsilon([b], delta=DELTA), 0.0]
    assert [total for _, _, total in rows] == [epsilon([a], delta=DELTA), epsilon([a, b], delta=DELTA),
                                               epsilon([a, b], delta=DELTA)]
    assert rows[-1][2] == ledger.spent("d", delta=DELTA)
    assert ledger.history("d", delta=DELTA, accountant="rdp")[-1][2] == ledger.spent("d", delta=DELTA,
                                                                                      accountant="rdp")


def test_delta_at_or_above_1_over_n_is_refused_unless_accepted(ledger_path):
    with pytest.raises(DeltaAboveOneOverNError, match=r"delta=0.001 is not below 1/N = 0.001 \(N=1000"):
        check_delta_below_1_over_n(1e-3, 1000)
    check_delta_below_1_over_n(9.99e-4, 1000)
    with pytest.warns(UserWarning, match="accepted by --yes"):
        check_delta_below_1_over_n(0.5, 1000, accept=True, accept_hint="--yes")
    with pytest.raises(InvalidParameterError, match="size=0"):
        check_delta_below_1_over_n(1e-5, 0)
    ledger = Ledger(ledger_path)
    with pytest.raises(DeltaAboveOneOverNError, match="accept_delta_above_1_over_n=True"):
        ledger.set_budget("tiny", epsilon=1.0, delta=0.01, size=1000)
    assert ledger.datasets() == []
    ledger.set_budget("tiny", epsilon=1.0, delta=1e-4, size=1000)
    with pytest.raises(DeltaAboveOneOverNError):  # N known from the ledger
        ledger.set_budget("tiny", epsilon=1.0, delta=0.01)
    with pytest.warns(UserWarning, match="1/N"):
        ledger.set_budget("tiny", epsilon=1.0, delta=0.01, accept_delta_above_1_over_n=True)
    assert ledger.dataset("tiny").budget_delta == 0.01


def test_read_only_open_creates_nothing(tmp_path):
    path = tmp_path / "sub" / "ledger.sqlite"
    ledger = Ledger(path, create=False)
    assert ledger.datasets() == [] and ledger.runs() == []
    assert not path.exists() and not path.parent.exists()


def test_garbage_file_is_refused_and_untouched(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    before = path.read_bytes()
    with pytest.raises(LedgerCorruptError, match=str(path)):
        Ledger(path)
    assert path.read_bytes() == before


def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(LedgerCorruptError, match="not a dpwa ledger"):
        Ledger(path)


def test_damaged_row_is_reported(ledger_path):
    Ledger(ledger_path).reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()])
    with sqlite3.connect(ledger_path) as conn:
        conn.execute("UPDATE runs SET planned='{not json' WHERE run_id='r1'")
    with pytest.raises(LedgerCorruptError, match="'r1'"):
        Ledger(ledger_path).runs()


def test_locked_ledger_times_out_with_a_clear_error_and_loses_nothing(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev()])
    holder = sqlite3.connect(ledger_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerLockedError, match="locked by another process"):
            Ledger(ledger_path, timeout=0.2).reserve(run_id="r2", dataset="d", fingerprint=FP, events=[ev()])
        # Readers are not blocked (WAL): the existing entry is still visible.
        assert [r.run_id for r in Ledger(ledger_path, timeout=0.2).runs()] == ["r1"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [r.run_id for r in Ledger(ledger_path).runs()] == ["r1"]


def _charge(args):
    path, worker, n_runs, sigma = args
    ledger = Ledger(path, timeout=120)
    ok = refused = 0
    for k in range(n_runs):
        try:
            ledger.reserve(run_id=f"w{worker}-{k}", dataset="d", fingerprint=FP,
                           events=[PoissonGaussian(noise_multiplier=sigma, sample_rate=0.01, steps=100)])
            ok += 1
        except BudgetExceededError:
            refused += 1
    return ok, refused


def _create_and_reserve(path, worker, start, errors):
    start.wait()
    try:
        Ledger(path, timeout=30).reserve(run_id=f"w{worker}", dataset="d", fingerprint=FP, events=[ev()])
    except Exception as e:  # noqa: BLE001 - reported to the test
        errors.put(f"{type(e).__name__}: {e}")


def test_processes_creating_one_new_ledger_at_once_all_succeed(tmp_path):
    """The second creator finds the file without tables, waits for the lock and runs the
    creation again: it must not fail on the first one's key."""
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    for trial in range(8):
        path, start = tmp_path / f"l{trial}.sqlite", ctx.Event()
        procs = [ctx.Process(target=_create_and_reserve, args=(path, w, start, errors)) for w in range(4)]
        for p in procs:
            p.start()
        start.set()
        for p in procs:
            p.join(60)
        assert len(Ledger(path).runs("d")) == 4
    assert errors.empty(), errors.get()


def test_eight_processes_lose_nothing(ledger_path):
    Ledger(ledger_path).set_budget("d", epsilon=1e6, delta=DELTA, accountant="rdp")  # no binding budget
    with mp.get_context("spawn").Pool(8) as pool:
        results = pool.map(_charge, [(str(ledger_path), w, 10, 20.0) for w in range(8)])
    assert sum(ok for ok, _ in results) == 80
    runs = Ledger(ledger_path).runs("d")
    assert len(runs) == 80 and len({r.run_id for r in runs}) == 80


def test_eight_processes_never_pass_the_budget(ledger_path):
    # Each run spends the same; the budget admits a known number of them.
    one = PoissonGaussian(noise_multiplier=2.0, sample_rate=0.01, steps=100)
    per_run = [epsilon([one] * k, delta=DELTA, accountant="rdp") for k in range(1, 40)]
    budget = (per_run[10] + per_run[11]) / 2  # admits exactly 11 runs
    Ledger(ledger_path).set_budget("d", epsilon=budget, delta=DELTA, accountant="rdp")
    with mp.get_context("spawn").Pool(8) as pool:
        results = pool.map(_charge, [(str(ledger_path), w, 3, 2.0) for w in range(8)])
    assert sum(ok for ok, _ in results) == 11
    assert sum(refused for _, refused in results) == 24 - 11
    ledger = Ledger(ledger_path)
    assert len(ledger.runs("d")) == 11
    assert ledger.spent("d") <= budget


def test_a_budget_delta_set_before_n_was_known_is_checked_at_the_first_reservation(tmp_path):
    from accounting.errors import DeltaAboveOneOverNError

    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.set_budget("toy", epsilon=2.0, delta=0.05)  # no size yet: 1/N unknown
    run = PoissonGaussian(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    with pytest.raises(DeltaAboveOneOverNError, match="accept-delta-above-1-over-n"):
        ledger.reserve(run_id="r", dataset="toy", fingerprint="n100-abc", events=[run], size=100)
    assert ledger.runs("toy") == [] and ledger.dataset("toy").size is None  # nothing written
    ledger.set_budget("toy", epsilon=2.0, delta=0.05, size=100, accept_delta_above_1_over_n=True)
    with pytest.warns(UserWarning):
        ledger.reserve(run_id="r", dataset="toy", fingerprint="n100-abc", events=[run], size=100)


def test_checkpointed_counts_never_go_down_and_only_a_reserved_run_records_them(tmp_path):
    """What a run's newest checkpoint holds: a resume from an older copy is refused against it."""
    import sqlite3

    from accounting import RunStateError

    path = tmp_path / "l.sqlite"
    led = Ledger(path)
    led.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev(steps=100)])
    assert led.checkpointed_events("r1") == []
    led.checkpointed("r1", [ev(steps=40)])
    led.checkpointed("r1", [ev(steps=20)])  # a resumed run redoing steps: the newest stays
    assert led.checkpointed_events("r1") == [ev(steps=40)]
    led.commit("r1", [ev(steps=100)])
    with pytest.raises(RunStateError, match="only a reserved run checkpoints"):
        led.checkpointed("r1", [ev(steps=100)])
    with sqlite3.connect(path) as conn:  # a file from before the table: nothing recorded, gained on a write
        conn.execute("DROP TABLE run_checkpoints")
    assert Ledger(path).checkpointed_events("r1") == []
    Ledger(path).reserve(run_id="r2", dataset="d", fingerprint=FP, events=[ev(steps=10)])
    Ledger(path).checkpointed("r2", [ev(steps=5)])
    assert Ledger(path).checkpointed_events("r2") == [ev(steps=5)]


def test_a_size_declared_by_set_budget_must_be_the_datas_and_can_be_corrected_until_bound(tmp_path):
    """set-budget's --dataset-size checks the budget's delta against 1/N; data of another size
    bound to it later would escape that check (a delta of 1e-4 on 50,000 examples)."""
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.set_budget("c10", epsilon=8.0, delta=1e-4, size=1000)
    big = fingerprint([0] * 50_000)
    for size in (50_000, None):  # given, or said by the fingerprint (`dpwa ledger record --fingerprint`)
        with pytest.raises(DatasetMismatchError, match="has 1000 examples.*has 50000.*--dataset-size 50000"):
            ledger.reserve(run_id="r", dataset="c10", fingerprint=big, events=[ev()], size=size)
    with pytest.raises(InvalidParameterError, match="size=999 does not match fingerprint n50000-"):
        ledger.reserve(run_id="r", dataset="c10", fingerprint=big, events=[ev()], size=999)
    assert ledger.runs() == [] and ledger.dataset("c10").fingerprint is None
    with pytest.raises(DeltaAboveOneOverNError):  # corrected: the delta is checked against the real N
        ledger.set_budget("c10", epsilon=8.0, delta=1e-4, size=50_000)
    ledger.set_budget("c10", epsilon=8.0, delta=1e-6, size=50_000)
    ledger.reserve(run_id="r", dataset="c10", fingerprint=big, events=[ev()])
    assert ledger.dataset("c10").size == 50_000
    with pytest.raises(DatasetMismatchError, match="has 50000 examples .*fingerprint.*not 1000"):  # bound: fixed
        ledger.set_budget("c10", epsilon=8.0, delta=1e-6, size=1000)


def test_only_the_last_session_to_claim_a_run_records_its_spend(tmp_path):
    """Two copies of a run folder resumed at once each claim the run: the earlier session is
    refused at its next record, and while one writes inside `held` no claim can interleave."""
    import sqlite3

    from accounting import SessionLostError

    path = tmp_path / "l.sqlite"
    led = Ledger(path)
    led.reserve(run_id="r1", dataset="d", fingerprint=FP, events=[ev(steps=100)])
    first = led.claim("r1")
    led.progress("r1", [ev(steps=10)], session=first)
    second = Ledger(path).claim("r1")
    assert second != first
    for record in (lambda: led.progress("r1", [ev(steps=20)], session=first),
                   lambda: led.checkpointed("r1", [ev(steps=20)], session=first),
                   lambda: led.commit("r1", [ev(steps=20)], session=first)):
        with pytest.raises(SessionLostError, match="resumed by another session"):
            record()
    with pytest.raises(SessionLostError):
        with led.held("r1", first):
            raise AssertionError("not reached: nothing is written by a session that lost the run")
    assert led.run("r1").spent == (ev(steps=10),) and led.checkpointed_events("r1") == []
    with Ledger(path).held("r1", second):  # its writes and records: one transaction ...
        with pytest.raises(LedgerLockedError):  # ... that a claim cannot enter
            Ledger(path, timeout=0).claim("r1")
    other = Ledger(path)
    with pytest.raises(RuntimeError, match="disk full"):  # a failed write inside records nothing
        with other.held("r1", second):
            other.checkpointed("r1", [ev(steps=30)], session=second)
            raise RuntimeError("disk full")
    assert other.checkpointed_events("r1") == []
    other.commit("r1", [ev(steps=100)], session=second)
    with pytest.raises(SessionLostError):  # committed by the other session: the first hears why
        led.progress("r1", [ev(steps=100)], session=first)
    with pytest.raises(RunStateError, match="committed"):  # a caller without a session (a query): as before
        led.progress("r1", [ev(steps=100)])
    Ledger(path).reserve(run_id="r3", dataset="d", fingerprint=FP, events=[ev(steps=10)])
    live = Ledger(path).claim("r3")
    Ledger(path).checkpointed("r3", [ev(steps=8)], session=live)
    with pytest.raises(RunStateError, match="holds 4 of the 8 releases of the run's newest checkpoint"):
        Ledger(path).claim("r3", holding=[ev(steps=4)])  # a stale copy: refused, the live claim kept
    Ledger(path).progress("r3", [ev(steps=9)], session=live)
    Ledger(path).claim("r3", holding=[ev(steps=8)])
    with sqlite3.connect(path) as conn:  # a file from before the table gains it on a write
        conn.execute("DROP TABLE run_sessions")
    Ledger(path).reserve(run_id="r2", dataset="d", fingerprint=FP, events=[ev(steps=10)])
    token = Ledger(path).claim("r2")
    Ledger(path).commit("r2", [ev(steps=10)], session=token)
