"""A worker process: the core's fetch and finish stages on the worker's own event loop, over the tasks it is given.

The worker seeds ``random``, ``torch`` and numpy exactly as torch's worker loop does, sets torch's own
``_worker_info`` (so ``torch.utils.data.get_worker_info()`` works in user code), runs ``worker_init_fn``, then
serves tasks until the main process closes its pipe::

    reader thread: task messages from the pipe -> the loop's inbox
    loop:          a task of the loop per message, run by the same stages as in the main process:
                   map    -> _core.fetch (sync __getitem__ in this worker's threads, up to ``concurrency`` at once)
                   items  -> _core.collate (transform and collate samples fetched by the main process)
                   reset / next -> this worker's copy of an iterable dataset, one batch at a time
                   state        -> the state of this worker's copy of a map-style dataset (at an epoch's start)
                   each answer sent as soon as it is ready (tensors as shared memory, see transfer.py)

So a worker fetches ``concurrency`` samples at once while its batches wait on storage, and the main process keeps
several batches in flight per worker (see ``loader.py``). With ``concurrency=1`` a worker runs one task at a time,
one sample at a time, in the order given: exactly torch's worker loop, and torch's random draws.

A dataset (or an iterable's iterator) with ``state_dict()`` is answered batch by batch with its state
(``WithState``, see ``aloader._worker_state``); a map-style one then runs its batches one at a time, so that the
state after a batch holds that batch's fetches and none of the next one's.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import multiprocessing.connection
import multiprocessing.forkserver
import os
import pickle
import random
import signal
import socket
import sys
import threading
import time
from typing import Any, Final

import numpy as np
import torch
import torch.multiprocessing
import torch.utils.data._utils.worker as torch_worker

from aloader._bridge import new_event_loop
from aloader._core.access import MapAccess
from aloader._core.collate import Finisher
from aloader._core.context import Context
from aloader._core.fetch import Fetcher
from aloader._core.limit import FETCH_ORDER
from aloader._core.outcomes import NO_BATCH, WithState
from aloader._core.plan import Plan
from aloader._pool.setup import WorkerSetup
from aloader._pool.transfer import RemoteError, send_result
from aloader._worker_state import WorkerTracker
from aloader.errors import context_of

__all__ = ["WorkerCore", "worker_main"]

_PR_SET_PDEATHSIG: Final = 1
_M_ARENA_MAX: Final = -8  # glibc's mallopt parameter
_ARENAS: Final = 2
# How often at most a worker hands the free memory of its malloc heaps back to the kernel (see MallocTrim).
_TRIM_SECONDS: Final = 0.5


class MallocTrim:
    """glibc: give the free memory of this process's malloc heaps back to the kernel (``malloc_trim(0)``), at most
    once every ``seconds``; elsewhere (no ``malloc_trim``) nothing.

    A worker's threads decode samples at once, and when they are many (the fetch limit's start-up overshoots, see
    ``_core/limit.py``) the heaps grow to hold all their buffers. glibc keeps what is freed inside a heap for later
    use and gives back only the free space at its top, so a worker kept that high-water mark for the rest of its
    life: 40-50 MiB of free memory in its second arena and more in the main heap, on the images bench (more than a
    torch worker, which decodes one sample at a time). Trimming every half second holds a worker near what it is
    using; memory freed and used again within that time stays mapped, so it is not faulted back in per batch
    (trimming after every batch cost ~5% of the throughput there; every 0.5 s, ~1%, within the noise, and 1-2% more
    CPU per sample). A trim takes 0.5-12 ms, so it runs on a pool thread, never on the loop.
    """

    __slots__ = ("_due", "_seconds", "_trim")

    def __init__(self, seconds: float = _TRIM_SECONDS) -> None:
        self._seconds = seconds
        self._due = 0.0
        self._trim: Any = None
        if sys.platform.startswith("linux"):
            try:
                self._trim = ctypes.CDLL(None).malloc_trim  # ctypes releases the GIL for the call
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                pass
        if self._trim is not None:
            self._trim.argtypes, self._trim.restype = [ctypes.c_size_t], ctypes.c_int

    def due(self, now: float) -> bool:
        """Whether a trim is due at ``now`` (a monotonic clock); if so, the next is due ``seconds`` later."""
        if self._trim is None or now < self._due:
            return False
        self._due = now + self._seconds
        return True

    def trim(self) -> None:
        self._trim(0)


class WorkerCore:
    """The core in one worker process: answers the main process's tasks with the core's stages."""

    def __init__(self, setup: WorkerSetup, worker_id: int, tracker: WorkerTracker | None = None) -> None:
        self._setup = setup
        self._tracker = tracker if tracker is not None else WorkerTracker(setup.dataset, None)
        plan = Plan(
            kind="map" if setup.kind == "map" else "iterable",
            dataset=setup.dataset,
            source=iter(()),  # units come from the main process, task by task
            auto_collation=setup.auto_collation,
            batch_async_indices=None,
            batch_size=setup.batch_size,
            drop_last=setup.drop_last,
            collate_fn=setup.collate_fn,
            transform=setup.transform,
            concurrency=setup.concurrency,
            window=1,
            timeout=0,
            in_order=True,
            pin_memory_device=None,  # the main process pins
            skip_failures=setup.skip_failures,  # the main process settles the budget
            lane=False,
            cpu_share=_cpu_share(setup.num_workers),
        )
        ctx = self._ctx = Context(plan, site=f" in DataLoader worker process {worker_id}")
        self._finisher = Finisher(ctx)
        self._fetcher = Fetcher(ctx, MapAccess(setup.dataset), self._finisher) if setup.kind == "map" else None
        # concurrency=1: one task at a time, in the order given (torch's draws). A map-style dataset with state: one
        # batch at a time too, so each batch's state is exact (its samples are still fetched concurrently).
        stateful_map = setup.kind == "map" and self._tracker.tracks
        self._serial = asyncio.Lock() if setup.concurrency == 1 or stateful_map else None
        self._pulling = asyncio.Lock()  # an iterable copy yields one batch's items at a time (not thread-safe)
        self._iterator: Any = None
        self._ended = False
        self._malloc = MallocTrim()

    async def sent(self) -> None:
        """A task's answer has been sent (its batch's memory is free again): trim the heaps if it is time."""
        if self._malloc.due(time.monotonic()):
            await self._ctx.threads.run(self._malloc.trim, gated=False)

    async def answer(self, op: str, payload: Any) -> Any:
        if self._serial is None:
            return await self._run(op, payload)
        async with self._serial:
            return await self._run(op, payload)

    async def _run(self, op: str, payload: Any) -> Any:
        threads = self._ctx.threads
        tracker = self._tracker
        if op == "map":
            assert self._fetcher is not None
            batch = await self._fetcher.unit(payload if self._setup.auto_collation else payload[0])
            return WithState(batch, await threads.run(tracker.snapshot)) if tracker.tracks else batch
        if op == "state":
            return WithState(None, await threads.run(tracker.snapshot)) if tracker.tracks else None
        if op == "items":
            positions, samples, label = payload
            return await threads.run(lambda: self._finisher.finish_sync(positions, samples, label))
        async with self._pulling:
            if op == "reset":
                self._iterator, self._ended = None, False
                self._iterator, state = await threads.run(tracker.reset)
                self._ended = tracker.ended
                return WithState(None, state) if state is not None else None
            items = await threads.run(self._pull)
            if tracker.tracks:
                # Taken before the next pull can start (the lock): the state right after this batch's items. The batch
                # is finished under the lock too, so this worker's batches are sent in the order of their states
                # (with in_order=False the consumer then receives them in that order: its state is exact).
                state = await threads.run(tracker.snapshot)
                if items is NO_BATCH:
                    return WithState(NO_BATCH, state)
                return WithState(await threads.run(lambda: self._finish(items)), state)
        if items is NO_BATCH:
            return NO_BATCH
        # The transform and collate of this batch may run while the next batch's items are pulled.
        return await threads.run(lambda: self._finish(items))

    def _finish(self, items: list[Any]) -> Any:
        return self._finisher.finish_sync(["item"] * len(items), items, "item")

    def _pull(self) -> Any:
        """Thread side: as torch's _IterableDatasetFetcher, a short last batch unless drop_last; then exhausted."""
        setup, ctx = self._setup, self._ctx
        if self._ended or self._iterator is None:
            return NO_BATCH
        wanted = setup.batch_size if setup.auto_collation and setup.batch_size is not None else 1
        items: list[Any] = []
        while len(items) < wanted:
            try:
                items.append(next(self._iterator))
            except StopIteration:
                self._ended = self._tracker.ended = True
                break
            except Exception as exc:
                what = "items" if setup.auto_collation else "an item"
                items.append(ctx.failed("fetch", exc, f"fetching {what} of the iterable dataset"))
        if not items or (setup.auto_collation and setup.drop_last and len(items) < wanted):
            self._ended = self._tracker.ended = True
            return NO_BATCH
        return items


