"""``state_dict()`` / ``load_state_dict()``: one save/resume harness applied to every stateful piece.

``check_resume`` runs a loader for two epochs, taking ``state_dict()`` before iterating, right after ``iter()``,
after every batch (with the iterator live and batches prefetched) and after the first epoch ended. Each state goes
through JSON into a new loader (with other ``concurrency``, ``num_workers`` and ``prefetch_factor`` where the
output does not depend on them), which must yield exactly the rest of that epoch, then the next epoch, as the
uninterrupted run did.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, Dataset, IterableDataset, RandomSampler, Sampler

import aloader
from aloader.datasets import TarShardDataset
from aloader.samplers import DistributedSampler
from tests.conftest import Driver
from tests.datasets import AsyncSquares, FailingSet

N = 23

Make = Callable[..., aloader.DataLoader]
BeforeEpoch = Callable[[aloader.DataLoader, int], None]

LIGHT: list[dict[str, Any]] = [{}, {"concurrency": 1}, {"concurrency": 3}]
WORKERS: dict[str, Any] = {"concurrency": 5, "num_workers": 2, "prefetch_factor": 3}


def plain(batch: Any) -> Any:
    """A batch as nested Python values, for comparing."""
    if isinstance(batch, torch.Tensor):
        return batch.tolist()
    if isinstance(batch, dict):
        return {key: plain(value) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return [plain(value) for value in batch]
    return batch


def _no_hook(loader: aloader.DataLoader, epoch: int) -> None:
    pass


def run_epochs(
    driver: Driver,
    loader: aloader.DataLoader,
    epochs: range,
    before_epoch: BeforeEpoch = _no_hook,
    take_states: bool = False,
) -> tuple[list[list[Any]], list[tuple[dict[str, Any], torch.Tensor]]]:
    """Batches of each epoch; with ``take_states``, the first epoch's checkpoints (loader state, torch's RNG).

    A checkpoint is what a training loop saves: the loader's state and torch's global RNG state, taken together.
    States go through JSON, as they would to a file.
    """
    out: list[list[Any]] = []
    states: list[tuple[dict[str, Any], torch.Tensor]] = []

    def checkpoint() -> None:
        if take_states:
            states.append((json.loads(json.dumps(loader.state_dict())), torch.get_rng_state()))

    def sync() -> None:
        for n, epoch in enumerate(epochs):
            before_epoch(loader, epoch)
            if n == 0:
                checkpoint()  # before iter(): a state between epochs
            iterator = iter(loader)
            batches = []
            if n == 0:
                checkpoint()  # after iter(): mid-epoch, nothing received yet
            for batch in iterator:
                batches.append(plain(batch))
                if n == 0:
                    checkpoint()
            if n == 0:
                checkpoint()  # the epoch ended
            out.append(batches)

    async def asynchronous() -> None:
        for n, epoch in enumerate(epochs):
            before_epoch(loader, epoch)
            if n == 0:
                checkpoint()
            iterator = aiter(loader)
            batches = []
            if n == 0:
                checkpoint()
            async for batch in iterator:
                batches.append(plain(batch))
                if n == 0:
                    checkpoint()
            if n == 0:
                checkpoint()  # the epoch ended
            out.append(batches)

    if driver.is_async:
        driver.run_async(asynchronous)
    else:
        sync()
    return out, states


def check_resume(
    driver: Driver,
    make: Make,
    before_epoch: BeforeEpoch = _no_hook,
    seed_global: bool = True,
    light: list[dict[str, Any]] = LIGHT,
    heavy: dict[str, Any] | None = None,
    stride: int = 1,
) -> list[list[Any]]:
    """Save at every step of a two-epoch run, resume each state in a fresh loader, compare to the uninterrupted run.

    Resumed loaders cycle through the ``light`` options; the state in the middle of the epoch is resumed with the
    ``heavy`` ones (worker processes). With ``stride``, only every stride-th state (and the last) is resumed.
    """
    if seed_global:
        torch.manual_seed(1234)
    with make() as loader:
        reference, _ = run_epochs(driver, loader, range(2), before_epoch)
    if seed_global:
        torch.manual_seed(1234)
    with make() as loader:
        observed, states = run_epochs(driver, loader, range(2), before_epoch, take_states=True)
    assert observed == reference, "taking states must not change what the loader yields"
    n = len(reference[0])
    assert len(states) == n + 3  # before iter, after iter, after each batch, after the epoch ended
    for i, (state, rng) in enumerate(states):
        # states[0]: before iter() (a fresh start), [1 + k]: k batches received, [-1]: after the epoch ended
        ended = i == len(states) - 1
        if (i % stride or (stride > 1 and i == 0)) and not ended:
            continue  # with a stride, the fresh start (state 0) is left to the other tests
        received = 0 if i == 0 else min(i - 1, n)
        options = heavy if heavy is not None and i == (n + 3) // 2 else light[i % len(light)]
        with make(**options) as loader:
            torch.set_rng_state(rng)  # the training loop restores torch's RNG with its checkpoint
            loader.load_state_dict(state)
            assert loader.state_dict() == state  # loaded, not started yet: still that state
            first = 1 if ended else 0
            resumed, _ = run_epochs(driver, loader, range(first, 2), before_epoch)
        expected = reference[first:] if ended or i == 0 else [reference[0][received:], *reference[1:]]
        assert resumed == expected, f"resuming state {i} ({received} batches received, ended={ended}) with {options}"
    return reference


# --------------------------------------------------------------------------------------------------- datasets
class Numbers(Dataset[Any]):
    def __init__(self, n: int = N) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return torch.tensor(i)


class EpochSampler(Sampler[int]):
    """A user sampler with state: a seeded permutation that changes every epoch (it counts its own epochs)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]


