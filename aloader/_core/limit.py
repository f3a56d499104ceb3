"""How many fetch calls run at once: ``concurrency`` in the main process; in a worker, what keeps its CPU share busy.

In the main process the limit is ``concurrency`` from the start, so a dataset that waits on storage has that many
samples in flight at once. A worker process shares the machine's cores with the other workers, and a thread of it
holds the GIL while it runs Python: once the worker keeps its share of the CPU busy, more fetch calls only interleave
(a CPU-bound dataset's first batch would be made together with the next ones, finishing later than torch's, which
makes one batch at a time, and the worker would hold more samples in memory). So in a worker the limit starts at 1
and follows the process's CPU use, measured every 20 ms as a fraction of its share of the cores (:class:`Adaptation`):

- under 35% (its samples mostly wait on storage), it doubles: a dataset that waits reaches 64 calls in ~0.15 s;
- over 95%, it shrinks by a quarter per window until the machine's idle time is known, then by an eighth per
  reading of it (a CPU-bound dataset stays near one call at a time, in order, as torch's worker);
- in between, it follows the machine's idle time, read from ``/proc/stat`` (Linux) once per 0.1 s or more, a step
  per reading: while under 85% of its share with at least 5% of all the machine's cores idle, it grows to its part
  of the idle cores at its present calls per busy share (``limit x (1 + idle / busy)``, at most double, at least a
  quarter more), and it shrinks by an eighth when a reading finds under 2% idle (the machine saturated). The
  doubling stage overshoots (a mixed dataset's first GETs all wait, so the limit doubles to ``concurrency`` before
  decoding starts), and this brings it back to what keeps the cores busy. Where the idle time cannot be read, the limit
  grows by a quarter per window while under 85% of the share.

The CPU use is smoothed over about 0.1 s (one window's varies far more than a step changes it), and the limit only
grows when calls waited for a slot in the window. The target is close to the whole share because a worker cannot
quite reach its nominal share (the main process, the other workers and the storage client take some): with a band of
70-90% a worker settled where it first kept 70% busy, and the images bench left 20% of the machine idle.

Why the machine's idle time: a worker sharing the cores with the others (and with the main process, the storage client,
anything else running) does not reach 85% of its nominal share however many calls it runs, so on its own share alone
the limit climbed by the noise of each window to ``concurrency``: on the images bench (2 cores, 2 workers) every worker
ran 64 calls where ~20 kept the machine as busy. Each call beyond that is a thread holding a decoded image while it
waits for the GIL: 64 threads per worker cost ~40 MiB of PSS per worker and a little CPU per sample, for no more
samples/s. When no core is idle, more calls cannot get more CPU, whoever is using it.

CPU-bound samples (:attr:`Speed.cpu_bound`: their calls compute for most of their time) cap the limit at the cores
the process may use (its share, rounded up; 1 for a worker per core): calls beyond that only take turns at the cores,
and the batch the consumer needs next finishes later. Without the cap, a CPU-bound dataset's worker beside a busy
thread (a saturated machine) climbed to 3-4 calls in its first 0.1 s (the machine's idle time is not known yet then,
and the workers' start had left cores idle), and its first batch was interleaved with three others.

Never below 1 nor above ``concurrency``. It is reconsidered at a release and on a timer while calls wait for a
slot, so samples that block without using the CPU (a hung request) still let the others go on.

Waiting calls get their slots in the order of the units they are for (:data:`FETCH_ORDER`, the unit's sequence
number, set by the task that makes the unit), the earliest unit first, and in arrival order within a unit. The
consumer takes batches in that order; with the limit at 1 (a worker's CPU-bound samples) slots in arrival order
fetched the first sample of every batch in flight before the second of the first batch: a worker's first batch came
~15 ms (four samples of 3 ms, and their hand-offs) after torch's, which makes one batch at a time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import sys
import time
from contextvars import ContextVar
from typing import Final

from aloader._core.plan import Speed
from aloader._stats import Recorder, Stage

__all__ = ["FETCH_ORDER", "Adaptation", "FetchSlots", "MachineIdle"]

FETCH_ORDER: ContextVar[int] = ContextVar("aloader_fetch_order", default=0)
"""The unit a task's fetch calls are for (its sequence number): waiting calls are granted slots earliest unit first."""

