"""The pipeline: wires the stages of one epoch and owns their tasks, threads and shutdown, nothing else.

Data path, one file per stage::

    schedule.py  sampler / iterable -> units, at most ``window`` in flight (order.Window)
        |           map-style: fetch.py (tasks, threads, __getitems__), or lane.py (fast units k per thread call),
        |                      or workers.py (the units' batches made in worker processes)
        |           iterable:  the pulled items are the fetch
        v
    collate.py   transform (transform.py), collate_fn, pin_memory -> the unit's outcome
        v
    order.py     reorder buffer (in_order) and failure budget -> done queue, END at the end
        v
    sink.py      done -> the driver's sink (prefetch depth), timeout, pacing

Both drivers run it unchanged: ``async for`` in the caller's loop with an asyncio channel as sink, ``for`` on the
bridge's background loop with a cross-thread channel as sink. Failures are outcomes, not crashes: a sample that
raises becomes a ``Failed`` item at its batch's position, the consumer raises it there, and iteration may go on
with the next batch, as with torch's DataLoader. Only a timeout ends the pipeline early. Memory is bounded by
``window + depth`` batches whatever the dataset's size.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine
from typing import Any, cast

from aloader._core.access import MapAccess
from aloader._core.collate import Finisher
from aloader._core.context import Context
from aloader._core.fetch import Fetcher
from aloader._core.lane import Back, Lane
from aloader._core.order import Order, Window
from aloader._core.outcomes import END, Failed
from aloader._core.plan import Plan
from aloader._core.prelude import Ahead, AheadEnd, Prelude
from aloader._core.schedule import Scheduler
from aloader._core.sink import Emitter, Sink
from aloader._core.workers import WorkerStage
from aloader._failures import FailureBudget
from aloader._stats import Recorder
from aloader._threads import finish_through_cancellation

__all__ = ["Pipeline"]


class Pipeline:
    """One epoch of the async core; ``run(sink)`` drives it to the end (or until cancelled)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        ctx = self._ctx = Context(plan)
        self._tasks: set[asyncio.Task[None]] = set()
        window = self._window = Window(plan.window)
        budget = (
            FailureBudget(plan.max_failures, lambda s: ctx.stats.failure(s.stage, skipped=True))
            if plan.max_failures is not None
            else None
        )
        order = Order(plan.in_order, window, budget)
        if plan.ledger is not None:
            order.handed = plan.ledger.handed_off
        self._workers = WorkerStage(ctx, plan.workers) if plan.workers is not None else None
        paced = self._workers is not None and self._workers.paced
        self._emitter = Emitter(order.done, window, ctx.stats, plan.timeout, paced)
        ctx.consumer = self._emitter.offer
        offload = self._workers.finish_items if self._workers is not None and self._workers.kind == "items" else None
        finisher = Finisher(ctx, offload)
        access = MapAccess(plan.dataset) if plan.kind == "map" else None
        fetcher = Fetcher(ctx, access, finisher) if access is not None else None
        self._lane: Lane | None = None
        if (
            fetcher is not None
            and access is not None
            and plan.lane
            and plan.workers is None
            and access.is_sync
            and not inspect.iscoroutinefunction(plan.transform)
        ):
            self._lane = Lane(ctx, fetcher, window, order, self._emitter)
        self._scheduler = Scheduler(ctx, window, order, self._spawn, finisher, fetcher, self._lane, self._workers)

    @property
    def stats(self) -> Recorder:
        return self._ctx.stats

    @property
    def paced_by_consumer(self) -> bool:
        """The consumer must call ``taken()`` for each batch it takes (see ``Emitter.taken``)."""
        return self._emitter.paced

    def taken(self) -> None:
        """The consumer took a batch (or an error) from the sink; called on the pipeline's loop."""
        if self._workers is not None:
            self._workers.taken()  # before the window's slot is freed: the next batch's worker depends on it
        self._emitter.taken()

    def fork_workers_if_safe(self) -> None:
        """Sync driver only, in the consumer's thread before the bridge starts: fork the worker processes now if
        the default start would fork (see ``WorkerPool.start_by_fork_if_safe``), before the pipeline's threads exist.
        The ``async for`` driver starts them in run(), off the loop: a fork takes milliseconds per worker, which
        would block the caller's loop."""
        workers = self.plan.workers
        if workers is not None and not workers.started:
            workers.start_by_fork_if_safe()

    def prelude(self, capacity: int) -> Prelude | None:
        """Sync driver only, before the bridge starts: the source for its consumer to make the first batches
        itself, before the loop exists, if the units are known to be fast (see ``prelude.py``); else None.
        ``capacity``: the sink's (the stats count from here)."""
        if not Prelude.applies(self._ctx, self._lane):
            return None
        assert self._lane is not None
        self.stats.start(capacity)
        return Prelude(self._ctx, self._lane)

    def end_before_loop(self) -> None:
        """The epoch ended (or was closed) while its consumer still made the batches: no loop ever started, and
        no thread or task of the pipeline's exists (its pools start threads only for calls)."""
        self.stats.end()

    async def run_ahead(self, sink: Sink) -> None:
        """``async for``: units known to be fast are made by the lane's thread ahead of the pipeline's tasks
        (``prelude.Ahead``), which run only if those units need them (``run(sink, back)``); other units run the
        pipeline at once. An epoch that stays fast creates no task but this one."""
        prelude = self.prelude(sink.capacity)
        if prelude is None:
            await self.run(sink)
            return
        given_back: list[Back] = []

        def deliver(outcomes: list[object], end: AheadEnd) -> None:
            if outcomes:
                sink.put_made(ahead, outcomes)
            if end is END:
                sink.put_final(END)
            elif end is not None:
                given_back.append(cast(Back, end))

        ahead = Ahead(prelude, deliver)
        cancelled = False
        while not ahead.done.done():  # the thread's call is over: its thread has left the pool, or is leaving
            try:
                await asyncio.shield(ahead.done)
            except asyncio.CancelledError:  # closed or dropped (or the loop shuts down): stop, and wait for it
                cancelled = True
                ahead.stop()
        assert self._lane is not None
        self._lane.thread.join()
        if cancelled or not given_back:
            self.stats.end()
        if cancelled:
            raise asyncio.CancelledError
        if given_back:
            await self.run(sink, given_back[0])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self, sink: Sink, back: Back | None = None) -> None:
        """Run the epoch, handing every outcome and finally ``END`` to ``sink``. Cancel the task to stop early.
        ``back``: the sync driver's consumer made the first units itself and gave the source back so (``prelude``)."""
        scheduler: asyncio.Task[None] | None = None
        emitting: asyncio.Task[None] | None = None
        self.stats.start(sink.capacity)
        try:
            if self._workers is not None:
                await self._workers.start()  # off the loop: forkserver round trips, pickling the dataset
            loop = asyncio.get_running_loop()
            # The emitter first: it takes the sink before the scheduler's first unit may widen it or offer to it.
            emitting = loop.create_task(self._emitter.run(sink))
            scheduler = loop.create_task(self._scheduler.run(back))
            # The scheduler raises only from a defect of its own (a sample's or the sampler's failure is an
            # outcome): the consumer gets it at once, not an epoch that ends early or never.
            await asyncio.wait([scheduler, emitting], return_when=asyncio.FIRST_COMPLETED)
            if scheduler.done() and not scheduler.cancelled() and (defect := scheduler.exception()) is not None:
                raise defect
            await emitting
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a defect in the pipeline itself: never leave the consumer waiting
            if emitting is not None:
                emitting.cancel()
            sink.put_final(Failed(exc))
            sink.put_final(END)
        finally:
            self.stats.end()
            await self._shut_down(scheduler, emitting)

    async def _shut_down(self, scheduler: asyncio.Task[None] | None, emitting: asyncio.Task[None] | None) -> None:
        """Structured shutdown: no task of ours outlives this call, and no thread outlives its pool.

        Every wait goes on through cancellation (the consumer's close() may cancel us while we are already
        finishing, and a closing loop cancels every task), then the cancellation is passed on.
        """
        pending = [task for task in (scheduler, emitting) if task is not None] + [*self._tasks]
        for task in pending:
            task.cancel()
        ctx, workers = self._ctx, self._workers
        try:
            await finish_through_cancellation(asyncio.gather(*pending, return_exceptions=True))
            if workers is not None:
                workers.send_owed(self._emitter.taken_count)  # persistent workers: their state carries on
            # An async dataset's iterator (e.g. an async generator reading shards) may hold tasks and connections
            # of its own: close it now rather than whenever it is garbage collected.
            if self.plan.kind == "async-iterable":
                await finish_through_cancellation(asyncio.ensure_future(self._close_source()))
        finally:
            try:
                if workers is not None and self.plan.owns_workers:
                    await finish_through_cancellation(workers.close())
            finally:
                try:
                    if self._lane is not None:
                        await finish_through_cancellation(self._lane.thread.close())
                finally:
                    await finish_through_cancellation(ctx.threads.close())
                    ctx.threads.join()
                    if self._lane is not None:
                        self._lane.thread.join()

    async def _close_source(self) -> None:
        aclose = getattr(self.plan.source, "aclose", None)
        if aclose is None:
            return
        try:
            await aclose()
        except Exception:
            pass  # the iterator failed while closing; the epoch's own outcome has already been reported
