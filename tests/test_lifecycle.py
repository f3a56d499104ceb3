"""Early exit stops all work promptly and leaves no task, thread or file descriptor behind.

The autouse ``no_leaks`` fixture (conftest) checks threads and descriptors after every test; these tests add the
exits themselves and what must hold right after each.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import aloader
from aloader._bridge import ThreadChannel
from aloader._core import prelude
from tests.conftest import Driver
from tests.datasets import AsyncSquares, Rows


def big() -> TensorDataset:
    return TensorDataset(torch.arange(10_000))


def our_threads() -> list[threading.Thread]:
    # The loader's threads; test servers (the session's object server) are not the loader's, and the forker thread
    # (forks asked for off the main thread) serves the whole process once started.
    lasting = ("aloader-objectserver", "aloader-forker")
    return [t for t in threading.enumerate() if t.name.startswith("aloader") and t.name not in lasting]


def test_break_stops_everything(driver: Driver) -> None:
    assert len(driver.collect(aloader.DataLoader(big(), batch_size=4), limit=3)) == 3
    assert our_threads() == []


def test_sync_close_and_context_manager() -> None:
    it = iter(aloader.DataLoader(big(), batch_size=4))
    next(it)
    it.close()
    assert our_threads() == []
    with pytest.raises(StopIteration):
        next(it)
    it.close()  # idempotent
    with iter(aloader.DataLoader(big(), batch_size=4)) as it2:
        next(it2)
    assert our_threads() == []


def test_sync_drop_iterator() -> None:
    it = iter(aloader.DataLoader(big(), batch_size=4))
    next(it)
    del it
    assert our_threads() == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aclose_and_async_context_manager(loop: str) -> None:
    async def main() -> None:
        it = aiter(aloader.DataLoader(AsyncSquares(1000), batch_size=4))
        await anext(it)
        await it.aclose()
        assert our_threads() == []
        assert asyncio.all_tasks() == {asyncio.current_task()}
        with pytest.raises(StopAsyncIteration):
            await anext(it)
        async with aiter(aloader.DataLoader(big(), batch_size=4)) as it2:
            await anext(it2)
        assert our_threads() == []
        assert asyncio.all_tasks() == {asyncio.current_task()}

    Driver(f"async-{loop}").run_async(main)


@pytest.mark.parametrize("ahead", [False, True], ids=["pipeline", "ahead"])
def test_async_drop_iterator_cancels_the_pipeline(ahead: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping an unclosed ``async for`` iterator stops its work: the pipeline's tasks (cancelled), or the lane's
    thread making a fast epoch's batches ahead of the pipeline (a task of the loop waits for it)."""
    if not ahead:
        monkeypatch.setattr(prelude.Prelude, "applies", staticmethod(lambda ctx, lane: False))

    async def main() -> None:
        it = aiter(aloader.DataLoader(big(), batch_size=4))
        await anext(it)
        pipeline_tasks = asyncio.all_tasks() - {asyncio.current_task()}
        assert len(pipeline_tasks) == (1 if ahead else 3)  # ahead: the pipeline's own task only
        del it
        # Dropping schedules cancellation; waiting for those very tasks (no sleep) shows they end and clean up.
        await asyncio.wait(pipeline_tasks)
        assert our_threads() == []

    asyncio.run(main())


def test_cancelling_the_consumer_task_stops_the_pipeline() -> None:
    started = threading.Event()
    release = threading.Event()

    class Blocks(Dataset[Any]):
        def __len__(self) -> int:
            return 100

        def __getitem__(self, i: int) -> int:
            if i >= 2:
                started.set()
                release.wait(timeout=60)
            return i

    async def main() -> None:
        got: list[int] = []

        async def consume() -> None:
            async for batch in aloader.DataLoader(Blocks(), batch_size=None, concurrency=2):
                got.append(int(batch))

        task = asyncio.get_running_loop().create_task(consume())
        await asyncio.to_thread(started.wait, 60)
        task.cancel()
        release.set()  # the blocked threads can only finish their current call; nothing new is started
        with pytest.raises(asyncio.CancelledError):
            await task
        assert our_threads() == []
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


