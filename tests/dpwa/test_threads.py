"""`train.threads: auto` (dpwa.threads): cores from affinity and quota, less the load of other
processes, shared among local ranks; explicit counts pass through; the OpenMP wait policy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpwa import threads
from dpwa.config import ConfigError, TrainConfig, load_config
from dpwa.threads import busy_cores, local_world_size, parse_threads, resolve_threads, set_threads, usable_cores


@pytest.fixture(autouse=True)
def _measured(monkeypatch):
    """The suite pins auto with $DPWA_THREADS (tests/conftest.py); here auto is measured."""
    monkeypatch.delenv("DPWA_THREADS", raising=False)


def test_dpwa_threads_pins_auto(monkeypatch):
    monkeypatch.setenv("DPWA_THREADS", "3")
    choice = resolve_threads("auto", cores=8, busy=0.0)
    assert choice.threads == 3 and "DPWA_THREADS=3" in choice.reason
    assert resolve_threads(2).threads == 2  # an explicit count is used as given

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cores, busy, ranks, expected", [
    (2, 0.0, 1, 2),     # quiet
    (2, 0.3, 1, 2),     # background noise costs no thread
    (2, 0.35, 1, 1),    # more costs a whole core
    (2, 1.0, 1, 1),     # `yes > /dev/null` on one core
    (2, 2.6, 1, 1),     # overloaded: still at least 1
    (16, 1.0, 1, 15),
    (16, 0.0, 4, 4),    # torchrun: the cores are divided among local ranks
    (16, 1.0, 4, 3),
    (2, 0.0, 2, 1),
    (2, 1.0, 2, 1),
])
def test_auto_from_cores_load_and_ranks(cores, busy, ranks, expected):
    choice = resolve_threads("auto", cores=cores, busy=busy, local_ranks=ranks)
    assert choice.threads == expected
    assert (choice.requested, choice.cores, choice.local_world_size) == ("auto", cores, ranks)
    assert f"{cores} usable cores" in choice.reason and choice.reason.endswith(f"-> {expected}")
    assert choice.as_dict()["threads"] == expected


def test_explicit_count_passes_through_without_measuring(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda *a, **k: pytest.fail("an explicit count is not measured"))
    choice = resolve_threads(3, local_ranks=4)
    assert (choice.threads, choice.requested, choice.busy) == (3, 3, None)
    assert "train.threads=3" in choice.reason


def test_usable_cores_from_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert usable_cores() == 3
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)  # a 1.5-CPU container
    assert usable_cores() == 2
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 0.2)
    assert usable_cores() == 1


def test_busy_cores_from_proc_stat_less_own_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    samples = iter([(1000, 10000), (1030, 10040)])  # 2 CPUs, 20 ticks each: 30 busy ticks
    own = iter([500, 510])                            # 10 of them ours
    monkeypatch.setattr(threads, "_cpu_ticks", lambda cpus: next(samples))
    monkeypatch.setattr(threads, "_family_ticks", lambda pids: next(own))
    slept = []
    busy, how = busy_cores(0.2, sleep=slept.append)
    assert busy == pytest.approx(1.0) and slept == [0.2] and "/proc/stat" in how


def test_busy_cores_falls_back_to_load_average(monkeypatch):
    monkeypatch.setattr(threads, "_cpu_ticks", lambda cpus: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.25, 0.5, 0.1))
    assert busy_cores(0.2, sleep=lambda s: None) == (1.25, "1-minute load average")


def test_busy_cores_reads_this_machine():
    busy, how = busy_cores(0.05)
    assert 0.0 <= busy <= len(os.sched_getaffinity(0)) + 0.5 and how.startswith(("/proc/stat", "1-minute"))


def test_auto_measures_when_not_given(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda sample_s: (1.0, "test"))
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    choice = resolve_threads("auto")
    assert (choice.threads, choice.busy, choice.local_world_size) == (1, 1.0, 3)  # (4 - 1) // 3
    assert "shared by 3 local ranks" in choice.reason


@pytest.mark.parametrize("env, expected", [
    ({}, 1),
    ({"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "8"}, 1),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, 2),
    ({"WORLD_SIZE": "4"}, 4),
    ({"WORLD_SIZE": "x"}, 1),
])
def test_local_world_size(env, expected):
    assert local_world_size(env) == expected


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (1, 1), (8, 8), ("4", 4)])
def test_parse_threads(value, expected):
    assert parse_threads(value) == expected


@pytest.mark.parametrize("value", [0, -1, "many", True, 2.5, None, ""])
def test_parse_threads_refuses(value):
    with pytest.raises(ValueError, match="train.threads must be auto or an integer >= 1"):
        parse_threads(value)


def test_config_default_auto_and_ints():
    assert TrainConfig().threads == "auto"
    assert TrainConfig(threads=3).threads == 3
    assert TrainConfig(threads="4").threads == 4  # quoted in YAML
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["train.threads=1"])
    assert cfg.train.threads == 1
    assert load_config(ROOT / "configs" / "quickstart.yaml", ["train.threads=auto"]).train.threads == "auto"


@pytest.mark.parametrize("value", ["0", "many", "-2"])
def test_config_refuses_naming_the_key(value):
    with pytest.raises(ConfigError, match="train.threads"):
        load_config(ROOT / "configs" / "quickstart.yaml", [f"train.threads={value}"])


def test_set_threads_gives_torch_the_count():
    import torch

    before = torch.get_num_threads()
    try:
        assert set_threads(1).threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _policy_in_fresh_process(code: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code + "\nimport os; from dpwa.threads import wait_policy\n"
                          "print(os.environ.get('OMP_WAIT_POLICY')); print(wait_policy())"],
                         env={**clean, **env}, cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_wait_policy_set_before_torch_loads():
    assert _policy_in_fresh_process("") == ["PASSIVE", "PASSIVE (set by dpwa before torch loaded OpenMP)"]


def test_wait_policy_of_the_user_is_kept():
    lines = _policy_in_fresh_process("", OMP_WAIT_POLICY="ACTIVE")
    assert lines[0] == "ACTIVE" and "from the environment" in lines[1]


def test_wait_policy_too_late_after_torch_is_said():
    # torch's OpenMP runtime reads the environment when torch is imported; a stand-in module
    # keeps the test fast
    lines = _policy_in_fresh_process("import sys, types; sys.modules['torch'] = types.ModuleType('torch')")
    assert lines[0] == "None" and "torch was imported before dpwa" in lines[1]
