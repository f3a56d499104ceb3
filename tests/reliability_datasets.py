"""Datasets with bad samples for the failure-budget tests: module-level, so worker processes can unpickle them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset


def is_bad(i: int) -> bool:
    """The bad samples of every dataset here: 3, 10, 17, 24, ..."""
    return i % 7 == 3


class BadSamples(Dataset[Any]):
    """Sample i is ``tensor(i)``; the bad ones raise ``ValueError``."""

    def __init__(self, n: int = 30) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if is_bad(i):
            raise ValueError(f"corrupt sample {i}")
        return torch.tensor(i)


class BadSamplesBatched(BadSamples):
    """``__getitems__`` raises for a batch holding a bad sample; ``__getitem__`` only for the bad sample itself."""

    def __getitems__(self, indices: list[int]) -> list[Any]:
        if any(is_bad(i) for i in indices):
            raise ValueError(f"corrupt batch {indices}")
        return [torch.tensor(i) for i in indices]


class AsyncBadSamples:
    """As ``BadSamples`` with ``async def __getitem__``."""

    def __init__(self, n: int = 30) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, i: int) -> Any:
        await asyncio.sleep(0)
        if is_bad(i):
            raise ValueError(f"corrupt sample {i}")
        return torch.tensor(i)


class _BadItems:
    def __init__(self, n: int) -> None:
        self.i, self.n = 0, n

    def __iter__(self) -> _BadItems:
        return self

    def __next__(self) -> Any:
        i = self.i
        if i >= self.n:
            raise StopIteration
        self.i += 1
        if is_bad(i):
            raise ValueError(f"corrupt item {i}")
        return torch.tensor(i)


class BadItems(IterableDataset[Any]):
    """An iterable dataset whose iterator raises at the bad items and goes on after them (a class, not a generator,
    which would end at its first exception)."""

    def __init__(self, n: int = 30) -> None:
        self.n = n

    def __iter__(self) -> Iterator[Any]:
        return _BadItems(self.n)


class _AsyncBadItems:
    def __init__(self, n: int) -> None:
        self.i, self.n = 0, n

    def __aiter__(self) -> _AsyncBadItems:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0)
        i = self.i
        if i >= self.n:
            raise StopAsyncIteration
        self.i += 1
        if is_bad(i):
            raise ValueError(f"corrupt item {i}")
        return torch.tensor(i)


class AsyncBadItems:
    """As ``BadItems``, an async iterable."""

    def __init__(self, n: int = 30) -> None:
        self.n = n

    def __aiter__(self) -> AsyncIterator[Any]:
        return _AsyncBadItems(self.n)


def bad_transform(sample: Any) -> Any:
    """Fails for the bad samples: the fetch succeeds, the transform does not."""
    if is_bad(int(sample)):
        raise ValueError(f"cannot decode sample {int(sample)}")
    return sample * 10


async def async_bad_transform(sample: Any) -> Any:
    await asyncio.sleep(0)
    return bad_transform(sample)


class Unpicklable(Exception):
    """An exception that cannot cross from a worker process: its constructor needs two arguments."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)


class RaisesUnpicklable(Dataset[Any]):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> Any:
        if i == 2:
            raise Unpicklable(7, "bad header")
        return torch.tensor(i)


class Numbers(Dataset[Any]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return torch.tensor(i)
