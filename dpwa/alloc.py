"""Freed memory kept for reuse: glibc malloc settings for a training process (`train.retain_freed_mb`).

Why: glibc serves a block above its mmap threshold (dynamic, at most 32 MB) with a fresh
mmap, and gives the heap's top back to the OS once twice that threshold lies free there. A
DP step allocates and frees many MB-sized temporaries in each layer's gradient hook
(`dpwa.engines.fast`: per-example gradients in cache-sized chunks, Gram matrices), so on
every step the kernel maps and zeroes fresh pages for them, where the non-private step
reuses its memory. With both thresholds fixed at `limit_mb`, blocks below it come from the
heap and freed ones stay there for the next step; the faults and their cost go
(`experiments/bench_dp_step.py` runs every engine, the non-private one included, under the
same setting; `--glibc-malloc` runs them under glibc's own).

The cost: up to `limit_mb` of freed memory stays resident between steps instead of going
back to the OS; a block of `limit_mb` or more is still mmapped. Like the OpenMP wait policy
(`dpwa.threads`), this is a property of the whole process, so a setting the user made in the
environment (MALLOC_*_ variables, glibc.malloc tunables, a preloaded allocator) is left
alone, and other C libraries than glibc keep their defaults.

Torch-free.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Callable, Optional

__all__ = ["retain_freed_memory", "limit_error", "MAX_MB"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MAX_MB = 2047  # mallopt takes a C int of bytes
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _environment_choice() -> Optional[str]:
    """The allocator setting the user made in the environment, if any."""
    for name in _ENV:
        if name in os.environ:
            return f"{name}={os.environ[name]}"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return f"LD_PRELOAD={os.environ['LD_PRELOAD']}"
    return None


def limit_error(limit_mb: object) -> Optional[str]:
    """Why `limit_mb` is no valid train.retain_freed_mb, or None (the config's check and this
    module's are this one)."""
    if isinstance(limit_mb, int) and not isinstance(limit_mb, bool) and 0 <= limit_mb <= MAX_MB:
        return None
    return (f"train.retain_freed_mb must be an integer from 0 to {MAX_MB} (MB; 0: glibc's own thresholds), "
            f"got {limit_mb!r}")


def retain_freed_memory(limit_mb: int, *, libc: Optional[str] = None,
                        mallopt: Optional[Callable[[int, int], int]] = None) -> str:
    """Fix glibc's mmap and trim thresholds at `limit_mb` MB (0: leave glibc's dynamic ones);
    returns what the process's allocator now does, for the run's report.

    libc, mallopt: the C library's name and its mallopt (for tests; default: this process's).
    A setting glibc refuses is reported, not raised: the run goes on with its defaults.
    Raises ValueError for a limit outside 0..MAX_MB."""
    error = limit_error(limit_mb)
    if error is not None:
        raise ValueError(error)
    if limit_mb == 0:
        return "glibc's own thresholds (train.retain_freed_mb=0)"
    chosen = _environment_choice()
    if chosen is not None:
        return f"left to the environment ({chosen})"
    libc = platform.libc_ver()[0] if libc is None else libc
    if libc != "glibc":
        return f"the C library's defaults ({libc or 'not glibc'}: no mallopt)"
    mallopt = ctypes.CDLL(None).mallopt if mallopt is None else mallopt
    value = limit_mb * 2 ** 20
    # The mmap threshold first: a fixed trim threshold alone also fixes the mmap threshold at
    # its 128 KB start, and every larger block would then be mmapped (steps 1.7-1.9x slower in bench_dp_step.py).
    if mallopt(M_MMAP_THRESHOLD, value) != 1:
        return f"glibc's own thresholds (glibc refused mallopt(M_MMAP_THRESHOLD, {value}))"
    if mallopt(M_TRIM_THRESHOLD, value) != 1:
        return f"glibc: blocks under {limit_mb} MB from the heap; glibc refused mallopt(M_TRIM_THRESHOLD, {value})"
    return f"glibc: blocks under {limit_mb} MB from the heap, up to {limit_mb} MB of freed memory kept for reuse"