class ChunkBatchSampler(Sampler[list[int]]):
    """A user batch sampler with state: batches of growing size, rotated by an epoch it counts itself."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return len(list(self._batches(0)))

    def _batches(self, epoch: int) -> Iterator[list[int]]:
        order = [(i + 3 * epoch) % self.n for i in range(self.n)]
        start, size = 0, 1
        while start < self.n:
            yield order[start : start + size]
            start, size = start + size, size % 4 + 1

    def __iter__(self) -> Iterator[list[int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self._batches(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]


class Stream(IterableDataset[Any]):
    """An iterable dataset with no state: the loader skips what was received by pulling and dropping items."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.pulled = 0

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, self.n, workers):
            self.pulled += 1
            yield torch.tensor(i)


class StatefulStream(IterableDataset[Any]):
    """An iterable dataset with its own state (epoch and position): it resumes itself, nothing is re-read."""

    def __init__(self, n: int = N) -> None:
        self.n, self.epoch, self.position = n, 0, 0
        self.resume_at = 0
        self.reads = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        self.position, self.resume_at = self.resume_at, 0
        while self.position < self.n:
            self.reads += 1
            self.position += 1
            yield torch.tensor(order[self.position - 1])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.resume_at = state["epoch"], state["position"]


class AsyncStream:
    """An async iterable with no state."""

    def __init__(self, n: int = N) -> None:
        self.n = n

    async def __aiter__(self) -> AsyncIterator[Any]:
        for i in range(self.n):
            yield torch.tensor(i * 10)


