"""The per-sample ``transform``: sync ones in the calling thread (a pool thread, never the loop), ``async def``
ones as tasks on the loop.

In: a unit's fetched samples (some may be ``Skipped`` markers under ``max_failures``) and their positions (index or
item number, for messages). Out: the transformed samples, a failing one raised with its position in the message, or
replaced by a marker when failures are skipped. It owns nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aloader._core.context import Context, Record, gather_ordered
from aloader._failures import Skipped, named, transform_each

__all__ = ["transform_async", "transform_sync"]


def transform_sync(
    ctx: Context, transform: Callable[[Any], Any], samples: list[Any], positions: list[Any], label: str, record: Record
) -> list[Any]:
    """Thread side: ``transform`` over ``samples`` in order, timed as one stage entry."""
    started = time.perf_counter()
    out = transform_each(transform, samples, positions, label, lambda exc, where: ctx.failed("transform", exc, where))
    record("transform", len(samples), time.perf_counter() - started)
    return out


async def transform_async(
    ctx: Context,
    transform: Callable[[Any], Awaitable[Any]],
    samples: list[Any],
    positions: list[Any],
    label: str,
) -> list[Any]:
    """Loop side: an ``async def`` transform over ``samples``, concurrently, results in order."""

    async def apply(sample: Any, position: Any) -> Any:
        if type(sample) is Skipped:
            return sample
        started = time.perf_counter()
        try:
            out = await transform(sample)
        except Exception as exc:
            return ctx.failed("transform", exc, f"in transform for {label} {position!r}{named(sample)}")
        ctx.stats.add("transform", 1, time.perf_counter() - started)
        return out

    return await gather_ordered([apply(s, p) for s, p in zip(samples, positions, strict=True)])
