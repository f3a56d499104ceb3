"""Datasets for the process-pool tests: module-level, so forkserver and spawn workers can unpickle them."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import logging
import os
import random
import signal
import threading
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

# Set by worker_init_fn in a worker process; read back through samples.
INIT_MARK: dict[str, Any] = {}


class RandomDraws(Dataset[Any]):
    """Each sample draws from ``random``, ``torch`` and numpy: equal to torch's only with the same worker seeds."""

    def __init__(self, n: int = 18) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return {
            "i": i,
            "random": random.random(),
            "torch": torch.rand(2),
            "numpy": np.random.rand(3),
            "label": torch.tensor(i % 3),
        }


class BatchedDraws(RandomDraws):
    """``__getitems__`` as torch calls it, once per batch, in the worker."""

    def __getitems__(self, indices: list[int]) -> list[Any]:
        return [(i, random.randint(0, 1000)) for i in indices]


class WorkerFacts(Dataset[Any]):
    """Sample i reports what get_worker_info() and worker_init_fn gave its worker."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> Any:
        info = get_worker_info()
        assert info is not None
        return {
            "id": info.id,
            "num_workers": info.num_workers,
            "seed": info.seed,
            "same_dataset": info.dataset is self,
            "init": INIT_MARK.get("worker_id", -1),
            "initial_seed": torch.initial_seed(),  # torch seeds each worker with base_seed + worker_id
        }


def mark_init(worker_id: int) -> None:
    INIT_MARK["worker_id"] = worker_id * 10 + 1


def touch_init(directory: str, worker_id: int) -> None:
    """A worker_init_fn (with ``functools.partial``) that leaves a file per call: which workers ran it."""
    open(os.path.join(directory, f"init-{worker_id}-{os.getpid()}"), "x").close()


class TouchesOnIter(IterableDataset[Any]):
    """Each worker's copy leaves a file when it is iterated, then yields its share of ``range(n)``."""

    def __init__(self, directory: str, n: int) -> None:
        self.directory, self.n = directory, n

    def __iter__(self) -> Any:
        info = get_worker_info()
        assert info is not None
        open(os.path.join(self.directory, f"iter-{info.id}-{os.getpid()}"), "x").close()
        return iter(range(info.id, self.n, info.num_workers))


def failing_init(worker_id: int) -> None:
    raise LookupError(f"no config for worker {worker_id}")


class Sharded(IterableDataset[Any]):
    """Each worker yields its own share, of a different length per worker (some run out before others)."""

    def __init__(self, n: int = 23) -> None:
        self.n = n

    def __iter__(self) -> Any:
        info = get_worker_info()
        if info is None:
            return iter(range(self.n))
        stop = self.n - 6 * info.id  # worker 1 has fewer items: it is exhausted first
        return (torch.tensor([i, random.randint(0, 99)]) for i in range(info.id, stop, info.num_workers))


class LongerThanLen(IterableDataset[Any]):
    """Says 3 items and yields 5 (in every worker: not sharded), which torch warns about."""

    def __len__(self) -> int:
        return 3

    def __iter__(self) -> Any:
        return iter(range(5))

    def __repr__(self) -> str:
        return "LongerThanLen()"


class Pids(Dataset[Any]):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> Any:
        return os.getpid()


class KillsWorker(Dataset[Any]):
    """Index ``victim`` ends the worker process that fetches it (never the main process): ``how`` is ``"kill"``
    (SIGKILL), ``"bus"`` (SIGBUS, as when shared memory runs out) or ``"exit"`` (``os._exit(3)``)."""

    def __init__(self, victim: int = 5, n: int = 12, how: str = "kill") -> None:
        self.victim, self.n, self.how = victim, n, how

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if i == self.victim and get_worker_info() is not None:
            if self.how == "exit":
                os._exit(3)
            # pytest's faulthandler, inherited by a forked worker, catches the signal and dumps every thread's stack
            # before re-raising it; a dump racing the worker's other threads now and then crashes with SIGSEGV, and
            # the worker would be reported as killed by that instead.
            faulthandler.disable()
            os.kill(os.getpid(), signal.SIGBUS if self.how == "bus" else signal.SIGKILL)
        return i


