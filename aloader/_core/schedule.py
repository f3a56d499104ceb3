"""The scheduler: one task turns the sampler (or the iterable dataset) into units, never more than the window holds.

In: the plan's source, an iterator (sync or async) of index lists or indices, or the dataset's own iterator. Out:
units, each opened in the order stage with a sequence number and started as a task of the fetch stage (or the fast
lane, or the worker processes); for an iterable dataset in this process, the items pulled for a unit are its
fetch, and the task finishes them. A sampler that raises ends the epoch with its error at that position. It owns
the source's position.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from aloader._core.collate import Finisher
from aloader._core.context import Context
from aloader._core.fetch import PROBE_SECONDS, Fetcher
from aloader._core.lane import Back, Lane
from aloader._core.order import Order, Window
from aloader._core.workers import WorkerStage
from aloader._failures import Skipped, logger
from aloader.errors import with_context

__all__ = ["Scheduler"]

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class Scheduler:
    """Draws units and starts their work; ``run()`` is the scheduler's task."""

    def __init__(
        self,
        ctx: Context,
        window: Window,
        order: Order,
        spawn: Spawn,
        finisher: Finisher,
        fetcher: Fetcher | None,
        lane: Lane | None,
        workers: WorkerStage | None,
    ) -> None:
        self._ctx = ctx
        self._window = window
        self._order = order
        self._spawn = spawn
        self._finisher = finisher
        self._fetcher = fetcher
        self._lane = lane
        self._workers = workers

    def start(self, seq: int, work: Callable[[], Awaitable[Any]]) -> asyncio.Task[None]:
        """Run ``work`` as a task whose result (or exception) completes unit ``seq``."""
        return self._spawn(self._order.settle(seq, work))

    def start_unit(self, seq: int, unit: Any) -> asyncio.Task[None]:
        """A map-style unit's usual work: fetched concurrently in this process."""
        assert self._fetcher is not None
        return self.start(seq, functools.partial(self._fetcher.unit, unit))

    async def run(self, back: Back | None = None) -> None:
        """``back``: the sync driver's consumer made the first units before the loop existed (``prelude.py``) and
        gave the source back so: the epoch goes on after them."""
        try:
            if self._ctx.plan.kind == "map":
                await self._map(back)
            elif self._workers is not None and self._workers.kind == "iterable":
                await self._workers.dispatch_iterable(self._window, self._order, self.start)
            else:
                await self._iterable()
        finally:
            self._order.close()

    # ------------------------------------------------------------------------------------------------ map
    async def _map(self, back: Back | None) -> None:
        ctx, window, order, lane = self._ctx, self._window, self._order, self._lane
        next_unit = self._index_source()
        # A sampler's iterator, which the sync driver's consumer may draw from itself (see Lane.hand_source).
        source = ctx.plan.source
        draw = None if isinstance(source, AsyncIterator) else source.__next__
        seq = 0
        if back is not None:
            assert lane is not None
            seq = await lane.take_over(back)
        while True:
            started = time.perf_counter()
            await window.acquire()
            drawn = time.perf_counter()
            ctx.stats.blocked("sampler", drawn - started)
            try:
                unit = await next_unit()
            except StopAsyncIteration:
                window.release()
                return
            except Exception as exc:
                # The sampler failed: raise where its batch would have been, then end the epoch.
                order.fail(seq, with_context(exc, "in the sampler"))
                return
            ctx.stats.add("sampler", ctx.plan.size(unit), time.perf_counter() - drawn)
            order.open()
            count = lane.units() if lane is not None else 1
            # Fast units: to a consumer that waits for them. Slower ones too where it measured faster making them
            # itself (another thread holding the GIL makes fast units look slow, see Lane.hand_source).
            if lane is not None and draw is not None and (count > 1 or lane.may_try_source()):
                handed = await lane.hand_source(seq, unit, draw, slow=count == 1)
                if handed is not None:  # the consumer made units from seq on, and gave the source back
                    seq, stop = handed
                    if stop is None:
                        continue
                    if isinstance(stop, Exception):
                        order.fail(seq, with_context(stop, "in the sampler"))
                    return
            if lane is not None and count > 1:
                units, stop = await lane.draw(next_unit, count - 1)
                units.insert(0, unit)
                order.open(len(units) - 1)
                self._spawn(lane.run(seq, units, self.start_unit))
                seq += len(units)
                if stop is None:
                    continue
                if isinstance(stop, Exception):
                    order.fail(seq, with_context(stop, "in the sampler"))
                return
            if self._workers is not None and self._workers.kind == "map":
                self.start(seq, self._workers.map_work(seq, unit))
            else:
                task = self.start_unit(seq, unit)
                if lane is not None and ctx.speed.per_sample is None:
                    # A sync dataset of unknown speed (a loader's first batch): the other units wait for it, up to
                    # PROBE_SECONDS. Fast, it is done by then, and they go to the lane; slow (I/O), they start
                    # concurrently then. Started at once, each would probe in threads of its own, beside it.
                    await asyncio.wait([task], timeout=PROBE_SECONDS)
            seq += 1

    def _index_source(self) -> Callable[[], Awaitable[Any]]:
        """Return a coroutine function giving the next unit of indices, raising StopAsyncIteration at the end."""
        plan = self._ctx.plan
        source = plan.source
        if isinstance(source, AsyncIterator):
            if plan.batch_async_indices is None:
                return source.__anext__
            batch_size, drop_last = plan.batch_async_indices

            async def next_batch() -> list[Any]:
                batch: list[Any] = []
                async for index in source:
                    batch.append(index)
                    if len(batch) == batch_size:
                        return batch
                if not batch or (drop_last and len(batch) < batch_size):
                    raise StopAsyncIteration
                return batch

            return next_batch

        # A torch sampler: iterated on the loop, in the caller's process, as torch does. Samplers are cheap index
        # generators; one that waits on I/O should be an async iterable instead.
        async def next_unit() -> Any:
            try:
                return next(source)
            except StopIteration:
                raise StopAsyncIteration from None

        return next_unit

    # ------------------------------------------------------------------------------------------- iterable
    async def _iterable(self) -> None:
        ctx, window, order = self._ctx, self._window, self._order
        plan = ctx.plan
        wanted = plan.batch_size if plan.auto_collation and plan.batch_size is not None else 1
        position = 0  # items taken from the dataset's iterator so far
        seq = 0
        skipped_last = False  # max_failures: the last pull raised and was skipped
        while True:
            await window.acquire()
            pulled = time.perf_counter()
            items, error, ended = await self._pull(wanted)
            if skipped_last and ended and not items and error is None:
                _warn_ended_after_failure(position - 1)
            skipped_last = False
            first = position
            position += len(items)
            while error is not None and plan.skipping:
                # Under max_failures the failed item is skipped in its place and the batch filled up after it.
                where = f"fetching item {position} of the iterable dataset"
                items.append(Skipped(with_context(error, where), "fetch", where, error))
                position += 1
                error, skipped_last = None, True
                if len(items) < wanted and not ended:
                    more, error, ended = await self._pull(wanted - len(items))
                    items += more
                    position += len(more)
                    if not more and error is None and ended:
                        _warn_ended_after_failure(position - 1)
                    skipped_last = False
            ctx.stats.add("fetch", len(items), time.perf_counter() - pulled)
            if error is not None:
                ctx.stats.failure("fetch")
                # torch drops the partial batch and raises; the next fetch asks the iterator again.
                order.fail(seq, with_context(error, f"fetching item {position} of the iterable dataset"))
                seq += 1
                position += 1
                continue
            if not items or (plan.auto_collation and plan.drop_last and len(items) < wanted):
                window.release()
                return
            order.open()
            positions = list(range(first, first + len(items)))
            self.start(seq, functools.partial(self._finisher.finish, positions, items, "item"))
            seq += 1
            if ended:
                return

    async def _pull(self, count: int) -> tuple[list[Any], BaseException | None, bool]:
        """Take up to ``count`` items from the dataset's iterator: (items, error, ended)."""
        source = self._ctx.plan.source
        if isinstance(source, AsyncIterator):
            items: list[Any] = []
            try:
                for _ in range(count):
                    items.append(await anext(source))
            except StopAsyncIteration:
                return items, None, True
            except Exception as exc:
                return items, exc, False
            return items, None, False

        def pull() -> tuple[list[Any], BaseException | None, bool]:
            taken: list[Any] = []
            try:
                for _ in range(count):
                    taken.append(next(source))
            except StopIteration:
                return taken, None, True
            except Exception as exc:
                return taken, exc, False
            return taken, None, False

        # The dataset's own __next__ is user code: off the loop.
        return await self._ctx.threads.run(pull)


def _warn_ended_after_failure(position: int) -> None:
    logger.warning(
        "the iterable dataset's iterator ended right after it raised at item %d: a generator cannot go on after an "
        "exception, so the items it had not yielded yet are lost",
        position,
    )
