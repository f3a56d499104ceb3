"""The process pool: CPU-heavy user code in worker processes, results back through shared memory.

Parent side, one :class:`WorkerPool` per iterator (or per loader with ``persistent_workers=True``)::

    pipeline batch task --submit(worker, op)--> pipe to worker w  (a pool thread sends: a full pipe must not block
          ^                                                         the event loop)
          |  asyncio future, resolved with call_soon_threadsafe
    reader thread: multiprocessing.connection.wait() on every worker's result pipe *and* process sentinel, so a
                   worker that dies fails the futures it held at once, naming the worker and its samples.

Worker side (``_worker_main``): seeds ``random``, ``torch`` and numpy exactly as torch's worker loop does, sets
torch's own ``_worker_info`` (so ``torch.utils.data.get_worker_info()`` works in user code), runs
``worker_init_fn``, then answers tasks in the order they come: fetch (sync map-style datasets), next batch (iterable
datasets: each worker iterates its own copy), transform, collate.

Transfer. Work goes to the worker as plain pickles (small: indices, or samples of async datasets). Results come back
pickled with torch's tensor reductions, except that each tensor storage travels as the file descriptor of an unlinked
shared-memory segment (torch's ``file_descriptor`` strategy: ``_share_fd_cpu_``), passed with ``SCM_RIGHTS`` on the
worker's own socket right behind the message. Only metadata crosses the pipe, no named ``/dev/shm`` entry exists that
a killed process could leave behind, and, unlike torch's ``resource_sharer`` (which serves each descriptor from a
thread of the sending process), a batch sent just before its worker dies still arrives: the kernel holds descriptors
in flight. ``default_collate`` already allocates its output in shared memory inside a worker (it checks
``get_worker_info()``), so a collated batch is not copied again. numpy arrays of ``_SHARE_MIN_BYTES`` or more travel
as shared tensors and are rebuilt as arrays of the same dtype.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import io
import itertools
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.forkserver
import os
import pickle
import queue
import random
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler, recvfds, sendfds
from typing import Any, Final, Literal

import numpy as np
import torch
import torch.multiprocessing  # registers torch's shared-memory reductions with ForkingPickler
import torch.utils.data._utils.worker as torch_worker

from aloader._core.access import describe_indices
from aloader._core.outcomes import NO_BATCH
from aloader._core.plan import PoolKind
from aloader._failures import Collated, Skipped, split_skipped, transform_each
from aloader._threads import _deliver
from aloader.errors import WorkerDiedError, with_context

__all__ = ["WorkerPool", "WorkerSetup", "default_context", "fork_is_safe"]

# Arrays smaller than this are pickled inline: a shared segment costs a file descriptor round trip (~100 us).
_SHARE_MIN_BYTES: Final = 64 * 1024
# How long close() lets an idle worker exit by itself (it sees end-of-file at once) before terminating it.
_EXIT_GRACE_SECONDS: Final = 5.0
_HEADER = struct.Struct("<qi")  # in front of each result message: task id, file descriptors that follow it
_PR_SET_PDEATHSIG: Final = 1
_EXIT: Final = pickle.dumps(None)
_FDS_PER_MESSAGE: Final = 200  # below the kernel's SCM_MAX_FD (253)

Op = Literal["map", "items", "reset", "next"]


def default_context() -> multiprocessing.context.BaseContext:
    """``forkserver``: safe with the loader's threads (a fork would copy locks held by them); torch is preloaded
    in the server once, so each worker starts in tens of milliseconds instead of re-importing torch."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows, macOS without it: spawn
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return context


# Imported once by the forkserver when it starts. Without this, multiprocessing preloads only ``__main__``, and every
# pool then took about 4 s to start on our 2-core machine (measured), not just the first.
_FORKSERVER_PRELOAD: Final = ["torch", "numpy", "aloader._pool"]


