"""Finishing a unit: transform, then ``collate_fn``, then ``pin_memory``, into the batch the consumer gets.

In: a unit's samples with their positions. Out: the batch (``Collated`` with its skips under ``max_failures``), or
the exception to raise at its position (``collate_fn``'s names the unit's indices). Sync user code runs in a pool
thread; with ``items`` work for worker processes, the whole finish runs there instead (``offload``). It owns
nothing.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from torch.utils.data import TensorDataset
from torch.utils.data._utils.pin_memory import pin_memory as _torch_pin_memory

from aloader._core.access import describe_indices
from aloader._core.context import Context, Record
from aloader._core.default_collate import collate, quicker
from aloader._core.gather import gather
from aloader._core.transform import transform_async, transform_sync
from aloader._failures import Collated, Skipped, split_skipped
from aloader.errors import with_context

__all__ = ["Finisher", "Offload", "pin_batch", "pin_memory", "plural"]

_pin_memory: Callable[[Any, str], Any] = _torch_pin_memory  # torch's helper (untyped), as its iterator calls it

# Finishing done elsewhere (worker processes): (positions, samples, label) -> the batch.
Offload = Callable[[list[Any], list[Any], str], Awaitable[Any]]


def pin_memory(batch: Any, device: str) -> Any:
    return _pin_memory(batch, device)


def plural(label: str) -> str:
    return "sample indices" if label == "sample index" else f"{label}s"


class Finisher:
    """Transform, collate and pin the units of one epoch."""

    def __init__(self, ctx: Context, offload: Offload | None = None) -> None:
        self._ctx = ctx
        self._offload = offload
        self._collate = quicker(ctx.plan.collate_fn)  # torch's default_collate, its dispatch taken in fewer steps
        plan = ctx.plan
        # Batches of an unchanged TensorDataset may be gathered (see gather) when nothing but collate touches them.
        self.gathers = self._collate is collate and plan.transform is None and plan.auto_collation

    def gathered(self, dataset: TensorDataset, keys: list[Any]) -> Any:
        """The batch of ``keys`` of a ``TensorDataset`` in one op per tensor, pinned, or None where it must be made
        sample by sample (see :mod:`aloader._core.gather`)."""
        batch = gather(dataset, keys)
        if batch is None:
            return None
        plan = self._ctx.plan
        if plan.pin_memory_device is not None:
            batch = pin_memory(batch, plan.pin_memory_device)
        return Collated(batch, [], len(keys)) if plan.skipping else batch

    async def finish(self, positions: list[Any], samples: list[Any], label: str) -> Any:
        """Transform each sample, collate the batch and pin it; sync user code runs in a thread."""
        ctx = self._ctx
        if self._offload is not None:
            return await self.pin(await self._offload(positions, samples, label))
        transform = ctx.plan.transform
        if transform is not None and inspect.iscoroutinefunction(transform):
            samples = await transform_async(ctx, transform, samples, positions, label)
            return await ctx.threads.run(lambda: self.finish_sync(positions, samples, label, transformed=True))
        return await ctx.threads.run(lambda: self.finish_sync(positions, samples, label))

    def finish_sync(
        self,
        positions: list[Any],
        samples: list[Any],
        label: str,
        transformed: bool = False,
        record: Record | None = None,
    ) -> Any:
        """Thread side of :meth:`finish` (also called at the end of a thread call that fetched the samples)."""
        ctx = self._ctx
        record = record or ctx.stats.add
        plan = ctx.plan
        if plan.transform is not None and not transformed:
            samples = transform_sync(ctx, plan.transform, samples, positions, label, record)
        skipped: list[Skipped] = []
        seen = len(samples)
        if plan.skipping:
            samples, positions, skipped = split_skipped(samples, positions)
            if not samples:
                return Collated(None, skipped, seen, empty=True)  # no batch: dropped (see _failures)
        started = time.perf_counter()
        try:
            batch = self._collate(samples if plan.auto_collation else samples[0])
        except Exception as exc:
            ctx.stats.failure("collate")
            raise with_context(exc, f"in collate_fn for the batch of {plural(label)} {describe_indices(positions)}")
        if plan.pin_memory_device is not None:
            batch = pin_memory(batch, plan.pin_memory_device)
        record("collate", len(samples), time.perf_counter() - started)
        return Collated(batch, skipped, seen) if plan.skipping else batch

    async def pin(self, batch: Any) -> Any:
        return await pin_batch(self._ctx, batch)


async def pin_batch(ctx: Context, batch: Any) -> Any:
    """Pin a batch made elsewhere (a worker process), in a thread."""
    device = ctx.plan.pin_memory_device
    if device is None:
        return batch
    return await ctx.threads.run(lambda: pin_memory(batch, device))
