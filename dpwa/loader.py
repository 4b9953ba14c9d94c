"""The images of secret Poisson batches, decoded in DataLoader worker processes, one batch ahead.

Folder images (`dpwa.data.ImageFiles`) are decoded and resized when a batch draws them; at
ImageNet scale that decoding, not the model, bounds a step. With `train.workers: W > 0`,
W persistent `torch.utils.data.DataLoader` workers decode the physical chunks of a batch in
parallel, and the next batch while the current step runs. What the loader may and may not do:

* It never draws. The sampler (`dpwa.privacy.PoissonBatches`) draws every batch from its
  secret generator exactly as without workers; the batch ahead is `peek()`ed from a copy of
  that generator, so the sampler's state and a checkpoint of it do not move until the batch is
  taken, and a stop, kill or resume sees the batches of a run without workers. A batch is
  decoded ahead only if the ledger reserved its release (the caller checks), one at most.
* It fetches what it was given: `fetch(idx)` yields the chunks `idx.split(chunk_size)`, the
  same uint8 tensors (decoded by the same `ImageFiles.__getitem__`) as the in-process path, in
  the same order; a batch decoded ahead is used only if it is exactly `idx`.
* It writes nothing: no logs, no files, no warnings (PIL's are dropped as a batch decodes,
  `dpwa.data._quiet_decoding`), and a decoding failure in a worker is re-raised
  without its file, index or worker traceback. Decoded chunks come back through the workers'
  pipes as arrays, not as shared-memory tensors, whose file descriptors Python hands over
  through a socket file it makes in TMPDIR (this also spares a small /dev/shm, as in Docker).
  Augmentation stays in the training process (`dpwa.augmult`, batched, seeded per release), so
  the views are bit-identical for any W.

With W = 0, `fetch` indexes the images chunk by chunk in this process, as dpwa always has.
"""

from __future__ import annotations

import collections
import math
import signal
import weakref
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from .data import DataError

__all__ = ["BatchLoader"]


class _Feed(Sampler):
    """The chunk index lists of the one batch in flight, set before each pass of the loader
    (as `DistributedSampler.set_epoch` changes its sampler between epochs)."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def _as_array(chunk: torch.Tensor) -> Any:
    """In a worker: the decoded chunk as a numpy array, pickled through the pipe (see above)."""
    return chunk.numpy()


def _ignore_stop_signals(worker_id: int) -> None:
    """In a worker: SIGINT and SIGTERM sent to the whole process group (Ctrl-C, a scheduler's
    preemption) are the training process's, which checkpoints at the step boundary and then
    stops the workers; a worker ended by one would fail the step it feeds instead. The workers
    still end when the training process closes the loader, exits (see `_stop`) or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stop(loader: DataLoader) -> None:
    """Stop a loader's workers through their queues (they ignore SIGTERM, so this runs before
    multiprocessing's exit hook would `terminate()` and wait for them)."""
    if loader._iterator is not None:
        loader._iterator._shutdown_workers()
        loader._iterator = None


class BatchLoader:
    """Fetches the physical chunks of logical batches of `images`.

    Args:
        images: indexable by an index tensor or list, giving a uint8 (n, C, H, W) batch
            (`ImageFiles`, or an in-memory tensor with `workers=0`).
        workers: DataLoader worker processes; 0 decodes in this process, no prefetching.
        chunk_size: examples per physical chunk (`train.physical_batch_size`).
        expected_batch: the expected examples per batch (this rank's share); sizes how many
            chunks may be in flight, so that a whole batch decodes ahead.
    """

    def __init__(self, images: Any, *, workers: int, chunk_size: int, expected_batch: float) -> None:
        if workers < 0 or chunk_size < 1:
            raise ValueError(f"Expected workers >= 0 and chunk_size >= 1, got {workers=}, {chunk_size=}")
        self.images, self.workers, self.chunk_size = images, workers, chunk_size
        self._ahead: Optional[tuple[torch.Tensor, Iterator[torch.Tensor]]] = None
        self._feed = _Feed()
        self._loader: Optional[DataLoader] = None
        if workers:
            most = expected_batch + 6 * math.sqrt(expected_batch) + 1  # a Poisson batch above this: ~never
            self._loader = DataLoader(
                images, batch_size=None, sampler=self._feed, num_workers=workers, persistent_workers=True,
                prefetch_factor=max(2, math.ceil(math.ceil(most / chunk_size) / workers)),
                collate_fn=_as_array, worker_init_fn=_ignore_stop_signals,
                generator=torch.Generator())  # the workers' base seed: not from torch's global RNG
            self._stop = weakref.finalize(self, _stop, self._loader)  # at close, garbage collection or exit

    def fetch(self, idx: torch.Tensor, ahead: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
        """The uint8 images of `idx.split(chunk_size)`, one chunk at a time, in order. Nothing
        is read before the first chunk is asked for (a refused release reads no image).

        Args:
            idx: the batch (this rank's share) the sampler drew.
            ahead: with workers, the batch to decode next, once `idx`'s images are in: the
                sampler's `peek()`, and only where the ledger reserved its release; None: none.

        Raises:
            DataError: an image cannot be decoded (which one is not said).
        """
        if self._loader is None:
            return (self.images[part] for part in idx.split(self.chunk_size))
        return self._from_workers(idx, ahead)

    def _from_workers(self, idx: torch.Tensor, ahead: Optional[torch.Tensor]) -> Iterator[torch.Tensor]:
        if self._ahead is None or not torch.equal(self._ahead[0], idx):
            self._start(idx)  # the first batch, or not the one decoded ahead: decode it now
        assert self._ahead is not None
        chunks, self._ahead = self._ahead[1], None
        try:  # the whole batch, before the workers start on the next one
            done = collections.deque(torch.from_numpy(chunk) for chunk in chunks)
        except Exception as e:  # noqa: BLE001 - a worker's message or traceback may name the example
            what = "an image cannot be decoded" if isinstance(e, DataError) else f"{type(e).__name__} in a worker"
            raise DataError(f"fetching a batch failed: {what}. Which file is not said: in a private Poisson batch "
                            "it would tell which examples the step drew. `ImageFiles.unreadable()` lists the "
                            "files no image can be decoded from") from None
        if ahead is not None:
            self._start(ahead)
        while done:  # each chunk handed on once and dropped: the images leave memory as the step uses them
            yield done.popleft()

    def _start(self, idx: torch.Tensor) -> None:
        """Send `idx`'s chunks to the workers (a new pass of the persistent loader over the feed)."""
        assert self._loader is not None
        if not self._stop.alive:  # used again after close: the workers restart, and must stop again
            self._stop = weakref.finalize(self, _stop, self._loader)
        self._feed.chunks = [part.tolist() for part in idx.split(self.chunk_size)]
        self._ahead = (idx.clone(), iter(self._loader))

    def close(self) -> None:
        """Stop the workers (an unfinished batch ahead is dropped)."""
        self._ahead = None
        if self._loader is not None:
            self._stop()

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

