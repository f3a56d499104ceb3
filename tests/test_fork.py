"""Forking workers beside other threads: the fork gate that holds aloader's threads out of user code, and many pools
started while other threads log, allocate, hold locks and run another loader (see ``_pool/setup.py``)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

import aloader
from aloader._threads import FORK_GATE, ThreadPool
from tests import pool_datasets as pd
from tests.conftest import Driver


class _Held:
    """A call of user code on a ThreadPool thread, held inside until released."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.pool = ThreadPool(1)

    def __call__(self) -> None:
        self.entered.set()
        assert self.release.wait(60)


def _run_in_pool(pool: ThreadPool, fn: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` on ``pool`` from an event loop in a thread of its own; the outcome lands in the list."""
    outcome: list[Any] = []

    async def main() -> None:
        try:
            outcome.append(await pool.run(fn))
        finally:
            await pool.close()
            pool.join()

    thread = threading.Thread(target=lambda: asyncio.run(main()))
    thread.start()
    return thread, outcome


def test_a_fork_waits_for_no_thread_in_user_code_and_gives_up_on_one_that_stays() -> None:
    held = _Held()
    thread, _ = _run_in_pool(held.pool, held)
    assert held.entered.wait(60)
    with FORK_GATE.closed(0.05) as quiet:  # the call stays inside throughout: the fork must not happen
        assert not quiet
    held.release.set()
    thread.join()
    with FORK_GATE.closed(60) as quiet:  # nothing in user code now: at once
        assert quiet


def test_no_call_of_user_code_begins_while_the_gate_is_closed() -> None:
    order: list[str] = []
    began = threading.Event()

    def call() -> None:
        order.append("call")
        began.set()

    with FORK_GATE.closed(60) as quiet:
        assert quiet
        thread, _ = _run_in_pool(ThreadPool(1), call)
        assert not began.wait(0.2)  # a bounded look for a defect: a correct gate never lets it begin here
        order.append("fork done")
    thread.join()
    assert order == ["fork done", "call"]


def test_a_fork_from_inside_user_code_does_not_wait_for_itself() -> None:
    def nested() -> bool:
        with FORK_GATE.closed(60) as quiet:
            return quiet

    thread, outcome = _run_in_pool(ThreadPool(1), nested)
    thread.join()
    assert outcome == [True]


class _Numbers(Dataset[int]):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> int:
        return i


class _Counting(logging.Handler):
    """Counts the records it handles (under the handler's lock, as every handler's emit runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1


@pytest.fixture
def busy_threads() -> Iterator[_Counting]:
    """Other threads, as a training process has them: one logging through a handler, one allocating while it holds
    a lock for the whole test, one iterating another loader (threads of aloader's own, running user code)."""
    stop = threading.Event()
    handler = _Counting()
    logger = logging.getLogger("tests.pool")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not into pytest's log capture, which would keep every record
    held = threading.Lock()

    def logs() -> None:
        while not stop.wait(0.0005):  # a pause between records, not synchronisation
            logger.info("tick")

    def allocates() -> None:
        with held:
            while not stop.wait(0.0005):
                _ = [bytearray(4096) for _ in range(64)]

    def iterates() -> None:
        loader = aloader.DataLoader(_Numbers(), batch_size=8, concurrency=4)
        while not stop.is_set():
            assert sum(len(batch) for batch in loader) == 64

    threads = [threading.Thread(target=fn, name=f"busy-{fn.__name__}") for fn in (logs, allocates, iterates)]
    for thread in threads:
        thread.start()
    try:
        yield handler
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        logger.removeHandler(handler)
        logger.propagate = True


def test_many_pools_start_and_close_beside_busy_threads(driver: Driver, busy_threads: _Counting) -> None:
    # 67 pools per driver, 201 in all: every one starts, serves its batches and closes; no hang (the suite's
    # timeout), nothing left behind (the no_leaks fixture). The workers log too, through the inherited handler.
    for _ in range(67):
        batches = driver.collect(aloader.DataLoader(pd.LoggingSquares(), batch_size=2, num_workers=2))
        assert torch.cat(batches).tolist() == [0, 1, 4, 9]
    assert busy_threads.records > 0
