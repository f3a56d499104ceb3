"""``aloader.DataLoader``: torch's DataLoader, driven by aloader's async pipeline.

It subclasses ``torch.utils.data.DataLoader`` so that everything torch defines stays torch's own: the signature,
defaults and positional order, every argument check with its exact message, ``len()``, the attributes users and
frameworks read (``loader.dataset``, ``loader.batch_sampler``, ...), and ``isinstance(loader, torch DataLoader)``.
What changes is iteration: ``__iter__`` and ``__aiter__`` run the async core (``_core``), and two keyword-only
options are added, ``concurrency`` and ``transform``.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.multiprocessing
import torch.utils.data
from torch.utils.data import BatchSampler, IterableDataset
from torch.utils.data.dataloader import _DatasetKind

from aloader._core.pipeline import Pipeline
from aloader._core.plan import DatasetKind, Plan, Speed, pool_kind, window_for
from aloader._core.prelude import learnt_speed
from aloader._failures import check_max_failures
from aloader._iterators import AsyncLoaderIterator, LoaderIterator
from aloader._state import BatchIterator, LoaderState, is_stock_batch_sampler
from aloader._stats import Recorder
from aloader.stats import LoaderStats

if TYPE_CHECKING:
    from aloader._pool import WorkerPool

__all__ = ["DEFAULT_CONCURRENCY", "DataLoader"]

T_co = TypeVar("T_co", covariant=True)

DEFAULT_CONCURRENCY = 64
"""Samples fetched at once when ``concurrency`` is not given: enough to hide ~30 ms of storage latency behind
~2000 samples/s, while a fast in-memory dataset still uses only a couple of threads (see ``_fetch_sync``)."""


def _is_async_iterable(obj: object) -> bool:
    return callable(getattr(type(obj), "__aiter__", None))


class _AsyncIterableStandIn(IterableDataset[Any]):
    """Shown to torch's ``__init__`` in place of a plain async iterable, so torch applies its iterable rules."""

    def __init__(self, wrapped: object) -> None:
        self.wrapped = wrapped

    def __iter__(self) -> Iterator[Any]:
        raise TypeError(f"{self.wrapped!r} is async-only: iterate the loader with `async for` or `for`")