class AsyncSampler:
    """An async iterable of indices, seeded per epoch."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return self.n

    async def __aiter__(self) -> AsyncIterator[int]:
        self.epoch += 1
        for i in torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist():
            yield i

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]


def seeded(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------ tests
def test_shuffle_with_a_seeded_generator(driver: Driver) -> None:
    # The state does not depend on concurrency, num_workers or prefetch_factor: resumed in worker processes too.
    reference = check_resume(
        driver,
        lambda **kw: aloader.DataLoader(Numbers(), batch_size=4, shuffle=True, generator=seeded(), **kw),
        heavy=WORKERS,
    )
    torch_loader = torch.utils.data.DataLoader(Numbers(), batch_size=4, shuffle=True, generator=seeded())
    assert reference == [[plain(b) for b in torch_loader] for _ in range(2)]  # the same order as torch's
    assert reference[0] != reference[1]


def test_shuffle_with_the_global_rng(driver: Driver) -> None:
    reference = check_resume(driver, lambda **kw: aloader.DataLoader(Numbers(), batch_size=5, shuffle=True, **kw))
    assert reference[0] != reference[1]


def test_sequential_sampler_with_drop_last(driver: Driver) -> None:
    reference = check_resume(
        driver, lambda **kw: aloader.DataLoader(Numbers(), batch_size=3, drop_last=True, **kw), seed_global=False
    )
    assert reference[0] == [[3 * b, 3 * b + 1, 3 * b + 2] for b in range(N // 3)]


def test_no_batching(driver: Driver) -> None:
    check_resume(
        driver,
        lambda **kw: aloader.DataLoader(Numbers(9), batch_size=None, shuffle=True, generator=seeded(3), **kw),
    )


def test_torch_batch_sampler_over_a_random_sampler_with_its_own_generator(driver: Driver) -> None:
    def make(**kw: Any) -> aloader.DataLoader:
        sampler = RandomSampler(range(N), generator=seeded(11))
        return aloader.DataLoader(Numbers(), batch_sampler=BatchSampler(sampler, 4, drop_last=False), **kw)

    check_resume(driver, make, seed_global=False)


def test_user_sampler_with_state(driver: Driver) -> None:
    reference = check_resume(
        driver, lambda **kw: aloader.DataLoader(Numbers(), batch_size=4, sampler=EpochSampler(N, 5), **kw)
    )
    assert reference[0] != reference[1]


def test_user_batch_sampler_with_state(driver: Driver) -> None:
    reference = check_resume(
        driver, lambda **kw: aloader.DataLoader(Numbers(), batch_sampler=ChunkBatchSampler(N), **kw)
    )
    assert [len(b) for b in reference[0]][:5] == [1, 2, 3, 4, 1]


def test_async_sampler_and_async_dataset(driver: Driver) -> None:
    check_resume(
        driver,
        lambda **kw: aloader.DataLoader(AsyncSquares(N), batch_size=4, sampler=AsyncSampler(N), **kw),
    )


def test_aloader_distributed_sampler(driver: Driver) -> None:
    def make(**kw: Any) -> aloader.DataLoader:
        sampler = DistributedSampler(range(N), num_replicas=3, rank=1, seed=4)
        return aloader.DataLoader(Numbers(), batch_size=2, sampler=sampler, **kw)

    def before_epoch(loader: aloader.DataLoader, epoch: int) -> None:
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    check_resume(driver, make, before_epoch=before_epoch)


def test_torch_distributed_sampler(driver: Driver) -> None:
    def make(**kw: Any) -> aloader.DataLoader:
        sampler = torch.utils.data.DistributedSampler(range(N), num_replicas=2, rank=1, seed=4)
        return aloader.DataLoader(Numbers(), batch_size=3, sampler=sampler, **kw)

    def before_epoch(loader: aloader.DataLoader, epoch: int) -> None:
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    check_resume(driver, make, before_epoch=before_epoch)


def test_iterable_dataset_without_state_skips_by_counting(driver: Driver) -> None:
    reference = check_resume(driver, lambda **kw: aloader.DataLoader(Stream(), batch_size=4, **kw), heavy=None)
    assert reference[0] == [list(range(i, min(i + 4, N))) for i in range(0, N, 4)]
    # Resuming after 3 batches pulls and drops 12 items, and reads the rest once.
    loader = aloader.DataLoader(Stream(), batch_size=4)
    state = {**loader.state_dict(), "mid_epoch": True, "batches": 3}
    loader.load_state_dict(state)
    assert driver.collect(loader) and loader.dataset.pulled == N  # type: ignore[attr-defined]


def test_iterable_dataset_with_state_resumes_itself(driver: Driver) -> None:
    def before_epoch(loader: aloader.DataLoader, epoch: int) -> None:
        loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]

    reference = check_resume(
        driver,
        lambda **kw: aloader.DataLoader(StatefulStream(), batch_size=4, **kw),
        before_epoch=before_epoch,
    )
    assert reference[0] != reference[1]
    loader = aloader.DataLoader(StatefulStream(), batch_size=4)
    first = run_epochs(driver, loader, range(1), take_states=True)[1][4][0]  # after 3 batches
    assert first["dataset"] == {"epoch": 0, "position": 12}
    resumed = aloader.DataLoader(StatefulStream(), batch_size=4)
    resumed.load_state_dict(first)
    driver.collect(resumed)
    assert resumed.dataset.reads == N - 12  # type: ignore[attr-defined]  # nothing read twice


def test_async_iterable_dataset_without_state(driver: Driver) -> None:
    check_resume(driver, lambda **kw: aloader.DataLoader(AsyncStream(), batch_size=3, **kw), heavy=None)


def test_iterable_dataset_in_worker_processes(driver: Driver) -> None:
    # Each worker iterates its own copy: the order depends on num_workers, so a resume keeps it, and the
    # re-run epoch's first batches are dropped by the consumer.
    check_resume(
        driver,
        # persistent: one pool per loader rather than one per epoch (the test's cost is starting processes)
        lambda **kw: aloader.DataLoader(Stream(), batch_size=4, num_workers=2, persistent_workers=True, **kw),
        light=[{}, {"concurrency": 1, "prefetch_factor": 4}],
        stride=4,
    )


def test_persistent_workers_draw_no_base_seed_after_the_first_epoch(driver: Driver) -> None:
    check_resume(
        driver,
        lambda **kw: aloader.DataLoader(
            Numbers(), batch_size=4, shuffle=True, generator=seeded(2), num_workers=2, persistent_workers=True, **kw
        ),
        light=[{}, {"concurrency": 3, "prefetch_factor": 1}],
        stride=4,
    )


def test_state_is_small_and_holds_no_data(driver: Driver) -> None:
    loader = aloader.DataLoader(Numbers(10_000), batch_size=100, shuffle=True, generator=seeded())
    _, states = run_epochs(driver, loader, range(1), take_states=True)
    sizes = [len(json.dumps(state)) for state, _ in states]
    assert max(sizes) < 8_000  # the generator's Mersenne Twister state (5 KB, base64) and a few numbers


def test_load_state_dict_rejects_what_is_not_a_state() -> None:
    loader = aloader.DataLoader(Numbers())
    with pytest.raises(ValueError, match="not an aloader DataLoader state of format 1"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(TypeError, match="expects the dict returned by state_dict"):
        loader.load_state_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'batches' is missing"):
        loader.load_state_dict({**loader.state_dict(), "batches": "3"})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_batch_skipped_whole_by_the_failure_budget_counts_as_consumed(driver: Driver, num_workers: int) -> None:
    # Batches 1 (3, 4, 5) and 5 (15, 16, 17) fail whole and are skipped; batch 3 loses one sample. A state taken
    # after them must count the skipped units, or the resumed loader starts early and repeats received batches.
    torch_loader = torch.utils.data.DataLoader(range(N), batch_size=1, shuffle=True, generator=seeded(0))
    order = [int(batch) for batch in torch_loader]  # the first epoch's order
    bad = {*order[3:6], order[10], *order[15:18]}

    def make(**kw: Any) -> aloader.DataLoader:
        options: dict[str, Any] = {"num_workers": num_workers, "persistent_workers": num_workers > 0, **kw}
        dataset = FailingSet(N, bad=bad)
        return aloader.DataLoader(dataset, batch_size=3, shuffle=True, generator=seeded(0), max_failures=20, **options)

    reference = check_resume(
        driver, make, seed_global=False, light=[{}, {"concurrency": 2}], stride=1 if num_workers == 0 else 3
    )
    assert len(reference[0]) == 8 - 2  # 8 units, 2 skipped whole
    assert reference[0][1] == order[6:9] and reference[0][2] == [order[9], order[11]]
    assert sorted(i for batch in reference[0] for i in batch) == sorted(set(range(N)) - bad)


# ------------------------------------------------------------------------------------------------ tar shards
@pytest.fixture
def shards(object_server: Any) -> Any:
    from tests.servers import make_shard

    object_server.objects = {f"resume/s-{s}.tar": make_shard(s, 7) for s in range(3)}
    yield f"{object_server.base_url}/resume/s-{{0..2}}.tar"
    object_server.objects = {}


def test_tar_shard_dataset_resumes_by_its_own_state(driver: Driver, shards: str) -> None:
    def make(**kw: Any) -> aloader.DataLoader:
        def decode(sample: dict[str, Any]) -> str:
            return str(sample["txt"].decode())

        dataset = TarShardDataset(shards, shuffle=True, seed=9, shuffle_buffer=5, shard_concurrency=2, decode=decode)
        return aloader.DataLoader(dataset, batch_size=4, **kw)

    def before_epoch(loader: aloader.DataLoader, epoch: int) -> None:
        loader.dataset.set_epoch(epoch)

    reference = check_resume(driver, make, before_epoch=before_epoch, stride=2)
    first, second = ([s for batch in epoch for s in batch] for epoch in reference)
    assert len(first) == 21 and sorted(first) == sorted(second) and first != second


@pytest.fixture
def unequal_shards(object_server: Any) -> Any:
    from tests.servers import make_shard

    object_server.objects = {f"unequal/s-{s}.tar": make_shard(s, size) for s, size in enumerate([2, 9, 4])}
    yield f"{object_server.base_url}/unequal/s-{{0..2}}.tar"
    object_server.objects = {}


def test_tar_shards_with_samples_per_epoch_resume(driver: Driver, unequal_shards: str) -> None:
    # 22 samples from shards holding 15: the reader reads its shards again, reshuffled; the state is the same
    # position count, so a resume lands in the second pass as well as in the first.
    def make(**kw: Any) -> aloader.DataLoader:
        def decode(sample: dict[str, Any]) -> str:
            return str(sample["txt"].decode())

        dataset = TarShardDataset(
            unequal_shards,
            samples_per_epoch=22,
            shuffle=True,
            seed=4,
            shuffle_buffer=3,
            shard_concurrency=2,
            decode=decode,
        )
        return aloader.DataLoader(dataset, batch_size=4, **kw)

    def before_epoch(loader: aloader.DataLoader, epoch: int) -> None:
        loader.dataset.set_epoch(epoch)

    reference = check_resume(driver, make, before_epoch=before_epoch, stride=2)
    first, second = ([s for batch in epoch for s in batch] for epoch in reference)
    assert len(first) == len(second) == 22 and len(set(first)) == 15 and first != second


def test_tar_shard_state_needs_samples_per_epoch_for_another_split(
    shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = TarShardDataset(shards, split_by_rank=True)
    dataset.load_state_dict({"epoch": 0, "seed": 0, "position": 3, "reader": 1, "readers": 2})
    with pytest.raises(ValueError, match=r"is from 2 readers .* has 1: resuming with another number of readers needs"):
        list(aloader.DataLoader(dataset, batch_size=None))


def _tar_rank(
    driver: Driver, monkeypatch: pytest.MonkeyPatch, urls: str, rank: int, world: int, **kw: Any
) -> tuple[list[str], dict[str, Any]]:
    """(what rank ``rank`` of ``world`` yields of a 12-sample epoch, the loader's state after it); ``kw``: ``limit``
    (batches) and ``state`` (a loader state to resume)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))

    def decode(sample: dict[str, Any]) -> str:
        return str(sample["txt"].decode())

    dataset = TarShardDataset(urls, samples_per_epoch=12, shard_concurrency=2, decode=decode)
    loader = aloader.DataLoader(dataset, batch_size=2)
    if kw.get("state") is not None:
        loader.load_state_dict(kw["state"])
    return [s for batch in driver.collect(loader, limit=kw.get("limit")) for s in batch], loader.state_dict()


