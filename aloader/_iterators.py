"""The two drivers over one pipeline: ``async for`` in the caller's loop, ``for`` through the sync bridge.

Both follow Python's generator conventions: exhausted or closed iterators raise ``Stop(Async)Iteration``; cancelling
a pending ``__anext__`` (like cancelling an async generator's) ends the iteration and stops all its work; a failed
batch raises at its position and iteration may continue with the next one, as torch's iterators allow.
"""

from __future__ import annotations

import asyncio
import atexit
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from typing import Any

from aloader._bridge import LoopChannel, ThreadChannel, start_loop_thread
from aloader._core.lane import Back
from aloader._core.outcomes import END, SKIPPED, Failed
from aloader._core.pipeline import Pipeline
from aloader._core.prelude import Prelude
from aloader._core.sink import HANDED_BACK
from aloader._state import Cursor
from aloader._stats import open_progress

__all__ = ["AsyncLoaderIterator", "LoaderIterator"]

# How long interpreter exit waits for a live iterator's in-flight calls before leaving its daemon threads behind.
_EXIT_JOIN_SECONDS = 10.0


# Added by torch to its length warning when num_workers > 0.
_REPLICA_HINT = (
    "For multiprocessing data-loading, this could be caused by not properly configuring the IterableDataset replica at "
    "each worker. Please see https://pytorch.org/docs/stable/data.html#torch.utils.data.IterableDataset for examples."
)


