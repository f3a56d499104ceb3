"""Every kind of dataset and sampler aloader accepts, through both drivers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

import aloader
from tests.conftest import Driver, assert_same
from tests.datasets import AsyncBatched, AsyncCounting, AsyncSquares, BatchedDataset, CountingIterable


def expected_squares(indices: list[int]) -> torch.Tensor:
    return torch.tensor([[i, i * i] for i in indices], dtype=torch.float32)


@pytest.mark.parametrize("concurrency", [1, 5, 64])
def test_async_getitem(driver: Driver, concurrency: int) -> None:
    batches = driver.collect(aloader.DataLoader(AsyncSquares(23), batch_size=4, concurrency=concurrency))
    assert_same(batches, [expected_squares(list(range(i, min(i + 4, 23)))) for i in range(0, 23, 4)])


def test_async_getitem_shuffled_matches_torch_order(driver: Driver) -> None:
    order = list(
        torch.utils.data.DataLoader(range(23), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3))
    )
    loader = aloader.DataLoader(
        AsyncSquares(23), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    assert_same(driver.collect(loader), [expected_squares(batch.tolist()) for batch in order])


def test_async_getitems_called_once_per_batch(driver: Driver) -> None:
    batches = driver.collect(aloader.DataLoader(AsyncBatched(10), batch_size=4))
    assert_same(batches, [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]), torch.tensor([8, 9])])


def test_sync_getitems_called_once_per_batch(driver: Driver) -> None:
    dataset = BatchedDataset(10)
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=4))
    assert dataset.getitems_calls == 3
    assert_same(batches[2], [torch.tensor([8, 9]), ("b8", "b9")])


def test_subset_of_async_dataset(driver: Driver) -> None:
    subset = Subset(AsyncSquares(10), [9, 2, 4])
    assert_same(
        driver.collect(aloader.DataLoader(subset, batch_size=2)), [expected_squares([9, 2]), expected_squares([4])]
    )


def test_concat_of_async_datasets_awaits_what_getitem_returns(driver: Driver) -> None:
    dataset = ConcatDataset([AsyncSquares(3), AsyncSquares(2)])
    assert_same(driver.collect(aloader.DataLoader(dataset, batch_size=5)), [expected_squares([0, 1, 2, 0, 1])])


def test_async_iterable_dataset(driver: Driver) -> None:
    expected = list(torch.utils.data.DataLoader(CountingIterable(11), batch_size=4))
    assert_same(driver.collect(aloader.DataLoader(AsyncCounting(11), batch_size=4)), expected)
    expected = list(torch.utils.data.DataLoader(CountingIterable(11), batch_size=4, drop_last=True))
    assert_same(driver.collect(aloader.DataLoader(AsyncCounting(11), batch_size=4, drop_last=True)), expected)
    expected = list(torch.utils.data.DataLoader(CountingIterable(3), batch_size=None))
    assert_same(driver.collect(aloader.DataLoader(AsyncCounting(3), batch_size=None)), expected)


class AsyncIndexSampler:
    """An async iterable of indices: the async sampler coroutine."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    async def __aiter__(self) -> AsyncIterator[int]:
        for i in self.indices:
            await asyncio.sleep(0)
            yield i


class AsyncBatchSampler:
    async def __aiter__(self) -> AsyncIterator[list[int]]:
        for batch in ([4, 1], [0, 2, 3]):
            await asyncio.sleep(0)
            yield batch


def test_async_sampler(driver: Driver) -> None:
    dataset = TensorDataset(torch.arange(10) * 10)
    indices = [7, 3, 3, 0, 9]
    loader = aloader.DataLoader(dataset, batch_size=2, sampler=AsyncIndexSampler(indices))
    assert len(loader) == 3
    assert_same(driver.collect(loader), list(torch.utils.data.DataLoader(dataset, batch_size=2, sampler=indices)))
    loader = aloader.DataLoader(dataset, batch_size=2, drop_last=True, sampler=AsyncIndexSampler(indices))
    assert_same(
        driver.collect(loader),
        list(torch.utils.data.DataLoader(dataset, batch_size=2, drop_last=True, sampler=indices)),
    )
    loader = aloader.DataLoader(dataset, batch_size=None, sampler=AsyncIndexSampler(indices))
    assert_same(driver.collect(loader), list(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=indices)))


