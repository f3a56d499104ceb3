"""The pipeline's thread pool (``aloader._threads.ThreadPool``): threads started on demand, gone after close()."""

from __future__ import annotations

import asyncio
import threading

from aloader._threads import ThreadPool


def test_a_thread_that_leaves_after_its_call_is_replaced_and_close_waits_for_the_rest() -> None:
    async def main() -> None:
        pool = ThreadPool(1)
        names: list[str] = []

        def leaving() -> str:
            pool.leave_after_call()
            return threading.current_thread().name

        first = await pool.run(leaving)
        pool.join()  # the thread exits by itself once its call is done: join returns without close()
        assert not any(t.name == first for t in threading.enumerate())
        # The pool is not spent: the next call starts a thread of its own (the pool's bound counts live threads).
        names.append(await pool.run(lambda: threading.current_thread().name))
        names.append(await pool.run(lambda: threading.current_thread().name))
        assert names[0] == names[1] != first and pool.thread_count == 2
        await pool.close()
        pool.join()
        assert not any(t.name.startswith(first.rsplit("-", 1)[0]) for t in threading.enumerate())

    asyncio.run(main())


def test_close_after_every_thread_left_resolves_at_once() -> None:
    async def main() -> None:
        pool = ThreadPool(2)
        await pool.run(pool.leave_after_call)
        pool.join()
        done = pool.close()
        assert done.done()  # nothing to wake or wait for
        await done

    asyncio.run(main())


def test_a_thread_asked_to_leave_stays_for_a_call_queued_meanwhile() -> None:
    """The pool's bound counts a leaving thread until it has left: a call queued while it finished is run by it,
    not left without a thread."""

    async def main() -> None:
        pool = ThreadPool(1)
        second_queued = threading.Event()

        def first() -> str:
            pool.leave_after_call()
            assert second_queued.wait(timeout=60)
            return threading.current_thread().name

        one = pool.submit(first)
        two = pool.submit(lambda: threading.current_thread().name)  # queued while the first call runs
        second_queued.set()
        names = await asyncio.gather(one, two)
        assert names[0] == names[1] and pool.thread_count == 1
        await pool.close()
        pool.join()

    asyncio.run(main())
