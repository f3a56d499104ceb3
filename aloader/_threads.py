"""A thread pool owned by one pipeline: sync user code runs here, never on the event loop.

Why not ``loop.run_in_executor`` with a ``ThreadPoolExecutor``: we need (a) threads that are gone, not merely told to
stop, when the pipeline's cleanup returns, so that early exit leaves no thread behind; (b) daemon threads, because
an interpreter exiting with a half-consumed loader must not wait on idle workers (``concurrent.futures`` joins its
workers at exit); and (c) results handed back with one ``call_soon_threadsafe`` per call, no extra wrapping.

Threads start lazily, one for each call that finds no idle thread, up to ``max_threads``, so a fast dataset that
never has more than two calls in flight uses two threads whatever ``concurrency`` says.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_pool_ids = itertools.count()

# A work item: the call, and where its outcome goes. ``None`` tells a worker to exit.
_Work = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _deliver(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    # Runs on the loop. The awaiting task may have been cancelled meanwhile; then the outcome has no taker.
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class ThreadPool:
    """Runs sync callables on daemon threads and hands each outcome back to the awaiting task's loop."""

    def __init__(self, max_threads: int, name: str = "aloader") -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads should be at least 1, got {max_threads}")
        self._max = max_threads
        self._name = f"{name}-{next(_pool_ids)}"
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads blocked on the work queue
        self._queued = 0  # items put and not yet taken
        self._alive = 0
        self._closing = False
        self._all_exited: asyncio.Future[None] | None = None  # set by close()

    @property
    def thread_count(self) -> int:
        """Threads started so far (alive or not)."""
        return len(self._threads)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on a pool thread and return its result (or raise its exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closing:
                raise RuntimeError("cannot run a call on a closed thread pool")
            self._queued += 1
            spawn = self._queued > self._idle and len(self._threads) < self._max
            if spawn:
                self._alive += 1
                thread = threading.Thread(target=self._worker, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
        self._work.put((fn, loop, future))
        if spawn:
            thread.start()
        return await future

    def _worker(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            item = self._work.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if item is None:
                break
            fn, loop, future = item
            if future.cancelled():  # cancelled while queued: nobody waits for it, skip the work
                continue
            try:
                outcome = (True, fn())
            except BaseException as exc:  # handed to the awaiting task, which decides what it means
                outcome = (False, exc)
            try:
                loop.call_soon_threadsafe(_deliver, future, *outcome)
            except RuntimeError:  # the loop is closed: the pipeline is gone and nobody waits
                pass
            del item, fn, future, outcome  # drop references to user data before blocking again
        with self._lock:
            self._alive -= 1
            last = self._alive == 0
            done = self._all_exited
        if last and done is not None:
            try:
                done.get_loop().call_soon_threadsafe(_deliver, done, True, None)
            except RuntimeError:
                pass

    def close(self) -> asyncio.Future[None]:
        """Tell the threads to exit after their current call; the future resolves when all have exited.

        A call that is already running cannot be interrupted (Python threads cannot be killed), so the future waits
        for it; calls still queued are skipped. It is a plain future, not a task, so that a loop shutting down
        (which cancels every task) cannot cancel the wait: see ``finish_through_cancellation``. Call ``join()``
        after it resolves.
        """
        with self._lock:
            if self._all_exited is None:
                self._closing = True
                done = self._all_exited = asyncio.get_running_loop().create_future()
                if self._alive == 0:
                    done.set_result(None)
                self._queued += len(self._threads)
                for _ in self._threads:
                    self._work.put(None)
            return self._all_exited

    def join(self) -> None:
        """Join the exited threads: immediate once ``close()``'s future has resolved, and makes "no thread left"
        exact (a thread that signalled its exit may still be returning)."""
        for thread in self._threads:
            thread.join()


async def finish_through_cancellation(future: asyncio.Future[T]) -> T:
    """Await ``future`` to its end even if the awaiting task is cancelled meanwhile, then pass the cancellation on.

    For cleanup that must complete (threads joined, tasks finished) although the consumer's close() or a loop
    shutting down cancels the task doing it.
    """
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return future.result()