_ADAPT_SECONDS: Final = 0.02
_DOUBLE_BELOW: Final = 0.35  # of the CPU share
_GROW_BELOW: Final = 0.85
_SHRINK_ABOVE: Final = 0.95
# Each window's CPU use is averaged with the earlier ones (an exponential average over ~0.1 s): one 20 ms window holds
# a handful of samples and maybe a batch's collate, and measured anywhere from 17% to 92% of a worker's share in a
# steady run of the images bench; the limit then followed the noise (doubling and shrinking by turns).
_SMOOTHING: Final = 0.25
# Growth past the doubling stage needs more than this fraction of the machine's cores idle. /proc/stat counts in ticks
# (10 ms): it is read once at least 0.1 s have passed, 20 ticks on 2 cores.
_IDLE_TO_GROW: Final = 0.05
_IDLE_TO_SHRINK: Final = 0.02
_IDLE_SECONDS: Final = 0.1
_PROC_STAT: Final = "/proc/stat"


class MachineIdle:
    """The fraction of the machine's CPU time that was idle, from ``/proc/stat`` (Linux), over the last 0.1 s or more;
    None where it cannot be read or is not in the kernel's format (then the limit follows the process's own CPU use
    only)."""

    __slots__ = ("_at", "_idle", "_total", "fraction")

    def __init__(self) -> None:
        self.fraction: float | None = None
        self._at = time.perf_counter()
        counters = _cpu_counters() if sys.platform.startswith("linux") else None
        self._total, self._idle = counters if counters is not None else (0, 0)
        if counters is None:
            self._at = float("inf")  # never read again

    def update(self, now: float) -> float | None:
        """A new reading if 0.1 s have passed since the last one, else None (the last is ``fraction``)."""
        if now - self._at < _IDLE_SECONDS:
            return None
        counters = _cpu_counters()
        if counters is None:
            self._at, self.fraction = float("inf"), None
            return None
        total, idle = counters
        if total <= self._total:
            return None
        self.fraction = (idle - self._idle) / (total - self._total)
        self._at, self._total, self._idle = now, total, idle
        return self.fraction


def _cpu_counters() -> tuple[int, int] | None:
    """(all ticks, idle ticks) of the machine since boot: the first line of /proc/stat (idle and iowait count as
    idle)."""
    try:
        with open(_PROC_STAT, "rb") as stat:
            fields = stat.readline().split()
        ticks = [int(field) for field in fields[1:]]
    except (OSError, ValueError):  # unreadable, or not the kernel's format (an emulated /proc): not known
        return None
    if len(ticks) < 5 or fields[0] != b"cpu":
        return None
    return sum(ticks), ticks[3] + ticks[4]


