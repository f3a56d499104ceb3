"""torchdata's StatefulDataLoader contract: code that saves ``state_dict()`` at a step, builds a new loader and calls
``load_state_dict()`` gets the same batches from aloader as from StatefulDataLoader on the same inputs.

Every comparison runs StatefulDataLoader and aloader (through both drivers) in the same test: the uninterrupted
streams are equal, and a state taken after any step of any epoch resumes the uninterrupted stream in both.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, IterableDataset, RandomSampler

pytest.importorskip("torchdata")
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import BatchSampler as StatefulBatchSampler
from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

import aloader
from tests.conftest import Driver

# StatefulDataLoader 0.11 calls torch.set_vital, which torch 2.13 deprecates.
# Three workers on a two-core runner make torch's worker-count warning (from both loaders).
pytestmark = [
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore:This DataLoader will create .* worker processes"),
]

N = 22
EPOCHS = 2


# ----------------------------------------------------------------------------------------------- inputs
class Numbers(Dataset[Any]):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        return torch.tensor(i)


class Shards(IterableDataset[Any]):
    """An iterable dataset without state, split over workers, in a seeded order (the same in a new process: the loader
    skips what was received by iterating up to it)."""

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = torch.randperm(N, generator=torch.Generator().manual_seed(11)).tolist()
        for i in order[worker::workers]:
            yield torch.tensor(i)


class StatefulShards(IterableDataset[Any]):
    """Stateful as StatefulDataLoader expects: its state is its position, and it resumes from a loaded one."""

    def __init__(self) -> None:
        self.position, self.resume_at = 0, 0

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = list(range(worker, N, workers))
        self.position, self.resume_at = self.resume_at, 0
        while self.position < len(mine):
            self.position += 1
            yield torch.tensor(mine[self.position - 1])

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_at = state["position"]


class _Counting(Iterator[Any]):
    def __init__(self, items: list[int], position: int = 0) -> None:
        self.items, self.position = items, position

    def __next__(self) -> Any:
        if self.position >= len(self.items):
            raise StopIteration
        self.position += 1
        return torch.tensor(self.items[self.position - 1] * 10)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


class StatefulIteratorShards(IterableDataset[Any]):
    """No state of its own; ``iter()`` returns an iterator with state (StatefulDataLoader's ``dataset_iter``)."""

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return _Counting(list(range(worker, N, workers)))


class CountingShards(IterableDataset[Any]):
    """Split over workers; each copy counts the items it has ever served (across epochs) and yields the count with
    each item: its state evolves inside the worker, and a persistent worker carries it into the next epoch. Its
    state is all of it: loaded into a new copy, the copy goes on as the saved one would (a shard finished goes back
    to its start, so the next ``iter()`` starts the next epoch)."""

    def __init__(self) -> None:
        self.position, self.served = 0, 0

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = list(range(worker, N, workers))
        while self.position < len(mine):
            self.position += 1
            self.served += 1
            yield torch.tensor([mine[self.position - 1], self.served])
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.served = state["position"], state["served"]


class CountingMap(Dataset[Any]):
    """Map-style; each sample carries how many samples this copy (one per worker) has fetched so far."""

    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        self.calls += 1
        return torch.tensor([i, self.calls])

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]


def seeded(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Each case: (keyword arguments for either loader class, built fresh, whether it is iterable). The same inputs go to
# StatefulDataLoader and aloader.DataLoader.
CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "StatefulDistributedSampler": lambda: {
        "dataset": Numbers(),
        "batch_size": 4,
        "sampler": StatefulDistributedSampler(Numbers(), num_replicas=1, rank=0, shuffle=True, seed=5),
    },
    "torchdata RandomSampler": lambda: {
        "dataset": Numbers(),
        "batch_size": 3,
        "sampler": StatefulRandomSampler(Numbers(), generator=seeded()),
    },
    "torchdata BatchSampler": lambda: {
        "dataset": Numbers(),
        "batch_sampler": StatefulBatchSampler(StatefulRandomSampler(Numbers(), generator=seeded()), 5, False),
    },
    "plain RandomSampler, no batching": lambda: {
        "dataset": Numbers(),
        "batch_size": None,
        "sampler": RandomSampler(Numbers(), generator=seeded()),
    },
    "sequential, drop_last": lambda: {"dataset": Numbers(), "batch_size": 4, "drop_last": True},
    "stateful iterable dataset": lambda: {"dataset": StatefulShards(), "batch_size": 3},
    "iterable dataset with a stateful iterator": lambda: {"dataset": StatefulIteratorShards(), "batch_size": 3},
    "plain iterable dataset": lambda: {"dataset": Shards(), "batch_size": 3},
}
# Datasets whose state evolves in worker processes, checked with workers only. Without workers, aloader starts an
# iterable dataset's next epoch from a fresh state (see docs/resume.md), which the first one's count does not survive,
# and the main process fetches the next batch's first sample while a batch is being fetched, even with concurrency=1,
# which the second one's count shows.
WORKER_CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "iterable dataset counting in its workers": lambda: {"dataset": CountingShards(), "batch_size": 3},
    "map-style dataset counting in its workers": lambda: {"dataset": CountingMap(), "batch_size": 3},
    "iterable dataset with a stateful iterator": CASES["iterable dataset with a stateful iterator"],
}
# aloader's own options for a case: a dataset whose samples depend on the order of its calls is fetched one sample at
# a time, as torch's workers do (more at once would interleave the calls).
ALOADER_OPTIONS: dict[str, dict[str, Any]] = {"map-style dataset counting in its workers": {"concurrency": 1}}
# Cases whose samples depend on which worker made them: with in_order=False that is decided by timing.
BY_WORKER = {"map-style dataset counting in its workers"}


