"""The fetch limit (``aloader._core.limit.FetchSlots``): fixed in the main process, adaptive in a worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aloader._core import limit
from aloader._core.limit import FETCH_ORDER, Adaptation, FetchSlots, MachineIdle
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


def test_waiting_calls_get_slots_earliest_unit_first_then_in_arrival_order() -> None:
    """A worker's slots go to the batch the consumer needs first: its samples are not queued behind the first
    sample of every later batch in flight."""

    async def main() -> None:
        slots = FetchSlots(1, Recorder(), "fetch")
        order: list[tuple[int, int]] = []
        release = asyncio.Event()

        async def holder() -> None:
            async with slots:
                await release.wait()

        async def call(unit: int, sample: int) -> None:
            FETCH_ORDER.set(unit)  # as the task that makes the unit sets it
            async with slots:
                order.append((unit, sample))

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)  # the holder takes the only slot (a step of the loop, not a timed wait)
        # Later units arrive first, and a unit's samples arrive interleaved with another's; a cancelled waiter
        # is passed over.
        arrivals = [(3, 0), (1, 0), (2, 0), (1, 1), (3, 1), (1, 2), (2, 1)]
        tasks = [asyncio.create_task(call(unit, sample)) for unit, sample in arrivals]
        await asyncio.sleep(0)  # every call is waiting now
        tasks[2].cancel()  # unit 2's first sample
        release.set()
        await asyncio.gather(first, *tasks, return_exceptions=True)
        assert order == [(1, 0), (1, 1), (1, 2), (2, 1), (3, 0), (3, 1)]
        assert FETCH_ORDER.get() == 0  # each task set it in its own context

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


# The adaptive limit's decisions, window by window (``Adaptation``): fed the CPU use of each 20 ms window as a fraction
# of the worker's share of the cores, so no test depends on timing.


def test_mostly_waiting_doubles_and_computing_shrinks_to_one_call() -> None:
    rule = Adaptation(64)
    assert [rule.window(0.1) for _ in range(7)] == [2, 4, 8, 16, 32, 64, 64]
    # Fully busy from then on: it shrinks once the average (~0.1 s) is over 95%, then by a quarter per window.
    assert [rule.window(1.0) for _ in range(14)] == [64] * 10 + [48, 36, 27, 21]
    rule = Adaptation(64)
    assert [rule.window(1.0) for _ in range(5)] == [1] * 5  # a CPU-bound dataset stays at one call at a time


def test_cpu_bound_samples_cap_the_limit_at_the_cores_even_where_it_would_double() -> None:
    # A worker's first windows: its share was idle while it started, so the rule alone would double; samples known to
    # compute most of their time are capped at its cores (one per worker on two cores with two workers).
    rule = Adaptation(64)
    assert [rule.window(0.1, cap=1) for _ in range(3)] == [1, 1, 1]
    rule = Adaptation(64)
    assert [rule.window(0.1, cap=2) for _ in range(3)] == [2, 2, 2]
    rule = Adaptation(64)
    rule.limit = 4  # climbed before the samples were known to be CPU-bound: brought down at once
    assert rule.window(0.9, cap=1) == 1


def test_grows_until_its_share_of_the_cores_is_nearly_all_busy() -> None:
    # A worker that cannot get its whole share (others take some) still grows while under 85% of it: the old band
    # (70-90%) stopped at 70% and left the machine a fifth idle.
    rule = Adaptation(64)
    rule.limit = 12
    assert [rule.window(0.8) for _ in range(3)] == [15, 18, 22]
    rule = Adaptation(64)
    rule.limit = 12
    assert [rule.window(0.9) for _ in range(3)] == [12, 12, 12]  # between 85% and 95%: held


def test_one_windows_noise_does_not_move_the_limit() -> None:
    rule = Adaptation(64)
    rule.limit = 16
    assert [rule.window(0.9) for _ in range(8)] == [16] * 8
    assert rule.window(0.1) == 20  # one window mostly waiting (a batch's samples all on their GET): no doubling
    rule = Adaptation(64)
    rule.limit = 16
    assert [rule.window(0.9) for _ in range(8)] == [16] * 8
    assert rule.window(1.0) == 16  # nor does one fully busy window shrink it
    assert [rule.window(0.1) for _ in range(6)][-1] == 64  # a dataset that really waits still doubles


def test_the_limit_only_grows_when_calls_waited_for_a_slot() -> None:
    rule = Adaptation(64)
    rule.limit = 8
    assert rule.window(0.1, waited=False) == 8  # idle with nothing held back (between epochs): no growth
    assert rule.window(0.6, waited=False) == 8
    rule = Adaptation(64)
    rule.limit = 8
    assert rule.window(1.0, waited=False) == 6  # shrinking does not need waiters


def test_the_limit_stays_within_one_and_concurrency() -> None:
    rule = Adaptation(3)
    assert [rule.window(0.0) for _ in range(4)] == [2, 3, 3, 3]
    assert [rule.window(2.0) for _ in range(6)] == [3, 3, 2, 1, 1, 1]


def test_a_saturated_machine_brings_the_limit_down_a_step_per_reading() -> None:
    # The doubling stage overshoots (the first GETs all wait); when a reading of the machine finds no idle core, the
    # limit comes down by an eighth, once per reading (the windows between two readings hold it).
    rule = Adaptation(64)
    rule.limit = 64
    assert rule.window(0.85, idle=0.0) == 56
    assert [rule.window(0.85) for _ in range(4)] == [56] * 4
    assert rule.window(0.85, idle=0.0) == 49
    assert rule.window(0.85, idle=0.01) == 43


def test_growth_past_the_doubling_needs_idle_cores_on_the_machine() -> None:
    rule = Adaptation(64)
    rule.limit = 16
    assert rule.window(0.8, idle=0.03) == 16  # a little idle, not enough: held
    assert [rule.window(0.8) for _ in range(4)] == [16] * 4
    assert rule.window(0.8, idle=0.1) == 20  # idle cores: a quarter more, once per reading
    assert [rule.window(0.8) for _ in range(4)] == [20] * 4
    rule = Adaptation(64)
    rule.limit = 16
    assert rule.window(0.9, idle=0.1) == 16  # the worker itself is nearly fully busy: held
    rule = Adaptation(64)
    assert rule.window(0.1, idle=0.0) == 2  # calls mostly waiting (storage) double whatever the machine does
    assert [rule.window(0.1) for _ in range(5)] == [4, 8, 16, 32, 64]


def test_growth_past_the_doubling_follows_the_idle_cores_in_proportion() -> None:
    # A mixed dataset's start: the doubling stage ended at a few calls (the first samples compute their threads'
    # set-up) with half the machine idle. The reading takes the limit to its part of the idle cores at once (at most
    # double), not a quarter per 0.1 s: traced on the images bench, a quarter per reading took 0.7 s from 7 calls to 22
    # with the machine 40-50% idle meanwhile.
    rule = Adaptation(64)
    rule.limit = 6
    assert rule.window(0.45, idle=0.5) == 12
    assert [rule.window(0.7) for _ in range(4)] == [12] * 4  # between two readings: held
    rule = Adaptation(64)
    rule.limit = 12
    assert rule.window(0.6, idle=0.2) == 16  # 12 x (1 + 0.2 / 0.6)
    rule = Adaptation(64)
    rule.limit = 20
    assert rule.window(0.8, idle=0.05) == 25  # near the target: the quarter step is the larger


def test_a_busy_worker_beside_idle_readings_comes_down_an_eighth_per_reading_not_a_quarter_per_window() -> None:
    # Once the machine's idle time is known, a worker whose share is fully busy (the GIL-free decode of its calls
    # running beside each other) comes down as a saturated machine does, once per reading: a quarter per 20 ms window
    # took a mixed dataset's worker from 28 calls to 10 in 60 ms, and the cores sat idle while it climbed back.
    rule = Adaptation(64)
    rule.limit = 28
    rule.window(0.9, idle=0.04)
    assert [rule.window(1.0) for _ in range(6)] == [28] * 6
    assert rule.window(1.0, idle=0.04) == 25
    assert [rule.window(1.0) for _ in range(3)] == [25] * 3
    # Before the first reading (a CPU-bound dataset's first windows), a quarter per window, as before.
    rule = Adaptation(64)
    rule.limit = 8
    assert [rule.window(1.0) for _ in range(3)] == [6, 5, 4]


def test_an_unreadable_or_foreign_proc_stat_leaves_the_machines_idle_time_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An emulated /proc (a sandboxed kernel, a container runtime) may not follow the kernel's format. The worker's
    # limit then follows its own CPU use. Before, a field that was not a number raised ValueError from the first
    # reading, taken as the limit is built: every worker failed to start.
    foreign = "cpu  12 0 9 oops 3 0 0 0 0 0\n"
    stat = tmp_path / "stat"
    monkeypatch.setattr(limit, "_PROC_STAT", str(stat))
    for content in (foreign, "cpu 1 2\n", "intr 5 6 7 8 9 10\n", ""):
        stat.write_text(content)
        machine = MachineIdle()
        assert machine.fraction is None and machine.update(float("inf")) is None
    monkeypatch.setattr(limit, "_PROC_STAT", str(tmp_path / "missing"))
    assert MachineIdle().update(float("inf")) is None

    async def main() -> int:
        # An adaptive limit (a worker's) over such a /proc: every call still gets its slot.
        slots = FetchSlots(8, Recorder(), "fetch", cpu_share=1.0)
        done = 0

        async def call() -> None:
            nonlocal done
            async with slots:
                await asyncio.sleep(0)  # a loop step inside the slot, so the other calls queue behind it
                done += 1

        await asyncio.gather(*(call() for _ in range(32)))
        return done

    stat.write_text(foreign)
    monkeypatch.setattr(limit, "_PROC_STAT", str(stat))
    assert asyncio.run(main()) == 32
