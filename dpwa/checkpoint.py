"""Atomic checkpoints: write to a temporary file, fsync, rename. A crash leaves either the
old checkpoint or the new one, never half of one. Loading never executes pickled code
(`torch.load(weights_only=True)`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_write_text", "save_weights", "CheckpointError"]


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read: truncated, not a torch file, or holding pickled code."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_whole(path: Path, mode: str, write: Callable[[Any], Any]) -> None:
    """`write(f)` into `path`, whole or not at all: a temporary file, fsynced, then renamed; a
    failure (disk full, a kill's KeyboardInterrupt) leaves no temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """`state` into `path`, whole or not at all."""
    _write_whole(path, "wb", lambda f: torch.save(state, f))
    fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's tensors and plain values; never executes pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled code refused by weights_only
        raise CheckpointError(f"Cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """`text` into `path`, whole or not at all."""
    _write_whole(path, "w", lambda f: f.write(text))


def save_weights(model: torch.nn.Module, path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """A model's state dict as safetensors (tensors only, no pickle), atomically: what
    `model.pretrained` reads back (dpwa/models/nfnet.py). `metadata`: strings in the file's
    header (a run's provenance, `dpwa.run_folder.CARRIED`)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
