"""Exceptions raised by the accounting package.

All derive from `AccountingError` so a caller (the CLI) can turn any of them into a clear
message and a non-zero exit, and all derive from `ValueError` or `RuntimeError` so plain
Python callers can catch them the usual way.
"""

__all__ = [
    "AccountingError",
    "InvalidParameterError",
    "BudgetExceededError",
    "DatasetMismatchError",
    "LedgerError",
    "LedgerCorruptError",
    "LedgerLockedError",
    "UnknownRunError",
    "RunStateError",
]


class AccountingError(Exception):
    """Base class of every error the accounting package raises on purpose."""


class InvalidParameterError(AccountingError, ValueError):
    """A privacy parameter is out of range (the message names the value)."""


class BudgetExceededError(AccountingError, RuntimeError):
    """A run's planned spend would take a dataset past its budget; nothing was written."""


class LedgerError(AccountingError, RuntimeError):
    """The ledger cannot carry out a request."""


class DatasetMismatchError(LedgerError):
    """A dataset name is already bound to data with another fingerprint."""


class LedgerCorruptError(LedgerError):
    """The ledger file is not a dpwa ledger or its contents are damaged; it is left untouched."""


class LedgerLockedError(LedgerError):
    """Another process held the ledger's write lock for longer than the timeout."""


class UnknownRunError(LedgerError):
    """No run with that id is recorded."""


class RunStateError(LedgerError):
    """The run is not in a state that allows the request (e.g. committing a released run)."""
