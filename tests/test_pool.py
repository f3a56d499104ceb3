"""The process pool (num_workers > 0): torch's results, worker semantics, shared-memory transfer, failures.

Every test runs through both drivers; the autouse ``no_leaks`` fixture also checks that no worker process and no
``/dev/shm`` entry is left after each test.
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from torch.utils.data import TensorDataset

import aloader
from tests import pool_datasets as pd
from tests.conftest import Driver, assert_same

TORCH = torch.utils.data.DataLoader


def gen(seed: int = 11) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CASES: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "shuffle-random-draws": lambda: (pd.RandomDraws(), {"batch_size": 3, "shuffle": True, "generator": gen()}),
    "global-rng": lambda: (pd.RandomDraws(), {"batch_size": 4, "shuffle": True}),
    "no-batching": lambda: (pd.RandomDraws(7), {"batch_size": None}),
    "getitems": lambda: (pd.BatchedDraws(), {"batch_size": 4, "drop_last": True}),
    "prefetch-3-workers-3": lambda: (pd.RandomDraws(), {"batch_size": 2, "num_workers": 3, "prefetch_factor": 3}),
    "iterable-sharded": lambda: (pd.Sharded(), {"batch_size": 3}),
    "iterable-sharded-drop-last": lambda: (pd.Sharded(), {"batch_size": 3, "drop_last": True}),
    "iterable-no-batching": lambda: (pd.Sharded(9), {"batch_size": None}),
}


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes:UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_same_batches_as_torch_with_workers(driver: Driver, case: str) -> None:
    torch.manual_seed(5)
    dataset, kwargs = CASES[case]()
    kwargs = {"num_workers": 2, **kwargs}
    reference = TORCH(dataset, **kwargs)
    expected = [list(reference), list(reference)]
    after_torch = torch.rand(2)

    torch.manual_seed(5)
    dataset, kwargs = CASES[case]()
    # concurrency=1: each worker one sample at a time, so the draws inside __getitem__ are torch's exactly.
    loader = aloader.DataLoader(dataset, **{"num_workers": 2, **kwargs}, concurrency=1)
    got = [driver.collect(loader), driver.collect(loader)]
    assert_same(got, expected)
    assert torch.equal(torch.rand(2), after_torch)  # the same draws in the main process, in the same order


def test_persistent_workers_same_pids_and_same_batches_as_torch(driver: Driver) -> None:
    torch.manual_seed(3)
    reference = TORCH(pd.RandomDraws(), batch_size=3, shuffle=True, num_workers=2, persistent_workers=True)
    expected = [list(reference) for _ in range(3)]
    del reference

    torch.manual_seed(3)
    with aloader.DataLoader(
        pd.RandomDraws(), batch_size=3, shuffle=True, num_workers=2, persistent_workers=True, concurrency=1
    ) as loader:
        got = []
        pids = []
        for _ in range(3):
            got.append(driver.collect(loader))
            pool = loader._persistent_pool
            assert pool is not None
            pids.append(pool.pids)
        # Workers carry on from one epoch to the next, with their RNG states, as torch's persistent workers do.
        assert_same(got, expected)
        assert pids[0] == pids[1] == pids[2] and len(set(pids[0])) == 2
    assert loader._persistent_pool is None


def test_two_persistent_loaders_in_turns_keep_their_workers_as_torch(driver: Driver) -> None:
    # Started from a pipeline thread (fork or spawn given as start method), the workers used to be killed when that
    # epoch's threads exited (the kernel's parent-death signal follows the forking thread): the next epoch then lost
    # its batches to dead workers, or started new ones with other random states than torch's persistent workers.
    # (spawn takes the same path as fork here, only slower: not repeated.)
    def make(cls: Any, n: int, batch_size: int, **extra: Any) -> Any:
        return cls(
            pd.RandomDraws(n),
            batch_size=batch_size,
            shuffle=True,
            num_workers=2,
            persistent_workers=True,
            multiprocessing_context="fork",
            **extra,
        )

    torch.manual_seed(6)
    train, val = make(TORCH, 8, 2), make(TORCH, 3, 4)  # val: one batch, fewer than workers
    expected = [[list(train), list(val)] for _ in range(3)]
    del train, val
    torch.manual_seed(6)
    with make(aloader.DataLoader, 8, 2, concurrency=1) as train, make(aloader.DataLoader, 3, 4, concurrency=1) as val:
        got, pids = [], []
        for _ in range(3):
            got.append([driver.collect(train), driver.collect(val)])
            assert train._persistent_pool is not None and val._persistent_pool is not None
            pids.append((train._persistent_pool.pids, val._persistent_pool.pids))
    assert_same(got, expected)
    assert pids[0] == pids[1] == pids[2]


@pytest.mark.parametrize("taken", [1, 2, 5])
def test_break_with_persistent_workers_then_next_epoch_as_torch(driver: Driver, taken: int) -> None:
    # torch's workers run prefetch_factor * num_workers tasks plus one per batch taken, then carry their random state
    # into the next epoch: after a break, the next epoch's draws inside __getitem__ depend on exactly that count.
    def make(cls: Any, **extra: Any) -> Any:
        torch.manual_seed(4)
        return cls(pd.RandomDraws(30), batch_size=2, shuffle=True, num_workers=2, persistent_workers=True, **extra)

    reference = make(TORCH)
    expected = [list(itertools.islice(reference, taken)), list(reference)]
    del reference
    with make(aloader.DataLoader, concurrency=1) as loader:  # torch's pacing and draws
        got = [driver.collect(loader, limit=taken), driver.collect(loader)]
    assert_same(got, expected)


def test_fork_context_gives_the_same_batches(driver: Driver) -> None:
    torch.manual_seed(2)
    expected = list(TORCH(pd.RandomDraws(), batch_size=4, shuffle=True, num_workers=2))
    torch.manual_seed(2)
    loader = aloader.DataLoader(
        pd.RandomDraws(), batch_size=4, shuffle=True, num_workers=2, multiprocessing_context="fork", concurrency=1
    )
    assert_same(driver.collect(loader), expected)


def test_worker_info_and_worker_init_fn_as_torch(driver: Driver) -> None:
    assert aloader.get_worker_info() is None
    torch.manual_seed(8)
    expected = list(TORCH(pd.WorkerFacts(), batch_size=2, num_workers=2, worker_init_fn=pd.mark_init))
    torch.manual_seed(8)
    got = driver.collect(aloader.DataLoader(pd.WorkerFacts(), batch_size=2, num_workers=2, worker_init_fn=pd.mark_init))
    assert_same(got, expected)
    assert [batch["id"].tolist() for batch in got] == [[0, 0], [1, 1], [0, 0], [1, 1]]
    assert all(batch["init"].tolist() == [batch["id"][0] * 10 + 1] * 2 for batch in got)
    assert all(batch["same_dataset"].all() for batch in got)
    assert aloader.get_worker_info() is None  # still None in the main process


def test_worker_seeds_are_torchs_and_reproducible_with_a_generator(driver: Driver) -> None:
    # torch.initial_seed() in worker w is base_seed + w, the base seed drawn from the loader's generator: the same
    # generator seed gives the same worker seeds in every run, in torch and here alike.
    def seeds(cls: Any, seed: int, collect: Callable[[Any], list[Any]]) -> list[list[int]]:
        loader = cls(pd.WorkerFacts(), batch_size=2, num_workers=2, generator=gen(seed))
        return [
            [batch["id"][0].item(), batch["initial_seed"][0].item(), batch["seed"][0].item()]
            for batch in collect(loader)
        ]

    expected = seeds(TORCH, 21, list)
    assert seeds(aloader.DataLoader, 21, driver.collect) == expected == seeds(TORCH, 21, list)
    assert [s[1] - s[0] for s in expected] == [expected[0][1]] * 4 and all(s[1] == s[2] for s in expected)
    assert seeds(aloader.DataLoader, 22, driver.collect) == seeds(TORCH, 22, list) != expected


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes:UserWarning")
@pytest.mark.parametrize("kind", ["map", "iterable", "empty"])
def test_workers_started_with_fewer_batches_than_workers_as_torch(driver: Driver, kind: str, tmp_path: Path) -> None:
    # torch starts every worker at iter() even when some get no batch: each runs worker_init_fn, and each copy of an
    # iterable dataset is iterated. Users see it through those calls' side effects (logs, files, connections).
    def run(cls: Any, collect: Callable[[Any], list[Any]]) -> tuple[int, list[str]]:
        directory = tmp_path / cls.__module__
        directory.mkdir()
        dataset: Any = {
            "map": TensorDataset(torch.arange(3)),
            "iterable": pd.TouchesOnIter(str(directory), 2),
            "empty": TensorDataset(torch.arange(0)),
        }[kind]
        init = functools.partial(pd.touch_init, str(directory))
        batches = collect(cls(dataset, batch_size=4, num_workers=3, worker_init_fn=init))
        return len(batches), sorted(name.rsplit("-", 1)[0] for name in os.listdir(directory))

    expected = run(TORCH, list)
    assert run(aloader.DataLoader, driver.collect) == expected
    assert len(expected[1]) == (6 if kind == "iterable" else 3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterable_longer_than_its_len_warns_torchs_words(driver: Driver, num_workers: int) -> None:
    # Word for word, once per batch past len(loader): users' log filters match torch's text.
    def warnings_of(cls: Any, collect: Callable[[Any], list[Any]]) -> tuple[list[Any], list[tuple[type, str]]]:
        loader = cls(pd.LongerThanLen(), batch_size=None, num_workers=num_workers)
        assert len(loader) == 3
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = collect(loader)
        return batches, [(w.category, str(w.message)) for w in caught if "Length of" in str(w.message)]

    expected = warnings_of(TORCH, list)
    assert len(expected[1]) == 5 * max(num_workers, 1) - 3
    assert ("IterableDataset replica" in expected[1][0][1]) == (num_workers > 0)
    assert_same(warnings_of(aloader.DataLoader, driver.collect), expected)


def test_transform_runs_in_a_worker_process(driver: Driver) -> None:
    loader = aloader.DataLoader(
        pd.AsyncNumbers(), batch_size=5, num_workers=2, transform=pd.pid_of_transform, collate_fn=pd.as_list
    )
    batches = driver.collect(loader)
    assert [sample for batch in batches for sample, _ in batch] == list(range(10))
    pids = {pid for batch in batches for _, pid in batch}
    assert os.getpid() not in pids and len(pids) == 2


def test_tasks_bigger_than_the_pipe_reach_their_worker_whole_and_in_order(driver: Driver) -> None:
    # A task that does not fit the socket's buffer goes partly at once and the rest through the worker's sender
    # thread; a small task after it must wait behind it, not overtake it.
    loader = aloader.DataLoader(
        pd.AsyncBlobs(), batch_size=2, num_workers=2, transform=pd.size_and_byte, collate_fn=pd.as_list
    )
    samples = [sample for batch in driver.collect(loader) for sample in batch]
    assert samples == [((1 << 20) if (i // 2) % 3 == 0 else 16, i, i) for i in range(24)]


def test_sync_dataset_and_transform_run_in_workers(driver: Driver) -> None:
    batches = driver.collect(aloader.DataLoader(pd.Pids(), batch_size=2, num_workers=2, transform=pd.square))
    pids = [int(pid) for batch in batches for pid in batch.sqrt().round().long()]
    assert os.getpid() not in pids and len(set(pids)) == 2


def test_numpy_arrays_and_tensors_keep_type_and_dtype(driver: Driver) -> None:
    dataset = pd.Arrays()
    got = driver.collect(aloader.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=pd.as_list))
    expected = [[dataset[i] for i in range(3)], [dataset[i] for i in range(3, 6)]]
    assert_same(got, expected)


def test_killed_worker_raises_naming_worker_and_samples(driver: Driver) -> None:
    # concurrency=1: worker 0 holds one batch at a time, as torch's (see test_worker_core for the concurrent case)
    loader = aloader.DataLoader(pd.KillsWorker(victim=5), batch_size=2, num_workers=2, concurrency=1)
    with pytest.raises(aloader.WorkerDiedError) as info:
        driver.collect(loader)
    message = str(info.value)
    # Batch [4, 5] is the third batch: worker 0's second.
    assert message.startswith(f"DataLoader worker (pid(s) {info.value.pid}) exited unexpectedly: worker 0 ")
    assert "is killed by signal: Killed (SIGKILL)" in message
    assert "[4, 5] (2 samples)" in message
    assert info.value.worker_id == 0 and info.value.exitcode == -9


TORCH_DEATH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from tests import pool_datasets as pd

    for _ in range(10):
        try:
            list(torch.utils.data.DataLoader(pd.KillsWorker(victim=5, how=sys.argv[1]), batch_size=2, num_workers=2))
        except Exception as error:
            if isinstance(error, RuntimeError) and "pid(s) " in str(error):
                print(json.dumps({"message": str(error), "cause": str(error.__cause__),
                                  "cause_type": type(error.__cause__).__name__}))
                break
    """
)


