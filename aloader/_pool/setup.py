"""How worker processes start: the start method, the parent's heap around a fork, and what each worker gets.

With no ``multiprocessing_context``, the sync driver forks at ``iter()`` when that is safe (:func:`fork_is_safe`:
the consumer is the process's only thread), as torch does; otherwise the forkserver starts the workers, with torch
preloaded once (:func:`default_context`).
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.context
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aloader._core.plan import PoolKind

__all__ = ["FORKSERVER_PRELOAD", "WorkerSetup", "default_context", "fork_is_safe", "freeze_parent", "thaw_parent"]


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
FORKSERVER_PRELOAD: Final = ["torch", "numpy", "aloader._pool.worker"]


# The parent's side of sharing memory with forked workers. A forked worker shares the parent's pages until either
# process writes to one. Workers freeze what they inherit (see _worker_main); the parent freezes its heap too, right
# before the fork, as the gc module's documentation advises: collections in the parent during the epoch then never
# walk the objects the workers share, whose headers they would write. Measured with the pool benchmark: without it,
# depending on where the parent's collections fell, its PSS rose by ~23 MiB and each worker's by ~6 MiB (peak
# memory of all processes 1.14x torch's instead of 0.97x). The heap is unfrozen when the last such pool closes, so
# objects of the program that became garbage meanwhile are collected then. A program that froze its heap itself is
# left alone (its own unfreeze stays its own).
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
    # Samples each worker fetches at once (its core's fetch slots); 1: one task at a time, as torch's workers.
    concurrency: int = 1
    # torch.multiprocessing's sharing strategy in the main process: workers share tensors the same way.
    sharing_strategy: str = "file_descriptor"
