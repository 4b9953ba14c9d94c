"""`train.retain_freed_mb` (dpwa.alloc): glibc's mmap and trim thresholds fixed so that freed
blocks are reused instead of mapped afresh; the user's own allocator settings left alone;
bad values refused before anything runs."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from dpwa import alloc
from dpwa.alloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, retain_freed_memory
from dpwa.cli import main
from dpwa.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "configs" / "quickstart.yaml"


class FakeMallopt:
    def __init__(self, answers=None):
        self.calls, self.answers = [], dict(answers or {})

    def __call__(self, option, value):
        self.calls.append((option, value))
        return self.answers.get(option, 1)


@pytest.fixture(autouse=True)
def _no_user_setting(monkeypatch):
    for name in (*alloc._ENV, "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)


def test_sets_the_mmap_threshold_then_the_trim_threshold():
    fake = FakeMallopt()
    said = retain_freed_memory(1024, libc="glibc", mallopt=fake)
    assert fake.calls == [(M_MMAP_THRESHOLD, 1024 * 2 ** 20), (M_TRIM_THRESHOLD, 1024 * 2 ** 20)]
    assert "1024 MB" in said and "kept for reuse" in said


def test_zero_leaves_glibc_alone():
    fake = FakeMallopt()
    assert "glibc's own" in retain_freed_memory(0, libc="glibc", mallopt=fake) and fake.calls == []


@pytest.mark.parametrize("name, value", [("MALLOC_TRIM_THRESHOLD_", "1"), ("MALLOC_MMAP_THRESHOLD_", "65536"),
                                         ("MALLOC_TOP_PAD_", "0"), ("MALLOC_MMAP_MAX_", "0"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"),
                                         ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")])
def test_the_users_environment_wins(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    fake = FakeMallopt()
    said = retain_freed_memory(1024, libc="glibc", mallopt=fake)
    assert fake.calls == [] and f"{name}={value}" in said


def test_other_c_libraries_keep_their_defaults():
    fake = FakeMallopt()
    assert "musl" in retain_freed_memory(1024, libc="musl", mallopt=fake) and fake.calls == []
    assert "not glibc" in retain_freed_memory(1024, libc="", mallopt=fake) and fake.calls == []


def test_a_refused_mmap_threshold_sets_no_trim_threshold():
    """A trim threshold alone would pin the mmap threshold at 128 KB: every larger block mmapped."""
    fake = FakeMallopt({M_MMAP_THRESHOLD: 0})
    said = retain_freed_memory(512, libc="glibc", mallopt=fake)
    assert fake.calls == [(M_MMAP_THRESHOLD, 512 * 2 ** 20)] and "refused" in said


@pytest.mark.parametrize("value", [-1, 2048, True, 1.5, "1024"])
def test_bad_limits_are_refused_naming_the_value(value):
    with pytest.raises(ValueError, match=f"train.retain_freed_mb .* got {value!r}"):
        retain_freed_memory(value, libc="glibc", mallopt=FakeMallopt())
    with pytest.raises(ConfigError, match="train.retain_freed_mb"):
        TrainConfig(retain_freed_mb=value)


def test_config_default_and_override():
    assert TrainConfig().retain_freed_mb == 1024
    assert load_config(QUICK, ["train.retain_freed_mb=0"]).train.retain_freed_mb == 0


def test_the_command_line_refuses_before_any_charge(tmp_path, capsys):
    led = tmp_path / "l.sqlite"
    code = main(["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}",
                 "train.retain_freed_mb=4096"])
    err = capsys.readouterr().err
    assert code != 0 and "train.retain_freed_mb" in err and "4096" in err
    assert not (tmp_path / "runs").exists()
    if led.exists():
        from accounting import Ledger
        assert Ledger(str(led)).runs() == []


PROBE = """
import json, resource, sys, torch
from dpwa.alloc import retain_freed_memory
def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        a = torch.ones(4 * 2 ** 20); b = torch.ones(4 * 2 ** 20); del a, b  # 16 MB each
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
before = faults()
said = retain_freed_memory(int(sys.argv[1]))
print(json.dumps([before, faults(), said]))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_instead_of_mapped_afresh():
    """In a fresh process (the setting is process-wide): 16 MB tensors allocated and freed in
    turn fault in new pages each time under glibc's thresholds, and hardly at all after."""
    out = subprocess.run([sys.executable, "-c", PROBE, "1024"], capture_output=True, text=True, cwd=ROOT,
                         check=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    before, after, said = json.loads(out.stdout.strip().splitlines()[-1])
    assert "kept for reuse" in said
    assert before > 2 * 4096 and after < before / 10, (before, after)  # measured: 36842 and 0