class DataLoader(torch.utils.data.DataLoader[T_co]):
    """Drop-in for ``torch.utils.data.DataLoader``: same arguments, outputs and errors, plus ``async for``.

    Extra keyword-only options:

    - ``concurrency``: the most samples being fetched at once (default 64): tasks for ``async def __getitem__``,
      threads for a sync ``__getitem__``. If in doubt, leave it: fast datasets use only the threads they need.
    - ``transform``: a callable applied to each sample after it is fetched and before ``collate_fn``; sync callables
      run in a thread (in a worker process when ``num_workers > 0``), ``async def`` ones on the event loop.
    - ``max_failures``: skip samples whose fetch or transform raises, up to a count (``int``) or a share of the
      samples seen (``float`` in (0, 1)); each skip is logged on the ``aloader`` logger and counted in
      ``stats()``, and ``FailureBudgetExceeded`` is raised once more fail. Default None: no skipping, as torch.
    - ``progress``: show a tqdm progress bar over batches (``len(loader)`` as its total when known).
    - ``snapshot_every_n_steps``: torchdata ``StatefulDataLoader``'s option, accepted for code written for it; the
      state is exact at every step whatever its value (see ``docs/resume.md``).

    ``stats()`` returns an immutable snapshot of the current (or last) iterator's per-stage counters. See
    ``docs/reliability.md``.

    With ``num_workers > 0``, a sync map-style dataset is fetched, transformed and collated in worker processes
    (as in torch, with torch's worker seeding, ``worker_init_fn`` and ``get_worker_info()``), each worker iterates its
    own copy of an iterable dataset, and tensors come back through shared memory. With no ``multiprocessing_context``,
    the workers are forked when the iterator starts, as torch's are, with aloader's own threads held out of user code
    meanwhile; the forkserver starts them after object-store reads in the process. With
    ``persistent_workers=True`` the processes live until ``close()`` (or the loader's garbage collection, or
    interpreter exit). See ``docs/process-pool.md``.

    Datasets may be torch map-style or iterable datasets as they are, classes whose ``__getitem__`` or
    ``__getitems__`` is ``async def``, or objects with ``__aiter__``. ``sampler`` and ``batch_sampler`` may also be
    async iterables.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: torch.utils.data.Sampler[Any] | Iterable[Any] | AsyncIterable[Any] | None = None,
        batch_sampler: torch.utils.data.Sampler[list[Any]]
        | Iterable[list[Any]]
        | AsyncIterable[list[Any]]
        | None = None,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        concurrency: int | None = None,
        transform: Callable[[Any], Any] | None = None,
        max_failures: int | float | None = None,
        progress: bool = False,
        snapshot_every_n_steps: int | None = 1,
    ) -> None:
        # A plain async iterable has no __getitem__: torch would take it for a map-style dataset. Show torch an
        # IterableDataset stand-in so its iterable-dataset checks and messages apply, then keep the real object.
        stand_in = (
            _AsyncIterableStandIn(dataset)
            if _is_async_iterable(dataset)
            and not isinstance(dataset, IterableDataset)
            and not hasattr(dataset, "__getitem__")
            else None
        )
        super().__init__(
            dataset if stand_in is None else stand_in,
            batch_size,
            shuffle,
            sampler,  # type: ignore[arg-type]
            batch_sampler,  # type: ignore[arg-type]
            num_workers,
            collate_fn,
            pin_memory,
            drop_last,
            timeout,
            worker_init_fn,
            multiprocessing_context,
            generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
        )
        if stand_in is not None:
            object.__setattr__(self, "dataset", dataset)  # torch forbids setting it after __init__; we are __init__
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise ValueError(
                f"concurrency option should be a positive integer or None, but got concurrency={concurrency!r}"
            )
        if transform is not None and not callable(transform):
            raise TypeError(f"transform option should be a callable or None, but got transform={transform!r}")
        self.max_failures = check_max_failures(max_failures)
        if not isinstance(progress, bool):
            raise TypeError(f"progress option should be a bool, but got progress={progress!r}")
        self.progress = progress
        if snapshot_every_n_steps is not None and (
            isinstance(snapshot_every_n_steps, bool) or not isinstance(snapshot_every_n_steps, int)
        ):
            raise TypeError(
                "snapshot_every_n_steps option should be an integer or None, "
                f"but got snapshot_every_n_steps={snapshot_every_n_steps!r}"
            )
        # torchdata's StatefulDataLoader option, accepted so code written for it runs unchanged. There it sets how often
        # worker processes send their state (a resume replays the steps since the last one); aloader's workers send
        # it with every batch, so the state is exact at every step whatever the value (see docs/resume.md).
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.concurrency: int = DEFAULT_CONCURRENCY if concurrency is None else concurrency
        self.transform = transform
        self._stats: Recorder | None = None  # the current (or last) iterator's counters
        self._persistent_pool: WorkerPool | None = None  # persistent_workers: the pool that outlives epochs
        self._pool_finalizer: weakref.finalize[Any, Any] | None = None
        self._resume = LoaderState()
        self._speed = Speed()  # how fast sync fetches have been, carried across epochs (see Pipeline._lane_units)

    # ------------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Shut down the worker processes kept by ``persistent_workers=True`` and wait for them to exit.

        Without it they are shut down when the loader is garbage collected, or at interpreter exit. Idempotent; the
        loader stays usable (a later epoch starts a new pool). Without persistent workers there is nothing to do:
        each iterator's pool ends with it.
        """
        pool, self._persistent_pool = self._persistent_pool, None
        finalizer, self._pool_finalizer = self._pool_finalizer, None
        if finalizer is not None:
            finalizer.detach()
        if pool is not None:
            pool.close()

    def __enter__(self) -> DataLoader[T_co]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Where iteration is, to resume it later with ``load_state_dict`` (as torchdata's StatefulDataLoader).

        Small and JSON-serialisable, no sample data: the epoch, the batches the consumer has received in it (batches
        in flight or prefetched are not counted: they are produced again after a resume, neither lost nor
        repeated), the random generators' states the epoch's order is recomputed from, and the ``state_dict()`` of a
        sampler or dataset that has one. Take it at any point, from either driver. See ``docs/resume.md``.
        """
        return self._resume.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``iter()`` continue where ``state`` (from ``state_dict()``) was taken: the rest of that
        epoch's batches, in order, then the following epochs as the uninterrupted run would have gone on.
        ``concurrency`` and ``prefetch_factor`` may differ from the saving loader's, and so may ``num_workers`` unless
        the state holds per-worker dataset states (a dataset with ``state_dict()`` iterated by worker processes)."""
        self._resume.load_state_dict(self, state)
        if state and state.get("workers") is not None and self._persistent_pool is not None:
            # Persistent workers hold their own copies' states: new ones start from the loaded per-worker states.
            self.close()

    # ------------------------------------------------------------------------------------------------ iteration
    def __iter__(self) -> LoaderIterator:  # type: ignore[override]
        """Iterate in plain (sync) code: the pipeline runs on a background event loop thread."""
        iterator = LoaderIterator(*self._start())
        iterator._cursor = self._resume.cursor
        iterator._num_workers = self.num_workers
        return iterator

    def __aiter__(self) -> AsyncLoaderIterator:
        """Iterate with ``async for`` inside a running event loop: the pipeline runs as a task of that loop."""
        iterator = AsyncLoaderIterator(*self._start())
        iterator._cursor = self._resume.cursor
        iterator._num_workers = self.num_workers
        return iterator

    def _start(self) -> tuple[Pipeline, int, Any, int | None]:
        if self.num_workers > 0 and not (self.persistent_workers and self._persistent_pool is not None):
            self.check_worker_number_rationality()  # torch warns at each new iterator with workers, as here
        with self._resume.epoch_scope(self):
            plan = self._plan()
        depth = 2 if self.num_workers == 0 else max(1, (self.prefetch_factor or 2) * self.num_workers)
        if plan.workers is not None:
            plan = dataclasses.replace(plan, window=self._workers_window(plan.workers.kind, depth))
        reported = self._IterableDataset_len_called if self._dataset_kind == _DatasetKind.Iterable else None
        pipeline = Pipeline(plan)
        self._stats = pipeline.stats
        return pipeline, depth, self._index_sampler, reported

    def _workers_window(self, kind: str, depth: int) -> int:
        """Units in flight with worker processes: torch's ``prefetch_factor`` per worker, or enough more to keep
        ``concurrency`` samples fetching in every worker (each runs the core, see ``aloader._pool.worker``)."""
        if self.concurrency == 1 or kind == "items":
            return depth  # torch's bound, and with concurrency=1 torch's exact pacing
        batch_size = self._unit_size()
        return max(depth, self.num_workers * window_for(self.concurrency, batch_size))

    def _unit_size(self) -> int | None:
        """Samples per unit: the batch size (or a user batch_sampler's, if it tells), 1 without batching."""
        if not self._auto_collation:
            return 1
        batch_size = self.batch_size
        if batch_size is None:  # a user batch_sampler: its size, if it tells
            batch_size = getattr(self.batch_sampler, "batch_size", None)
            batch_size = batch_size if isinstance(batch_size, int) and batch_size > 0 else None
        return batch_size

    def stats(self) -> LoaderStats:
        """An immutable snapshot of the current iterator's per-stage counters, or of the last one once it ended
        (all zero before the first). See :mod:`aloader.stats`."""
        recorder = self._stats if self._stats is not None else Recorder()
        return recorder.snapshot()

    def _plan(self) -> Plan:
        """Capture one epoch, making torch's draws in torch's order so orders match bit for bit.

        torch's iterator calls ``iter(index_sampler)`` (lazy: a sampler draws on its first ``next``), then draws a
        64-bit base seed from ``generator`` (or the global RNG), and only then does the sampler draw its
        permutation. Here the first ``next`` happens in the pipeline, after this method returns.
        """
        pin_memory_device = self._pin_memory_device()
        kind: DatasetKind
        batch_async_indices: tuple[int, bool] | None = None
        source: Iterator[Any] | AsyncIterator[Any]
        if self._dataset_kind == _DatasetKind.Map:
            kind = "map"
            index_sampler: Any = self._index_sampler
            inner: Any = getattr(index_sampler, "sampler", None)
            if (
                isinstance(index_sampler, BatchSampler)
                and type(index_sampler).__iter__ is BatchSampler.__iter__
                and _is_async_iterable(inner)
            ):
                # torch's BatchSampler cannot iterate an async sampler; batch its indices ourselves.
                source = aiter(inner)
                batch_async_indices = (index_sampler.batch_size, index_sampler.drop_last)
            elif _is_async_iterable(index_sampler):
                source = aiter(index_sampler)
            elif is_stock_batch_sampler(index_sampler):
                # torch's batches, with the sampler's iterator in reach for its state (see BatchIterator).
                source = BatchIterator(index_sampler.sampler, index_sampler.batch_size, index_sampler.drop_last)
            else:
                source = iter(index_sampler)
        pool = self._persistent_pool
        if pool is not None and pool.broken:
            self.close()
            pool = None
        if pool is None:
            # torch draws a base seed per iterator; with persistent workers it keeps one iterator (and its workers'
            # seeds) for the loader's life, so later epochs draw nothing.
            self._base_seed = self._resume.base_seed(
                lambda: int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
            )
        else:
            self._resume.no_base_seed()
        dataset_kind: DatasetKind = "map" if self._dataset_kind == _DatasetKind.Map else "iterable"
        if _is_async_iterable(self.dataset) and self._dataset_kind == _DatasetKind.Iterable:
            dataset_kind = "async-iterable"
        worker_kind = pool_kind(dataset_kind, self.dataset, self.transform) if self.num_workers > 0 else None
        owns_workers = False
        # Each worker's dataset state, recorded per batch, and a resumed state's loaded into a new pool's workers.
        ledger, first_worker, worker_states = self._resume.ledger(self, worker_kind, reused_pool=pool is not None)
        if worker_kind is not None and pool is None:
            # Imported here: a loader without workers never needs the pool's modules (import aloader stays lighter).
            from aloader._pool import WorkerPool, WorkerSetup

            pool = WorkerPool(
                WorkerSetup(
                    kind=worker_kind,
                    # "items": samples come from the main process; an async dataset (maybe holding clients that
                    # cannot be pickled) is not copied into the workers.
                    dataset=self.dataset if worker_kind != "items" else None,
                    auto_collation=self._auto_collation,
                    batch_size=self.batch_size,
                    drop_last=self.drop_last,
                    collate_fn=self.collate_fn,
                    transform=self.transform,
                    worker_init_fn=self.worker_init_fn,
                    num_workers=self.num_workers,
                    base_seed=self._base_seed,
                    skip_failures=self.max_failures is not None,
                    concurrency=self.concurrency,
                    sharing_strategy=torch.multiprocessing.get_sharing_strategy(),  # type: ignore[no-untyped-call]
                    worker_states=worker_states,
                ),
                self.num_workers,
                self.multiprocessing_context,
            )
            if self.persistent_workers:
                self._persistent_pool = pool
                self._pool_finalizer = weakref.finalize(self, pool.close)
            else:
                owns_workers = True
        if worker_kind == "iterable":
            kind, source = "iterable", iter(())  # each worker iterates its own copy; the main process does not
        elif self._dataset_kind == _DatasetKind.Iterable:
            # torch creates the dataset's iterator when it creates its own, after the base seed.
            dataset: Any = self.dataset
            if _is_async_iterable(dataset):
                kind, source = "async-iterable", aiter(dataset)
            else:
                kind, source = "iterable", iter(dataset)
        source = self._resume.position(self, kind, source, batch_async_indices is not None, worker_kind == "iterable")
        return Plan(
            kind=kind,
            dataset=self.dataset,
            source=source,
            auto_collation=self._auto_collation,
            batch_async_indices=batch_async_indices,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            collate_fn=self.collate_fn,
            transform=self.transform,
            concurrency=self.concurrency,
            window=window_for(self.concurrency, self._unit_size()),
            timeout=self.timeout,  # as given: the error text shows it as torch does (5, not 5.0)
            in_order=self.in_order,
            pin_memory_device=pin_memory_device,
            workers=pool if worker_kind is not None else None,
            owns_workers=owns_workers,
            max_failures=self.max_failures,
            progress=self.progress,
            speed=self._epoch_speed(),
            ledger=ledger if worker_kind is not None else None,
            first_worker=first_worker,
        )

    def _epoch_speed(self) -> Speed:
        """How fast this epoch's sync fetches are expected to be: what the loader's last epoch learnt; for a new
        loader without workers, what the latest loader over the same dataset learnt (see ``_core/prelude.py``)."""
        if self.num_workers == 0:
            self._speed = learnt_speed(self.dataset, self._unit_size(), self._speed)
        return self._speed

    def _pin_memory_device(self) -> str | None:
        """The device to pin batches for, or None; warns exactly as torch's iterator does."""
        if self.pin_memory and self.pin_memory_device:
            warnings.warn(
                "pin_memory_device is deprecated, the current accelerator will be used as the device,"
                f"ignore pin_memory_device='{self.pin_memory_device}'.",
                stacklevel=4,
            )
        if not self.pin_memory:
            return None
        if not torch.accelerator.is_available():
            warnings.warn(
                "'pin_memory' argument is set as true but no accelerator is found, "
                "then device pinned memory won't be used.",
                stacklevel=4,
            )
            return None
        accelerator = torch.accelerator.current_accelerator()
        if accelerator is None:
            return None
        if accelerator.type == "mps":
            warnings.warn(
                "'pin_memory' argument is set as true but not supported on MPS now, "
                "device pinned memory won't be used.",
                stacklevel=4,
            )
            return None
        return accelerator.type
