"""Fetching a map-style unit: its samples from the dataset, then finished into a batch.

In: a unit of indices. Out: its outcome (a batch, or the exception to raise at its position). ``async def``
``__getitem__``/``__getitems__`` run as tasks on the loop; a sync ``__getitem__`` runs in threads, in runs sized by
how fast samples have been (:class:`~aloader._core.plan.Speed`): slow (I/O-bound) samples get a thread call each, so
``concurrency`` of them wait at once, fast ones are fetched, transformed and collated in one call. At most
``concurrency`` fetch calls are in flight (``Context.slots``). User code never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from typing import Any, Final

from aloader._core.access import MapAccess, any_awaitable, describe_indices
from aloader._core.collate import Finisher
from aloader._core.context import Context, Record, gather_ordered
from aloader.errors import with_context

__all__ = ["CHUNK_SECONDS", "PROBE_SECONDS", "UNFINISHED", "Fetcher"]

# A run of fast samples is fetched in one thread call of about this many seconds; slow samples get a call each.
CHUNK_SECONDS: Final = 0.002
# How long the rest of a first batch waits for its first sample (see Fetcher._probe_first): a thread's start and
# the call's hand-offs take a few milliseconds on a busy machine, before the sample's own time.
PROBE_SECONDS: Final = 0.01

UNFINISHED: Final = object()
"""In place of a batch from a thread call whose samples are awaitables: they are finished on the loop."""


class _Probed:
    """Who fetches which samples of a probed unit (see ``Fetcher._probe_first``): the probe's thread call takes them
    from the front, a chunk at a time; the loop takes what is left once it stops waiting for that call. Thread-safe:
    the call takes in its thread, the loop stops it from the loop's."""

    __slots__ = ("_lock", "size", "stopped", "taken")

    def __init__(self, size: int) -> None:
        self._lock = threading.Lock()
        self.size = size
        self.taken = 1  # the first sample is the probe's
        self.stopped = False

    def take(self, count: int) -> tuple[int, int] | None:
        """Thread side: the next ``count`` positions (fewer at the end) as (start, stop), or None: all taken, or the
        loop has taken the rest."""
        with self._lock:
            if self.stopped or self.taken >= self.size:
                return None
            start = self.taken
            self.taken = min(self.size, start + count)
            return start, self.taken

    def stop(self) -> int:
        """Loop side: no more for the call; how many positions it took (the rest are the loop's)."""
        with self._lock:
            self.stopped = True
            return self.taken


