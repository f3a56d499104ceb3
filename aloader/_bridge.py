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

__all__ = ["Cycles", "LoopChannel", "ThreadChannel", "new_event_loop", "start_loop_thread"]


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


DIRECT: Final = 0  # the consumer made the item itself, holding the source
LOOP: Final = 1  # the item came from the loop's side (the lane's thread, fetch threads, or a call the consumer ran)


class Cycles:
    """Which maker serves a consumer that is busy between batches better: itself (holding the source) or the loop.

    A consumer that spends time between two batches (a training step) would overlap it with the next batches made on
    the lane's thread, if its step left the GIL free. Often it does not (the step's own Python, or short tensor ops
    between which the GIL changes hands): the two threads then take the GIL in turns, and the overlap costs more
    than it gains (measured: a model step of small matrix products ran at 0.90x torch's loop with the lane's thread,
    1.0x with the consumer making its batches). So the consumer's *cycle*, its time from one ``get()`` to the next,
    is measured with each maker (its mean since the figure was started, leaving out the first few cycles after a change
    of maker, when the pipeline refills or the consumer drains it: a mean, as the GIL's turns make a few cycles far
    longer than the rest), and the consumer keeps the source while it is busy only where its cycle with the source
    is the shorter. The loop is the default; the consumer tries making its batches once the loop's cycle is known,
    and each figure is measured again after ``STALE`` items.

    The loop's figure counts after ``LOOP_ENOUGH`` cycles, the consumer's after ``ENOUGH``: where the consumer is the
    better maker (beside a busy thread: ~2x the loop's speed), each cycle the loop measures costs the epoch about one
    batch, and a trial that loses is given up early (``ABORT``, ``ABORT_MEAN``). A mistake either way is bounded: the
    other maker is measured again once its figure is stale. Each time the consumer wins again against a fresh figure
    of the loop, the items before the loop's next measure double (``STALE`` up to ``STALE_MAX``); while the consumer
    holds the source, two cycles in a row over ``ABORT`` times the loop's (units that began to wait on storage) give
    it back at once.

    ``took`` and ``keep_direct`` run in the consumer's thread, ``direct_better`` and ``try_direct`` on the loop
    (under the channel's lock, while the consumer does not hold the source): a benign race, as with ``Speed``, where a
    cycle counted late moves a figure by one cycle.

    ``by_maker``: for ``async for`` (``LoopChannel``), whose consumer makes no batch. There the source is held by the
    lane's thread, which hands its batches over in runs, so the consumer's cycles with it come in bursts; the
    "consumer's" figure is instead the time that thread takes per unit (``made``, in its thread). Whichever is the
    shorter bounds how fast the consumer is served.
    """

    WARMUP: Final = 8  # cycles after a change of maker that are not measured
    ENOUGH: Final = 64  # measured cycles before the consumer's figure counts
    LOOP_ENOUGH: Final = 16  # and before the loop's does
    STALE: Final = 2048  # items after which a maker's figure is measured again
    MARGIN: Final = 1.0  # the consumer keeps the source only if its cycle is shorter than this times the loop's
    # A trial is given up early: at a cycle over ABORT times the loop's, or once the mean of its first EARLY cycles
    # is over ABORT_MEAN times the loop's (units that wait on storage, which the loop overlaps). Each trial given
    # up or lost doubles the items before the next (from STALE, at most STALE_MAX). Past its trial, the consumer
    # gives the source back at ABORTS cycles in a row over ABORT times the loop's.
    ABORT: Final = 4.0
    EARLY: Final = 4
    ABORT_MEAN: Final = 1.5
    STALE_MAX: Final = 2048 * 64
    ABORTS: Final = 2

    __slots__ = (
        "_at",
        "_by_maker",
        "_count",
        "_items",
        "_last",
        "_maker",
        "_over",
        "_rechecked",
        "_stale",
        "_streak",
        "_trial",
        "_trial_count",
        "_trial_total",
        "_value",
    )

    def __init__(self, by_maker: bool = False) -> None:
        self._by_maker = by_maker  # the consumer's figure is the maker's time per unit (made), not the cycles
        self._value = [0.0, 0.0]  # per maker: the cycles' total since its figure was (re)started
        self._count = [0, 0]  # per maker: cycles measured since the figure was (re)started
        self._at = [0, 0]  # per maker: the item count when it was last measured
        self._stale = [self.STALE, self.STALE]  # per maker: items after which its figure is measured again
        self._items = 0
        self._last = 0.0  # when the consumer entered get() for the last item (0: not yet)
        self._maker = LOOP  # who made the last item
        self._streak = 0  # items in a row from that maker
        self._trial = False  # the consumer holds the source to have its cycle measured (try_direct)
        self._trial_total = 0.0  # the trial's cycles so far, warm-up included (for giving it up early)
        self._trial_count = 0
        self._over = 0  # the consumer's cycles in a row over ABORT times the loop's
        self._rechecked = False  # the loop's figure was started afresh while the consumer was the better maker

    def took(self, entered: float, maker: int) -> None:
        """An item made by ``maker`` was returned by a ``get()`` entered at ``entered``: the cycle that ends here
        (from the last item's ``get()``) was the last item's maker's."""
        last = self._maker
        by_cycles = not (last == DIRECT and self._by_maker)
        if self._last and last == DIRECT and by_cycles and self._known_cycle(LOOP):
            self._check_direct(entered - self._last)
        if self._last and self._streak >= self.WARMUP and by_cycles:
            count = self._count[last]
            self._value[last] = (entered - self._last) + (self._value[last] if count else 0.0)
            self._count[last] = count + 1
            self._at[last] = self._items
        self._streak = self._streak + 1 if maker == last else 0
        self._maker = maker
        self._last = entered
        self._items += 1

    def made(self, seconds: float) -> None:
        """``by_maker``: the maker holding the source made a unit in ``seconds`` (its thread): the consumer's figure."""
        if self._known_cycle(LOOP) and self._check_direct(seconds):
            return
        count = self._count[DIRECT]
        self._value[DIRECT] = seconds + (self._value[DIRECT] if count else 0.0)
        self._count[DIRECT] = count + 1
        self._at[DIRECT] = self._items

    def _check_direct(self, cycle: float) -> bool:
        """A cycle of the consumer's: give its trial up if it is far slower than the loop already, and the source
        too if units began to wait on storage (two cycles in a row far over the loop's). True if given up."""
        loop = self._value[LOOP] / self._count[LOOP]
        over = cycle > self.ABORT * loop
        self._over = self._over + 1 if over else 0
        if self._trial:
            self._trial_total += cycle
            self._trial_count += 1
            early_mean = (
                self._trial_count >= self.EARLY and self._trial_total > self.ABORT_MEAN * loop * self._trial_count
            )
            if over or early_mean:
                self._slower(self._trial_total / self._trial_count)
                return True
        elif self._over >= self.ABORTS:
            self._slower(cycle)
            return True
        return False

    def _slower(self, cycle: float) -> None:
        """The consumer's figure is known, and slower (``cycle``): not tried again until it is stale (``keep_direct``
        now gives the source back), after twice as many items as the last time."""
        self._trial = False
        self._over = 0
        self._count[DIRECT] = self.ENOUGH
        self._value[DIRECT] = self.ENOUGH * cycle
        self._at[DIRECT] = self._items
        self._stale[DIRECT] = min(self.STALE_MAX, 2 * self._stale[DIRECT])

    def _known_cycle(self, maker: int) -> bool:
        return self._count[maker] >= (self.LOOP_ENOUGH if maker == LOOP else self.ENOUGH)

    def _known(self, maker: int) -> bool:
        return self._known_cycle(maker) and self._items - self._at[maker] < self._stale[maker]

    def direct_better(self) -> bool:
        """Both cycles are known, and the consumer's own is the shorter (by ``MARGIN``)."""
        return self._known(DIRECT) and self._known(LOOP) and self._shorter()

    def _shorter(self) -> bool:
        """The consumer's figure is the shorter (both are measured, stale or not)."""
        value, count = self._value, self._count
        return value[DIRECT] / count[DIRECT] < self.MARGIN * value[LOOP] / count[LOOP]

    def choose_direct(self) -> bool:
        """Hand the source to the busy consumer: it is the better maker, or to try (``try_direct``). Its win
        against a fresh figure of the loop doubles the items before the loop's next (a loss brings ``STALE``
        back)."""
        if self.direct_better():
            if self._rechecked:
                self._rechecked = False
                self._stale[LOOP] = min(self.STALE_MAX, 2 * self._stale[LOOP])
            return True
        if self._rechecked and self._known(LOOP):
            self._rechecked = False
            self._stale[LOOP] = self.STALE
        return self.try_direct()

    def try_direct(self) -> bool:
        """The loop's cycle is known and the consumer's is not (never measured, or stale): try it (its figure
        starts afresh)."""
        if not self._known(LOOP) or self._known(DIRECT):
            return False
        self._over = 0
        self._count[DIRECT] = 0
        self._trial = True
        self._trial_total, self._trial_count = 0.0, 0
        return True

    def keep_direct(self) -> bool:
        """Holding the source while busy: keep it while its trial runs or while it is the better maker; give it back
        for the loop's figure to be measured again once that is stale (which starts it afresh)."""
        if self._trial:
            if self._count[DIRECT] < self.ENOUGH:
                return True
            self._trial = False
            # A trial lost waits longer for the next; one won brings the usual wait back.
            won = self.direct_better()
            self._stale[DIRECT] = self.STALE if won else min(self.STALE_MAX, 2 * self._stale[DIRECT])
        if self._known(DIRECT) and self._known_cycle(LOOP) and self._items - self._at[LOOP] >= self._stale[LOOP]:
            self._rechecked = self._shorter()
            self._count[LOOP] = 0
            return False
        return self.direct_better()


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
            elif not self._inside and self._outside() >= idle_below:
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
        alone, instead of waiting for a lane call's worth (16 batches: 3.7 ms against 1.3 ms for an in-memory
        loader's first batch). If it does not come within ``idle_below`` after all, the source goes back when it
        leaves ``get()`` (``_decline_calls``), or at its first batch (``_away``)."""
        with self._cond:
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

    @property
    def on_loop(self) -> bool:
        return False

    def get(self) -> object:
        """Thread side: the next item, blocking until there is one. In turn: an outcome of a call the consumer ran
        (when every item before it has been taken), an item put by the loop, or else, before waiting, a call; or,
        while the consumer holds the source, the next unit's batch, made here."""
        entered = time.perf_counter()
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
