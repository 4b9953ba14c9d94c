"""prv-accountant's modules, imported without running its package `__init__`.

`import prv_accountant` first imports its own `PRVAccountant`, whose composer imports
`scipy.signal` (0.2-0.5 s of a command's start-up, for a convolution dpwa does itself). This
module is a package whose path is prv-accountant's folder: `accounting._prv_lib.domain` is
prv-accountant's `domain.py`, loaded under this name, with its relative imports resolved
here. The code run is prv-accountant's own, unchanged; only the package `__init__` is skipped.
"""

import importlib.util

_spec = importlib.util.find_spec("prv_accountant")  # finds, does not import
if _spec is None or not _spec.submodule_search_locations:
    raise ImportError("dpwa's accounting needs prv-accountant (pip install prv-accountant)")
__path__ = list(_spec.submodule_search_locations)
