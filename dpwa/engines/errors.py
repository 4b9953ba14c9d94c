"""The engines' one error."""

from __future__ import annotations

from ..errors import UsageError

__all__ = ["EngineError"]


class EngineError(UsageError, ValueError):
    """The model has a layer this engine cannot handle (the message names it and the fix): exit 2,
    raised by the probe before any privacy is charged."""
