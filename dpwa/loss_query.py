"""The loss mechanism: the mean loss of a released weight vector on *private* data (the
training split, or the validation split carved from it), released with the Gaussian mechanism.

A plot of the training loss at new weight vectors (a loss landscape, a curve between two
runs) reads private examples, so each value is a query (methods.md rule R4, design rule 5).
Each example's loss is clipped to [0, B] (`loss_clip`; a non-finite one counts as B); the sum over the N examples then has
sensitivity B under adding or removing one example, and is released once with N(0, sigma^2 B^2)
noise, then divided by N, which dpwa treats as public (as `dpwa.statistics` does for feature
statistics and the sample rate q = B / N does for DP-SGD). k values (one per grid point) are k
releases of the Gaussian mechanism on the full data: one `Gaussian(noise_multiplier=sigma,
count=k)` event, composed in the ledger with the run's DP-SGD steps.

A released value is noisy and may be negative: callers must never read "<= 0" as "not
computed" (the reference loss-landscape code does, and would re-query on resume).

Like the other mechanisms it counts its releases and refuses, before it reads any example, a
release the ledger did not reserve. `reserved_query` reserves a query as its own ledger run
under the released run's dataset before any private example is read (a budget that the query
would exceed refuses it there, with nothing written) and commits what was released.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from accounting import AccountingError, Event, Gaussian, Ledger, default_ledger_path

from .mechanism import ReleaseRefused
from .run_folder import new_run_id

__all__ = ["LossMechanism", "reserved_query", "query_ledger_path", "check_holds_run"]


class LossMechanism:
    """Args:
        noise_multiplier: sigma; the noise std of the clipped loss sum is sigma * loss_clip.
        loss_clip: B, each example's loss is clipped to [0, B].
        dataset_size: N, the (public) number of examples the sum is divided by.
        releases: what the ledger reserved (one per value).
        generator: the secret noise RNG (`dpwa.privacy.secret_generator`; seeded in tests only).
        what: what the released values are, for a refusal's message.
    """

    def __init__(self, *, noise_multiplier: float, loss_clip: float, dataset_size: int, releases: int,
                 generator: Optional[torch.Generator] = None, what: str = "loss query") -> None:
        if not (0 < noise_multiplier < math.inf and 0 < loss_clip < math.inf and dataset_size >= 1 and releases >= 1):
            raise ValueError(f"Expected noise_multiplier, loss_clip > 0, dataset_size, releases >= 1; got "
                             f"{noise_multiplier=}, {loss_clip=}, {dataset_size=}, {releases=}")
        self.noise_multiplier, self.loss_clip = noise_multiplier, loss_clip
        self.dataset_size, self.releases, self.released = dataset_size, releases, 0
        self.what = what  # what a refusal names
        if generator is None:
            from .privacy import secret_generator

            generator = secret_generator(None)
        self.generator = generator

    def events(self) -> list[Event]:
        return [Gaussian(noise_multiplier=self.noise_multiplier, count=self.released)] if self.released else []

    def release(self, losses: Iterable[torch.Tensor]) -> float:
        """The noisy mean of the clipped per-example losses; `losses` yields them in parts
        and is only consumed after the reservation is checked.

        Raises:
            ReleaseRefused: every reserved release has been made (nothing is read).
        """
        if self.released >= self.releases:
            raise ReleaseRefused(f"{self.what} refused: the ledger reserved {self.releases} releases and all were made")
        total, n = torch.zeros((), dtype=torch.float64), 0
        for part in losses:
            # a NaN loss (clamp keeps NaN) would make the sum NaN, telling that its example is
            # in the data whatever the noise: non-finite losses count as B, the clip's top
            total += part.detach().double().nan_to_num(nan=self.loss_clip, posinf=self.loss_clip, neginf=0.0
                                                       ).clamp(0.0, self.loss_clip).sum().cpu()
            n += len(part)
        if n != self.dataset_size:
            raise ValueError(f"Expected {self.dataset_size} examples (the public N), got {n}")
        self.released += 1  # counted before anything leaves
        noise = torch.normal(0.0, self.noise_multiplier * self.loss_clip, size=(1,), dtype=torch.float64,
                             generator=self.generator)
        return float((total + noise[0]) / self.dataset_size)

    def __repr__(self) -> str:
        return (f"LossMechanism(sigma={self.noise_multiplier:g}, B={self.loss_clip:g}, N={self.dataset_size}, "
                f"released {self.released}/{self.releases})")


def check_holds_run(ledger: Ledger, meta: dict[str, Any], what: str) -> None:
    """Refuse to charge `what` to a ledger that does not hold the private run `meta` describes
    (run.json): the dataset's spend there would leave out the run's own, and a fresh ledger
    would admit any query. Checked before anything is reserved.

    Raises:
        UsageError: the run is not in `ledger` (naming where it was charged).
    """
    from accounting.errors import UnknownRunError

    from .errors import UsageError

    if not meta.get("ledger"):
        return  # a public-data run charged nothing
    try:
        ledger.run(meta["run_id"])
    except UnknownRunError:
        raise UsageError(f"{what}: its run {meta['run_id']!r} is not in ledger {ledger.path} (it was charged to "
                         f"{meta['ledger']}); charge it where the run is, so that the dataset's spend composes "
                         "both: --ledger FILE") from None


def query_ledger_path(run: Any, ledger_path: Optional[str] = None) -> Path:
    """Where a query on a run's data is charged: `ledger_path`, else the ledger the run itself
    was charged to (run.json), else privacy.ledger, $DPWA_LEDGER or ~/.dpwa/ledger.sqlite. The
    query must compose with the run's own spend, so the run's ledger comes before the default."""
    chosen = ledger_path or run.meta.get("ledger") or run.cfg.privacy.ledger
    return Path(chosen).expanduser() if chosen else default_ledger_path()


@contextlib.contextmanager
def reserved_query(run: Any, *, events: list[Event], spent: Callable[[], list[Event]], purpose: str,
                   ledger_path: Optional[str] = None) -> Iterator[dict[str, Any]]:
    """Reserve `events` as a ledger run of its own under `run`'s dataset (its fingerprint: the
    labels of the whole source data, as `dpwa train` reserves), yield, then commit `spent()`.

    An error inside gives back what was not released: what `spent()` holds is committed (a
    value computed but not shown still counts), an untouched reservation is released. A kill
    leaves the reservation counted in full (conservative). Yields the record that the caller's
    report shows: ledger path, query run id, dataset, events.

    Raises:
        BudgetExceededError: the query would take the dataset past its budget (nothing reserved).
    """
    ledger = Ledger(query_ledger_path(run, ledger_path), create=False)
    check_holds_run(ledger, run.meta, f"{purpose} of run {run.meta['run_id']!r}")
    query_id = new_run_id(f"{run.meta['run_id']}-{purpose}")
    dataset = run.meta.get("dataset") or run.cfg.data.ledger_name or run.cfg.data.name
    reserved = ledger.reserve(run_id=query_id, dataset=dataset, fingerprint=run.data.source.fingerprint,
                              events=events, size=run.data.source.size, delta=run.meta["delta"])
    record: dict[str, Any] = {"ledger": str(ledger.path), "query_run_id": query_id, "dataset": reserved.dataset,
                              "events": [e.to_dict() for e in events]}
    try:
        yield record
    except BaseException:
        done = spent()
        if done:
            ledger.commit(query_id, done)
        else:
            ledger.release(query_id, reason=f"{purpose} stopped before its first release")
        raise
    ledger.commit(query_id, spent())
    record["events"] = [e.to_dict() for e in spent()]
    try:  # the dataset's spend after this query, at the run's delta (display only)
        record["dataset_epsilon"] = ledger.spent(reserved.dataset, delta=run.meta["delta"],
                                                 accountant=run.cfg.privacy.accountant)
    except (AccountingError, ArithmeticError):  # a history no accountant can compose: shown as unknown
        record["dataset_epsilon"] = None
