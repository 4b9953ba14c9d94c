"""A persistent privacy ledger: every private run on a dataset, across processes and sessions.

The ledger is an SQLite file (WAL mode, full sync). It stores mechanism events, never
epsilons, and recomputes a dataset's epsilon by composing the events of all its runs
(design rule 6). It is conservative: a run reserves its whole planned spend before it
touches data, and the reservation counts in full until the run commits what it actually
spent, so a crash can over-count but never under-count.

Run life cycle::

    reserve(planned)  ->  status "reserved": counts `planned`
    progress(spent)   ->  still "reserved": counts `planned`; `spent` recorded so far
    commit(spent)     ->  status "committed": counts `spent`
    release(reason)   ->  status "released": counts the `spent` recorded so far (often none)

A dataset is keyed by a fingerprint of its contents (`fingerprint(labels)` of the whole
source data, before any class subset or split), not by the name a run types. The ledger stores
and shows it keyed (`Ledger.keyed`): an HMAC-SHA256 under a secret key of this file, so that an
export or a `dpwa ledger show` reveals nothing of the labels (a plain hash of them would: who
knew every label but one could find the last in as many guesses as there are classes):

* a run on data whose fingerprint is already registered under another name is charged to
  that dataset (the new name is kept as an alias, and queries by either name see one
  spend), so a subset composes with its parent by construction and can never start a
  fresh budget of its own;
* a name bound to another fingerprint is refused, so two different datasets under one
  name are never mixed up.

Budgets are checked inside an immediate (write-locking) transaction, so concurrent
reservations are serialised and can never pass the budget.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sqlite3
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from . import accountants as _accountants
from . import memo as _memo
from .accountants import DEFAULT_ACCOUNTANT, check_delta, check_accountant, epsilon
from .errors import (BudgetExceededError, DatasetMismatchError, DeltaAboveOneOverNError, InvalidParameterError,
                     LedgerCorruptError, LedgerError, LedgerLockedError, RunStateError, SessionLostError,
                     StaleCheckpointError, UnknownRunError)
from .events import Event, events_from_json_list, merge

__all__ = ["Ledger", "DatasetRecord", "RunRecord", "fingerprint", "fingerprint_size", "default_ledger_path",
           "check_delta_below_1_over_n", "LEDGER_ENV", "TIMEOUT_ENV"]

LEDGER_ENV = "DPWA_LEDGER"
TIMEOUT_ENV = "DPWA_LEDGER_TIMEOUT"
# 2 adds `aliases`. Version 1 files are read as they are and upgraded by their first write;
# a dpwa that reads only version 1 refuses a version 2 file instead of ignoring its aliases
# (which would charge an alias to a fresh, empty dataset). `run_deltas` (the delta each run
# reports at, for display) is an added table that older version-2 readers ignore without
# harm, so it keeps version 2; a file without it gains it on its first write. So does
# `run_checkpoints` (what each reserved run's newest checkpoint holds: a resume from an older
# copy of the run is refused); a reader that ignores it only misses that refusal.
# 3 stores fingerprints keyed (`meta.fingerprint_key`); the first write to an older file makes
# the key and keys every stored fingerprint. A dpwa that reads only up to version 2 refuses a
# version 3 file instead of comparing its labels' plain fingerprints with the keyed ones (which
# would charge the same data, under a new name, to a fresh dataset).
SCHEMA_VERSION = 3
_READABLE_VERSIONS = ("1", "2", "3")
_KEY = "fingerprint_key"
_KEYED = re.compile(r"(n\d+-)?k[0-9a-f]{16}")  # the form `Ledger.keyed` gives (plain ones are hex)
_SIZE = re.compile(r"n(\d+)-")  # the size prefix of either form
_APPLICATION_ID = 0x64707761  # "dpwa": marks the SQLite file as ours

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,
    fingerprint TEXT,                -- NULL until the first run binds it
    size INTEGER,                    -- number of examples, when known
    budget_epsilon REAL,             -- NULL: no budget
    budget_delta REAL,
    accountant TEXT NOT NULL,        -- the accountant budgets are enforced with
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    dataset TEXT NOT NULL REFERENCES datasets(name),
    config_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'released')),
    planned TEXT NOT NULL,           -- JSON list of events reserved before the first step
    spent TEXT NOT NULL,             -- JSON list of events actually taken (so far)
    reason TEXT,                     -- why a reservation was released
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_dataset ON runs(dataset);
CREATE TABLE IF NOT EXISTS run_deltas (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    delta REAL NOT NULL              -- the delta the run reports its epsilon at, when it said
);
CREATE TABLE IF NOT EXISTS run_checkpoints (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    counts TEXT NOT NULL             -- JSON events: the releases the run's newest checkpoint on disk holds
);
CREATE TABLE IF NOT EXISTS run_sessions (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    session TEXT NOT NULL            -- the one session that may checkpoint and commit the run (`claim`)
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT PRIMARY KEY,           -- another name a run gave for a registered dataset's data
    dataset TEXT NOT NULL REFERENCES datasets(name),
    created_at TEXT NOT NULL
);
"""

_ALIASES = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS aliases"):].strip().rstrip(";")
_RUN_DELTAS = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS run_deltas"):
                      _SCHEMA.index("CREATE TABLE IF NOT EXISTS run_checkpoints")].strip().rstrip(";")
_RUN_CHECKPOINTS = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS run_checkpoints"):
                           _SCHEMA.index("CREATE TABLE IF NOT EXISTS run_sessions")].strip().rstrip(";")
_RUN_SESSIONS = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS run_sessions"):
                        _SCHEMA.index("CREATE TABLE IF NOT EXISTS aliases")].strip().rstrip(";")


def default_ledger_path() -> Path:
    """`$DPWA_LEDGER` if set, else `~/.dpwa/ledger.sqlite`."""
    env = os.environ.get(LEDGER_ENV)
    return Path(env).expanduser() if env else Path.home() / ".dpwa" / "ledger.sqlite"


