"""ObjectStreamDataset: split across ranks x workers by itself, fixed order with reads in flight, resumable.

Against the real servers the session starts (moto's S3 and aloader's object server), through both drivers.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from unittest import mock

import pytest
import torch.utils.data
from hypothesis import given, settings
from hypothesis import strategies as st

import aloader
from aloader.bench.objectserver import Faults, ObjectServer
from aloader.datasets import ObjectDataset, ObjectStreamDataset
from aloader.errors import ObjectNotFoundError
from aloader.storage import RetryPolicy
from tests.conftest import Driver
from tests.test_resume import check_resume

FAST = RetryPolicy(max_attempts=8, base_delay=0.001, max_delay=0.01)
COUNT = 29
OBJECTS = {f"stream/{i:03d}.bin": f"object {i}".encode() for i in range(COUNT)}


def text(data: bytes) -> str:
    return data.decode()


@pytest.fixture
def http(object_server: ObjectServer) -> Any:
    object_server.objects = dict(OBJECTS)
    object_server.faults = Faults()
    object_server.reset_counters()
    yield object_server
    object_server.objects = {}
    object_server.faults = Faults()


def urls_of(server: ObjectServer) -> list[str]:
    return [server.url(key) for key in OBJECTS]


def test_a_prefix_in_order_with_reads_in_flight(driver: Driver, s3: Any) -> None:
    s3.put("streams", {**OBJECTS, "stream/skip.txt": b"not this"})
    dataset = ObjectStreamDataset(
        "s3://streams/stream/", suffixes=".bin", decode=text, storage_options=s3.options(), retry=FAST, concurrency=8
    )
    assert dataset.urls == [f"s3://streams/{key}" for key in OBJECTS]  # listed once, sorted, filtered
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=4))
    assert [s for batch in batches for s in batch] == [f"object {i}" for i in range(COUNT)]


def test_order_is_fixed_whatever_finishes_first(driver: Driver, http: ObjectServer) -> None:
    # One key in three fails its first two requests (503, dropped connections, cut bodies): those reads finish late,
    # and the order is the same.
    http.faults = Faults(every=3, times=2)
    dataset = ObjectStreamDataset(urls_of(http), decode=text, retry=FAST, concurrency=6)
    samples = [s for batch in driver.collect(aloader.DataLoader(dataset, batch_size=5)) for s in batch]
    assert samples == [f"object {i}" for i in range(COUNT)] and http.faults_injected > 0


def test_shuffle_is_seeded_by_seed_and_epoch(driver: Driver, http: ObjectServer) -> None:
    dataset = ObjectStreamDataset(urls_of(http), decode=text, shuffle=True, seed=3)
    loader = aloader.DataLoader(dataset, batch_size=None)
    epochs = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        epochs.append(driver.collect(loader))
    assert epochs[0] == epochs[2] != epochs[1]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(f"object {i}" for i in range(COUNT))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_objects_with_equal_counts(
    driver: Driver, http: ObjectServer, monkeypatch: pytest.MonkeyPatch, world: int
) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    per_rank = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        dataset = ObjectStreamDataset(urls_of(http), decode=text, shuffle=True, seed=1)
        per_rank.append([s for b in driver.collect(aloader.DataLoader(dataset, batch_size=3)) for s in b])
    assert {len(samples) for samples in per_rank} == {COUNT // world}  # the same count on every rank
    seen = [s for samples in per_rank for s in samples]
    assert len(seen) == len(set(seen)) and COUNT - len(seen) < world  # disjoint; only the remainder left out
    # split_by_rank=False: this rank reads everything.
    whole = ObjectStreamDataset(urls_of(http), decode=text, split_by_rank=False)
    assert len(driver.collect(aloader.DataLoader(whole, batch_size=None))) == COUNT


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=0, max_value=60),
    world=st.integers(min_value=1, max_value=5),
    workers=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=2**16),
    epoch=st.integers(min_value=0, max_value=10),
    shuffle=st.booleans(),
)
def test_split_is_disjoint_complete_balanced_and_stable_under_resume(
    count: int, world: int, workers: int, seed: int, epoch: int, shuffle: bool
) -> None:
    objects = ObjectDataset([f"s3://b/{i}" for i in range(count)])
    taken: list[list[int]] = []
    for rank in range(world):
        for worker in range(workers):
            info = type("Info", (), {"id": worker, "num_workers": workers})()
            with (
                mock.patch.dict(os.environ, {"RANK": str(rank), "WORLD_SIZE": str(world)}),
                mock.patch.object(torch.utils.data, "get_worker_info", return_value=info),
            ):
                dataset = ObjectStreamDataset(objects, shuffle=shuffle, seed=seed)
                dataset.set_epoch(epoch)
                taken.append(dataset.indices_for_this_reader())
                # Stable under resume: a reader loading this one's state has the same list.
                again = ObjectStreamDataset(objects, shuffle=shuffle, seed=seed + 1)
                again.load_state_dict(dataset.state_dict())
                assert again.indices_for_this_reader() == taken[-1]
    flat = [i for reader in taken for i in reader]
    assert len(flat) == len(set(flat))  # disjoint
    assert {len(reader) for reader in taken} == {count // (world * workers)}  # balanced: the same count for all
    assert count - len(flat) < world * workers  # complete but for the remainder


def test_the_resume_harness(driver: Driver, http: ObjectServer) -> None:
    def make(**kw: Any) -> aloader.DataLoader:
        dataset = ObjectStreamDataset(urls_of(http), decode=text, shuffle=True, seed=5, concurrency=4)
        return aloader.DataLoader(dataset, batch_size=4, **kw)

    def before_epoch(loader: aloader.DataLoader, epoch: int) -> None:
        loader.dataset.set_epoch(epoch)

    reference = check_resume(driver, make, before_epoch=before_epoch, stride=2)
    first, second = ([s for batch in epoch for s in batch] for epoch in reference)
    assert len(first) == COUNT and sorted(first) == sorted(second) and first != second


def test_a_resume_reads_nothing_before_its_position(driver: Driver, http: ObjectServer) -> None:
    loader = aloader.DataLoader(ObjectStreamDataset(urls_of(http), decode=text, concurrency=1), batch_size=5)
    iterator_batches = driver.collect(loader, limit=2)
    state = loader.state_dict()
    assert state["dataset"]["position"] == 10 and state["batches"] == 2
    http.reset_counters()
    resumed = aloader.DataLoader(ObjectStreamDataset(urls_of(http), decode=text, concurrency=1), batch_size=5)
    resumed.load_state_dict(state)
    rest = driver.collect(resumed)
    assert [s for b in iterator_batches + rest for s in b] == [f"object {i}" for i in range(COUNT)]
    keys = list(OBJECTS)
    # The first ten were not read again, and each of the rest once. (The request count would not do: a read of the
    # first loader, abandoned mid-flight, may reach the server after the reset.)
    assert [http.requests_for(key) for key in keys[:10]] == [0] * 10
    assert all(http.requests_for(key) >= 1 for key in keys[10:])


def test_a_missing_object_raises_at_its_position(driver: Driver, http: ObjectServer) -> None:
    urls = [*urls_of(http)[:6], http.url("stream/missing.bin"), *urls_of(http)[6:12]]
    outcomes = driver.outcomes(aloader.DataLoader(ObjectStreamDataset(urls, retry=FAST), batch_size=None))
    assert [kind for kind, _ in outcomes[:7]] == ["ok"] * 6 + ["err"]
    error = outcomes[6][1]
    assert isinstance(error, ObjectNotFoundError)
    assert "reading object 6" in str(error) and "stream/missing.bin" in str(error)


def test_break_stops_the_reads_in_flight(driver: Driver, http: ObjectServer) -> None:
    dataset = ObjectStreamDataset(urls_of(http), concurrency=8)
    assert len(driver.collect(aloader.DataLoader(dataset, batch_size=None), limit=3)) == 3


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_concurrency_must_be_a_positive_integer(value: Any) -> None:
    with pytest.raises(ValueError, match=rf"concurrency should be a positive integer, but got concurrency={value!r}"):
        ObjectStreamDataset(["a", "b"], concurrency=value)


def read_as_rank(
    driver: Driver, monkeypatch: pytest.MonkeyPatch, http: ObjectServer, rank: int, world: int, **kw: Any
) -> tuple[list[str], dict[str, Any]]:
    """(the samples rank ``rank`` of ``world`` yields through the loader, the loader's state after them). ``kw``:
    ``limit`` (stop after that many batches) and ``state`` (a loader state to resume)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    loader = aloader.DataLoader(ObjectStreamDataset(urls_of(http), decode=text, shuffle=True, seed=3), batch_size=2)
    if kw.get("state") is not None:
        loader.load_state_dict(kw["state"])
    batches = driver.collect(loader, limit=kw.get("limit"))
    return [s for batch in batches for s in batch], loader.state_dict()


@pytest.mark.parametrize(("world", "new_world"), [(2, 3), (3, 2), (2, 1), (1, 2)])
def test_a_resume_with_another_world_size_splits_the_rest(
    driver: Driver, http: ObjectServer, monkeypatch: pytest.MonkeyPatch, world: int, new_world: int
) -> None:
    # Every rank takes its state after the same step (as a DDP checkpoint does); rank 0's resumes every new rank.
    before = [read_as_rank(driver, monkeypatch, http, rank, world, limit=3) for rank in range(world)]
    state = before[0][1]
    after = [read_as_rank(driver, monkeypatch, http, rank, new_world, state=state)[0] for rank in range(new_world)]
    assert len({len(samples) for samples in after}) == 1  # every new rank the same count, hence batches
    seen = [s for samples, _ in before for s in samples] + [s for samples in after for s in samples]
    assert len(seen) == len(set(seen))  # none read twice
    per_reader = COUNT // world
    # Complete but for the remainders left out by the first split (< world) and by the re-split (< new_world).
    assert COUNT - len(seen) <= (COUNT - per_reader * world) + new_world - 1
    # The resumed split resumes again: a state part way through it, loaded by a new rank 0, yields exactly the rest.
    _, middle = read_as_rank(driver, monkeypatch, http, 0, new_world, state=state, limit=1)
    rest, _ = read_as_rank(driver, monkeypatch, http, 0, new_world, state=middle)
    assert rest == after[0][2:]
    # The next epoch is the plain split of the new world size.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(new_world))
    fresh = ObjectStreamDataset(urls_of(http), shuffle=True, seed=3)
    fresh.set_epoch(1)
    resumed = ObjectStreamDataset(urls_of(http), shuffle=True, seed=3)
    resumed.load_state_dict({**state["dataset"], "epoch": 1, "position": 0, "history": []})
    assert resumed.indices_for_this_reader() == fresh.indices_for_this_reader()


def test_a_state_is_checked(http: ObjectServer) -> None:
    dataset = ObjectStreamDataset(urls_of(http))
    with pytest.raises(ValueError, match="the state's 'position' should be an integer"):
        dataset.load_state_dict({"epoch": 0, "seed": 0, "position": "3", "reader": 0, "readers": 1})
    with pytest.raises(ValueError, match="the state's 'history' should be a list of"):
        dataset.load_state_dict({"epoch": 0, "seed": 0, "position": 3, "reader": 0, "readers": 1, "history": [[1]]})
    # A state of two readers, 3 objects each read, loaded by the only reader: it reads the rest of both streams.
    dataset.load_state_dict({"epoch": 0, "seed": 0, "position": 3, "reader": 1, "readers": 2})
    rest = list(range(6, COUNT - 1, 2)) + list(range(7, COUNT - 1, 2))
    assert dataset.indices_for_this_reader() == rest


def test_exported_from_aloader() -> None:
    assert aloader.ObjectStreamDataset is ObjectStreamDataset and "ObjectStreamDataset" in aloader.__all__


def test_from_prefix_inside_a_running_loop(s3: Any) -> None:
    s3.put("streams", OBJECTS)

    async def make() -> ObjectStreamDataset:
        return await ObjectStreamDataset.from_prefix(
            "s3://streams/stream/", suffixes=".bin", storage_options=s3.options(), retry=FAST, shuffle=True, seed=2
        )

    dataset = asyncio.run(make())
    assert len(dataset.urls) == COUNT and dataset.shuffle and dataset.seed == 2
