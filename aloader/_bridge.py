"""The sync bridge: a background event loop thread, and the channel that hands batches to the consuming thread.

Hand-off without polling. The consumer blocks in ``Condition.wait()`` with no timeout (interruptible by Ctrl-C on
POSIX) until the loop appends an item; the loop side awaits an ``asyncio.Event`` that the consumer sets, through
``call_soon_threadsafe``, only when it takes an item while the loop is waiting for room. The last item is ``END`` or
a ``Failed`` outcome, so the consumer learns how the epoch ended from the data itself.

The consumer does work too, when it would otherwise wait: a call the loop offers (``offer``) to a consumer that is
waiting in ``get()``, or that spends next to no time between two ``get()`` calls, is run by the consumer itself
when it has nothing to take, and the outcomes it returns are yielded from here in their turn (every item before
them taken), without going through the loop. The fast lane makes its batches so: in the consumer's own thread, as
torch's ``num_workers=0`` does, with no thread hand-off and no wait for the loop between batches (see
``_core/lane.py``). A consumer busy between items (a training step) is left alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Final

from aloader._core.sink import HANDED_BACK, ConsumerCall, ConsumerSource, MadeRun
from aloader._cycles import DIRECT, LOOP, Cycles

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


_NOTHING: Final = object()


class _Made:
    """Outcomes made outside the order stage (``run``), from sequence number ``seq`` on (None: in any order)."""

    __slots__ = ("outcomes", "run", "seq")

    def __init__(self, run: MadeRun, outcomes: list[object]) -> None:
        self.run = run
        self.seq = run.first
        self.outcomes = deque(outcomes)


class _Runs:
    """The runs of outcomes made outside the order stage (``Sink.put_made``: by the sync driver's consumer, or in
    a call of the lane's thread), each yielded in its turn: the part both channels share. Not thread-safe: the
    thread channel uses it under its lock."""

    __slots__ = ("_runs", "finished", "taken")

    def __init__(self) -> None:
        self._runs: deque[_Made] = deque()
        self.taken = 0  # items the consumer has taken (END aside): the sequence number of the next one
        self.finished: MadeRun | None = None  # the run whose last outcome next() returned, to be told it is yielded

    def add(self, run: MadeRun, outcomes: list[object]) -> None:
        self._runs.append(_Made(run, outcomes))

    def next(self) -> object:
        """The next outcome of a run, if it is its turn (every item before it taken); else _NOTHING. Runs may
        arrive out of turn (a call the consumer ran after the lane's thread made the next one): a few at most."""
        taken = self.taken
        for made in self._runs:
            if made.seq is None or made.seq == taken:
                break
        else:
            return _NOTHING  # the items before them are still to come from the loop
        item = made.outcomes.popleft()
        if made.seq is not None:
            made.seq += 1
        if not made.outcomes:
            self._runs.remove(made)
            self.finished = made.run
        return item

    def tell_finished(self) -> None:
        """Outside any lock: tell the run whose last outcome was just yielded."""
        if self.finished is not None:
            finished, self.finished = self.finished, None
            finished.yielded()

    def clear(self) -> None:
        self._runs.clear()


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
        # Offered to the consumer, run by it in get(): (the call, the idle_below it was offered with).
        self._calls: deque[tuple[ConsumerCall, float]] = deque()
        self._runs = _Runs()  # outcomes of calls the consumer (or the lane's thread) ran, waiting for their turn
        self._inside = False  # the consumer is in get(): waiting for an item, or running a call
        self._waiting = False  # the consumer is blocked in get() with nothing to take and nothing to run
        self._left = 0.0  # when the consumer last left get() (perf_counter; 0: not yet)
        # The source, handed to the consumer and not yet started: (it, idle_below, handed by choice: the consumer
        # is busy between batches but makes them faster itself, see Cycles); then held by the consumer.
        self._source_offered: tuple[ConsumerSource, float, bool] | None = None
        self._source: ConsumerSource | None = None
        self._source_idle = 0.0  # the idle_below of the source held
        self.cycles = Cycles()
        # The consumer's time between two get() calls: the least of the last few, so that one pause (the GIL taken
        # by another thread, a garbage collection) does not make a consumer that comes straight back look busy.
        self._recent: deque[float] = deque(maxlen=8)
        # Seeded by a consumer that started the loop because it is busy between batches: until it is back in
        # get(), nothing is handed or offered to it (the loop's threads make the next batches meanwhile), whatever
        # the speed learnt since says of its earlier times between batches.
        self._gone = False

    def seed(self, taken: int, left: float, gaps: list[float], away: bool) -> None:
        """Before the loop starts, after the consumer made the first ``taken`` batches itself (``prelude.py``):
        what it has taken, when it last left ``next()``, its recent times between two calls, and whether it gave
        the source back because it is busy between batches (``away``)."""
        self._runs.taken = taken
        self._left = left
        self._recent.extend(gaps)
        self._gone = away

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

    def offer(self, call: ConsumerCall, idle_below: float) -> bool:
        """Loop side: give ``call`` to the consumer (True) if it is in ``get()`` or spends less than ``idle_below``
        seconds between two ``get()`` calls; with ``idle_below=0``, only if it is waiting with nothing else to run
        (one such call at a time: a call that blocks until others run must not hold up the others). Else (False)
        the caller runs it elsewhere."""
        with self._cond:
            if idle_below <= 0:
                if not self._waiting or self._calls:
                    return False
            elif not self._inside and (self._gone or self._outside() >= idle_below):
                return False
            self._calls.append((call, idle_below))
            self._cond.notify()
            return True

    def hand_source(self, source: ConsumerSource, idle_below: float) -> bool:
        """Loop side: give the source to the consumer (True) if its recent time between two ``get()`` calls is
        under ``idle_below``: a consumer that comes straight back for batches makes them itself, drawing the units
        too, so the loop does nothing per batch. A consumer busy between batches gets it where it is the faster
        maker, or to try (``Cycles``). It starts once every item before ``source.first`` is taken.

        A consumer that has not had its first item yet (it is waiting for it, or about to: ``iter()`` has just
        returned) is taken to come straight back: it gets a source of fast units at once and makes its first batch
        alone, instead of waiting for a lane call's worth (16 batches: 3.7 ms against 1.2 ms for an in-memory
        loader's first batch). It gives the source back after that batch (``_away``: nothing is known yet of its
        time between batches), so the loop prefetches if it is away; it gets the source again once it has come
        straight back."""
        with self._cond:
            if self._gone and not self._inside:
                return False
            chosen = False
            first_wait = idle_below > 0 and not self._left
            if not first_wait and self._outside() >= idle_below:
                if not self.cycles.choose_direct():
                    return False
                chosen = True
            self._source_offered = (source, idle_below, chosen)
            self._cond.notify()
            return True

    def keep_source(self, seconds: float) -> bool:
        """The consumer's cycles are its figure (measured in ``get()``): ``seconds`` adds nothing to them."""
        return self.cycles.keep_direct()

    def units_changed(self) -> None:
        """Loop side: the units turned slow (see ``Cycles.units_changed``)."""
        with self._cond:
            self.cycles.units_changed()

    @property
    def on_loop(self) -> bool:
        return False

    def get(self) -> object:
        """Thread side: the next item, blocking until there is one. In turn: an outcome of a call the consumer ran
        (when every item before it has been taken), an item put by the loop, or else, before waiting, a call; or,
        while the consumer holds the source, the next unit's batch, made here."""
        entered = time.perf_counter()
        self._gone = False
        gap = float("inf")
        if self._left:
            gap = entered - self._left
            self._recent.append(gap)  # a consumer that starts a slow step is seen within 8 items
        source = self._source
        if source is not None:  # drawing and making each batch itself: no lock, no wake of the loop
            item = source.step(self._away(gap))
            if item is not HANDED_BACK:
                self._runs.taken += 1
                self.cycles.took(entered, DIRECT)
                self._left = time.perf_counter()
                return item
            self._source = source = None  # given back: the next items come from the loop
        wake = False
        try:
            while True:
                with self._cond:
                    self._inside = True
                    item = self._runs.next()
                    while item is _NOTHING and not self._items and not self._calls and not self._source_ready():
                        self._waiting = True
                        try:
                            self._cond.wait()
                        finally:
                            self._waiting = False
                        item = self._runs.next()
                    if item is _NOTHING and self._items:
                        item = self._items.popleft()
                        wake = self._producer_waiting
                    if item is _NOTHING and not self._calls:  # the source, which is the consumer's from here
                        assert self._source_offered is not None
                        source, self._source_idle, _ = self._source_offered
                        self._source_offered = None
                        self._inside = False
                    if item is not _NOTHING:
                        self._inside = False
                        self._runs.taken += 1
                        self.cycles.took(entered, LOOP)
                        declined = self._decline_calls()
                        break
                    if source is None:
                        call, _ = self._calls.popleft()
                if source is not None:
                    item = source.step(self._away(gap))  # outside the lock, as a call
                    if item is not HANDED_BACK:
                        self._source = source
                        self._runs.taken += 1
                        self.cycles.took(entered, DIRECT)
                        declined = []
                        break
                    source = None
                    continue
                made = call.run()  # outside the lock: the loop may put and offer meanwhile
                if made:
                    with self._cond:
                        self._runs.add(call, made)
                del call, made
        except BaseException:
            self._inside = False  # Ctrl-C: the iterator closes, nothing more may be offered to it
            raise
        self._left = time.perf_counter()
        for unrun in declined:
            unrun.decline()
        self._runs.tell_finished()  # the last outcome of a run was yielded: the loop may make more
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._room.set)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass
        return item

    def _away(self, gap: float) -> bool:
        """Holding the source: the consumer spends time between batches and is not the faster maker (give it back,
        so that the loop's threads make the next ones meanwhile). ``gap``: its time since the last item (the
        least of the last few is at most that: a consumer that came straight back needs no more; infinite before
        its first item: nothing is known of it yet, and the loop prefetches while it is away, if it is)."""
        if gap < self._source_idle:
            return False
        return self._outside() >= self._source_idle and not self.cycles.keep_direct()

    def _source_ready(self) -> bool:
        """Under the lock: the source was handed over and every item before its first unit is taken."""
        offered = self._source_offered
        return offered is not None and offered[0].first == self._runs.taken

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

    def put_made(self, run: MadeRun, outcomes: list[object]) -> None:
        """Loop side: ``outcomes`` made outside the order stage, yielded in their turn (see ``Sink.put_made``)."""
        with self._cond:
            self._runs.add(run, outcomes)
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

    def _outside(self) -> float:
        """The consumer's time between two get() calls, as the least of the last few (inf before the second)."""
        return min(self._recent, default=float("inf"))

    def _decline_calls(self) -> list[ConsumerCall | ConsumerSource]:
        """Under the lock, leaving get() with calls not run: those the consumer is not known to come back for soon
        enough go back to the loop (the batches they make must not wait for a consumer that is away)."""
        declined: list[ConsumerCall | ConsumerSource] = []
        outside = self._outside()
        offered = self._source_offered
        if offered is not None and outside >= offered[1] and not offered[2]:
            declined.append(offered[0])
            self._source_offered = None
        if not self._calls:
            return declined
        kept = [(call, idle_below) for call, idle_below in self._calls if outside < idle_below]
        declined += [call for call, idle_below in self._calls if outside >= idle_below]
        self._calls = deque(kept)
        return declined

    def clear(self) -> None:
        """Drop buffered items, calls not run and outcomes not yielded (on close, so their memory is released)."""
        with self._cond:
            self._items.clear()
            self._calls.clear()
            self._runs.clear()
            held, self._source_offered, self._source = self._source, None, None
        if held is not None:
            held.record()

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
        self._runs = _Runs()  # outcomes of the lane's calls, yielded in their turn
        # Which maker serves the consumer better where units look slow: the lane's thread holding the source, or
        # the loop's concurrent fetches (see Lane.hand_source).
        self.cycles = Cycles(by_maker=True)
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

    def put_made(self, run: MadeRun, outcomes: list[object]) -> None:
        self._runs.add(run, outcomes)
        self._readable.set()

    def offer(self, call: ConsumerCall, idle_below: float) -> bool:
        """Never: an ``async for`` consumer is the caller's loop, which must not run a batch."""
        return False

    def hand_source(self, source: ConsumerSource, idle_below: float) -> bool:
        """Never to the consumer, for the same reason. Whether the lane's thread holds the source for units that
        look slow: where it makes them faster than the loop serves the consumer, or to try (``Cycles``)."""
        return self.cycles.choose_direct()

    def keep_source(self, seconds: float) -> bool:
        """The lane's thread holding the source for units that look slow made one in ``seconds``: whether it keeps
        the source."""
        self.cycles.made(seconds)
        return self.cycles.keep_direct()

    def units_changed(self) -> None:
        """The units turned slow (see ``Cycles.units_changed``)."""
        self.cycles.units_changed()

    @property
    def on_loop(self) -> bool:
        return True

    async def get(self) -> object:
        entered = time.perf_counter()
        runs = self._runs
        while True:
            item = runs.next()
            if item is not _NOTHING:
                runs.taken += 1
                runs.tell_finished()
                self.cycles.took(entered, DIRECT)
                return item
            if self._items:
                runs.taken += 1
                self._room.set()
                self.cycles.took(entered, LOOP)
                return self._items.popleft()
            self._readable.clear()
            await self._readable.wait()

    def clear(self) -> None:
        self._items.clear()
        self._runs.clear()
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
