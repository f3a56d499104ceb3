"""Small datasets shared by the tests: torch-style, async, iterable, and ones that fail on purpose."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import namedtuple
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

Point = namedtuple("Point", ["x", "y"])


class Rows(TensorDataset):
    """In memory, fetched sample by sample: a ``TensorDataset`` subclass, whose batches aloader does not gather in
    one op per tensor as it does an unchanged ``TensorDataset``'s (``aloader/_core/gather.py``)."""


class SquaresDataset(Dataset[Any]):
    """Map-style: sample i is a dict of tensors, a float, a string and a numpy array."""

    def __init__(self, n: int = 23) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return {
            "x": torch.tensor([i, i * i], dtype=torch.float32),
            "label": i % 3,
            "weight": i / 7,
            "name": f"s{i}",
            "arr": np.full((2,), i, dtype=np.int16),
            "point": Point(i, -i),
        }


class BatchedDataset(Dataset[Any]):
    """Defines __getitems__, which torch's DataLoader calls once per batch."""

    def __init__(self, n: int = 17) -> None:
        self.n = n
        self.getitems_calls = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return torch.tensor(i)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        self.getitems_calls += 1
        return [(torch.tensor(i), f"b{i}") for i in indices]


class AsyncSquares:
    """Map-style with async __getitem__: sample i equals SquaresDataset's sample i's tensor."""

    def __init__(self, n: int = 23) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, i: int) -> Any:
        await asyncio.sleep(0)  # yield to the loop, as real I/O would
        return torch.tensor([i, i * i], dtype=torch.float32)


class AsyncBatched:
    """Map-style with async __getitems__."""

    def __init__(self, n: int = 19) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, i: int) -> Any:
        raise AssertionError("__getitems__ should be used")

    async def __getitems__(self, indices: list[int]) -> list[Any]:
        await asyncio.sleep(0)
        return [torch.tensor(i) for i in indices]


class CountingIterable(IterableDataset[Any]):
    """Iterable-style: yields n dicts."""

    def __init__(self, n: int = 11) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        for i in range(self.n):
            yield {"i": torch.tensor(i), "sq": i * i}


class AsyncCounting:
    """An async iterable (``__aiter__``), not a torch dataset at all."""

    def __init__(self, n: int = 11) -> None:
        self.n = n

    async def __aiter__(self) -> AsyncIterator[Any]:
        for i in range(self.n):
            await asyncio.sleep(0)
            yield {"i": torch.tensor(i), "sq": i * i}


class FailingAt(Dataset[Any]):
    """Sample ``bad`` raises ``exc``; the others return their index."""

    def __init__(self, n: int, bad: int, exc: BaseException) -> None:
        self.n, self.bad, self.exc = n, bad, exc

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if i == self.bad:
            raise self.exc
        return torch.tensor(i)


class FailingSet(Dataset[Any]):
    """Samples whose indices are in ``bad`` raise ``error(f"bad sample {i}")``; the others return their index."""

    def __init__(self, n: int, bad: set[int], error: type[Exception] = ValueError) -> None:
        self.n, self.bad, self.error = n, bad, error

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if i in self.bad:
            raise self.error(f"bad sample {i}")
        return torch.tensor(i)


class Rendezvous:
    """Each caller blocks until ``parties`` callers are inside at once: proof of that much concurrency.

    No sleeps: the last arrival sets the event. The wait has a generous bound only so that a broken loader fails
    the test instead of hanging it.
    """

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.max_inside = 0
        self.inside = 0
        self.lock = threading.Lock()
        self.all_here = threading.Event()

    def arrive_and_wait(self) -> None:
        with self.lock:
            self.arrived += 1
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
            if self.arrived >= self.parties:
                self.all_here.set()
        try:
            if not self.all_here.wait(timeout=60):
                raise TimeoutError(f"only {self.arrived} of {self.parties} fetches were ever in flight together")
        finally:
            with self.lock:
                self.inside -= 1


class TurnsSlow(Dataset[int]):
    """Fast in-memory samples, then slow ones (a simulated storage wait); after the first slow batch, each slow
    sample also waits until ``parties`` of them are in flight at once."""

    def __init__(self, fast: int, slow: int, parties: int, batch_size: int) -> None:
        self.fast, self.slow, self.batch_size = fast, slow, batch_size
        self.rendezvous = Rendezvous(parties)

    def __len__(self) -> int:
        return self.fast + self.slow

    def __getitem__(self, i: int) -> int:
        if i >= self.fast:
            time.sleep(0.01)  # the storage wait that makes the unit slow (a workload, not synchronisation)
            if i >= self.fast + self.batch_size:
                self.rendezvous.arrive_and_wait()
        return i
