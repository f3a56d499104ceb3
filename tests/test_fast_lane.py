"""The fast lane: batches of a fast sync dataset made k at a time in one thread call (``Pipeline._lane_units``).

Each test sets the loader's remembered speed (``loader._speed``) as an earlier epoch would have left it, so the lane
is in use from the first batch with k at its widest (16 units a call) and the outcome does not depend on timing.
What must hold is what holds without the lane: torch's batches, order and errors, failures per batch, and
concurrency back as soon as samples turn slow.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

import aloader
from aloader import _bridge, _cycles
from aloader._core import fetch, lane, prelude
from aloader._stats import Recorder
from tests.conftest import Driver, torch_outcomes
from tests.datasets import AsyncSquares, FailingSet, Rows, TurnsSlow


def _in_lane(loader: aloader.DataLoader) -> aloader.DataLoader:
    loader._speed.per_unit = 1e-6  # as learnt in an earlier epoch: the lane from the first batch, k = 16
    return loader


class _LaneCalls:
    """Counts the lane's calls, the units each made and the thread that made them (wrapping the lane's call); the
    source is not handed over meanwhile (to the sync driver's consumer, or the lane's thread for ``async for``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.units: list[int] = []
        self.threads: list[threading.Thread] = []
        original = lane.Lane._run_thread

        def counted(self_: lane.Lane, units: list[Any], interruptible: bool) -> list[Any]:
            outcomes = original(self_, units, interruptible)
            self.units.append(len(outcomes))
            self.threads.append(threading.current_thread())
            return outcomes

        monkeypatch.setattr(lane.Lane, "_run_thread", counted)

        # The lane's calls are what these tests count: the source is not handed over (drawing the units with it is
        # tested below), so the calls are made, on the lane's thread or in the consumer.
        async def not_handed(self_: lane.Lane, seq: int, unit: Any, draw: Any, slow: bool = False) -> None:
            return None

        monkeypatch.setattr(lane.Lane, "hand_source", not_handed)
        # Nor does the consumer hold it before the loop starts (prelude.py).
        monkeypatch.setattr(prelude.Prelude, "applies", staticmethod(lambda ctx, lane: False))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 8, "shuffle": True},
        {"batch_size": 7, "shuffle": True, "drop_last": True},
        {"batch_size": None},
        {"batch_size": 5, "in_order": False},
    ],
    ids=["shuffle", "drop_last", "no-batching", "in_order-false"],
)
def test_lane_gives_torchs_batches(driver: Driver, kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _LaneCalls(monkeypatch)
    dataset = Rows(torch.arange(1000).reshape(500, 2), torch.arange(500))
    in_order = kwargs.pop("in_order", True)
    reference = torch.utils.data.DataLoader(dataset, generator=torch.Generator().manual_seed(3), **kwargs)
    ours = _in_lane(
        aloader.DataLoader(dataset, generator=torch.Generator().manual_seed(3), in_order=in_order, **kwargs)
    )
    expected = [[t.tolist() for t in batch] for batch in reference]
    got = [[t.tolist() for t in batch] for batch in driver.collect(ours)]
    if in_order:
        assert got == expected
    else:
        assert sorted(got) == sorted(expected)
    assert max(calls.units) > 1, "the lane made several units per call"


def test_a_failure_inside_a_lane_call_fails_only_its_batch(driver: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches 2 and 9 of one call fail: the consumer gets torch's sequence, the other batches of the call intact."""
    calls = _LaneCalls(monkeypatch)
    dataset = FailingSet(200, {9, 37}, KeyError)
    expected = torch_outcomes(torch.utils.data.DataLoader(dataset, batch_size=4), KeyError)
    outcomes = driver.outcomes(_in_lane(aloader.DataLoader(dataset, batch_size=4)))
    got = [("ok", value.tolist()) if kind == "ok" else ("err", type(value)) for kind, value in outcomes]
    assert got == expected
    errors = [value for kind, value in outcomes if kind == "err"]
    assert "sample index 9" in str(errors[0])
    assert isinstance(errors[0].__cause__, KeyError)
    assert max(calls.units) > 1


def test_lane_skips_under_a_failure_budget(driver: Driver) -> None:
    dataset = FailingSet(100, {3, 50})
    batches = driver.collect(_in_lane(aloader.DataLoader(dataset, batch_size=10, max_failures=2)))
    assert [int(x) for batch in batches for x in batch] == [i for i in range(100) if i not in (3, 50)]


class _WithGetitems(Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i * 10

    def __getitems__(self, indices: list[int]) -> list[int]:
        self.calls += 1
        return [i * 10 for i in indices]


def test_lane_uses_getitems_once_per_batch(driver: Driver) -> None:
    dataset = _WithGetitems(96)
    reference = [b.tolist() for b in torch.utils.data.DataLoader(dataset, batch_size=8)]
    dataset.calls = 0
    got = [b.tolist() for b in driver.collect(_in_lane(aloader.DataLoader(dataset, batch_size=8)))]
    assert got == reference
    assert dataset.calls == 12


def test_lane_awaits_samples_a_sync_getitem_returns(driver: Driver) -> None:
    """``ConcatDataset`` over async datasets: its sync ``__getitem__`` returns coroutines, finished on the loop."""
    dataset = ConcatDataset([AsyncSquares(30), AsyncSquares(30)])  # type: ignore[list-item]
    got = [row for b in driver.collect(_in_lane(aloader.DataLoader(dataset, batch_size=4))) for row in b.tolist()]
    assert got == [[i, i * i] for i in range(30)] * 2


@pytest.mark.parametrize("fast", [64, 68, 116])
def test_slow_samples_take_the_lane_out_of_use(driver: Driver, fast: int) -> None:
    """Samples that turn slow end the lane: the first slow batch ends its lane call, and the samples after it are
    fetched concurrently again (the rendezvous needs 8 of them in flight at once, which a lane call, one sample
    after the other, could never reach); so does a call queued behind it, wherever the first slow batch falls in
    its call (the consumer may make the epoch's first batch alone, which moves the calls' bounds by one)."""
    dataset = TurnsSlow(fast=fast, slow=36, parties=8, batch_size=4)
    loader = _in_lane(aloader.DataLoader(dataset, batch_size=4, concurrency=16))
    got = [int(x) for b in driver.collect(loader) for x in b]
    assert got == list(range(fast + 36))
    assert dataset.rendezvous.max_inside >= 8
    assert loader._speed.per_unit is not None
    assert loader._speed.per_unit >= fetch.CHUNK_SECONDS


@pytest.mark.parametrize("fast", [63 * 4, 62 * 4])
def test_units_turning_slow_after_a_long_fast_run_get_their_concurrency(driver: Driver, fast: int) -> None:
    """Units that turn slow after many fast ones: the rest are fetched concurrently (the rendezvous needs 8 in
    flight), in both places the source can be when they turn.

    ``async for``: the lane's thread holds the source and makes runs of up to 64 units; when a run's last unit
    (``fast=63*4``: the 64th) turns slow, the run and the source given back reach the loop together. It once hung
    there: the source went back only with a run that ended on the give-back itself. ``for``: the consumer, which
    the loop handed the source to after measuring it the faster maker of fast units, gives it back at the slow
    unit; those figures were measured on other units, and once sent the next slow unit back to it for a trial,
    made alone (the rendezvous then timed out)."""
    dataset = TurnsSlow(fast=fast, slow=36, parties=8, batch_size=4)
    loader = _in_lane(aloader.DataLoader(dataset, batch_size=4, concurrency=16))
    got = [int(x) for b in driver.collect(loader) for x in b]
    assert got == list(range(fast + 36))
    assert dataset.rendezvous.max_inside >= 8


def test_lane_break_and_close_leave_no_thread(driver: Driver) -> None:
    """``break`` in the middle of lane calls: the lane's thread is gone when the iterator is (autouse leak check)."""
    dataset = Rows(torch.arange(4000))
    loader = _in_lane(aloader.DataLoader(dataset, batch_size=2))
    assert len(driver.collect(loader, limit=5)) == 5
    before = {t for t in threading.enumerate() if t.name.startswith("aloader-lane")}
    assert len(driver.collect(loader)) == 2000
    assert {t for t in threading.enumerate() if t.name.startswith("aloader-lane")} <= before


def test_lane_stats_count_every_batch(driver: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches handed over several at once are each counted; the queue reports the lane's widened capacity (the
    loop's lane: the consumer does not make the first batches before the loop, see test_prelude.py)."""
    monkeypatch.setattr(prelude.Prelude, "applies", staticmethod(lambda ctx, lane: False))
    dataset = FailingSet(400, {17})
    loader = _in_lane(aloader.DataLoader(dataset, batch_size=4))
    outcomes = driver.outcomes(loader)
    stats = loader.stats()
    assert len(outcomes) == stats.batches == 100
    assert stats.failed_batches == 1
    # async for: the lane's thread holds the source and hands runs of up to _HELD_UNITS to the loop
    assert stats.queue.capacity == (lane._HELD_UNITS if driver.is_async else lane.LANE_UNITS)
    assert (stats.fetch.items, stats.fetch.failures) == (396, 1)  # the failed batch counts as a failure
    assert stats.queue.items == 100


def test_for_makes_fast_batches_in_the_consumers_thread(driver: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``for``, a consumer waiting for fast batches makes the lane's calls itself (as torch's
    ``num_workers=0`` does) and yields their batches in order; ``async for`` never makes them on the caller's loop."""
    made_in: list[threading.Thread] = []
    make = lane.Lane._make

    def counted(self_: lane.Lane, *args: Any) -> Any:
        made_in.append(threading.current_thread())
        return make(self_, *args)

    monkeypatch.setattr(lane.Lane, "_make", counted)
    dataset = Rows(torch.arange(8000).reshape(4000, 2))
    reference = [
        b[0].tolist()
        for b in torch.utils.data.DataLoader(
            dataset, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(5)
        )
    ]
    consumer = threading.current_thread()
    loader = aloader.DataLoader(dataset, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(5))
    got = [b[0].tolist() for b in driver.collect(_in_lane(loader))]
    assert got == reference
    in_consumer = sum(thread is consumer for thread in made_in)  # in its lane calls, or drawing units itself
    if driver.is_async:
        assert in_consumer == 0  # the caller's loop runs in this thread: it must stay free
    else:
        assert in_consumer > 0
    assert loader.stats().batches == 2000


def test_a_consumer_busy_between_batches_leaves_the_calls_to_the_lane_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumer that spends a while on each batch (a training step that leaves the GIL free, as one waiting for
    a GPU does, here a 2 ms wait) gets its batches made by the lane's thread meanwhile: the lane's calls are made
    there, never in the consumer (which may only try drawing and making batches itself, see ``Cycles``)."""
    calls = _LaneCalls(monkeypatch)
    dataset = Rows(torch.arange(600))
    loader = _in_lane(aloader.DataLoader(dataset, batch_size=2))
    got = []
    for batch in loader:
        time.sleep(0.002)  # the consumer's own step, the GIL free (a workload, not synchronisation)
        got.append(int(batch[0][0]))
    assert got == list(range(0, 600, 2))
    assert calls.threads[-1] is not threading.current_thread()
    assert any(thread.name.startswith("aloader-lane") for thread in calls.threads)


class _Interrupts(Dataset[int]):
    """Raises KeyboardInterrupt at one index (as Ctrl-C arriving inside ``__getitem__`` of the main thread)."""

    def __init__(self, n: int, at: int) -> None:
        self.n, self.at = n, at
        self.raised_in: threading.Thread | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.at:
            self.raised_in = threading.current_thread()
            raise KeyboardInterrupt
        return i


def test_ctrl_c_inside_a_batch_the_consumer_makes_stops_the_iteration() -> None:
    """Ctrl-C while the consumer (the main thread) runs ``__getitem__`` in a lane call: it propagates from
    ``next()`` as in torch's loop, and the iterator stops all its work (the autouse leak check). (Raised on the
    lane's thread instead, it is that batch's error, raised at its position.)"""
    dataset = _Interrupts(4000, 3000)
    iterator = iter(_in_lane(aloader.DataLoader(dataset, batch_size=2)))
    got = []
    with pytest.raises(KeyboardInterrupt):
        for batch in iterator:
            got.append(int(batch[0]))
    # In order up to the interrupt; batches made in the same call before it are dropped with the iteration, as
    # prefetched ones are (a resume counts only the yielded ones).
    assert got == list(range(0, 2 * len(got), 2))
    assert len(got) <= 1500
    if dataset.raised_in is threading.current_thread():
        assert next(iterator, None) is None  # closed: nothing more comes
    iterator.close()


# ------------------------------------------------------------------------------ the source in the consumer's hands
@pytest.fixture
def straight_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sync driver's consumer counts as one that comes straight back for its batches (its time between two
    ``next()`` calls is below any unit's), so the source is handed to it whenever the lane is in use: what the
    tests below check must hold whoever makes the batches, and this makes the consumer do it from the start."""
    monkeypatch.setattr(_bridge.ThreadChannel, "_outside", lambda self: 0.0)


class _Threads:
    """A batch sampler that records the thread each batch is drawn in (the scheduler's loop, or the consumer)."""

    def __init__(self, n: int, batch_size: int, fail_at: int | None = None) -> None:
        self.n, self.batch_size, self.fail_at = n, batch_size, fail_at
        self.drawn_in: list[threading.Thread] = []

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Any:
        for k in range(len(self)):
            if k == self.fail_at:
                raise ValueError(f"the sampler failed at batch {k}")
            self.drawn_in.append(threading.current_thread())
            yield list(range(k * self.batch_size, (k + 1) * self.batch_size))


def test_the_holder_of_the_source_draws_the_units_and_makes_the_batches(driver: Driver, straight_back: None) -> None:
    """With ``for``, a consumer that comes straight back for fast batches is handed the source: it draws each unit
    and makes its batch in its own thread, as torch's ``num_workers=0`` does. With ``async for`` the lane's thread
    holds it (the caller's loop must stay free): it draws and makes them there, and hands them over in runs. Either
    way the loop does nothing per batch, and the batches and the stats are torch's."""
    dataset = Rows(torch.arange(4000).reshape(2000, 2))
    sampler = _Threads(2000, 4)
    reference = [b[0].tolist() for b in torch.utils.data.DataLoader(dataset, batch_sampler=_Threads(2000, 4))]
    loader = _in_lane(aloader.DataLoader(dataset, batch_sampler=sampler))
    got = [b[0].tolist() for b in driver.collect(loader)]
    assert got == reference
    assert loader.stats().batches == 500
    if driver.is_async:
        in_lane = sum(thread.name.startswith("aloader-lane") for thread in sampler.drawn_in)
        assert in_lane >= 250, "most units were drawn by the lane's thread"
    else:
        in_consumer = sum(thread is threading.current_thread() for thread in sampler.drawn_in)
        assert in_consumer >= 250, "most units were drawn by the consumer"


class _FetchedIn(TensorDataset):
    """Records the thread each sample is fetched in."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.threads: list[threading.Thread] = []

    def __getitem__(self, index: Any) -> Any:
        self.threads.append(threading.current_thread())
        return super().__getitem__(index)


def test_a_loader_that_knows_its_units_are_fast_makes_its_first_batch_alone(driver: Driver) -> None:
    """An epoch after the first (the lane from the start): with ``for``, the consumer waiting for its first batch
    is handed the source at once and makes that one batch, instead of a lane call's worth (16 batches) before it;
    the loop makes the next ones if it does not come back. ``async for`` never makes one in the caller's thread.
    Every batch is torch's, in torch's order."""
    dataset = _FetchedIn(torch.arange(4000).reshape(2000, 2))
    reference = [b[0].tolist() for b in torch.utils.data.DataLoader(dataset, batch_size=4)]
    dataset.threads.clear()
    loader = _in_lane(aloader.DataLoader(dataset, batch_size=4))
    assert [b[0].tolist() for b in driver.collect(loader, limit=1)] == reference[:1]
    in_consumer = sum(thread is threading.current_thread() for thread in dataset.threads)
    assert in_consumer == (0 if driver.is_async else 4)  # the first batch's 4 samples, and no more
    assert [b[0].tolist() for b in driver.collect(loader)] == reference


def test_an_iterator_taken_long_before_its_first_batch_gives_torchs_batches(driver: Driver) -> None:
    """``iter()`` now, the first ``next()`` after another loader's whole epoch: the source offered to the consumer
    that has not come yet waits for it, and nothing hangs or is lost."""
    dataset = Rows(torch.arange(800).reshape(400, 2))
    reference = [b[0].tolist() for b in torch.utils.data.DataLoader(dataset, batch_size=4)]
    if driver.is_async:

        async def both() -> tuple[list[Any], list[Any]]:
            first = _in_lane(aloader.DataLoader(dataset, batch_size=4)).__aiter__()
            other = [b[0].tolist() async for b in _in_lane(aloader.DataLoader(dataset, batch_size=4))]
            return [b[0].tolist() async for b in first], other

        got, other = driver.run_async(both)
    else:
        first = iter(_in_lane(aloader.DataLoader(dataset, batch_size=4)))
        other = [b[0].tolist() for b in _in_lane(aloader.DataLoader(dataset, batch_size=4))]
        got = [b[0].tolist() for b in first]
    assert got == reference and other == reference


def test_a_sampler_failing_in_the_consumers_hands_ends_the_epoch_there(driver: Driver, straight_back: None) -> None:
    """The sampler's error, raised while the consumer draws, comes at its position, then the epoch ends, as with
    torch's DataLoader."""
    dataset = FailingSet(400, set())
    reference = torch_outcomes(torch.utils.data.DataLoader(dataset, batch_sampler=_Threads(400, 4, 60)), ValueError)
    outcomes = driver.outcomes(_in_lane(aloader.DataLoader(dataset, batch_sampler=_Threads(400, 4, 60))))
    got = [(kind, value.tolist() if kind == "ok" else type(value)) for kind, value in outcomes]
    assert got == reference
    assert got[-1] == ("err", ValueError)
    assert "in the sampler" in str(outcomes[-1][1])


def test_samples_turning_slow_in_the_consumers_hands_get_their_concurrency(driver: Driver, straight_back: None) -> None:
    """The consumer makes the fast batches itself; the first slow one gives the source back to the loop, which
    fetches the samples after it concurrently again (the rendezvous needs 8 in flight at once)."""
    dataset = TurnsSlow(fast=64, slow=36, parties=8, batch_size=4)
    loader = _in_lane(aloader.DataLoader(dataset, batch_size=4, concurrency=16))
    got = [int(x) for b in driver.collect(loader) for x in b]
    assert got == list(range(100))
    assert dataset.rendezvous.max_inside >= 8


def test_awaitables_from_a_sync_getitem_in_the_consumers_hands(driver: Driver, straight_back: None) -> None:
    """A sync ``__getitem__`` that returns coroutines: the consumer gives the unit to the loop, which awaits them,
    and the batches stay in order."""
    dataset = ConcatDataset([AsyncSquares(30), AsyncSquares(30)])  # type: ignore[list-item]
    got = [row for b in driver.collect(_in_lane(aloader.DataLoader(dataset, batch_size=4))) for row in b.tolist()]
    assert got == [[i, i * i] for i in range(30)] * 2


def test_failures_in_the_consumers_hands_fail_only_their_batch(driver: Driver, straight_back: None) -> None:
    """A sample that raises while the consumer makes its batch: torch's sequence of batches and errors."""
    dataset = FailingSet(200, {9, 37})
    reference = torch_outcomes(torch.utils.data.DataLoader(FailingSet(200, {9, 37}), batch_size=4), ValueError)
    outcomes = driver.outcomes(_in_lane(aloader.DataLoader(dataset, batch_size=4)))
    got = [(kind, value.tolist() if kind == "ok" else type(value)) for kind, value in outcomes]
    assert got == reference


@pytest.mark.parametrize("step", [1, 37, 250])
def test_state_dict_while_the_consumer_draws_resumes_where_it_is(
    driver: Driver, straight_back: None, step: int
) -> None:
    """A ``state_dict()`` taken while the consumer holds the source is where the consumer is: the resumed loader
    gives the rest of the uninterrupted epoch."""
    dataset = Rows(torch.arange(1000))

    def make() -> aloader.DataLoader:
        return _in_lane(
            aloader.DataLoader(dataset, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(7))
        )

    whole = [b[0].tolist() for b in driver.collect(make())]
    first = make()
    head = [b[0].tolist() for b in driver.collect(first, limit=step)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = [b[0].tolist() for b in driver.collect(resumed)]
    assert head + tail == whole


# --------------------------------------------------- who serves a consumer busy between batches (Cycles, no timing)
class _Clock:
    """Feeds ``Cycles`` the consumer's ``get()`` entries as a fake clock: cycles of a chosen length, by a maker."""

    def __init__(self) -> None:
        self.cycles = _cycles.Cycles()
        self.now = 1.0

    def run(self, maker: int, count: int, cycle: float) -> None:
        for _ in range(count):
            self.cycles.took(self.now, maker)
            self.now += cycle


def _measured(count: int = 0) -> int:
    """Items a maker needs in a row for its figure to count (its warm-up cycles, then enough)."""
    return _cycles.Cycles.WARMUP + _cycles.Cycles.ENOUGH + 1 + count


def test_cycles_try_the_consumer_once_the_loops_cycle_is_known() -> None:
    clock = _Clock()
    assert not clock.cycles.try_direct()  # nothing is known yet: the loop serves a busy consumer
    clock.run(_cycles.LOOP, _measured(), 0.001)
    assert not clock.cycles.direct_better()
    assert clock.cycles.try_direct()  # the loop's cycle is known: the consumer tries making its batches
    clock.run(_cycles.DIRECT, _cycles.Cycles.WARMUP, 0.0006)
    assert clock.cycles.keep_direct()  # its trial runs until its figure counts


def test_cycles_keep_the_consumer_where_its_own_cycle_is_shorter() -> None:
    clock = _Clock()
    clock.run(_cycles.LOOP, _measured(), 0.001)  # the step and the lane's thread take the GIL in turns
    assert clock.cycles.try_direct()
    clock.run(_cycles.DIRECT, _measured(), 0.0008)
    assert clock.cycles.direct_better()
    assert clock.cycles.keep_direct()


def test_cycles_give_back_where_the_loops_cycle_is_shorter_and_try_again_when_stale() -> None:
    clock = _Clock()
    clock.run(_cycles.LOOP, _measured(), 0.001)  # the step leaves the GIL free: the lane's thread overlaps it
    assert clock.cycles.try_direct()
    clock.run(_cycles.DIRECT, _measured(), 0.0012)
    assert not clock.cycles.direct_better()
    assert not clock.cycles.keep_direct()  # given back
    clock.run(_cycles.LOOP, 2 * _cycles.Cycles.STALE - 1, 0.001)
    assert not clock.cycles.try_direct()  # measured recently (a trial lost waits twice as long): no new trial
    clock.run(_cycles.LOOP, 2 * _cycles.Cycles.ENOUGH, 0.001)
    assert clock.cycles.try_direct()  # stale: tried again (the step may have changed)


def test_cycles_give_a_trial_up_at_once_when_the_consumer_is_far_slower() -> None:
    """Units that wait on storage: the loop overlaps them, the consumer would make them one after another."""
    clock = _Clock()
    clock.run(_cycles.LOOP, _measured(), 0.001)
    assert clock.cycles.try_direct()
    clock.run(_cycles.DIRECT, 2, 0.03)  # the second direct item ends the first cycle of the trial: 30x the loop's
    assert not clock.cycles.keep_direct()  # given back after one unit, not after a whole trial
    assert not clock.cycles.try_direct() and not clock.cycles.direct_better()
    clock.run(_cycles.LOOP, 2 * _cycles.Cycles.STALE - 2, 0.001)
    assert not clock.cycles.try_direct()  # the next trial waits twice as long
    clock.run(_cycles.LOOP, 1, 0.001)
    assert clock.cycles.try_direct()


def test_cycles_give_a_trial_up_early_when_its_first_cycles_are_slower_on_average() -> None:
    clock = _Clock()
    clock.run(_cycles.LOOP, _measured(), 0.001)
    assert clock.cycles.try_direct()
    clock.run(_cycles.DIRECT, _cycles.Cycles.EARLY, 0.002)  # 2x the loop's, under the single-cycle bound
    assert clock.cycles.keep_direct()  # the early mean is not known yet
    clock.run(_cycles.DIRECT, 1, 0.002)
    assert not clock.cycles.keep_direct()


def test_cycles_keep_a_trial_whose_cycles_vary_around_a_shorter_mean() -> None:
    """Beside a busy thread a batch waits out its switch intervals: the consumer's cycles vary, shorter on average."""
    clock = _Clock()
    clock.run(_cycles.LOOP, _measured(), 0.012)
    assert clock.cycles.try_direct()
    for _ in range(_measured() // 3 + 1):
        for cycle in (0.005, 0.005, 0.02):  # one in three waits out three intervals: 10 ms on average
            clock.run(_cycles.DIRECT, 1, cycle)
    assert clock.cycles.direct_better() and clock.cycles.keep_direct()


def test_cycles_measure_the_loop_again_when_its_figure_is_stale() -> None:
    clock = _Clock()
    clock.run(_cycles.LOOP, _measured(), 0.001)
    assert clock.cycles.try_direct()
    clock.run(_cycles.DIRECT, _measured(), 0.0008)
    assert clock.cycles.keep_direct()
    clock.run(_cycles.DIRECT, _cycles.Cycles.STALE, 0.0008)
    assert not clock.cycles.keep_direct()  # the loop's figure is stale: given back for it to be measured again
    assert not clock.cycles.try_direct() and not clock.cycles.direct_better()  # until it is measured
    clock.run(_cycles.LOOP, _measured(), 0.001)
    assert clock.cycles.direct_better()


def test_cycles_leave_out_the_cycles_right_after_a_change_of_maker() -> None:
    """The first cycles after the loop takes over include the pipeline's refill: they are not the loop's figure."""
    clock = _Clock()
    clock.run(_cycles.DIRECT, 3, 0.0005)
    clock.run(_cycles.LOOP, _cycles.Cycles.WARMUP, 0.05)  # refilling
    clock.run(_cycles.LOOP, _cycles.Cycles.ENOUGH + 1, 0.001)
    assert clock.cycles.try_direct()
    clock.run(_cycles.DIRECT, _measured(), 0.0009)
    assert clock.cycles.direct_better()  # 0.9 ms against the loop's 1 ms, not its refill's 50 ms


def test_cycles_need_fewer_of_the_loops_cycles_than_of_the_consumers() -> None:
    """Where the consumer is the better maker, each cycle measured on the loop costs the epoch: the loop's figure
    counts sooner."""
    clock = _Clock()
    clock.run(_cycles.LOOP, _cycles.Cycles.WARMUP + _cycles.Cycles.LOOP_ENOUGH - 1, 0.01)
    assert not clock.cycles.try_direct()  # one cycle short
    clock.run(_cycles.LOOP, 1, 0.01)
    assert clock.cycles.try_direct()
    clock.run(_cycles.DIRECT, _cycles.Cycles.WARMUP + _cycles.Cycles.LOOP_ENOUGH + 1, 0.005)
    assert clock.cycles.keep_direct()  # the consumer's own figure needs more: its trial runs on
    assert not clock.cycles.direct_better()
    clock.run(_cycles.DIRECT, _cycles.Cycles.ENOUGH - _cycles.Cycles.LOOP_ENOUGH, 0.005)
    assert clock.cycles.direct_better() and clock.cycles.keep_direct()


def _won_trial(clock: _Clock) -> None:
    clock.run(_cycles.LOOP, _measured(), 0.01)
    assert clock.cycles.choose_direct()
    clock.run(_cycles.DIRECT, _measured(), 0.005)
    assert clock.cycles.keep_direct()


def _held(clock: _Clock, cycle: float) -> int:
    """Items the consumer makes at ``cycle`` before it gives the source back."""
    items = 0
    while clock.cycles.keep_direct():
        assert items <= _cycles.Cycles.STALE_MAX
        clock.run(_cycles.DIRECT, 1, cycle)
        items += 1
    return items


def test_cycles_measure_the_loop_less_often_while_the_consumer_keeps_winning() -> None:
    clock = _Clock()
    _won_trial(clock)
    stale = _cycles.Cycles.STALE
    assert _held(clock, 0.005) < stale  # the loop's figure is stale: given back for it to be measured again
    for times in (2, 4, 8):
        assert not clock.cycles.choose_direct()  # until it is measured
        clock.run(_cycles.LOOP, _measured(), 0.01)
        assert clock.cycles.choose_direct()  # won again: the loop's next measure waits twice as long
        assert (times - 1) * stale < _held(clock, 0.005) <= times * stale
    # The loop wins a measure: it is measured at the usual interval again.
    clock.run(_cycles.LOOP, _measured(), 0.004)
    assert not clock.cycles.choose_direct()
    clock.run(_cycles.LOOP, 2 * stale, 0.004)
    assert clock.cycles.choose_direct()  # the consumer's figure is stale: a trial
    assert _held(clock, 0.003) <= stale


def test_cycles_give_the_source_back_when_the_consumers_cycles_turn_far_slower() -> None:
    """Past its trial, the consumer holds the source while it is the better maker; units that begin to wait on
    storage (the loop would overlap them) send it back after ABORTS such cycles in a row, not at the next measure."""
    clock = _Clock()
    _won_trial(clock)
    clock.run(_cycles.DIRECT, 1, 0.05)  # one cycle far over the loop's (a pause): kept
    clock.run(_cycles.DIRECT, 1, 0.005)
    assert clock.cycles.keep_direct()
    clock.run(_cycles.DIRECT, _cycles.Cycles.ABORTS + 1, 0.05)  # the last item ends the ABORTS-th slow cycle
    assert not clock.cycles.keep_direct()
    assert not clock.cycles.choose_direct()  # known slower: not tried again until its figure is stale
    clock.run(_cycles.LOOP, 2 * _cycles.Cycles.STALE, 0.01)
    assert clock.cycles.choose_direct()


def test_cycles_by_maker_take_the_makers_time_per_unit_for_the_held_figure() -> None:
    """``async for``: the lane's thread holds the source and hands runs over, so the consumer's cycles come in
    bursts; the held figure is that thread's time per unit."""
    clock = _Clock()
    clock.cycles = _cycles.Cycles(by_maker=True)
    clock.run(_cycles.LOOP, _measured(), 0.01)
    assert clock.cycles.choose_direct()
    clock.run(_cycles.DIRECT, 3 * _cycles.Cycles.ENOUGH, 0.05)  # bursty cycles of runs: not the held figure
    for _ in range(_cycles.Cycles.ENOUGH - 1):
        clock.cycles.made(0.006)
        assert clock.cycles.keep_direct()  # the trial runs on
    clock.cycles.made(0.006)
    assert clock.cycles.direct_better() and clock.cycles.keep_direct()
    clock.cycles.made(0.06)
    assert clock.cycles.keep_direct()  # one unit far slower (a pause): kept
    clock.cycles.made(0.06)
    assert not clock.cycles.keep_direct()  # two in a row: given back


def test_cycles_by_maker_give_a_trial_up_at_its_first_far_slower_unit() -> None:
    clock = _Clock()
    clock.cycles = _cycles.Cycles(by_maker=True)
    clock.run(_cycles.LOOP, _measured(), 0.01)
    assert clock.cycles.choose_direct()
    clock.cycles.made(1.5)  # a unit of samples waiting on storage, made one after another
    assert not clock.cycles.keep_direct() and not clock.cycles.choose_direct()


class _ScriptedCycles:
    """Units look slow (``Lane.units`` says 1 a call); the holder gets the source at every offer and keeps it for
    ``keep`` units each time (``Cycles.keep_direct``), so holds start, end and start again all through the epoch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, keep: int) -> None:
        self.asked = 0
        self.holds = 0
        self._left = 0

        def choose(self_: _cycles.Cycles) -> bool:
            self.holds += 1
            self._left = keep
            return True

        def keep_direct(self_: _cycles.Cycles) -> bool:
            self.asked += 1
            self._left -= 1
            return self._left > 0

        monkeypatch.setattr(_cycles.Cycles, "choose_direct", choose)
        monkeypatch.setattr(_cycles.Cycles, "keep_direct", keep_direct)
        monkeypatch.setattr(lane.Lane, "units", lambda self_: 1)


@pytest.mark.parametrize("keep", [1, 3, 1000])
def test_slow_looking_units_held_on_a_trial_give_torchs_batches(
    driver: Driver, keep: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Units that look slow (another thread holding the GIL) go to the consumer (``for``) or the lane's thread
    (``async for``) on a trial that ``Cycles`` decides: whatever it decides, and however often, torch's batches in
    torch's order."""
    cycles = _ScriptedCycles(monkeypatch, keep)
    dataset = Rows(torch.arange(600).reshape(300, 2), torch.arange(300))
    reference = torch.utils.data.DataLoader(
        dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    ours = aloader.DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
    ours._speed.per_unit = 0.05  # as an earlier epoch beside a busy thread left it: units look slow
    expected = [[t.tolist() for t in batch] for batch in reference]
    assert [[t.tolist() for t in batch] for batch in driver.collect(ours)] == expected
    assert cycles.asked > 0, "the source was held on a trial"
    assert cycles.holds > 1 or keep > len(expected), "given back after keep units, and held again"


# ----------------------------------------------------------------------------------- runs yielded in their turn
class _Run:
    """A run of outcomes made outside the order stage (``MadeRun``), recording when it was yielded whole."""

    def __init__(self, first: int | None) -> None:
        self.first = first
        self.done = False

    def yielded(self) -> None:
        self.done = True


def test_runs_arriving_out_of_turn_are_yielded_in_turn() -> None:
    """A call the consumer runs late may hand its run over after the lane's thread handed the next one: the channel
    yields each in its turn (a first version looked only at the oldest run, and an epoch ended short)."""
    runs = _bridge._Runs()
    later, earlier = _Run(first=3), _Run(first=0)
    runs.add(later, ["d", "e"])
    runs.add(earlier, ["a", "b", "c"])
    got = []
    while (item := runs.next()) is not _bridge._NOTHING:
        got.append(item)
        runs.taken += 1
        runs.tell_finished()
    assert got == ["a", "b", "c", "d", "e"]
    assert earlier.done and later.done
    assert runs.next() is _bridge._NOTHING


def test_a_run_waits_for_the_items_before_it() -> None:
    """A run whose first item is not next waits until every item before it has been taken (from the loop's side)."""
    runs = _bridge._Runs()
    run = _Run(first=2)
    runs.add(run, ["c"])
    assert runs.next() is _bridge._NOTHING
    runs.taken = 2  # two items came from the loop
    assert runs.next() == "c"
    runs.tell_finished()
    assert run.done


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ahead", [False, True], ids=["held", "ahead"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_defect_in_the_thread_holding_the_source_never_hangs(
    loop: str, ahead: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``async for``: the lane's thread holding the source (``_Held`` in the pipeline, or ``prelude.Ahead`` before
    it) hits a defect of ours (here: recording its stats) after the source was given back at the sampler's end,
    within the same run. The run's batches and the source still reach the loop, once: the epoch ends (the held
    run's batches all arrive; ahead of the pipeline the defect is raised after the batches made before it). Before,
    the held source given back in that run was never sent, and the epoch hung."""
    if not ahead:
        monkeypatch.setattr(prelude.Prelude, "applies", staticmethod(lambda ctx, lane: False))
    record = Recorder.made_with_source

    def defect(self: Recorder, entries: Any, failed: list[bool]) -> None:
        if threading.current_thread().name.startswith("aloader-lane"):
            raise RuntimeError("a defect recording stats")
        record(self, entries, failed)

    monkeypatch.setattr(Recorder, "made_with_source", defect)
    dataset = Rows(torch.arange(40))
    loader = _in_lane(aloader.DataLoader(dataset, batch_size=4))  # 10 units: one run, ending at the sampler's end
    outcomes = Driver(f"async-{loop}").outcomes(loader)
    ok = [value[0].tolist() for kind, value in outcomes if kind == "ok"]
    expected = [list(range(i, i + 4)) for i in range(0, 40, 4)]
    if ahead:
        assert ok == expected[: len(ok)]
        assert outcomes[-1][0] == "err" and "a defect recording stats" in str(outcomes[-1][1])
    else:
        assert ok == expected