def fingerprint(labels: Iterable[int]) -> str:
    """Identify a dataset by its size and a hash of its labels, in order.

    Cheap (labels only), stable across processes and machines, and different for a
    different subset, order or relabelling of the data.

    >>> fingerprint([0, 1, 1, 2])
    'n4-1d1df338d5e69e88'
    """
    values = [int(v) for v in labels]
    digest = hashlib.sha256(",".join(map(str, values)).encode()).hexdigest()[:16]
    return f"n{len(values)}-{digest}"


def fingerprint_size(fp: str) -> Optional[int]:
    """N as a fingerprint of either form says it (its `n{N}-` prefix), or None."""
    size = _SIZE.match(fp)
    return int(size.group(1)) if size else None


def _size_prefix(fp: str) -> str:
    size = _SIZE.match(fp)
    return size.group(0) if size else ""


def _new_key() -> str:
    return secrets.token_hex(32)


def _keyed(key: Optional[str], fp: str) -> str:
    """`fp` as a ledger with `key` stores it: its size prefix, then `k` and 16 hex digits of
    HMAC-SHA256(key, fp). A fingerprint already in that form, or any on a file without a key
    (version 2 or older, not yet written to by this dpwa), is returned as it is."""
    if key is None or _KEYED.fullmatch(fp):
        return fp
    digest = hmac.new(bytes.fromhex(key), fp.encode(), hashlib.sha256).hexdigest()[:16]
    return f"{_size_prefix(fp)}k{digest}"


def check_delta_below_1_over_n(delta: float, size: int, *, accept: bool = False, what: str = "delta",
                               accept_hint: str = "accept_delta_above_1_over_n=True") -> None:
    """Refuse delta >= 1/N for a dataset of N = `size` examples, unless `accept`.

    Publishing each example in the clear with probability delta satisfies (0, delta)-DP, and
    with delta >= 1/N that releases about delta * N >= 1 whole examples: a risk the user must
    take by name, not a default that only warns. Accepted, it still warns (naming
    `accept_hint`, how it was accepted).

    Raises:
        InvalidParameterError: delta outside (0, 1) or size not a positive integer.
        DeltaAboveOneOverNError: naming `what`, the value, 1/N and `accept_hint`.

    >>> check_delta_below_1_over_n(1e-5, 50_000)
    >>> check_delta_below_1_over_n(1e-3, 1000)
    Traceback (most recent call last):
    ...
    accounting.errors.DeltaAboveOneOverNError: delta=0.001 is not below 1/N = 0.001 (N=1000 examples): ...
    """
    check_delta(delta)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InvalidParameterError(f"Expected a positive dataset size, got size={size!r}")
    if delta < 1 / size:
        return
    if not accept:
        raise DeltaAboveOneOverNError(delta, size, what=what, accept=accept_hint)
    warnings.warn(f"{what}={delta:g} is not below 1/N = {1 / size:g} (N={size} examples): accepted by "
                  f"{accept_hint}; such a delta allows releasing whole examples", stacklevel=2)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _dump(events: Sequence[Event]) -> str:
    return json.dumps([e.to_dict() for e in events], sort_keys=True)


