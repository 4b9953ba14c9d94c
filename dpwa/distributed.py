"""Data-parallel DP-SGD on torch.distributed: what each process of `torchrun -m dpwa train` knows.

One logical batch, many processes, one mechanism. Every rank draws the same Poisson sample
of the whole dataset (the sampling seed is drawn secretly by rank 0 and broadcast), and rank r
takes every W-th of its examples: the union over ranks is exactly the Poisson sample with
rate q = B/N that the ledger records, whatever W. Each rank clips its examples' gradients
(augmult views stay with their example), the clipped sums are all-reduced, and Gaussian noise
of the full standard deviation sigma C is added once per step, by rank 0 (Opacus's
`DistributedDPOptimizerFastGradientClipping`), never once per rank. Rank 0 alone writes the
run folder, checkpoints, metrics and the ledger. This is Opacus's DPDDP recipe with a shared
sampler instead of a per-rank one, so that W processes and one process take the same batches.

Works with gloo (CPU) and NCCL (GPUs); torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) says how many processes there are.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from .config import ConfigError
from .errors import RefusalError

__all__ = ["World", "DistributedError", "world_from_env"]

T = TypeVar("T")


class DistributedError(RefusalError, ConnectionError):
    """A process of a distributed run failed or stopped answering (an OSError: `dpwa` exits
    with code 1 and this message)."""


@dataclasses.dataclass(frozen=True)
class World:
    """The processes of one run: rank 0 of 1 outside torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files or the ledger."""
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's examples of a logical batch (every size-th, from its rank): the shards
        partition the batch."""
        return idx[self.rank::self.size]

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled; small objects, checkpoints)."""
        if self.size == 1:
            return obj
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, device=self._object_device())
        except RuntimeError as e:  # a rank died or hung: a clear message, not gloo's traceback
            raise self._lost(e) from None
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as e:
            raise self._lost(e) from None
        return out

    def _lost(self, e: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.size}: a process of the distributed run failed or stopped answering "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). A run it reserved stays reserved "
            f"in the ledger (counted in full): `torchrun --nproc_per_node {self.size} -m dpwa train --resume "
            "RUN_DIR` continues it from its last checkpoint, `dpwa ledger release RUN_ID --reason ...` gives back "
            "what it did not spend")

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 and hand its result, or its exception, to every rank: a refusal on
        rank 0 (budget exceeded, unreadable checkpoint) stops all ranks with the same error."""
        result: Any = None
        if self.main:
            try:
                result = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                result = ("error", e)
        kind, value = self.broadcast(result)
        if kind == "error":
            raise value
        return value

    def check(self, error: Optional[BaseException]) -> None:
        """Raise on every rank if any rank failed to set up (each rank's own error, or rank
        r's), so that no rank waits forever for one that has given up."""
        errors = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for r, e in enumerate(errors):
            if e is not None:
                raise ConfigError(f"rank {r} failed to start: {e}")

    def agree(self, what: str, value: Any) -> None:
        """Refuse to start when the ranks disagree about `what` (config, data)."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ConfigError(f"the {self.size} ranks disagree on the {what} ({per_rank}); start every rank with "
                              "the same config, overrides and data")

    def failure(self, e: BaseException, run_id: str, run_dir: Path) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.size}: a process of the distributed run failed or stopped answering "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Run {run_id!r} stays reserved in "
            f"the ledger (counted in full); `torchrun --nproc_per_node {self.size} -m dpwa train --resume {run_dir}` "
            "continues it from its last checkpoint")

    def close(self) -> None:
        """Destroy the process group while the interpreter is fully alive: its destructor joins
        gloo's worker threads (see `world_from_env` for why nothing else may keep it alive).
        No final barrier: every rank's last call is already a collective (rank 0's report), and
        after a failure a barrier would only wait for a rank that is gone."""
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def _object_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def world_from_env(backend: str = "auto", device: str = "cpu", timeout_s: float = 600.0) -> World:
    """The world torchrun set up (WORLD_SIZE > 1), with its process group initialised, or a
    single process. backend auto: nccl for CUDA devices, gloo otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("train.dist_backend=nccl needs CUDA devices; use train.dist_backend=gloo on CPUs")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        _bind_group_defaults_before_init()
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except OverflowError:
            raise ConfigError(f"train.dist_timeout_s={timeout_s:g} is more than torch.distributed can wait for; "
                              "give a shorter timeout (a day is 86400)") from None
    return World(rank=rank, size=size, local_rank=local, backend=backend)


def _bind_group_defaults_before_init() -> None:
    """Import `torch.distributed.nn` before the process group exists.

    Its functions take `group=group.WORLD` as default arguments, evaluated at import. Imported
    after `init_process_group` (torch._dynamo imports it; timm imports dynamo, and dpwa imports
    timm when it builds an NF model: `dpwa finetune`), those defaults hold 10 references to the
    default group, so `destroy_process_group` cannot free it and gloo's worker threads live on
    into interpreter exit. A worker still releasing the last collective's tensors then needs the
    GIL while Python finalizes; Python ends that thread with pthread_exit, whose unwind through a
    C++ destructor calls std::terminate: "terminate called without an active exception", SIGABRT,
    a finished run reported as failed. Imported first, the defaults are None.
    (tests/dpwa/test_distributed.py::test_close_frees_the_process_group_before_interpreter_exit)"""
    import torch.distributed.nn  # noqa: F401