def test_async_batch_sampler(driver: Driver) -> None:
    dataset = TensorDataset(torch.arange(10) * 10)
    loader = aloader.DataLoader(dataset, batch_sampler=AsyncBatchSampler())
    expected = list(torch.utils.data.DataLoader(dataset, batch_sampler=[[4, 1], [0, 2, 3]]))
    assert_same(driver.collect(loader), expected)


def test_transform_runs_per_sample_before_collate(driver: Driver) -> None:
    dataset = TensorDataset(torch.arange(6))
    loader = aloader.DataLoader(dataset, batch_size=4, transform=lambda sample: sample[0] * 2)
    assert_same(driver.collect(loader), [torch.tensor([0, 2, 4, 6]), torch.tensor([8, 10])])


def test_transform_on_iterable_and_unbatched(driver: Driver) -> None:
    loader = aloader.DataLoader(CountingIterable(3), batch_size=None, transform=lambda s: s["sq"])
    assert driver.collect(loader) == [0, 1, 4]


def test_async_transform(driver: Driver) -> None:
    async def double(sample: Any) -> Any:
        await asyncio.sleep(0)
        return sample * 2

    loader = aloader.DataLoader(AsyncSquares(5), batch_size=2, transform=double)
    assert_same(
        driver.collect(loader), [2 * expected_squares([0, 1]), 2 * expected_squares([2, 3]), 2 * expected_squares([4])]
    )


class Computing(torch.utils.data.Dataset[int]):
    """CPU-bound samples: each computes for 3 ms of its thread's CPU time."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        started = time.thread_time()
        while time.thread_time() - started < 0.003:
            pass
        return i


async def times_ten(sample: int) -> int:
    return sample * 10


@pytest.mark.parametrize("num_workers", [0, 1])
def test_async_transform_with_cpu_bound_samples_one_call_at_a_time(driver: Driver, num_workers: int) -> None:
    """CPU-bound samples under one fetch call at a time make a first batch in the probe's call: an async transform
    still runs on the loop (it was called in that thread, and its coroutines were collated)."""
    loader = aloader.DataLoader(Computing(), batch_size=4, transform=times_ten, concurrency=1, num_workers=num_workers)
    assert_same(driver.collect(loader), [torch.tensor([0, 10, 20, 30]), torch.tensor([40, 50, 60, 70])])


def test_transform_runs_off_the_event_loop(driver: Driver) -> None:
    threads: set[str] = set()

    def record(sample: Any) -> Any:
        threads.add(threading.current_thread().name)
        return sample

    driver.collect(aloader.DataLoader(AsyncSquares(8), batch_size=4, transform=record))
    assert threads and all(name.startswith("aloader-") and "loop" not in name for name in threads)


def test_in_memory_tensor_dataset_large(driver: Driver) -> None:
    """Many batches of tiny samples: the adaptive fetch runs go whole-batch and results stay identical."""
    dataset = TensorDataset(torch.randn(5000, 8), torch.arange(5000))
    kwargs: dict[str, Any] = {"batch_size": 64, "shuffle": True}
    expected = list(torch.utils.data.DataLoader(dataset, generator=torch.Generator().manual_seed(1), **kwargs))
    got = driver.collect(aloader.DataLoader(dataset, generator=torch.Generator().manual_seed(1), **kwargs))
    assert_same(got, expected)


def test_pin_memory_without_accelerator_warns_and_skips(driver: Driver) -> None:
    class Batch:
        pinned = False

        def __init__(self, data: list[Any]) -> None:
            self.data = torch.stack([d[0] for d in data])

        def pin_memory(self) -> Batch:
            self.pinned = True
            return self

    dataset = TensorDataset(torch.arange(4))
    loader = aloader.DataLoader(dataset, batch_size=2, collate_fn=Batch, pin_memory=True)
    with pytest.warns(UserWarning, match="'pin_memory' argument is set as true but no accelerator is found"):
        batches = driver.collect(loader)
    assert [b.data.tolist() for b in batches] == [[0, 1], [2, 3]] and not any(b.pinned for b in batches)