# The parent's side of sharing memory with forked workers. A forked worker shares the parent's pages until either
# process writes to one. Workers freeze what they inherit (see _worker_main); the parent freezes its heap too, right
# before the fork, as the gc module's documentation advises: collections in the parent during the epoch then never
# walk the objects the workers share, whose headers they would write. Measured with the pool benchmark: without it,
# depending on where the parent's collections fell, its PSS rose by ~23 MiB and each worker's by ~6 MiB (peak
# memory of all processes 1.14x torch's instead of 0.97x). The heap is unfrozen when the last such pool closes, so
# objects of the program that became garbage meanwhile are collected then. A program that froze its heap itself is
# left alone (its own unfreeze stays its own).
_frozen_lock = threading.Lock()
_frozen_pools = 0  # pools started by fork that froze the parent's heap and are not closed yet


def _freeze_parent() -> bool:
    """Freeze the parent's heap before forking workers; False if the program had frozen it itself."""
    global _frozen_pools
    with _frozen_lock:
        if _frozen_pools == 0 and gc.get_freeze_count() > 0:
            return False
        gc.freeze()
        _frozen_pools += 1
        return True


def _thaw_parent() -> None:
    """A pool that froze the parent's heap closed: unfreeze it once no such pool is left."""
    global _frozen_pools
    with _frozen_lock:
        _frozen_pools -= 1
        if _frozen_pools == 0:
            gc.unfreeze()


def fork_is_safe() -> bool:
    """Whether forking the calling thread now copies no lock that another thread holds.

    True only on Linux, in the main thread, when it is the process's only Python thread (so no thread of the
    loader's, or of the user's, can be inside a lock), and when no object-store client has started its runtime in
    this process (tokio's threads are invisible to ``threading`` and do not survive a fork). This is the moment
    torch forks its workers too: at ``iter(loader)``, in the consumer's thread.
    """
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return False
    if threading.active_count() != 1 or threading.current_thread() is not threading.main_thread():
        return False
    store = sys.modules.get("aloader.storage._store")  # not imported: nothing has read from an object store
    return store is None or not store.object_store_started()


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """What every worker gets once, at start (pickled: the dataset is copied into each worker)."""

    kind: PoolKind  # items: samples come from the parent (async datasets)
    dataset: Any
    auto_collation: bool
    batch_size: int | None
    drop_last: bool
    collate_fn: Callable[[Any], Any]
    transform: Callable[[Any], Any] | None
    worker_init_fn: Callable[[int], None] | None
    num_workers: int
    base_seed: int
    # max_failures is set: a failing sample becomes a Skipped marker, and batches come back as Collated.
    skip_failures: bool = False


