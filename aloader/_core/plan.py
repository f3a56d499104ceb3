"""What one epoch of the core is given: the :class:`Plan`, captured at ``iter(loader)`` in the caller's thread.

Also the core's view of the process pool (:class:`Workers`, a protocol: the core never imports the pool, whose
workers run this same core), what the pool has to do for a dataset (:func:`pool_kind`), the loader's memory of how
fast its samples are (:class:`Speed`) and the window's size (:func:`window_for`).
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from aloader._core.access import MapAccess

__all__ = ["DatasetKind", "Plan", "PoolKind", "Speed", "StateLedger", "Workers", "pool_kind", "window_for"]

DatasetKind = Literal["map", "iterable", "async-iterable"]
PoolKind = Literal["map", "iterable", "items"]


class Workers(Protocol):
    """The process pool as the core sees it. ``start()`` and ``close()`` block: the core calls them off the loop."""

    @property
    def kind(self) -> PoolKind:
        """What the workers do: fetch a sync map-style dataset (``map``), iterate their copies of an iterable
        dataset (``iterable``), or transform and collate samples fetched here (``items``)."""

    @property
    def num_workers(self) -> int: ...

    @property
    def started(self) -> bool: ...

    @property
    def broken(self) -> bool:
        """A worker has died: the pool cannot serve another epoch."""

    def start(self) -> None: ...

    def start_by_fork_if_safe(self) -> bool: ...

    def close(self) -> None: ...

    def submit(self, worker_id: int, op: str, payload: Any, what: str) -> asyncio.Future[Any]:
        """Queue a task for ``worker_id`` (never blocks); the future resolves with its result or raises."""


class StateLedger(Protocol):
    """Where the worker stage reports each worker's dataset state (``aloader._worker_state.WorkerLedger``; a
    protocol, as the core sees nothing above it). Called on the pipeline's loop."""

    def initial(self, worker_id: int, state: Any) -> None:
        """The worker's state as the epoch starts, before its first batch."""

    def arrived(self, seq: int, worker_id: int, state: Any) -> None:
        """Unit ``seq`` came back from ``worker_id`` with ``state`` (None: not known, e.g. the batch raised)."""

    def handed_off(self, seq: int, outcome: object) -> None:
        """Unit ``seq``'s outcome went to the sink (in the order the consumer will take it), or was ``NO_BATCH``."""


# A sample that computes for at least this share of its time is CPU-bound. An I/O-bound one computes for a small share
# (the images bench's: 4.5 ms of 35); a CPU-bound one for most of it, less what other processes take of its core.
_CPU_BOUND: Final = 0.5


