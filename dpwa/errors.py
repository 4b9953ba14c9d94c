"""The two kinds of error a dpwa command can end with, and so its exit code.

* `UsageError` (exit 2): the input is wrong (a config key, a value, a file, a model dpwa
  cannot train privately). Raised before any privacy is charged; nothing was changed.
* `RefusalError` (exit 1): the input is well formed but the run is refused or failed at run
  time (budget exceeded, a release beyond the reservation, a run folder that cannot be
  written, a distributed rank that stopped answering). The message says what the ledger holds.

Every dpwa exception derives from exactly one of them, explicitly: the exit code is chosen
by these bases, never by whether an error happens to subclass `ValueError` or `OSError`.
"""

from __future__ import annotations

__all__ = ["DpwaError", "UsageError", "RefusalError", "EXIT_CODES", "exit_code"]


class DpwaError(Exception):
    """Base of every error dpwa raises on purpose."""

    exit_code = 1


class UsageError(DpwaError):
    """Bad input: exit code 2, nothing charged, nothing written."""

    exit_code = 2


class RefusalError(DpwaError):
    """A refusal or a failure at run time: exit code 1; the message says what the ledger holds."""

    exit_code = 1


EXIT_CODES = {UsageError: 2, RefusalError: 1}


def exit_code(error: BaseException) -> int:
    """The exit code of a dpwa error (1 for anything not raised on purpose)."""
    return getattr(error, "exit_code", 1) if isinstance(error, DpwaError) else 1
