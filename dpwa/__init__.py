"""dpwa: differentially private training of image classifiers, with weight averaging.

The Python API (the README's "Python API" section shows each in use):

* `train(cfg, ...)`: a private run from a `RunConfig` (`load_config(path, overrides)`, or
  the dataclasses `RunConfig`, `DataConfig`, `ModelConfig`, `PrivacyConfig`, ...), charged
  to the ledger; `train(cfg, dry_run=True)` says what it would spend; `train(cfg,
  model=my_module)` trains your own `nn.Module`.
* `register_model(name)`, `register_source(name)` (your data, as `Split`s),
  `register_method(cls)`: extensions a config can name.
* `load_run(run_dir)`: a finished run (weights, averages, config, epsilon), no private data.
* `PrivateSGD`: one DP-SGD step per call on your own loop (the mechanism, unmetered: you
  account for it yourself, e.g. with `accounting.Ledger`).

Importing `dpwa` is cheap and torch-free (the names above load on first use): the command
line's budget and ledger verbs must start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import threads as _threads  # noqa: F401,E402 - sets OMP_WAIT_POLICY=PASSIVE before torch loads

__version__ = "0.1.0"

_LAZY = {
    "train": "dpwa.train", "load_config": "dpwa.config", "RunConfig": "dpwa.config", "DataConfig": "dpwa.config",
    "ModelConfig": "dpwa.config", "AugmultConfig": "dpwa.config", "PrivacyConfig": "dpwa.config",
    "OptimConfig": "dpwa.config", "MethodConfig": "dpwa.config", "AveragingConfig": "dpwa.config",
    "TrainConfig": "dpwa.config", "register_model": "dpwa.models", "register_source": "dpwa.data",
    "Split": "dpwa.data", "register_method": "dpwa.methods", "load_run": "dpwa.run_folder",
    "PrivateSGD": "dpwa.privacy",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dpwa' has no attribute {name!r}")
