"""The systems of ``aloader bench`` over single objects (one object per sample): an unchanged torch Dataset with
a blocking read per sample, aloader's ``ObjectDataset``, the ceiling (bare reads, no loader) and SPDL's pipeline.

Every sample is timed inside the dataset, by the same wrapper for every system: that is the sample latency.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import torch.utils.data

from aloader import storage
from aloader.bench.config import BenchConfig
from aloader.bench.samples import Datasets, collate, decode_array, read_blocking
from aloader.datasets import ObjectDataset

__all__ = ["BareReads", "BlockingObjects", "TimedObjects", "object_datasets"]


class BlockingObjects(torch.utils.data.Dataset[dict[str, Any]]):
    """An unchanged torch Dataset: a blocking GET in ``__getitem__``, timed."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, index: int) -> dict[str, Any]:
        started = time.perf_counter()
        data = decode_array(read_blocking(self.urls[index]))
        return {"data": data, "latency": time.perf_counter() - started}


class TimedObjects:
    """aloader's bucket dataset (``ObjectDataset``, ``async def __getitem__``), each sample timed."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.objects = ObjectDataset(urls, decode=decode_array)

    def __len__(self) -> int:
        return len(self.objects)

    async def __getitem__(self, index: int) -> dict[str, Any]:
        started = time.perf_counter()
        data = await self.objects[index]
        return {"data": data, "latency": time.perf_counter() - started}


class BareReads:
    """The ceiling's reads: ``aloader.storage.read`` and the decoding, nothing else."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    def __len__(self) -> int:
        return len(self.urls)

    async def __getitem__(self, index: int) -> dict[str, Any]:
        started = time.perf_counter()
        data = decode_array(await storage.read(self.urls[index]))
        return {"data": data, "latency": time.perf_counter() - started}


class _Ceiling:
    """The most this machine can do: the same async reads and decoding, ``concurrency`` at once, batched and
    collated, with no loader in between (one event loop, a semaphore and a reorder buffer)."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.dataset = BareReads(config.urls)

    async def __aiter__(self) -> AsyncIterator[Any]:
        limit = asyncio.Semaphore(self.config.concurrency)

        async def one(index: int) -> dict[str, Any]:
            async with limit:
                return await self.dataset[index]

        # Tasks are created a window at a time so that memory stays bounded, as in a loader.
        size, total = self.config.batch_size, len(self.dataset)
        window = (math.ceil(self.config.concurrency / size) + 1) * size
        pending: list[asyncio.Task[dict[str, Any]]] = []
        try:
            for start in range(0, total, size):
                stop = min(start + size, total)
                pending.extend(asyncio.ensure_future(one(i)) for i in range(start, stop))
                while len(pending) >= window or (stop == total and pending):
                    samples = [await task for task in pending[:size]]
                    del pending[:size]
                    yield collate(samples)
        finally:
            for task in pending:
                task.cancel()


class _SpdlLoader:
    """SPDL's pipeline over the same async reads as aloader's: fetch (``concurrency`` at once), batch, collate."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.dataset = TimedObjects(config.urls)

    def __iter__(self) -> Iterator[Any]:
        from spdl.pipeline import PipelineBuilder

        builder: Any = PipelineBuilder()  # SPDL's generics do not infer through the chain
        pipeline = (
            builder.add_source(range(len(self.dataset)))
            .pipe(self.dataset.__getitem__, concurrency=self.config.concurrency, output_order="input")
            .aggregate(self.config.batch_size)
            .pipe(collate)
            .add_sink(3)
            .build(num_threads=2)
        )
        with pipeline.auto_stop():
            yield from pipeline.get_iterator()


def object_datasets(config: BenchConfig) -> Datasets:
    """What each system reads ``config.urls`` with, as single objects."""
    return Datasets(
        aloader=lambda: TimedObjects(config.urls),
        torch=lambda: BlockingObjects(config.urls),
        ceiling=lambda: _Ceiling(config),
        spdl=lambda: _SpdlLoader(config),
    )