def plain(batch: Any) -> Any:
    return batch.tolist() if isinstance(batch, torch.Tensor) else batch


# ------------------------------------------------------------------------------------------------ running
def joined(received: list[list[Any]], current: list[Any], rest: list[list[Any]], ended: bool) -> list[list[Any]]:
    """The epochs seen across the restart: those before, the one the state was taken in, then the rest."""
    if ended:
        return [*received, current, *rest]
    return [*received, current + rest[0], *rest[1:]]


def done(loader: Any) -> None:
    """Shut down a torch or torchdata loader's worker processes and their queues now (the leak check runs next)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
    if loader.num_workers:
        # A mid-epoch iterator kept alive by a reference cycle still has its workers: collect it now. (Without
        # workers there is nothing to shut down; a collection per run was a third of this file's time.)
        gc.collect()


def sdl_run(
    make: Callable[[], Any], epoch: int, k: int, resume: bool = True
) -> tuple[list[list[Any]], list[list[Any]]]:
    """StatefulDataLoader: (the uninterrupted epochs, the batches after a state taken at step ``k`` of ``epoch``
    and loaded into a new loader, joined to the ones received before it; the uninterrupted ones without ``resume``)."""
    loader = make()
    full = [[plain(b) for b in loader] for _ in range(EPOCHS)]
    done(loader)
    if not resume:
        return full, full
    loader = make()
    received = [[plain(b) for b in loader] for _ in range(epoch)]
    iterator = iter(loader)
    current = [plain(b) for b in itertools.islice(iterator, k)]  # k, or the whole epoch when it has fewer
    state = copy.deepcopy(loader.state_dict())
    del iterator
    done(loader)
    loader = make()
    loader.load_state_dict(state)
    rest = [[plain(b) for b in loader] for _ in range(EPOCHS - epoch - (len(current) < k))]
    done(loader)
    return full, joined(received, current, rest, ended=len(current) < k)


def aloader_run(
    driver: Driver, make: Callable[[], aloader.DataLoader], epoch: int, k: int
) -> tuple[list[list[Any]], list[list[Any]]]:
    """The same with aloader through ``driver``; the state goes through JSON, as to a file."""

    def epochs(loader: aloader.DataLoader, count: int) -> list[list[Any]]:
        return [[plain(b) for b in driver.collect(loader)] for _ in range(count)]

    with make() as loader:
        full = epochs(loader, EPOCHS)
    with make() as loader:
        received = epochs(loader, epoch)
        current = [plain(b) for b in driver.collect(loader, limit=k)] if k else []
        state = json.loads(json.dumps(loader.state_dict()))
    ended = len(current) < k  # the consumer saw the epoch's end: the state resumes at the next epoch
    with make() as loader:
        loader.load_state_dict(state)
        rest = epochs(loader, EPOCHS - epoch - ended)
    return full, joined(received, current, rest, ended)


def check(
    driver: Driver, case: str, epoch: int, k: int, workers: int, in_order: bool, persistent: bool = False
) -> None:
    options: dict[str, Any] = {"num_workers": workers, "in_order": in_order}
    if workers:
        options.update(multiprocessing_context="fork", persistent_workers=persistent)
    own = ALOADER_OPTIONS.get(case, {})
    make = CASES.get(case) or WORKER_CASES[case]
    # StatefulDataLoader defines no mid-epoch resume with in_order=False (there its own resume may even raise
    # StopIteration as it fast-forwards): only its uninterrupted stream is compared then.
    sdl_resumes = in_order or k == 0
    sdl_full, sdl_resumed = sdl_run(lambda: StatefulDataLoader(**make(), **options), epoch, k, resume=sdl_resumes)
    al_full, al_resumed = aloader_run(driver, lambda: aloader.DataLoader(**make(), **options, **own), epoch, k)
    if not in_order:
        # Completion order (aloader applies it in the main process too): the same batches, in an order of their own.
        # A state taken mid-epoch counts batches received, not which: only a state with none received is exact.
        sdl_full, al_full, sdl_resumed, al_resumed = (
            [sorted(map(str, e)) for e in x] for x in (sdl_full, al_full, sdl_resumed, al_resumed)
        )
        k = k if k == 0 else -1
    if sdl_full != al_full:
        # With workers, torch's and StatefulDataLoader's multi-process iterators call iter(index_sampler) twice (again
        # in _reset()); a sampler that draws in iter() (torchdata's RandomSampler, directly or under its
        # BatchSampler) then draws twice, so their batches are not the single-process ones. aloader calls it once in
        # every mode (its order does not depend on num_workers); what is checked there is that aloader resumes its
        # own stream.
        assert workers > 0, "without workers the same inputs give the same uninterrupted batches"
        sdl_full = sdl_resumed = al_full
    if k < 0:
        return
    assert al_full == sdl_full, "the same inputs give the same uninterrupted batches"
    assert al_resumed == al_full, f"aloader resumes its stream ({case}, epoch {epoch}, step {k})"
    # Wherever StatefulDataLoader resumes its own stream, aloader's resumed batches are its. (Where it does not, as
    # for a state taken at the end of a stateful iterable dataset's epoch, aloader still resumes the uninterrupted
    # stream: see docs/resume.md.)
    if sdl_resumed == sdl_full:
        assert al_resumed == sdl_resumed


@pytest.fixture(autouse=True)
def _quiet_torchdata(caplog: pytest.LogCaptureFixture) -> None:
    # StatefulDataLoader logs a warning for in_order=False and for fast-forwarded datasets.
    caplog.set_level(logging.ERROR, logger="torchdata.stateful_dataloader.stateful_dataloader")


@pytest.mark.parametrize("case", list(CASES))
def test_every_step_of_two_epochs_matches_stateful_dataloader(driver: Driver, case: str) -> None:
    steps = len(aloader.DataLoader(**CASES[case]())) if "iterable" not in case else N // 3 + 1
    stride = max(1, steps // 8)  # about ten states per epoch, the first and the last among them
    for epoch in range(EPOCHS):
        for k in sorted({*range(0, steps + 1, stride), steps}):
            check(driver, case, epoch, k, workers=0, in_order=True)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    case=st.sampled_from([*CASES, *WORKER_CASES]),
    epoch=st.integers(0, EPOCHS - 1),
    step=st.integers(0, 8),
    workers=st.sampled_from([0, 1, 3]),
    in_order=st.booleans(),
)
def test_any_resume_point_matches_stateful_dataloader(
    driver: Driver, case: str, epoch: int, step: int, workers: int, in_order: bool
) -> None:
    assume(workers > 0 or case in CASES)
    assume(in_order or workers < 2 or case not in BY_WORKER)
    check(driver, case, epoch, step, workers, in_order)


@pytest.mark.parametrize("persistent", [False, True], ids=["new workers", "persistent workers"])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("case", list(WORKER_CASES))
def test_per_worker_state_resumes_as_stateful_dataloader(
    driver: Driver, case: str, workers: int, persistent: bool
) -> None:
    """Each worker's copy of the dataset (or its iterator) resumes from its own state, as StatefulDataLoader's: part
    way through the first and second epochs, after the last batch, and at the end of an epoch (the next epoch)."""
    for epoch, k in ((0, 2), (1, 1), (1, 4), (1, 9), (1, 20)):
        check(driver, case, epoch, k, workers, in_order=True, persistent=persistent)


@pytest.mark.parametrize("persistent", [False, True], ids=["new workers", "persistent workers"])
@pytest.mark.parametrize("case", [c for c in WORKER_CASES if c not in BY_WORKER])
def test_per_worker_state_out_of_order(driver: Driver, case: str, persistent: bool) -> None:
    """``in_order=False``: StatefulDataLoader defines a resume between epochs only, and there both agree (``check``).
    Mid-epoch, each worker's copy resumes after the last batch received from it, so aloader yields exactly the
    batches the epoch had left, in an order of its own."""
    for epoch, k in ((0, 0), (1, 20)):
        check(driver, case, epoch, k, 3, in_order=False, persistent=persistent)
    options = {"num_workers": 3, "in_order": False, "multiprocessing_context": "fork", "persistent_workers": persistent}
    for epoch, k in ((0, 2), (1, 5)):
        full, resumed = aloader_run(driver, lambda: aloader.DataLoader(**WORKER_CASES[case](), **options), epoch, k)
        assert [sorted(map(str, e)) for e in resumed] == [sorted(map(str, e)) for e in full]


def test_an_empty_state_changes_nothing_and_a_torchdata_state_is_named() -> None:
    loader = aloader.DataLoader(Numbers(), batch_size=4)
    loader.load_state_dict({})
    assert next(b.tolist() for b in loader) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="torchdata StatefulDataLoader state"):
        loader.load_state_dict(StatefulDataLoader(Numbers(), batch_size=4).state_dict())


def test_a_format_1_state_still_loads() -> None:
    """A state saved by aloader before format 2 (no ``position``/``drain``/``dataset_iter``) means what it meant."""
    full = [b.tolist() for b in aloader.DataLoader(Numbers(), batch_size=4, shuffle=True, generator=seeded())]
    loader = aloader.DataLoader(Numbers(), batch_size=4, shuffle=True, generator=seeded())
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    iterator.close()
    old = {key: value for key, value in state.items() if key not in ("position", "drain", "dataset_iter")}
    old["format"] = 1
    resumed = aloader.DataLoader(Numbers(), batch_size=4, shuffle=True, generator=seeded())
    resumed.load_state_dict(old)
    assert [b.tolist() for b in resumed] == full[1:]
    with pytest.raises(ValueError, match=r"format 1, 2 or 3 .*got format=4"):
        resumed.load_state_dict({**state, "format": 4})


def test_snapshot_every_n_steps_is_accepted_and_the_state_stays_exact() -> None:
    def make() -> aloader.DataLoader:
        return aloader.DataLoader(
            Numbers(), batch_size=2, sampler=StatefulRandomSampler(Numbers(), generator=seeded()),
            snapshot_every_n_steps=4,
        )  # fmt: skip

    full = [b.tolist() for b in make()]
    loader = make()
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    iterator.close()
    resumed = make()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == full[3:]
    with pytest.raises(TypeError, match="snapshot_every_n_steps option should be an integer"):
        aloader.DataLoader(Numbers(), snapshot_every_n_steps="4")  # type: ignore[arg-type]


def test_per_worker_states_need_their_num_workers_and_a_format_2_state_still_loads() -> None:
    def make(workers: int) -> aloader.DataLoader:
        context = "fork" if workers else None
        return aloader.DataLoader(
            CountingMap(), batch_size=3, num_workers=workers, concurrency=1, multiprocessing_context=context
        )

    with make(2) as loader:
        full = [b[:, 0].tolist() for b in loader]
        iterator = iter(loader)
        next(iterator), next(iterator)
        state = loader.state_dict()
        iterator.close()
    assert state["format"] == 3
    assert state["workers"]["num_workers"] == 2
    assert [s[0] for s in state["workers"]["states"]] == [{"calls": 3}, {"calls": 3}]
    with make(3) as other, pytest.raises(ValueError, match=r"2 worker processes.*Resume with num_workers=2"):
        other.load_state_dict(state)
    with make(0) as other, pytest.raises(ValueError, match=r"has num_workers=0"):
        other.load_state_dict(state)
    # Format 2 had no per-worker states: the workers start from the main process's copy, as they did then.
    old = {key: value for key, value in state.items() if key != "workers"}
    old["format"] = 2
    with make(3) as other:
        other.load_state_dict(old)
        assert [b[:, 0].tolist() for b in other] == full[2:]


@pytest.mark.parametrize(("saved_with", "loaded_with"), [(0, 2), (2, 1)])
def test_an_iterable_resumed_mid_epoch_with_other_num_workers_is_refused(
    driver: Driver, saved_with: int, loaded_with: int
) -> None:
    """Each worker iterates its own copy of an iterable dataset, so the batches received so far depend on
    ``num_workers``: resuming mid-epoch with another number is refused with what to do (StatefulDataLoader refuses
    too), rather than yielding other batches (it yielded none at all from 0 to 2 workers)."""
    loader = aloader.DataLoader(StatefulShards(), batch_size=4, num_workers=saved_with)
    assert len(driver.collect(loader, limit=3)) == 3
    state = loader.state_dict()
    other = aloader.DataLoader(StatefulShards(), batch_size=4, num_workers=loaded_with)
    with pytest.raises(ValueError, match=rf"Resume with num_workers={saved_with}"):
        other.load_state_dict(state)
    same = aloader.DataLoader(StatefulShards(), batch_size=4, num_workers=saved_with)
    same.load_state_dict(state)
    assert len(driver.collect(same)) == 3  # 6 batches in all, with 0 or 2 workers (22 items, shards of 11)