class Adaptation:
    """The adaptive limit's decisions, one per window, from the process's CPU use as a fraction of its share
    (``busy``); see the module docstring. Pure arithmetic, so it is tested window by window."""

    __slots__ = ("_max", "busy", "idle", "limit")

    def __init__(self, maximum: int) -> None:
        self._max = maximum
        self.limit = 1
        self.busy: float | None = None  # the smoothed CPU use
        self.idle: float | None = None  # the machine's idle fraction, as last read (None: not known)

    def window(self, busy: float, waited: bool = True, idle: float | None = None, cap: int | None = None) -> int:
        """The limit after a window in which the process was ``busy`` (its CPU time over its share of the cores) and
        calls ``waited`` for a slot or not (if none did, the limit held nothing back: no reason to raise it), with
        ``idle`` the fraction of the machine's cores idle, when it was read anew for this window (None: no new
        reading; the last one holds), and at most ``cap`` (CPU-bound samples: the cores the process may use)."""
        smoothed = self.busy = busy if self.busy is None else self.busy + _SMOOTHING * (busy - self.busy)
        if idle is not None:
            self.idle = idle
        limit = self.limit
        step = max(1, limit // 4)
        if smoothed > _SHRINK_ABOVE and self.idle is None:  # a CPU-bound dataset's first windows
            self.limit = max(1, limit - step)
        elif waited and smoothed < _DOUBLE_BELOW:
            self.limit = min(self._max, 2 * limit)
        elif self.idle is None:  # the machine's idle time unknown: the process's own CPU use decides
            if waited and smoothed < _GROW_BELOW:
                self.limit = min(self._max, limit + step)
        elif idle is None:
            pass  # between two readings of the machine's idle time: a step per reading, up or down
        elif idle < _IDLE_TO_SHRINK or smoothed > _SHRINK_ABOVE:
            # A saturated machine, or its share fully busy once the idle time is known: an eighth less per reading.
            # A worker whose calls decode beside each other (without the GIL) passes 95% of its share for a moment
            # while the other workers wait; a quarter less per window there took a mixed dataset's worker from 28
            # calls to 10 in 60 ms, the cores idle while it climbed back.
            self.limit = max(1, limit - max(1, limit // 8))
        elif waited and smoothed < _GROW_BELOW and idle >= _IDLE_TO_GROW:
            # Its part of the idle cores (``idle`` of its share, the other workers' alike) at the calls per busy share
            # it has now: limit x (1 + idle / busy), at most double, at least a quarter more. A mixed dataset's start
            # (half the machine idle after the doubling stage) takes one reading instead of 0.7 s of quarter steps.
            wanted = math.ceil(limit * (1 + idle / max(smoothed, _DOUBLE_BELOW)))
            self.limit = min(self._max, 2 * limit, max(limit + step, wanted))
        if cap is not None:
            self.limit = min(self.limit, cap)
        return self.limit


class FetchSlots:
    """A counting limit on fetch calls (``async with slots:``); the time callers wait goes to ``stage``'s blocked
    time. With ``cpu_share`` (cores this process may use), the limit adapts as the module docstring says."""

    def __init__(
        self,
        concurrency: int,
        recorder: Recorder,
        stage: Stage,
        cpu_share: float | None = None,
        speed: Speed | None = None,
    ) -> None:
        self._share = cpu_share
        self._speed = speed
        self._climb = Adaptation(concurrency) if cpu_share is not None else None
        self._machine = MachineIdle() if cpu_share is not None else None
        self._limit = concurrency if cpu_share is None else 1
        self._in_flight = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap: (unit, arrival, future)
        self._arrivals = itertools.count()
        self._recorder = recorder
        self._stage: Stage = stage
        self._since: float | None = None  # the last reconsideration (wall, process CPU)
        self._cpu = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waited = False  # a call waited for a slot since the last reconsideration
        # Whether calls must measure their share of computing (Speed.computing, read by Speed.cpu_bound): the limit
        # follows the CPU, or is one call (CPU-bound samples are then fetched a batch per call). In the main process
        # with more calls it is never read, and its clock (a system call) is left out of every batch.
        self.reads_cpu = cpu_share is not None or concurrency == 1

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
        entry = (FETCH_ORDER.get(), next(self._arrivals), granted)
        heapq.heappush(self._waiters, entry)
        self._waited = True
        if self._share is not None and self._timer is None:
            self._timer = loop.call_later(_ADAPT_SECONDS, self._tick)
        started = time.perf_counter()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # granted just as we were cancelled: pass the slot on
            elif entry in self._waiters:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise
        finally:
            self._recorder.blocked(self._stage, time.perf_counter() - started)

    def release(self) -> None:
        self._in_flight -= 1
        self._adapt()
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            _, _, granted = heapq.heappop(self._waiters)
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
        idle = self._machine.update(now) if self._machine is not None else None
        cap = max(1, math.ceil(self._share)) if self._speed is not None and self._speed.cpu_bound else None
        self._limit = self._climb.window(busy, self._waited or bool(self._waiters), idle, cap)
        self._waited = False