@dataclass(frozen=True)
class RunRecord:
    """One run as stored; `counted` is what it contributes to its dataset's spend."""

    run_id: str
    dataset: str
    config_hash: str
    status: str
    planned: tuple[Event, ...]
    spent: tuple[Event, ...]
    reason: Optional[str]
    created_at: str
    updated_at: str
    delta: Optional[float] = None  # the delta the run reports its epsilon at, if it said

    @property
    def counted(self) -> tuple[Event, ...]:
        return self.planned if self.status == "reserved" else self.spent

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "dataset": self.dataset, "config_hash": self.config_hash,
                "status": self.status, "planned": [e.to_dict() for e in self.planned],
                "spent": [e.to_dict() for e in self.spent], "reason": self.reason,
                "created_at": self.created_at, "updated_at": self.updated_at, "delta": self.delta}


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset as stored; `aliases` are the other names runs gave for the same data."""

    name: str
    fingerprint: Optional[str]
    size: Optional[int]
    budget_epsilon: Optional[float]
    budget_delta: Optional[float]
    accountant: str
    created_at: str
    updated_at: str
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "aliases": list(self.aliases)}


class Ledger:
    """The privacy ledger stored at `path` (see the module docstring for the model).

    Args:
        path: the SQLite file; default `default_ledger_path()`.
        timeout: seconds to wait for another process's write lock; default
            `$DPWA_LEDGER_TIMEOUT` or 30.
        create: create the file if missing. Read-only callers pass False and get an
            empty view instead of a new file.

    Raises:
        LedgerCorruptError: the file is not a dpwa ledger or is damaged (it is not touched).
        LedgerLockedError: another process holds the lock for longer than `timeout`.
    """

    def __init__(self, path: Optional[os.PathLike | str] = None, *, timeout: Optional[float] = None,
                 create: bool = True) -> None:
        self.path = Path(path).expanduser() if path is not None else default_ledger_path()
        if timeout is None:
            raw = os.environ.get(TIMEOUT_ENV, "30")
            try:
                timeout = float(raw)
            except ValueError:
                raise InvalidParameterError(f"Expected a number of seconds in ${TIMEOUT_ENV}, got {raw!r}") from None
        if not timeout >= 0:
            raise InvalidParameterError(f"Expected a lock timeout >= 0 seconds, got {timeout=}")
        self.timeout = timeout
        self._conn: Optional[sqlite3.Connection] = None
        self._joined = False  # inside `held`: the calls join its transaction
        if self.path.exists():
            if self.path.is_dir():
                raise LedgerError(f"Ledger path {self.path} is a directory, expected an SQLite file")
            self._open()
        elif create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LedgerError(f"Cannot create the ledger folder {self.path.parent}: {e}") from None
            self._open()

    # ------------------------------------------------------------------ connection

    def _open(self) -> None:
        try:  # a new file is the owner's alone (0600): it holds the fingerprint key
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
        except OSError as e:
            raise LedgerError(f"Cannot create the ledger {self.path}: {e}") from None
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise LedgerError(f"Cannot open the ledger {self.path}: {e}") from None
        self._conn = conn
        try:
            with self._locked_errors():
                conn.execute("PRAGMA foreign_keys = ON")
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if app_id not in (0, _APPLICATION_ID) or (tables and "runs" not in tables):
                    raise LedgerCorruptError(f"{self.path} is an SQLite file but not a dpwa ledger; "
                                             "point --ledger or $DPWA_LEDGER elsewhere")
                self._use_wal(conn)
                conn.execute("PRAGMA synchronous = FULL")
                if not tables:
                    with self._transaction():
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                        conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                     (str(SCHEMA_VERSION),))
                        conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)",  # another creator may be first
                                     (_KEY, _new_key()))
                    self._not_world_readable()  # an empty file made by someone else (touch, mktemp) has its mode
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None or row[0] not in _READABLE_VERSIONS:
                    raise LedgerCorruptError(f"Ledger {self.path} has schema version {row and row[0]!r}, "
                                             f"this dpwa reads versions {', '.join(_READABLE_VERSIONS)}")
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Switch a new file to WAL. Processes opening one new file at once race for it, and
        SQLite answers the losers "locked" at once, without waiting its busy timeout: so they
        retry, for as long as that timeout, until the file is WAL (whoever switched it)."""
        deadline = time.monotonic() + self.timeout
        while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @property
    def exists(self) -> bool:
        """Whether the ledger file exists (and is open). `Ledger(path, create=False)` on a
        missing file is an empty read-only view; a caller about to write to an existing
        ledger only (e.g. releasing a run) checks this instead of creating a new file."""
        return self._conn is not None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def _locked_errors(self) -> Iterator[None]:
        """Translate SQLite errors into messages that name the file and what to do."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise LedgerLockedError(
                    f"Ledger {self.path} is locked by another process (waited {self.timeout:g}s); "
                    f"retry, or raise the wait with ${TIMEOUT_ENV}") from None
            if "readonly" in str(e) or "unable to open" in str(e) or "disk" in str(e):
                raise LedgerError(f"Cannot write the ledger {self.path}: {e}") from None
            raise LedgerCorruptError(f"Ledger {self.path} is damaged ({e}); it was not modified") from None
        except sqlite3.DatabaseError as e:
            raise LedgerCorruptError(f"Ledger {self.path} is not a readable SQLite file ({e}); "
                                     "it was not modified") from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (BEGIN IMMEDIATE), so that a
        budget check and the insert it guards cannot interleave with another process. Inside
        `held`, the calls join its transaction."""
        conn = self._require_conn()
        if self._joined:  # within `held`: one transaction, committed when it ends
            yield conn
            return
        with self._locked_errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._upgrade(conn)
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:  # (a COMMIT that fails may leave the transaction open)
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """Bring an older file to version 3 inside the caller's write transaction: add
        `aliases` (version 1) and `run_deltas` where missing, then make the fingerprint key and
        key every stored fingerprint (what a plain fingerprint matched, its keyed form matches)."""
        if not self._has_table(conn, "meta"):
            return  # a new file being created at the current version
        if not Ledger._has_aliases(conn):
            conn.execute(_ALIASES)
        if not Ledger._has_table(conn, "run_deltas"):
            conn.execute(_RUN_DELTAS)
        if not Ledger._has_table(conn, "run_checkpoints"):
            conn.execute(_RUN_CHECKPOINTS)
        if not Ledger._has_table(conn, "run_sessions"):
            conn.execute(_RUN_SESSIONS)
        if Ledger._key(conn) is None:
            key = _new_key()
            conn.execute("INSERT INTO meta VALUES (?, ?)", (_KEY, key))
            for name, fp in conn.execute("SELECT name, fingerprint FROM datasets WHERE fingerprint IS NOT NULL"
                                         ).fetchall():
                conn.execute("UPDATE datasets SET fingerprint=? WHERE name=?", (_keyed(key, fp), name))
            Ledger._merge_same_data(conn)
            conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            self._not_world_readable()

    def _not_world_readable(self) -> None:
        """The file now holds the key: not readable by others (its WAL and shared-memory files
        too); a group that shares it keeps its access. A file this user does not own keeps its
        mode, with a warning that says so."""
        for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            try:
                mode = path.stat().st_mode if path.exists() else 0
                if mode & 0o007:  # a group that shares the ledger keeps it; the rest of the machine does not
                    os.chmod(path, stat.S_IMODE(mode) & ~0o007)
            except OSError as e:
                warnings.warn(f"Ledger {path} now holds the key of its fingerprints but stays readable by others "
                              f"({e}); make it unreadable to them (chmod o-rwx)", stacklevel=4)

    @staticmethod
    def _merge_same_data(conn: sqlite3.Connection) -> None:
        """Version 1 made a new dataset for each new name of the same data, and each counted
        only its own runs. Each later one becomes an alias of the oldest, its runs (and aliases)
        move there, and the budget is (the smallest epsilon, the smallest delta) of theirs: for
        delta_1 <= delta_2, epsilon(delta_1) <= min(eps_1, eps_2) implies both budgets, since
        epsilon(delta) does not grow with delta. No budget that held before is lost."""
        rows = conn.execute("SELECT name, fingerprint, budget_epsilon, budget_delta, accountant FROM datasets "
                            "WHERE fingerprint IS NOT NULL ORDER BY created_at, name").fetchall()
        owners: dict[str, tuple] = {}
        for name, fp, budget, delta, accountant in rows:
            owner = owners.setdefault(fp, (name, budget, delta, accountant))
            if owner[0] == name:
                continue
            if budget is not None:
                tight = (budget, delta) if owner[1] is None else (min(budget, owner[1]), min(delta, owner[2]))
                owners[fp] = owner = (owner[0], *tight, owner[3] if owner[1] is not None else accountant)
                conn.execute("UPDATE datasets SET budget_epsilon=?, budget_delta=?, accountant=? WHERE name=?",
                             (*tight, owner[3], owner[0]))
            conn.execute("UPDATE runs SET dataset=? WHERE dataset=?", (owner[0], name))
            conn.execute("UPDATE aliases SET dataset=? WHERE dataset=?", (owner[0], name))
            conn.execute("DELETE FROM datasets WHERE name=?", (name,))
            conn.execute("INSERT INTO aliases VALUES (?, ?, ?)", (name, owner[0], _now()))

    @staticmethod
    def _key(conn: sqlite3.Connection) -> Optional[str]:
        row = conn.execute("SELECT value FROM meta WHERE key=?", (_KEY,)).fetchone()
        return row[0] if row else None

    def keyed(self, fingerprint: str) -> str:
        """How this ledger stores, shows and compares data with this fingerprint
        (`fingerprint(labels)`): keyed under the file's secret key, so that the stored form
        tells nothing of the labels without the file. The keyed form itself is returned as it is
        (e.g. as `dpwa ledger show` printed it); on a file not yet keyed, or none, the plain one."""
        if self._conn is None:
            return fingerprint
        with self._locked_errors():
            return _keyed(self._key(self._conn), fingerprint)

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        assert self._conn is not None
        return self._conn

    # ------------------------------------------------------------------ reading

    @staticmethod
    def _has_table(conn: sqlite3.Connection, name: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    @staticmethod
    def _has_aliases(conn: sqlite3.Connection) -> bool:
        return Ledger._has_table(conn, "aliases")

    def _dataset_row(self, conn: sqlite3.Connection, name: str) -> Optional[DatasetRecord]:
        """The dataset called `name`, or the one `name` is an alias of; None if neither."""
        has_aliases = self._has_aliases(conn)
        if has_aliases:
            alias = conn.execute("SELECT dataset FROM aliases WHERE name=?", (name,)).fetchone()
            name = alias[0] if alias else name
        row = conn.execute("SELECT name, fingerprint, size, budget_epsilon, budget_delta, accountant, "
                           "created_at, updated_at FROM datasets WHERE name=?", (name,)).fetchone()
        if row is None:
            return None
        aliases = tuple(r[0] for r in conn.execute("SELECT name FROM aliases WHERE dataset=? ORDER BY name",
                                                   (name,))) if has_aliases else ()
        return DatasetRecord(*row, aliases=aliases)

    def _owner(self, conn: sqlite3.Connection, fingerprint: str) -> Optional[DatasetRecord]:
        """The dataset already bound to data with this fingerprint (the oldest, should a
        ledger written before fingerprints were keys hold two)."""
        row = conn.execute("SELECT name FROM datasets WHERE fingerprint=? ORDER BY created_at, name LIMIT 1",
                           (fingerprint,)).fetchone()
        return self._dataset_row(conn, row[0]) if row else None

    def _canonical(self, conn: sqlite3.Connection, name: str) -> str:
        record = self._dataset_row(conn, name)
        return record.name if record is not None else name

    def _runs(self, conn: sqlite3.Connection, dataset: Optional[str] = None,
              run_id: Optional[str] = None) -> list[RunRecord]:
        if self._has_table(conn, "run_deltas"):
            query = ("SELECT r.run_id, r.dataset, r.config_hash, r.status, r.planned, r.spent, r.reason, "
                     "r.created_at, r.updated_at, d.delta FROM runs r LEFT JOIN run_deltas d ON d.run_id = r.run_id")
        else:  # a version 2 file written before run_deltas, read without writing
            query = ("SELECT r.run_id, r.dataset, r.config_hash, r.status, r.planned, r.spent, r.reason, "
                     "r.created_at, r.updated_at, NULL FROM runs r")
        if run_id is not None:
            rows = conn.execute(query + " WHERE r.run_id=?", (run_id,)).fetchall()
        elif dataset is not None:
            rows = conn.execute(query + " WHERE r.dataset=? ORDER BY r.created_at, r.run_id", (dataset,)).fetchall()
        else:
            rows = conn.execute(query + " ORDER BY r.dataset, r.created_at, r.run_id").fetchall()
        out = []
        for r in rows:
            try:
                planned = tuple(events_from_json_list(json.loads(r[4])))
                spent = tuple(events_from_json_list(json.loads(r[5])))
            except (ValueError, TypeError) as e:
                raise LedgerCorruptError(f"Ledger {self.path}: run {r[0]!r} has unreadable events ({e})") from None
            if r[3] not in ("reserved", "committed", "released"):
                raise LedgerCorruptError(f"Ledger {self.path}: run {r[0]!r} has unknown status {r[3]!r}")
            out.append(RunRecord(r[0], r[1], r[2], r[3], planned, spent, r[6], r[7], r[8], r[9]))
        return out

    def datasets(self) -> list[DatasetRecord]:
        """Every dataset (aliases are listed on their dataset, not as datasets)."""
        if self._conn is None:
            return []
        with self._locked_errors():
            rows = self._conn.execute("SELECT name FROM datasets ORDER BY name").fetchall()
            return [self._dataset_row(self._conn, r[0]) for r in rows]  # type: ignore[misc]

    def dataset(self, name: str) -> DatasetRecord:
        """The dataset called `name`, or the one `name` is an alias of.

        Raises: LedgerError naming the known datasets when `name` is unknown."""
        record = None
        if self._conn is not None:
            with self._locked_errors():
                record = self._dataset_row(self._conn, name)
        if record is None:
            known = [d.name for d in self.datasets()]
            raise LedgerError(f"Unknown dataset {name!r} in ledger {self.path}; known datasets: {known}")
        return record

    def runs(self, dataset: Optional[str] = None) -> list[RunRecord]:
        """Every run, or those charged to `dataset` (a name or an alias)."""
        if self._conn is None:
            return []
        with self._locked_errors():
            if dataset is not None:
                dataset = self._canonical(self._conn, dataset)
            return self._runs(self._conn, dataset=dataset)

    def run(self, run_id: str) -> RunRecord:
        found = []
        if self._conn is not None:
            with self._locked_errors():
                found = self._runs(self._conn, run_id=run_id)
        if not found:
            raise UnknownRunError(f"No run {run_id!r} in ledger {self.path}")
        return found[0]

    def _counted(self, conn: sqlite3.Connection, dataset: str) -> list[Event]:
        return merge(e for r in self._runs(conn, dataset=dataset) for e in r.counted)

    def counted_events(self, dataset: str) -> list[Event]:
        """Every event that counts towards `dataset`'s spend (reservations in full);
        `dataset` is a name or an alias."""
        if self._conn is None:
            return []
        with self._locked_errors():
            return self._counted(self._conn, self._canonical(self._conn, dataset))

    def spent(self, dataset: str, *, delta: Optional[float] = None,
              accountant: Optional[str] = None) -> float:
        """Epsilon spent on `dataset`, composing all its counted events.

        Defaults to the dataset's budget delta and accountant."""
        record = self.dataset(dataset)
        delta, accountant = self._delta_and_accountant(record, delta, accountant)
        return epsilon(self.counted_events(dataset), delta=delta, accountant=accountant)

    def remaining(self, dataset: str) -> float:
        """Budget epsilon minus spent epsilon (at the budget's delta), never below 0.

        Raises: LedgerError when the dataset has no budget."""
        record = self.dataset(dataset)
        if record.budget_epsilon is None:
            raise LedgerError(f"Dataset {dataset!r} has no budget; set one with `dpwa ledger set-budget`")
        return max(record.budget_epsilon - self.spent(dataset), 0.0)

    def reporting_delta(self, dataset: str, delta: Optional[float] = None) -> tuple[Optional[float], str]:
        """The delta to report `dataset`'s spend at, and where it comes from:

        * ``"given"``: `delta`, when given;
        * ``"budget"``: the budget's delta (the one budgets are enforced at);
        * ``"runs"``: without a budget, the delta its runs recorded (`reserve(delta=...)`),
          the smallest if they differ (the largest epsilon of theirs);
        * ``"default"``: without either, 1/(10 N) for a dataset of N examples: a display
          default, well below the 1/N that dpwa refuses to reach;
        * ``"none"``: (None) nothing to go by (no budget, no run delta, size unknown).
        """
        if delta is not None:
            check_delta(delta)
            return float(delta), "given"
        record = self.dataset(dataset)
        if record.budget_delta is not None:
            return record.budget_delta, "budget"
        recorded = [r.delta for r in self.runs(record.name) if r.delta is not None]
        if recorded:
            return min(recorded), "runs"
        if record.size:
            return 1 / (10 * record.size), "default"
        return None, "none"

    def history(self, dataset: str, *, delta: float, accountant: Optional[str] = None
                ) -> list[tuple[RunRecord, float, float]]:
        """The dataset's spend run by run, in the order the runs were reserved: for each run,
        (run, epsilon of the run alone, epsilon of it and every earlier run composed), each
        run counted as `spent` counts it now (a reservation in full). The last cumulative
        epsilon is `spent(dataset, delta=delta, accountant=accountant)`.

        One composition per run: a few seconds for a hundred PRV compositions."""
        record = self.dataset(dataset)
        accountant = check_accountant(accountant or record.accountant)
        check_delta(delta)
        out: list[tuple[RunRecord, float, float]] = []
        so_far: list[Event] = []
        cumulative = 0.0
        for run in self.runs(record.name):
            alone = epsilon(run.counted, delta=delta, accountant=accountant)
            if merge(run.counted):
                so_far = merge([*so_far, *run.counted])
                cumulative = epsilon(so_far, delta=delta, accountant=accountant)
            out.append((run, alone, cumulative))
        return out

    @staticmethod
    def _delta_and_accountant(record: DatasetRecord, delta: Optional[float],
                              accountant: Optional[str]) -> tuple[float, str]:
        if delta is None:
            if record.budget_delta is None:
                raise LedgerError(f"Dataset {record.name!r} has no budget delta; pass a delta")
            delta = record.budget_delta
        return delta, check_accountant(accountant or record.accountant)

    def export(self) -> dict[str, Any]:
        """Everything in the ledger as plain JSON-able data (fingerprints as `shown`)."""
        return {"ledger": str(self.path), "schema_version": SCHEMA_VERSION,
                "datasets": [{**d.to_dict(), "fingerprint": self.shown(d.fingerprint),
                              "runs": [r.to_dict() for r in self.runs(d.name)]} for d in self.datasets()]}

    @staticmethod
    def shown(fingerprint: Optional[str]) -> Optional[str]:
        """A stored fingerprint as `show` and `export` print it: keyed ones as they are; a plain
        one (a file of an older version, keyed at its next write) hidden behind its size, since
        it is a hash of the labels."""
        if fingerprint is None or _KEYED.fullmatch(fingerprint):
            return fingerprint
        return f"{_size_prefix(fingerprint)}(plain, hidden; keyed at the ledger's next write)"

    # ------------------------------------------------------------------ writing

    def set_budget(self, dataset: str, *, epsilon: float, delta: float, accountant: str = DEFAULT_ACCOUNTANT,
                   size: Optional[int] = None, force: bool = False, accept_delta_above_1_over_n: bool = False,
                   accept_hint: str = "accept_delta_above_1_over_n=True") -> DatasetRecord:
        """Set (or change) a dataset's budget, creating the dataset entry if needed.

        `dataset` may be an alias: the budget is its dataset's (the same people).

        Raises:
            InvalidParameterError: epsilon <= 0, delta outside (0, 1), unknown accountant.
            DeltaAboveOneOverNError: delta >= 1/N, where N is `size` or the size already
                recorded, unless `accept_delta_above_1_over_n` (`accept_hint` names how the
                caller accepts it, in the message).
            BudgetExceededError: the dataset already spent more than `epsilon` (unless
                `force`, which freezes the dataset: every later reservation is refused).
        """
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
                math.isfinite(epsilon) and epsilon > 0):
            raise InvalidParameterError(f"Expected a finite budget epsilon > 0, got epsilon={epsilon!r}")
        check_delta(delta)
        check_accountant(accountant)
        _check_name(dataset)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise InvalidParameterError(f"Expected a positive dataset size, got size={size!r}")
        with self._transaction() as conn:
            record = self._dataset_row(conn, dataset)
            n = size if size is not None else record.size if record is not None else None
            if n is not None:
                check_delta_below_1_over_n(delta, n, accept=accept_delta_above_1_over_n, accept_hint=accept_hint)
            now = _now()
            if record is None:
                conn.execute("INSERT INTO datasets VALUES (?, NULL, ?, ?, ?, ?, ?, ?)",
                             (dataset, size, epsilon, delta, accountant, now, now))
            else:
                dataset = record.name
                counted = self._counted(conn, dataset)
                with _memo.bypassed():  # enforced: never from a cache file someone could write
                    spent = _accountants.epsilon(counted, delta=delta, accountant=accountant)
                if not spent <= epsilon and not force:  # NaN is past any budget
                    raise BudgetExceededError(
                        f"Dataset {dataset!r} has already spent epsilon={spent:.4f} at delta={delta:g} "
                        f"({accountant}), more than the new budget epsilon={epsilon:g}; pass --force to "
                        "set it anyway (every later run on it will then be refused)")
                if size is not None and record.size is not None and size != record.size and record.fingerprint:
                    raise DatasetMismatchError(f"Dataset {dataset!r} has {record.size} examples (its data's "
                                               f"fingerprint {record.fingerprint} says so), not {size}")
                # a size only declared (no data bound yet) may be corrected
                conn.execute("UPDATE datasets SET budget_epsilon=?, budget_delta=?, accountant=?, "
                             "size=COALESCE(?, size), updated_at=? WHERE name=?",
                             (epsilon, delta, accountant, size, now, dataset))
            record = self._dataset_row(conn, dataset)
        assert record is not None
        return record

    def reserve(self, *, run_id: str, dataset: str, fingerprint: str, events: Sequence[Event],
                config_hash: str = "", size: Optional[int] = None, delta: Optional[float] = None) -> RunRecord:
        """Reserve a run's whole planned spend; call before the run touches any data.

        The run is charged to the dataset its fingerprint belongs to: if that data is
        already registered under another name, `dataset` becomes an alias of it (a subset
        of a dataset, fingerprinted by its source's labels, composes with its parent).

        Args:
            run_id: unique id of the run.
            dataset: dataset name; created on first use (without a budget), unless the
                fingerprint is already registered, when it becomes an alias.
            fingerprint: `fingerprint(labels)` of the whole source data the run reads from
                (before any subset or split: the people who can be affected), or its keyed
                form in this ledger (`keyed`); stored keyed.
            events: every mechanism the run plans to apply.
            config_hash: hash of the run's resolved config, for the record.
            size: number of examples (checks delta < 1/N; recorded on first use).
            delta: the delta the run reports its epsilon at (its config's), recorded so that
                `reporting_delta` can show a dataset without a budget at the delta its runs
                used. It changes no budget check (those use the budget's delta).

        Raises:
            BudgetExceededError: the reservation would take the dataset past its budget.
            DatasetMismatchError: `dataset` is bound to another fingerprint, or is a dataset
                not yet bound to data while this fingerprint belongs to another dataset.
            RunStateError: `run_id` is already recorded.
        """
        _check_name(dataset)
        _check_name(run_id, what="run id")
        _check_name(fingerprint, what="fingerprint")
        if delta is not None:
            check_delta(delta)
        said = fingerprint_size(fingerprint)
        if size is not None and said is not None and size != said:
            raise InvalidParameterError(f"size={size} does not match fingerprint {fingerprint}, which says "
                                        f"{said} examples; nothing was reserved")
        size = said if size is None else size  # a fingerprint's own N (a recorded run's: `dpwa ledger record`)
        events = merge(events)
        with self._transaction() as conn:
            given, fingerprint = fingerprint, _keyed(self._key(conn), fingerprint)  # the transaction made the key
            if _KEYED.fullmatch(given) and self._owner(conn, fingerprint) is None:
                raise InvalidParameterError(
                    f"Fingerprint {given} is in a ledger's keyed form, but no dataset in ledger {self.path} has it: "
                    "it comes from another ledger (each keys with its own secret) or is mistyped. Pass the data's "
                    "labels (--labels) or its plain fingerprint (accounting.fingerprint(labels)); nothing was reserved")
            if conn.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                raise RunStateError(f"Run {run_id!r} is already in ledger {self.path}; use a new run id "
                                    "(a resumed run keeps its reservation)")
            record = self._dataset_row(conn, dataset)
            owner = self._owner(conn, fingerprint)
            size_known = (record or owner) is not None and (record or owner).size is not None
            now = _now()
            if record is None and owner is not None:  # the same data under a new name: compose
                conn.execute("INSERT INTO aliases VALUES (?, ?, ?)", (dataset, owner.name, now))
                conn.execute("UPDATE datasets SET size=COALESCE(size, ?), updated_at=? WHERE name=?",
                             (size, now, owner.name))
            elif record is None:
                conn.execute("INSERT INTO datasets VALUES (?, ?, ?, NULL, NULL, ?, ?, ?)",
                             (dataset, fingerprint, size, DEFAULT_ACCOUNTANT, now, now))
            elif record.fingerprint is None and owner is not None:
                raise DatasetMismatchError(
                    f"This run's data (fingerprint {fingerprint}) is dataset {owner.name!r} in ledger "
                    f"{self.path}, but {dataset!r} is a separate entry (made by set-budget, not yet bound to "
                    f"data); charging it there would split one dataset's spend in two. Use the name "
                    f"{owner.name!r} (set its budget with `dpwa ledger set-budget --dataset {owner.name}`)")
            elif record.fingerprint is None:  # bound to data now: its size, if declared, must be the data's
                if record.size is not None and size is not None and record.size != size:
                    raise DatasetMismatchError(
                        f"Dataset {record.name!r} has {record.size} examples in ledger {self.path} (declared by "
                        f"set-budget, with its budget's delta checked against 1/{record.size}), but this run's "
                        f"data has {size} (fingerprint {given}). If that is its data, correct the size: `dpwa "
                        f"ledger set-budget --dataset {record.name} --dataset-size {size} ...`; nothing was reserved")
                conn.execute("UPDATE datasets SET fingerprint=?, size=COALESCE(size, ?), updated_at=? WHERE name=?",
                             (fingerprint, size, now, record.name))
            elif record.fingerprint != fingerprint:
                called = repr(dataset) if record.name == dataset else f"{dataset!r} (an alias of {record.name!r})"
                raise DatasetMismatchError(
                    f"Dataset name {called} is bound to data with fingerprint {record.fingerprint} in "
                    f"ledger {self.path}, but this run's data has fingerprint {fingerprint}. If it is other "
                    "data, give it another name; if it is the same people (e.g. a subset), fingerprint the "
                    "whole source data (as dpwa train does): the ledger then charges the run to its parent")
            record = self._dataset_row(conn, dataset)
            assert record is not None
            given, dataset = dataset, record.name
            if not size_known and record.size and record.budget_delta is not None:
                # a budget set before N was known was never checked against 1/N: check it now
                check_delta_below_1_over_n(
                    record.budget_delta, record.size, what=f"the budget delta of dataset {dataset!r}",
                    accept_hint=f"`dpwa ledger set-budget --dataset {dataset} --dataset-size {record.size} "
                                "--accept-delta-above-1-over-n` (or set a delta below 1/N)")
            if record.budget_epsilon is not None:
                counted = self._counted(conn, dataset)
                with _memo.bypassed():  # enforced: never from a cache file someone could write
                    after = epsilon([*counted, *events], delta=record.budget_delta, accountant=record.accountant)
                    before = (epsilon(counted, delta=record.budget_delta, accountant=record.accountant)
                              if not after <= record.budget_epsilon else None)  # NaN is past any budget
                if before is not None:
                    raise BudgetExceededError(
                        f"Run {run_id!r} would take dataset {dataset!r}"
                        f"{'' if given == dataset else f' (named {given!r} by the run)'} to epsilon={after:.4f} at "
                        f"delta={record.budget_delta:g} ({record.accountant}), past its budget "
                        f"epsilon={record.budget_epsilon:g} (already spent or reserved: {before:.4f}); "
                        "nothing was reserved")
            conn.execute("INSERT INTO runs VALUES (?, ?, ?, 'reserved', ?, '[]', NULL, ?, ?)",
                         (run_id, dataset, config_hash, _dump(events), now, now))
            if delta is not None:
                conn.execute("INSERT INTO run_deltas VALUES (?, ?)", (run_id, float(delta)))
            run = self._runs(conn, run_id=run_id)[0]
        _warn_large_delta(record)
        return run

    def progress(self, run_id: str, spent: Sequence[Event], *, session: Optional[str] = None) -> RunRecord:
        """Record what a reserved run has spent so far (it still counts its full plan).
        Recorded spend never goes down (see `commit`). `session`: the caller's `claim`."""
        return self._update_spent(run_id, spent, new_status="reserved", session=session)

    def claim(self, run_id: str, *, holding: Optional[Sequence[Event]] = None) -> str:
        """Make the caller the one session of a reserved run, and return its token for
        `progress`, `held`, `checkpointed` and `commit`: any session that claimed it before is
        refused from now on (SessionLostError). Two copies of a run folder, resumed at once
        (or a requeue on another host, where a folder lock does not reach), would otherwise
        both release under the one reservation; the one that claimed last goes on.

        `holding`: the releases the caller's checkpoint holds. A claim from a checkpoint older
        than the newest one recorded (`checkpointed`) is refused in the same transaction,
        leaving the claim of the session that wrote it in place (StaleCheckpointError)."""
        token = secrets.token_hex(16)
        with self._transaction() as conn:
            self._reserved_run(conn, run_id, "can be claimed")
            if holding is not None:
                have = {e.with_count(0): e.count for e in merge(holding)}
                row = conn.execute("SELECT counts FROM run_checkpoints WHERE run_id=?", (run_id,)).fetchone()
                newer = [e for e in (events_from_json_list(json.loads(row[0])) if row else [])
                         if have.get(e.with_count(0), 0) < e.count]
                if newer:
                    held = have.get(newer[0].with_count(0), 0)
                    raise StaleCheckpointError(
                        f"its checkpoint holds {held} of the {newer[0].count} releases of the run's newest "
                        "checkpoint: resume the folder with the newest checkpoint", held=held, newest=newer[0])
            conn.execute("INSERT OR REPLACE INTO run_sessions VALUES (?, ?)", (run_id, token))
        return token

    @contextlib.contextmanager
    def held(self, run_id: str, session: str) -> Iterator[None]:
        """One write transaction in which `session` still holds the run: what the caller writes
        inside (a checkpoint, the final weights) and the ledger calls it makes there cannot
        interleave with another session's `claim`. A claim after it sees what it recorded; a
        claim before it makes it raise SessionLostError before anything is written."""
        with self._transaction() as conn:
            self._check_session(conn, run_id, session)
            self._reserved_run(conn, run_id, "can record spend")
            self._joined = True
            try:
                yield
            finally:
                self._joined = False

    def _check_session(self, conn: sqlite3.Connection, run_id: str, session: str) -> None:
        """First, so that a session whose run another one took over and committed hears why."""
        row = conn.execute("SELECT session FROM run_sessions WHERE run_id=?", (run_id,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], session):
            raise SessionLostError(
                f"Run {run_id!r} was resumed by another session (a copy of its folder, or a requeue elsewhere) "
                "after this one started: this session stops without writing, as if killed; the other goes on")

    def _reserved_run(self, conn: sqlite3.Connection, run_id: str, doing: str) -> RunRecord:
        found = self._runs(conn, run_id=run_id)
        if not found:
            raise UnknownRunError(f"No run {run_id!r} in ledger {self.path}")
        if found[0].status != "reserved":
            raise RunStateError(f"Run {run_id!r} is {found[0].status}; only a reserved run {doing}")
        return found[0]

    def checkpointed(self, run_id: str, held: Sequence[Event], *, session: Optional[str] = None) -> None:
        """Record that a reserved run's newest checkpoint, now on disk, holds the releases `held`
        (call after writing it; counts never go down). A resume from a checkpoint holding fewer
        (`checkpointed_events`: a copy of the folder made earlier, a rolled-back file) would
        release again what a newer checkpoint already released, past what the ledger counts."""
        with self._transaction() as conn:
            if session is not None:
                self._check_session(conn, run_id, session)
            self._reserved_run(conn, run_id, "checkpoints")
            row = conn.execute("SELECT counts FROM run_checkpoints WHERE run_id=?", (run_id,)).fetchone()
            had = events_from_json_list(json.loads(row[0])) if row else []
            conn.execute("INSERT OR REPLACE INTO run_checkpoints VALUES (?, ?)", (run_id, _dump(_most(had, held))))

    def checkpointed_events(self, run_id: str) -> list[Event]:
        """The releases the run's newest checkpoint held when it was written (`checkpointed`);
        none for a run that recorded none, or a file from before the table."""
        if self._conn is None:
            return []
        with self._locked_errors():
            if not self._has_table(self._conn, "run_checkpoints"):
                return []
            row = self._conn.execute("SELECT counts FROM run_checkpoints WHERE run_id=?", (run_id,)).fetchone()
        return events_from_json_list(json.loads(row[0])) if row else []

    def commit(self, run_id: str, spent: Sequence[Event], *, session: Optional[str] = None) -> RunRecord:
        """Finish a run: from now on it counts what it actually spent, not its plan. Each
        mechanism counts the most steps ever recorded for it, never fewer: a resumed run that
        redoes steps records fewer for a while, and a caller passing less than it recorded must
        not shrink what a release or a commit keeps."""
        return self._update_spent(run_id, spent, new_status="committed", session=session)

    def _update_spent(self, run_id: str, spent: Sequence[Event], *, new_status: str,
                      session: Optional[str] = None) -> RunRecord:
        spent = merge(spent)
        with self._transaction() as conn:
            if session is not None:
                self._check_session(conn, run_id, session)
            run = self._reserved_run(conn, run_id, "can record spend")
            _check_within(run, spent)
            conn.execute("UPDATE runs SET spent=?, status=?, updated_at=? WHERE run_id=?",
                         (_dump(_most(run.spent, spent)), new_status, _now(), run_id))
            return self._runs(conn, run_id=run_id)[0]

    def release(self, run_id: str, *, reason: str) -> RunRecord:
        """Give back the unspent part of a reservation (e.g. a run that failed before its
        first step). Steps the run recorded with `progress` still count."""
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidParameterError("Releasing a reservation needs a reason (e.g. --reason 'crashed at start')")
        with self._transaction() as conn:
            self._reserved_run(conn, run_id, "can be released")
            conn.execute("UPDATE runs SET status='released', reason=?, updated_at=? WHERE run_id=?",
                         (reason.strip(), _now(), run_id))
            return self._runs(conn, run_id=run_id)[0]


