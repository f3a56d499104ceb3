"""How many fetch calls run at once: ``concurrency`` in the main process; in a worker, what keeps its CPU share busy.

In the main process the limit is ``concurrency`` from the start, so a dataset that waits on storage has that many
samples in flight at once. A worker process shares the machine's cores with the other workers, and a thread of it
holds the GIL while it runs Python: once the worker keeps its share of the CPU busy, more fetch calls only interleave
(a CPU-bound dataset's first batch would be made together with the next ones, finishing later than torch's, which
makes one batch at a time, and the worker would hold more samples in memory). So in a worker the limit starts at 1
and follows the process's CPU use, measured every 20 ms as a fraction of its share of the cores (:class:`Adaptation`):

- under 35% (its samples mostly wait on storage), it doubles: a dataset that waits reaches 64 calls in ~0.15 s;
- under 85%, it grows by a quarter; over 95%, it shrinks by a quarter (a CPU-bound dataset stays near one call at a
  time, in order, as torch's worker).

The CPU use is smoothed over about 0.1 s (one window's varies far more than a step changes it), and the limit only
grows when calls waited for a slot in the window. The target is close to the whole share because a worker cannot
quite reach its nominal share (the main process, the other workers and the storage client take some): with a band of
70-90% a worker settled where it first kept 70% busy, and the images bench left 20% of the machine idle.

Never below 1 nor above ``concurrency``. It is reconsidered at a release and on a timer while calls wait for a
slot, so samples that block without using the CPU (a hung request) still let the others go on.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Final

from aloader._stats import Recorder, Stage

__all__ = ["Adaptation", "FetchSlots"]

_ADAPT_SECONDS: Final = 0.02
_DOUBLE_BELOW: Final = 0.35  # of the CPU share
_GROW_BELOW: Final = 0.85
_SHRINK_ABOVE: Final = 0.95
# Each window's CPU use is averaged with the earlier ones (an exponential average over ~0.1 s): one 20 ms window holds
# a handful of samples and maybe a batch's collate, and measured anywhere from 17% to 92% of a worker's share in a
# steady run of the images bench; the limit then followed the noise (doubling and shrinking by turns).
_SMOOTHING: Final = 0.25


class Adaptation:
    """The adaptive limit's decisions, one per window, from the process's CPU use as a fraction of its share
    (``busy``); see the module docstring. Pure arithmetic, so it is tested window by window."""

    __slots__ = ("_max", "busy", "limit")

    def __init__(self, maximum: int) -> None:
        self._max = maximum
        self.limit = 1
        self.busy: float | None = None  # the smoothed CPU use

    def window(self, busy: float, waited: bool = True) -> int:
        """The limit after a window in which the process was ``busy`` (its CPU time over its share of the cores) and
        calls ``waited`` for a slot or not (if none did, the limit held nothing back: no reason to raise it)."""
        smoothed = self.busy = busy if self.busy is None else self.busy + _SMOOTHING * (busy - self.busy)
        limit = self.limit
        step = max(1, limit // 4)
        if smoothed > _SHRINK_ABOVE:
            self.limit = max(1, limit - step)
        elif not waited:
            pass
        elif smoothed < _DOUBLE_BELOW:
            self.limit = min(self._max, 2 * limit)
        elif smoothed < _GROW_BELOW:
            self.limit = min(self._max, limit + step)
        return self.limit


class FetchSlots:
    """A counting limit on fetch calls (``async with slots:``); the time callers wait goes to ``stage``'s blocked
    time. With ``cpu_share`` (cores this process may use), the limit adapts as the module docstring says."""

    def __init__(self, concurrency: int, recorder: Recorder, stage: Stage, cpu_share: float | None = None) -> None:
        self._share = cpu_share
        self._climb = Adaptation(concurrency) if cpu_share is not None else None
        self._limit = concurrency if cpu_share is None else 1
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._recorder = recorder
        self._stage: Stage = stage
        self._since: float | None = None  # the last reconsideration (wall, process CPU)
        self._cpu = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waited = False  # a call waited for a slot since the last reconsideration

    @property
    def limit(self) -> int:
        return self._limit

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    async def acquire(self) -> None:
        if self._since is None:
            self._since, self._cpu = time.perf_counter(), time.process_time()
        if self._in_flight < self._limit and not self._waiters:
            self._in_flight += 1
            return
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()
        self._waiters.append(granted)
        self._waited = True
        if self._share is not None and self._timer is None:
            self._timer = loop.call_later(_ADAPT_SECONDS, self._tick)
        started = time.perf_counter()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # granted just as we were cancelled: pass the slot on
            elif granted in self._waiters:
                self._waiters.remove(granted)
            raise
        finally:
            self._recorder.blocked(self._stage, time.perf_counter() - started)

    def release(self) -> None:
        self._in_flight -= 1
        self._adapt()
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            granted = self._waiters.popleft()
            if granted.done():  # its task was cancelled while it waited
                continue
            self._in_flight += 1
            granted.set_result(None)

    def _tick(self) -> None:
        self._timer = None
        self._adapt()
        self._grant()
        if self._waiters:
            self._timer = asyncio.get_running_loop().call_later(_ADAPT_SECONDS, self._tick)

    def _adapt(self) -> None:
        if self._climb is None or self._share is None or self._since is None:
            return
        now = time.perf_counter()
        elapsed = now - self._since
        if elapsed < _ADAPT_SECONDS:
            return
        cpu = time.process_time()
        busy = (cpu - self._cpu) / elapsed / self._share
        self._since, self._cpu = now, cpu
        self._limit = self._climb.window(busy, self._waited or bool(self._waiters))
        self._waited = False