class Speed:
    """How fast a loader's sync samples and units have been: moving averages of seconds per call, in threads.

    The loader keeps one across its epochs, so an epoch starts with what the last one learnt (whole-batch calls,
    the fast lane) instead of learning it again from a call per sample.
    """

    __slots__ = ("computing", "per_sample", "per_unit")

    def __init__(self) -> None:
        self.per_sample: float | None = None
        self.per_unit: float | None = None
        # The fraction of a sample's time its thread spent on the CPU (the rest it waited: on storage, for the GIL,
        # for a core). None until a sample was fetched.
        self.computing: float | None = None

    def copy(self) -> Speed:
        speed = Speed()
        speed.per_sample, speed.per_unit, speed.computing = self.per_sample, self.per_unit, self.computing
        return speed

    def sample_took(self, seconds: float, computing: float | None = None) -> None:
        # A benign race: calls in threads update the average without a lock; any recent value is good enough.
        previous = self.per_sample
        self.per_sample = seconds if previous is None else 0.7 * previous + 0.3 * seconds
        if computing is not None:
            was = self.computing
            self.computing = computing if was is None else 0.7 * was + 0.3 * computing

    @property
    def cpu_bound(self) -> bool:
        """Samples spend most of their time computing: more calls at once would only take turns at the CPU."""
        return self.computing is not None and self.computing >= _CPU_BOUND

    def unit_took(self, seconds: float) -> None:
        previous = self.per_unit  # the same benign race
        self.per_unit = seconds if previous is None else 0.7 * previous + 0.3 * seconds


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one epoch needs, captured at ``iter(loader)`` time in the caller's thread."""

    kind: DatasetKind
    dataset: Any
    # map: an iterator (sync or async) of index lists (auto-collation) or of single indices; iterable kinds:
    # the dataset's own iterator.
    source: Iterator[Any] | AsyncIterator[Any]
    auto_collation: bool
    # Set when indices come one by one from an async sampler and we batch them (torch's BatchSampler cannot
    # iterate an async iterable): (batch_size, drop_last).
    batch_async_indices: tuple[int, bool] | None
    batch_size: int | None
    drop_last: bool
    collate_fn: Callable[[Any], Any]
    transform: Callable[[Any], Any] | None
    concurrency: int
    window: int  # units between dispatch and hand-off to the sink
    timeout: float
    in_order: bool
    pin_memory_device: str | None  # None: do not pin
    # num_workers > 0 and work for processes (see pool_kind): the pool, and whether this epoch owns it (closes it
    # at its end) or the loader does (persistent_workers).
    workers: Workers | None = None
    owns_workers: bool = False
    # max_failures: failing samples are skipped (see _failures) up to this count or share; None: torch's behaviour.
    max_failures: int | float | None = None
    # Failing samples become Skipped markers and batches Collated, without a budget here: a worker process's core,
    # whose batches the main process settles against the budget.
    skip_failures: bool = False
    progress: bool = False
    speed: Speed = field(default_factory=Speed)
    # The fast lane may be used (see lane.py): off in worker processes, whose units arrive one by one.
    lane: bool = True
    # Cores this process may keep busy (a worker: its share of the machine's): the fetch limit then adapts to the
    # CPU use (see limit.py). None: ``concurrency`` fetch calls from the start (the main process).
    cpu_share: float | None = None
    # Each worker's dataset state, recorded per batch (None: no worker or nothing to record), and the worker that
    # gets the epoch's first batch (a resumed epoch continues the uninterrupted run's turn).
    ledger: StateLedger | None = None
    first_worker: int = 0

    def indices(self, unit: Any) -> list[Any]:
        """The sample indices of a map-style unit: the sampler's list (auto-collation), else its single index."""
        return list(unit) if self.auto_collation else [unit]

    def size(self, unit: Any) -> int:
        """How many samples a map-style unit holds, without building the list."""
        return len(unit) if self.auto_collation else 1

    @property
    def skipping(self) -> bool:
        """Failing samples are skipped (as markers) rather than raised."""
        return self.max_failures is not None or self.skip_failures


def pool_kind(kind: DatasetKind, dataset: Any, transform: Any) -> PoolKind | None:
    """What the process pool does for a dataset, or None when it has nothing to do.

    A sync map-style dataset is fetched, transformed and collated in the workers, as in torch; each worker iterates
    its own copy of a sync iterable dataset. Async datasets fetch on the event loop (processes would only add a
    hop); their samples go to the workers for a sync ``transform`` (and collate), and with no transform there is no
    CPU work for processes, so no pool is started. Nor is one with an ``async def`` transform, which runs on the
    event loop of the main process.
    """
    if transform is not None and inspect.iscoroutinefunction(transform):
        return None  # an async transform runs on the event loop: everything stays in the main process
    if kind == "map":
        if MapAccess(dataset).is_sync:
            return "map"
    elif kind == "iterable":
        return "iterable"
    return "items" if transform is not None else None


def window_for(concurrency: int, batch_size: int | None) -> int:
    """Units in flight needed to keep ``concurrency`` samples fetching, plus one to overlap batch boundaries."""
    per_unit = batch_size if batch_size else 1
    return math.ceil(concurrency / per_unit) + 1
