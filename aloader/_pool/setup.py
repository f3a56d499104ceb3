"""How worker processes start: the start method, the parent's heap around a fork, and what each worker gets.

With no ``multiprocessing_context``, workers are forked when their loader's iterator starts, as torch does, whatever
other threads the program runs (:func:`fork_is_safe`); aloader's own threads are kept out of user code while it
forks (``_threads.FORK_GATE``), and forks asked for off the main thread are made by one long-lived thread
(:func:`fork_from_lasting_thread`). Otherwise (an object-store client already running in this process, no ``fork`` on
the platform) the forkserver starts the workers, with torch preloaded once (:func:`default_context`).
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import multiprocessing.context
import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aloader._core.plan import PoolKind

__all__ = [
    "FORKSERVER_PRELOAD",
    "WorkerSetup",
    "default_context",
    "fork_from_lasting_thread",
    "fork_is_safe",
    "freeze_parent",
    "import_for_workers",
    "thaw_parent",
]

T = TypeVar("T")


def default_context() -> multiprocessing.context.BaseContext:
    """``forkserver``: safe with the loader's threads (a fork would copy locks held by them); torch is preloaded
    in the server once, so each worker starts in tens of milliseconds instead of re-importing torch."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows, macOS without it: spawn
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return context


# Imported once by the forkserver when it starts. Without this, multiprocessing preloads only ``__main__``, and every
# pool then took about 4 s to start on our 2-core machine (measured), not just the first.
FORKSERVER_PRELOAD: Final = ["torch", "numpy", "numpy.random", "aloader._pool.worker"]


def import_for_workers() -> None:
    """Before a fork: import what every worker imports as it starts, so each fork inherits it. A worker seeds numpy's
    global generator as torch's do, and ``numpy.random`` is imported lazily (numpy 2): it cost every worker ~8 ms at
    every pool's start (measured on our 2-core machine), and once in the parent costs that once per process."""
    import numpy.random  # noqa: F401


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


def freeze_parent() -> bool:
    """Freeze the parent's heap before forking workers; False if the program had frozen it itself."""
    global _frozen_pools
    with _frozen_lock:
        if _frozen_pools == 0 and gc.get_freeze_count() > 0:
            return False
        gc.freeze()
        _frozen_pools += 1
        return True


def thaw_parent() -> None:
    """A pool that froze the parent's heap closed: unfreeze it once no such pool is left."""
    global _frozen_pools
    with _frozen_lock:
        _frozen_pools -= 1
        if _frozen_pools == 0:
            gc.unfreeze()


def fork_is_safe() -> bool:
    """Whether the default start may fork now, as torch's DataLoader does at ``iter()``.

    True on Linux unless an object-store client has started its runtime in this process (tokio's threads are
    invisible to ``threading`` and their state does not survive a fork). Other threads of the program do not
    prevent it, as they do not for torch: the user's own threads are the user's to keep fork-safe
    (``docs/process-pool.md``), and aloader's are held out of user code during the fork (``_threads.FORK_GATE``).
    """
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return False
    store = sys.modules.get("aloader.storage._store")  # not imported: nothing has read from an object store
    return store is None or not store.object_store_started()


class _Forker:
    """One daemon thread, started at the first fork asked for off the main thread, that makes those forks.

    A worker asks the kernel to kill it when its parent ends (``PR_SET_PDEATHSIG``, see ``worker.py``), and for the
    kernel the parent is the *thread* that forked it. Forked from a short-lived thread (the pipeline's threads, which
    end with each epoch), persistent workers were killed at the end of the first epoch. The main thread and this one
    live as long as the process; the caller waits for the fork's outcome on a future.
    """

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)  # a worker that forks gets a forker of its own

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is threading.main_thread():
            return fn()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="aloader-forker", daemon=True)
                self._thread.start()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._work.put((fn, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            fn, done = self._work.get()
            try:
                done.set_result(fn())
            except BaseException as exc:  # the caller raises it
                done.set_exception(exc)
            del fn, done


_forker = _Forker()


def fork_from_lasting_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` (which forks) in a thread that lives as long as the process: the main thread if called there,
    else aloader's forker thread."""
    return _forker.run(fn)


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
    # Samples each worker fetches at once (its core's fetch slots); 1: one task at a time, as torch's workers.
    concurrency: int = 1
    # torch.multiprocessing's sharing strategy in the main process: workers share tensors the same way.
    sharing_strategy: str = "file_descriptor"
    # A resumed state's per-worker states: worker i's [dataset state, iterator state] (or None), loaded as it starts
    # (see aloader._worker_state). None: every worker starts from the dataset as it is.
    worker_states: tuple[Any, ...] | None = None
