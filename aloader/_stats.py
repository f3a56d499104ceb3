"""The counters behind ``loader.stats()`` and the ``progress=True`` bar.

One :class:`Recorder` per pipeline. Fetch runs in pool threads and everything else on the event loop, so updates
take a lock; they are made once per thread call or batch (never per sample on the fast path: a run of samples is
recorded as one call with its item count), which keeps the cost far below the work measured. Percentiles come from
a log-scale histogram of fixed size, so memory does not grow with the epoch.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Final, Literal

from tqdm import tqdm

from aloader.stats import LoaderStats, QueueStats, StageStats

__all__ = ["Recorder", "Stage", "open_progress"]

Stage = Literal["sampler", "fetch", "transform", "collate"]
_STAGES: Final[tuple[Stage, ...]] = ("sampler", "fetch", "transform", "collate")

_PER_OCTAVE: Final = 8  # histogram buckets per doubling: bucket bounds within 9% of each other
_FLOOR: Final = 1e-7  # seconds of the first bucket; faster items count there
_BUCKETS: Final = 40 * _PER_OCTAVE  # 1e-7 s .. ~1e5 s
_LAST: Final = _BUCKETS - 1


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.total = 0

    def add(self, seconds: float, weight: int) -> None:
        scaled = seconds / _FLOOR
        self.counts[0 if scaled <= 1.0 else min(_LAST, int(math.log2(scaled) * _PER_OCTAVE))] += weight
        self.total += weight

    def quantile(self, q: float) -> float | None:
        if self.total == 0:
            return None
        rank = q * self.total
        seen = 0
        for bucket, count in enumerate(self.counts):
            seen += count
            if count and seen >= rank:
                # The geometric middle of the bucket.
                return _FLOOR * 2 ** ((bucket + 0.5) / _PER_OCTAVE)
        return None  # pragma: no cover - seen reaches total


class _StageCounters:
    __slots__ = ("blocked", "busy", "failures", "histogram", "items")

    def __init__(self) -> None:
        self.items = 0
        self.failures = 0
        self.busy = 0.0
        self.blocked = 0.0
        self.histogram = _Histogram()


class Recorder:
    """Counters of one pipeline; ``snapshot()`` turns them into an immutable :class:`LoaderStats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stages = {name: _StageCounters() for name in _STAGES}
        self._started: float | None = None
        self._ended: float | None = None
        self._capacity = 0
        self._batches = 0
        self._ready = _Histogram()  # seconds until each next batch was ready
        self._queue_blocked = 0.0
        self._occupancy = 0
        self._occupancy_sum = 0
        self._skipped = 0
        self._failed_batches = 0

    def start(self, capacity: int) -> None:
        """The pipeline started; ``capacity`` is its queue's (the prefetch depth)."""
        self._capacity = capacity
        if self._started is None:
            self._started = time.perf_counter()

    def resized(self, capacity: int) -> None:
        """The queue's capacity changed (the fast lane widens it)."""
        self._capacity = capacity

    def end(self) -> None:
        if self._ended is None:
            self._ended = time.perf_counter()

    def add(self, stage: Stage, items: int, seconds: float) -> None:
        """``items`` went through ``stage`` in one call of ``seconds``."""
        if items <= 0:
            return
        with self._lock:
            counters = self._stages[stage]
            counters.items += items
            counters.busy += seconds
            counters.histogram.add(seconds / items, items)

    def add_all(self, entries: list[tuple[Stage, int, float]]) -> None:
        """Several ``add`` calls under one acquisition of the lock (a lane call's batches)."""
        with self._lock:
            self._add_entries(entries)

    def _add_entries(self, entries: list[tuple[Stage, int, float]]) -> None:
        stages = self._stages
        for stage, items, seconds in entries:
            if items > 0:
                counters = stages[stage]
                counters.items += items
                counters.busy += seconds
                counters.histogram.add(seconds / items, items)

    def made_with_source(self, entries: list[tuple[Stage, int, float]], failed: list[bool]) -> None:
        """Batches drawn and made by whoever held the source (the sync driver's consumer, or the lane's thread for
        ``async for``; see ``lane.py``), which never waited in the queue: their stage times, and the batches (is
        each a failure), under one acquisition of the lock."""
        with self._lock:
            self._add_entries(entries)
            self._delivered(failed)

    def blocked(self, stage: Stage, seconds: float) -> None:
        with self._lock:
            self._stages[stage].blocked += seconds

    def failure(self, stage: Stage, skipped: bool = False) -> None:
        with self._lock:
            self._stages[stage].failures += 1
            if skipped:
                self._skipped += 1

    def handed_off(self, failed: bool, ready_seconds: float, blocked_seconds: float, occupancy: int) -> None:
        """One batch (or a failure in its place) reached the consumer's queue."""
        with self._lock:
            self._batches += 1
            if failed:
                self._failed_batches += 1
            self._ready.add(ready_seconds, 1)
            self._queue_blocked += blocked_seconds
            self._occupancy = occupancy
            self._occupancy_sum += occupancy

    def handed_off_many(self, failed: list[bool], occupancy: int) -> None:
        """Batches handed off together the moment they were ready (no wait for them, no wait for room)."""
        with self._lock:
            for i, one in enumerate(failed):
                self._batches += 1
                self._failed_batches += one
                self._ready.add(0.0, 1)
                self._occupancy_sum += occupancy - (len(failed) - 1 - i)  # the queue as each one joined it
            self._occupancy = occupancy

    def delivered(self, failed: list[bool]) -> None:
        """Batches the consumer made and yielded itself (the sync driver's fast lane): they never waited in the
        queue, which was empty for them."""
        with self._lock:
            self._delivered(failed)

    def _delivered(self, failed: list[bool]) -> None:
        """Under the lock: batches made outside the queue (is each a failure); they never waited in it."""
        made = len(failed)
        self._batches += made
        self._failed_batches += sum(failed)
        self._ready.add(0.0, made)

    def snapshot(self) -> LoaderStats:
        with self._lock:
            now = time.perf_counter()
            started = self._started if self._started is not None else now
            ended = self._ended if self._ended is not None else now
            elapsed = max(0.0, ended - started)

            def rate(items: int) -> float:
                return items / elapsed if elapsed > 0 else 0.0

            stages = {
                name: StageStats(
                    name=name,
                    items=c.items,
                    failures=c.failures,
                    rate=rate(c.items),
                    busy_seconds=c.busy,
                    p50=c.histogram.quantile(0.5),
                    p99=c.histogram.quantile(0.99),
                    blocked_seconds=c.blocked,
                )
                for name, c in self._stages.items()
            }
            queue = QueueStats(
                items=self._batches,
                rate=rate(self._batches),
                p50=self._ready.quantile(0.5),
                p99=self._ready.quantile(0.99),
                blocked_seconds=self._queue_blocked,
                capacity=self._capacity,
                occupancy=self._occupancy,
                mean_occupancy=self._occupancy_sum / self._batches if self._batches else 0.0,
            )
            return LoaderStats(
                elapsed=elapsed,
                running=self._started is not None and self._ended is None,
                batches=self._batches,
                skipped=self._skipped,
                failed_batches=self._failed_batches,
                sampler=stages["sampler"],
                fetch=stages["fetch"],
                transform=stages["transform"],
                collate=stages["collate"],
                queue=queue,
            )


class _Bar(tqdm):  # type: ignore[misc]
    # tqdm's monitor is a thread that outlives every bar; a loader must leave no thread behind.
    monitor_interval = 0


def open_progress(total: int | None) -> Any:
    """A tqdm bar over batches (``total`` from ``len(loader)`` when known), written to stderr."""
    return _Bar(total=total, unit="batch", desc="aloader", dynamic_ncols=True, leave=True)
