"""The fetch limit (``aloader._core.limit.FetchSlots``): fixed in the main process, adaptive in a worker."""

from __future__ import annotations

import asyncio

from aloader._core.limit import FetchSlots
from aloader._stats import Recorder


def test_fixed_limit_holds_and_a_cancelled_waiter_gives_no_slot_away() -> None:
    async def main() -> None:
        slots = FetchSlots(3, Recorder(), "fetch")
        inside, most = 0, 0
        go, three_inside = asyncio.Event(), asyncio.Event()

        async def call() -> None:
            nonlocal inside, most
            async with slots:
                inside += 1
                most = max(most, inside)
                if inside == 3:
                    three_inside.set()
                await go.wait()
                inside -= 1

        # The tasks take their first step in creation order before this one resumes: three enter, three wait.
        tasks = [asyncio.create_task(call()) for _ in range(6)]
        await three_inside.wait()
        assert inside == 3 and slots.limit == 3
        tasks[4].cancel()  # a waiter
        go.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert most == 3 and inside == 0 and tasks[4].cancelled()
        async with slots:  # every slot came back
            pass

    asyncio.run(main())


def test_adaptive_limit_grows_while_calls_wait_without_using_the_cpu() -> None:
    # In a worker the limit starts at 1; calls that block without using the CPU (storage) let it grow until all
    # eight are inside at once. A limit that never grew would leave seven waiting until the safety bound.
    async def main() -> None:
        slots = FetchSlots(64, Recorder(), "fetch", cpu_share=1.0)
        assert slots.limit == 1
        all_in = asyncio.Event()
        inside = 0

        async def call() -> None:
            nonlocal inside
            async with slots:
                inside += 1
                if inside == 8:
                    all_in.set()
                await all_in.wait()

        tasks = [asyncio.create_task(call()) for _ in range(8)]
        await asyncio.wait_for(all_in.wait(), timeout=60)
        await asyncio.gather(*tasks)
        assert slots.limit >= 8

    asyncio.run(main())
