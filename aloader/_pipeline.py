"""The async core: source -> fetch -> transform -> collate -> reorder window -> sink.

One :class:`Pipeline` serves one iterator. Both drivers run it unchanged: ``async for`` in the caller's loop with an
:class:`asyncio.Queue` as sink, ``for`` on the bridge's background loop with a cross-thread channel as sink.

Flow of one epoch::

    dispatcher task: pulls units from the source (index lists from the sampler, or raw items from an iterable
      |              dataset), at most ``window`` units between dispatch and hand-off, one batch task each
      v
    batch tasks:     fetch samples (at most ``concurrency`` fetch calls in flight), transform, collate, pin
      |              -> _complete(seq, outcome): in_order keeps a reorder buffer keyed by seq
      v
    emitter task:    done queue -> sink, releasing one window slot per batch handed off

Failures are outcomes, not crashes: a sample that raises becomes a ``Failed`` item at its batch's position, the
consumer raises it there, and iteration may go on with the next batch, as with torch's DataLoader. Only a timeout
ends the pipeline early. Memory is bounded by ``window + depth`` batches whatever the dataset's size.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import threading
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from torch.utils.data import Subset
from torch.utils.data._utils.pin_memory import pin_memory as _torch_pin_memory

from aloader._failures import Collated, FailureBudget, Skipped, logger, named, split_skipped, transform_each
from aloader._pool import IterStop, Op, WorkerPool, describe_indices
from aloader._stats import Recorder, Stage, TimedSemaphore
from aloader._threads import ThreadPool, _deliver, finish_through_cancellation
from aloader.errors import with_context

__all__ = ["END", "SKIPPED", "DatasetKind", "Failed", "Pipeline", "Plan", "Sink", "Speed", "pool_kind"]

DatasetKind = Literal["map", "iterable", "async-iterable"]

# A run of fast samples is fetched in one thread call of about this many seconds; slow samples get a call each.
_CHUNK_SECONDS: Final = 0.002
# The fast lane (Pipeline._lane_units): consecutive batches that each take less than _CHUNK_SECONDS are made in one
# thread call of about _LANE_SECONDS, at most _LANE_UNITS of them, until units average _LANE_EXIT_SECONDS.
_LANE_SECONDS: Final = 0.006
_LANE_UNITS: Final = 16
_LANE_EXIT_SECONDS: Final = 0.008


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Final = _End()
"""The last item a pipeline hands to its sink: the epoch is complete."""

# A unit that yields no batch: a worker whose copy of an iterable dataset was already exhausted.
_SKIP: Final = object()


class _SkippedUnit:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED: Final = _SkippedUnit()
"""Handed to the sink in place of a unit that ``max_failures`` skipped whole (every sample failed): the consumer
counts it as a consumed unit (so a resume skips it too) and yields nothing for it."""


class Failed:
    """An outcome that is an exception: the consumer raises ``error`` at this batch's position."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Sink(Protocol):
    """Where finished batches go; ``put`` waits while the consumer is behind (the prefetch bound)."""

    async def put(self, item: object) -> None: ...

    def put_final(self, item: object) -> None:
        """Append without waiting for room: only for the last items of a pipeline that cannot go on."""

    @property
    def capacity(self) -> int: ...

    def put_many(self, items: list[object]) -> None:
        """Append ``items``, for which there is room now, at once (one wake-up of the consumer)."""

    def resize(self, capacity: int) -> None:
        """Hold up to ``capacity`` items from now on (items already held above it stay)."""

    def __len__(self) -> int: ...


class Speed:
    """How fast a loader's sync samples and units have been: moving averages of seconds per call, in threads.

    The loader keeps one across its epochs, so an epoch starts with what the last one learnt (whole-batch calls,
    the fast lane) instead of learning it again from a call per sample.
    """

    __slots__ = ("per_sample", "per_unit")

    def __init__(self) -> None:
        self.per_sample: float | None = None
        self.per_unit: float | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one epoch needs, captured at ``iter(loader)`` time in the caller's thread."""

    kind: DatasetKind
    dataset: Any
    # map: an iterator (sync or async) of index lists (auto-collation) or of single indices; iterable kinds:
    # the dataset's own iterator.
    source: Iterator[Any] | AsyncIterator[Any]
    auto_collation: bool
    # Set when indices come one by one from an async sampler and we batch them (torch's BatchSampler cannot
    # iterate an async iterable): (batch_size, drop_last).
    batch_async_indices: tuple[int, bool] | None
    batch_size: int | None
    drop_last: bool
    collate_fn: Callable[[Any], Any]
    transform: Callable[[Any], Any] | None
    concurrency: int
    window: int  # units between dispatch and hand-off to the sink
    timeout: float
    in_order: bool
    pin_memory_device: str | None  # None: do not pin
    # num_workers > 0 and work for processes (see pool_kind): the pool, and whether this epoch owns it (closes it
    # at its end) or the loader does (persistent_workers).
    workers: WorkerPool | None = None
    owns_workers: bool = False
    # max_failures: failing samples are skipped (see _failures) up to this count or share; None: torch's behaviour.
    max_failures: int | float | None = None
    progress: bool = False
    speed: Speed = field(default_factory=Speed)