@functools.cache
def _torch_death(how: str) -> dict[str, Any]:
    """torch's error for a worker that dies, in the form aloader gives: "DataLoader worker (pid(s) N) exited
    unexpectedly", its per-worker error chained. Depending on when the signal lands, torch's SIGCHLD handler raises
    first, in the main thread, with a shorter text ("DataLoader worker (pid N) is killed by signal: ..."), or torch
    fails receiving a batch the dead worker had sent (ConnectionResetError from multiprocessing's resource sharer);
    such a run is repeated. In a fresh interpreter: torch's iterator, after a worker's death, leaves its other worker,
    threads and descriptors to be collected at some later time, which this process's leak checks would find."""
    return _json_of_script(TORCH_DEATH_SCRIPT, how)


def _json_of_script(script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter at the repository's root; the JSON object its last line prints."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


@pytest.mark.parametrize("how", ["kill", "bus", "exit"])
def test_dead_worker_raises_torchs_type_with_torchs_words(driver: Driver, how: str) -> None:
    # Code written for torch catches RuntimeError (retry loops, elastic agents) and matches its words in logs.
    expected = _torch_death(how)
    with pytest.raises(RuntimeError) as info:
        driver.collect(aloader.DataLoader(pd.KillsWorker(victim=5, how=how), batch_size=2, num_workers=2))
    error = info.value
    assert isinstance(error, aloader.WorkerDiedError) and isinstance(error, aloader.AloaderError)

    def torchs_words(error: object, pid: int | None) -> str:
        return str(error).replace(f"pid(s) {pid})", "pid(s) PID)").replace(f"pid {pid})", "pid PID)")

    torch_pid = int(expected["message"].split("pid(s) ")[1].split(")")[0])
    head = torchs_words(expected["message"], torch_pid)
    assert head == "DataLoader worker (pid(s) PID) exited unexpectedly"
    assert torchs_words(error, error.pid).startswith(head + ": worker 0 ")
    # The cause is torch's per-worker error, word for word, as torch chains it.
    assert type(error.__cause__) is RuntimeError and expected["cause_type"] == "RuntimeError"
    assert torchs_words(error.__cause__, error.pid) == torchs_words(expected["cause"], torch_pid)
    # Its advice (shared memory for SIGBUS, num_workers=0 for an exit code) ends ours too.
    advice = expected["cause"].split(". ", 1)[1]
    if advice:
        assert str(error).endswith(advice)


def test_killed_worker_outcomes_are_errors_not_a_hang(driver: Driver) -> None:
    outcomes = driver.outcomes(aloader.DataLoader(pd.KillsWorker(victim=0), batch_size=2, num_workers=2))
    kinds = [kind for kind, _ in outcomes]
    # Every batch of worker 0 fails; worker 1's batches still arrive.
    assert kinds == ["err", "ok", "err", "ok", "err", "ok"]
    assert all(isinstance(error, aloader.WorkerDiedError) for kind, error in outcomes if kind == "err")


def test_dataset_error_keeps_type_index_and_worker_traceback(driver: Driver) -> None:
    outcomes = driver.outcomes(aloader.DataLoader(pd.Fails(), batch_size=2, num_workers=2))
    assert [kind for kind, _ in outcomes] == ["ok", "err", "ok", "ok"]
    error = outcomes[1][1]
    assert type(error) is KeyError
    assert "fetching sample index 3 in DataLoader worker process 1" in str(error)
    cause = error.__cause__
    assert type(cause) is KeyError
    assert any(
        "Traceback in DataLoader worker process 1" in note and "raise KeyError" in note for note in cause.__notes__
    )


def test_worker_error_that_needs_other_arguments_is_a_runtime_error_as_torchs(driver: Driver) -> None:
    # torch's workers cannot rebuild such an exception from its message and raise a RuntimeError instead.
    reference = iter(TORCH(pd.RaisesTwoArguments(), batch_size=2, num_workers=2))
    with pytest.raises(RuntimeError, match=r"^Caught TwoArguments in DataLoader worker process 1") as expected:
        list(reference)
    reference._shutdown_workers()  # now: kept alive by the traceback, torch shut it down in teardown in 10 s
    outcomes = driver.outcomes(aloader.DataLoader(pd.RaisesTwoArguments(), batch_size=2, num_workers=2))
    assert [kind for kind, _ in outcomes] == ["ok", "err"]
    error = outcomes[1][1]
    assert type(error) is type(expected.value) is RuntimeError
    assert str(error).startswith("Caught TwoArguments fetching sample index 3 in DataLoader worker process 1: ")
    assert type(error.__cause__) is pd.TwoArguments and error.__cause__.code == 3


def test_worker_init_fn_error_surfaces_with_type(driver: Driver) -> None:
    loader = aloader.DataLoader(pd.RandomDraws(4), batch_size=2, num_workers=2, worker_init_fn=pd.failing_init)
    with pytest.raises(LookupError, match="no config for worker 0") as info:
        driver.collect(loader)
    assert "in worker_init_fn in DataLoader worker process 0" in str(info.value)


def test_timeout_raises_torchs_error_and_stops_the_busy_worker(driver: Driver) -> None:
    loader = aloader.DataLoader(pd.Blocks(), batch_size=2, num_workers=2, timeout=0.5)
    with pytest.raises(RuntimeError, match=r"^DataLoader timed out after 0.5 seconds$"):
        driver.collect(loader)


def test_in_order_false_gives_a_slow_workers_turns_to_the_others_as_torch(driver: Driver, tmp_path: Path) -> None:
    # Worker 0 is stuck on sample 0 until the consumer has 6 batches. torch sends each next batch to the next worker
    # in turn with fewer than prefetch_factor batches outstanding, so worker 1 makes 1, 3, then 4, 5, 6, 7; worker 0
    # then 0 and 2. (Given to worker 0 in turn, 4 and 6 would never come before the release: the timeout fails it.)
    # concurrency=1: one sample at a time per worker, as torch's (with more, worker 0 makes 2, 4, 6 meanwhile).
    def run(cls: Any, name: str, collect: Callable[[Callable[[], Any]], Any], **extra: Any) -> list[int]:
        fifo = tmp_path / name
        os.mkfifo(fifo)
        dataset = pd.WaitsForRelease(str(fifo))
        loader = cls(dataset, num_workers=2, prefetch_factor=2, in_order=False, timeout=120, **extra)
        got: list[int] = []

        def take(batch: Any) -> None:
            got.append(int(batch))
            if len(got) == 6:
                os.close(os.open(fifo, os.O_WRONLY))  # releases worker 0 (waits for it to be reading)

        collect(lambda: (loader, take))
        return got

    def sync(make: Callable[[], Any]) -> None:
        loader, take = make()
        for batch in loader:
            take(batch)

    def by_driver(make: Callable[[], Any]) -> None:
        if not driver.is_async:
            sync(make)
            return

        async def consume() -> None:
            loader, take = make()
            async for batch in loader:
                take(batch)

        driver.run_async(consume)

    expected = run(TORCH, "torch", sync)
    assert expected == [1, 3, 4, 5, 6, 7, 0, 2]
    assert run(aloader.DataLoader, "aloader", by_driver, concurrency=1) == expected


def test_in_order_false_passes_over_a_slow_workers_copy_as_torch(driver: Driver, tmp_path: Path) -> None:
    # An iterable dataset: worker 0's copy is stuck on its first item until the consumer has all 4 of worker 1's
    # items; each next request goes to the next worker in turn whose copy is not exhausted and that has room, as
    # torch's. (Sent strictly in turn, worker 1 would never be asked for its last item before the release: the
    # timeout fails it.)
    def run(cls: Any, name: str, **extra: Any) -> list[int]:
        fifo = tmp_path / name
        os.mkfifo(fifo)
        dataset = pd.StreamsWaitingForRelease(str(fifo))
        loader = cls(dataset, batch_size=None, num_workers=2, in_order=False, timeout=60, **extra)
        got: list[int] = []

        def take(batch: Any) -> None:
            got.append(int(batch))
            if len(got) == 4:
                os.close(os.open(fifo, os.O_WRONLY))  # releases worker 0 (waits for it to be reading)

        if cls is TORCH or not driver.is_async:
            for batch in loader:
                take(batch)
        else:

            async def consume() -> None:
                async for batch in loader:
                    take(batch)

            driver.run_async(consume)
        return got

    expected = run(TORCH, "torch")
    assert sorted(expected) == [0, 1, 2, 3, 100, 101, 102, 103]
    assert expected[:4] == [100, 101, 102, 103]  # worker 1's items first: worker 0 was passed over
    # concurrency=1: torch's window of prefetch_factor * num_workers requests (with more, aloader asks further ahead).
    assert run(aloader.DataLoader, "aloader", concurrency=1) == expected


def test_break_stops_workers(driver: Driver) -> None:
    assert len(driver.collect(aloader.DataLoader(pd.RandomDraws(40), batch_size=2, num_workers=2), limit=2)) == 2


def test_break_while_a_worker_is_busy(driver: Driver) -> None:
    # Worker 0 never finishes batch 0; the consumer gives up after worker 1's first batch (it may wait in vain).
    # concurrency=1: worker 0 makes no other batch meanwhile, as torch's.
    loader = aloader.DataLoader(pd.Blocks(), batch_size=2, num_workers=2, in_order=False, concurrency=1)
    assert_same(driver.collect(loader, limit=1), [torch.tensor([2, 3])])


def test_unpicklable_dataset_says_what_to_fix(driver: Driver) -> None:
    loader = aloader.DataLoader(pd.Unpicklable(), num_workers=2, multiprocessing_context="forkserver")
    with pytest.raises(TypeError, match="pickle") as info:
        driver.collect(loader)
    assert any("must be picklable" in note for note in info.value.__notes__)


def test_workers_freeze_the_inherited_heap(driver: Driver) -> None:
    # Their garbage collections must not walk (and so copy on write) the heap they share with the parent.
    counts = torch.cat(driver.collect(aloader.DataLoader(pd.FrozenObjects(), batch_size=2, num_workers=2)))
    assert all(count > 1000 for count in counts.tolist())


def test_a_forked_pool_freezes_the_parents_heap_until_it_closes(driver: Driver) -> None:
    # The parent's collections must not walk (and copy on write) what the forked workers share with it either.
    numbers = TensorDataset(torch.arange(12))
    assert gc.get_freeze_count() == 0
    loader = aloader.DataLoader(numbers, batch_size=4, num_workers=2, persistent_workers=True, **FORK)
    assert len(driver.collect(loader, limit=1)) == 1
    assert gc.get_freeze_count() > 0  # the persistent pool is alive
    loader.close()
    assert gc.get_freeze_count() == 0
    # Without persistent workers the pool, and the freeze, end with the epoch.
    assert len(driver.collect(aloader.DataLoader(numbers, batch_size=4, num_workers=2, **FORK))) == 3
    assert gc.get_freeze_count() == 0


def test_a_heap_the_program_froze_is_left_to_it(driver: Driver) -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        loader = aloader.DataLoader(TensorDataset(torch.arange(12)), batch_size=4, num_workers=2, **FORK)
        assert len(driver.collect(loader)) == 3
        assert gc.get_freeze_count() == frozen  # not unfrozen by the loader
    finally:
        gc.unfreeze()


FORK: dict[str, Any] = {"multiprocessing_context": "fork"}


DEFAULT_START_SCRIPT = textwrap.dedent(
    """
    import asyncio, http.server, logging, os, sys, threading
    import torch
    import aloader
    from aloader import storage
    from tests import pool_datasets as pd

    def parents(batches):
        return {int(p) for p in torch.cat(list(batches)).tolist()}

    async def consume(loader):
        return [batch async for batch in loader]

    def both_drivers():
        return [
            parents(aloader.DataLoader(pd.ParentPids(), batch_size=2, num_workers=2)),
            parents(asyncio.run(consume(aloader.DataLoader(pd.ParentPids(), batch_size=2, num_workers=2)))),
        ]

    me = os.getpid()
    # The only thread, at iter(): the workers are forked from this process, as torch's are; a dataset that cannot
    # be pickled then works, as with torch.
    assert both_drivers() == [{me}, {me}]
    assert len(list(aloader.DataLoader(pd.Unpicklable(), batch_size=2, num_workers=2))) == 2

    # Another thread that logs and holds a lock across the forks (as torch does, aloader forks anyway); the async
    # driver forks from aloader's forker thread, off the loop.
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO)
    held, stop = threading.Lock(), threading.Event()
    def busy():
        with held:
            while not stop.is_set():
                logging.getLogger("busy").info("tick")
    other = threading.Thread(target=busy)
    other.start()
    assert both_drivers() == [{me}, {me}]
    stop.set()
    other.join()

    # Another loader's thread that stays inside user code (it may hold the dataset's locks): the fork waits for it,
    # about a second, then the forkserver starts the workers instead.
    entered, release = threading.Event(), threading.Event()
    class Stuck(torch.utils.data.Dataset):
        def __len__(self):
            return 1
        def __getitem__(self, i):
            entered.set()
            release.wait()
            return i
    stuck = threading.Thread(target=lambda: list(aloader.DataLoader(Stuck())))
    stuck.start()
    entered.wait()
    assert all(me not in pids for pids in both_drivers())
    release.set()
    stuck.join()

    # Once an object-store client runs here (tokio's threads would not survive a fork), the forkserver starts them.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    asyncio.run(storage.stat(f"http://127.0.0.1:{server.server_address[1]}/README.md"))
    server.shutdown()
    serving.join()
    assert all(me not in pids for pids in both_drivers())
    print("OK")
    """
)


def test_default_start_method_forks_as_torch_does_unless_an_object_store_runs() -> None:
    # A fresh interpreter: the test process itself may have started object-store clients in other tests.
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", DEFAULT_START_SCRIPT], cwd=root, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_persistent_workers_forked_off_the_main_thread_outlive_the_epoch(driver: Driver) -> None:
    # A worker is killed when the *thread* that forked it ends (PR_SET_PDEATHSIG): forks asked for off the main
    # thread (async for; multiprocessing_context="fork" started in the pipeline) come from a lasting thread.
    loader = aloader.DataLoader(pd.Pids(), batch_size=3, num_workers=2, persistent_workers=True, **FORK)
    try:
        epochs = [torch.cat(driver.collect(loader)) for _ in range(3)]
    finally:
        loader.close()
    assert set(epochs[0].tolist()) == set(epochs[2].tolist())  # the same two processes served every epoch


DESCRIPTORS_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, resource, sys
    import torch, uvloop
    import aloader
    from tests import pool_datasets as pd

    which, driver, strategy = sys.argv[1:]
    torch.multiprocessing.set_sharing_strategy(strategy)
    # Few descriptors: keeping every batch alive runs out of them with the file_descriptor strategy.
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    cls = torch.utils.data.DataLoader if which == "torch" else aloader.DataLoader
    loader = cls(pd.ManyTensors(), batch_size=2, num_workers=2, collate_fn=pd.as_list)
    kept = []

    async def consume():
        async for batch in loader:
            kept.append(batch)

    try:
        if driver == "for":
            kept.extend(loader)
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop if driver == "async-uvloop" else None) as runner:
                runner.run(consume())
        print(json.dumps({"batches": len(kept)}))
    except RuntimeError as error:
        cause = error.__cause__
        print(json.dumps({"error": type(error).__name__, "message": str(error), "cause": type(cause).__name__}))
    """
)


@functools.cache
def _under_few_descriptors(which: str, driver: str, strategy: str) -> dict[str, Any]:
    return _json_of_script(DESCRIPTORS_SCRIPT, which, driver, strategy)


@pytest.mark.slow
def test_out_of_descriptors_gives_torchs_advice_and_the_advice_works(driver: Driver) -> None:
    # Each tensor received from a worker holds a descriptor while alive. torch fails with a RuntimeError (its
    # advice names `ulimit -n` and set_sharing_strategy('file_system')); aloader raises torch's advice, chained to
    # the error it met, and follows the advice: with 'file_system' both keep every batch.
    expected = _under_few_descriptors("torch", "for", "file_descriptor")
    assert expected["error"] == "RuntimeError"
    got = _under_few_descriptors("aloader", driver.name, "file_descriptor")
    assert got["error"] == "RuntimeError" and got["cause"] in ("RuntimeError", "OSError")
    assert got["message"].startswith(
        "Too many open files. Communication with the workers is no longer possible. Please increase the limit using "
        "`ulimit -n` in the shell or change the sharing strategy by calling "
        "`torch.multiprocessing.set_sharing_strategy('file_system')` at the beginning of your code. "
    )
    assert "DataLoader worker process" in got["message"]
    assert _under_few_descriptors("aloader", driver.name, "file_system") == {"batches": 200}
    assert _under_few_descriptors("torch", "for", "file_system") == {"batches": 200}


def test_close_is_idempotent_and_the_loader_stays_usable(driver: Driver) -> None:
    loader = aloader.DataLoader(pd.Pids(), batch_size=3, num_workers=2, persistent_workers=True)
    first = driver.collect(loader)
    loader.close()
    loader.close()
    second = driver.collect(loader)
    loader.close()
    assert set(torch.cat(first).tolist()).isdisjoint(torch.cat(second).tolist())  # a new pool, new pids


def test_async_dataset_without_transform_starts_no_processes(driver: Driver) -> None:
    loader = aloader.DataLoader(pd.AsyncNumbers(), batch_size=5, num_workers=2)
    assert_same(driver.collect(loader), [torch.arange(5), torch.arange(5, 10)])


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for a reaper that is not ours (the container's init)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int]) -> list[int]:
    """The pids still running after waiting up to 30 s for each (psutil waits on the process, no sleep loop)."""
    left = []
    for pid in pids:
        try:
            psutil.Process(pid).wait(timeout=30)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            if not _gone(pid):
                left.append(pid)
    return left


WORKER_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import aloader
    from tests import pool_datasets as pd
    if __name__ == "__main__":
        persistent = aloader.DataLoader(pd.Pids(), batch_size=2, num_workers=2, persistent_workers=True)
        pids = [int(p) for batch in persistent for p in batch]
        it = iter(aloader.DataLoader(pd.BlocksThenPids(), batch_size=2, num_workers=2, in_order=False))
        pids += [int(p) for p in next(it)]  # worker 1's first batch; worker 0 is stuck in __getitem__
        print(" ".join(map(str, sorted(set(pids)))), flush=True)
        if sys.argv[1] == "kill":
            sys.stdin.read()  # the test kills us meanwhile
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_no_worker_outlives_the_main_process(how: str, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(WORKER_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        worker_pids = [int(pid) for pid in line.split()]
        helpers = [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
        assert len(worker_pids) == 3, line  # two persistent workers, and worker 1 of the second loader
        if how == "kill":
            process.kill()  # SIGKILL: no atexit, no finalizers; the workers must still go
        assert process.wait(timeout=60) == (-signal.SIGKILL if how == "kill" else 0)
    finally:
        process.kill()
        process.communicate()
    assert _wait_gone(worker_pids + helpers) == []
