"""The fast lane: consecutive fast units of a sync map-style dataset made ``k`` at a time in one thread call.

A fast unit (a batch of in-memory samples: well under a millisecond of ``__getitem__`` and collate) costs less than
the hand-offs around it: the scheduler's task, the thread call and its return to the loop. The lane makes ``k`` of
them per call on a thread of its own, so those costs are paid once per ``k`` batches, and widens the window and the
sink to ``2k`` and ``k`` units (two calls in flight, one call's batches waiting), a few milliseconds of work. Units
that turn slow (waiting on I/O after all) take the lane out of use again, and the rest of a call's units go back to
concurrent fetching.

Who makes a call: with ``for``, the consumer's own thread when it is waiting for batches, or comes back for the
next one at once (``Emitter.offer``), as torch's ``num_workers=0`` makes them; it then yields the call's batches
itself, in their turn, and the order stage only learns that their places are filled (:data:`DELIVERED`). A lane
thread would take the GIL in turns with the consumer, and each batch would cross from one thread to the other
through the loop; with one more busy thread in the process every such turn can cost a switch interval (5 ms). A
consumer that is busy between batches (a training step) leaves the calls to the lane's thread, which makes the next
batches meanwhile, and hands each call's batches to the sink as one run (``Sink.put_made``) that the consumer yields
in their turn. ``async for`` always uses the lane's thread: the caller's loop must stay free.

Who draws the units: the scheduler, on the loop; or whoever is handed the sampler (``hand_source``): with ``for``, a
consumer that comes straight back for batches (or measures faster making them itself) draws each unit and makes its
batch inside ``next()``, as torch's loop does; with ``async for``, the lane's thread draws and makes them, and hands
them over in runs (``_Held``). Either way the loop does nothing per batch until the sampler is given back.

In: units from the scheduler. Out: their outcomes, completed in order (``Order.complete``). It owns its thread and
the lane's width.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

from aloader._core.context import Context, Record
from aloader._core.fetch import CHUNK_SECONDS, UNFINISHED, Fetcher
from aloader._core.limit import FETCH_ORDER
from aloader._core.order import Order, Window
from aloader._core.outcomes import DELIVERED, Failed
from aloader._core.sink import HANDED_BACK, Emitter
from aloader._stats import Stage
from aloader._threads import DECLINED, FORK_GATE, ThreadPool, decline, run_and_deliver

__all__ = ["HELD_RUNS", "LANE_UNITS", "Lane"]

# Consecutive units that each take less than CHUNK_SECONDS are made in one thread call of about _LANE_SECONDS, at
# most LANE_UNITS of them, until units average _LANE_EXIT_SECONDS.
_LANE_SECONDS: Final = 0.006
LANE_UNITS: Final = 16
_LANE_EXIT_SECONDS: Final = 0.008
# Runs the lane's thread holding the source may make before the consumer has yielded them (see _Held), and a run's
# size: about _HELD_SECONDS of work, at most _HELD_UNITS units. Each run wakes the loop once, and the lane's thread
# then gives up the GIL to it: with runs of 16 units (6 ms) the loop's turns cost ``async for`` 9% of an in-memory
# epoch against torch's loop, with runs of 64 (12 ms) 4%.
HELD_RUNS: Final = 2
_HELD_SECONDS: Final = 0.012
_HELD_UNITS: Final = 64

# Starts a unit's usual (concurrent) work as a task: (seq, unit).
StartUnit = Callable[[int, Any], object]


class _Unfinished:
    """A lane unit whose samples are awaitables: fetched in the thread, finished on the loop."""

    __slots__ = ("samples",)

    def __init__(self, samples: list[Any]) -> None:
        self.samples = samples


class Lane:
    """Decides how many units a call makes (``units``) and makes them (``run``)."""

    def __init__(self, ctx: Context, fetcher: Fetcher, window: Window, order: Order, emitter: Emitter) -> None:
        self._ctx = ctx
        self._fetcher = fetcher
        self._window = window
        self._order = order
        self._emitter = emitter
        self._width = 0  # units the window and the sink were widened for
        # Its calls run one after another, so the next call's units are queued while the current one runs, and lane
        # calls never contend with each other for the GIL.
        self.thread = ThreadPool(1, name="aloader-lane")
        # The consumer may make calls itself unless the order stage must see each outcome (the failure budget
        # settles failures there, in hand-off order), or a timeout runs: a consumer away with a call it kept would
        # look like a pipeline that makes no batch.
        self._in_consumer = ctx.plan.max_failures is None and ctx.plan.timeout == 0

    def units(self) -> int:
        """How many consecutive units to make in the next call: more than one once units are known to be fast."""
        per_unit = self._ctx.speed.per_unit
        if per_unit is None:
            return 1
        # Hysteresis: in at under CHUNK_SECONDS a unit, out at over _LANE_EXIT_SECONDS, so that one unit slowed by
        # a pause (a garbage collection, another process) does not take the lane out of use.
        if per_unit >= (_LANE_EXIT_SECONDS if self._width else CHUNK_SECONDS):
            if self._width:
                self._widen(0)
            return 1
        units = max(1, min(LANE_UNITS, int(_LANE_SECONDS / max(per_unit, 1e-9))))
        if units > self._width:
            self._widen(units)
        return units

    def held_run_units(self, most: int = _HELD_UNITS) -> int:
        """The units of the next run of a thread holding the source (``_Held``, ``prelude.Ahead``): about
        ``_HELD_SECONDS`` of work, at most ``most`` (a benign race: the speed is updated as units are made)."""
        per_unit = self._ctx.speed.per_unit or _HELD_SECONDS
        return max(1, min(most, int(_HELD_SECONDS / max(per_unit, 1e-9))))

    def _widen(self, units: int) -> None:
        """Size the window and the sink for calls of ``units`` (0: no lane, the plan's own sizes)."""
        self._window.resize(max(self._ctx.plan.window, 2 * units))
        self._emitter.widen(units)
        self._width = units

    async def draw(
        self, next_unit: Callable[[], Awaitable[Any]], wanted: int
    ) -> tuple[list[Any], BaseException | Literal["end"] | None]:
        """``wanted`` more units (fewer at the end): (units, None | "end" | the sampler's error).

        It waits for room in the window for each: a call of fewer units would pay the same hand-offs for less
        work, and the window (``2k``) always has a full call's worth of room once the previous call is handed off.
        """
        units: list[Any] = []
        while len(units) < wanted:
            await self._window.acquire()
            drawn = time.perf_counter()
            try:
                unit = await next_unit()
            except StopAsyncIteration:
                self._window.release()
                return units, "end"
            except Exception as exc:
                return units, exc
            self._ctx.stats.add("sampler", self._ctx.plan.size(unit), time.perf_counter() - drawn)
            units.append(unit)
        return units, None

    async def run(self, first: int, units: list[Any], start: StartUnit) -> None:
        """Make ``units`` (sequence numbers from ``first``) in one thread call and complete them in order; units
        after one that turned slow are given to ``start``."""
        FETCH_ORDER.set(first)  # this task's own context: its slot comes in unit order
        try:
            async with self._ctx.slots:
                call = _InConsumer(self, first, units) if self._in_consumer else None
                # To the consumer if it waits for batches, or takes less than a quarter of a batch's time between
                # two: making them itself costs it little, and overlapping would gain less than the turns cost.
                made: list[Any] | object = DECLINED
                if call is not None and self._emitter.offer(call, (self._ctx.speed.per_unit or 0.0) / 4):
                    made = await call.future
                if isinstance(made, list):
                    assert call is not None
                    outcomes = made
                    self._ctx.stats.delivered(call.failed)  # the batches the consumer yielded itself
                else:
                    del call
                    outcomes = await self.thread.run(lambda: self._run_thread(units, interruptible=False))
                    if self._in_consumer:
                        outcomes = self._to_sink(first, outcomes)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the thread call itself failed (not a sample: those are outcomes)
            outcomes = [Failed(exc)] * len(units)
        for seq, unit in enumerate(units, first):
            if seq - first >= len(outcomes):
                start(seq, unit)  # the lane stopped at a slow unit: the rest are fetched as usual, concurrently
                continue
            outcome = outcomes[seq - first]
            if type(outcome) is _Unfinished:  # a sync __getitem__ returned awaitables: finish on the loop
                try:
                    outcome = await self._fetcher.finish_awaitables(outcome.samples, self._ctx.plan.indices(unit))
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:
                    outcome = Failed(exc)
            self._order.complete(seq, outcome)

    def _to_sink(self, first: int, outcomes: list[Any]) -> list[Any]:
        """Hand the outcomes a call made (up to the first to be finished on the loop) to the sink as one run, which
        the consumer yields in their turn: the order stage and the sink stage then do nothing per batch. Returns
        the outcomes with :data:`DELIVERED` in their places."""
        cut = next((i for i, o in enumerate(outcomes) if type(o) is _Unfinished), len(outcomes))
        if not cut:
            return outcomes
        made = outcomes[:cut]
        self._emitter.put_made(_LaneRun(self._window, first if self._ctx.plan.in_order else None, cut), made)
        self._ctx.stats.delivered([type(o) is Failed for o in made])
        return [DELIVERED] * cut + outcomes[cut:]

    def _run_thread(self, units: list[Any], interruptible: bool) -> list[Any]:
        """Thread side: each unit fetched, transformed, collated and pinned, or its failure. ``interruptible``: run
        by the consumer, which may be the main thread: Ctrl-C there stops the iteration, as in torch's loop."""
        outcomes: list[Any] = []
        entries: list[tuple[Stage, int, float]] = []  # the call's stage times, recorded at once at its end
        getitems = self._getitems

        def record(stage: Stage, items: int, seconds: float) -> None:
            entries.append((stage, items, seconds))

        per_unit = self._ctx.speed.per_unit
        if per_unit is not None and per_unit >= _LANE_EXIT_SECONDS:
            # A call queued behind one whose units turned slow (the window holds two calls): the lane went out of
            # use after its units were drawn. They all go back to concurrent fetching; made here one after the
            # other, units that wait on storage would each wait in turn.
            return outcomes
        try:
            for unit in units:
                outcome, seconds = self._make(unit, getitems, record, interruptible)
                outcomes.append(outcome)
                if seconds >= _LANE_EXIT_SECONDS:
                    break  # slow after all (I/O, a cache miss): the rest go back to concurrent fetching
        finally:
            self._ctx.stats.add_all(entries)
        return outcomes

    def _make(self, unit: Any, getitems: bool, record: Record, interruptible: bool) -> tuple[Any, float]:
        """One unit fetched, transformed, collated and pinned: (its outcome, the seconds it took)."""
        fetcher = self._fetcher
        indices = self._ctx.plan.indices(unit)
        started = time.perf_counter()
        try:
            if getitems:
                fetched, batch = fetcher.getitems_sync(indices, record)
            else:
                fetched, batch = fetcher.run(indices, True, record)
            outcome = _Unfinished(fetched) if batch is UNFINISHED else batch
        except KeyboardInterrupt as exc:
            if interruptible:
                raise
            outcome = Failed(exc)
        except BaseException as exc:  # the consumer raises it at this batch, as for a batch task
            outcome = Failed(exc)
        seconds = time.perf_counter() - started
        self._ctx.speed.unit_took(seconds)
        return outcome, seconds

    @property
    def _getitems(self) -> bool:
        return self._ctx.plan.auto_collation and self._fetcher.access.getitems is not None

    # ------------------------------------------------------------------------------------- the source itself
    @property
    def in_consumer(self) -> bool:
        """The sync driver's consumer may make batches itself (no failure budget, no timeout)."""
        return self._in_consumer

    @property
    def known_fast(self) -> bool:
        """Units are known to take under ``CHUNK_SECONDS``: measured so, or gathered from tensors in memory."""
        per_unit = self._ctx.speed.per_unit
        return per_unit < CHUNK_SECONDS if per_unit is not None else self._fetcher.gathers

    def source_before_loop(self, draw: Callable[[], Any]) -> _Drawn:
        """The source for the sync driver's consumer before the loop exists (``prelude.py``): it draws every unit
        from the first, and is given back through ``back``."""
        return _Drawn(self, 0, _NONE, draw, looped=False)

    def may_try_source(self) -> bool:
        """Whether units that are not fast may be offered to the sync driver's consumer, or held by the lane's
        thread for ``async for`` (``hand_source`` with ``slow``): their speed is known (they were made in the lane
        once: a dataset that never was, one waiting on storage from its first batch, is never tried), and the
        order stage need not see each outcome."""
        return self._in_consumer and self._ctx.speed.per_unit is not None

    async def hand_source(
        self, seq: int, unit: Any, draw: Callable[[], Any], slow: bool = False
    ) -> tuple[int, Stop] | None:
        """Give the source to the sync driver's consumer, if it comes straight back for batches: from unit ``seq``
        (``unit``, drawn, opened and holding a window slot) on, it draws each unit with ``draw`` and makes its batch
        when it asks for it, as torch's ``num_workers=0`` does, so the loop does nothing per batch; None if not.
        Once it gives the source back: (the next sequence number, None | "end" | the sampler's error).

        ``slow``: the units are not known to be fast. Their time may be another thread's: a busy Python thread in
        the process holds the GIL for a switch interval (5 ms) each time a unit lets it go, and an in-memory batch
        of 0.2 ms then takes 5-15 ms in any thread. Made concurrently, each batch takes more such turns (its thread
        calls and their hand-offs) than the consumer making it does, as torch's loop does (measured: 0.89x torch's
        samples/s). So the consumer gets the source where it measured faster with it (``_cycles.Cycles``: a trial,
        given up at the first unit far slower than the loop's, as an I/O-bound unit is), and keeps it while so."""
        if not self._in_consumer:
            return None
        if slow and not self.may_try_source():
            return None
        source = _Drawn(self, seq, unit, draw, trial=slow)
        held: _Held | None = None
        if self._emitter.consumer_on_loop:
            # A trial (slow): by the lane thread's time per unit against the consumer's cycle with the loop.
            if slow and not self._emitter.hand_source(source, 0.0):
                return None
            self._widen(_HELD_UNITS)  # a window of HELD_RUNS runs
            held = _Held(self, source, _HELD_UNITS)
            await held.run()
        else:
            # A trial (slow): only by the consumer's measured cycles (an idle_below of 0 is never met).
            if not self._emitter.hand_source(source, 0.0 if slow else (self._ctx.speed.per_unit or 0.0) / 4):
                return None
        assert source.future is not None
        back = await source.future
        if back is DECLINED:
            return None
        next_seq, stop, unfinished = back
        if (
            stop is None
            and unfinished is None
            and not source.trial
            and (self._ctx.speed.per_unit or 0.0) >= _LANE_EXIT_SECONDS
        ):
            # Given back because the units turned slow: the next ones go to the loop's concurrent fetches, not to
            # a trial by figures measured on fast units.
            self._emitter.units_changed()
        order = self._order
        made = next_seq - seq - (unfinished is not None)  # made outside the order stage, and handed over
        order.open(next_seq - seq - 1)  # the first was opened by the scheduler
        for done in range(seq, seq + made):
            order.complete(done, DELIVERED)
        if held is not None:
            held.end(unfinished is not None)
        elif unfinished is None:
            self._window.release()  # the first unit's slot: no batch of the consumer's waits in the sink
        if unfinished is not None:
            await self._finish(unfinished)
        return next_seq, stop

    async def take_over(self, back: Back) -> int:
        """The loop's start after the sync driver's consumer made the epoch's first units before it existed
        (``prelude.py``), and gave the source back with ``back``: those units are yielded (the order stage goes on
        after them), and a unit whose samples are awaitables is finished here. Returns the next sequence number."""
        next_seq, _, unfinished = back
        self._order.skip(next_seq - (unfinished is not None))
        if unfinished is not None:
            await self._window.acquire()  # the sink stage frees it, as for any unit
            self._order.open()
            await self._finish(unfinished)
        return next_seq

    async def _finish(self, unfinished: Unfinished) -> None:
        """A unit whose samples are awaitables (a sync ``__getitem__`` returned them): finished on the loop."""
        seq, unit, fetched = unfinished
        try:
            outcome = await self._fetcher.finish_awaitables(fetched.samples, self._ctx.plan.indices(unit))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            outcome = Failed(exc)
        self._order.complete(seq, outcome)


Stop = BaseException | Literal["end"] | None
# A unit whose samples are awaitables (a sync __getitem__ returned them), finished on the loop: (seq, unit, samples).
Unfinished = tuple[int, Any, _Unfinished]
# How a source was given back: (the next sequence number, why, a unit to be finished on the loop).
Back = tuple[int, Stop, Unfinished | None]


class _Drawn:
    """The source in the consumer's hands (``ConsumerSource``): each ``step`` draws a unit and makes its batch, in
    the consumer's thread. It gives the source back (``future``: the next sequence number, why, and a unit whose
    samples are awaitables, if any) when units are slow on average, when the consumer is busy between batches and
    not the faster maker (``_cycles.Cycles``: the lane's thread then makes them meanwhile), at the sampler's end or
    error.

    The stats of the batches it makes are recorded in groups of ``_STATS_GROUP`` (and when it stops): taking the
    recorder's lock for each cost ~1.5 us of a batch of ~150 us, 1% of an in-memory epoch. ``loader.stats()``
    meanwhile lags by fewer batches than that."""

    __slots__ = (
        "_draw",
        "_entries",
        "_failed",
        "_lane",
        "_next",
        "_trial",
        "_unit",
        "back",
        "first",
        "future",
        "held",
    )

    def __init__(
        self, lane: Lane, first: int, unit: Any, draw: Callable[[], Any], trial: bool = False, looped: bool = True
    ) -> None:
        self._lane = lane
        self._trial = trial  # handed for units not known to be fast: kept by the consumer's cycles, not by speed
        self.first = first
        self._next: int | None = first  # the sequence number of the next unit; None once given back
        self._unit: Any = unit  # the first unit, drawn by the scheduler (_NONE: drawn here too)
        self._draw = draw
        # Where it is given back: the scheduler's future; without a loop (``looped=False``: the sync driver's first
        # batches, before the loop exists, see ``prelude.py``), ``back``, which the consumer reads itself.
        self.future: asyncio.Future[Any] | None = asyncio.get_running_loop().create_future() if looped else None
        self.back: Back | None = None
        # Held by the lane's thread (``_Held``): given back in ``back``, which the holder settles ``future`` with,
        # in one wake of the loop with the last run's batches (which then reach the sink first).
        self.held = False
        self._entries: list[tuple[Stage, int, float]] = []  # stage times of batches made, not yet recorded
        self._failed: list[bool] = []  # for each batch made and not yet recorded: is it a failure

    @property
    def next(self) -> int | None:
        """The sequence number of the next unit; None once given back."""
        return self._next

    @property
    def trial(self) -> bool:
        """Handed for units not known to be fast: kept by the holder's measured speed (``Cycles``)."""
        return self._trial

    def step(self, away: bool) -> object:
        """The consumer's thread: the next unit's batch (or failure), or :data:`HANDED_BACK`."""
        with FORK_GATE.user_code():
            item = self.make(self._entries, away)
        if item is HANDED_BACK:
            self.record()
            return item
        failed = self._failed
        failed.append(type(item) is Failed)
        if len(failed) >= _STATS_GROUP or self._next is None:
            self.record()
        return item

    def record(self) -> None:
        """The stats of the batches made since the last call (the consumer's thread, or one that closes it)."""
        entries, failed = self._entries, self._failed
        if entries or failed:
            self._entries, self._failed = [], []
            self._lane._ctx.stats.made_with_source(entries, failed)

    def make(self, entries: list[tuple[Stage, int, float]], away: bool) -> object:
        """Draw the next unit and make its batch (the caller passes the fork gate and records ``entries``, the
        stage times); or give the source back and return :data:`HANDED_BACK`."""
        seq = self._next
        if seq is None:
            return HANDED_BACK
        lane = self._lane
        ctx = lane._ctx
        unit, self._unit = self._unit, _NONE
        if unit is _NONE:
            drawn = time.perf_counter()
            try:
                unit = self._draw()
            except StopIteration:
                return self.give_back(seq, "end")
            except Exception as exc:
                return self.give_back(seq, exc)
            entries.append(("sampler", ctx.plan.size(unit), time.perf_counter() - drawn))
        outcome, seconds = lane._make(unit, lane._getitems, lambda *entry: entries.append(entry), True)
        if type(outcome) is _Unfinished:  # the loop finishes it, and the sink hands it over
            return self.give_back(seq + 1, None, (seq, unit, outcome))
        # Slow after all (their average, as the lane's own exit: one unit slowed by another thread holding the GIL
        # must not send the next ones through the loop, which would wait for it more often still), or the consumer
        # is busy between batches: the loop makes the next ones.
        slow = not self._trial and seconds >= _LANE_EXIT_SECONDS and (ctx.speed.per_unit or 0.0) >= _LANE_EXIT_SECONDS
        if slow or away:
            self.give_back(seq + 1, None)
        else:
            self._next = seq + 1
        return outcome

    def give_back(self, next_seq: int, stop: Stop, unfinished: Unfinished | None = None) -> object:
        self._next = None
        future = self.future
        if future is None or self.held:  # no loop yet (the consumer reads it), or the holder settles the future
            self.back = (next_seq, stop, unfinished)
            return HANDED_BACK
        try:
            future.get_loop().call_soon_threadsafe(_settle, future, (next_seq, stop, unfinished))
        except RuntimeError:  # the loop is closed: the epoch is over
            pass
        return HANDED_BACK

    def decline(self) -> None:
        assert self.future is not None  # only a source the scheduler handed is offered, and may be declined
        decline(self.future)


_NONE: Final = object()
_STATS_GROUP: Final = 8  # batches the consumer makes whose stats are recorded at once


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


class _Held:
    """The source held by the lane's thread (``async for``, whose consumer is the loop and makes no batch): one long
    call there draws the units and makes their batches with ``_Drawn.make``, as the sync driver's consumer does,
    and hands them to the sink in runs of up to ``units`` (about ``_HELD_SECONDS`` of work: one wake of the loop a
    run), which the consumer yields in their turn: the loop does nothing per batch but hand it
    over. ``HELD_RUNS`` runs at most are made and not yet yielded (``credits``); the hold owns that many runs'
    window slots meanwhile, the first unit's included, so the window bounds memory as it does for the lane's
    calls."""

    __slots__ = ("_credits", "_emitter", "_ended", "_lane", "_loop", "_pending", "_source", "_stopped", "_units")

    def __init__(self, lane: Lane, source: _Drawn, units: int) -> None:
        self._lane = lane
        self._source = source
        source.held = True
        self._units = units
        self._emitter = lane._emitter
        self._loop = asyncio.get_running_loop()
        self._credits = threading.Semaphore(HELD_RUNS)  # runs the thread may make before the consumer yields one
        self._stopped = False
        self._pending = 0  # loop side: runs in the sink, not yet yielded
        self._ended = False  # loop side: the hold is over; a run yielded now frees its window slots

    async def run(self) -> None:
        """Hold the source until the thread gives it back (its future is then set)."""
        lane = self._lane
        await lane._window.acquire(HELD_RUNS * self._units - 1)  # the first unit has its slot
        try:
            await lane.thread.run(self._make, gated=False)
        except asyncio.CancelledError:
            self._stopped = True  # the epoch is over: the thread stops after its run, or at once if it waits
            self._credits.release()
            raise
        except BaseException as exc:  # the call itself failed (a closed pool): give the source back with it
            source = self._source
            next_seq = source.next
            if next_seq is not None:
                source.give_back(next_seq, exc)
                self._deliver(None, [], source.back)

    def _make(self) -> None:
        """The lane's thread: runs of batches, each made by ``_Drawn.make``; each run passes the fork gate (this
        long call must not hold a fork up while it waits for a credit)."""
        source, credits, units, loop = self._source, self._credits, self._units, self._loop
        stats, emitter = self._lane._ctx.stats, self._emitter
        first: int | None = None
        outcomes: list[object] = []  # the run being made, not yet handed over
        sent = False  # the source given back went to the loop with a run
        try:
            while True:
                credits.acquire()
                if self._stopped:
                    return
                first = source.next
                if first is None:
                    return
                outcomes = []
                entries: list[tuple[Stage, int, float]] = []  # the run's stage times, recorded at once
                item: object = None
                count = self._lane.held_run_units(units)
                with FORK_GATE.user_code():  # a run is ~10 milliseconds: a fork waits for it at most that long
                    while len(outcomes) < count:
                        started = time.perf_counter()
                        item = source.make(entries, False)
                        if item is HANDED_BACK:
                            break
                        outcomes.append(item)
                        # Units that look slow (Lane.hand_source): held while this thread makes them faster than
                        # the loop serves the consumer (Cycles), and given back at once if they turn far slower.
                        if source.trial and not emitter.keep_source(time.perf_counter() - started):
                            next_seq = source.next
                            if next_seq is not None:
                                source.give_back(next_seq, None)
                            item = HANDED_BACK
                            break
                stats.made_with_source(entries, [type(o) is Failed for o in outcomes])
                # Given back (its end, units turned slow: maybe by the run's last unit, whose batch is in it): the
                # back goes with the run.
                back = source.back if source.next is None else None
                if outcomes or back is not None:
                    try:
                        loop.call_soon_threadsafe(self._deliver, first, outcomes, back)
                    except RuntimeError:  # the loop is closed: the epoch is over
                        return
                    outcomes, sent = [], back is not None
                if back is not None:
                    if back[1] is not None:  # the sampler's end (or error): the epoch needs this thread no more
                        self._lane.thread.leave_after_call()
                    return
        except BaseException as exc:  # not a sample's failure (those are outcomes): never leave the scheduler waiting
            # The source goes back once, with the batches of the run made so far (their units were drawn).
            next_seq = source.next
            if next_seq is not None:
                source.give_back(next_seq, exc)
            elif sent:
                return
            try:
                loop.call_soon_threadsafe(self._deliver, first, outcomes, source.back)
            except RuntimeError:  # the loop is closed: the epoch is over
                pass

    def _deliver(self, first: int | None, outcomes: list[object], back: Back | None) -> None:
        """Loop side: a run to the sink, yielded in its turn; then, with the last run, the source given back (the
        scheduler frees the window slots of the runs not in the sink, so this run must be in it first)."""
        if outcomes:
            self._pending += 1
            self._emitter.put_made(_HeldRun(self, first if self._lane._ctx.plan.in_order else None), outcomes)
        if back is not None:
            future = self._source.future
            assert future is not None
            _settle(future, back)

    def yielded(self) -> None:
        """Loop side (the consumer's task): a run was yielded; the thread may make another, or once the hold is
        over, its window slots are free."""
        self._pending -= 1
        if self._ended:
            self._lane._window.release_many(self._units)
        else:
            self._credits.release()

    def end(self, unfinished: bool) -> None:
        """Loop side, once the source is given back: free the window slots of the runs not in the sink (less the
        slot of a unit still to be finished on the loop, which the sink stage frees)."""
        self._ended = True
        self._lane._window.release_many(self._units * (HELD_RUNS - self._pending) - unfinished)


class _HeldRun:
    """One run of the lane's thread holding the source (``MadeRun``)."""

    __slots__ = ("_held", "first")

    def __init__(self, held: _Held, first: int | None) -> None:
        self._held = held
        self.first = first

    def yielded(self) -> None:
        self._held.yielded()


class _LaneRun:
    """Outcomes of one lane call, handed to the sink as a run (``MadeRun``): their window slots are freed once the
    consumer has yielded them all (a lane call's worth of memory, as the order stage's hand-off frees them)."""

    __slots__ = ("_count", "_loop", "_window", "first")

    def __init__(self, window: Window, first: int | None, count: int) -> None:
        self._window = window
        self._loop = asyncio.get_running_loop()
        self.first = first
        self._count = count

    def yielded(self) -> None:
        _free_slots(self._window, self._loop, self._count)


def _free_slots(window: Window, loop: asyncio.AbstractEventLoop, count: int) -> None:
    """Free ``count`` window slots of a run the consumer has yielded: at once on the loop (the ``async for`` task),
    else from the sync driver's consumer thread through the loop (one wake a run, not a batch)."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        window.release_many(count)
        return
    try:
        loop.call_soon_threadsafe(window.release_many, count)
    except RuntimeError:  # the loop is closed: the epoch is over
        pass


class _InConsumer:
    """A lane call the sync driver's consumer runs in its own thread (``ConsumerCall``). The consumer yields the
    outcomes up to the first that must be finished on the loop (awaitables); ``future`` gets :data:`DELIVERED` for
    each of those, then the rest, which go through the order stage as usual."""

    __slots__ = ("_lane", "_units", "failed", "first", "future")

    def __init__(self, lane: Lane, first: int, units: list[Any]) -> None:
        self._lane = lane
        self._units: list[Any] | None = units
        self.first: int | None = first if lane._ctx.plan.in_order else None
        self.future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.failed: list[bool] = []  # for each outcome the consumer yields: is it a failure (for the stats)

    def run(self) -> list[object]:
        units, self._units = self._units, None  # released once run
        assert units is not None
        made: list[object] = []

        def make() -> list[Any]:
            outcomes = self._lane._run_thread(units, interruptible=True)
            cut = next((i for i, o in enumerate(outcomes) if type(o) is _Unfinished), len(outcomes))
            made.extend(outcomes[:cut])
            self.failed = [type(o) is Failed for o in made]  # set before the loop learns of the outcomes
            return [DELIVERED] * cut + outcomes[cut:]

        error = run_and_deliver(make, self.future.get_loop(), self.future)
        if isinstance(error, KeyboardInterrupt):
            raise error  # the consumer may be the main thread: Ctrl-C stops the iteration, as in torch's loop
        return made

    def decline(self) -> None:
        decline(self.future)

    def yielded(self) -> None:
        """Consumer side: the outcomes it made are all yielded; their window slots are free (one wake of the loop
        per call, not per batch)."""
        _free_slots(self._lane._window, self.future.get_loop(), len(self.failed))
