"""``ObjectStreamDataset``: one object per sample, streamed, split across ranks x workers by the dataset itself."""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from aloader.datasets._objects import ObjectDataset
from aloader.datasets._split import (
    LoadedState,
    Reader,
    load_reader_state,
    reader_state,
    resplit,
    resume_point,
    this_reader,
)
from aloader.errors import with_context
from aloader.storage import RetryPolicy

__all__ = ["ObjectStreamDataset"]


class ObjectStreamDataset:
    """The objects of an ``ObjectDataset``, as an async iterable that splits them across ranks x workers itself.

    ``source``, ``decode``, ``suffixes``, ``storage_options`` and ``retry`` are ``ObjectDataset``'s (a prefix is
    listed once and sorted; a list of URLs is used in its order), and so is ``dataset.objects``, the ``ObjectDataset``
    that reads them. Use this one where a sampler is not wanted: a streaming pipeline, or DDP without a
    ``DistributedSampler``.

    - **Order.** Index order, or with ``shuffle=True`` a permutation seeded by ``seed`` and the epoch (call
      ``set_epoch(epoch)`` each epoch), the same on every rank.
    - **Split.** Reader ``k`` of ``n = world_size * num_workers`` (ranks from ``torch.distributed`` or the
      ``RANK``/``WORLD_SIZE`` environment, workers from ``get_worker_info()``; ``split_by_rank=False`` /
      ``split_by_worker=False`` turn either off) takes positions ``k, k + n, ...`` of the epoch's order, cut first to
      a multiple of ``n`` (as ``DistributedSampler(drop_last=True)``): every reader yields exactly
      ``len(objects) // n`` objects, so every rank the same number of batches, and no object twice. The at most
      ``n - 1`` objects left over are different ones each epoch with ``shuffle``.
    - **Concurrency.** ``concurrency`` objects are read (and decoded) at once; they are yielded in the fixed order
      above whatever finishes first. A read that fails raises at its position, naming the object's index and URL.
    - **Resumable.** ``state_dict()`` is ``{"epoch", "seed", "position", "reader", "readers", "workers",
      "history"}``; after ``load_state_dict`` the next iteration starts at ``position`` in this reader's list without
      reading the objects before it. Every reader of a split is taken to be at the same position (the state taken at
      the same step on every rank), so rank 0's state resumes every rank. With another number of ranks, the objects
      not yet read are split again over the new ranks, each the same count (at most ``n - 1`` left out), none
      read twice.
    """

    def __init__(
        self,
        source: str | Sequence[str] | ObjectDataset,
        *,
        shuffle: bool = False,
        seed: int = 0,
        concurrency: int = 16,
        split_by_rank: bool = True,
        split_by_worker: bool = True,
        decode: Callable[[bytes], Any] | None = None,
        suffixes: str | Iterable[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency should be a positive integer, but got concurrency={concurrency!r}")
        if isinstance(source, ObjectDataset):
            self.objects = source
        else:
            self.objects = ObjectDataset(
                source, decode=decode, suffixes=suffixes, storage_options=storage_options, retry=retry
            )
        self.shuffle = shuffle
        self.seed = seed
        self.concurrency = concurrency
        self.split_by_rank = split_by_rank
        self.split_by_worker = split_by_worker
        self.epoch = 0
        self._position = 0  # objects yielded (or skipped on resume) by the current iteration
        self._loaded: LoadedState | None = None  # load_state_dict: where the next iteration resumes
        self._history: tuple[tuple[int, int, int], ...] = ()  # the current epoch's earlier splits (see _split)

    @classmethod
    async def from_prefix(
        cls,
        prefix: str,
        *,
        decode: Callable[[bytes], Any] | None = None,
        suffixes: str | Iterable[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        **options: Any,
    ) -> ObjectStreamDataset:
        """List ``prefix`` without blocking the running loop; ``options`` are the constructor's others."""
        objects = await ObjectDataset.from_prefix(
            prefix, decode=decode, suffixes=suffixes, storage_options=storage_options, retry=retry
        )
        return cls(objects, **options)

    @property
    def urls(self) -> list[str]:
        return self.objects.urls

    def __repr__(self) -> str:
        return f"ObjectStreamDataset({self.objects!r}, shuffle={self.shuffle})"

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with ``seed``, orders the objects when ``shuffle=True``."""
        self.epoch = epoch

    def _reader(self) -> Reader:
        return this_reader(self.split_by_rank, self.split_by_worker)

    def indices_for_this_reader(self) -> list[int]:
        """The object indices this process (and worker) yields this epoch, in order (after a resume with another
        number of ranks: its share of what was left)."""
        reader = self._reader()
        if self._loaded is not None:  # a loaded state: the list its resume will read
            return self._indices(reader, resume_point("ObjectStreamDataset", self._loaded, reader, None).history)
        return self._indices(reader, self._history)

    def _indices(self, reader: Reader, history: tuple[tuple[int, int, int], ...]) -> list[int]:
        order = list(range(len(self.objects)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)  # the same on every rank: a split, no overlap
        first = history[0][0] if history else reader.slots
        order = order[: len(order) - len(order) % first]  # the same count for every reader
        streams = [order[slot::first] for slot in range(first)]
        if not history:
            return streams[reader.slot]
        parts = resplit([len(stream) for stream in streams], history, reader.slots)[reader.slot]
        return [index for part in parts for index in streams[part.reader][part.start : part.stop]]

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "seed", "position", "reader", "readers", "workers", "history"}``: where this reader's
        iteration is (``history``: the epoch's earlier splits, after a resume with another number of ranks)."""
        return reader_state(self.epoch, self.seed, self._position, self._reader(), self._history)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next iteration continue ``state``'s epoch after its ``position`` objects; with another number of
        ranks, the objects the saved split had not read yet are split over the new ranks (docs/resume.md)."""
        self._loaded = load_reader_state("ObjectStreamDataset", state)
        self.epoch, self.seed = self._loaded.epoch, self._loaded.seed

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._samples()

    async def _samples(self) -> AsyncGenerator[Any, None]:
        reader = self._reader()
        loaded, self._loaded = self._loaded, None
        point = resume_point("ObjectStreamDataset", loaded, reader, None)
        self._history = point.history
        indices = self._indices(reader, point.history)
        self._position = min(point.position, len(indices))  # skipped by index: nothing before it is read
        loop = asyncio.get_running_loop()
        in_flight: collections.deque[asyncio.Task[Any]] = collections.deque()
        upcoming = iter(indices[self._position :])
        try:
            while True:
                for index in upcoming:
                    in_flight.append(loop.create_task(self._read(index)))
                    if len(in_flight) >= self.concurrency:
                        break
                if not in_flight:
                    return
                sample = await in_flight.popleft()  # the next in order, whatever finished first
                self._position += 1
                yield sample
        finally:
            # A `break`, an error or a cancelled epoch: the reads still in flight stop with the iteration.
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _read(self, index: int) -> Any:
        try:
            return await self.objects[index]
        except Exception as exc:
            raise with_context(exc, f"reading object {index} ({self.objects.urls[index]})")