class Fails(Dataset[Any]):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> Any:
        if i == 3:
            raise KeyError(f"no sample {i}")
        return i


class TwoArguments(Exception):
    def __init__(self, code: int, detail: str) -> None:  # cannot be built from a message alone
        super().__init__(code, detail)
        self.code = code


class RaisesTwoArguments(Dataset[Any]):
    """Index 3 (worker 1's first batch, with batch_size=2) raises an exception torch cannot rebuild from its text."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> Any:
        if i == 3:
            raise TwoArguments(i, "needs both")
        return i


class Blocks(Dataset[Any]):
    """Index 0 blocks its worker until the process ends: for timeouts and for closing busy workers."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> Any:
        if i == 0:
            threading.Event().wait()
        return i


class BlocksThenPids(Blocks):
    """As ``Blocks``, but the other samples are the pid of the worker that fetched them."""

    def __getitem__(self, i: int) -> Any:
        super().__getitem__(i)
        return os.getpid()


class Arrays(Dataset[Any]):
    """Large and small numpy arrays of several dtypes."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> Any:
        return {
            "big": np.arange(40_000, dtype=np.float32) + i,
            "big_int": np.full((300, 100), i, dtype=np.int16),
            "small": np.array([i, i + 1], dtype=np.uint8),
            "tensor": torch.full((50_000,), float(i)),
        }


class ManyTensors(Dataset[Any]):
    """Samples of eight small tensors each: each is a shared-memory segment (a file descriptor) once it has crossed
    from a worker, for as long as it is alive."""

    def __len__(self) -> int:
        return 400

    def __getitem__(self, i: int) -> Any:
        return [torch.full((4,), i) for _ in range(8)]


class WaitsForRelease(Dataset[Any]):
    """Index 0 blocks its worker until the test opens the FIFO at ``path`` for writing (no timing involved)."""

    def __init__(self, path: str, n: int = 8) -> None:
        self.path, self.n = path, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if i == 0:
            with open(self.path, "rb") as fifo:  # blocks until a writer opens it
                fifo.read()
        return i


class AsyncNumbers:
    """Async map-style: fetches on the event loop; a sync transform goes to the workers."""

    def __len__(self) -> int:
        return 10

    async def __getitem__(self, i: int) -> int:
        await asyncio.sleep(0)
        return i


class AsyncBlobs:
    """Async map-style over bytes, every third pair of samples 1 MiB (a batch of two is a task bigger than a socket's
    buffer) and the others 16 bytes: a sync transform in the workers gets them in its tasks, some sent at once and
    some behind a big one."""

    def __len__(self) -> int:
        return 24

    async def __getitem__(self, i: int) -> bytes:
        await asyncio.sleep(0)
        return bytes([i]) * ((1 << 20) if (i // 2) % 3 == 0 else 16)


def size_and_byte(sample: bytes) -> tuple[int, int, int]:
    return len(sample), sample[0], sample[-1]


def as_list(batch: list[Any]) -> list[Any]:
    """A collate_fn that keeps samples as they are (numpy arrays stay arrays)."""
    return batch


def pid_of_transform(sample: Any) -> tuple[Any, int]:
    return sample, os.getpid()


def square(sample: int) -> int:
    return sample * sample


class ParentPids(Dataset[Any]):
    """Each sample is the pid of the process that started the worker: the main process's when it was forked."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return os.getppid()