def test_keyboard_interrupt_in_the_consumer_body(driver: Driver) -> None:
    if driver.is_async:

        async def consume() -> None:
            async for _ in aloader.DataLoader(big(), batch_size=4):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            driver.run_async(consume)
    else:
        with pytest.raises(KeyboardInterrupt):
            for _ in aloader.DataLoader(big(), batch_size=4):
                raise KeyboardInterrupt
    assert our_threads() == []


def test_keyboard_interrupt_while_waiting_for_a_batch() -> None:
    """Ctrl-C (SIGINT) while the consumer is blocked in next(): it raises there and stops the pipeline."""
    entered = threading.Event()
    release = threading.Event()

    class Stalls(Dataset[Any]):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> int:
            entered.set()
            release.wait(timeout=60)
            return i

    def interrupt() -> None:
        entered.wait(timeout=60)
        os.kill(os.getpid(), signal.SIGINT)
        release.set()

    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in aloader.DataLoader(Stalls(), batch_size=None, concurrency=1):
                pass
    finally:
        release.set()
        interrupter.join()
    assert our_threads() == []


def test_consumer_lets_go_of_a_channel_lock_left_held_by_an_interrupt() -> None:
    """A SIGINT handler may raise right after a ``with`` block's ``__enter__`` took the channel's lock, and then
    ``__exit__`` does not run (CPython checks for signals between those bytecodes). ``next()`` then calls
    ``release_after_interrupt`` before closing; here the lock is left held the same way (taken twice, as a nested
    interrupted block would), and the loop's thread must be able to take it afterwards."""
    loop = asyncio.new_event_loop()
    try:
        channel = ThreadChannel(loop, 2)
        channel._lock.acquire()
        channel._lock.acquire()
        channel.release_after_interrupt()
        channel.release_after_interrupt()  # idempotent, and a no-op when not held
        taken = threading.Event()

        def loop_side() -> None:
            with channel._lock:
                taken.set()

        other = threading.Thread(target=loop_side)
        other.start()
        other.join(timeout=60)
        assert taken.is_set()
    finally:
        loop.close()


@pytest.mark.parametrize("style", ["sync", "async"])
def test_interpreter_exits_with_a_half_consumed_loader(style: str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, torch, aloader
        from torch.utils.data import TensorDataset
        loader = aloader.DataLoader(TensorDataset(torch.arange(100_000)), batch_size=8)
        if "{style}" == "sync":
            it = iter(loader)
            next(it)
            KEEP = it  # still referenced at exit
        else:
            async def main():
                global KEEP
                KEEP = aiter(loader)
                await anext(KEEP)
            asyncio.run(main())
        print("done")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert "Traceback" not in result.stderr


def test_iterators_are_independent(driver: Driver) -> None:
    loader = aloader.DataLoader(TensorDataset(torch.arange(6)), batch_size=2)
    first = iter(loader)
    second = iter(loader)
    try:
        assert next(first)[0].tolist() == [0, 1]
        assert next(second)[0].tolist() == [0, 1]
        assert next(first)[0].tolist() == [2, 3]
    finally:
        first.close()
        second.close()
    assert [b[0].tolist() for b in driver.collect(loader)] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("fast", [True, False], ids=["lane", "concurrent"])
def test_a_defect_in_the_scheduler_reaches_the_consumer(
    driver: Driver, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """The scheduler's task raising (a bug of ours, not a sample's failure) ends the epoch with that error at once:
    the consumer is not left waiting, nor given an epoch that looks complete."""
    from aloader._core.schedule import Scheduler

    def broken(self: Scheduler, seq: int, unit: Any) -> Any:
        raise RuntimeError("a defect in the scheduler")

    monkeypatch.setattr(Scheduler, "start_unit", broken)
    monkeypatch.setattr("aloader._core.lane.Lane.units", lambda self: 1)  # every unit through start_unit
    # Sample by sample (an unchanged TensorDataset is gathered by a `for` consumer before the loop, prelude.py).
    loader = aloader.DataLoader(Rows(torch.arange(100)), batch_size=4)
    if fast:
        loader._speed.per_unit = 1e-6
        # The scheduler from the first unit: not the consumer's batches before the loop (prelude.py).
        monkeypatch.setattr("aloader._core.prelude.Prelude.applies", staticmethod(lambda ctx, lane: False))
    with pytest.raises(RuntimeError, match="a defect in the scheduler"):
        driver.collect(loader)
