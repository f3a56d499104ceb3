"""``loader.stats()``: immutable per-stage snapshots, while iterating and after; ``progress=True``."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

import aloader
import aloader.stats
from aloader._stats import _Histogram
from tests.conftest import Driver
from tests.datasets import CountingIterable, FailingAt
from tests.reliability_datasets import AsyncBadSamples, Numbers


def test_before_the_first_iterator_everything_is_zero() -> None:
    stats = aloader.DataLoader(Numbers(4)).stats()
    assert not stats.running and stats.batches == 0
    assert all(stage.items == 0 and stage.p50 is None for stage in stats.stages)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_counts_per_stage_after_an_epoch(driver: Driver, num_workers: int) -> None:
    loader = aloader.DataLoader(Numbers(50), batch_size=8, transform=lambda x: x + 1, num_workers=0)
    if num_workers:
        loader = aloader.DataLoader(Numbers(50), batch_size=8, num_workers=num_workers)
    batches = driver.collect(loader)
    stats = loader.stats()
    assert not stats.running and stats.batches == len(batches) == 7
    assert [stage.name for stage in stats.stages] == ["sampler", "fetch", "transform", "collate"]
    assert stats.sampler.items == 50 and stats.fetch.items == 50
    if num_workers == 0:  # with workers, fetch, transform and collate happen together in the worker
        assert stats.transform.items == 50 and stats.collate.items == 50
    for stage in (stats.sampler, stats.fetch, stats.queue):
        assert stage.rate > 0
        assert stage.p50 is not None and stage.p99 is not None and 0 <= stage.p50 <= stage.p99
    assert stats.queue.items == 7
    if num_workers:
        assert stats.queue.capacity == 2 * num_workers  # prefetch_factor * num_workers, as torch
    else:  # the prefetch depth, or wider once the fast lane makes several of these tiny batches per call
        assert stats.queue.capacity >= 2
    assert 0 <= stats.queue.mean_occupancy <= stats.queue.capacity
    assert stats.skipped == 0 and stats.failed_batches == 0


def test_snapshot_while_iterating_is_immutable_and_running(driver: Driver) -> None:
    loader = aloader.DataLoader(Numbers(40), batch_size=4)
    seen: list[aloader.LoaderStats] = []

    def consume_some() -> None:
        seen.append(loader.stats())

    if driver.is_async:

        async def consume() -> None:
            async for _ in loader:
                consume_some()

        driver.run_async(consume)
    else:
        for _ in loader:
            consume_some()
    # The pipeline runs while batches are left to hand over (the queue holds 2 of the 10 at most).
    assert seen[0].running and not loader.stats().running
    assert [s.batches for s in seen] == sorted(s.batches for s in seen)  # grows as the epoch goes on
    assert seen[-1].batches >= 1 and loader.stats().batches == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen[0].batches = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen[0].fetch.items = 0  # type: ignore[misc]


def test_a_new_iterator_starts_new_counts(driver: Driver) -> None:
    loader = aloader.DataLoader(Numbers(12), batch_size=4)
    driver.collect(loader)
    driver.collect(loader, limit=1)
    assert 1 <= loader.stats().batches <= 3
    assert not loader.stats().running  # break closed it


def test_failures_without_a_budget_are_counted(driver: Driver) -> None:
    loader = aloader.DataLoader(FailingAt(10, bad=5, exc=ValueError("x")), batch_size=4)
    assert [kind for kind, _ in driver.outcomes(loader)] == ["ok", "err", "ok"]
    stats = loader.stats()
    assert stats.fetch.failures == 1 and stats.failed_batches == 1 and stats.skipped == 0


def test_async_dataset_and_iterable_dataset_count_fetches(driver: Driver) -> None:
    loader = aloader.DataLoader(AsyncBadSamples(30), batch_size=5, max_failures=4)
    driver.collect(loader)
    assert loader.stats().fetch.items == 26 and loader.stats().fetch.failures == 4  # 3, 10, 17, 24 failed
    iterable = aloader.DataLoader(CountingIterable(11), batch_size=4)
    driver.collect(iterable)
    assert iterable.stats().fetch.items == 11 and iterable.stats().batches == 3


def test_str_is_a_table() -> None:
    loader = aloader.DataLoader(Numbers(8), batch_size=4)
    list(loader)
    text = str(loader.stats())
    for word in ("sampler", "fetch", "transform", "collate", "queue", "2 batches"):
        assert word in text


def test_percentiles_within_a_bucket_and_memory_fixed() -> None:
    histogram = _Histogram()
    rng = random.Random(0)
    values = sorted(rng.uniform(1e-4, 1e-2) for _ in range(100_000))
    for value in values:
        histogram.add(value, 1)
    assert len(histogram.counts) == len(_Histogram().counts)  # fixed size whatever was added
    for q in (0.5, 0.99):
        exact = values[int(q * len(values)) - 1]
        got = histogram.quantile(q)
        assert got is not None and abs(got - exact) / exact < 0.1


def test_public_names() -> None:
    for name in aloader.stats.__all__:
        assert getattr(aloader.stats, name).__module__ == "aloader.stats"
    assert aloader.LoaderStats is aloader.stats.LoaderStats


# ------------------------------------------------------------------------------------------------ progress
def test_progress_bar_counts_batches_to_len(driver: Driver, capsys: Any) -> None:
    loader = aloader.DataLoader(Numbers(20), batch_size=4, progress=True)
    assert len(driver.collect(loader)) == 5
    err = capsys.readouterr().err
    assert "aloader" in err and "5/5" in err


def test_progress_bar_without_a_length(driver: Driver, capsys: Any) -> None:
    class NoLen(CountingIterable):
        __len__ = None  # type: ignore[assignment]

    loader = aloader.DataLoader(NoLen(9), batch_size=4, progress=True)
    assert len(driver.collect(loader)) == 3
    err = capsys.readouterr().err
    assert "3batch" in err.replace(" ", "") and "/" not in err.split("aloader")[-1].split("[")[0]


def test_progress_bar_closes_on_break(driver: Driver, capsys: Any) -> None:
    loader = aloader.DataLoader(Numbers(40), batch_size=4, progress=True)
    assert len(driver.collect(loader, limit=2)) == 2
    assert "2/10" in capsys.readouterr().err


def test_fetch_blocked_time_counts_waits_for_a_concurrency_slot(driver: Driver) -> None:
    # One slot for four samples per batch: the others wait for it (each fetch yields to the loop while holding it).
    loader = aloader.DataLoader(AsyncBadSamples(12), batch_size=4, concurrency=1, max_failures=2)
    driver.collect(loader)
    stats = loader.stats()
    assert stats.fetch.blocked_seconds > 0
    assert stats.transform.blocked_seconds == 0 and stats.collate.blocked_seconds == 0
