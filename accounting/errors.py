"""Exceptions raised by the accounting package.

All derive from `AccountingError` so a caller (the CLI) can turn any of them into a clear
message and a non-zero exit, and all derive from `ValueError` or `RuntimeError` so plain
Python callers can catch them the usual way.
"""

__all__ = [
    "AccountingError",
    "InvalidParameterError",
    "DeltaAboveOneOverNError",
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


class DeltaAboveOneOverNError(InvalidParameterError):
    """delta >= 1/N for a dataset of N examples: such a delta allows releasing whole examples,
    so it is refused unless the caller accepts it explicitly. `accept` names how to accept it
    (a keyword argument by default; the CLI names its option)."""

    def __init__(self, delta: float, size: int, *, what: str = "delta",
                 accept: str = "accept_delta_above_1_over_n=True") -> None:
        self.delta, self.size, self.what, self.accept = delta, size, what, accept
        super().__init__(f"{what}={delta:g} is not below 1/N = {1 / size:g} (N={size} examples): a delta this "
                         f"large allows releasing whole examples; use a delta below 1/N, or pass {accept} "
                         "to accept it")

    def __reduce__(self):  # picklable across processes despite the keyword-only arguments
        return (_delta_error, (self.delta, self.size, self.what, self.accept))


def _delta_error(delta: float, size: int, what: str, accept: str) -> "DeltaAboveOneOverNError":
    return DeltaAboveOneOverNError(delta, size, what=what, accept=accept)


class BudgetExceededError(AccountingError, RuntimeError):
    """A run's planned spend would take a dataset past its budget; nothing was written."""


class AccountantFailedError(AccountingError, RuntimeError):
    """The accountant cannot compute this composition (PRV's discretisation fails for some
    extreme mechanisms, e.g. a very small noise multiplier over thousands of steps); the RDP
    accountant, looser, always can."""


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


class SessionLostError(RunStateError):
    """Another session took over a reserved run (`Ledger.claim`): this one must stop writing."""


class StaleCheckpointError(RunStateError):
    """A resume's checkpoint holds fewer releases than the run's newest recorded one
    (`Ledger.claim(holding=)`): `held` of the `newest` event's count."""

    def __init__(self, message: str, *, held: int, newest: "object") -> None:
        super().__init__(message)
        self.held, self.newest = held, newest
