"""dpwa: differentially private training of image classifiers, with weight averaging.

Importing `dpwa` is cheap and torch-free: the command line's budget and ledger verbs must
start fast. Training modules import torch themselves when used.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
