"""The hand-off to worker processes (``num_workers > 0``), as the main process's core sees it.

In: units from the scheduler (``map``: the epoch's i-th batch to worker ``i % num_workers``, sent at dispatch in
sampler order, as torch does; with ``in_order=False`` to the next worker in turn with room, as torch's), samples to
finish (``items``: an async dataset's samples, transformed and collated in a worker), or requests for the next batch
of a worker's copy of an iterable dataset (``iterable``, round-robin over the workers whose copy is not exhausted;
with ``in_order=False`` the next of them in turn with room, as torch's).
Out: the batches, pinned here, as outcomes. It owns the count of tasks sent, which keeps a persistent pool's workers
exactly where torch's would be when an epoch ends early.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aloader._core.access import describe_indices
from aloader._core.collate import pin_batch, plural
from aloader._core.context import Context
from aloader._core.order import Order, Window
from aloader._core.outcomes import NO_BATCH, WithState
from aloader._core.plan import Workers
from aloader._threads import _deliver

__all__ = ["WorkerStage"]

# Starts a unit's task: (seq, work).
Start = Callable[[int, Callable[[], Awaitable[Any]]], object]


class WorkerStage:
    """Tasks for the pool of one epoch (or of the loader, with ``persistent_workers``)."""

    def __init__(self, ctx: Context, workers: Workers) -> None:
        self._ctx = ctx
        self.workers = workers
        self.kind = workers.kind
        self._submitted = 0  # tasks sent to workers
        self._items_sent = 0  # "items" tasks so far: they go round-robin over the workers
        # Tasks for worker processes follow torch's pacing: prefetch_factor * num_workers tasks ahead of the batches
        # the consumer has taken (the window is that bound), a slot freed when the consumer takes a batch rather
        # than when the batch reaches the sink. So when an epoch ends early the workers have run exactly the tasks
        # torch's would have, and with persistent workers the random state they carry into the next epoch is the same.
        self.paced = self.kind in ("map", "iterable")
        # in_order=False: torch gives the next batch to the next worker in turn that has room (fewer than its share of
        # the window outstanding, a batch counting until the consumer takes it), so a slow worker is passed over.
        n = workers.num_workers
        self._by_room = self.kind in ("map", "iterable") and not ctx.plan.in_order
        # A resumed epoch's first batch goes to the worker whose turn it was in the uninterrupted run (its copy of the
        # dataset then continues from its own saved state, see aloader._worker_state).
        self._first = ctx.plan.first_worker % n
        self._turn = self._first  # the next worker in turn
        self._ledger = ctx.plan.ledger
        self._outstanding = [0] * n  # map tasks per worker not yet taken by the consumer
        self._finished: collections.deque[int] = collections.deque()  # workers of finished batches, in sink order

    async def start(self) -> None:
        """Start the processes if they are not running yet (blocking work, so in a thread); then, for a map-style
        dataset whose state is recorded, ask each worker for its state as the epoch starts."""
        if not self.workers.started:
            try:
                await self._ctx.threads.run(self.workers.start)
            except Exception as exc:
                exc.add_note(
                    "aloader: starting the DataLoader's worker processes failed; the dataset, collate_fn, "
                    "transform and worker_init_fn must be picklable to reach them"
                )
                raise
        if self.kind == "map" and self._ledger is not None:
            # Answered before the worker's first batch of the epoch (its tasks run one at a time, in order): after
            # the batches an earlier epoch left to a persistent worker, and after a loaded state.
            for worker_id in range(self.workers.num_workers):
                future = self.workers.submit(worker_id, "state", None, "reporting the state of its dataset")
                future.add_done_callback(functools.partial(self._initial, worker_id))

    def _initial(self, worker_id: int, future: asyncio.Future[Any]) -> None:
        """A worker's state as the epoch starts (the answer to ``state``, or to an iterable's ``reset``)."""
        if self._ledger is None or future.cancelled() or future.exception() is not None:
            return  # a failure is raised by the epoch's batches
        answer = future.result()
        if isinstance(answer, WithState):
            self._ledger.initial(worker_id, answer.state)

    def _arrived(self, seq: int, worker_id: int, answer: Any) -> Any:
        """A worker's answer for unit ``seq``: its state goes to the ledger, its outcome is returned."""
        if not isinstance(answer, WithState):
            if self._ledger is not None:
                self._ledger.arrived(seq, worker_id, None)
            return answer
        if self._ledger is not None:
            self._ledger.arrived(seq, worker_id, answer.state)
        return answer.outcome

    def _submit(self, worker_id: int, op: str, payload: Any, what: str) -> asyncio.Future[Any]:
        self._submitted += 1
        return self.workers.submit(worker_id, op, payload, what)

    # ------------------------------------------------------------------------------------------------ map
    def map_work(self, seq: int, unit: Any) -> Callable[[], Awaitable[Any]]:
        """Send ``unit`` (the epoch's ``seq``-th) to its worker now (dispatch order is the order each worker gets its
        batches in), and return the work that awaits its batch."""
        indices = self._ctx.plan.indices(unit)
        future, worker_id = self._submit_map(indices)
        return functools.partial(self._await_batch, seq, future, time.perf_counter(), len(indices), worker_id)

    def _submit_map(self, indices: list[Any]) -> tuple[asyncio.Future[Any], int]:
        what = f"holding the batch of sample indices {describe_indices(indices)}"
        worker_id = self._next_worker()
        return self._submit(worker_id, "map", indices, what), worker_id

    def _next_worker(self, active: list[bool] | None = None) -> int:
        """The worker of the next task; ``active``: the workers whose iterable copy is not exhausted (None: all)."""
        n = self.workers.num_workers
        if not self._by_room:
            return (self._first + self._submitted) % n  # torch's in_order=True: strictly in turn
        live = [w for w in range(n) if active is None or active[w]]
        room = max(1, self._ctx.plan.window // len(live))  # torch: max_tasks // the number of active workers
        chosen = None
        for _ in range(n):  # as torch's _try_put_index with in_order=False
            worker_id, self._turn = self._turn, (self._turn + 1) % n
            if (active is None or active[worker_id]) and self._outstanding[worker_id] < room:
                chosen = worker_id
                break
        if chosen is None:  # every worker full (torch then drops the index); the least loaded one takes it
            chosen = min(live, key=self._outstanding.__getitem__)
        self._outstanding[chosen] += 1
        return chosen

    def taken(self) -> None:
        """The consumer took a batch: with in_order=False its worker has room for one more (see ``_next_worker``)."""
        if self._by_room and self._finished:
            self._outstanding[self._finished.popleft()] -= 1

    async def _await_batch(
        self, seq: int, future: asyncio.Future[Any], submitted: float, samples: int, worker_id: int
    ) -> Any:
        async def receive() -> Any:
            batch = self._arrived(seq, worker_id, await future)
            # fetch, transform and collate, all in the worker, with the round trip
            self._ctx.stats.add("fetch", samples, time.perf_counter() - submitted)
            return await pin_batch(self._ctx, batch)

        return await self._settled(seq, worker_id, receive())

    async def _settled(self, seq: int, worker_id: int, work: Awaitable[Any]) -> Any:
        """``work``'s outcome, its worker recorded as finished (``_finish``) unless it was cancelled or gave
        ``NO_BATCH`` (no outcome for the consumer to take)."""
        try:
            batch = await work
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._finish(worker_id)
            if self._ledger is not None:
                self._ledger.arrived(seq, worker_id, None)  # it raised: its worker's state is not known after it
            raise
        if batch is not NO_BATCH:
            self._finish(worker_id)
        return batch

    def _finish(self, worker_id: int) -> None:
        # With in_order=False the outcome goes to the sink as this returns (no await in between, see Order.settle),
        # so finished batches are recorded in the order the consumer will take them.
        if self._by_room:
            self._finished.append(worker_id)

    def send_owed(self, taken: int) -> None:
        """An epoch of a persistent pool ended early: send the map tasks torch would have sent by now.

        torch has sent ``prefetch_factor * num_workers`` tasks plus one per batch the consumer took, and its
        persistent workers run them all before the next epoch (their results discarded). The scheduler may lag
        behind that count when the consumer stops; the missing tasks go out here, their results ignored, so the
        workers' random state at the next epoch is torch's. Only for a sync sampler (an async one cannot be
        advanced outside a task).
        """
        plan = self._ctx.plan
        source = plan.source
        if self.kind != "map" or plan.owns_workers or isinstance(source, AsyncIterator) or self.workers.broken:
            return
        while self._submitted < plan.window + taken:
            try:
                unit = next(source)
            except Exception:  # the end of the sampler (or its failure, already past the consumer): nothing owed
                return
            self._submit_map(plan.indices(unit))

    # ---------------------------------------------------------------------------------------------- items
    async def finish_items(self, positions: list[Any], samples: list[Any], label: str) -> Any:
        """Samples of an async dataset: the sync transform (CPU work) and collate run in a worker process."""
        worker_id = self._items_sent % self.workers.num_workers
        self._items_sent += 1
        what = f"holding the batch of {plural(label)} {describe_indices(positions)}"
        return await self._submit(worker_id, "items", (positions, samples, label), what)

    # ------------------------------------------------------------------------------------------- iterable
    async def dispatch_iterable(self, window: Window, order: Order, start: Start) -> None:
        """Each worker iterates its own copy; batches come round-robin from the workers whose copy is not exhausted,
        as in torch. A request to an exhausted worker yields no batch (``NO_BATCH``), so dispatching ahead of
        knowing which workers are exhausted still gives torch's sequence."""
        n = self.workers.num_workers
        active = [True] * n
        what = "starting to iterate its copy of the dataset"
        resets: list[asyncio.Future[Any] | None] = [self._submit(w, "reset", None, what) for w in range(n)]
        for worker_id, reset in enumerate(resets):
            assert reset is not None
            reset.add_done_callback(functools.partial(self._initial, worker_id))
        what = "fetching the next batch of its copy of the iterable dataset"

        async def receive(seq: int, worker_id: int, future: asyncio.Future[Any]) -> Any:
            reset = resets[worker_id]
            if reset is not None:
                resets[worker_id] = None
                try:
                    await reset  # iter(dataset) in the worker failed: raise it at this worker's first batch
                except Exception:
                    active[worker_id] = False
                    raise
            batch = self._arrived(seq, worker_id, await future)
            if batch is NO_BATCH:  # this worker's copy is exhausted
                active[worker_id] = False
                return NO_BATCH
            return await pin_batch(self._ctx, batch)

        async def next_batch(seq: int, worker_id: int, future: asyncio.Future[Any]) -> Any:
            return await self._settled(seq, worker_id, receive(seq, worker_id, future))

        seq, worker_id = 0, self._first
        while True:
            await window.acquire()
            if not any(active):
                window.release()
                return
            if self._by_room:
                worker_id = self._next_worker(active)  # in_order=False: the next active worker in turn with room
            while not active[worker_id]:
                worker_id = (worker_id + 1) % n
            order.open()
            # Submitted here, not in the task: requests reach each worker in dispatch order, and a task cancelled
            # before it runs has still sent its request, as torch's would have.
            future = self._submit(
                worker_id, "next", None, "fetching the next batch of its copy of the iterable dataset"
            )
            start(seq, functools.partial(next_batch, seq, worker_id, future))
            seq, worker_id = seq + 1, (worker_id + 1) % n

    # ---------------------------------------------------------------------------------------------- close
    def close(self) -> asyncio.Future[None]:
        """Close the process pool in a thread of its own (joining processes blocks); a plain future, so a loop
        shutting down cannot cancel the wait (see ``finish_through_cancellation``)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        workers = self.workers

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