@pytest.mark.parametrize("new_world", [1, 2, 3])
def test_tar_shards_resume_with_another_world_size(
    driver: Driver, unequal_shards: str, monkeypatch: pytest.MonkeyPatch, new_world: int
) -> None:
    # Shards of 2, 9 and 4 samples, 12 per epoch: 6 per rank of 2. Each rank takes its state after one batch; rank
    # 0's resumes every rank of the new world size, which share what the old ranks had left.
    whole = [_tar_rank(driver, monkeypatch, unequal_shards, rank, 2)[0] for rank in range(2)]
    before = [_tar_rank(driver, monkeypatch, unequal_shards, rank, 2, limit=1) for rank in range(2)]
    assert [samples for samples, _ in before] == [samples[:2] for samples in whole]
    state = before[0][1]
    after = [_tar_rank(driver, monkeypatch, unequal_shards, r, new_world, state=state)[0] for r in range(new_world)]
    rest = whole[0][2:] + whole[1][2:]  # the old ranks' streams after the state, in rank order
    share = len(rest) // new_world
    assert [len(samples) for samples in after] == [share] * new_world  # the same batches on every new rank
    assert [s for samples in after for s in samples] == rest[: share * new_world]  # none twice, none else lost
    if new_world > 1:  # the resumed split resumes again: rank 1's state after one batch of it, then the rest
        _, middle = _tar_rank(driver, monkeypatch, unequal_shards, 1, new_world, state=state, limit=1)
        assert _tar_rank(driver, monkeypatch, unequal_shards, 1, new_world, state=middle)[0] == after[1][2:]


