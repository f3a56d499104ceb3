"""Per-worker state: each worker process's copy of a ``Stateful`` dataset (and of its iterator), as torchdata's
``StatefulDataLoader`` saves it with ``num_workers > 0``.

A worker's copy of the dataset changes where the parent cannot see it (a dataset that counts what it yielded, an
RNG it keeps in its ``state_dict()``). So::

    worker (WorkerTracker):  loads its saved state as it starts (after worker_init_fn; an iterable's dataset state
                             before iter(), its iterator's after), then answers each batch with the state right after
                             that batch's items were fetched or pulled (only when the dataset or iterator has state)
    parent (WorkerLedger):   keeps, per worker, the state that goes with the last batch the *consumer* received from
                             that worker: states of batches prefetched but not yet taken wait in hand-off order

The ledger is written on the pipeline's loop (``arrived`` / ``handed_off``, the core's ``StateLedger``) and read in
the consumer's thread (``took``, as the consumer takes each item; ``snapshot`` for ``state_dict()``), under a lock.
Encoding the states for the saved dict (tensors as text) is ``_state``'s; here they are as the dataset gives them.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from aloader._core.outcomes import END, NO_BATCH

__all__ = ["WorkerLedger", "WorkerTracker", "check_saved", "has_state", "state_of"]


def has_state(obj: object) -> bool:
    """``obj`` is ``Stateful``: it has both ``state_dict`` and ``load_state_dict``."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def state_of(obj: Any) -> Any:
    """``obj.state_dict()`` when ``obj`` has state of its own (both methods), else None."""
    return obj.state_dict() if has_state(obj) else None


class WorkerTracker:
    """In one worker process: loads the worker's saved state and takes its snapshots.

    A snapshot is ``[dataset state, iterator state, ended]``: the iterator's only when ``iter(dataset)`` returned
    another object with state (torchdata's ``dataset_iter``; a dataset that is its own iterator is saved once, as the
    dataset), and whether the iterator has ended (a short last batch ends it as it is pulled: the worker yields
    nothing more this epoch, whatever its state would start again from).
    """

    def __init__(self, dataset: Any, saved: Any) -> None:
        self._dataset = dataset
        self._saved_iterator: Any = None
        self._saved_ended = False
        self._iterator: Any = None
        self.ended = False  # set by the worker as its iterator ends
        if saved is not None:
            dataset_state, self._saved_iterator, self._saved_ended = saved
            if dataset_state is not None and has_state(dataset):
                dataset.load_state_dict(dataset_state)  # before iter(), as torchdata's worker loop

    @property
    def tracks(self) -> bool:
        """Whether there is a state to record (checked per answer: cheap, and an iterator's is known at reset)."""
        return has_state(self._dataset) or self._iterator is not None

    def reset(self) -> tuple[Iterator[Any], list[Any] | None]:
        """An iterable epoch starts (user code: off the loop): a new iterator over the dataset, the saved iterator
        state loaded into the first one, and the state the epoch starts from (None: nothing has state). That state
        holds the dataset's as it was *before* ``iter()``: loaded into a new copy, then ``iter()``, it starts the
        same epoch."""
        dataset = self._dataset
        before = state_of(dataset)
        saved, self._saved_iterator = self._saved_iterator, None
        if self._saved_ended:  # resumed after this worker's last batch of the epoch: nothing more to pull
            self._saved_ended, self.ended, self._iterator = False, True, None
            state = [before, saved, True]
            return iter(()), state if before is not None or saved is not None else None
        iterator = iter(dataset)
        self.ended = False
        self._iterator = iterator if iterator is not dataset and has_state(iterator) else None
        if saved is not None and self._iterator is not None:
            self._iterator.load_state_dict(saved)  # after iter(), as torchdata's worker loop
        return iterator, [before, state_of(self._iterator), False] if self.tracks else None

    def snapshot(self) -> list[Any]:
        """The state now (user code: call it off the worker's loop, between two batches' pulls or fetches)."""
        return [state_of(self._dataset), state_of(self._iterator), self.ended]


