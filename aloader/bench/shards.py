"""The systems of ``aloader bench`` over tar shards: the same systems as for single objects (``objects``), each
reading WebDataset-style shards.

- ``ceiling``: no loader. ``shard_concurrency`` shards streamed at once (``aloader.storage.stream``), parsed with
  aloader's tar parser, decoded and batched in arrival order on one event loop.
- ``aloader``: ``aloader.DataLoader(TarShardDataset(urls, shard_concurrency=...))``.
- ``aloader-sync``: the torch ``IterableDataset`` below, unchanged, through ``aloader.DataLoader``.
- ``torch``: that ``IterableDataset`` through torch's DataLoader with ``num_workers`` workers. It is written as a
  torch user writes one: blocking reads (``urllib`` for http(s), ``open()`` for files), Python's ``tarfile`` in
  stream mode, and the shards split across workers with ``get_worker_info()``.
- ``spdl``: SPDL's pipeline: shards as the source, an async generator streaming each shard's samples
  (``shard_concurrency`` at once), decode, batch, collate.

Every system groups a shard's files into samples by WebDataset's key rule (``aloader.datasets.split_key``) and
decodes each sample the same way (``decode_tar_sample``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import IO, Any

import torch
import torch.utils.data

from aloader import storage
from aloader.bench.config import BenchConfig
from aloader.bench.samples import Datasets, collate, decode_array, read_blocking
from aloader.datasets import TarShardDataset, split_key
from aloader.datasets._tar import TarStreamParser

__all__ = ["TorchTarShards", "decode_tar_sample", "tar_datasets"]


def decode_tar_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """One sample dict (``{"__key__": ..., "npy": b"...", "cls": b"3"}``) to what ``collate`` takes: its ``.npy``
    field as a tensor, or else its largest field as ``uint8``. Samples in a stream have no per-sample request, so
    no latency is measured for them."""
    fields = {name: value for name, value in sample.items() if not name.startswith("__")}
    if not fields:
        raise ValueError(f"sample {sample.get('__key__')!r} of {sample.get('__url__')} has no files")
    data = fields["npy"] if "npy" in fields else max(fields.values(), key=len)
    return {"data": decode_array(data), "latency": None}


class SampleGrouper:
    """Groups a shard's files, in order, into WebDataset samples (files sharing a key form one sample)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.current: dict[str, Any] | None = None

    def add(self, name: str, data: bytes) -> dict[str, Any] | None:
        """Take one file; return the sample it completed (the previous key's), if any."""
        key, extension = split_key(name)
        done = None
        if self.current is not None and self.current["__key__"] != key:
            done, self.current = self.current, None
        if self.current is None:
            self.current = {"__key__": key, "__url__": self.url}
        self.current[extension] = data
        return done

    def finish(self) -> dict[str, Any] | None:
        done, self.current = self.current, None
        return done


# ---------------------------------------------------------------------------------------- torch, as users write it
@contextlib.contextmanager
def _open_blocking(url: str) -> Iterator[IO[bytes]]:
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=60) as response:
            yield response
    elif "://" not in url or url.startswith("file://"):
        with open(url.removeprefix("file://"), "rb") as file:
            yield file
    else:  # other object stores: one blocking GET of the whole shard, as boto3's get_object().read() would do
        yield io.BytesIO(read_blocking(url))


class TorchTarShards(torch.utils.data.IterableDataset[dict[str, Any]]):
    """A torch ``IterableDataset`` over tar shards: each worker streams its share of the shards with ``tarfile``."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        shards = self.urls if info is None else self.urls[info.id :: info.num_workers]
        for url in shards:
            grouper = SampleGrouper(url)
            with _open_blocking(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    file = tar.extractfile(member) if member.isfile() else None
                    if file is None:
                        continue
                    done = grouper.add(member.name, file.read())
                    if done is not None:
                        yield decode_tar_sample(done)
            last = grouper.finish()
            if last is not None:
                yield decode_tar_sample(last)


# ------------------------------------------------------------------------------------------ ceiling and SPDL
async def stream_shard(url: str) -> AsyncIterator[dict[str, Any]]:
    """The samples of one shard, streamed with ``aloader.storage.stream`` and aloader's tar parser (undecoded)."""
    parser, grouper = TarStreamParser(url), SampleGrouper(url)
    async for chunk in storage.stream(url):
        for name, data in parser.feed(chunk):
            done = grouper.add(name, data)
            if done is not None:
                yield done
    parser.close()
    last = grouper.finish()
    if last is not None:
        yield last


class _TarCeiling:
    """Bare reads: ``shard_concurrency`` shards streamed at once, decoded and batched as samples arrive."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config

    async def __aiter__(self) -> AsyncIterator[Any]:
        shards = iter(self.config.urls)
        # Bounded: readers wait when the consumer is behind, so memory holds a few batches at most.
        queue: asyncio.Queue[dict[str, Any] | Exception | None] = asyncio.Queue(maxsize=4 * self.config.batch_size)

        async def reader() -> None:
            try:
                for url in shards:  # readers share one iterator: each takes the next shard when done
                    async for sample in stream_shard(url):
                        await queue.put(decode_tar_sample(sample))
            except Exception as exc:  # raised by the consumer, where the batch would have been
                await queue.put(exc)
            await queue.put(None)  # this reader is done (cancellation skips it: the consumer has stopped)

        readers = [asyncio.ensure_future(reader()) for _ in range(self.config.shard_concurrency)]
        try:
            running, batch = len(readers), []
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                batch.append(item)
                if len(batch) == self.config.batch_size:
                    yield collate(batch)
                    batch = []
            if batch:
                yield collate(batch)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


class _TarSpdl:
    """SPDL: the shard URLs as the source, ``stream_shard`` as an async generator stage, then decode and batch."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config

    def __iter__(self) -> Iterator[Any]:
        from spdl.pipeline import PipelineBuilder

        builder: Any = PipelineBuilder()  # SPDL's generics do not infer through the chain
        pipeline = (
            builder.add_source(list(self.config.urls))
            .pipe(stream_shard, concurrency=self.config.shard_concurrency)
            .pipe(decode_tar_sample)
            .aggregate(self.config.batch_size)
            .pipe(collate)
            .add_sink(3)
            .build(num_threads=2)
        )
        with pipeline.auto_stop():
            yield from pipeline.get_iterator()


def tar_datasets(config: BenchConfig) -> Datasets:
    """What each system reads ``config.urls`` with, as tar shards."""
    return Datasets(
        aloader=lambda: TarShardDataset(
            config.urls, shard_concurrency=config.shard_concurrency, decode=decode_tar_sample, split_by_rank=False
        ),
        torch=lambda: TorchTarShards(config.urls),
        ceiling=lambda: _TarCeiling(config),
        spdl=lambda: _TarSpdl(config),
    )
