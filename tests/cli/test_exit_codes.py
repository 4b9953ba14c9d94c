"""`dpwa`'s exit code comes from an error's explicit base: `dpwa.errors.UsageError` 2,
`RefusalError` 1; accounting's `InvalidParameterError` 2, its other errors 1; an unexpected
OSError 1; a closed pipe 0. Whatever else an error subclasses (ValueError, OSError) does not
change it."""

import pytest

from accounting.errors import BudgetExceededError, DeltaAboveOneOverNError, InvalidParameterError, LedgerError
from dpwa.cli import ledger as ledger_verb
from dpwa.cli import main
from dpwa.errors import RefusalError, UsageError


class UsageAlsoOSError(UsageError, OSError):
    pass


class RefusalAlsoValueError(RefusalError, ValueError):
    pass


@pytest.mark.parametrize("error, code", [
    (UsageError("bad key x.y"), 2),
    (RefusalError("release 7 beyond the reservation"), 1),
    (UsageAlsoOSError("bad file f"), 2),
    (RefusalAlsoValueError("refused v"), 1),
    (InvalidParameterError("delta=2"), 2),
    (DeltaAboveOneOverNError(0.5, 10), 2),
    (BudgetExceededError("past its budget"), 1),
    (LedgerError("cannot write l"), 1),
    (OSError("disk full"), 1),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None)
def test_exit_code_and_message(monkeypatch, capsys, error, code):
    def fail(args):
        raise error

    monkeypatch.setattr(ledger_verb, "_show", fail)
    assert main(["ledger", "show"]) == code
    captured = capsys.readouterr()
    assert captured.err == f"dpwa: error: {error}\n" and captured.out == ""


def test_a_closed_pipe_is_not_an_error(monkeypatch, capsys):
    def fail(args):
        raise BrokenPipeError

    monkeypatch.setattr(ledger_verb, "_show", fail)
    assert main(["ledger", "show"]) == 0