class WorkerLedger:
    """In the parent: each worker's state after the last batch the consumer took from it.

    ``arrived`` (a worker's answer for unit ``seq``) and ``handed_off`` (that unit's outcome left the core for the
    sink) run on the pipeline's loop; the consumer's ``took`` applies the state of the item it takes. Items reach the
    consumer in hand-off order, so the states handed off wait in a queue, each with its item, and the one taken is
    always at the head (an item that is not there, such as a timeout's error, changes nothing).
    """

    def __init__(self, num_workers: int, states: list[Any] | None, next_worker: int = 0) -> None:
        self.num_workers = num_workers
        self._lock = threading.Lock()
        self._states: list[Any] = list(states) if states is not None else [None] * num_workers
        self._next = next_worker % num_workers  # the worker after the one whose batch was taken last
        self._taken = [-1] * num_workers  # the latest unit of this epoch taken from each worker
        self._arrived: dict[int, tuple[int, Any]] = {}  # seq -> (worker, state): answers not handed off yet
        # Handed off, not taken yet: (item, seq, worker, state).
        self._handed: collections.deque[tuple[object, int, int, Any]] = collections.deque()
        self._exhausted: dict[int, Any] = {}  # a worker's state when its iterable copy ended: applied at the end
        self._latest: dict[int, tuple[int, Any]] = {}  # worker -> (seq, state) of its latest answer

    # ------------------------------------------------------------------------------------------ the loop's side
    def initial(self, worker_id: int, state: Any) -> None:
        with self._lock:
            if self._taken[worker_id] < 0:
                self._states[worker_id] = state

    def arrived(self, seq: int, worker_id: int, state: Any) -> None:
        with self._lock:
            if state is None and seq in self._arrived:
                return  # the batch came with its state, then failed here (pinning): the worker did make it
            self._arrived[seq] = (worker_id, state)
            if state is not None and seq >= self._latest.get(worker_id, (-1, None))[0]:
                self._latest[worker_id] = (seq, state)

    def handed_off(self, seq: int, outcome: object) -> None:
        with self._lock:
            record = self._arrived.pop(seq, None)
            if record is None:
                return
            worker_id, state = record
            if outcome is NO_BATCH:  # never reaches the consumer; its copy is at its end once the epoch ends
                if state is not None:
                    self._exhausted[worker_id] = state
            else:
                self._handed.append((outcome, seq, worker_id, state))

    # -------------------------------------------------------------------------------------- the consumer's side
    def took(self, item: object) -> None:
        with self._lock:
            if item is END:
                for worker_id, state in self._exhausted.items():
                    self._states[worker_id] = state
                self._exhausted.clear()
                return
            if not self._handed or self._handed[0][0] is not item:
                return
            _, seq, worker_id, state = self._handed.popleft()
            self._next = (worker_id + 1) % self.num_workers
            if seq < self._taken[worker_id]:
                return  # in_order=False: a later batch of this worker overtook it; its state is the later one
            self._taken[worker_id] = seq
            if state is not None:
                self._states[worker_id] = state

    def snapshot(self, iterators: bool = True) -> dict[str, Any] | None:
        """The saved form (before encoding), or None when no worker has state. ``iterators=False``: between epochs,
        where the next epoch calls ``iter()`` afresh (only the datasets' states carry over)."""
        with self._lock:
            if all(state is None for state in self._states):
                return None
            states = [
                None if state is None else [state[0], *(state[1:] if iterators else [None, False])]
                for state in self._states
            ]
            return {"num_workers": self.num_workers, "next": self._next if iterators else 0, "states": states}

    def latest(self) -> list[Any]:
        """Each worker's dataset state after its latest answer, taken or not: where a persistent pool's copies are
        when the next epoch starts (until their own report of it arrives). That epoch calls ``iter()`` afresh: no
        iterator state, not ended."""
        with self._lock:
            states = list(self._states)
            for worker_id, (_, state) in self._latest.items():
                states[worker_id] = state
            for worker_id, state in self._exhausted.items():
                states[worker_id] = state
            return [None if state is None else [state[0], None, False] for state in states]


def check_saved(saved: Any, num_workers: int) -> None:
    """Refuse, with what to do, a state's ``workers`` entry that the loader cannot resume."""
    if saved is None:
        return
    if not (
        isinstance(saved, Mapping)
        and isinstance(saved.get("num_workers"), int)
        and isinstance(saved.get("next"), int)
        and isinstance(saved.get("states"), list)
        and len(saved["states"]) == saved["num_workers"] > 0
        and all(state is None or (isinstance(state, list) and len(state) == 3) for state in saved["states"])
    ):
        raise ValueError("load_state_dict(): the state's 'workers' is not a per-worker state")
    if saved["num_workers"] != num_workers:
        raise ValueError(
            f"load_state_dict(): this state holds the dataset states of {saved['num_workers']} worker processes, each "
            f"resuming its own copy of the dataset; this DataLoader has num_workers={num_workers}. Resume with "
            f"num_workers={saved['num_workers']} (as torchdata's StatefulDataLoader requires)"
        )
