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
