"""The on-disk memo of accountant results (accounting/memo.py): a hit returns exactly the
computed value, a change of code or inputs misses, and a broken cache file costs nothing."""
import pytest

from accounting import PoissonGaussian, epsilon, memo, steps_for
from accounting import accountants as A

from tests.conftest import run_dpwa

EVENTS = [PoissonGaussian(noise_multiplier=0.6867, sample_rate=0.02048, steps=637),
          PoissonGaussian(noise_multiplier=10.0, sample_rate=0.08192, steps=875)]


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "cache.sqlite"
    memo.enable(path)
    A._memoised_rdp_curve.cache_clear()
    yield path
    memo.disable()
    A._memoised_rdp_curve.cache_clear()


def _no_composition(*args, **kwargs):
    raise AssertionError("composed although the memo holds the value")


def test_hit_is_the_computed_value_and_computes_nothing(cache, monkeypatch):
    memo.disable()
    truth = epsilon(EVENTS, delta=1e-5)
    memo.enable(cache)
    assert epsilon(EVENTS, delta=1e-5) == truth      # computed and stored
    monkeypatch.setattr(A, "_prv_compose", _no_composition)
    assert epsilon(EVENTS, delta=1e-5) == truth      # read back, bit for bit
    with pytest.raises(AssertionError, match="composed"):
        epsilon(EVENTS, delta=2e-5)                  # another delta is another key


def test_other_inputs_and_other_code_miss(cache, monkeypatch):
    epsilon(EVENTS, delta=1e-5)
    monkeypatch.setattr(A, "_prv_compose", _no_composition)
    with pytest.raises(AssertionError):
        epsilon([EVENTS[0], EVENTS[1].with_count(876)], delta=1e-5)
    monkeypatch.setattr(memo, "_tag", "another version of the accounting code")
    with pytest.raises(AssertionError):
        epsilon(EVENTS, delta=1e-5)


def test_rdp_curves_round_trip(cache):
    memo.disable()
    truth = A._rdp_curve(EVENTS[1].with_count(0)).copy()
    A._memoised_rdp_curve.cache_clear()
    memo.enable(cache)
    for _ in range(2):
        A._memoised_rdp_curve.cache_clear()
        assert (A._rdp_curve(EVENTS[1].with_count(0)) == truth).all()


def test_steps_for_is_unchanged_by_the_memo(cache):
    kwargs = dict(target_epsilon=10.0, delta=1e-5, noise_multiplier=10.0, sample_rate=0.08192, prior=EVENTS)
    memo.disable()
    truth = steps_for(**kwargs)
    memo.enable(cache)
    assert steps_for(**kwargs) == truth == steps_for(**kwargs) == 21111


