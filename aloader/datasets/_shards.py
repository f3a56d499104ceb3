"""``TarShardDataset``: WebDataset-style tar shards streamed from any store, several shards at once."""

from __future__ import annotations

import asyncio
import collections
import inspect
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final

from aloader.datasets._split import (
    LoadedState,
    Part,
    Reader,
    load_reader_state,
    rank_and_world_size,
    reader_state,
    resplit,
    resume_point,
    this_reader,
)
from aloader.datasets._tar import TarStreamParser, expand_braces, split_key
from aloader.errors import ShardFormatError
from aloader.storage import DEFAULT_CHUNK_SIZE, RetryPolicy, Store
from aloader.storage._redact import redact_url

__all__ = ["TarShardDataset", "rank_and_world_size"]

_SHARD_END: Final = object()


# Samples decoded per thread call (sync ``decode``) or awaited together (``async def`` decode).
_DECODE_RUN: Final = 16


async def _decode_run(
    decode: Callable[[dict[str, Any]], Any] | None, run: list[Any]
) -> tuple[list[Any], Exception | None]:
    """``run`` decoded in order, up to the first failure: (decoded samples, the failure or None)."""
    if decode is None:
        return run, None
    if inspect.iscoroutinefunction(decode):
        results = await asyncio.gather(*(decode(item) for item in run), return_exceptions=True)
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                return list(results[:i]), result
        return list(results), None

    def decode_all() -> tuple[list[Any], Exception | None]:
        out: list[Any] = []
        for item in run:
            try:
                out.append(decode(item))
            except Exception as exc:
                return out, exc
        return out, None

    return await asyncio.to_thread(decode_all)


