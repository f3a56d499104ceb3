"""What ``loader.stats()`` returns: immutable snapshots of where an epoch's time goes, stage by stage.

A snapshot is taken of the loader's current iterator (or of its last one once it has ended), so it is useful both
while iterating and after. Stages follow the data path::

    sampler -> fetch -> transform -> collate -> queue (finished batches waiting for the consumer)

Latencies are seconds per item; percentiles come from a fixed-size log-scale histogram (8 buckets per doubling, so
within about 9% of the exact value), so memory stays the same however long the epoch runs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LoaderStats", "QueueStats", "StageStats"]


@dataclass(frozen=True, slots=True)
class StageStats:
    """One stage of the pipeline.

    ``items``: samples through the stage (index lists count their indices; for the sampler, indices drawn).
    ``failures``: samples that raised in it (skipped or not). ``rate``: items per second of the iterator's life.
    ``busy_seconds``: the time spent in the stage's calls. ``p50``/``p99``: seconds per item, None before the first.
    ``blocked_seconds``: time the stage waited for room: the sampler for the reorder window, fetch for a free
    ``concurrency`` slot; transform and collate run as soon as their samples are there (always 0).
    """

    name: str
    items: int
    failures: int
    rate: float
    busy_seconds: float
    p50: float | None
    p99: float | None
    blocked_seconds: float


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The queue of finished batches between the pipeline and the consumer (its capacity is the prefetch depth).

    ``items``: batches handed to the consumer; ``rate``: batches per second. ``p50``/``p99``: seconds the pipeline
    took to have each next batch ready. ``blocked_seconds``: time the pipeline waited because the queue was full
    (the consumer is the bottleneck when this grows). ``occupancy``: batches waiting after the last hand-off;
    ``mean_occupancy``: its average over hand-offs (near ``capacity``: the loader keeps ahead of the consumer).
    """

    items: int
    rate: float
    p50: float | None
    p99: float | None
    blocked_seconds: float
    capacity: int
    occupancy: int
    mean_occupancy: float


@dataclass(frozen=True, slots=True)
class LoaderStats:
    """A snapshot of one iterator. ``running``: its pipeline is still producing (False once it has queued its last
    batch, even if the consumer has not taken it yet, or once the iterator was closed).

    ``skipped``: samples skipped under ``max_failures``; ``failed_batches``: batches that raised in the consumer.
    With ``num_workers > 0`` a sync map-style dataset is fetched, transformed and collated inside the workers: the
    ``fetch`` stage then times each batch's whole round trip, and ``transform``/``collate`` count nothing.
    """

    elapsed: float
    running: bool
    batches: int
    skipped: int
    failed_batches: int
    sampler: StageStats
    fetch: StageStats
    transform: StageStats
    collate: StageStats
    queue: QueueStats

    @property
    def stages(self) -> tuple[StageStats, ...]:
        """The per-sample stages in data-path order."""
        return (self.sampler, self.fetch, self.transform, self.collate)

    def __str__(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1e3:.3f}"

        lines = [
            f"{'stage':<10}{'items':>10}{'failures':>10}{'rate/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'blocked s':>11}"
        ]
        for stage in self.stages:
            lines.append(
                f"{stage.name:<10}{stage.items:>10}{stage.failures:>10}{stage.rate:>12.1f}{ms(stage.p50):>10}"
                f"{ms(stage.p99):>10}{stage.blocked_seconds:>11.3f}"
            )
        q = self.queue
        lines.append(
            f"{'queue':<10}{q.items:>10}{'':>10}{q.rate:>12.1f}{ms(q.p50):>10}{ms(q.p99):>10}{q.blocked_seconds:>11.3f}"
            f"  occupancy {q.occupancy}/{q.capacity} (mean {q.mean_occupancy:.2f})"
        )
        state = "running" if self.running else "ended"
        lines.append(
            f"{self.batches} batches in {self.elapsed:.2f} s ({state}); {self.skipped} samples skipped, "
            f"{self.failed_batches} batches failed"
        )
        return "\n".join(lines)
