"""A persistent memo of accountant results, so that a repeated budget query is instant.

A PRV composition of ~20,000 steps takes 0.05-0.2 s (a discretisation on a grid of
millions of points); `dpwa ledger remaining --sigma ...` asks for several of them, and asks
for the same ones every time the ledger has not changed. The results are pure functions of their inputs (the
merged events, delta, the error parameter) and of the accounting code, so they can be kept
on disk: a SQLite file of (key -> JSON value), the key a hash of the inputs and of the
source of the accounting modules and of prv-accountant's, and numpy's version. Any change
of the code changes every key; a stale entry can never be read.

The memo is off unless enabled (`enable(path)` or `enable_from_environment()`), so the
library and its tests compute every value; the command line enables it at
`$DPWA_ACCOUNTING_CACHE` (``off`` disables it), else ``~/.cache/dpwa/accounting.sqlite``.
It is a cache, never a record: deleting the file loses nothing, and a file that cannot be
opened, read or written is ignored (the value is computed). It is never trusted where a
budget is enforced: `Ledger.reserve` and `set_budget` compute under `bypassed()` (anyone who
can write the cache file could put an epsilon of 0 there), and a cached value that is not a
number >= 0 (NaN, negative; +inf is allowed) is computed afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .events import Event

CACHE_ENV = "DPWA_ACCOUNTING_CACHE"

_lock = threading.Lock()
_local = threading.local()  # .bypassed: this thread computes every value (a budget check)
_conn: Optional[sqlite3.Connection] = None
_path: Optional[Path] = None
_tag: Optional[str] = None


def default_path() -> Optional[Path]:
    """`$DPWA_ACCOUNTING_CACHE` (None when ``off``), else ``~/.cache/dpwa/accounting.sqlite``."""
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip().lower() in ("off", "0", "none", ""):
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpwa" / "accounting.sqlite"


def enable(path: Optional[Path]) -> None:
    """Keep results in the SQLite file `path` (created on first use); None disables the memo."""
    global _conn, _path
    with _lock:
        if _conn is not None:
            _conn.close()
        _conn, _path = None, (Path(path) if path is not None else None)


def enable_from_environment() -> None:
    enable(default_path())


def disable() -> None:
    enable(None)


@contextlib.contextmanager
def bypassed() -> Iterator[None]:
    """In this block (this thread), every value is computed, none read from or written to the
    memo: for the checks that enforce a budget."""
    was = is_bypassed()
    _local.bypassed = True
    try:
        yield
    finally:
        _local.bypassed = was


def is_bypassed() -> bool:
    """Whether this thread is in a `bypassed()` block (in-process caches of memoised values
    keep a separate store for it)."""
    return getattr(_local, "bypassed", False)


def _plausible(value: Any, length: Optional[int]) -> bool:
    """An epsilon (`length` None) or an RDP curve of `length` orders: numbers >= 0 (+inf
    allowed), never NaN or negative."""
    if (length is None) == isinstance(value, list) or (length is not None and len(value) != length):
        return False
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values)


def _code_tag() -> str:
    """A hash of the code that computes the memoised values: the accounting modules' source,
    the prv-accountant modules they run (found, not imported: importing prv-accountant loads
    scipy) and numpy's version (its FFTs and elementary functions). No value depends on scipy
    (`numerics` replaces it). Reading files, not package metadata: 1 ms, not 30."""
    global _tag
    if _tag is None:
        import importlib.util

        import numpy

        here = Path(__file__).parent
        theirs = importlib.util.find_spec("prv_accountant")
        folders = list(theirs.submodule_search_locations or []) if theirs is not None else []
        h = hashlib.sha256()
        for name in ("accountants.py", "events.py", "_prv_lib.py", "memo.py", "numerics.py"):
            h.update((here / name).read_bytes())
        for folder in folders:
            for path in sorted(Path(folder).rglob("*.py")):
                h.update(path.name.encode() + path.read_bytes())
        h.update(f"numpy={numpy.__version__}".encode())
        _tag = h.hexdigest()
    return _tag


def _connection() -> Optional[sqlite3.Connection]:
    global _conn, _path
    if _path is None:
        return None
    if _conn is None:
        try:
            _path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(_path, timeout=0.2, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # a cache: a commit need not reach the disk before the query goes on (WAL keeps the
            # file consistent; a power cut loses at most the latest entries). Syncing each of a
            # query's writes cost ~0.1 s.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            _conn = conn
        except (OSError, sqlite3.Error):
            _path = None  # unusable: stop trying for this process
            return None
    return _conn


def key(kind: str, events: Sequence[Event], *params: Any) -> str:
    payload = json.dumps([kind, [e.to_dict() for e in events], [repr(p) for p in params]], sort_keys=True)
    return hashlib.sha256((_code_tag() + payload).encode()).hexdigest()


def memoised(kind: str, events: Sequence[Event], params: tuple, compute: Callable[[], Any],
             length: Optional[int] = None) -> Any:
    """`compute()`, or the value it returned before for the same (kind, events, params) and code.
    Values must survive JSON (floats round-trip exactly, lists of floats too): a number, or a
    list of `length` numbers (a cached value of another shape is computed afresh)."""
    if is_bypassed():
        return compute()
    with _lock:  # never held while computing: computations nest (an epsilon needs RDP curves)
        conn = _connection()
        row, k = None, None
        if conn is not None:
            k = key(kind, events, *params)
            try:
                row = conn.execute("SELECT value FROM memo WHERE key = ?", (k,)).fetchone()
            except sqlite3.Error:
                pass
    if conn is None:
        return compute()
    if row is not None:
        try:
            cached = json.loads(row[0])
        except ValueError:
            cached = None
        if _plausible(cached, length):
            return cached
    value = compute()
    with _lock:
        try:
            conn.execute("INSERT OR REPLACE INTO memo (key, value) VALUES (?, ?)", (k, json.dumps(value)))
        except sqlite3.Error:
            pass
    return value