def _cpu_share(num_workers: int) -> float:
    """The cores one of ``num_workers`` workers may keep busy: the cores this process may run on, shared evenly."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(cores / num_workers, 0.25)


def _as_remote(exc: Exception, op: str) -> RemoteError:
    """An exception to send: the original and where it happened, so the main process words it as it would its own."""
    context = context_of(exc)
    if context is not None:
        original, where = context
        return RemoteError.capture(original, where)
    return RemoteError.capture(exc, f"running {op!r}")


async def _serve(
    conn: multiprocessing.connection.Connection, sock: socket.socket, core: WorkerCore | RemoteError
) -> None:
    """Answer tasks until end-of-file or the exit message; a task's answer is sent as soon as it is ready."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    def read() -> None:
        while True:
            try:
                task = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                task = None
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, task)
            except RuntimeError:  # the loop has closed
                return
            if task is None:
                return

    fatal: list[BaseException] = []

    async def answer(task_id: int, op: str, payload: Any) -> None:
        # Task ids rise in the order the main process sent the tasks: the earliest batch gets fetch slots first.
        FETCH_ORDER.set(task_id)
        if isinstance(core, RemoteError):
            result: object = core  # every task of a worker that failed to start fails with that error
        else:
            try:
                result = await core.answer(op, payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                result = _as_remote(exc, op)
            except BaseException as exc:  # SystemExit or the like in user code: the worker ends, as torch's would
                fatal.append(exc)
                inbox.put_nowait(None)
                return
        # Sent from the loop, at once: a batch that is ready reaches the pipe before this worker starts anything
        # else, so a worker killed later (by a sample of its next batch) has not lost it. Results are small (their
        # tensors travel as shared memory) and the main process's reader drains the pipe continuously.
        try:
            send_result(conn, sock, task_id, result)
        except OSError:  # the main process is gone
            inbox.put_nowait(None)
            return
        if not isinstance(core, RemoteError):
            del result  # the batch (its shared memory) is the main process's now
            await core.sent()

    threading.Thread(target=read, name="aloader-worker-reader", daemon=True).start()
    tasks: set[asyncio.Task[None]] = set()
    while True:
        task = await inbox.get()
        if task is None:
            break
        running = loop.create_task(answer(*task))
        tasks.add(running)
        running.add_done_callback(tasks.discard)
    # Closing: what is still running was for batches the main process abandoned. Calls stuck in user code are left to
    # the process's exit (daemon threads).
    for running in tasks:
        running.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if fatal:
        raise fatal[0]


def _seed_worker(base_seed: int, worker_id: int) -> int:
    # Exactly torch's worker loop: the same seeds give the same random draws inside __getitem__.
    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(torch_worker._generate_state(base_seed, worker_id))  # type: ignore[no-untyped-call]
    return seed


def _die_with_parent() -> None:
    """Linux: be killed when the parent process ends, even while stuck in user code (never an orphan). The parent
    is the main process (fork, spawn) or the forkserver, which itself exits when the main process does. The kernel
    sends the signal when the parent *thread* exits: the pool starts workers from the main thread, the forkserver, or
    aloader's forker thread, which lives as long as the process (``setup.fork_from_lasting_thread``)."""
    # A forkserver child inherits the write end of the server's "main process alive" pipe, which would keep the
    # server (our parent) running as long as we do, and so would never trigger the signal: let go of it. (Code in
    # this worker that starts processes with forkserver then starts a server of its own.)
    server: Any = multiprocessing.forkserver._forkserver
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        try:
            os.close(alive_fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
    if not sys.platform.startswith("linux"):
        return  # elsewhere a worker exits at its next read: end-of-file on its socket
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _few_malloc_arenas() -> None:
    """glibc: let this worker's threads share two malloc arenas. Each thread otherwise gets an arena of its own (up to
    8 per core), and an arena keeps what its thread freed: with ``concurrency`` threads decoding images, a worker held
    about 30 MiB more (measured with the bench's images workload). Elsewhere nothing to do."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mallopt(_M_ARENA_MAX, _ARENAS)
    except (OSError, AttributeError):  # not glibc
        pass


def worker_main(worker_id: int, conn: multiprocessing.connection.Connection, setup_arg: WorkerSetup | bytes) -> None:
    """The body of a worker process. Exits on end-of-file (the parent closed the pipe or died) or ``None``.

    ``setup_arg`` is the setup itself when the worker was forked (it is the parent's, copied on write, as with
    torch's fork workers), else its pickle.
    """
    # The objects inherited from the parent (or the forkserver) go to the collector's permanent generation, so this
    # process's garbage collections never walk them: a full collection writes to every object's header and so
    # copies on write every page of the inherited heap. Measured: each worker's PSS rose by ~24 MiB at its first full
    # collection, which made peak memory 1.28x torch's; with this it is 0.96x. O(1): only list heads are relinked.
    gc.freeze()
    # SIGTERM (the pool's close() for a busy worker) unwinds through Python, so multiprocessing's exit hooks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _die_with_parent()
    _few_malloc_arenas()
    sock = socket.socket(fileno=os.dup(conn.fileno()))  # the same socket, for passing descriptors
    core: WorkerCore | RemoteError
    where = "starting the worker"
    try:
        torch.set_num_threads(1)  # as torch: workers must not oversubscribe the cores with intra-op threads
        setup: WorkerSetup = setup_arg if isinstance(setup_arg, WorkerSetup) else pickle.loads(setup_arg)
        # Not inherited by a forkserver or spawn child.
        torch.multiprocessing.set_sharing_strategy(setup.sharing_strategy)  # type: ignore[no-untyped-call]
        seed = _seed_worker(setup.base_seed, worker_id)
        torch_worker._worker_info = torch_worker.WorkerInfo(
            id=worker_id, num_workers=setup.num_workers, seed=seed, dataset=setup.dataset
        )
        if setup.worker_init_fn is not None:
            where = "in worker_init_fn"
            setup.worker_init_fn(worker_id)
        # The saved state of this worker's copy of the dataset, after worker_init_fn (torchdata's order).
        where = "loading the worker's saved dataset state"
        saved = setup.worker_states[worker_id] if setup.worker_states is not None else None
        tracker = WorkerTracker(setup.dataset, saved)
        where = "starting the worker"
        core = WorkerCore(setup, worker_id, tracker)
    except Exception as exc:
        core = RemoteError.capture(exc, where)
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve(conn, sock, core))
    finally:
        loop.close()
