"""CPU threads for a run: `train.threads: auto` and an OpenMP wait policy that does not spin.

On a shared machine two things made torch's CPU training collapse (the quickstart 5-20x
slower than with one thread when other jobs kept cores busy, `experiments/results/bench_threads.md`):

* OpenMP's default wait policy: after each parallel region the idle worker threads spin
  for milliseconds, and on a contended machine they spin on the core that the thread they
  wait for needs. `OMP_WAIT_POLICY=PASSIVE` makes them sleep instead. The OpenMP runtime
  reads it once, when torch loads it (`import torch`): setting it later, or calling
  `torch.set_num_threads` later, changes nothing. Importing this module sets it (unless
  `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` is already set) and records whether it came in time.
* More threads than free cores: `auto` takes the CPUs this process may use (affinity, and a
  cgroup CPU quota when there is one), takes away the cores other processes keep busy
  (sampled from /proc/stat over 0.2 s, this process and its torchrun siblings excluded),
  and divides the rest among the local ranks of a torchrun job; at least 1.

Torch-free at import (the command line imports it before torch).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Union

__all__ = ["ThreadChoice", "resolve_threads", "set_threads", "parse_threads", "usable_cores", "busy_cores",
           "local_world_size", "wait_policy", "TOLERANCE", "SAMPLE_S"]

SAMPLE_S = 0.2      # seconds of /proc/stat sampling for `auto`
THREADS_ENV = "DPWA_THREADS"  # when set to N >= 1, `auto` is N without measuring
TOLERANCE = 0.3     # cores of background load (shells, daemons) that do not cost a thread

_log = logging.getLogger(__name__)


def _set_wait_policy() -> str:
    """Runs once, at import: PASSIVE unless the user chose a policy; says whether it took."""
    if "OMP_WAIT_POLICY" in os.environ:
        return f"{os.environ['OMP_WAIT_POLICY']} (OMP_WAIT_POLICY from the environment)"
    if "GOMP_SPINCOUNT" in os.environ:
        return f"OpenMP default with GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']} (from the environment)"
    if "torch" in sys.modules:  # its OpenMP runtime has read the environment already
        return ("OpenMP default (idle threads spin): torch was imported before dpwa; set OMP_WAIT_POLICY=PASSIVE "
                "in the environment")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE (set by dpwa before torch loaded OpenMP)"


_WAIT_POLICY = _set_wait_policy()


def wait_policy() -> str:
    """The OpenMP wait policy torch's threads run under, and where it came from."""
    return _WAIT_POLICY


@dataclass(frozen=True)
class ThreadChoice:
    """How many CPU threads a run uses, and why (logged, and kept in the run's records)."""

    threads: int                    # given to torch.set_num_threads
    requested: Union[int, str]      # train.threads: an int, or "auto"
    cores: Optional[int]            # CPUs this process may use (auto only)
    busy: Optional[float]           # cores other processes kept busy while sampled (auto only)
    local_world_size: int           # processes of this job on this machine (torchrun)
    wait_policy: str                # OpenMP wait policy, and where it came from
    reason: str                     # one line

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_threads(value: Any) -> Union[int, str]:
    """`train.threads` as "auto" or an int >= 1 (a string of digits is an int).

    Raises:
        ValueError: anything else, naming train.threads.
    """
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"train.threads must be auto or an integer >= 1, got {value!r}")


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.ceil(quota)) if quota is not None else n)


