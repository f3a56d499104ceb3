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
import contextlib
import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

T = TypeVar("T")

_pool_ids = itertools.count()

# A work item: the call, and where its outcome goes. ``None`` tells a worker to exit.
_Work = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]", bool]


class ForkGate:
    """Calls of user code on aloader's threads, and forks that wait until none is running.

    A fork copies every lock, in the state it is in, into the child, where the thread that held it does not exist:
    a lock held by another thread at the fork stays held in the child forever. torch forks its workers whatever the
    process's other threads are doing; what is ours to answer for is aloader's own threads, which run user code
    (``__getitem__``, transforms, ``collate_fn``) that may hold the dataset's own locks (h5py's global lock, an HTTP
    connection pool's) at any moment, locks that the forked worker then takes again. So every call of user code on
    our threads passes this gate, and a fork closes it first: it waits until no such call is running (bounded), and
    a call that would begin meanwhile waits until the fork is done, a few milliseconds per worker. In the child the
    gate is new and open (``os.register_at_fork``).
    """

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._running = 0  # calls of user code in progress on aloader's threads
        self._forking = 0  # forks waiting or in progress: no call may begin
        self._local = threading.local()  # this thread's calls in progress (a fork from inside one excludes it)

    def _open(self) -> bool:
        return self._forking == 0

    def user_code(self) -> ForkGate:
        """Around a call of user code on one of aloader's threads (``with FORK_GATE.user_code():``): the gate itself,
        whose ``__enter__`` and ``__exit__`` are ``enter`` and ``exit`` (a batch the consumer makes passes it: no
        object or call more than the lock needs)."""
        return self

    def enter(self) -> None:
        """A call of user code begins (waits while a fork is being made)."""
        with self._lock:
            if self._forking:  # rare: a fork is being made, wait until it is done
                self._cond.wait_for(self._open)
            self._running += 1
        local = self._local
        local.depth = getattr(local, "depth", 0) + 1

    def exit(self, *exc_info: object) -> None:
        """The call of user code that ``enter`` began has returned (or raised)."""
        self._local.depth -= 1
        with self._lock:
            self._running -= 1
            if self._forking:
                self._cond.notify_all()

    __enter__, __exit__ = enter, exit

    @contextlib.contextmanager
    def closed(self, seconds: float) -> Iterator[bool]:
        """Closed around a fork: True once no call of user code runs on another aloader thread, False if one still
        runs after ``seconds`` (then the caller must not fork). Calls wait to begin until the block is left."""
        own = getattr(self._local, "depth", 0)
        with self._cond:
            self._forking += 1
            quiet = self._cond.wait_for(lambda: self._running <= own, timeout=seconds)
        try:
            yield quiet
        finally:
            with self._cond:
                self._forking -= 1
                self._cond.notify_all()


FORK_GATE = ForkGate()


def _deliver(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    # Runs on the loop. The awaiting task may have been cancelled meanwhile; then the outcome has no taker.
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def run_and_deliver(
    fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], gated: bool = True
) -> BaseException | None:
    """Run ``fn`` (user code) in this thread, through the fork gate, and hand its outcome to ``future``'s loop;
    return the exception it raised, if any. Pool threads call it, and the sync driver's consumer for the fast lane's
    calls it makes itself (``_core/lane.py``). ``gated=False``: ``fn`` passes the gate itself around each call of
    user code (it runs long, and waits between them)."""
    if future.cancelled():  # cancelled while queued: nobody waits for it, skip the work
        return None
    try:
        if gated:
            with FORK_GATE.user_code():
                outcome = (True, fn())
        else:
            outcome = (True, fn())
    except BaseException as exc:  # handed to the awaiting task, which decides what it means
        outcome = (False, exc)
    try:
        loop.call_soon_threadsafe(_deliver, future, *outcome)
    except RuntimeError:  # the loop is closed: the pipeline is gone and nobody waits
        pass
    return None if outcome[0] else outcome[1]


DECLINED: Final = object()
"""The outcome of a call offered to the consumer that it gave back unrun (it went on to other work, see
``ConsumerRun.decline``): the caller runs it elsewhere."""


def decline(future: asyncio.Future[Any]) -> None:
    """Consumer side: give back a call it was offered, unrun; ``future`` gets :data:`DECLINED` on its loop."""
    try:
        future.get_loop().call_soon_threadsafe(_deliver, future, True, DECLINED)
    except RuntimeError:  # the loop is closed: the pipeline is gone and nobody waits
        pass


class ConsumerRun:
    """A call of user code the loop offers to the sync driver's consumer thread, to run while it waits for its
    next batch instead of on one of our threads (see ``_bridge.ThreadChannel.offer``); ``future`` gets the
    outcome. It has nothing for the consumer to yield itself (``first`` is None, ``run()`` gives nothing)."""

    __slots__ = ("_fn", "future")

    first = None

    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self._fn: Callable[[], Any] | None = fn
        self.future: asyncio.Future[Any] = loop.create_future()

    def run(self) -> list[object]:
        fn, self._fn = self._fn, None  # its closure may hold samples: released once run
        assert fn is not None
        error = run_and_deliver(fn, self.future.get_loop(), self.future)
        if isinstance(error, KeyboardInterrupt):
            raise error  # the consumer may be the main thread: Ctrl-C stops the iteration, as in torch's loop
        return []

    def decline(self) -> None:
        decline(self.future)

    def yielded(self) -> None:
        """Nothing to do: ``run()`` gives the consumer nothing to yield."""


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
        self._local = threading.local()  # a pool thread's: it leaves after its call (leave_after_call)

    @property
    def thread_count(self) -> int:
        """Threads started so far (alive or not)."""
        return len(self._threads)

    async def run(self, fn: Callable[[], T], gated: bool = True) -> T:
        """Run ``fn()`` on a pool thread and return its result (or raise its exception); ``gated``: see
        ``run_and_deliver``."""
        return await self.submit(fn, gated)

    def submit(self, fn: Callable[[], T], gated: bool = True) -> asyncio.Future[T]:
        """Queue ``fn()`` for a pool thread; the running loop's future gets its result (or exception). For a call
        whose caller is not a task of its own (``run`` awaits it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closing:
                raise RuntimeError("cannot run a call on a closed thread pool")
            self._queued += 1
            spawn = self._queued > self._idle and self._alive < self._max
            if spawn:
                self._alive += 1
                thread = threading.Thread(target=self._worker, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
        if spawn:
            # Started before its work is queued: the new thread waits for it with the GIL released, so this thread
            # returns from start() at once instead of waiting for the GIL while the call runs.
            thread.start()
        self._work.put((fn, loop, future, gated))
        return future

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
            run_and_deliver(*item)
            del item  # drop references to user data before blocking again
            if getattr(self._local, "leave", False):
                with self._lock:  # the lock run() decides to start a thread under: no call is left without one
                    if self._closing or self._queued <= self._idle:
                        self._exited()
                        return
                self._local.leave = False  # a call came meanwhile and waits for a thread: this one stays
        with self._lock:
            self._exited()

    def _exited(self) -> None:
        """Under the lock: this thread leaves; the last one to leave after close() resolves its future."""
        self._alive -= 1
        done = self._all_exited
        if self._alive == 0 and done is not None:
            try:
                done.get_loop().call_soon_threadsafe(_deliver, done, True, None)
            except RuntimeError:
                pass

    def leave_after_call(self) -> None:
        """Called from a call running on one of this pool's threads: that thread exits once the call is done (its
        owner knows no more calls will come for it; a later call starts a new thread). ``close()`` then has one
        thread fewer to wake and wait for."""
        self._local.leave = True

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
