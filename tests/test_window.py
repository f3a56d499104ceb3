"""The window (``aloader._core.order.Window``): the bound on units in flight, taken one slot or many at once."""

from __future__ import annotations

import asyncio

import pytest

from aloader._core.order import Window


def test_many_slots_are_taken_at_once_and_a_full_window_waits() -> None:
    async def main() -> None:
        window = Window(4)
        await window.acquire(3)  # free: no wait
        await window.acquire()
        waiting = asyncio.create_task(window.acquire(2))
        await asyncio.sleep(0)  # one step of the loop: it waits for two slots
        assert not waiting.done()
        window.release()
        await asyncio.sleep(0)
        assert not waiting.done()  # one of two
        window.release()
        await waiting
        window.release_many(4)
        await window.acquire(4)  # all came back

    asyncio.run(main())


def test_slots_go_first_come_first_served() -> None:
    async def main() -> None:
        window = Window(1)
        await window.acquire()
        order: list[str] = []

        async def take(name: str, count: int) -> None:
            await window.acquire(count)
            order.append(name)

        big = asyncio.create_task(take("big", 2))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 1))
        await asyncio.sleep(0)
        window.release()  # to big (first), which still waits for one more
        await asyncio.sleep(0)
        assert order == []
        window.release()
        await big
        window.release_many(2)
        await small
        assert order == ["big", "small"]

    asyncio.run(main())


@pytest.mark.parametrize("handed_first", [False, True])
def test_a_cancelled_acquire_gives_back_what_it_took(handed_first: bool) -> None:
    async def main() -> None:
        window = Window(3)
        await window.acquire(2)
        waiting = asyncio.create_task(window.acquire(3))  # takes the free slot, then waits for two
        await asyncio.sleep(0)
        if handed_first:
            window.release()  # a slot handed to the waiter, which is cancelled before it resumes
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        released = 1 if handed_first else 0
        window.release_many(2 - released)
        await window.acquire(3)  # every slot is back, none lost to the cancelled waiter

    asyncio.run(main())


def test_resize_widens_at_once_and_narrows_as_slots_come_back() -> None:
    async def main() -> None:
        window = Window(2)
        await window.acquire(2)
        waiting = asyncio.create_task(window.acquire())
        await asyncio.sleep(0)
        window.resize(3)  # the new slot goes to the waiter
        await waiting
        window.resize(1)  # two slots are owed: the next two releases are kept
        window.release_many(2)
        blocked = asyncio.create_task(window.acquire())
        await asyncio.sleep(0)
        assert not blocked.done() and window.size == 1
        window.release()
        await blocked

    asyncio.run(main())
