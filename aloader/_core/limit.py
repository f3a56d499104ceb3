"""How many fetch calls run at once: ``concurrency`` in the main process; in a worker, what keeps its CPU share busy.

In the main process the limit is ``concurrency`` from the start, so a dataset that waits on storage has that many
samples in flight at once. A worker process shares the machine's cores with the other workers, and a thread of it
holds the GIL while it runs Python: once the worker keeps its share of the CPU busy, more fetch calls only interleave
(a CPU-bound dataset's first batch would be made together with the next ones, finishing later than torch's, which
makes one batch at a time). So in a worker the limit starts at 1 and follows the process's CPU use: it doubles
while the process uses less than 35% of its share of the cores (its samples mostly wait on storage), grows by a
quarter below 70%, and shrinks by a quarter above 90% (they compute), never below 1 nor above ``concurrency``. A
dataset that waits on storage reaches 64 calls in about 0.15 s; a CPU-bound one stays near one call at a time, in
order, as torch's worker does. It is
reconsidered every 20 ms, at a release, and on a timer while calls wait for a slot, so samples that block without
using the CPU (a hung request) still let the others go on.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Final

from aloader._stats import Recorder, Stage

__all__ = ["FetchSlots"]

_ADAPT_SECONDS: Final = 0.02
_DOUBLE_BELOW: Final = 0.35  # of the CPU share
_GROW_BELOW: Final = 0.7
_SHRINK_ABOVE: Final = 0.9


class FetchSlots:
    """A counting limit on fetch calls (``async with slots:``); the time callers wait goes to ``stage``'s blocked
    time. With ``cpu_share`` (cores this process may use), the limit adapts as the module docstring says."""

    def __init__(self, concurrency: int, recorder: Recorder, stage: Stage, cpu_share: float | None = None) -> None:
        self._max = concurrency
        self._share = cpu_share
        self._limit = concurrency if cpu_share is None else 1
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._recorder = recorder
        self._stage: Stage = stage
        self._since: float | None = None  # the last reconsideration (wall, process CPU)
        self._cpu = 0.0
        self._timer: asyncio.TimerHandle | None = None

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
        if self._share is None or self._since is None:
            return
        now = time.perf_counter()
        elapsed = now - self._since
        if elapsed < _ADAPT_SECONDS:
            return
        cpu = time.process_time()
        busy = (cpu - self._cpu) / elapsed / self._share
        self._since, self._cpu = now, cpu
        step = max(1, self._limit // 4)
        if busy < _DOUBLE_BELOW:
            self._limit = min(self._max, 2 * self._limit)
        elif busy < _GROW_BELOW:
            self._limit = min(self._max, self._limit + step)
        elif busy > _SHRINK_ABOVE:
            self._limit = max(1, self._limit - step)