class _MapAccess:
    """How samples of a map-style dataset are fetched, resolved once per epoch.

    torch's ``Subset`` (as made by ``random_split``) defines ``__getitems__``, which would turn every batch into a
    single sequential call; an unmodified ``Subset`` is unwrapped instead, so the samples of a split dataset are
    fetched concurrently too. The result is the same: ``Subset`` only maps indices.
    """

    __slots__ = ("getitem", "getitem_is_async", "getitems", "getitems_is_async", "remaps")

    def __init__(self, dataset: Any) -> None:
        remaps: list[Sequence[Any]] = []
        while (
            type(dataset) is Subset
            or (
                isinstance(dataset, Subset)
                and type(dataset).__getitem__ is Subset.__getitem__
                and type(dataset).__getitems__ is Subset.__getitems__
            )
        ) and not callable(getattr(dataset.dataset, "__getitems__", None)):
            remaps.append(dataset.indices)
            dataset = dataset.dataset
        self.remaps = remaps[::-1]  # innermost mapping applied last
        getitems = getattr(dataset, "__getitems__", None)
        self.getitems: Callable[[list[Any]], Any] | None = getitems if callable(getitems) and getitems else None
        self.getitems_is_async = self.getitems is not None and inspect.iscoroutinefunction(self.getitems)
        self.getitem: Callable[[Any], Any] = dataset.__getitem__
        self.getitem_is_async = inspect.iscoroutinefunction(self.getitem)

    def key(self, index: Any) -> Any:
        for indices in reversed(self.remaps):
            index = indices[index]
        return index


_describe_indices = describe_indices


def pool_kind(kind: DatasetKind, dataset: Any, transform: Any) -> Literal["map", "iterable", "items"] | None:
    """What the process pool does for a dataset, or None when it has nothing to do.

    A sync map-style dataset is fetched, transformed and collated in the workers, as in torch; each worker iterates
    its own copy of a sync iterable dataset. Async datasets fetch on the event loop (processes would only add a
    hop); their samples go to the workers for a sync ``transform`` (and collate), and with no transform there is no
    CPU work for processes, so no pool is started. Nor is one with an ``async def`` transform, which runs on the
    event loop of the main process.
    """
    if transform is not None and inspect.iscoroutinefunction(transform):
        return None  # an async transform runs on the event loop: everything stays in the main process
    sync_transform = transform is not None
    if kind == "map":
        access = _MapAccess(dataset)
        if not access.getitem_is_async and not access.getitems_is_async:
            return "map"
    elif kind == "iterable":
        return "iterable"
    return "items" if sync_transform else None


