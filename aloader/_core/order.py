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
from collections.abc import Awaitable, Callable
from typing import Any

from aloader._core.limit import FETCH_ORDER
from aloader._core.outcomes import DELIVERED, END, NO_BATCH, SKIPPED, Failed
from aloader._failures import FailureBudget

__all__ = ["Order", "Window"]


class Window:
    """A counting bound on units between dispatch and hand-off, resizable while in use (the fast lane widens it)."""

    __slots__ = ("_debt", "_size", "_slots")

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)
        self._size = size
        self._debt = 0  # slots to take back as they are released (the window shrank)

    @property
    def size(self) -> int:
        return self._size

    async def acquire(self) -> None:
        await self._slots.acquire()

    def release(self) -> None:
        if self._debt:
            self._debt -= 1
        else:
            self._slots.release()

    def release_many(self, count: int) -> None:
        for _ in range(count):
            self.release()

    def resize(self, size: int) -> None:
        for _ in range(size - self._size):
            self._slots.release()
        self._debt += max(0, self._size - size)  # slots given back as units are handed off
        self._size = size


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
