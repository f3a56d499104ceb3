"""The sync driver's first batches, made in the consumer's thread before any thread of the loader's exists.

A ``for`` loop over units known to be fast (in memory: the loader measured them in an earlier epoch, or another
loader over the same dataset did, or they are an unchanged ``TensorDataset``'s, gathered) needs no event loop and
no thread for them: the consumer draws each unit and makes its batch inside ``next()``, as torch's
``num_workers=0`` does, and as it does anyway once the loop hands it the source (``Lane.hand_source``). Starting
the loop first cost a short epoch more than its batches: the loop's thread, a pool thread for the first batch,
their hand-offs, the end of the epoch travelling back through the loop, and the joins (640 in-memory samples of a
dataset of one's own: 5.7 ms against torch's 3.3).

So the consumer starts with the source, and the loop starts (the pipeline going on from the next unit, see
``Lane.take_over``) only when there is work the consumer should not do itself: a unit turned slow (the rest are
fetched concurrently), the consumer is busy between batches (the loop's threads make the next ones meanwhile), or a
sync ``__getitem__`` returned awaitables (finished on the loop). An epoch of fast units that the consumer takes
straight back ends with no thread ever started.

Not for units of unknown speed (a dataset no loader has iterated yet, other than an unchanged ``TensorDataset``):
the first sample may wait on storage, and while the consumer waits for it nothing else could start; nor may a
sample that waits for others of its batch. Those start the loop at once and probe (``Fetcher._probe_first``).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from aloader._core.context import Context
from aloader._core.lane import HELD_RUNS, Back, Lane
from aloader._core.outcomes import END, Failed
from aloader._core.plan import Speed
from aloader._core.sink import HANDED_BACK
from aloader.errors import with_context

__all__ = ["Ahead", "Prelude", "learnt_speed"]


class Prelude:
    """The source in the sync driver's consumer's hands before the loop exists. ``next(away)`` gives the next
    batch (or its failure), :data:`END` once the sampler is exhausted, or ``HANDED_BACK``; once ``back`` is set,
    the loop must go on from there (``Pipeline.run(sink, back)``), and the batch ``next`` returned with it (if any)
    is yielded first."""

    __slots__ = ("_ctx", "_ended", "_source", "back", "lane")

    def __init__(self, ctx: Context, lane: Lane) -> None:
        source = ctx.plan.source
        assert not isinstance(source, AsyncIterator)
        self._ctx = ctx
        self.lane = lane
        self._source = lane.source_before_loop(source.__next__)
        self._ended = False
        self.back: Back | None = None

    @staticmethod
    def applies(ctx: Context, lane: Lane | None) -> bool:
        """The consumer may make the first units: a sync sampler, the lane's conditions, units known to be fast
        (measured, or an unchanged ``TensorDataset``'s, gathered in memory)."""
        return (
            lane is not None
            and lane.in_consumer
            and ctx.plan.kind == "map"
            and not isinstance(ctx.plan.source, AsyncIterator)
            and lane.known_fast
        )

    @property
    def idle_below(self) -> float:
        """A consumer away for this long between two batches is busy with them (a training step): the loop's
        threads make the next ones meanwhile (``Lane.hand_source``'s rule)."""
        return (self._ctx.speed.per_unit or 0.0) / 4

    def next(self, away: bool) -> object:
        """The next unit's batch, made now in the caller's thread (``away``: it is given back after it)."""
        if self._ended:
            return END
        source = self._source
        item = source.step(away)
        back = source.back
        if back is None:
            return item
        stop = back[1]
        if stop is None:  # slow, away, or awaitables: the loop goes on (item is HANDED_BACK for awaitables)
            self.back = back
            return item
        # The sampler's end or its error: the epoch ends here, as the scheduler ends it.
        self._ended = True
        if stop == "end":
            return END
        self._ctx.stats.delivered([True])
        return Failed(with_context(stop, "in the sampler"))

    def record(self) -> None:
        """The stats of batches made and not yet recorded (the iterator closes)."""
        self._source.record()


# What a run of Ahead's thread ends with: nothing (more runs follow), END, or the source given back to the pipeline.
AheadEnd = Back | object | None


class Ahead:
    """``async for``'s first batches over units known to be fast, made by the lane's thread before any task of the
    pipeline exists: one call there makes them with :meth:`Prelude.next`, as the sync driver's consumer does, and
    hands them over in runs (about 12 ms of work each, the whole of a short epoch), at most ``HELD_RUNS`` of them
    made and not yet yielded (``credits``), as ``lane._Held`` does for the pipeline. ``deliver(outcomes, end)`` runs
    on the loop for each run; ``end`` is None while more follow, :data:`END` after the epoch's last, or the source
    given back (``Back``: a unit turned slow, or returned awaitables), from which the pipeline goes on
    (``Pipeline.run(sink, back)``). An epoch that stays fast thus starts no task, window or order stage, and ends
    with the run that carries its END; the thread leaves its pool once its call is over.

    The caller's loop makes no batch: ``async for`` keeps it free."""

    __slots__ = ("_credits", "_deliver", "_loop", "_prelude", "_stopped", "done")

    first = None  # as a ``MadeRun``: its outcomes come before anything the pipeline makes after them

    def __init__(self, prelude: Prelude, deliver: Callable[[list[object], AheadEnd], None]) -> None:
        self._prelude = prelude
        self._deliver = deliver
        self._loop = asyncio.get_running_loop()
        self._credits = threading.Semaphore(HELD_RUNS)  # runs the thread may make before the consumer yields one
        self._stopped = False
        # Resolved once the thread's call is over (its thread then leaves the pool).
        self.done: asyncio.Future[None] = prelude.lane.thread.submit(self._make, gated=False)

    def yielded(self) -> None:
        """A run was yielded: the thread may make another (``MadeRun``, with ``first``)."""
        self._credits.release()

    def stop(self) -> None:
        """Any thread: the epoch is over (closed, dropped); the thread stops after its run, or at once if it waits."""
        self._stopped = True
        self._credits.release()

    def _make(self) -> None:
        """The lane's thread: runs of batches until the epoch ends, the source is given back, or ``stop()``."""
        prelude, credits, lane = self._prelude, self._credits, self._prelude.lane
        lane.thread.leave_after_call()
        end: AheadEnd = None
        outcomes: list[object] = []  # the run being made, not yet handed over
        try:
            while end is None:
                credits.acquire()
                if self._stopped:
                    return
                outcomes = []
                count = lane.held_run_units()
                while len(outcomes) < count:
                    item = prelude.next(False)
                    if item is END:
                        end = END
                        break
                    if item is not HANDED_BACK:  # awaitables: the pipeline finishes them (``back``)
                        outcomes.append(item)
                    if prelude.back is not None:
                        end = prelude.back
                        break
                try:  # (a source given back or ended has recorded its stats: ``_Drawn.step``)
                    self._loop.call_soon_threadsafe(self._deliver, outcomes, end)
                except RuntimeError:  # the loop is closed: the epoch is over
                    return
                outcomes = []
        except BaseException as exc:  # not a sample's failure (those are outcomes): never leave the consumer waiting
            prelude.record()
            outcomes.append(Failed(exc))  # after the batches of the run made so far; then the epoch ends
            try:
                self._loop.call_soon_threadsafe(self._deliver, outcomes, END)
            except RuntimeError:
                pass


# The speed of the latest loader over each dataset (weakly keyed), for a new loader over it (a validation loop that
# builds its loader each epoch), per samples per unit, which a unit's time depends on.
_SPEEDS: Final[weakref.WeakKeyDictionary[Any, dict[int | None, Speed]]] = weakref.WeakKeyDictionary()


def learnt_speed(dataset: Any, unit_size: int | None, own: Speed) -> Speed:
    """The speed an epoch starts from: the loader's ``own`` once it has learnt one, else a copy of what the latest
    loader over ``dataset`` with units of ``unit_size`` samples learnt (if any). The result is the latest from
    here on."""
    try:
        known = _SPEEDS.setdefault(dataset, {})
    except Exception:  # not hashable, not weakly referenceable, or its __hash__ fails: nothing is shared
        return own
    latest = known.get(unit_size)
    speed = latest.copy() if own.per_unit is None and latest is not None and latest is not own else own
    known[unit_size] = speed
    return speed