class Recording(Dataset[Any]):
    """Records every index fetched; ``reached`` is set once index ``mark`` has been fetched."""

    def __init__(self, n: int, mark: int) -> None:
        self.n, self.mark = n, mark
        self.fetched: list[int] = []
        self.reached = threading.Event()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        self.fetched.append(i)
        if i == self.mark:
            self.reached.set()
        return torch.tensor(i)


def test_batches_in_flight_are_neither_lost_nor_repeated(driver: Driver) -> None:
    # The state is taken after 2 batches were received while batch 5 (indices 20..23) is known to be fetched
    # already: batches 2..5 are in flight or prefetched, and the resumed loader yields them, from batch 2 on.
    dataset = Recording(40, mark=20)
    loader = aloader.DataLoader(dataset, batch_size=4, concurrency=32)

    def sync() -> tuple[list[Any], dict[str, Any]]:
        iterator = iter(loader)
        received = [plain(next(iterator)) for _ in range(2)]
        dataset.reached.wait()
        state = loader.state_dict()
        iterator.close()
        return received, state

    async def asynchronous() -> tuple[list[Any], dict[str, Any]]:
        iterator = aiter(loader)
        received = [plain(await anext(iterator)) for _ in range(2)]
        await asyncio.to_thread(dataset.reached.wait)
        state = loader.state_dict()
        await iterator.aclose()
        return received, state

    received, state = driver.run_async(asynchronous) if driver.is_async else sync()
    assert max(dataset.fetched) >= 20 and state["batches"] == 2
    resumed = aloader.DataLoader(Recording(40, mark=-1), batch_size=4)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = [plain(batch) for batch in driver.collect(resumed)]
    assert received + rest == [list(range(i, i + 4)) for i in range(0, 40, 4)]
    assert sorted(resumed.dataset.fetched) == list(range(8, 40))  # type: ignore[attr-defined]  # nothing before
