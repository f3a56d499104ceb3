"""The hand-off to the drivers: outcomes leave the core through a :class:`Sink`.

In: the ``done`` queue of the order stage. Out: the sink, which the driver reads (an ``asyncio`` channel for
``async for``, a cross-thread channel for ``for``; see ``_bridge``); ``put`` waits while the consumer is behind, so
the sink's capacity is the prefetch depth. It owns the ``timeout`` (torch's error when no batch comes in time) and
the pacing: a window slot is given back when a batch reaches the sink, or, for work in worker processes, when the
consumer takes it (torch's pacing, see ``Emitter.taken``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, Protocol

from aloader._core.order import Window
from aloader._core.outcomes import END, SKIPPED, Failed
from aloader._stats import Recorder

__all__ = ["HANDED_BACK", "ConsumerCall", "ConsumerSource", "Emitter", "MadeRun", "Sink"]


class MadeRun(Protocol):
    """Consecutive outcomes made outside the order stage (by the consumer, or in one call of the lane's thread),
    which the sink yields in their turn without the loop handing each over (see ``lane.py``)."""

    @property
    def first(self) -> int | None:
        """The sequence number of its first outcome: the consumer yields them once it has taken every item before
        it. None: they may be yielded at once (``in_order=False``)."""

    def yielded(self) -> None:
        """The consumer has yielded every outcome of the run (their memory is its no more)."""


class ConsumerCall(MadeRun, Protocol):
    """Work the sink's consumer runs in its own thread, whose outcomes it then yields itself (see ``lane.py``)."""

    def run(self) -> list[object]:
        """Make the outcomes (the loop learns of them too); return those the consumer yields, in order."""

    def decline(self) -> None:
        """Give the call back unrun (the consumer went on to other work): the loop runs it elsewhere."""


HANDED_BACK: Final = object()
"""What :meth:`ConsumerSource.step` returns once it has given the source back: the next items come from the sink."""


class ConsumerSource(Protocol):
    """The source itself, handed to the sync driver's consumer (see ``lane.py``): from sequence number ``first`` on,
    the consumer draws each unit and makes its batch in its own thread when it asks for it, as torch's
    ``num_workers=0`` does, until it gives the source back to the loop (a slow unit, a busy consumer, the end)."""

    @property
    def first(self) -> int:
        """The sequence number of its first unit: the consumer starts once it has taken every item before it."""

    def step(self, away: bool) -> object:
        """The next outcome, made now; or :data:`HANDED_BACK` once the source is the loop's again. ``away``: the
        consumer is busy between items and the loop's threads serve it better (it gives the source back)."""

    def decline(self) -> None:
        """Give it back unstarted (the consumer went on to other work)."""

    def record(self) -> None:
        """Record the stats of the outcomes it made that are not yet recorded (the consumer stops holding it)."""


class Sink(Protocol):
    """Where finished batches go; ``put`` waits while the consumer is behind (the prefetch bound)."""

    async def put(self, item: object) -> None: ...

    def put_final(self, item: object) -> None:
        """Append without waiting for room: only for the last items of a pipeline that cannot go on."""

    @property
    def capacity(self) -> int: ...

    def put_many(self, items: list[object]) -> None:
        """Append ``items``, for which there is room now, at once (one wake-up of the consumer)."""

    def put_made(self, run: MadeRun, outcomes: list[object]) -> None:
        """``outcomes``, made outside the order stage, yielded in their turn (from ``run.first`` on); each holds a
        window slot until ``run.yielded()``, so they do not count against the sink's capacity."""

    def offer(self, call: ConsumerCall, idle_below: float) -> bool:
        """Give ``call`` to the consumer to run in its own thread (True) if it waits for items or spends less than
        ``idle_below`` seconds between two of them; never to a consumer that is an event loop."""

    def hand_source(self, source: ConsumerSource, idle_below: float) -> bool:
        """Give ``source`` to the consumer (True) if it comes back for items within ``idle_below`` seconds; never
        to a consumer that is an event loop, where it says instead (``idle_below=0``, units that look slow) whether
        the lane's thread holds it, on the same measure (see ``_cycles.Cycles``)."""

    def keep_source(self, seconds: float) -> bool:
        """Whoever holds the source for units that look slow (``hand_source`` with ``idle_below=0``; for ``async
        for``, the lane's thread) made one in ``seconds``: whether it keeps the source, or gives it back to the loop
        (see ``_cycles.Cycles``)."""

    def units_changed(self) -> None:
        """The units turned slow: what was measured of who makes them faster holds no more (``Cycles``)."""

    @property
    def on_loop(self) -> bool:
        """The consumer is a task of the pipeline's own loop (``async for``): it never makes items itself."""

    def resize(self, capacity: int) -> None:
        """Hold up to ``capacity`` items from now on (items already held above it stay)."""

    def __len__(self) -> int: ...


class Emitter:
    """Moves outcomes from ``done`` to the sink, in order, until END (or the timeout)."""

    def __init__(
        self, done: asyncio.Queue[object], window: Window, stats: Recorder, timeout: float, paced: bool
    ) -> None:
        self._done = done
        self._window = window
        self._stats = stats
        self._timeout = timeout
        # paced: a slot is freed when the consumer takes a batch rather than when the batch reaches the sink.
        self.paced = paced
        self.taken_count = 0  # batches the consumer has taken
        self._sink: Sink | None = None
        self._depth = 1  # the sink's own capacity

    def taken(self) -> None:
        """The consumer took a batch (or an error) from the sink; called on the pipeline's loop."""
        self.taken_count += 1
        if self.paced:
            self._window.release()

    def widen(self, units: int) -> None:
        """Hold at least ``units`` batches in the sink (a fast-lane call's worth; 0: the sink's own depth)."""
        if self._sink is not None:
            self._sink.resize(max(self._depth, units))
            self._stats.resized(self._sink.capacity)

    def offer(self, call: ConsumerCall, idle_below: float) -> bool:
        """Give ``call`` to the consumer if it is waiting for batches (see ``Sink.offer``)."""
        return self._sink is not None and self._sink.offer(call, idle_below)

    def hand_source(self, source: ConsumerSource, idle_below: float) -> bool:
        """Give the source to the consumer if it comes straight back for batches (see ``Sink.hand_source``)."""
        return self._sink is not None and self._sink.hand_source(source, idle_below)

    def keep_source(self, seconds: float) -> bool:
        """Whether the holder of the source for slow-looking units keeps it (see ``Sink.keep_source``)."""
        return self._sink is not None and self._sink.keep_source(seconds)

    def units_changed(self) -> None:
        """The units turned slow (see ``Sink.units_changed``)."""
        if self._sink is not None:
            self._sink.units_changed()

    def put_made(self, run: MadeRun, outcomes: list[object]) -> None:
        """Hand ``outcomes`` of a lane call to the sink as one run (see ``Sink.put_made``)."""
        assert self._sink is not None
        self._sink.put_made(run, outcomes)

    @property
    def consumer_on_loop(self) -> bool:
        """The consumer is known to be a task of this loop (see ``Sink.on_loop``)."""
        return self._sink is not None and self._sink.on_loop

    async def run(self, sink: Sink) -> None:
        self._sink, self._depth = sink, sink.capacity
        timeout = self._timeout
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
                self._stats.handed_off(isinstance(item, Failed), ready - waited, time.perf_counter() - ready, len(sink))
            if not self.paced:
                self._window.release()
            if not self._done.empty() and self._put_ready(sink):
                return

    def _put_ready(self, sink: Sink) -> bool:
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
        self._stats.handed_off_many([isinstance(item, Failed) for item in batches], len(sink))
        if not self.paced:
            for item in items:
                if item is not END:
                    self._window.release()
        return bool(items) and items[-1] is END
