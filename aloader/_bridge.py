"""The sync bridge: a background event loop thread, and the channel that hands batches to the consuming thread.

Hand-off without polling. The consumer blocks in ``Condition.wait()`` with no timeout (interruptible by Ctrl-C on
POSIX) until the loop appends an item; the loop side awaits an ``asyncio.Event`` that the consumer sets, through
``call_soon_threadsafe``, only when it takes an item while the loop is waiting for room. The last item is ``END`` or
a ``Failed`` outcome, so the consumer learns how the epoch ended from the data itself.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["LoopChannel", "ThreadChannel", "new_event_loop", "start_loop_thread"]


# Imported with aloader (a few ms beside torch's seconds), not at the first iter(), where it would delay the first
# batch: it measured up to ~115 ms there on a loaded machine.
_new_loop: Callable[[], asyncio.AbstractEventLoop]
try:
    import uvloop

    _new_loop = uvloop.new_event_loop
except ImportError:  # uvloop is optional (not available on Windows)
    _new_loop = asyncio.new_event_loop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for the bridge: uvloop's when it is installed, asyncio's otherwise."""
    return _new_loop()


class ThreadChannel:
    """A bounded FIFO from one event loop (``put``) to one plain thread (``get``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self._loop = loop
        self._capacity = max(1, capacity)
        self._items: deque[object] = deque()
        # Reentrant so that the consumer thread can tell whether it holds it (see release_after_interrupt).
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._room = asyncio.Event()
        self._producer_waiting = False

    async def put(self, item: object) -> None:
        """Loop side: append ``item``, waiting while the channel is full."""
        while True:
            with self._cond:
                if len(self._items) < self._capacity:
                    self._items.append(item)
                    self._cond.notify()
                    return
                # Cleared under the lock: a get() that frees room after this point sees the flag and wakes us.
                self._room.clear()
                self._producer_waiting = True
            try:
                await self._room.wait()
            finally:
                with self._cond:
                    self._producer_waiting = False

    def get(self) -> object:
        """Thread side: the next item, blocking until there is one."""
        with self._cond:
            while not self._items:
                self._cond.wait()
            item = self._items.popleft()
            wake = self._producer_waiting
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._room.set)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass
        return item

    def release_after_interrupt(self) -> None:
        """Consumer side, after an asynchronous exception (Ctrl-C) escaped ``get()``: let go of the lock if held.

        CPython runs a signal handler between any two bytecodes, and a ``with`` block whose ``__enter__`` has just
        acquired the lock does not always run ``__exit__`` when the handler raises there. The lock would then stay
        held by this thread: ``close()`` and the loop's next ``put`` would wait for it forever.
        """
        is_owned: Any = getattr(self._lock, "_is_owned", None)
        while is_owned is not None and is_owned():
            self._lock.release()

    def put_many(self, items: list[object]) -> None:
        """Loop side: append ``items`` (there is room for them) under one lock, with one wake-up of the consumer."""
        with self._cond:
            self._items.extend(items)
            self._cond.notify()

    def resize(self, capacity: int) -> None:
        """Loop side: hold up to ``capacity`` items from now on (items already held above it stay)."""
        with self._cond:
            self._capacity = max(1, capacity)
        self._room.set()  # a waiting put() checks again

    def put_final(self, item: object) -> None:
        """Loop side: append ``item`` even if the channel is full (the pipeline's last words)."""
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def clear(self) -> None:
        """Drop buffered items (on close, so their memory is released at once)."""
        with self._cond:
            self._items.clear()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        """Items waiting (a snapshot, for stats)."""
        return len(self._items)


class LoopChannel:
    """A bounded FIFO between two tasks of one event loop: the pipeline and an ``async for`` consumer."""

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._items: deque[object] = deque()
        self._readable = asyncio.Event()
        self._room = asyncio.Event()

    async def put(self, item: object) -> None:
        while len(self._items) >= self._capacity:
            self._room.clear()
            await self._room.wait()
        self.put_final(item)

    def put_many(self, items: list[object]) -> None:
        self._items.extend(items)
        self._readable.set()

    def resize(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._room.set()  # a waiting put() checks again

    def put_final(self, item: object) -> None:
        self._items.append(item)
        self._readable.set()

    async def get(self) -> object:
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        self._room.set()
        return self._items.popleft()

    def clear(self) -> None:
        self._items.clear()
        self._room.set()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        """Items waiting (a snapshot, for stats)."""
        return len(self._items)


def start_loop_thread(
    main: Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, None]], name: str
) -> tuple[asyncio.AbstractEventLoop, asyncio.Task[None], threading.Thread]:
    """Start a daemon thread running a new event loop until ``main(loop)`` completes, then closing it.

    The task is created before the thread starts, so the caller can cancel it at any moment (via
    ``loop.call_soon_threadsafe(task.cancel)``) without racing the thread's start-up. The thread is a daemon so
    that an interpreter exiting with a half-consumed loader does not wait for it; the at-exit hook in
    ``_iterators`` closes live iterators properly before that point.
    """
    loop = new_event_loop()
    task = loop.create_task(main(loop))

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(task)
        except BaseException:  # the outcome reached the consumer through the channel; cancellation is expected
            pass
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                # Dataset code may use asyncio.to_thread (the loop's default executor): join those threads too,
                # as asyncio.run does.
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    try:
        thread.start()
    except BaseException:
        # An asynchronous exception (Ctrl-C) while start() waited for the new thread, which may already be running
        # the pipeline: stop it and wait for it, so that the exception leaves no thread behind.
        # Queued either way: a thread that starts later runs the cancelled task, then closes the loop itself.
        loop.call_soon_threadsafe(task.cancel)
        if thread.ident is not None:  # it has started (a thread not yet started cannot be joined)
            thread.join()
        raise
    return loop, task, thread
