"""The sync driver's first batches, made by its consumer before the loop starts (``aloader/_core/prelude.py``).

A loader whose units are known to be fast (an earlier epoch of it, or of another loader over the same dataset, has
measured them) lets a ``for`` consumer draw each unit and make its batch in ``next()``; the loop starts only when a
unit turns slow, the consumer turns away between batches, or the loop must finish a unit. Whatever makes the
batches, torch's batches, order and errors hold (both drivers: ``async for`` never makes a batch in the caller's
loop, and must give the same).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

import aloader
from aloader._core import prelude
from aloader._core.schedule import Scheduler
from tests.conftest import Driver, torch_outcomes
from tests.datasets import AsyncSquares, FailingSet, Rows, TurnsSlow


def _known_fast(loader: aloader.DataLoader) -> aloader.DataLoader:
    loader._speed.per_unit = 1e-6  # as an earlier epoch would have left it: fast units
    return loader


@pytest.fixture
def straight_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer counts as one that comes straight back for its batches, whatever its time between two
    ``next()`` calls on a loaded machine: the loop starts only for what the dataset does."""
    monkeypatch.setattr(prelude.Prelude, "idle_below", property(lambda self: float("inf")))


@pytest.fixture
def away(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer counts as one busy between batches from its second ``next()`` on."""
    monkeypatch.setattr(prelude.Prelude, "idle_below", property(lambda self: 0.0))


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before]


class _Where(FailingSet):
    """FailingSet that records the thread each sample is fetched in."""

    def __init__(self, n: int, bad: set[int]) -> None:
        super().__init__(n, bad)
        self.threads: set[str] = set()

    def __getitem__(self, i: int) -> Any:
        self.threads.add(threading.current_thread().name)
        return super().__getitem__(i)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 8, "shuffle": True},
        {"batch_size": 7, "shuffle": True, "drop_last": True},
        {"batch_size": None},
        {"batch_size": 4, "in_order": False},
    ],
    ids=["shuffle", "drop_last", "no-batching", "in_order-false"],
)
def test_torchs_batches_order_and_errors_with_no_thread(
    driver: Driver, straight_back: None, kwargs: dict[str, Any]
) -> None:
    """Two epochs (the second starts with the speed the first learnt): torch's outcomes, failures raised at their
    batch and iteration going on after them; with ``for``, every sample fetched in the consumer's thread and no
    thread of ours started in the second epoch."""
    dataset = _Where(300, {5, 77, 150})
    in_order = kwargs.pop("in_order", True)
    reference = torch.utils.data.DataLoader(dataset, generator=torch.Generator().manual_seed(5), **kwargs)
    ours = aloader.DataLoader(dataset, generator=torch.Generator().manual_seed(5), in_order=in_order, **kwargs)
    threads_seen: list[threading.Thread] = []  # new threads alive as each error was raised
    before: set[threading.Thread] = set()
    for epoch in range(2):
        expected = torch_outcomes(reference, ValueError)
        dataset.threads.clear()
        threads_seen.clear()
        before.clear()
        before.update(threading.enumerate())
        got = [
            (kind, value.tolist() if kind == "ok" else type(value))
            for kind, value in driver.outcomes(ours, on_error=lambda exc: threads_seen.extend(_new_threads(before)))
        ]
        if in_order:
            assert got == expected
        else:
            assert sorted(got, key=repr) == sorted(expected, key=repr)
        if epoch == 1 and not driver.is_async:
            assert dataset.threads == {threading.current_thread().name}
            assert threads_seen == []


def test_fast_units_start_no_pipeline_task(
    driver: Driver, straight_back: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Units known to be fast: the pipeline's scheduler never runs. With ``for`` the consumer makes every batch;
    with ``async for`` one thread of the lane's makes them all ahead of the pipeline (``prelude.Ahead``), never the
    caller's loop, and leaves when the epoch ends (autouse leak check)."""
    scheduled: list[object] = []
    run = Scheduler.run

    async def counted(self: Scheduler, back: Any = None) -> None:
        scheduled.append(back)
        await run(self, back)

    monkeypatch.setattr(Scheduler, "run", counted)
    dataset = _Where(300, {77})
    reference = torch_outcomes(torch.utils.data.DataLoader(dataset, batch_size=8), ValueError)
    loader = _known_fast(aloader.DataLoader(dataset, batch_size=8))
    dataset.threads.clear()
    got = [(kind, value.tolist() if kind == "ok" else type(value)) for kind, value in driver.outcomes(loader)]
    assert got == reference
    assert scheduled == []
    assert loader.stats().batches == len(reference)
    (maker,) = dataset.threads
    if driver.is_async:
        assert maker.startswith("aloader-lane")
    else:
        assert maker == threading.current_thread().name


def test_a_new_loader_over_the_same_dataset_starts_with_its_speed(driver: Driver, straight_back: None) -> None:
    """A validation loop that builds its loader each epoch: the new loader starts with what the last one over the
    same dataset (and units of the same size) learnt, so the consumer makes the batches from the first."""
    dataset = _Where(64, set())
    first = aloader.DataLoader(dataset, batch_size=4)
    assert [b.tolist() for b in driver.collect(first)] == [list(range(i, i + 4)) for i in range(0, 64, 4)]
    assert first._speed.per_unit is not None
    second = aloader.DataLoader(dataset, batch_size=4)
    other_size = aloader.DataLoader(dataset, batch_size=8)
    assert second._epoch_speed().per_unit is not None
    assert second._speed is not first._speed  # a copy: each loader learns on its own from there
    assert other_size._epoch_speed().per_unit is None  # a unit's time depends on its size
    dataset.threads.clear()
    if driver.is_async:
        got = [b.tolist() for b in driver.collect(second)]
    else:
        before, got = set(threading.enumerate()), []
        for batch in second:
            got.append(batch.tolist())
            assert _new_threads(before) == []  # no loop, no pool: the consumer makes every batch
        assert dataset.threads == {threading.current_thread().name}
    assert got == [list(range(i, i + 4)) for i in range(0, 64, 4)]


@dataclasses.dataclass
class _ByValue(Dataset[int]):
    """A dataclass dataset: compared by value, so not hashable (no speed is shared through it)."""

    n: int

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_a_dataset_that_cannot_be_hashed_still_loads(driver: Driver) -> None:
    for _ in range(2):
        loader = aloader.DataLoader(_ByValue(10), batch_size=3)
        assert [b.tolist() for b in driver.collect(loader)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_samples_turning_slow_start_the_loop_with_their_concurrency(driver: Driver, straight_back: None) -> None:
    """The consumer makes the fast batches; the first slow one starts the loop, which fetches the samples after it
    concurrently (the rendezvous needs 8 in flight at once: one after the other they would never get there)."""
    dataset = TurnsSlow(fast=64, slow=36, parties=8, batch_size=4)
    loader = _known_fast(aloader.DataLoader(dataset, batch_size=4, concurrency=16))
    got = [int(x) for b in driver.collect(loader) for x in b]
    assert got == list(range(100))
    assert dataset.rendezvous.max_inside >= 8


class _Signals(Dataset[int]):
    """Sets ``reached`` once sample ``target`` is fetched."""

    def __init__(self, n: int, target: int) -> None:
        self.n, self.target = n, target
        self.reached = threading.Event()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.target:
            self.reached.set()
        return i


def test_a_consumer_busy_between_batches_gets_the_loops_prefetch(driver: Driver, away: None) -> None:
    """Busy between batches (a training step), the consumer starts the loop, which makes the next batches while it
    holds the one it has (here the 2nd, made in the consumer; the 6th is made meanwhile)."""
    dataset = _Signals(400, target=5 * 4)
    loader = _known_fast(aloader.DataLoader(dataset, batch_size=4))
    if driver.is_async:

        async def consume() -> list[int]:
            import asyncio

            it = aiter(loader)
            taken = [await anext(it), await anext(it)]
            assert await asyncio.to_thread(dataset.reached.wait, 60), "nothing was made while the consumer was busy"
            await it.aclose()
            return [int(x) for b in taken for x in b]

        got = driver.run_async(consume)
    else:
        it = iter(loader)
        taken = [next(it), next(it)]
        assert dataset.reached.wait(timeout=60), "nothing was made while the consumer was busy"
        it.close()
        got = [int(x) for b in taken for x in b]
    assert got == list(range(8))


def test_awaitables_from_a_sync_getitem_start_the_loop(driver: Driver, straight_back: None) -> None:
    """A sync ``__getitem__`` that returns coroutines (``ConcatDataset`` over async datasets): the loop starts and
    finishes that unit, and the batches stay in order."""
    dataset = ConcatDataset([AsyncSquares(30), AsyncSquares(30)])  # type: ignore[list-item]
    loader = _known_fast(aloader.DataLoader(dataset, batch_size=4))
    got = [row for b in driver.collect(loader) for row in b.tolist()]
    assert got == [[i, i * i] for i in range(30)] * 2


class _FailingSampler:
    """A batch sampler that raises at batch ``fail_at``."""

    def __init__(self, n: int, batch_size: int, fail_at: int) -> None:
        self.n, self.batch_size, self.fail_at = n, batch_size, fail_at

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Any:
        for k in range(len(self)):
            if k == self.fail_at:
                raise ValueError(f"the sampler failed at batch {k}")
            yield list(range(k * self.batch_size, (k + 1) * self.batch_size))


def test_a_failing_sampler_ends_the_epoch_there(driver: Driver, straight_back: None) -> None:
    dataset = FailingSet(400, set())
    reference = torch_outcomes(
        torch.utils.data.DataLoader(dataset, batch_sampler=_FailingSampler(400, 4, 30)), ValueError
    )
    loader = _known_fast(aloader.DataLoader(dataset, batch_sampler=_FailingSampler(400, 4, 30)))
    outcomes = driver.outcomes(loader)
    got = [(kind, value.tolist() if kind == "ok" else type(value)) for kind, value in outcomes]
    assert got == reference
    assert got[-1] == ("err", ValueError)
    assert "in the sampler" in str(outcomes[-1][1])
    assert loader.stats().failed_batches == 1


def test_stats_count_the_consumers_batches(driver: Driver, straight_back: None) -> None:
    dataset = FailingSet(400, {17})
    loader = _known_fast(aloader.DataLoader(dataset, batch_size=4))
    assert len(driver.outcomes(loader)) == 100
    stats = loader.stats()
    assert (stats.batches, stats.failed_batches) == (100, 1)
    assert (stats.fetch.items, stats.fetch.failures) == (396, 1)
    assert not stats.running


def test_break_then_resume(driver: Driver, straight_back: None) -> None:
    """``break`` while the consumer makes the batches leaves nothing running (autouse leak check), and the state
    taken there resumes with the rest of the epoch, as torch's order has it."""
    dataset = Rows(torch.arange(200))
    expected = [
        b[0].tolist()
        for b in torch.utils.data.DataLoader(
            dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(9)
        )
    ]
    loader = _known_fast(
        aloader.DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(9))
    )
    head = [b[0].tolist() for b in driver.collect(loader, limit=5)]
    state = loader.state_dict()
    assert head == expected[:5]
    resumed = aloader.DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(9))
    resumed.load_state_dict(state)
    assert [b[0].tolist() for b in driver.collect(resumed)] == expected[5:]


def test_a_tensor_dataset_is_gathered_by_the_consumer_from_its_first_batch(driver: Driver, straight_back: None) -> None:
    """An unchanged ``TensorDataset`` is in memory by construction: a new loader over it (speed unknown) has its
    batches gathered (one op per tensor) in the consumer's thread from the first, with no thread started."""
    dataset = TensorDataset(torch.arange(100).reshape(50, 2), torch.arange(50))
    reference = [[t.tolist() for t in b] for b in torch.utils.data.DataLoader(dataset, batch_size=6)]
    loader = aloader.DataLoader(dataset, batch_size=6)
    assert loader._speed.per_unit is None
    if driver.is_async:
        got = [[t.tolist() for t in b] for b in driver.collect(loader)]
    else:
        before, got = set(threading.enumerate()), []
        for batch in loader:
            got.append([t.tolist() for t in batch])
            assert _new_threads(before) == []
    assert got == reference
