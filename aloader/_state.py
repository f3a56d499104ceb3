"""Resumable iteration: what ``DataLoader.state_dict()`` saves and how ``load_state_dict()`` replays it.

The state is *where the consumer is*, never data: the epoch, the number of batches the consumer has received in it
(``Cursor``), and what is needed to recompute the epoch's order without fetching anything:

- the state of every random generator the epoch draws from, taken *before* its first draw (``_plan()`` calls
  ``iter(sampler)``, draws the base seed, then the sampler draws its permutation on its first ``next``): restoring
  it and making the same draws recomputes the same permutation and the same worker seeds;
- the ``state_dict()`` of a sampler, batch sampler or dataset that has one (delegation);
- for an iterable dataset with a ``state_dict()``, its state right after the items of the consumer's last batch
  were pulled (``_SnapshotSource`` takes one per batch, so prefetched items are not counted).

On resume, the first ``k`` units of the index source are skipped *without fetching them*: ``k`` index lists are
pulled from the (batch) sampler, or ``k * batch_size`` items from an iterable dataset that has no state of its own
(read and dropped, never held). Batches in flight or prefetched at the snapshot are not counted, so they are neither
lost nor repeated. Nothing here depends on ``concurrency``, ``num_workers`` or ``prefetch_factor``.

With worker processes, a dataset (or an iterable's iterator) with state is saved per worker: each worker's copy's
state after the last batch the consumer received from it (``workers``, see ``_worker_state``), loaded into that
worker's copy on resume. The one case that cannot skip at the source is an iterable dataset *without* state iterated
by worker processes (each has its own copy): there the consumer drops the first ``k`` batches of the re-run epoch
(``Cursor.drop``).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Final, Protocol

import torch
from torch.utils.data import BatchSampler

from aloader._encoding import decode, decode_rng, encode, encode_rng
from aloader._worker_state import WorkerLedger, check_saved, has_state, state_of
from aloader.samplers import DistributedSampler


class _Loader(Protocol):
    """What the state reads of a DataLoader (a protocol: this module sits below ``loader.py``)."""

    @property
    def dataset(self) -> Any: ...
    @property
    def sampler(self) -> Any: ...
    @property
    def batch_sampler(self) -> Any: ...
    @property
    def batch_size(self) -> int | None: ...
    @property
    def generator(self) -> torch.Generator | None: ...
    @property
    def _auto_collation(self) -> bool: ...
    @property
    def _dataset_kind(self) -> Any: ...
    @property
    def _base_seed(self) -> int: ...
    @property
    def _persistent_pool(self) -> _Pool | None: ...
    @property
    def num_workers(self) -> int: ...


class _Pool(Protocol):
    @property
    def broken(self) -> bool: ...


__all__ = ["STATE_FORMAT", "BatchIterator", "Cursor", "LoaderState", "is_stock_batch_sampler"]

STATE_FORMAT: Final = 3
"""Bumped when the layout of the state changes. Format 1 (aloader 0.1.0.dev0 before the StatefulDataLoader contract)
is format 2 without ``position``, ``drain`` and ``dataset_iter``; format 2 is format 3 without ``workers`` (the
per-worker dataset states). Both load with the same meaning; another format is refused with a clear error (an
aloader that knows only format 2 refuses a format 3 state rather than drop its worker states)."""

_LOADABLE_FORMATS: Final = (1, 2, 3)


def _load_into(obj: Any, state: Any) -> None:
    if state is not None and has_state(obj):
        obj.load_state_dict(decode(state))


class Cursor:
    """The consumer's position in one epoch: outcomes (batches or failures) received, and whether it ended.

    Counted by the iterator when it hands an item to the consumer, so a batch still in the pipeline (in flight or
    prefetched) is not counted: it is produced again after a resume.
    """

    __slots__ = ("_constant", "_lock", "_positions", "_snapshots", "drop", "ended", "ledger", "taken")

    def __init__(self, taken: int = 0, drop: int = 0) -> None:
        self.taken = taken  # outcomes of this epoch received by the consumer (including before a resume)
        self.drop = drop  # outcomes of a re-run epoch to drop before counting (see the module docstring)
        self.ended = False
        self._lock = threading.Lock()
        self._snapshots: dict[int, Any] = {}  # iterable dataset's state after the items of unit k were pulled
        self._positions: dict[int, Any] = {}  # the sampler chain's state after unit k was drawn (``_Position``)
        self._constant: tuple[int, Any] | None = None  # (from unit k on, the position of every unit: no state)
        self.ledger: WorkerLedger | None = None  # each worker's dataset state (num_workers > 0)

    def took(self, item: object, end: object) -> bool:
        """Count ``item`` taken from the pipeline; True when the consumer must drop it instead."""
        if self.ledger is not None:
            self.ledger.took(item)  # in the consumer's thread: a state_dict() right after sees it
        if item is end:
            self.ended = True
            return False
        if self.drop > 0:
            self.drop -= 1
            return True
        self.taken += 1
        return False

    def snapshot(self, unit: int, state: Any) -> None:
        self._record(self._snapshots, unit, state)

    def snapshot_at(self, unit: int) -> Any:
        with self._lock:
            return self._snapshots.get(unit)

    def position(self, unit: int, state: Any) -> None:
        self._record(self._positions, unit, state)

    def position_from(self, unit: int, state: Any) -> None:
        """Every unit from ``unit`` on has the position ``state`` (a sampler without state): nothing to record per
        unit."""
        with self._lock:
            self._constant = (unit, state)

    def position_at(self, unit: int) -> Any:
        with self._lock:
            position = self._positions.get(unit)
            constant = self._constant
            if position is None and constant is not None and unit >= constant[0]:
                return constant[1]
            return position

    def _record(self, records: dict[int, Any], unit: int, state: Any) -> None:
        with self._lock:
            records[unit] = state
            # Units the consumer has already passed can no longer be asked for. They are recorded in increasing
            # order, so the oldest is the first key.
            taken = self.taken
            while records and (oldest := next(iter(records))) < taken:
                del records[oldest]


class _Snapshots:
    """Records an iterable dataset's state in the cursor after each unit's items are pulled: the dataset's
    ``state_dict()`` and its iterator's (when ``iter(dataset)`` returns another object with state), as torchdata's
    StatefulDataLoader takes them."""

    def __init__(self, dataset: Any, iterator: Any, per_unit: int, cursor: Cursor, initial: Any) -> None:
        self._dataset = dataset
        self._iterator = iterator if iterator is not dataset and has_state(iterator) else None
        self._per_unit = per_unit
        self._cursor = cursor
        self._first_unit = cursor.taken
        self._items = 0
        # Before its first item a dataset's state may still be the last epoch's (a generator's body has not run):
        # the state at the start is the one loaded, or None (a fresh epoch: start the dataset's epoch afresh).
        cursor.snapshot(self._first_unit, initial)

    def _state(self) -> tuple[Any, Any]:
        return state_of(self._dataset), state_of(self._iterator)

    def _pulled(self) -> None:
        self._items += 1
        if self._items % self._per_unit == 0:
            self._cursor.snapshot(self._unit(), self._state())

    def _ended(self) -> None:
        if self._items % self._per_unit:  # the last, partial unit
            self._cursor.snapshot(self._unit() + 1, self._state())

    def _unit(self) -> int:
        return self._first_unit + self._items // self._per_unit


class _SnapshotSource(_Snapshots, Iterator[Any]):
    """An iterable dataset's iterator, snapshotting its state after each unit.

    Runs where the pipeline pulls (a thread of its pool), so the dataset's own code stays off the event loop and the
    snapshot is taken between two ``next`` calls, never during one.
    """

    def __init__(self, inner: Iterator[Any], dataset: Any, per_unit: int, cursor: Cursor, initial: Any) -> None:
        super().__init__(dataset, inner, per_unit, cursor, initial)
        self._inner = inner

    def __next__(self) -> Any:
        try:
            item = next(self._inner)
        except StopIteration:
            self._ended()
            raise
        self._pulled()
        return item


class _AsyncSnapshotSource(_Snapshots, AsyncIterator[Any]):
    """The same for an async iterable dataset (its code runs on the loop anyway)."""

    def __init__(self, inner: AsyncIterator[Any], dataset: Any, per_unit: int, cursor: Cursor, initial: Any) -> None:
        super().__init__(dataset, inner, per_unit, cursor, initial)
        self._inner = inner

    async def __anext__(self) -> Any:
        try:
            item = await anext(self._inner)
        except StopAsyncIteration:
            self._ended()
            raise
        self._pulled()
        return item

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


class BatchIterator(Iterator[list[Any]]):
    """torch's ``BatchSampler.__iter__`` (the same batches, ``iter(sampler)`` on the first ``next`` as its generator
    does), with the sampler's iterator in reach: its ``state_dict()`` is the position, as in torchdata's
    ``BatchSampler``, whose iterator keeps it the same way."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.sampler_iter: Iterator[Any] | None = None
        self.iter_state: Any = None  # loaded into the sampler's iterator as soon as it exists (a resume)
        self.after_iter: Any = None  # the sampler's state right after iter(sampler)
        self._done = False

    def __next__(self) -> list[Any]:
        if self._done:
            raise StopIteration
        try:
            if self.sampler_iter is None:
                self.sampler_iter = iter(self.sampler)
                self.after_iter = state_of(self.sampler)
                _load_into(self.sampler_iter, self.iter_state)
            batch = list(itertools.islice(self.sampler_iter, self.batch_size))
        except BaseException:
            self._done = True  # as torch's generator: finished once it raised
            raise
        if not batch or (self.drop_last and len(batch) < self.batch_size):
            self._done = True
            raise StopIteration
        return batch


