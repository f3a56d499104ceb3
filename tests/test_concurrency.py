"""Concurrency is real, prefetching is bounded, and the caller's loop is never blocked.

No test here synchronises by sleeping or asserts on timing: each proves a property by construction (a fetch that
can only complete once N fetches are in flight together; a counter that can only stay low if the bound holds).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

import aloader
from aloader._core import lane, prelude
from tests.conftest import Driver
from tests.datasets import Rendezvous


class SyncRendezvous(Dataset[Any]):
    def __init__(self, n: int, parties: int) -> None:
        self.n = n
        self.rendezvous = Rendezvous(parties)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        self.rendezvous.arrive_and_wait()
        return i


class AsyncRendezvous:
    """Async __getitem__ whose calls each wait until ``parties`` calls are in flight together."""

    def __init__(self, n: int, parties: int) -> None:
        self.n, self.parties = n, parties
        self.inside = 0
        self.max_inside = 0
        self.event: asyncio.Event | None = None

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, i: int) -> Any:
        if self.event is None:
            self.event = asyncio.Event()
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)
        if self.inside >= self.parties:
            self.event.set()
        try:
            async with asyncio.timeout(60):  # a bound so a broken loader fails instead of hanging
                await self.event.wait()
        finally:
            self.inside -= 1
        return i


@pytest.mark.parametrize("batch_size", [1, 8, 32])
def test_sync_dataset_fetches_concurrently_in_threads(driver: Driver, batch_size: int) -> None:
    dataset = SyncRendezvous(32, parties=32)
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=batch_size, concurrency=32))
    assert torch.cat([torch.atleast_1d(b) for b in batches]).tolist() == list(range(32))
    assert dataset.rendezvous.max_inside == 32


class FastThenWaiting(Dataset[int]):
    """Samples before ``fast`` return at once; the others wait until ``parties`` of them are in flight together."""

    def __init__(self, n: int, fast: int, parties: int) -> None:
        self.n, self.fast = n, fast
        self.rendezvous = Rendezvous(parties)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i >= self.fast:
            self.rendezvous.arrive_and_wait()
        return i


@pytest.mark.parametrize("fast", [1, 2, 4, 7])
def test_a_first_batch_whose_samples_turn_slow_still_gets_its_concurrency(driver: Driver, fast: int) -> None:
    """A new loader's first batch: the probe's call goes on past a fast first sample while samples stay fast; one
    that then blocks holds up only its own chunk of the call, and the loop fetches the rest concurrently (the
    rendezvous needs 8 of them in flight at once: one call, a sample after the other, could never reach it)."""
    dataset = FastThenWaiting(24, fast=fast, parties=8)
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=24, concurrency=24))
    assert [b.tolist() for b in batches] == [list(range(24))]
    assert dataset.rendezvous.max_inside >= 8


@pytest.mark.parametrize("batch_size", [1, 8, 32])
def test_async_dataset_fetches_concurrently_as_tasks(driver: Driver, batch_size: int) -> None:
    dataset = AsyncRendezvous(32, parties=32)
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=batch_size, concurrency=32))
    assert torch.cat([torch.atleast_1d(b) for b in batches]).tolist() == list(range(32))
    assert dataset.max_inside == 32


def test_concurrency_is_an_upper_bound(driver: Driver) -> None:
    class Counting:
        def __init__(self) -> None:
            self.inside = 0
            self.max_inside = 0

        def __len__(self) -> int:
            return 200

        async def __getitem__(self, i: int) -> int:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            self.inside -= 1
            return i

    dataset = Counting()
    driver.collect(aloader.DataLoader(dataset, batch_size=10, concurrency=7))
    assert 1 <= dataset.max_inside <= 7


def _hold_one_batch_and_check_bound(driver: Driver, loader: aloader.DataLoader, bound: int, fetched: list[int]) -> None:
    """Take one batch, wait until sample ``bound - 1`` was fetched, stop: exactly samples ``0..bound-1`` were."""
    reached = threading.Event()
    loader.dataset.on_fetch = lambda i: reached.set() if i == bound - 1 else None  # type: ignore[attr-defined]
    if driver.is_async:

        async def consume() -> None:
            it = aiter(loader)
            await anext(it)
            assert await asyncio.to_thread(reached.wait, 60), "the pipeline stopped prefetching below its bound"
            await it.aclose()

        driver.run_async(consume)
    else:
        it = iter(loader)
        next(it)
        assert reached.wait(timeout=60), "the pipeline stopped prefetching below its bound"
        it.close()
    assert sorted(fetched) == list(range(bound)), f"fetched {len(fetched)} samples, bound {bound}"


class _Counted(Dataset[Any]):
    def __init__(self) -> None:
        self.fetched: list[int] = []
        self.lock = threading.Lock()
        self.on_fetch: Any = None

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int) -> int:
        with self.lock:
            self.fetched.append(i)
        self.on_fetch(i)
        return i


class _AsyncCounted(_Counted):
    async def __getitem__(self, i: int) -> int:  # type: ignore[override]
        return super().__getitem__(i)


def test_prefetch_is_bounded_while_the_consumer_waits(driver: Driver) -> None:
    """With the consumer holding one batch, the pipeline prefetches exactly up to its bound and no further.

    The bound is the reorder window (concurrency / batch_size + 1 batches), the prefetch depth (2 batches) and the
    batch the consumer holds. The test waits until the last sample within the bound has been fetched (so the
    bound is tight), then closes the iterator and checks that nothing beyond it was fetched. (An async dataset:
    fast sync ones take the fast lane, whose bound is the next test's.)
    """
    concurrency, batch_size = 8, 4
    dataset = _AsyncCounted()
    loader = aloader.DataLoader(dataset, batch_size=batch_size, concurrency=concurrency)
    _hold_one_batch_and_check_bound(
        driver, loader, (concurrency // batch_size + 1 + 2 + 1) * batch_size, dataset.fetched
    )


def test_fast_lane_prefetch_is_bounded(driver: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast sync batches are made k at a time (the fast lane) with the window widened to 2k: still a fixed bound.
    With the lane's widest k (units known to be very fast), the pipeline stops at 2k batches: two runs of k made
    (two lane calls with ``for``, the lane's thread holding the source with ``async for``), handed to the consumer
    as runs that hold their window slots until yielded whole, the first of which the consumer has begun. With
    ``for``, the consumer waiting for its first batch makes that one itself, alone (``ThreadChannel.hand_source``),
    and holds it outside the window: 2k + 1 batches, as the bound of the test above counts the consumer's batch.
    (The loop from the first batch: the consumer making them before the loop starts is test_prelude.py's.)"""
    monkeypatch.setattr(prelude.Prelude, "applies", staticmethod(lambda ctx, lane: False))
    # k: a lane call's units with for; a run's of the lane's thread holding the source with async for
    batch_size, k = 4, (lane._HELD_UNITS if driver.is_async else lane.LANE_UNITS)
    # A run's units follow the measured speed (about 12 ms of work): on a loaded machine these units may measure
    # slow enough for shorter runs, and a lower bound. The bound with runs at their widest is what this checks.
    monkeypatch.setattr(lane, "_HELD_SECONDS", 60.0)
    dataset = _Counted()
    loader = aloader.DataLoader(dataset, batch_size=batch_size)
    loader._speed.per_unit = 1e-6  # as learnt in an earlier epoch: the lane from the first batch, k at its widest
    held = 0 if driver.is_async else 1
    _hold_one_batch_and_check_bound(driver, loader, (2 * k + held) * batch_size, dataset.fetched)


def test_in_order_false_yields_batches_as_they_complete(driver: Driver) -> None:
    """Sample 0 blocks until the consumer has received a batch: only out-of-order delivery can get there."""
    released = threading.Event()

    class FirstWaits(Dataset[Any]):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> int:
            if i == 0 and not released.wait(timeout=60):
                raise TimeoutError("the consumer never received a batch while sample 0 waited")
            return i

    loader = aloader.DataLoader(FirstWaits(), batch_size=2, in_order=False, concurrency=4)
    order: list[int] = []
    if driver.is_async:

        async def consume() -> None:
            async for batch in loader:
                order.append(int(batch[0]))
                released.set()

        driver.run_async(consume)
    else:
        for batch in loader:
            order.append(int(batch[0]))
            released.set()
    assert order[0] != 0 and sorted(order) == [0, 2, 4, 6]


def test_in_order_true_keeps_order_while_a_slow_sample_waits(driver: Driver) -> None:
    """Sample 0 completes only after samples 2..7 have been fetched; batches still come out in sampler order."""
    others = Rendezvous(6)

    class FirstIsLast(Dataset[Any]):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> int:
            if i == 0:
                if not others.all_here.wait(timeout=60):
                    raise TimeoutError("later samples were not fetched while sample 0 waited")
            elif i >= 2:
                with others.lock:
                    others.arrived += 1
                    if others.arrived >= others.parties:
                        others.all_here.set()
            return i

    loader = aloader.DataLoader(FirstIsLast(), batch_size=2, concurrency=8)
    assert [b.tolist() for b in driver.collect(loader)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_the_callers_loop_is_never_blocked() -> None:
    """Sync fetches wait for an event that only a coroutine on the caller's loop sets: a blocked loop deadlocks."""
    ticks = 0

    async def main() -> None:
        nonlocal ticks
        loop_ran = threading.Event()

        class NeedsTheLoop(Dataset[Any]):
            def __len__(self) -> int:
                return 6

            def __getitem__(self, i: int) -> int:
                if not loop_ran.wait(timeout=60):
                    raise TimeoutError("the event loop was blocked while fetching")
                return i

        async def ticker() -> None:
            nonlocal ticks
            ticks += 1
            loop_ran.set()

        tick = asyncio.get_running_loop().create_task(ticker())
        got = [int(b) async for b in aloader.DataLoader(NeedsTheLoop(), batch_size=None)]
        await tick
        assert got == list(range(6))

    asyncio.run(main())
    assert ticks == 1


def test_several_loaders_at_once_in_one_loop() -> None:
    async def drain(loader: aloader.DataLoader) -> list[int]:
        return [int(b) async for b in loader]

    async def main() -> list[list[int]]:
        # Each needs all its 8 fetches in flight together, and all three run at once.
        loaders = [aloader.DataLoader(AsyncRendezvous(8, 8), batch_size=None, concurrency=8) for _ in range(3)]
        return list(await asyncio.gather(*(drain(loader) for loader in loaders)))

    assert asyncio.run(main()) == [list(range(8))] * 3


def test_works_under_anyio() -> None:
    anyio = pytest.importorskip("anyio")

    async def main() -> list[int]:
        out: list[int] = []
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                async for batch in aloader.DataLoader(AsyncRendezvous(6, 6), batch_size=3, concurrency=6):
                    out.extend(batch.tolist())

            tg.start_soon(consume)
        return out

    assert anyio.run(main, backend="asyncio") == list(range(6))
