"""What every stage of one epoch shares: the plan, the counters, the threads, and the fetch slots.

These are resources, not state passed between stages: stages hand each other units and outcomes (see
``outcomes.py``), never fields of a common object. The one value two stages both write is :class:`Speed` (the fetch
stage and the fast lane learn how fast units are), kept by the loader across epochs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from aloader._core.limit import FetchSlots
from aloader._core.plan import Plan
from aloader._failures import Skipped
from aloader._stats import Recorder, Stage
from aloader._threads import DECLINED, ConsumerRun, ThreadPool
from aloader.errors import with_context

__all__ = ["Context", "Record", "gather_ordered"]

T = TypeVar("T")
Record = Callable[[Stage, int, float], None]  # where a thread call's stage times go (Recorder.add, or a lane list)


class Context:
    """One epoch's shared resources. ``threads`` runs sync user code (never the loop); ``slots`` bounds the fetch
    calls in flight to ``concurrency``."""

    __slots__ = ("consumer", "plan", "site", "slots", "speed", "stats", "threads")

    def __init__(self, plan: Plan, site: str = "") -> None:
        self.plan = plan
        # Where this core runs, for the messages of skipped samples: "" in the main process, " in DataLoader worker
        # process N" in a worker (a raised error gets it in the main process, see aloader._pool.transfer).
        self.site = site
        self.stats = Recorder()
        self.threads = ThreadPool(plan.concurrency + 2)
        self.slots = FetchSlots(plan.concurrency, self.stats, "fetch", plan.cpu_share, plan.speed)
        self.speed = plan.speed
        # The sync driver's consumer, which takes a call while it waits for its batch (``Emitter.offer``): None
        # until the sink is known, and in worker processes.
        self.consumer: Callable[[ConsumerRun, float], bool] | None = None

    async def run_sync(self, fn: Callable[[], T], quick: bool) -> T:
        """Run sync user code off the loop: in the consumer's thread if it is ``quick`` (a fast run of samples) and
        the consumer is waiting for its batch anyway (no thread start, no GIL turns), else on ``threads``."""
        if quick and self.consumer is not None:
            call = ConsumerRun(fn, asyncio.get_running_loop())
            if self.consumer(call, 0.0):
                result = await call.future
                if result is not DECLINED:
                    return result  # type: ignore[no-any-return]
        return await self.threads.run(fn)

    def failed(self, stage: Literal["fetch", "transform"], exc: Exception, where: str) -> Skipped:
        """A sample failed ``where``: a marker to skip it under ``max_failures``, else raise (torch's behaviour)."""
        if not self.plan.skipping:
            self.stats.failure(stage)
            raise with_context(exc, where)
        where += self.site
        return Skipped(with_context(exc, where), stage, where, exc)


async def gather_ordered(coros: list[Awaitable[Any]]) -> list[Any]:
    """Await all; if any failed, raise the failure of the earliest sample (the others are let finish)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