def test_unusable_cache_file_is_ignored(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    memo.enable(blocker / "cache.sqlite")
    try:
        assert epsilon(EVENTS, delta=1e-5) == pytest.approx(8.054, abs=1e-3)
    finally:
        memo.disable()


def test_command_line_uses_and_refills_the_cache(tmp_path, ledger_path):
    env = {"DPWA_ACCOUNTING_CACHE": str(tmp_path / "c.sqlite")}
    assert run_dpwa("ledger", "set-budget", "--dataset", "d", "--epsilon", "10", "--delta", "1e-5",
                    "--dataset-size", "50000", env=env).returncode == 0
    assert run_dpwa("ledger", "record", "--dataset", "d", "--run-id", "r", "--fingerprint", "n50000-0123456789abcdef", "--sigma", "10",
                    "--sample-rate", "0.08192", "--steps", "875", env=env).returncode == 0
    outs = [run_dpwa("ledger", "remaining", "--dataset", "d", "--sigma", "10", "--sample-rate", "0.08192",
                     "--json", env=env) for _ in range(2)]
    assert [o.returncode for o in outs] == [0, 0] and outs[0].stdout == outs[1].stdout
    assert (tmp_path / "c.sqlite").exists()
    off = run_dpwa("ledger", "remaining", "--dataset", "d", "--sigma", "10", "--sample-rate", "0.08192",
                   "--json", env={"DPWA_ACCOUNTING_CACHE": "off"})
    assert off.stdout == outs[0].stdout


@pytest.mark.parametrize("forged", ["0.0", "NaN", "-5.0", "\"x\""])
def test_a_forged_or_damaged_entry_is_never_a_budget_check(cache, ledger_path, forged):
    """Anyone who can write the cache file can compute its keys (public code and inputs): a
    budget check computes every value itself, and an entry that is not a number >= 0 is
    computed afresh where the memo is read."""
    import sqlite3

    from accounting import BudgetExceededError, Ledger, fingerprint

    ledger = Ledger(ledger_path)
    ledger.set_budget("d", epsilon=1.0, delta=1e-5, size=50000)
    truth = epsilon(EVENTS, delta=1e-5)  # 7.97: past the budget; now in the memo
    with sqlite3.connect(cache) as conn:
        conn.execute("UPDATE memo SET value = ?", (forged,))
    if forged != "0.0":  # implausible: computed again, not read
        assert epsilon(EVENTS, delta=1e-5) == truth
    with pytest.raises(BudgetExceededError, match=f"to epsilon={truth:.4f}"):
        ledger.reserve(run_id="r", dataset="d", fingerprint=fingerprint(range(50000)), events=EVENTS)
    assert ledger.runs() == []
    ledger.set_budget("d", epsilon=9.0, delta=1e-5)
    ledger.reserve(run_id="r", dataset="d", fingerprint=fingerprint(range(50000)), events=EVENTS)
    with sqlite3.connect(cache) as conn:
        conn.execute("UPDATE memo SET value = ?", (forged,))
    with pytest.raises(BudgetExceededError, match=f"already spent or reserved: {truth:.4f}"):  # its words too
        ledger.reserve(run_id="s", dataset="d", fingerprint=fingerprint(range(50000)), events=EVENTS)


@pytest.mark.parametrize("length", [0, len(A.RDP_ORDERS) - 1, len(A.RDP_ORDERS) + 1])
def test_a_cached_rdp_curve_of_another_length_is_computed_afresh(cache, length):
    import json
    import sqlite3

    event = EVENTS[0].with_count(0)
    truth = A._computed_rdp_curve(event).tolist()
    with sqlite3.connect(cache) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT OR REPLACE INTO memo VALUES (?, ?)",
                     (memo.key("rdp-curve", [event], A.RDP_ORDERS), json.dumps([1.0] * length)))
    assert A._memoised_rdp_curve(event).tolist() == truth


def test_a_poisoned_rdp_curve_read_before_the_budget_check_is_not_used_by_it(cache, ledger_path):
    """RDP curves are also kept in this process: one the memo gave (here all zeros, which size
    the PRV domain too) before the reservation (as `dpwa train` plans) is not the check's."""
    import json
    import sqlite3

    from accounting import BudgetExceededError, Ledger, fingerprint

    event = PoissonGaussian(noise_multiplier=0.8, sample_rate=0.05, steps=2000)
    memo.disable()
    truth = epsilon([event], delta=1e-5)  # 26.6
    memo.enable(cache)
    ledger = Ledger(ledger_path)
    ledger.set_budget("d", epsilon=8.0, delta=1e-5, size=50000)
    A._memoised_rdp_curve.cache_clear()
    A._computed_rdp_curve.cache_clear()
    with sqlite3.connect(cache) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT OR REPLACE INTO memo VALUES (?, ?)", (memo.key("rdp-curve", [event.with_count(0)],
                                                                            A.RDP_ORDERS),
                                                                   json.dumps([0.0] * len(A.RDP_ORDERS))))
    A._rdp_proxy_epsilon([event], 1e-5)  # a display computation reads the poisoned curve into this process
    with pytest.raises(BudgetExceededError, match=f"to epsilon={truth:.4f}"):
        ledger.reserve(run_id="r", dataset="d", fingerprint=fingerprint(range(50000)), events=[event])
