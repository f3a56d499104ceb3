"""The window and the reorder buffer: how many units are in flight, and in which order outcomes leave.

In: units opened by the scheduler (``open``) and their outcomes (``complete``, from any stage's task). Out: the
``done`` queue the sink stage empties, in sampler order when ``in_order`` (a reorder buffer keyed by sequence
number), else as completed, then :data:`END` once the source is exhausted and every opened unit is complete. It owns
the failure budget, settled in hand-off order so that it runs out at the same batch in every run.

Memory is bounded by the window: a unit is opened only with a window slot, and its slot is given back when its
outcome reaches the consumer (the sink stage releases it).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aloader._core.limit import FETCH_ORDER
from aloader._core.outcomes import DELIVERED, END, NO_BATCH, SKIPPED, Failed
from aloader._failures import FailureBudget

__all__ = ["Order", "Window"]


class Window:
    """A counting bound on units between dispatch and hand-off, resizable while in use (the fast lane widens it).

    Slots go to waiters first come, first served (a wait for several keeps its place until it has them all);
    ``acquire(count)`` takes free slots at once (the lane's thread
    holding the source takes a window of runs in one call, not one await per slot)."""

    __slots__ = ("_debt", "_free", "_size", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._size = size
        self._debt = 0  # slots to take back as they are released (the window shrank)
        self._waiters: deque[asyncio.Future[None]] = deque()  # each gets one slot, in arrival order

    @property
    def size(self) -> int:
        return self._size

    async def acquire(self, count: int = 1) -> None:
        """Take ``count`` slots, waiting for those not free; cancelled meanwhile, it gives back what it took."""
        taken = 0
        try:
            while taken < count:
                if self._free and not self._waiters:
                    step = min(count - taken, self._free)
                    self._free -= step
                    taken += step
                    continue
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                if taken:  # it holds the head of the line (it was served first): it keeps it for the rest
                    self._waiters.appendleft(waiter)
                else:
                    self._waiters.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter.done() and not waiter.cancelled():
                        taken += 1  # handed a slot just before the cancellation: given back below
                    elif waiter in self._waiters:  # (a release in between may have passed over it already)
                        self._waiters.remove(waiter)
                    raise
                taken += 1
        except BaseException:
            self._give(taken)
            raise

    def release(self) -> None:
        if self._debt:
            self._debt -= 1
        else:
            self._give()

    def release_many(self, count: int) -> None:
        owed = min(self._debt, count)
        self._debt -= owed
        self._give(count - owed)

    def resize(self, size: int) -> None:
        self._give(max(0, size - self._size))
        self._debt += max(0, self._size - size)  # slots given back as units are handed off
        self._size = size

    def _give(self, count: int = 1) -> None:
        """Slots back: each to the first waiter still waiting, the rest free."""
        waiters = self._waiters
        while count and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1
        self._free += count


class Order:
    """Completes units into ``done`` in order, settles the failure budget, and ends the epoch with END."""

    def __init__(self, in_order: bool, window: Window, budget: FailureBudget | None) -> None:
        self.done: asyncio.Queue[object] = asyncio.Queue()  # bounded by the window
        self._in_order = in_order
        self._window = window
        self._budget = budget
        self._ready: dict[int, object] = {}  # in_order: finished out of turn, keyed by seq
        self._next_seq = 0
        self._outstanding = 0
        self._source_done = False
        # Told of each outcome as it is handed off, in the consumer's order (see StateLedger.handed_off).
        self.handed: Callable[[int, object], None] | None = None

    def open(self, count: int = 1) -> None:
        """``count`` more units were dispatched: END waits for their outcomes."""
        self._outstanding += count

    def skip(self, count: int) -> None:
        """The first ``count`` units were made and yielded before the pipeline started (``prelude.py``): the
        epoch's outcomes go on from unit ``count``."""
        self._next_seq += count

    def close(self) -> None:
        """The source is exhausted (or failed): END follows the last opened unit."""
        self._source_done = True
        self._end_if_finished()

    def complete(self, seq: int, outcome: object) -> None:
        if self._in_order:
            self._ready[seq] = outcome
            while self._next_seq in self._ready:
                self._hand_off(self._next_seq, self._ready.pop(self._next_seq))
                self._next_seq += 1
        else:
            self._hand_off(seq, outcome)
        self._outstanding -= 1
        self._end_if_finished()

    def fail(self, seq: int, error: BaseException) -> None:
        """Open unit ``seq`` and complete it as failed at once (the source itself failed there)."""
        self.open()
        self.complete(seq, Failed(error))

    async def settle(self, seq: int, work: Callable[[], Awaitable[Any]]) -> None:
        """Run ``work()`` and complete unit ``seq`` with its result, or with its exception as :class:`Failed`."""
        # ``work`` is called here, not by whoever spawned this: a task cancelled before it first runs then leaves no
        # coroutine that was never awaited.
        FETCH_ORDER.set(seq)  # this task's own context: its fetch calls wait for slots in unit order
        try:
            outcome: object = await work()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the consumer raises it at this batch
            outcome = Failed(exc)
        self.complete(seq, outcome)

    def _hand_off(self, seq: int, outcome: object) -> None:
        if self._budget is not None:  # in hand-off order: the budget runs out at the same batch in every run
            # A unit skipped whole still goes to the consumer, as SKIPPED: it counts as consumed in the state.
            outcome = self._budget.settle(outcome, SKIPPED, Failed)
        if self.handed is not None:
            self.handed(seq, outcome)
        if outcome is DELIVERED:
            return  # the consumer holds the batch: its slot is freed once it has yielded it (lane.py)
        if outcome is NO_BATCH:
            self._window.release()  # no batch to hand to the sink: the slot is free now
        else:
            self.done.put_nowait(outcome)

    def _end_if_finished(self) -> None:
        if self._source_done and self._outstanding == 0:
            self.done.put_nowait(END)