class _Consumer:
    """What both drivers do with an item taken from the pipeline's sink."""

    def __init__(self, pipeline: Pipeline, depth: int, index_sampler: Any, reported_len: int | None) -> None:
        self._pipeline: Pipeline | None = pipeline
        self._depth = depth
        self._index_sampler = index_sampler
        self._reported_len = reported_len  # len(dataset) seen by len(loader) for an IterableDataset, as torch
        self._yielded = 0
        self._closed = False
        self._cursor: Cursor | None = None  # the loader's record of what this consumer received (state_dict)
        self._num_workers = 0  # the loader's num_workers (torch's length warning says more with workers)
        self._bar: Any = None
        if pipeline.plan.progress:
            self._bar = open_progress(self._total())

    def _total(self) -> int | None:
        try:
            return len(self)
        except TypeError:  # an iterable dataset without __len__, or an unsized sampler
            return None

    def _close_bar(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    def __getstate__(self) -> Any:
        # As torch's iterators: an iterator is not picklable, and says so with torch's exception type.
        raise NotImplementedError(f"{type(self).__name__} cannot be pickled")

    def __len__(self) -> int:
        # As torch's iterator: the number of batches (or samples) the index sampler gives.
        return len(self._index_sampler)

    def _dropped(self, item: object) -> bool:
        """Count ``item`` in the cursor; True when it is not for the consumer (it still frees its slot): a batch of
        a resumed epoch re-run by worker copies that was already received, or a unit skipped whole (SKIPPED)."""
        dropped = self._cursor is not None and self._cursor.took(item, END)
        return dropped or item is SKIPPED

    def _count(self, item: object) -> Any:
        self._yielded += 1
        if self._bar is not None:
            self._bar.update()
        if self._reported_len is not None and self._yielded > self._reported_len:
            assert self._pipeline is not None
            # torch's warning, word for word (users' log filters match it).
            message = (
                f"Length of IterableDataset {self._pipeline.plan.dataset} was reported to be "
                f"{self._reported_len}(when accessing len(dataloader)), but {self._yielded} samples have been "
                "fetched. "
            )
            if self._num_workers > 0:
                message += _REPLICA_HINT
            warnings.warn(message, stacklevel=3)
        return item


class AsyncLoaderIterator(_Consumer):
    """``async for`` over a loader: the pipeline runs as a task in the caller's running loop."""

    def __init__(self, pipeline: Pipeline, depth: int, index_sampler: Any, reported_len: int | None) -> None:
        super().__init__(pipeline, depth, index_sampler, reported_len)
        self._channel = LoopChannel(depth)
        self._task: asyncio.Task[None] | None = None

    def __aiter__(self) -> AsyncLoaderIterator:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        if self._task is None:
            assert self._pipeline is not None
            self._task = asyncio.get_running_loop().create_task(
                self._pipeline.run_ahead(self._channel), name="aloader-pipeline"
            )
        try:
            item = await self._channel.get()
            while self._dropped(item):
                assert self._pipeline is not None
                self._pipeline.taken()
                item = await self._channel.get()
        except asyncio.CancelledError:
            # As with an async generator: a cancelled __anext__ ends the iteration. Wait for the pipeline to
            # stop so the consumer's task ends with no thread of ours left running.
            await self.aclose()
            raise
        if item is END:
            await self.aclose(ended=True)
            raise StopAsyncIteration
        assert self._pipeline is not None
        self._pipeline.taken()
        if isinstance(item, Failed):
            error = item.error
            # The traceback keeps this frame alive; it must not keep the iterator (and its pipeline) alive too.
            del self, item
            raise error
        return self._count(item)

    async def aclose(self, ended: bool = False) -> None:
        """Stop all work of this iterator and wait until it has stopped. Idempotent. ``ended``: the consumer took
        END, the pipeline's last item: its task is finishing by itself (nothing to cancel)."""
        self._closed = True
        self._channel.clear()
        self._close_bar()
        task = self._task
        if task is not None and not task.done():
            if not ended:
                task.cancel()
            await asyncio.wait([task])
        self._pipeline = None

    async def __aenter__(self) -> AsyncLoaderIterator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped without aclose() (e.g. after `break`): cancel the pipeline; its own cleanup releases the threads.
        task = self._task
        if task is not None and not task.done():
            loop = task.get_loop()
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(task.cancel)
                except RuntimeError:  # the loop closed in between
                    pass


_live: weakref.WeakSet[LoaderIterator] = weakref.WeakSet()


class LoaderIterator(_Consumer):
    """``for`` over a loader: the same pipeline on a background event loop thread, batches handed over a channel.

    Units known to be fast are made by the consumer in ``next()`` before the loop thread starts, and only when
    they need the loop (see ``_core/prelude.py``) does it start, the pipeline going on from there."""

    def __init__(self, pipeline: Pipeline, depth: int, index_sampler: Any, reported_len: int | None) -> None:
        super().__init__(pipeline, depth, index_sampler, reported_len)
        pipeline.fork_workers_if_safe()  # before the bridge's thread exists
        self._depth = depth
        self._prelude = pipeline.prelude(depth)
        self._left = 0.0  # while the consumer makes the batches before the loop: when next() last returned
        self._gaps: deque[float] = deque(maxlen=8)  # and its recent times between two next() calls
        self._thread: threading.Thread | None = None
        self._paced = False
        if self._prelude is None:
            self._start_loop(None)

    def _start_loop(self, back: Back | None, away: bool = False) -> None:
        pipeline = self._pipeline
        assert pipeline is not None
        channel: ThreadChannel | None = None
        left, gaps = self._left, list(self._gaps)

        def main(loop: asyncio.AbstractEventLoop) -> Any:
            nonlocal channel
            channel = ThreadChannel(loop, self._depth)
            if back is not None:  # what the consumer has taken, and how soon it came back for each
                channel.seed(back[0] - (back[2] is not None), left, gaps, away)
            return pipeline.run(channel, back)

        # Pipelines paced by the consumer (worker tasks) learn of each batch taken; others need no wake-up for it.
        self._paced, self._taken = pipeline.paced_by_consumer, pipeline.taken
        self._loop, self._task, self._thread = start_loop_thread(main, name="aloader-loop")
        assert channel is not None
        self._channel = channel
        _live.add(self)

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        item: object = HANDED_BACK
        if self._prelude is not None:
            item = self._made_here(self._prelude)
        try:
            if item is HANDED_BACK:
                item = self._channel.get()
                while self._dropped(item):
                    self._pace()
                    item = self._channel.get()
            else:
                self._dropped(item)  # counted: none is dropped (no worker re-runs a unit, no failure budget)
        except BaseException:
            # KeyboardInterrupt (or another async exception) while waiting: stop all work, then let it propagate.
            if self._thread is not None:
                self._channel.release_after_interrupt()
            self.close()
            raise
        if item is END:
            self.close()
            raise StopIteration
        self._pace()
        if isinstance(item, Failed):
            error = item.error
            # The traceback keeps this frame alive; it must not keep the iterator (and its threads) alive too.
            del self, item
            raise error
        return self._count(item)

    def _made_here(self, prelude: Prelude) -> object:
        """The next batch made by the consumer before the loop exists; the loop started if it must go on."""
        entered = time.perf_counter()
        away = False
        if self._left:
            gap = entered - self._left
            self._gaps.append(gap)
            idle_below = prelude.idle_below
            away = gap >= idle_below and min(self._gaps) >= idle_below
        try:
            item = prelude.next(away)
        except BaseException:  # Ctrl-C in the dataset's code (the consumer may be the main thread)
            self.close()
            raise
        if prelude.back is not None:
            self._prelude = None
            prelude.record()
            # Before the batch is yielded: the loop makes the next meanwhile.
            self._start_loop(prelude.back, away and prelude.back[1] is None and prelude.back[2] is None)
        self._left = time.perf_counter()
        return item

    def _pace(self) -> None:
        if self._paced:
            try:
                self._loop.call_soon_threadsafe(self._taken)
            except RuntimeError:  # the epoch is over and its loop closed: nothing left to pace
                pass

    def close(self) -> None:
        """Stop all work of this iterator and wait until its threads have exited. Idempotent."""
        self._shutdown(join_timeout=None)

    def _shutdown(self, join_timeout: float | None) -> None:
        thread = self._thread
        if thread is None:  # the consumer made every batch: no loop was started
            prelude, self._prelude = self._prelude, None
            if prelude is not None:
                prelude.record()
            if not self._closed and self._pipeline is not None:
                self._pipeline.end_before_loop()
            self._closed = True
            self._close_bar()
            self._pipeline = None
            return
        if not self._closed:
            self._closed = True
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # the loop has already finished the epoch and closed
                pass
        # Joining from the loop thread itself (a GC there) would deadlock; there the loop is about to end anyway.
        if threading.current_thread() is not thread and not sys.is_finalizing():
            thread.join(join_timeout)
        self._channel.clear()
        self._close_bar()
        self._pipeline = None

    def __enter__(self) -> LoaderIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # No channel: __init__ was interrupted, and start_loop_thread already stopped what it had started; or the
        # consumer made the batches so far, and there is only its stats to record.
        if not getattr(self, "_closed", True) and (hasattr(self, "_channel") or getattr(self, "_prelude", None)):
            self.close()


@atexit.register
def _close_live_iterators() -> None:
    # atexit runs while daemon threads still run, so half-consumed iterators can stop cleanly here; a call stuck in
    # user code gets a bounded wait, after which its daemon thread is left to the interpreter's exit.
    for iterator in list(_live):
        iterator._shutdown(join_timeout=_EXIT_JOIN_SECONDS)
