"""The core inside worker processes: each worker fetches ``concurrency`` samples at once, with torch's semantics.

Every test runs through both drivers (the ``driver`` fixture); the autouse ``no_leaks`` fixture checks that no
process, thread, descriptor or shared-memory segment is left behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import aloader
from aloader._pool.worker import MallocTrim
from tests import pool_datasets as pd
from tests.conftest import Driver, assert_same

TORCH = torch.utils.data.DataLoader


def test_each_worker_fetches_concurrently(driver: Driver) -> None:
    # Six fetches must be inside the same worker at once before any returns: a worker that fetched one sample at a
    # time (torch's loop) would fail with the dataset's TimeoutError.
    dataset = pd.MeetInWorker(24, parties=6)
    loader = aloader.DataLoader(dataset, batch_size=3, num_workers=2, concurrency=8)
    batches = driver.collect(loader)
    indices = [index for batch in batches for index in batch[0].tolist()]
    assert indices == list(range(24))
    pids = {pid for batch in batches for pid in batch[1].tolist()}
    assert len(pids) == 2 and os.getpid() not in pids
    # batch i from worker i % num_workers, as torch
    by_worker = [batches[i][1][0].item() for i in range(len(batches))]
    assert by_worker[0::2] == [by_worker[0]] * 4 and by_worker[1::2] == [by_worker[1]] * 4


@pytest.mark.parametrize("kwargs", [{"batch_size": 4}, {"batch_size": 5, "shuffle": True}, {"batch_size": None}])
def test_deterministic_batches_equal_torch_at_default_concurrency(driver: Driver, kwargs: dict[str, Any]) -> None:
    dataset = TensorDataset(torch.arange(50).float(), torch.arange(50) % 7)
    kwargs = {"num_workers": 2, **kwargs}
    expected = list(TORCH(dataset, generator=torch.Generator().manual_seed(3), **kwargs))
    loader = aloader.DataLoader(dataset, generator=torch.Generator().manual_seed(3), **kwargs)
    assert_same(driver.collect(loader), expected)


def test_concurrency_one_keeps_torchs_random_draws(driver: Driver) -> None:
    torch.manual_seed(5)
    expected = list(TORCH(pd.RandomDraws(), batch_size=3, num_workers=2, shuffle=True))
    torch.manual_seed(5)
    loader = aloader.DataLoader(pd.RandomDraws(), batch_size=3, num_workers=2, shuffle=True, concurrency=1)
    assert_same(driver.collect(loader), expected)


def test_failing_sample_in_a_concurrent_worker_names_it(driver: Driver) -> None:
    loader = aloader.DataLoader(pd.Fails(), batch_size=2, num_workers=2, concurrency=4)
    outcomes = driver.outcomes(loader)
    errors = [value for kind, value in outcomes if kind == "err"]
    assert errors, outcomes
    assert "in DataLoader worker process" in str(errors[0])
    assert "fetching sample index" in str(errors[0])


def test_iterable_copies_with_a_transform_in_workers(driver: Driver) -> None:
    torch.manual_seed(7)
    expected = list(TORCH(pd.Sharded(), batch_size=3, num_workers=2))
    torch.manual_seed(7)
    loader = aloader.DataLoader(pd.Sharded(), batch_size=3, num_workers=2, transform=pd.square)
    got = driver.collect(loader)
    assert_same(got, [batch * batch for batch in expected])


def test_killed_concurrent_worker_fails_the_batches_it_held(driver: Driver) -> None:
    # Worker 0 holds batches [0, 1], [4, 5] and [8, 9] at once; sample 5 kills it. [4, 5] raises WorkerDiedError at
    # its position; whether the others were sent before depends on timing, and they are either their batch or the
    # same error. Worker 1's batches all arrive.
    outcomes = driver.outcomes(aloader.DataLoader(pd.KillsWorker(victim=5), batch_size=2, num_workers=2, concurrency=4))
    assert len(outcomes) == 6
    assert [outcomes[i][0] for i in (1, 3, 5)] == ["ok"] * 3
    assert [outcomes[i][1].tolist() for i in (1, 3, 5)] == [[2, 3], [6, 7], [10, 11]]
    assert outcomes[2][0] == "err"
    for i, expected in ((0, [0, 1]), (2, None), (4, [8, 9])):
        kind, value = outcomes[i]
        if kind == "ok":
            assert value.tolist() == expected
        else:
            assert isinstance(value, aloader.WorkerDiedError), value
            assert value.worker_id == 0 and "is killed by signal: Killed (SIGKILL)" in str(value)


def test_break_while_a_worker_thread_is_stuck(driver: Driver) -> None:
    # Sample 0 never returns; its worker goes on with its other batches in other threads. Breaking after the first
    # batch must end every process and thread (the no_leaks fixture checks).
    loader = aloader.DataLoader(pd.Blocks(), batch_size=2, num_workers=2, in_order=False, concurrency=4)
    (batch,) = driver.collect(loader, limit=1)
    assert batch.tolist() in ([2, 3], [4, 5], [6, 7])


_KILLED_CHILD = """
import json, os, signal, sys
from tests.pool_datasets import shuffled_numbers_loader

loader = shuffled_numbers_loader()
for step, _ in enumerate(loader, 1):
    if step == 3:
        with open(sys.argv[1], "w") as f:
            json.dump(loader.state_dict(), f)
        os.kill(os.getpid(), signal.SIGKILL)  # preempted mid-epoch, workers and all
"""


def test_resume_after_a_kill_with_workers(driver: Driver, tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", _KILLED_CHILD, str(state_file)]
    run = subprocess.run(command, check=False, cwd=root, timeout=240)
    assert run.returncode == -signal.SIGKILL
    whole = [batch[0].tolist() for batch in driver.collect(pd.shuffled_numbers_loader())]
    resumed = pd.shuffled_numbers_loader()
    resumed.load_state_dict(json.loads(state_file.read_text()))
    assert [batch[0].tolist() for batch in driver.collect(resumed)] == whole[3:]


def _has_malloc_trim() -> bool:
    try:
        ctypes.CDLL(None).malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


needs_malloc_trim = pytest.mark.skipif(not _has_malloc_trim(), reason="glibc's malloc_trim")


def test_malloc_trim_is_due_at_most_every_interval() -> None:
    trim = MallocTrim(seconds=0.5)
    due = [trim.due(now) for now in (100.0, 100.2, 100.49, 100.5, 100.6, 101.2)]
    assert due == ([True, False, False, True, False, True] if _has_malloc_trim() else [False] * 6)


@needs_malloc_trim
def test_malloc_trim_gives_back_free_memory_inside_the_heap() -> None:
    freed = pd.free_inside_the_heap(64)
    MallocTrim().trim()
    assert freed - pd.resident_bytes() > 32 * 2**20


@needs_malloc_trim
@pytest.mark.parametrize("concurrency", [1, 4])
def test_workers_trim_their_heaps_after_sending_a_batch(driver: Driver, concurrency: int) -> None:
    # Sample 0 frees 64 MiB inside the worker's heap, which glibc keeps; once its batch is sent the worker trims (the
    # first trim is due at once), and sample 1, which waits for that trim, sees the memory given back.
    loader = aloader.DataLoader(
        pd.FreesHeapMemory(), batch_size=None, num_workers=1, concurrency=concurrency, worker_init_fn=pd.after_trims
    )
    _, (freed, after) = driver.collect(loader)
    assert freed - after > 32 * 2**20, (freed, after)