# ----------------------------------------------------------------------------------------------- worker process
def _rebuild_array(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    return tensor.numpy()


def _reduce_array(array: np.ndarray[Any, Any]) -> Any:
    if type(array) is np.ndarray and array.nbytes >= _SHARE_MIN_BYTES and not array.dtype.hasobject:
        try:
            tensor = torch.from_numpy(np.array(array, order="C", copy=True))
        except (TypeError, ValueError):  # a dtype torch has no tensor for (strings, non-native byte order)
            pass
        else:
            return _rebuild_array, (tensor.share_memory_(),)  # type: ignore[no-untyped-call]
    return array.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def _dumps_shared(obj: object) -> tuple[bytes, list[int], list[torch.UntypedStorage]]:
    """Pickle ``obj`` with tensor storages moved to shared memory: (bytes, descriptors to send after them, storages).

    The descriptors belong to the storages (some made only for pickling, e.g. from numpy arrays): keep the storages
    alive until the descriptors are sent.
    """
    fds: list[int] = []
    keep: list[torch.UntypedStorage] = []
    seen: dict[int, int] = {}  # storage address -> index in fds: views of one storage stay one storage

    def reduce_storage(storage: torch.UntypedStorage) -> Any:
        if storage.size() == 0:  # cannot be mapped
            return torch.UntypedStorage, ()
        key = storage.data_ptr()
        if key not in seen:
            fd, _ = storage._share_fd_cpu_()
            seen[key] = len(fds)
            fds.append(fd)
            keep.append(storage)
        return _rebuild_storage, (seen[key], storage.size())

    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table[np.ndarray] = _reduce_array
    pickler.dispatch_table[torch.UntypedStorage] = reduce_storage
    pickler.dump(obj)
    return buffer.getvalue(), fds, keep


class _Received(threading.local):
    fds: list[int]
    storages: dict[int, torch.UntypedStorage]

    def __init__(self) -> None:
        self.fds, self.storages = [], {}


_received = _Received()  # the descriptors of the message the reader thread is unpickling


def _rebuild_storage(index: int, size: int) -> torch.UntypedStorage:
    storage = _received.storages.get(index)
    if storage is None:
        # Maps the segment and keeps its own duplicate of the descriptor; the reader closes the received one.
        new_shared = torch.UntypedStorage._new_shared_fd_cpu  # type: ignore[attr-defined]
        storage = _received.storages[index] = new_shared(_received.fds[index], size)
    return storage


def _send_result(
    conn: multiprocessing.connection.Connection, sock: socket.socket, task_id: int, result: object
) -> None:
    try:
        data, fds, keep = _dumps_shared(result)
    except Exception as exc:
        data, fds, keep = _dumps_shared(_Error.capture(exc, "sending the result to the main process"))
    conn.send_bytes(_HEADER.pack(task_id, len(fds)) + data)
    for start in range(0, len(fds), _FDS_PER_MESSAGE):
        sendfds(sock, fds[start : start + _FDS_PER_MESSAGE])
    del keep


@dataclass(frozen=True, slots=True)
class _Error:
    """An exception raised in a worker, sent as data: its type may not survive pickling, its text always does."""

    where: str
    pickled: bytes | None
    type_name: str
    message: str
    traceback: str

    @classmethod
    def capture(cls, exc: BaseException, where: str) -> _Error:
        text = "".join(traceback.format_exception(exc))
        pickled: bytes | None
        try:
            pickled = pickle.dumps(exc)
            pickle.loads(pickled)  # an exception whose __init__ takes other arguments cannot be rebuilt
        except Exception:
            pickled = None
        return cls(where, pickled, type(exc).__qualname__, str(exc), text)

    def rebuild(self, worker_id: int, pid: int | None) -> BaseException:
        original: BaseException
        try:
            original = pickle.loads(self.pickled) if self.pickled is not None else RuntimeError(self.message)
        except Exception:
            original = RuntimeError(f"{self.type_name}: {self.message}")
        original.add_note(f"Traceback in DataLoader worker process {worker_id} (pid {pid}):\n{self.traceback}")
        return with_context(original, f"{self.where} in DataLoader worker process {worker_id}")


class _Worker:
    """The state of one worker process: its dataset copy, and the iterator of an iterable dataset."""

    def __init__(self, setup: WorkerSetup, worker_id: int) -> None:
        self.setup = setup
        self.worker_id = worker_id
        self.iterator: Any = None
        self.ended = False

    def run(self, op: Op, payload: Any) -> Any:
        setup = self.setup
        if op == "map":
            return self.collate(payload, self.fetch(payload), "sample index")
        if op == "items":
            positions, samples, label = payload
            return self.collate(positions, samples, label)
        if op == "reset":
            self.iterator, self.ended = iter(setup.dataset), False
            return None
        return self.next_batch()

    def fetch(self, indices: list[Any]) -> list[Any]:
        # As torch's _MapDatasetFetcher: __getitems__ for a batch when the dataset has it, else one by one.
        dataset = self.setup.dataset
        if not self.setup.auto_collation:
            return [self.getitem(dataset, indices[0])]
        getitems = getattr(dataset, "__getitems__", None)
        if getitems:
            try:
                return list(getitems(indices))
            except Exception as exc:
                if not self.setup.skip_failures:
                    raise _Failure(exc, f"fetching the batch of sample indices {describe_indices(indices)}")
                # max_failures: fetch the batch again sample by sample, so only the failing ones are skipped.
        return [self.getitem(dataset, index) for index in indices]

    def getitem(self, dataset: Any, index: Any) -> Any:
        try:
            return dataset[index]
        except Exception as exc:
            return self.failed(exc, f"fetching sample index {index!r}", "fetch")

    def failed(self, exc: Exception, where: str, stage: Literal["fetch", "transform"]) -> Skipped:
        if not self.setup.skip_failures:
            raise _Failure(exc, where)
        where = f"{where} in DataLoader worker process {self.worker_id}"
        return Skipped(with_context(exc, where), stage, where, exc)

    def next_batch(self) -> Any:
        # As torch's _IterableDatasetFetcher: a short last batch unless drop_last; then the worker is exhausted.
        setup = self.setup
        if self.ended or self.iterator is None:
            return NO_BATCH
        if not setup.auto_collation:
            try:
                item = next(self.iterator)
            except StopIteration:
                self.ended = True
                return NO_BATCH
            except Exception as exc:
                item = self.failed(exc, "fetching an item of the iterable dataset", "fetch")
            return self.collate(["item"], [item], "item")
        items: list[Any] = []
        assert setup.batch_size is not None
        while len(items) < setup.batch_size:
            try:
                items.append(next(self.iterator))
            except StopIteration:
                self.ended = True
                break
            except Exception as exc:
                items.append(self.failed(exc, "fetching items of the iterable dataset", "fetch"))
        if not items or (setup.drop_last and len(items) < setup.batch_size):
            self.ended = True
            return NO_BATCH
        return self.collate(["item"] * len(items), items, "item")

    def collate(self, positions: list[Any], samples: list[Any], label: str) -> Any:
        setup = self.setup
        if setup.transform is not None:
            samples = transform_each(
                setup.transform, samples, positions, label, lambda exc, where: self.failed(exc, where, "transform")
            )
        skipped: list[Skipped] = []
        seen = len(samples)
        if setup.skip_failures:
            samples, positions, skipped = split_skipped(samples, positions)
            if not samples:
                return Collated(None, skipped, seen, empty=True)
        try:
            batch = setup.collate_fn(samples if setup.auto_collation else samples[0])
        except Exception as exc:
            plural = "sample indices" if label == "sample index" else f"{label}s"
            raise _Failure(exc, f"in collate_fn for the batch of {plural} {describe_indices(positions)}")
        return Collated(batch, skipped, seen) if setup.skip_failures else batch


class _Failure(Exception):
    def __init__(self, error: Exception, where: str) -> None:
        super().__init__(where)
        self.error, self.where = error, where


def _seed_worker(base_seed: int, worker_id: int) -> int:
    # Exactly torch's worker loop: the same seeds give the same random draws inside __getitem__.
    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(torch_worker._generate_state(base_seed, worker_id))  # type: ignore[no-untyped-call]
    return seed


def _die_with_parent() -> None:
    """Linux: be killed when the parent process ends, even while stuck in user code (never an orphan). The parent
    is the main process (fork, spawn) or the forkserver, which itself exits when the main process does."""
    # A forkserver child inherits the write end of the server's "main process alive" pipe, which would keep the
    # server (our parent) running as long as we do, and so would never trigger the signal: let go of it. (Code in
    # this worker that starts processes with forkserver then starts a server of its own.)
    server: Any = multiprocessing.forkserver._forkserver
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        try:
            os.close(alive_fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
    if not sys.platform.startswith("linux"):
        return  # elsewhere a worker exits at its next read: end-of-file on its socket
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _worker_main(worker_id: int, conn: multiprocessing.connection.Connection, setup_arg: WorkerSetup | bytes) -> None:
    """The body of a worker process. Exits on end-of-file (the parent closed the pipe or died) or ``None``.

    ``setup_arg`` is the setup itself when the worker was forked (it is the parent's, copied on write, as with
    torch's fork workers), else its pickle.
    """
    # SIGTERM (the pool's close() for a busy worker) unwinds through Python, so multiprocessing's exit hooks run.
    # The objects inherited from the parent (or the forkserver) go to the collector's permanent generation, so this
    # process's garbage collections never walk them: a full collection writes to every object's header and so
    # copies on write every page of the inherited heap. Measured: each worker's PSS rose by ~24 MiB at its first full
    # collection, which made peak memory 1.28x torch's; with this it is 0.96x. O(1): only list heads are relinked.
    gc.freeze()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _die_with_parent()
    sock = socket.socket(fileno=os.dup(conn.fileno()))  # the same socket, for passing descriptors
    init_error: _Error | None = None
    worker: _Worker | None = None
    try:
        torch.set_num_threads(1)  # as torch: workers must not oversubscribe the cores with intra-op threads
        setup: WorkerSetup = setup_arg if isinstance(setup_arg, WorkerSetup) else pickle.loads(setup_arg)
        seed = _seed_worker(setup.base_seed, worker_id)
        torch_worker._worker_info = torch_worker.WorkerInfo(
            id=worker_id, num_workers=setup.num_workers, seed=seed, dataset=setup.dataset
        )
        worker = _Worker(setup, worker_id)
        if setup.worker_init_fn is not None:
            setup.worker_init_fn(worker_id)
    except Exception as exc:
        init_error = _Error.capture(exc, "in worker_init_fn" if worker is not None else "starting the worker")
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        task = pickle.loads(message)
        if task is None:
            return
        task_id, op, payload = task
        result: object
        if init_error is not None:
            result = init_error  # every task of a worker that failed to start fails with that error
        else:
            assert worker is not None
            try:
                result = worker.run(op, payload)
            except _Failure as failure:
                result = _Error.capture(failure.error, failure.where)
            except Exception as exc:
                result = _Error.capture(exc, f"running {op!r}")
        try:
            _send_result(conn, sock, task_id, result)
        except OSError:  # the main process is gone
            return
        del result, task, payload


# ----------------------------------------------------------------------------------------------- parent process
def _retrieve(future: asyncio.Future[Any]) -> None:
    # A task whose batch was abandoned may still fail later; that is not an unretrieved error worth logging.
    if not future.cancelled():
        future.exception()


@dataclass(slots=True)
class _Pending:
    worker_id: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    what: str  # the samples it holds, for the error when the worker dies


class WorkerPool:
    """``num_workers`` processes with a pipe each, and one reader thread resolving the tasks' futures.

    ``start()`` and ``close()`` block (process start and join): call them off the event loop. ``submit`` is for the
    event loop's side; its send runs in a thread. Idempotent ``close()``; safe from any thread but the reader.
    """

    def __init__(
        self, setup: WorkerSetup, num_workers: int, context: multiprocessing.context.BaseContext | None
    ) -> None:
        self.setup = setup
        self.num_workers = num_workers
        # None: the default, decided when the workers start (start_by_fork_if_safe, else default_context()).
        self._context = context
        self._lock = threading.Lock()  # start/close/pending
        self._send_queues: list[queue.SimpleQueue[bytes | None]] = [queue.SimpleQueue() for _ in range(num_workers)]
        self._senders: list[threading.Thread] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._socks: list[socket.socket] = []  # the same sockets as _conns, for receiving descriptors
        self._pending: dict[int, _Pending] = {}
        self._in_flight = [0] * num_workers  # tasks sent and not answered, awaited or not
        self._ids = itertools.count()
        self._dead: dict[int, WorkerDiedError] = {}
        self._reader: threading.Thread | None = None
        self._wake_r: multiprocessing.connection.Connection | None = None
        self._wake_w: multiprocessing.connection.Connection | None = None
        self._started = False
        self._closed = False
        self._froze_parent = False  # this pool's fork froze the parent's heap (see _freeze_parent)

    @property
    def kind(self) -> PoolKind:
        return self.setup.kind

    @property
    def started(self) -> bool:
        return self._started

    @property
    def broken(self) -> bool:
        """A worker has died: the pool cannot serve another epoch."""
        return bool(self._dead)

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self._processes]

    @property
    def start_method(self) -> str | None:
        """The start method the workers were (or will be) started with; None while the default is undecided."""
        return self._context.get_start_method() if self._context is not None else None

    def start_by_fork_if_safe(self) -> bool:
        """With no start method given, fork the workers now, in the calling thread, when that is safe.

        The consumer's iterator calls this before the pipeline's threads exist. When :func:`fork_is_safe` holds,
        forking is what torch does, and it is the cheapest start: workers share the parent's pages (torch's
        libraries and heap) and begin in milliseconds, with the dataset copied on write instead of pickled. Otherwise
        (the user's own threads, an ``async for`` in a loop that must not block, object-store clients) the workers
        are started later by ``start()`` with :func:`default_context`, off the event loop.
        """
        if self._started or self._context is not None or not fork_is_safe():
            return False
        self._context = multiprocessing.get_context("fork")
        self.start()
        return True

    def start(self) -> None:
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            if self._context is None:
                self._context = default_context()
            elif self._context.get_start_method() == "forkserver":
                # multiprocessing_context="forkserver" given by the user: the same preload as our default (it only
                # takes effect if the server is not running yet).
                self._context.set_forkserver_preload(_FORKSERVER_PRELOAD)
            # A forked worker gets the setup itself (no pickling, as torch's fork workers); others its pickle.
            forked = self._context.get_start_method() == "fork"
            setup_arg = self.setup if forked else pickle.dumps(self.setup, pickle.HIGHEST_PROTOCOL)
            if forked:
                self._froze_parent = _freeze_parent()
            try:
                for worker_id in range(self.num_workers):
                    ours, theirs = self._context.Pipe(duplex=True)
                    process = self._context.Process(  # type: ignore[attr-defined]
                        target=_worker_main,
                        args=(worker_id, theirs, setup_arg),
                        name=f"aloader-worker-{worker_id}",
                        daemon=True,  # multiprocessing terminates daemonic children at interpreter exit
                    )
                    self._conns.append(ours)
                    self._socks.append(socket.socket(fileno=os.dup(ours.fileno())))
                    try:
                        process.start()
                    finally:
                        theirs.close()
                    self._processes.append(process)
            except BaseException:
                self._shutdown_locked()
                raise
            self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
            self._reader = threading.Thread(target=self._read, name="aloader-pool-reader", daemon=True)
            self._reader.start()
            for worker_id in range(self.num_workers):
                sender = threading.Thread(
                    target=self._send, args=(worker_id,), name=f"aloader-pool-sender-{worker_id}", daemon=True
                )
                self._senders.append(sender)
                sender.start()

    # ------------------------------------------------------------------------------------------------ tasks
    def submit(self, worker_id: int, op: str, payload: Any, what: str) -> asyncio.Future[Any]:
        """Queue a task for ``worker_id`` (never blocks); its future resolves with the result or raises.

        Tasks reach a worker in the order they are submitted (one sender thread per worker): with the same seeds,
        the same batches in the same order give the same random draws as in torch's workers.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(_retrieve)
        with self._lock:
            task_id = next(self._ids)
            dead = self._dead.get(worker_id)
            if dead is None and self._closed:
                dead = WorkerDiedError("the DataLoader's worker pool is closed")
            if dead is None:
                self._pending[task_id] = _Pending(worker_id, loop, future, what)
                self._in_flight[worker_id] += 1
                self._send_queues[worker_id].put(pickle.dumps((task_id, op, payload), pickle.HIGHEST_PROTOCOL))
        if dead is not None:
            future.set_exception(dead.again(what))
        return future

    def _send(self, worker_id: int) -> None:
        conn, work = self._conns[worker_id], self._send_queues[worker_id]
        while True:
            message = work.get()
            # None: the pool is closing. Tell the worker to exit rather than rely on end-of-file: with "fork", the
            # other workers inherited this socket's parent end, so closing ours alone does not end the stream.
            try:
                conn.send_bytes(message if message is not None else _EXIT)
            except (OSError, ValueError):  # the worker died (the reader fails its tasks) or was terminated
                pass
            if message is None:
                return
            del message

    def _read(self) -> None:
        assert self._wake_r is not None
        conns = {conn: worker_id for worker_id, conn in enumerate(self._conns)}
        sentinels = {p.sentinel: worker_id for worker_id, p in enumerate(self._processes)}
        waiting: list[Any] = [self._wake_r, *conns, *sentinels]
        while True:
            ready = multiprocessing.connection.wait(waiting)
            if self._wake_r in ready:
                return
            for obj in ready:
                if obj in conns:
                    self._drain(obj, conns[obj])
            for obj in ready:
                if obj in sentinels:
                    worker_id = sentinels[obj]
                    conn = self._conns[worker_id]
                    if conn in conns:
                        self._drain(conn, worker_id)  # results it sent before dying still count
                    self._worker_died(worker_id)
                    waiting.remove(obj)
                    if conn in waiting:
                        waiting.remove(conn)
                    conns.pop(conn, None)

    def _drain(self, conn: multiprocessing.connection.Connection, worker_id: int) -> None:
        sock = self._socks[worker_id]
        try:
            while conn.poll():
                data = conn.recv_bytes()
                task_id, count = _HEADER.unpack_from(data)
                fds: list[int] = []
                try:
                    while len(fds) < count:
                        fds += recvfds(sock, min(_FDS_PER_MESSAGE, count - len(fds)))
                    self._deliver(task_id, memoryview(data)[_HEADER.size :], fds, worker_id)
                finally:
                    for fd in fds:
                        os.close(fd)
        except (EOFError, OSError, RuntimeError):
            pass  # the worker is gone mid-message: its sentinel fails the task

    def _deliver(self, task_id: int, data: memoryview, fds: list[int], worker_id: int) -> None:
        with self._lock:
            pending = self._pending.pop(task_id, None)
            self._in_flight[worker_id] -= 1
        if pending is None:
            return  # its batch was abandoned (break, cancellation): the shared memory goes with the descriptors
        ok = True
        _received.fds, _received.storages = fds, {}
        try:
            value = pickle.loads(data)
        except Exception as exc:
            ok, value = False, exc
        finally:
            _received.fds, _received.storages = [], {}
        if isinstance(value, _Error):
            ok, value = False, value.rebuild(worker_id, self._processes[worker_id].pid)
        try:
            pending.loop.call_soon_threadsafe(_deliver, pending.future, ok, value)
        except RuntimeError:  # the loop closed: nobody waits
            pass

    def _worker_died(self, worker_id: int) -> None:
        process = self._processes[worker_id]
        # The sentinel of a forked worker is a pipe that reads end-of-file as the process exits, a moment before the
        # kernel makes its exit status available: wait that moment out (bounded, should it live on without it).
        process.join(_EXIT_GRACE_SECONDS)
        code = process.exitcode
        if code is None:
            how = "closed its connection"
        elif code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        with self._lock:
            if self._closed:
                return
            held = {tid: p for tid, p in self._pending.items() if p.worker_id == worker_id}
            for task_id in held:
                del self._pending[task_id]
            error = WorkerDiedError(
                f"DataLoader worker {worker_id} (pid {process.pid}) {how} unexpectedly",
                worker_id=worker_id,
                pid=process.pid,
                exitcode=code,
            )
            self._dead[worker_id] = error
        for pending in held.values():
            try:
                pending.loop.call_soon_threadsafe(_deliver, pending.future, False, error.again(pending.what))
            except RuntimeError:
                pass

    # ------------------------------------------------------------------------------------------------ close
    def close(self) -> None:
        """Stop the reader and every worker, and wait until all have exited. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shutdown_locked()

    def _shutdown_locked(self) -> None:
        self._closed = True
        if self._wake_w is not None:
            self._wake_w.send_bytes(b"")
        if self._reader is not None and self._reader is not threading.current_thread():
            # Released while joining: the reader may need the lock to finish delivering.
            self._lock.release()
            try:
                self._reader.join()
            finally:
                self._lock.acquire()
        for work in self._send_queues:
            work.put(None)
        for worker_id, process in enumerate(self._processes):
            if self._in_flight[worker_id] > 0:
                process.terminate()  # running user code (maybe for an abandoned batch): do not wait for it
        for sender in self._senders:
            if sender is not threading.current_thread():  # a garbage collection may run close() anywhere
                sender.join()  # a send blocked on a full pipe ends: the worker reads, or was terminated just now
        held = list(self._pending.values())
        self._pending.clear()
        closed = WorkerDiedError("the DataLoader's worker pool was closed")
        for pending in held:  # a persistent pool closed during an epoch: nobody may wait forever
            try:
                pending.loop.call_soon_threadsafe(_deliver, pending.future, False, closed.again(pending.what))
            except RuntimeError:
                pass
        for conn in self._conns:
            conn.close()
        for sock in self._socks:
            sock.close()
        for process in self._processes:
            process.join(_EXIT_GRACE_SECONDS)
            if process.exitcode is None:
                process.kill()
                process.join()
            process.close()
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()
        if self._froze_parent:
            self._froze_parent = False
            _thaw_parent()

    def __del__(self) -> None:
        if getattr(self, "_started", False) and not self._closed:
            try:
                self.close()
            except Exception:
                pass