class FrozenObjects(Dataset[Any]):
    """Each sample is how many objects the worker's garbage collector never walks (gc.freeze at worker start)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return gc.get_freeze_count()


class Unpicklable(Dataset[Any]):
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> Any:
        return i


class MeetInWorker(Dataset[Any]):
    """Each fetch blocks until ``parties`` fetches are inside at once in the same worker process: proof of that much
    concurrency inside one worker, without timing. A sample is ``(index, pid)``.

    The rendezvous is made in each worker (its copy of the dataset starts without one). The wait has a generous bound
    only so that a loader without concurrency in its workers fails the test instead of hanging it.
    """

    def __init__(self, n: int, parties: int) -> None:
        self.n, self.parties = n, parties
        self._here: dict[int, tuple[threading.Lock, threading.Event, list[int]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"n": self.n, "parties": self.parties, "_here": {}}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        pid = os.getpid()
        lock, event, arrived = self._here.setdefault(pid, (threading.Lock(), threading.Event(), [0]))
        with lock:
            arrived[0] += 1
            if arrived[0] >= self.parties:
                event.set()
        if not event.wait(timeout=60):
            raise TimeoutError(f"only {arrived[0]} of {self.parties} fetches were ever in flight in worker {pid}")
        return i, pid


def shuffled_numbers_loader() -> Any:
    """A seeded, shuffled loader with two workers: the same order in every process (for a kill-and-resume test)."""
    import aloader

    data = aloader.TensorDataset(torch.arange(40), torch.arange(40) * 10)
    generator = torch.Generator().manual_seed(9)
    return aloader.DataLoader(data, batch_size=4, shuffle=True, generator=generator, num_workers=2)


class LoggingSquares(Dataset[Any]):
    """Logs every sample on the ``tests.pool`` logger (in the worker process), then returns its square."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        logging.getLogger("tests.pool").info("sample %d in process %d", i, os.getpid())
        return i * i


class StreamsWaitingForRelease(IterableDataset[Any]):
    """Each worker's copy yields ``100 * worker_id + j`` for j < ``n``; worker 0's first item waits until the test
    opens the FIFO at ``path`` for writing (no timing involved)."""

    def __init__(self, path: str, n: int = 4) -> None:
        self.path, self.n = path, n

    def __iter__(self) -> Any:
        info = torch.utils.data.get_worker_info()
        worker_id = info.id if info is not None else 0
        for j in range(self.n):
            if worker_id == 0 and j == 0:
                with open(self.path, "rb") as fifo:  # blocks until a writer opens it
                    fifo.read()
            yield 100 * worker_id + j


# The worker's heap trims (aloader._pool.worker.MallocTrim), seen from inside the worker: set after each trim by
# the hook ``after_trims`` installs, so a sample can wait for the next one instead of guessing when it happens.
TRIMMED = threading.Event()
_CHUNK = 64 * 1024  # below glibc's mmap threshold: these chunks come from the heap, not from mappings of their own


def after_trims(worker_id: int) -> None:
    """worker_init_fn: every heap trim of this worker sets ``TRIMMED`` once it is done."""
    from aloader._pool.worker import MallocTrim

    trim = MallocTrim.trim

    def trim_and_tell(self: MallocTrim) -> None:
        trim(self)
        TRIMMED.set()

    MallocTrim.trim = trim_and_tell  # type: ignore[method-assign]


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_inside_the_heap(mib: int) -> int:
    """Allocate and touch ``mib`` MiB from the C heap in 64 KiB chunks, then free all but the last, which pins the
    heap's top (glibc gives back the free space at the top by itself, and keeps the rest); the resident bytes then.
    The pinned chunk is left allocated: it is 64 KiB."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    chunks = [libc.malloc(_CHUNK) for _ in range(mib * 2**20 // _CHUNK)]
    for chunk in chunks:
        ctypes.memset(chunk, 1, _CHUNK)
    for chunk in chunks[:-1]:
        libc.free(chunk)
    return resident_bytes()


class FreesHeapMemory(Dataset[Any]):
    """Sample 0 frees 64 MiB inside the worker's heap; sample 1 waits until the worker has trimmed its heap after
    that (``after_trims`` as the ``worker_init_fn``) and is ``(resident bytes after the free, after the trim)``."""

    def __init__(self) -> None:
        self._freed = 0

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Any:
        if i == 0:
            self._freed = free_inside_the_heap(64)
            TRIMMED.clear()  # the trims that count come after this sample is sent
            return torch.tensor([0, 0])
        if not TRIMMED.wait(timeout=60):
            raise TimeoutError("the worker never trimmed its heap after sending a batch")
        return torch.tensor([self._freed, resident_bytes()])