class Fetcher:
    """Fetches the units of a map-style dataset and finishes them (``Finisher``)."""

    def __init__(self, ctx: Context, access: MapAccess, finisher: Finisher) -> None:
        self._ctx = ctx
        self.access = access
        self._finisher = finisher
        self._timing = 0  # whole units being made in threads right now (see _timed_unit)
        self._timing_lock = threading.Lock()
        self._tensors = access.tensors if finisher.gathers else None  # batches gathered (see gather)

    @property
    def gathers(self) -> bool:
        """Batches are gathered from tensors in memory (see ``gather.py``): fast, whatever has been measured."""
        return self._tensors is not None

    async def unit(self, unit: Any) -> Any:
        """The outcome of one unit (raises its failure)."""
        access = self.access
        indices = self._ctx.plan.indices(unit)
        if self._ctx.plan.auto_collation and access.getitems is not None:
            return await self._getitems(indices)
        if access.getitem_is_async:
            samples = await gather_ordered([self._fetch_async(index) for index in indices])
            return await self._finisher.finish(indices, samples, "sample index")
        return await self._fetch_sync(indices)

    async def finish_awaitables(self, samples: list[Any], indices: list[Any]) -> Any:
        """Finish a unit whose sync fetch returned awaitables (a thread call gave :data:`UNFINISHED`)."""
        return await self._finisher.finish(indices, await self._resolve_awaitables(samples, indices), "sample index")

    # ------------------------------------------------------------------------------------------- loop side
    async def _getitems(self, indices: list[Any]) -> Any:
        ctx, access = self._ctx, self.access
        getitems = access.getitems
        assert getitems is not None
        keys = [access.key(index) for index in indices]
        where = f"fetching the batch of sample indices {describe_indices(indices)} with __getitems__"
        started = time.perf_counter()
        try:
            async with ctx.slots:  # one __getitems__ call is one fetch call
                if access.getitems_is_async:
                    try:
                        samples = await getitems(keys)
                    except Exception as exc:
                        raise with_context(exc, where)
                else:

                    def fetch() -> Any:
                        try:
                            return getitems(keys)
                        except Exception as exc:
                            raise with_context(exc, where)

                    samples = await ctx.threads.run(fetch)
        except Exception:
            if not ctx.plan.skipping:
                ctx.stats.failure("fetch")
                raise
            # Under max_failures a failed batch call is fetched again sample by sample, so only the samples that
            # fail are skipped (__getitem__ may be called twice for the others).
            if access.getitem_is_async:
                fetched = await gather_ordered([self._fetch_async(index) for index in indices])
                return await self._finisher.finish(indices, fetched, "sample index")
            return await self._fetch_sync(indices)
        ctx.stats.add("fetch", len(indices), time.perf_counter() - started)
        return await self._finisher.finish(indices, list(samples), "sample index")

    async def _fetch_async(self, index: Any) -> Any:
        ctx, access = self._ctx, self.access
        async with ctx.slots:
            started = time.perf_counter()
            try:
                sample = await access.getitem(access.key(index))
            except Exception as exc:
                return ctx.failed("fetch", exc, f"fetching sample index {index!r}")
            ctx.stats.add("fetch", 1, time.perf_counter() - started)
            return sample

    async def _fetch_sync(self, indices: list[Any]) -> Any:
        """Fetch with sync ``__getitem__`` in threads, in runs sized so each call takes about 2 ms.

        The run size follows a moving average of the time per sample. A sample that is usually fast can still
        block (a cache miss), so even a fast run is a thread call: the loop keeps the other fetches going.
        """
        ctx = self._ctx
        per_sample = ctx.speed.per_sample
        # A batch that may be gathered is made in one call however fast its samples are: it is one op per tensor.
        gathers = self.gathers
        if per_sample is None and len(indices) > 1 and not gathers:
            return await self._probe_first(indices)
        run = len(indices) if gathers else self._run_size(len(indices))
        if run >= len(indices) and not inspect.iscoroutinefunction(ctx.plan.transform):
            # The common fast case: one call does the whole batch, fetch to pinned batch (and a CPU-bound batch
            # under a limit of one call: as torch's worker makes it).
            # (A TensorDataset is in memory: its first batch may go to the consumer too.)
            quick = gathers or (per_sample is not None and per_sample * len(indices) < CHUNK_SECONDS)
            async with ctx.slots:
                fetched, batch = await ctx.run_sync(lambda: self._timed_unit(indices), quick=quick)
            if batch is not UNFINISHED:
                return batch
            return await self.finish_awaitables(fetched, indices)
        runs = [indices[i : i + run] for i in range(0, len(indices), run)]
        parts = await gather_ordered([self._fetch_sync_run(part) for part in runs])
        return await self.finish_awaitables([sample for part in parts for sample in part], indices)

    async def _probe_first(self, indices: list[Any]) -> Any:
        """Unknown speed (a loader's first batches): the first sample alone, the rest after it or beside it.

        The first sample is fetched in a thread call of its own (it may wait on anything). If it comes back within
        ``PROBE_SECONDS``, the rest are fetched in runs sized by its time (one call for an in-memory batch); if not,
        the rest are fetched a call each, concurrently, while it is still being waited for, so a slow (I/O-bound)
        dataset loses at most ``PROBE_SECONDS`` of its first batch. Before this, every sample of a first batch was a
        thread call of its own: 64 calls and a dozen new threads for an in-memory batch of 64, most of a cold first
        batch's time (measured: 50-100 ms against torch's 2 ms).

        The probe's call goes on with the rest itself, a chunk at a time, while its calls stay short (fast samples:
        the whole batch in that one call, finished there, instead of more calls and their hand-offs; the first
        sample of a new thread is no guide, a torch op there costs ~10x its usual time). The loop takes whatever the
        call has not taken once it stops waiting for it (:class:`_Probed`), so a sample that blocks in the call
        holds up only its own chunk.

        A first sample that was CPU-bound, under a limit of one call at a time (a worker's CPU-bound dataset), is
        followed in the same call by the rest and the batch, as torch's worker makes it: the slot is not given up
        between them, so the first sample of the next batch is not fetched before the rest of this one.
        """
        probed = _Probed(len(indices))
        first = asyncio.ensure_future(self._probe_run(indices, probed))
        try:
            await asyncio.wait([first], timeout=PROBE_SECONDS)
        except BaseException:
            first.cancel()
            raise
        taken = probed.stop()
        if taken == len(indices):  # the probe's call fetched every sample (and made the batch, unless awaitables)
            samples, batch = await first
            return batch if batch is not UNFINISHED else await self.finish_awaitables(samples, indices)
        rest = indices[taken:]
        run = self._run_size(len(rest)) if first.done() else 1

        async def probe_samples() -> list[Any]:
            return (await first)[0]

        parts = await gather_ordered(
            [probe_samples()] + [self._fetch_sync_run(rest[i : i + run]) for i in range(0, len(rest), run)]
        )
        return await self.finish_awaitables([sample for part in parts for sample in part], indices)

    async def _probe_run(self, indices: list[Any], probed: _Probed) -> tuple[list[Any], Any]:
        async with self._ctx.slots:
            return await self._ctx.threads.run(lambda: self._probe(indices, probed))

    def _run_size(self, count: int) -> int:
        """How many of ``count`` samples one thread call fetches: a run of about ``CHUNK_SECONDS``, so slow samples
        get a call each and wait concurrently; all of them when the limit allows one call at a time and samples are
        CPU-bound (a worker whose share of the cores is busy): calls of one sample would run one after the other
        anyway, each costing hand-offs between the loop and a thread, and under contention for the cores each
        hand-off gave the core away (measured: a CPU-bound worker's first batch ~20% later than torch's)."""
        speed = self._ctx.speed
        per_sample = speed.per_sample
        if per_sample is None:
            return 1
        if self._ctx.slots.limit == 1 and speed.cpu_bound:
            return count
        return max(1, min(count, int(CHUNK_SECONDS / max(per_sample, 1e-9))))

    async def _fetch_sync_run(self, indices: list[Any]) -> list[Any]:
        per_sample = self._ctx.speed.per_sample
        # Only a run known to be fast may go to the consumer: not a first sample, which may wait on anything.
        quick = per_sample is not None and per_sample * len(indices) < CHUNK_SECONDS
        async with self._ctx.slots:
            fetched, _ = await self._ctx.run_sync(lambda: self.run(indices, finish=False), quick)
        return fetched

    async def _resolve_awaitables(self, samples: list[Any], indices: list[Any]) -> list[Any]:
        # A sync __getitem__ may return an awaitable, e.g. a ConcatDataset over async datasets: await it here.
        if not any_awaitable(samples):
            return samples
        ctx = self._ctx

        async def settle(sample: Any, index: Any) -> Any:
            if not inspect.isawaitable(sample):
                return sample
            async with ctx.slots:
                try:
                    return await sample
                except Exception as exc:
                    return ctx.failed("fetch", exc, f"fetching sample index {index!r}")

        return await gather_ordered([settle(s, i) for s, i in zip(samples, indices, strict=True)])

    # ----------------------------------------------------------------------------------------- thread side
    def _timed_unit(self, indices: list[Any]) -> tuple[list[Any], Any]:
        """A whole unit in one call, timed for the lane. Units made at the same time in other threads share the GIL
        with this one: the time is divided by how many ran, or a fast dataset fetched two units at a time would
        look twice as slow as it is."""
        with self._timing_lock:
            self._timing += 1
            sharing = self._timing
        started = time.perf_counter()
        try:
            return self.run(indices, finish=True)
        finally:
            seconds = time.perf_counter() - started
            with self._timing_lock:
                sharing = max(sharing, self._timing)
                self._timing -= 1
            self._ctx.speed.unit_took(seconds / sharing)

    def run(self, indices: list[Any], finish: bool, record: Record | None = None) -> tuple[list[Any], Any]:
        """Fetch ``indices`` in order; with ``finish``, also transform, collate and pin: (samples, batch or
        UNFINISHED). Stage times go to ``record`` (the lane collects a call's and records them at once)."""
        ctx, access = self._ctx, self.access
        record = record or ctx.stats.add
        reads_cpu = ctx.slots.reads_cpu
        started, computed = time.perf_counter(), time.thread_time() if reads_cpu else 0.0
        keyed = [access.key(index) for index in indices] if access.remaps else indices
        if finish and self._tensors is not None:
            batch = self._finisher.gathered(self._tensors, keyed)
            if batch is not None:
                elapsed = time.perf_counter() - started
                record("fetch", len(indices), elapsed)
                computing = (time.thread_time() - computed) / elapsed if reads_cpu and elapsed > 0 else None
                ctx.speed.sample_took(elapsed / len(indices), computing)
                return [], batch
        samples: list[Any] = []
        append, getitem = samples.append, access.getitem
        keys = iter(keyed)
        while True:  # as tight as torch's own loop; a sample that raises is marked (or raised), the rest go on
            try:
                for key in keys:
                    append(getitem(key))
                break
            except Exception as exc:
                append(ctx.failed("fetch", exc, f"fetching sample index {indices[len(samples)]!r}"))
        elapsed = time.perf_counter() - started
        computing = (time.thread_time() - computed) / elapsed if reads_cpu and elapsed > 0 else None
        record("fetch", len(indices), elapsed)
        ctx.speed.sample_took(elapsed / len(indices), computing)
        if finish and not any_awaitable(samples):
            return samples, self._finisher.finish_sync(indices, samples, "sample index", record=record)
        return samples, UNFINISHED

    def _probe(self, indices: list[Any], probed: _Probed) -> tuple[list[Any], Any]:
        """Thread side of ``_probe_first``: the first sample; then, if it took under ``CHUNK_SECONDS``, as many of the
        rest as stay quick, in chunks that double (1, 2, 4, ...) until the call has taken ``CHUNK_SECONDS`` after its
        first sample; all the rest if the first was CPU-bound and calls run one at a time. Returns (the samples of
        the positions it took, the batch once it took every sample, else UNFINISHED)."""
        started = time.perf_counter()
        samples, _ = self.run(indices[:1], finish=False)
        ctx = self._ctx
        if ctx.slots.limit == 1 and ctx.speed.cpu_bound:
            part = probed.take(len(indices))
            if part is not None:
                more, _ = self.run(indices[part[0] :], finish=False)
                samples += more
        elif time.perf_counter() - started < CHUNK_SECONDS:  # a slow first sample (storage): the rest concurrently
            started, chunk = time.perf_counter(), 1
            while time.perf_counter() - started < CHUNK_SECONDS:
                part = probed.take(chunk)
                if part is None:
                    break
                more, _ = self.run(indices[part[0] : part[1]], finish=False)
                samples += more
                chunk *= 2
        if len(samples) < len(indices) or any_awaitable(samples) or inspect.iscoroutinefunction(ctx.plan.transform):
            return samples, UNFINISHED  # (an async transform runs on the loop)
        return samples, self._finisher.finish_sync(indices, samples, "sample index")

    def getitems_sync(self, indices: list[Any], record: Record) -> tuple[list[Any], Any]:
        """A batch through the dataset's sync ``__getitems__``, as the loop side does it: (samples, batch or
        UNFINISHED)."""
        ctx, access = self._ctx, self.access
        assert access.getitems is not None
        started = time.perf_counter()
        try:
            samples = access.getitems([access.key(index) for index in indices])
        except Exception as exc:
            if not ctx.plan.skipping:
                ctx.stats.failure("fetch")
                where = f"fetching the batch of sample indices {describe_indices(indices)} with __getitems__"
                raise with_context(exc, where)
            return self.run(indices, True, record)  # only the samples that fail are skipped
        record("fetch", len(indices), time.perf_counter() - started)
        return [], self._finisher.finish_sync(indices, list(samples), "sample index", record=record)