class _ShardFailed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class TarShardDataset:
    """Samples from WebDataset-compatible tar shards, streamed: no shard is downloaded whole before use.

    ``urls`` is one URL pattern or a list of them; braces expand (``s3://bkt/train-{000000..000099}.tar``). Files
    sharing a key (the path up to the first dot of the file name) form one sample, a dict keyed by extension with
    the file's bytes, plus ``"__key__"`` and ``"__url__"`` (the shard): ``{"__key__": "00042", "jpg": b"...",
    "cls": b"3", ...}``. ``decode`` (sync: in a thread; or ``async def``) maps each sample dict to what is yielded.

    - ``shard_concurrency`` shards are read at once; samples are taken from them in turn (round-robin), so the
      order is the same in every run whatever the network does.
    - ``shuffle=True`` shuffles the shard order with ``seed`` and the epoch (call ``set_epoch(epoch)`` before each
      epoch, as with ``DistributedSampler``) and then samples through a buffer of ``shuffle_buffer`` samples.
    - Shards are split across ranks (``torch.distributed``, or the ``RANK``/``WORLD_SIZE`` environment) and across
      DataLoader worker processes, so no sample is read twice. ``split_by_rank=False`` / ``split_by_worker=False``
      turn that off (e.g. when each rank is given its own URL list). With fewer shards than ranks times workers,
      some get none: make at least that many shards.
    - ``samples_per_epoch=N`` (like WebDataset's ``with_epoch``) fixes the epoch's length: ``N`` samples across all
      ranks. Each rank yields exactly ``N // world_size`` (the remainder is left out), split over its DataLoader
      workers so worker ``i`` yields the same count on every rank (``N // world_size // num_workers``, the first
      ``(N // world_size) % num_workers`` workers one more). Every shard is read (no ``even_split`` cut); a reader
      stops once it has yielded its count (its shard readers are cancelled), and a reader whose shards run out
      first reads them again (same order, or with ``shuffle`` reshuffled by seed, epoch, reader and pass) until it
      has. So every rank yields the same number of samples, hence of batches, whatever the shards' sizes: DDP never
      waits on a rank that ran out. With ``N`` at most the samples that every reader's shards hold, no sample is
      yielded twice in an epoch. Every reader needs at least one shard.
    - Without ``samples_per_epoch``, with more than one rank, every reader gets the same number of *shards*: the
      epoch's shard order is cut to a multiple of ranks x workers (the few shards left over are skipped this epoch;
      with ``shuffle`` they are others each epoch). Only with shards of equal sample counts, as WebDataset writers
      make them, does every rank then yield the same number of batches; with unequal shards a rank can run out
      first and DDP hangs in its next collective: use ``samples_per_epoch``. ``even_split=False`` reads every shard
      instead (ranks may then differ by a shard).
    - ``state_dict()`` / ``load_state_dict()``: the epoch and the samples yielded so far in it; a resumed iteration
      skips those without decoding them (they are read again, not held). ``aloader.DataLoader`` saves it with its own
      state. Every reader of a split is taken to be at the same position (the state taken at the same step on every
      rank, as a DDP checkpoint is), so rank 0's state resumes every rank. With ``samples_per_epoch``, a resume with
      another number of ranks splits the samples the saved split had not yielded yet over the new ranks: each the
      same count (at most ``ranks - 1`` left out), none yielded twice. Without it, each rank's count is not known, and
      such a resume is refused with a ``ValueError``.

    It is an async iterable (``__aiter__``): give it to ``aloader.DataLoader`` as the dataset.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shard_concurrency: int = 4,
        decode: Callable[[dict[str, Any]], Any] | None = None,
        split_by_rank: bool = True,
        split_by_worker: bool = True,
        even_split: bool = True,
        samples_per_epoch: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        prefetch_per_shard: int = 64,
    ) -> None:
        patterns = [urls] if isinstance(urls, str) else list(urls)
        self.shards: list[str] = [url for pattern in patterns for url in expand_braces(pattern)]
        if not self.shards:
            raise ValueError("TarShardDataset needs at least one shard URL")
        for name, value in (
            ("shard_concurrency", shard_concurrency),
            ("chunk_size", chunk_size),
            ("prefetch_per_shard", prefetch_per_shard),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} should be a positive integer, but got {name}={value!r}")
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer should be a non-negative integer, but got {shuffle_buffer!r}")
        if decode is not None and not callable(decode):
            raise TypeError(f"decode should be a callable or None, but got {decode!r}")
        if samples_per_epoch is not None and (
            isinstance(samples_per_epoch, bool) or not isinstance(samples_per_epoch, int) or samples_per_epoch < 1
        ):
            raise ValueError(
                "samples_per_epoch should be a positive integer (the samples of one epoch across all ranks) or None, "
                f"but got samples_per_epoch={samples_per_epoch!r}"
            )
        self.samples_per_epoch = samples_per_epoch
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shard_concurrency = shard_concurrency
        self.decode = decode
        self.split_by_rank = split_by_rank
        self.split_by_worker = split_by_worker
        self.even_split = even_split
        self.store = Store(storage_options, retry=retry)
        self.chunk_size = chunk_size
        self.prefetch_per_shard = prefetch_per_shard
        self.epoch = 0
        self._position = 0  # samples yielded by the current iteration
        self._loaded: LoadedState | None = None  # load_state_dict: where the next iteration resumes
        self._history: tuple[tuple[int, int, int], ...] = ()  # the current epoch's earlier splits (see _split)

    def __repr__(self) -> str:
        return f"TarShardDataset({len(self.shards)} shards, shuffle={self.shuffle}, store={self.store!r})"

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with ``seed``, orders the shards and samples when ``shuffle=True``."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "seed", "position", "reader", "readers", "workers", "history"}``: where this reader's
        iteration is (``history``: the epoch's earlier splits, after a resume with another number of ranks)."""
        return reader_state(self.epoch, self.seed, self._position, self._reader(), self._history)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next iteration continue ``state``'s epoch after its ``position`` samples; with another number of
        ranks (``samples_per_epoch`` set), the samples the saved split had not yielded yet are split over the new
        ranks (docs/resume.md)."""
        self._loaded = load_reader_state("TarShardDataset", state)
        self.epoch, self.seed = self._loaded.epoch, self._loaded.seed

    def _reader(self) -> Reader:
        return this_reader(self.split_by_rank, self.split_by_worker)

    def shards_for_this_reader(self) -> list[str]:
        """The shards this process (and worker) reads this epoch, in the order it reads them (first pass)."""
        return self._shards_for(self._reader())

    def _shards_for(self, reader: Reader) -> list[str]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(shards)  # the same on every rank: a split, no overlap
        slot, slots = reader.slot, reader.slots
        if self.samples_per_epoch is None and self.even_split and reader.world > 1:
            shards = shards[: len(shards) - len(shards) % slots]  # the same count for every reader
        return shards[slot::slots]

    def samples_for_this_reader(self) -> int | None:
        """With ``samples_per_epoch``: the samples this process (and worker) yields per epoch; else None."""
        if self.samples_per_epoch is None:
            return None
        return self._reader().share(self.samples_per_epoch)

    def _check_has_shards(self, shards: list[str], slots: int) -> None:
        if not shards:
            raise ValueError(
                f"TarShardDataset: samples_per_epoch={self.samples_per_epoch} needs at least one shard per reader, "
                f"but there are {len(self.shards)} shards for {slots} readers (ranks x workers): make more shards"
            )

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._samples()

    async def _samples(self) -> AsyncIterator[Any]:
        reader = self._reader()
        slot, slots = reader.slot, reader.slots
        loaded, self._loaded = self._loaded, None
        needs = None if self.samples_per_epoch is not None else "needs samples_per_epoch (each rank's count)"
        point = resume_point("TarShardDataset", loaded, reader, needs)
        self._history = point.history
        skip, self._position = point.position, 0
        items: AsyncGenerator[Any, None]
        if point.history:
            # Resumed with another number of ranks: this reader's share of what the earlier readers had left.
            first_readers, first_workers, _ = point.history[0]
            first = [
                Reader(r // first_workers, first_readers // first_workers, r % first_workers, first_workers)
                for r in range(first_readers)
            ]
            assert self.samples_per_epoch is not None
            lengths = [old.share(self.samples_per_epoch) for old in first]
            parts = resplit(lengths, point.history, slots)[slot]
            quota: int | None = sum(part.size for part in parts)
            items = self._parts_stream(parts, first)
        else:
            shards = self.shards_for_this_reader()
            quota = self.samples_for_this_reader()
            if quota:
                self._check_has_shards(shards, slots)
            items = self._stream(shards, slot, cycle=quota is not None)
        try:
            while skip and (quota is None or self._position < quota):
                if await anext(items, _SHARD_END) is _SHARD_END:
                    return
                skip -= 1  # received before the state was taken: read again, not decoded
                self._position += 1
            while quota is None or self._position < quota:
                # A run of samples decoded together: a sync ``decode`` costs one thread call per run, not per sample.
                run: list[Any] = []
                limit = _DECODE_RUN if quota is None else min(_DECODE_RUN, quota - self._position)
                stream_error: Exception | None = None
                while len(run) < limit:
                    try:
                        item = await anext(items, _SHARD_END)
                    except Exception as exc:  # a shard failed: the samples read before it come first
                        stream_error = exc
                        break
                    if item is _SHARD_END:
                        break
                    run.append(item)
                decoded, error = await _decode_run(self.decode, run)
                for sample in decoded:
                    self._position += 1
                    yield sample
                failure = error if error is not None else stream_error
                if failure is not None:
                    raise failure  # at its sample's position, after the samples before it
                if len(run) < limit:
                    return
        finally:
            await items.aclose()  # a reader that has its count stops its shard readers now

    async def _parts_stream(self, parts: list[Part], first: list[Reader]) -> AsyncGenerator[Any, None]:
        """The samples (undecoded) of ``parts``: runs of the streams of the epoch's first readers ``first``, each read
        again from its start and the samples before the run skipped without decoding."""
        for part in parts:
            reader = first[part.reader]
            shards = self._shards_for(reader)
            self._check_has_shards(shards, reader.slots)
            stream = self._stream(shards, reader.slot, cycle=True)
            try:
                for position in range(part.stop):
                    item = await anext(stream, _SHARD_END)
                    if item is _SHARD_END:
                        return
                    if position >= part.start:
                        yield item
            finally:
                await stream.aclose()

    async def _stream(self, shards: list[str], slot: int, cycle: bool) -> AsyncGenerator[Any, None]:
        """This reader's samples (undecoded) in their fixed order; with ``cycle``, its shards again and again
        (reshuffled each pass with ``shuffle``), for as long as the caller pulls."""
        rng = random.Random(f"{self.seed}:{self.epoch}:{slot}")
        use_buffer = self.shuffle and self.shuffle_buffer > 1
        pending = collections.deque(shards)
        active: collections.deque[tuple[asyncio.Queue[Any], asyncio.Task[None]]] = collections.deque()
        tasks: list[asyncio.Task[None]] = []
        passes, samples_in_pass = 0, 0

        def start_next() -> None:
            url = pending.popleft()
            queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.prefetch_per_shard)
            task = asyncio.get_running_loop().create_task(self._read_shard(url, queue))
            tasks.append(task)
            active.append((queue, task))

        buffer: list[Any] = []
        try:
            while True:
                while pending and len(active) < self.shard_concurrency:
                    start_next()
                while active:
                    queue, _ = active[0]
                    item = await queue.get()
                    if item is _SHARD_END:
                        active.popleft()
                        if pending:
                            start_next()
                        continue
                    if isinstance(item, _ShardFailed):
                        raise item.error
                    samples_in_pass += 1
                    active.rotate(-1)  # the next sample comes from the next shard: a fixed, timing-free order
                    if use_buffer:
                        buffer.append(item)
                        if len(buffer) < self.shuffle_buffer:
                            continue
                        chosen = rng.randrange(len(buffer))
                        buffer[chosen], buffer[-1] = buffer[-1], buffer[chosen]
                        item = buffer.pop()
                    yield item
                # The end of a pass over this reader's shards: the buffer is emptied before any next pass starts,
                # so a sample comes again only after every sample of its pass has been yielded.
                rng.shuffle(buffer)
                while buffer:
                    yield buffer.pop()
                if not cycle:
                    return
                if samples_in_pass == 0:
                    raise ValueError(
                        f"TarShardDataset: the shards of reader {slot} hold no samples, so it cannot yield its "
                        f"samples_per_epoch share: {', '.join(shards)}"
                    )
                passes, samples_in_pass = passes + 1, 0
                again = list(shards)
                if self.shuffle:
                    random.Random(f"{self.seed}:{self.epoch}:{slot}:{passes}").shuffle(again)
                pending.extend(again)
        finally:
            # Readers still running (a `break`, an error, a cancelled epoch, the count reached) stop with it.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_shard(self, url: str, queue: asyncio.Queue[Any]) -> None:
        """Stream one shard into ``queue``: sample dicts, then ``_SHARD_END`` (or a ``_ShardFailed``)."""
        parser = TarStreamParser(url)
        current: dict[str, Any] | None = None
        try:
            async for chunk in self.store.stream(url, chunk_size=self.chunk_size):
                for name, data in parser.feed(chunk):
                    key, extension = split_key(name)
                    if current is not None and current["__key__"] != key:
                        await queue.put(current)
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    if extension in current:
                        raise ShardFormatError(
                            f"{redact_url(url)}: sample {key!r} has two files ending in .{extension}", url
                        )
                    current[extension] = data
            parser.close()
            if current is not None:
                await queue.put(current)
            await queue.put(_SHARD_END)
        except Exception as exc:
            await queue.put(_ShardFailed(exc))