def _check_name(name: str, what: str = "dataset name") -> None:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise InvalidParameterError(f"Expected a non-empty {what} without surrounding spaces, got {name!r}")


def _most(recorded: Sequence[Event], new: Sequence[Event]) -> list[Event]:
    """Each mechanism at the larger of its recorded and its new count: recorded counts never go down."""
    most = {e.with_count(0): e.count for e in recorded}
    for e in merge(new):
        most[e.with_count(0)] = max(most.get(e.with_count(0), 0), e.count)
    return [key.with_count(n) for key, n in most.items() if n > 0]


def _check_within(run: RunRecord, spent: Sequence[Event]) -> None:
    """Spend must be part of the reservation: same mechanisms, no more steps."""
    planned = {e.with_count(0): e.count for e in run.planned}
    for e in spent:
        allowed = planned.get(e.with_count(0))
        if allowed is None or e.count > allowed:
            raise RunStateError(
                f"Run {run.run_id!r} cannot record {e} : its reservation is "
                f"{list(run.planned)}; reserve a new run for more spend")


def _warn_large_delta(record: DatasetRecord) -> None:
    if record.size and record.budget_delta is not None and record.budget_delta >= 1 / record.size:
        warnings.warn(f"Dataset {record.name!r}: delta={record.budget_delta:g} is not below 1/N = "
                      f"{1 / record.size:g}; such a delta allows leaking whole examples", stacklevel=3)