class Pipeline:
    """One epoch of the async core; ``run(sink)`` drives it to the end (or until cancelled)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._pool = ThreadPool(plan.concurrency + 2)
        self.stats = Recorder()
        self._slots = TimedSemaphore(plan.concurrency, self.stats, "fetch")  # fetch calls in flight
        self._window = asyncio.Semaphore(plan.window)  # units dispatched and not yet handed to the sink
        self._done: asyncio.Queue[object] = asyncio.Queue()  # bounded by the window
        self._ready: dict[int, object] = {}  # in_order: finished out of turn, keyed by seq
        self._next_seq = 0
        self._outstanding = 0
        self._source_done = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._access = _MapAccess(plan.dataset) if plan.kind == "map" else None
        self._speed = plan.speed
        # The fast lane (see _lane_units): whether this pipeline may use it at all (a sync map-style dataset in
        # this process).
        self._lane_ok = (
            self._access is not None
            and plan.workers is None
            and not self._access.getitem_is_async
            and not self._access.getitems_is_async
            and not inspect.iscoroutinefunction(plan.transform)
        )
        self._lane_width = 0  # units the window and the sink were widened for
        self._window_debt = 0  # window slots to take back (the lane went out of use), see _widen
        self._depth: int | None = None  # the sink's own capacity
        self._timing = 0  # whole units being made in threads right now (see _timed_unit)
        self._timing_lock = threading.Lock()
        # The lane's own thread: its calls run one after another, so the next call's units are queued while the
        # current one runs, and lane calls never contend with each other for the GIL.
        self._lane_thread = ThreadPool(1, name="aloader-lane")
        self._sink: Sink | None = None
        self._workers = plan.workers
        self._items_sent = 0  # "items" tasks so far: they go round-robin over the workers
        self._active: list[bool] = []  # iterable dataset in workers: whose copy is not exhausted yet
        self._resets: list[asyncio.Future[Any] | None] = []
        # Tasks for worker processes follow torch's pacing: prefetch_factor * num_workers tasks ahead of the batches
        # the consumer has taken (``window`` is that bound), a slot freed when the consumer takes a batch rather
        # than when the batch reaches the sink. So when an epoch ends early the workers have run exactly the tasks
        # torch's would have, and with persistent workers the random state they carry into the next epoch is the same.
        self.paced_by_consumer = self._workers is not None and self._workers.setup.kind in ("map", "iterable")
        self._taken = 0  # batches the consumer has taken (counted when paced_by_consumer)
        self._submitted = 0  # tasks sent to workers
        self._skipping = plan.max_failures is not None
        self._budget = (
            FailureBudget(plan.max_failures, lambda s: self.stats.failure(s.stage, skipped=True))
            if plan.max_failures is not None
            else None
        )

    # ----------------------------------------------------------------------------------------------- driving
    def fork_workers_if_safe(self) -> None:
        """Sync driver only, in the consumer's thread before the bridge starts: fork the worker processes now if
        that is safe (see ``WorkerPool.start_by_fork_if_safe``). The ``async for`` driver never forks here: a fork
        takes tens of milliseconds, which would block the caller's loop; its workers start off the loop in run()."""
        workers = self._workers
        if workers is not None and not workers.started:
            workers.start_by_fork_if_safe()

    async def run(self, sink: Sink) -> None:
        """Run the epoch, handing every outcome and finally ``END`` to ``sink``. Cancel the task to stop early."""
        dispatcher: asyncio.Task[None] | None = None
        self._sink, self._depth = sink, sink.capacity
        self.stats.start(sink.capacity)
        try:
            workers = self._workers
            if workers is not None and not workers.started:
                # Starting processes blocks (forkserver round trips, pickling the dataset): off the loop.
                try:
                    await self._pool.run(workers.start)
                except Exception as exc:
                    exc.add_note(
                        "aloader: starting the DataLoader's worker processes failed; the dataset, collate_fn, "
                        "transform and worker_init_fn must be picklable to reach them"
                    )
                    raise
            dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
            await self._emit(sink)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a defect in the pipeline itself: never leave the consumer waiting
            sink.put_final(Failed(exc))
            sink.put_final(END)
        finally:
            # Structured shutdown: no task of ours outlives this call, and no thread outlives the pool. Both waits
            # go on through cancellation (the consumer's close() may cancel us while we are already finishing,
            # and a closing loop cancels every task), then the cancellation is passed on.
            self.stats.end()
            pending = [*([dispatcher] if dispatcher is not None else []), *self._tasks]
            for task in pending:
                task.cancel()
            try:
                await finish_through_cancellation(asyncio.gather(*pending, return_exceptions=True))
                workers = self._workers
                if workers is not None and workers.setup.kind == "map" and not self.plan.owns_workers:
                    self._send_owed_tasks()  # persistent workers: their state carries into the next epoch
                # An async dataset's iterator (e.g. an async generator reading shards) may hold tasks and
                # connections of its own: close it now rather than whenever it is garbage collected.
                await finish_through_cancellation(asyncio.ensure_future(self._close_source()))
            finally:
                try:
                    if self._workers is not None and self.plan.owns_workers:
                        await finish_through_cancellation(self._close_workers(self._workers))
                finally:
                    try:
                        await finish_through_cancellation(self._lane_thread.close())
                    finally:
                        await finish_through_cancellation(self._pool.close())
                        self._pool.join()
                        self._lane_thread.join()

    @staticmethod
    def _close_workers(workers: WorkerPool) -> asyncio.Future[None]:
        """Close the process pool in a thread of its own (joining processes blocks); a plain future, so a loop
        shutting down cannot cancel the wait (see ``finish_through_cancellation``)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def close() -> None:
            try:
                workers.close()
            finally:
                try:
                    loop.call_soon_threadsafe(_deliver, done, True, None)
                except RuntimeError:  # the loop is gone: nobody waits
                    pass

        thread = threading.Thread(target=close, name="aloader-pool-close", daemon=True)
        thread.start()
        done.add_done_callback(lambda _: thread.join())
        return done

    async def _close_source(self) -> None:
        aclose = getattr(self.plan.source, "aclose", None) if self.plan.kind == "async-iterable" else None
        if aclose is None:
            return
        try:
            await aclose()
        except Exception:
            pass  # the iterator failed while closing; the epoch's own outcome has already been reported

    async def _emit(self, sink: Sink) -> None:
        timeout = self.plan.timeout
        while True:
            waited = time.perf_counter()
            if timeout > 0:
                try:
                    async with asyncio.timeout(timeout):
                        item = await self._done.get()
                except TimeoutError:
                    # torch's text, so handlers written for torch's DataLoader keep working.
                    await sink.put(Failed(RuntimeError(f"DataLoader timed out after {timeout} seconds")))
                    await sink.put(END)
                    return
            else:
                item = await self._done.get()
            ready = time.perf_counter()
            await sink.put(item)
            if item is END:
                return
            if item is not SKIPPED:
                self.stats.handed_off(isinstance(item, Failed), ready - waited, time.perf_counter() - ready, len(sink))
            if not self.paced_by_consumer:
                self._release_window()
            if not self._done.empty() and self._emit_ready(sink):
                return

    def _emit_ready(self, sink: Sink) -> bool:
        """Hand over the outcomes that are ready and fit in the sink, at once: a lane call completes ``k`` together,
        and one hand-off wakes the consumer once for all of them instead of once each. True if END was among them."""
        room = sink.capacity - len(sink)
        items: list[object] = []
        while len(items) < room and not self._done.empty():
            items.append(self._done.get_nowait())
            if items[-1] is END:
                break
        sink.put_many(items)
        batches = [item for item in items if item is not END and item is not SKIPPED]
        self.stats.handed_off_many([isinstance(item, Failed) for item in batches], len(sink))
        if not self.paced_by_consumer:
            for item in items:
                if item is not END:
                    self._release_window()
        return bool(items) and items[-1] is END

    def taken(self) -> None:
        """The consumer took a batch (or an error) from the sink; called on the pipeline's loop."""
        self._taken += 1
        if self.paced_by_consumer:
            self._release_window()

    def _complete(self, seq: int, outcome: object) -> None:
        if self.plan.in_order:
            self._ready[seq] = outcome
            while self._next_seq in self._ready:
                self._hand_off(self._ready.pop(self._next_seq))
                self._next_seq += 1
        else:
            self._hand_off(outcome)
        self._outstanding -= 1
        self._end_if_finished()

    def _hand_off(self, outcome: object) -> None:
        if self._budget is not None:  # in hand-off order: the budget runs out at the same batch in every run
            # A unit skipped whole still goes to the consumer, as SKIPPED: it counts as consumed in the state.
            outcome = self._budget.settle(outcome, SKIPPED, Failed)
        if outcome is _SKIP:
            self._release_window()  # no batch to hand to the sink: the slot is free now
        else:
            self._done.put_nowait(outcome)

    def _end_if_finished(self) -> None:
        if self._source_done and self._outstanding == 0:
            self._done.put_nowait(END)

    def _start(self, seq: int, work: Callable[[], Awaitable[Any]]) -> None:
        self._spawn(self._settle(seq, work))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, seq: int, work: Callable[[], Awaitable[Any]]) -> None:
        # ``work`` is called here, not by _start: a task cancelled before it first runs then leaves no coroutine
        # that was never awaited.
        try:
            outcome: object = await work()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the consumer raises it at this batch
            outcome = Failed(exc)
        self._complete(seq, outcome)

    # ------------------------------------------------------------------------------------------- dispatching
    async def _dispatch(self) -> None:
        seq = 0
        try:
            if self.plan.kind == "map":
                next_unit = self._index_source()
                while True:
                    started = time.perf_counter()
                    await self._window.acquire()
                    drawn = time.perf_counter()
                    self.stats.blocked("sampler", drawn - started)
                    try:
                        unit = await next_unit()
                    except StopAsyncIteration:
                        self._release_window()
                        break
                    except Exception as exc:
                        # The sampler failed: raise where its batch would have been, then end the epoch.
                        self._outstanding += 1
                        self._complete(seq, Failed(with_context(exc, "in the sampler")))
                        break
                    self.stats.add("sampler", len(unit) if self.plan.auto_collation else 1, time.perf_counter() - drawn)
                    self._outstanding += 1
                    workers = self._workers
                    lane = self._lane_units()
                    if lane > 1:
                        units, stop = await self._draw_more(next_unit, lane - 1)
                        units.insert(0, unit)
                        self._outstanding += len(units) - 1
                        self._spawn(self._lane(seq, units))
                        seq += len(units)
                        if stop is None:
                            continue
                        if isinstance(stop, Exception):
                            self._outstanding += 1
                            self._complete(seq, Failed(with_context(stop, "in the sampler")))
                        break
                    if workers is not None and workers.setup.kind == "map":
                        submitted = time.perf_counter()
                        future = self._submit_map(unit)
                        self._start(seq, functools.partial(self._await_batch, future, submitted, unit))
                    else:
                        self._start(seq, functools.partial(self._map_unit, unit))
                    seq += 1
            elif self._workers is not None and self._workers.setup.kind == "iterable":
                await self._dispatch_worker_iterable(self._workers)
            else:
                await self._dispatch_iterable()
        finally:
            self._source_done = True
            self._end_if_finished()

    def _index_source(self) -> Callable[[], Awaitable[Any]]:
        """Return a coroutine function giving the next unit of indices, raising StopAsyncIteration at the end."""
        source = self.plan.source
        if isinstance(source, AsyncIterator):
            if self.plan.batch_async_indices is None:
                return source.__anext__
            batch_size, drop_last = self.plan.batch_async_indices

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

    async def _dispatch_iterable(self) -> None:
        plan = self.plan
        wanted = plan.batch_size if plan.auto_collation and plan.batch_size is not None else 1
        position = 0  # items taken from the dataset's iterator so far
        seq = 0
        skipped_last = False  # max_failures: the last pull raised and was skipped
        while True:
            await self._window.acquire()
            pulled = time.perf_counter()
            items, error, ended = await self._pull(wanted)
            if skipped_last and ended and not items and error is None:
                _warn_ended_after_failure(position - 1)
            skipped_last = False
            first = position
            position += len(items)
            while error is not None and self._skipping:
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
            self.stats.add("fetch", len(items), time.perf_counter() - pulled)
            if error is not None:
                self.stats.failure("fetch")
                # torch drops the partial batch and raises; the next fetch asks the iterator again.
                self._outstanding += 1
                where = f"fetching item {position} of the iterable dataset"
                self._complete(seq, Failed(with_context(error, where)))
                seq += 1
                position += 1
                continue
            if not items or (plan.auto_collation and plan.drop_last and len(items) < wanted):
                self._release_window()
                return
            self._outstanding += 1
            positions = list(range(first, first + len(items)))
            self._start(seq, functools.partial(self._finish, positions, items, "item"))
            seq += 1
            if ended:
                return

    async def _dispatch_worker_iterable(self, workers: WorkerPool) -> None:
        """Each worker iterates its own copy; batches come round-robin from the workers whose copy is not exhausted,
        as in torch. A request to an exhausted worker yields no batch (``_SKIP``), so dispatching ahead of knowing
        which workers are exhausted still gives torch's sequence."""
        n = workers.num_workers
        self._active = [True] * n
        self._resets = [self._submit(w, "reset", None, "starting to iterate its copy of the dataset") for w in range(n)]
        seq, worker_id = 0, 0
        while True:
            await self._window.acquire()
            if not any(self._active):
                self._release_window()
                return
            while not self._active[worker_id]:
                worker_id = (worker_id + 1) % n
            self._outstanding += 1
            # Submitted here, not in the task: requests reach each worker in dispatch order, and a task cancelled
            # before it runs has still sent its request, as torch's would have.
            what = "fetching the next batch of its copy of the iterable dataset"
            future = self._submit(worker_id, "next", None, what)
            self._start(seq, functools.partial(self._worker_next, worker_id, future))
            seq, worker_id = seq + 1, (worker_id + 1) % n

    async def _worker_next(self, worker_id: int, future: asyncio.Future[Any]) -> Any:
        reset = self._resets[worker_id]
        if reset is not None:
            self._resets[worker_id] = None
            try:
                await reset  # iter(dataset) in the worker failed: raise it at this worker's first batch
            except Exception:
                self._active[worker_id] = False
                raise
        batch = await future
        if batch is IterStop:
            self._active[worker_id] = False
            return _SKIP
        return await self._pin(batch)

    def _submit(self, worker_id: int, op: Op, payload: Any, what: str) -> asyncio.Future[Any]:
        workers = self._workers
        assert workers is not None
        self._submitted += 1
        return workers.submit(worker_id, op, payload, what)

    def _submit_map(self, unit: Any) -> asyncio.Future[Any]:
        """As torch: the epoch's i-th batch goes to worker ``i % num_workers``, which fetches, transforms and collates
        it. Sent at dispatch, in sampler order, so each worker gets its batches in torch's order."""
        workers = self._workers
        assert workers is not None
        indices = list(unit) if self.plan.auto_collation else [unit]
        what = f"holding the batch of sample indices {_describe_indices(indices)}"
        return self._submit(self._submitted % workers.num_workers, "map", indices, what)

    async def _await_batch(self, future: asyncio.Future[Any], submitted: float, unit: Any) -> Any:
        batch = await future
        # fetch, transform and collate, all in the worker, with the round trip
        self.stats.add("fetch", len(unit) if self.plan.auto_collation else 1, time.perf_counter() - submitted)
        return await self._pin(batch)

    def _send_owed_tasks(self) -> None:
        """An epoch of a persistent pool ended early: send the map tasks torch would have sent by now.

        torch has sent ``prefetch_factor * num_workers`` tasks plus one per batch the consumer took, and its
        persistent workers run them all before the next epoch (their results discarded). The dispatcher may lag
        behind that count when the consumer stops; the missing tasks go out here, their results ignored, so the
        workers' random state at the next epoch is torch's. Only for a sync sampler (an async one cannot be
        advanced outside a task).
        """
        source = self.plan.source
        if isinstance(source, AsyncIterator) or self._workers is None or self._workers.broken:
            return
        while self._submitted < self.plan.window + self._taken:
            try:
                unit = next(source)
            except Exception:  # the end of the sampler (or its failure, already past the consumer): nothing owed
                return
            self._submit_map(unit)

    async def _pin(self, batch: Any) -> Any:
        device = self.plan.pin_memory_device
        if device is None:
            return batch
        return await self._pool.run(lambda: _pin_memory(batch, device))

    async def _pull(self, count: int) -> tuple[list[Any], BaseException | None, bool]:
        """Take up to ``count`` items from the dataset's iterator: (items, error, ended)."""
        source = self.plan.source
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
        return await self._pool.run(pull)

    # ------------------------------------------------------------------------------------------------ fetching
    async def _map_unit(self, unit: Any) -> Any:
        access = self._access
        assert access is not None
        indices = list(unit) if self.plan.auto_collation else [unit]
        if self.plan.auto_collation and access.getitems is not None:
            return await self._fetch_getitems(indices)
        if access.getitem_is_async:
            samples = await self._gather_ordered([self._fetch_async(index) for index in indices])
            return await self._finish(indices, samples, "sample index")
        return await self._fetch_sync(indices)

    async def _fetch_getitems(self, indices: list[Any]) -> Any:
        access = self._access
        assert access is not None
        assert access.getitems is not None
        getitems = access.getitems
        keys = [access.key(index) for index in indices]
        where = f"fetching the batch of sample indices {_describe_indices(indices)} with __getitems__"
        started = time.perf_counter()
        try:
            async with self._slots:  # one __getitems__ call is one fetch call
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

                    samples = await self._pool.run(fetch)
        except Exception:
            if not self._skipping:
                self.stats.failure("fetch")
                raise
            # Under max_failures a failed batch call is fetched again sample by sample, so only the samples that
            # fail are skipped (__getitem__ may be called twice for the others).
            if access.getitem_is_async:
                fetched = await self._gather_ordered([self._fetch_async(index) for index in indices])
                return await self._finish(indices, fetched, "sample index")
            return await self._fetch_sync(indices)
        self.stats.add("fetch", len(indices), time.perf_counter() - started)
        return await self._finish(indices, list(samples), "sample index")

    async def _fetch_async(self, index: Any) -> Any:
        access = self._access
        assert access is not None
        async with self._slots:
            started = time.perf_counter()
            try:
                sample = await access.getitem(access.key(index))
            except Exception as exc:
                return self._failed("fetch", exc, f"fetching sample index {index!r}")
            self.stats.add("fetch", 1, time.perf_counter() - started)
            return sample

    # --------------------------------------------------------------------------------------------- fast lane
    def _lane_units(self) -> int:
        """How many consecutive units to make in one thread call: more than one once units are known to be fast.

        A fast unit (a batch of in-memory samples: well under a millisecond of ``__getitem__`` and collate) costs
        less than the hand-offs around it: the dispatcher's task, the thread call and its return to the loop. The
        lane makes ``k`` of them per call, so those costs are paid once per ``k`` batches, and widens the window
        and the sink to ``2k`` and ``k`` units (two calls in flight, one call's batches waiting), a few milliseconds
        of work. Units that turn slow (waiting on I/O after all) take the lane out of use again.
        """
        per_unit = self._speed.per_unit
        if not self._lane_ok or per_unit is None:
            return 1
        # Hysteresis: in at under _CHUNK_SECONDS a unit, out at over _LANE_EXIT_SECONDS, so that one unit slowed
        # by a pause (a garbage collection, another process) does not take the lane out of use.
        if per_unit >= (_LANE_EXIT_SECONDS if self._lane_width else _CHUNK_SECONDS):
            self._widen(0)
            return 1
        units = max(1, min(_LANE_UNITS, int(_LANE_SECONDS / max(per_unit, 1e-9))))
        if units > self._lane_width:
            self._widen(units)
        return units

    def _widen(self, units: int) -> None:
        """Size the window and the sink for lane calls of ``units`` (0: no lane, the plan's own sizes)."""
        before = max(self.plan.window, 2 * self._lane_width)
        after = max(self.plan.window, 2 * units)
        for _ in range(after - before):
            self._window.release()
        self._window_debt += max(0, before - after)  # slots given back as batches are handed off
        if self._sink is not None and self._depth is not None:
            self._sink.resize(max(self._depth, units))
            self.stats.resized(self._sink.capacity)
        self._lane_width = units

    def _release_window(self) -> None:
        if self._window_debt:
            self._window_debt -= 1
        else:
            self._window.release()

    async def _draw_more(
        self, next_unit: Callable[[], Awaitable[Any]], wanted: int
    ) -> tuple[list[Any], BaseException | Literal["end"] | None]:
        """``wanted`` more units (fewer at the end): (units, None | "end" | the sampler's error).

        It waits for room in the window for each: a lane call of fewer units would pay the same hand-offs for less
        work, and the window (``2k``) always has a full call's worth of room once the previous call is handed off.
        """
        units: list[Any] = []
        while len(units) < wanted:
            await self._window.acquire()
            drawn = time.perf_counter()
            try:
                unit = await next_unit()
            except StopAsyncIteration:
                self._release_window()
                return units, "end"
            except Exception as exc:
                return units, exc
            self.stats.add("sampler", len(unit) if self.plan.auto_collation else 1, time.perf_counter() - drawn)
            units.append(unit)
        return units, None

    async def _lane(self, first: int, units: list[Any]) -> None:
        """Make ``units`` (sequence numbers from ``first``) in one thread call, and complete them in order."""
        try:
            async with self._slots:
                outcomes = await self._lane_thread.run(lambda: self._lane_run(units))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the thread call itself failed (not a sample: those are outcomes)
            outcomes = [Failed(exc)] * len(units)
        for seq, unit in enumerate(units, first):
            if seq - first >= len(outcomes):
                # The lane stopped at a slow unit: the rest are fetched as usual, concurrently.
                self._start(seq, functools.partial(self._map_unit, unit))
                continue
            outcome = outcomes[seq - first]
            if type(outcome) is _Unfinished:  # a sync __getitem__ returned awaitables: finish on the loop
                indices = list(unit) if self.plan.auto_collation else [unit]
                try:
                    samples = await self._resolve_awaitables(outcome.samples, indices)
                    outcome = await self._finish(indices, samples, "sample index")
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:
                    outcome = Failed(exc)
            self._complete(seq, outcome)

    def _lane_run(self, units: list[Any]) -> list[Any]:
        """Thread side of the lane: each unit fetched, transformed, collated and pinned, or its failure."""
        access = self._access
        assert access is not None
        outcomes: list[Any] = []
        entries: list[tuple[Stage, int, float]] = []  # the call's stage times, recorded at once at its end

        def record(stage: Stage, items: int, seconds: float) -> None:
            entries.append((stage, items, seconds))

        try:
            for unit in units:
                indices = list(unit) if self.plan.auto_collation else [unit]
                started = time.perf_counter()
                try:
                    if self.plan.auto_collation and access.getitems is not None:
                        outcomes.append(self._getitems_sync(indices, record))
                    else:
                        fetched, batch = self._fetch_run(indices, True, record)
                        outcomes.append(_Unfinished(fetched) if batch is _UNFINISHED else batch)
                except BaseException as exc:  # the consumer raises it at this batch, as for a batch task
                    outcomes.append(Failed(exc))
                seconds = time.perf_counter() - started
                self._time_unit(seconds)
                if seconds >= _LANE_EXIT_SECONDS:
                    break  # slow after all (I/O, a cache miss): the rest go back to concurrent fetching
        finally:
            self.stats.add_all(entries)
        return outcomes

    def _getitems_sync(self, indices: list[Any], record: _Record) -> Any:
        """Thread side: a batch through the dataset's sync ``__getitems__``, as ``_fetch_getitems`` does it."""
        access = self._access
        assert access is not None
        assert access.getitems is not None
        started = time.perf_counter()
        try:
            samples = access.getitems([access.key(index) for index in indices])
        except Exception as exc:
            if not self._skipping:
                self.stats.failure("fetch")
                where = f"fetching the batch of sample indices {_describe_indices(indices)} with __getitems__"
                raise with_context(exc, where)
            fetched, batch = self._fetch_run(indices, True, record)  # only the samples that fail are skipped
            return _Unfinished(fetched) if batch is _UNFINISHED else batch
        record("fetch", len(indices), time.perf_counter() - started)
        return self._finish_sync(indices, list(samples), "sample index", record=record)

    def _time_unit(self, seconds: float) -> None:
        # A benign race, as for Speed.per_sample.
        previous = self._speed.per_unit
        self._speed.per_unit = seconds if previous is None else 0.7 * previous + 0.3 * seconds

    async def _fetch_sync(self, indices: list[Any]) -> Any:
        """Fetch with sync ``__getitem__`` in threads, in runs sized so each call takes about 2 ms.

        Slow (I/O-bound) samples get a thread call each, so ``concurrency`` of them wait at once; fast ones are
        fetched, transformed and collated in a single call, so thread hand-offs do not dominate. The run size
        follows a moving average of the time per sample. User code never runs on the event loop itself: a sample
        that is usually fast can still block (a cache miss), and the loop must keep the other fetches going.
        """
        per_sample = self._speed.per_sample
        # Unknown speed (the first batches): a call per sample, so slow samples are fetched concurrently from the
        # start. Fast datasets pay this once: a few short-lived calls, then whole-batch runs.
        run = 1 if per_sample is None else max(1, min(len(indices), int(_CHUNK_SECONDS / max(per_sample, 1e-9))))
        if run >= len(indices) and not inspect.iscoroutinefunction(self.plan.transform):
            # The common fast case: one call does the whole batch, fetch to pinned batch.
            async with self._slots:
                fetched, batch = await self._pool.run(lambda: self._timed_unit(indices))
            if batch is not _UNFINISHED:
                return batch
            return await self._finish(indices, await self._resolve_awaitables(fetched, indices), "sample index")
        runs = [indices[i : i + run] for i in range(0, len(indices), run)]
        parts = await self._gather_ordered([self._fetch_sync_run(part) for part in runs])
        samples = [sample for part in parts for sample in part]
        return await self._finish(indices, await self._resolve_awaitables(samples, indices), "sample index")

    def _timed_unit(self, indices: list[Any]) -> tuple[list[Any], Any]:
        """Thread side: a whole unit in one call, timed for the lane. Units made at the same time in other threads
        share the GIL with this one: the time is divided by how many ran, or a fast dataset fetched two units at a
        time would look twice as slow as it is."""
        with self._timing_lock:
            self._timing += 1
            sharing = self._timing
        started = time.perf_counter()
        try:
            return self._fetch_run(indices, finish=True)
        finally:
            seconds = time.perf_counter() - started
            with self._timing_lock:
                sharing = max(sharing, self._timing)
                self._timing -= 1
            self._time_unit(seconds / sharing)

    async def _fetch_sync_run(self, indices: list[Any]) -> list[Any]:
        async with self._slots:
            fetched, _ = await self._pool.run(lambda: self._fetch_run(indices, finish=False))
        return fetched

    def _fetch_run(self, indices: list[Any], finish: bool, record: _Record | None = None) -> tuple[list[Any], Any]:
        """Thread side: fetch ``indices`` in order; with ``finish``, also transform, collate and pin. Stage times go
        to ``record`` (the lane collects a call's and records them at once), else straight to the stats."""
        record = record or self.stats.add
        access = self._access
        assert access is not None
        started = time.perf_counter()
        samples = []
        getitem = access.getitem
        keys = [access.key(index) for index in indices] if access.remaps else indices
        for index, key in zip(indices, keys, strict=True):
            try:
                samples.append(getitem(key))
            except Exception as exc:
                samples.append(self._failed("fetch", exc, f"fetching sample index {index!r}"))
        elapsed = time.perf_counter() - started
        record("fetch", len(indices), elapsed)
        elapsed /= len(indices)
        # A benign race: runs in threads update the average without a lock; any recent value is good enough.
        previous = self._speed.per_sample
        self._speed.per_sample = elapsed if previous is None else 0.7 * previous + 0.3 * elapsed
        if finish and not _any_awaitable(samples):
            return samples, self._finish_sync(indices, samples, "sample index", record=record)
        return samples, _UNFINISHED

    async def _resolve_awaitables(self, samples: list[Any], indices: list[Any]) -> list[Any]:
        # A sync __getitem__ may return an awaitable, e.g. a ConcatDataset over async datasets: await it here.
        if not _any_awaitable(samples):
            return samples

        async def settle(sample: Any, index: Any) -> Any:
            if not inspect.isawaitable(sample):
                return sample
            async with self._slots:
                try:
                    return await sample
                except Exception as exc:
                    return self._failed("fetch", exc, f"fetching sample index {index!r}")

        return await self._gather_ordered([settle(s, i) for s, i in zip(samples, indices, strict=True)])

    @staticmethod
    async def _gather_ordered(coros: list[Awaitable[Any]]) -> list[Any]:
        """Await all; if any failed, raise the failure of the earliest sample (the others are let finish)."""
        results = await asyncio.gather(*coros, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    # -------------------------------------------------------------------------------------- transform/collate
    async def _finish(self, positions: list[Any], samples: list[Any], label: str) -> Any:
        """Transform each sample, collate the batch and pin it; sync user code runs in a thread."""
        transform = self.plan.transform
        workers = self._workers
        if workers is not None and workers.setup.kind == "items":
            # Samples of an async dataset: the sync transform (CPU work) and collate run in a worker process.
            worker_id = self._items_sent % workers.num_workers
            self._items_sent += 1
            plural = "sample indices" if label == "sample index" else f"{label}s"
            what = f"holding the batch of {plural} {_describe_indices(positions)}"
            return await self._pin(await self._submit(worker_id, "items", (positions, samples, label), what))
        if transform is not None and inspect.iscoroutinefunction(transform):

            async def apply(sample: Any, position: Any) -> Any:
                if type(sample) is Skipped:
                    return sample
                started = time.perf_counter()
                try:
                    out = await transform(sample)
                except Exception as exc:
                    return self._failed("transform", exc, f"in transform for {label} {position!r}{named(sample)}")
                self.stats.add("transform", 1, time.perf_counter() - started)
                return out

            samples = await self._gather_ordered([apply(s, p) for s, p in zip(samples, positions, strict=True)])
            return await self._pool.run(lambda: self._finish_sync(positions, samples, label, transformed=True))
        return await self._pool.run(lambda: self._finish_sync(positions, samples, label))

    def _finish_sync(
        self,
        positions: list[Any],
        samples: list[Any],
        label: str,
        transformed: bool = False,
        record: _Record | None = None,
    ) -> Any:
        record = record or self.stats.add
        plan = self.plan
        transform = plan.transform
        if transform is not None and not transformed:
            started = time.perf_counter()
            out = transform_each(
                transform, samples, positions, label, lambda exc, where: self._failed("transform", exc, where)
            )
            record("transform", len(samples), time.perf_counter() - started)
            samples = out
        skipped: list[Skipped] = []
        seen = len(samples)
        if self._skipping:
            samples, positions, skipped = split_skipped(samples, positions)
            if not samples:
                return Collated(None, skipped, seen, empty=True)  # no batch: dropped (see _failures)
        started = time.perf_counter()
        try:
            batch = plan.collate_fn(samples if plan.auto_collation else samples[0])
        except Exception as exc:
            self.stats.failure("collate")
            plural = "sample indices" if label == "sample index" else f"{label}s"
            what = f"in collate_fn for the batch of {plural} {_describe_indices(positions)}"
            raise with_context(exc, what)
        if plan.pin_memory_device is not None:
            batch = _pin_memory(batch, plan.pin_memory_device)
        record("collate", len(samples), time.perf_counter() - started)
        return Collated(batch, skipped, seen) if self._skipping else batch

    def _failed(self, stage: Literal["fetch", "transform"], exc: Exception, where: str) -> Skipped:
        """A sample failed ``where``: a marker to skip it under ``max_failures``, else raise (torch's behaviour)."""
        error = with_context(exc, where)
        if not self._skipping:
            self.stats.failure(stage)
            raise error
        return Skipped(error, stage, where, exc)


_UNFINISHED: Final = object()

_Record = Callable[[Stage, int, float], None]  # where a thread call's stage times go (Recorder.add, or a lane list)


class _Unfinished:
    """A lane unit whose samples are awaitables: fetched in the thread, finished on the loop."""

    __slots__ = ("samples",)

    def __init__(self, samples: list[Any]) -> None:
        self.samples = samples


_pin_memory: Callable[[Any, str], Any] = _torch_pin_memory  # torch's helper (untyped), as its iterator calls it


# Sample types seen not to be awaitable. Awaitability is a property of the type, except for generators (a
# generator-based coroutine is a generator whose code has a flag), which are never cached.
_plain_types: set[type] = set()


def _any_awaitable(samples: list[Any]) -> bool:
    """Whether a sync fetch returned awaitables (e.g. a ConcatDataset over async datasets); cheap per sample."""
    if _plain_types.issuperset(map(type, samples)):  # the usual case, checked in C
        return False
    for sample in samples:
        kind = type(sample)
        if kind in _plain_types:
            continue
        if inspect.isawaitable(sample):
            return True
        if kind is not types.GeneratorType:
            _plain_types.add(kind)
    return False


def _warn_ended_after_failure(position: int) -> None:
    logger.warning(
        "the iterable dataset's iterator ended right after it raised at item %d: a generator cannot go on after an "
        "exception, so the items it had not yielded yet are lost",
        position,
    )


def window_for(concurrency: int, batch_size: int | None) -> int:
    """Units in flight needed to keep ``concurrency`` samples fetching, plus one to overlap batch boundaries."""
    per_unit = batch_size if batch_size else 1
    return math.ceil(concurrency / per_unit) + 1
