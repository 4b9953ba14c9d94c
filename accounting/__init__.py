"""dpwa's privacy accounting: torch-free, fast to import, usable anywhere.

Events (`PoissonGaussian`, `Gaussian`) describe mechanisms; `epsilon`/`delta` compose
them under the RDP, PRV (default) or PLD accountant; `calibrate` answers budget
questions; `Ledger` remembers every run on a dataset and refuses to overspend it.

>>> from accounting import PoissonGaussian, epsilon
>>> round(epsilon([PoissonGaussian(noise_multiplier=10.0, sample_rate=0.08192, steps=875)],
...               delta=1e-5, accountant="rdp"), 3)
0.988
"""

from .accountants import ACCOUNTANTS, DEFAULT_ACCOUNTANT, delta, epsilon
from .calibrate import epsilon_for, noise_multiplier_for, sample_rate_and_steps, steps_for
from .errors import (AccountantFailedError, AccountingError, BudgetExceededError, DatasetMismatchError, DeltaAboveOneOverNError,
                     InvalidParameterError, LedgerCorruptError, LedgerError, LedgerLockedError, RunStateError,
                     SessionLostError, StaleCheckpointError, UnknownRunError)
from .events import MIN_NOISE_MULTIPLIER, Event, Gaussian, PoissonGaussian, event_from_dict, merge
from .ledger import DatasetRecord, Ledger, RunRecord, check_delta_below_1_over_n, default_ledger_path, fingerprint

__all__ = [
    "ACCOUNTANTS", "DEFAULT_ACCOUNTANT", "epsilon", "delta",
    "epsilon_for", "noise_multiplier_for", "steps_for", "sample_rate_and_steps",
    "Event", "PoissonGaussian", "Gaussian", "event_from_dict", "merge", "MIN_NOISE_MULTIPLIER",
    "Ledger", "DatasetRecord", "RunRecord", "fingerprint", "default_ledger_path", "check_delta_below_1_over_n",
    "AccountingError", "AccountantFailedError", "InvalidParameterError", "DeltaAboveOneOverNError", "BudgetExceededError",
    "DatasetMismatchError",
    "LedgerError", "LedgerCorruptError", "LedgerLockedError", "RunStateError", "SessionLostError",
    "StaleCheckpointError", "UnknownRunError",
]