def _chain(loader: _Loader) -> tuple[Any, bool]:
    """(the sampler whose state is the position, whether the epoch's source is a ``BatchIterator`` over it)."""
    index_sampler = loader.batch_sampler if loader._auto_collation else loader.sampler
    if is_stock_batch_sampler(index_sampler):
        return index_sampler.sampler, True
    return index_sampler, False


def is_stock_batch_sampler(obj: Any) -> bool:
    """torch's own BatchSampler over a sync sampler (aloader iterates it with ``BatchIterator``)."""
    return (
        isinstance(obj, BatchSampler)
        and type(obj).__iter__ is BatchSampler.__iter__
        and not callable(getattr(type(obj.sampler), "__aiter__", None))
    )


def _same(a: Any, b: Any) -> bool:
    """Equality of two states, which may hold tensors (a generator's state)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # an object without a plain equality: take it as changed
        return False


# The position of a sampler without state (nor its iterator): the resume skips the units received.
_NO_POSITION: Final = {"sampler": None, "sampler_iter": None, "positional": False}


class _Position(Iterator[Any]):
    """A map-style epoch's index source, recording after each unit drawn the sampler's position as torchdata's
    StatefulDataLoader snapshots it: the ``state_dict()`` of the sampler (or batch sampler) and of its iterator.

    Such a state resumes the sampler where the consumer is: loaded, the sampler (or its iterator) continues from
    there by itself, and the loader skips nothing. That holds when the state records the position: the sampler's
    iterator has state, or the sampler's own state changes as it yields. A sampler whose state does not change
    within the epoch (an epoch counter, say) cannot resume a position from it; for it the loader restores the
    state from the epoch's start and skips the received units (``LoaderState.position``).

    Runs where the scheduler draws units (on the loop, between two ``next`` calls).
    """

    def __init__(self, owner: LoaderState, holder: Any, source: Iterator[Any], cursor: Cursor, initial: Any) -> None:
        self._owner = owner
        self._holder = holder
        self._source = source
        self._cursor = cursor
        self._unit = cursor.taken
        self._reference = state_of(holder)  # right after iter(): a state that moves from it records the position
        self._stateless: bool | None = None  # neither the sampler nor its iterator has state (known once drawn)
        cursor.position(self._unit, initial)

    def _iterator(self) -> Any:
        source = self._source
        iterator = source.sampler_iter if isinstance(source, BatchIterator) else source
        return iterator if iterator is not self._holder and has_state(iterator) else None

    def __next__(self) -> Any:
        unit = next(self._source)
        self._unit += 1
        if self._stateless is None:
            self._stateless = not has_state(self._holder) and self._iterator() is None
            if self._stateless:  # torch's own samplers: the same snapshot after every unit, recorded once
                self._cursor.position_from(self._unit, _NO_POSITION)
        if self._stateless:
            return unit
        sampler, sampler_iter = state_of(self._holder), state_of(self._iterator())
        source = self._source
        reference = source.after_iter if isinstance(source, BatchIterator) else self._reference
        moving = sampler is not None and not _same(sampler, reference)
        if moving:
            self._owner.moving = True
        snapshot = {"sampler": sampler, "sampler_iter": sampler_iter, "positional": moving or sampler_iter is not None}
        self._cursor.position(self._unit, snapshot)
        return unit


class _AsyncSkip(AsyncIterator[Any]):
    """An async iterator whose first ``count`` items are pulled and dropped on first use."""

    def __init__(self, inner: AsyncIterator[Any], count: int) -> None:
        self._inner = inner
        self._count = count

    async def __anext__(self) -> Any:
        while self._count > 0:
            self._count -= 1
            await anext(self._inner)
        return await anext(self._inner)

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


class _Start:
    """How one epoch started: enough to recompute its order."""

    __slots__ = ("base_seed", "batch_sampler", "drew_base_seed", "global_rng", "loader_rng", "sampler", "sampler_rng")

    def __init__(self) -> None:
        self.loader_rng: str | None = None  # the loader's generator before the epoch's first draw
        self.global_rng: str | None = None  # torch's global generator, when the loader has none
        self.sampler_rng: str | None = None  # a sampler's own generator, when it is not the loader's
        self.sampler: Any = None  # sampler.state_dict() before iter(), when it has one
        self.batch_sampler: Any = None
        self.base_seed: int | None = None
        self.drew_base_seed = True

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _Start:
        start = cls()
        for name in cls.__slots__:
            if name in data:
                setattr(start, name, data[name])
        return start


def _generators(loader: _Loader) -> tuple[torch.Generator | None, torch.Generator | None]:
    """(the loader's generator, a sampler's own other generator) that an epoch draws from."""
    own = loader.generator
    for holder in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        generator = getattr(holder, "generator", None)
        if isinstance(generator, torch.Generator) and generator is not own and not has_state(holder):
            return own, generator
    return own, None


def _unit_size(loader: _Loader) -> int:
    return loader.batch_size if loader._auto_collation and loader.batch_size is not None else 1


class LoaderState:
    """Owned by one loader: the current (or last) epoch's start and cursor, and a loaded state to apply."""

    def __init__(self) -> None:
        self.epoch = 0  # the index of the current (or last started) epoch
        self.next_epoch = 0  # the index the next epoch started from scratch gets
        self.cursor: Cursor | None = None
        self.start: _Start | None = None
        self.pending: dict[str, Any] | None = None  # load_state_dict(): applied at the next iter()
        self._resuming: dict[str, Any] | None = None  # the pending mid-epoch state while _plan() runs
        # The sampler's own state has been seen to change as it yields (it records its position, see _Position):
        # a state taken between epochs then holds the position at the end of the last one (``drain``).
        self.moving = False
        self._last_ledger: WorkerLedger | None = None  # the last epoch's (a persistent pool's workers carry on)

    # ------------------------------------------------------------------------------------------ saving
    def state_dict(self, loader: _Loader) -> dict[str, Any]:
        if self.pending is not None:
            return dict(self.pending)  # loaded and not yet started: still that state
        cursor, start = self.cursor, self.start
        if cursor is None or start is None or cursor.ended:
            return self._boundary(loader)
        taken = cursor.taken
        position = cursor.position_at(taken)
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "mid_epoch": True,
            "batches": taken,
            "start": start.to_dict(),
            # The sampler's position after the last unit received, when its state records it (see _Position).
            "position": encode(position) if position is not None and position["positional"] and taken > 0 else None,
            # Nothing received yet: as between epochs, the sampler may hold the last epoch's end.
            "drain": self.moving and taken == 0,
            "dataset": None,
            "dataset_iter": None,
            "workers": encode(cursor.ledger.snapshot()) if cursor.ledger is not None else None,
        }
        sampler = loader.sampler
        if isinstance(sampler, DistributedSampler) and sampler.epoch == sampler.state_epoch_started:
            # Our distributed sampler resumes itself (and re-splits when the world size changed).
            state["distributed"] = sampler.state_at(taken * _unit_size(loader))
        if loader._dataset_kind == torch.utils.data.dataloader._DatasetKind.Iterable:
            # Worker processes each iterate their own copy: the stream of batches depends on their number.
            state["iterable_workers"] = loader.num_workers
            snapshot = cursor.snapshot_at(taken)
            if snapshot is not None:
                state["dataset"], state["dataset_iter"] = encode(snapshot[0]), encode(snapshot[1])
        else:
            state["dataset"] = encode(state_of(loader.dataset))
        return state

    def _boundary(self, loader: _Loader) -> dict[str, Any]:
        """Between epochs: the next ``iter()`` starts epoch ``self.epoch`` from the generators as they are now."""
        own, other = _generators(loader)
        start = _Start()
        start.loader_rng = encode_rng(own.get_state()) if own is not None else None
        start.sampler_rng = encode_rng(other.get_state()) if other is not None else None
        start.sampler = encode(state_of(loader.sampler))
        start.batch_sampler = encode(state_of(loader.batch_sampler))
        if loader._persistent_pool is not None and not loader._persistent_pool.broken:
            # The next epoch reuses the persistent workers and draws no base seed: a new loader must not either.
            start.drew_base_seed = False
            start.base_seed = loader._base_seed
        dataset = loader.dataset
        kind_map = loader._dataset_kind == torch.utils.data.dataloader._DatasetKind.Map
        workers = None
        ledger = self._last_ledger
        if loader._persistent_pool is not None and not loader._persistent_pool.broken and ledger is not None:
            # The persistent workers' copies carry their state into the next epoch (a new pool's would not).
            workers = encode(ledger.snapshot(iterators=False))
        return {
            "format": STATE_FORMAT,
            "epoch": self.next_epoch,
            "mid_epoch": False,
            "batches": 0,
            "start": start.to_dict(),
            "position": None,
            # A sampler whose state records its position holds the end of the last epoch: a new loader loads it and
            # iterates it to that end, so the sampler is where the uninterrupted run's is (see load_state_dict).
            "drain": self.moving,
            # An iterable dataset's state at its end would resume an empty epoch: it starts afresh instead.
            "dataset": encode(state_of(dataset)) if kind_map else None,
            "dataset_iter": None,
            "workers": workers,
        }

    # ----------------------------------------------------------------------------------------- loading
    def load_state_dict(self, loader: _Loader, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict() expects the dict returned by state_dict(), got {type(state).__name__}")
        if not state:
            return  # as torchdata's StatefulDataLoader: an empty state changes nothing
        if "_snapshot" in state or "_num_yielded" in state:
            raise ValueError(
                "load_state_dict(): this is a torchdata StatefulDataLoader state; aloader.DataLoader resumes from the "
                "state of its own state_dict() (the same calls, another layout): save the state with aloader"
            )
        if state.get("format") not in _LOADABLE_FORMATS:
            raise ValueError(
                "load_state_dict(): this is not an aloader DataLoader state of format 1, 2 or 3 (format 3 since the "
                f"per-worker dataset states; got format={state.get('format')!r}): pass the dict returned by "
                "DataLoader.state_dict() of this or an earlier aloader"
            )
        position = state.get("position")
        if position is not None and not (
            isinstance(position, Mapping) and {"sampler", "sampler_iter"} <= set(position)
        ):
            raise ValueError("load_state_dict(): the state's 'position' is not a sampler position")
        for key, kind in (("epoch", int), ("batches", int), ("mid_epoch", bool), ("start", Mapping)):
            if not isinstance(state.get(key), kind):
                raise ValueError(f"load_state_dict(): the state's {key!r} is missing or not a {kind.__name__}")
        if state["batches"] < 0 or state["epoch"] < 0:
            raise ValueError("load_state_dict(): 'epoch' and 'batches' must not be negative")
        check_saved(state.get("workers"), loader.num_workers)
        saved_workers = state.get("iterable_workers")
        if state["mid_epoch"] and state["batches"] > 0 and saved_workers not in (None, loader.num_workers):
            raise ValueError(
                f"load_state_dict(): this state was taken in the middle of an epoch of an iterable dataset with "
                f"num_workers={saved_workers}; each worker process iterates its own copy, so the batches already "
                f"received cannot be found again with num_workers={loader.num_workers}. Resume with "
                f"num_workers={saved_workers} (as torchdata's StatefulDataLoader requires), or from a state taken "
                "between epochs"
            )
        # Samplers, datasets and generators take their state now, as the caller would expect from a load: a
        # set_epoch() called between this and iter() then wins, as in an uninterrupted run.
        self._apply_start(loader, _Start.from_dict(state["start"]), *_generators(loader), state)
        if state.get("drain"):
            # The sampler's state is the end of the last epoch: run that end, so its next iter() starts the next
            # epoch as in the uninterrupted run (a StatefulDistributedSampler, say, would skip that position).
            holder, _ = _chain(loader)
            for _ in iter(holder):
                pass
            self.moving = True
        self.pending = dict(state)
        self.epoch = state["epoch"]
        self.next_epoch = state["epoch"] + 1 if state["mid_epoch"] else state["epoch"]
        self.cursor = None
        self.start = None

    # -------------------------------------------------------------------------------------- one epoch
    @contextlib.contextmanager
    def epoch_scope(self, loader: _Loader) -> Iterator[None]:
        """Around ``_plan()``: record how the epoch starts, or set it up to continue a loaded state."""
        pending, self.pending = self.pending, None
        own, other = _generators(loader)
        restore_global: torch.Tensor | None = None
        try:
            self._resuming = pending
            if pending is not None and pending["mid_epoch"]:
                start = _Start.from_dict(pending["start"])
                position = pending.get("position")
                if position is not None:
                    # The sampler resumes itself from its position (before iter(), as torchdata restores it).
                    _load_into(_chain(loader)[0], position["sampler"])
                if own is None and start.global_rng is not None:
                    # Recompute the epoch's draws from torch's global generator as they were, without moving the
                    # caller's global generator (they restore it with their own checkpoint).
                    restore_global = torch.get_rng_state()
                    torch.set_rng_state(decode_rng(start.global_rng))
                self.start = start
                self.cursor = Cursor(taken=pending["batches"])
            else:
                start = _Start()
                start.loader_rng = encode_rng(own.get_state()) if own is not None else None
                start.global_rng = encode_rng(torch.get_rng_state()) if own is None else None
                start.sampler_rng = encode_rng(other.get_state()) if other is not None else None
                start.sampler = encode(state_of(loader.sampler))
                start.batch_sampler = encode(state_of(loader.batch_sampler))
                self.start = start
                self.cursor = Cursor()
                self.epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
            sampler = loader.sampler
            if isinstance(sampler, DistributedSampler):
                sampler.state_epoch_started = sampler.epoch
            yield
        except BaseException:
            self.pending = pending  # iter() failed: the loaded state still applies to the next one
            raise
        finally:
            self._resuming = None
            if restore_global is not None:
                torch.set_rng_state(restore_global)
        self.start.base_seed = loader._base_seed

    @staticmethod
    def _apply_start(
        loader: _Loader,
        start: _Start,
        own: torch.Generator | None,
        other: torch.Generator | None,
        pending: Mapping[str, Any],
    ) -> None:
        if own is not None and start.loader_rng is not None:
            own.set_state(decode_rng(start.loader_rng))
        if other is not None and start.sampler_rng is not None:
            other.set_state(decode_rng(start.sampler_rng))
        _load_into(loader.sampler, start.sampler)
        _load_into(loader.batch_sampler, start.batch_sampler)
        distributed = pending.get("distributed")
        if distributed is not None and isinstance(loader.sampler, DistributedSampler):
            loader.sampler.load_state_dict(distributed)
        _load_into(loader.dataset, pending.get("dataset"))

    def base_seed(self, draw: Callable[[], int]) -> int:
        """The epoch's base seed: drawn, unless the resumed epoch drew none (its workers were persistent)."""
        resuming = self._resuming
        if resuming is not None:
            start = resuming["start"]
            if not start.get("drew_base_seed", True) and start.get("base_seed") is not None:
                assert self.start is not None
                self.start.drew_base_seed = False
                return int(start["base_seed"])
        assert self.start is not None
        self.start.drew_base_seed = True
        return draw()

    def no_base_seed(self) -> None:
        """The epoch drew no base seed: persistent workers keep theirs."""
        if self.start is not None:
            self.start.drew_base_seed = False

    def ledger(self, loader: _Loader, kind: str | None, reused_pool: bool) -> tuple[WorkerLedger | None, int, Any]:
        """For an epoch with worker processes of ``kind``: (the ledger recording each worker's dataset state, the
        worker that gets the epoch's first batch, the states a new pool's workers load as they start)."""
        cursor = self.cursor
        assert cursor is not None
        previous = self._last_ledger
        self._last_ledger = None
        resuming = self._resuming
        taken = resuming["batches"] if resuming is not None and resuming["mid_epoch"] else 0
        first = taken % loader.num_workers if kind == "map" else 0  # batch k goes to worker k % n, as in the run
        if kind is None or (kind == "map" and not has_state(loader.dataset)) or kind == "items":
            return None, first, None
        saved = resuming.get("workers") if resuming is not None else None
        states: list[Any] | None = None
        setup_states = None
        if saved is not None and not reused_pool:
            states = decode(saved["states"])
            setup_states = tuple(states)
            if resuming is not None and resuming["mid_epoch"]:
                first = saved["next"]
        elif reused_pool and previous is not None:
            states = previous.latest()  # the persistent workers' copies as the last epoch left them
        ledger = WorkerLedger(loader.num_workers, states, first)
        cursor.ledger = self._last_ledger = ledger
        return ledger, first, setup_states

    def position(self, loader: _Loader, kind: str, source: Any, async_batching: bool, in_workers: bool) -> Any:
        """The epoch's source, moved to the resumed position (without fetching) and snapshotting if it must."""
        cursor = self.cursor
        assert cursor is not None
        resuming = self._resuming
        skip = resuming["batches"] if resuming is not None else 0
        dataset = loader.dataset
        if kind == "map":
            if (
                resuming is not None
                and resuming.get("distributed") is not None
                and isinstance(loader.sampler, DistributedSampler)
            ):
                skip = 0  # the distributed sampler starts at the resumed position itself
            if isinstance(source, AsyncIterator):
                return _AsyncSkip(source, skip * _unit_size(loader) if async_batching else skip) if skip else source
            position = resuming.get("position") if resuming is not None else None
            if position is not None:
                skip = 0  # the sampler (or its iterator) resumes itself
                if isinstance(source, BatchIterator):
                    source.iter_state = position["sampler_iter"]
                else:
                    _load_into(source, position["sampler_iter"])
            holder, _ = _chain(loader)
            try:
                for _ in range(skip):
                    if next(source, _EXHAUSTED) is _EXHAUSTED:
                        return iter(())
                if not isinstance(holder, DistributedSampler):
                    source = _Position(self, holder, source, cursor, position)
                if loader.generator is not None:
                    return source
                # With torch's global generator, the sampler draws (on its first next) now, in the caller's thread:
                # torch's global state after iter() is then the same in every run, and a resumed epoch draws while
                # the generator holds the epoch's starting state (see epoch_scope).
                first = next(source, _EXHAUSTED)
            except Exception as exc:
                return _Raising(exc)  # the sampler failed: raise where its batch would have been
            return iter(()) if first is _EXHAUSTED else itertools.chain([first], source)
        if in_workers:
            if resuming is None or resuming.get("workers") is None:
                cursor.drop = skip  # each worker iterates its own copy: re-run, and drop what was received
            return source  # (with per-worker states, each worker's copy resumes itself: nothing to drop)
        per_unit = _unit_size(loader)
        if has_state(dataset) or has_state(source):
            # The dataset resumed itself (its state was loaded before iter(), its iterator's now, in torchdata's
            # order); snapshot them batch by batch.
            initial = None
            if resuming is not None:
                if resuming.get("dataset_iter") is not None and source is not dataset:
                    _load_into(source, resuming["dataset_iter"])
                if resuming.get("dataset") is not None or resuming.get("dataset_iter") is not None:
                    initial = (resuming.get("dataset"), resuming.get("dataset_iter"))
            if isinstance(source, AsyncIterator):
                return _AsyncSnapshotSource(source, dataset, per_unit, cursor, initial)
            return _SnapshotSource(source, dataset, per_unit, cursor, initial)
        if not skip:
            return source
        if isinstance(source, AsyncIterator):
            return _AsyncSkip(source, skip * per_unit)
        return itertools.islice(source, skip * per_unit, None)  # pulled in the pipeline's thread, then dropped


_EXHAUSTED: Final = object()


class _Raising(Iterator[Any]):
    """An iterator whose first ``next`` raises ``error``: a sampler's failure, at its batch's position."""

    def __init__(self, error: Exception) -> None:
        self._error: Exception | None = error

    def __next__(self) -> Any:
        error, self._error = self._error, None
        if error is None:
            raise StopIteration
        raise error