def _cgroup_quota() -> Optional[float]:
    """CPUs' worth of time the cgroup may use per period (cgroup v2 cpu.max or v1 cfs quota)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        candidates = []
        if controllers == "":
            candidates.append((f"/sys/fs/cgroup{path}/cpu.max", None))
        elif "cpu" in controllers.split(","):
            base = f"/sys/fs/cgroup/{controllers}{path}"
            candidates.append((f"{base}/cpu.cfs_quota_us", f"{base}/cpu.cfs_period_us"))
        for quota_file, period_file in candidates:
            try:
                with open(quota_file) as f:
                    fields = f.read().split()
                if period_file is None:
                    quota, period = fields[0], fields[1]
                else:
                    with open(period_file) as f:
                        quota, period = fields[0], f.read().split()[0]
                if quota not in ("max", "-1") and float(period) > 0:
                    return float(quota) / float(period)
            except (OSError, IndexError, ValueError):
                continue
    return None


def local_world_size(env: Optional[dict[str, str]] = None) -> int:
    """Processes of this job on this machine: torchrun's LOCAL_WORLD_SIZE when WORLD_SIZE > 1."""
    env = os.environ if env is None else env
    try:
        if int(env.get("WORLD_SIZE", "1")) > 1:
            return max(1, int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1"))))
    except ValueError:
        pass
    return 1


def _cpu_ticks(cpus: set[int]) -> Optional[tuple[int, int]]:
    """(busy, total) clock ticks of these CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    seen = False
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        v = [int(x) for x in fields[:8]] + [0] * (8 - len(fields[:8]))
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        total += sum(v)
        seen = True
    return (busy, total) if seen else None


def _family() -> list[int]:
    """This process, and under torchrun its agent and sibling ranks: their CPU is not load."""
    pids = [os.getpid()]
    if local_world_size() > 1:
        parent = os.getppid()
        pids.append(parent)
        try:
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    pids += [int(p) for p in f.read().split() if int(p) != os.getpid()]
        except OSError:
            pass
    return pids


def _family_ticks(pids: list[int]) -> int:
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: every thread of the process
        except (OSError, IndexError, ValueError):
            pass
    return ticks


def busy_cores(sample_s: float = SAMPLE_S, *, sleep: Callable[[float], None] = time.sleep) -> tuple[float, str]:
    """Cores of this process's CPUs that other processes keep busy, and how it was measured.

    /proc/stat is sampled over `sample_s` while this process sleeps, less what this process
    (and under torchrun its siblings) used meanwhile; a run's own start-up does not count, nor
    does a finished predecessor (a load average would count both). Where /proc/stat cannot
    be read, the 1-minute load average stands in.
    """
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = set(range(os.cpu_count() or 1))
    pids = _family()
    first, own0 = _cpu_ticks(cpus), _family_ticks(pids)
    if first is not None:
        sleep(sample_s)
        second, own1 = _cpu_ticks(cpus), _family_ticks(pids)
        if second is not None and second[1] > first[1]:
            d_busy, d_total = second[0] - first[0], second[1] - first[1]
            per_cpu = d_total / len(cpus)  # ticks the window lasted
            return max(0.0, (d_busy - (own1 - own0)) / per_cpu), f"/proc/stat over {sample_s:g} s"
    try:
        return max(0.0, os.getloadavg()[0]), "1-minute load average"
    except (AttributeError, OSError):
        return 0.0, "no load measure on this system"


def resolve_threads(requested: Any = "auto", *, cores: Optional[int] = None, busy: Optional[float] = None,
                    local_ranks: Optional[int] = None, sample_s: float = SAMPLE_S) -> ThreadChoice:
    """The thread count for `train.threads` (an int is used as given; "auto" is measured).

    auto: (cores - other) // local ranks, at least 1, where `other` is the busy cores of other
    processes rounded up after `TOLERANCE` (0.3 busy cores cost nothing; 0.31-1.3 cost one).
    `cores`, `busy` and `local_ranks` override the measurements (tests).
    """
    requested = parse_threads(requested)
    ranks = local_world_size() if local_ranks is None else local_ranks
    if requested != "auto":
        return ThreadChoice(threads=int(requested), requested=requested, cores=None, busy=None,
                            local_world_size=ranks, wait_policy=_WAIT_POLICY,
                            reason=f"train.threads={requested} (as set)")
    pinned = os.environ.get(THREADS_ENV, "")
    if pinned.isdigit() and int(pinned) >= 1:  # e.g. the test suite: reproducible across resumes
        return ThreadChoice(threads=int(pinned), requested="auto", cores=None, busy=None, local_world_size=ranks,
                            wait_policy=_WAIT_POLICY, reason=f"auto: ${THREADS_ENV}={pinned}")
    cores = usable_cores() if cores is None else cores
    how = "given"
    if busy is None:
        busy, how = busy_cores(sample_s)
    other = max(0, math.ceil(busy - TOLERANCE))
    free = max(0, cores - other)
    threads = max(1, free // ranks)
    reason = (f"auto: {cores} usable cores, {busy:.2f} busy elsewhere ({how}) -> {free} free"
              + (f", shared by {ranks} local ranks" if ranks > 1 else "") + f" -> {threads}")
    return ThreadChoice(threads=threads, requested="auto", cores=cores, busy=round(busy, 3), local_world_size=ranks,
                        wait_policy=_WAIT_POLICY, reason=reason)


def set_threads(requested: Any = "auto") -> ThreadChoice:
    """Resolve `train.threads` and give the count to torch; returns the choice and its reason."""
    import torch

    choice = resolve_threads(requested)
    torch.set_num_threads(choice.threads)
    _log.info("threads: %s; OpenMP wait policy %s", choice.reason, choice.wait_policy)
    return choice
