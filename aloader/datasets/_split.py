"""Which reader this is: the split of a streaming dataset over ranks x DataLoader worker processes.

Shared by ``TarShardDataset`` and ``ObjectStreamDataset``. A *reader* is one (rank, worker) pair; reader ``k`` of
``n = world_size * num_workers`` is ``rank * num_workers + worker``, so a rank's readers are consecutive and every
rank has the same number of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.data

__all__ = [
    "LoadedState",
    "Part",
    "Reader",
    "ResumePoint",
    "load_reader_state",
    "rank_and_world_size",
    "reader_state",
    "resplit",
    "resume_point",
    "this_reader",
]


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of ranks: from ``torch.distributed`` once it is initialised, else from
    the ``RANK`` and ``WORLD_SIZE`` environment variables (as ``torchrun`` sets them), else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True, slots=True)
class Reader:
    """One reader of a split: its rank and worker, and how many of each there are."""

    rank: int
    world: int
    worker: int
    workers: int

    @property
    def slot(self) -> int:
        """This reader's index among all readers (``rank * workers + worker``)."""
        return self.rank * self.workers + self.worker

    @property
    def slots(self) -> int:
        """The number of readers (``world * workers``)."""
        return self.world * self.workers

    def share(self, total: int) -> int:
        """This reader's part of ``total`` items per epoch across all ranks: each rank gets ``total // world``
        (the remainder is left out, so every rank gets the same count), split over its workers so worker ``i`` gets
        the same count on every rank (the first ``(total // world) % workers`` workers one more)."""
        per_rank = total // self.world
        return per_rank // self.workers + (1 if self.worker < per_rank % self.workers else 0)


def this_reader(split_by_rank: bool, split_by_worker: bool) -> Reader:
    """The reader running this code: rank from ``rank_and_world_size()`` (unless ``split_by_rank`` is off), worker
    from ``torch.utils.data.get_worker_info()`` (unless ``split_by_worker`` is off)."""
    rank, world = rank_and_world_size() if split_by_rank else (0, 1)
    info = torch.utils.data.get_worker_info() if split_by_worker else None
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return Reader(rank, world, worker, workers)


# A streaming dataset's state: where one reader is in one epoch, and how the epoch was split before (a resume with
# another number of ranks re-splits what was left; see ``resume_point`` and ``resplit``).
def reader_state(
    epoch: int, seed: int, position: int, reader: Reader, history: Sequence[Sequence[int]] = ()
) -> dict[str, Any]:
    """``{"epoch", "seed", "position", "reader", "readers", "workers", "history"}``: where ``reader``'s iteration
    is; ``history`` lists the earlier splits of the epoch as ``[readers, workers, position]`` (empty unless it was
    resumed with another number of readers)."""
    return {
        "epoch": epoch,
        "seed": seed,
        "position": position,
        "reader": reader.slot,
        "readers": reader.slots,
        "workers": reader.workers,
        "history": [list(split) for split in history],
    }


@dataclass(frozen=True, slots=True)
class LoadedState:
    """A reader state, checked."""

    epoch: int
    seed: int
    position: int
    reader: int
    readers: int
    workers: int
    history: tuple[tuple[int, int, int], ...]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_reader_state(owner: str, state: Mapping[str, Any]) -> LoadedState:
    """``state`` checked; ``owner`` names the dataset in errors. ``workers`` and ``history`` may be missing (a
    state from before they were recorded: one worker per rank, no earlier split)."""
    for key in ("epoch", "seed", "position", "reader", "readers"):
        if not _is_int(state.get(key)):
            raise ValueError(f"{owner}.load_state_dict(): the state's {key!r} should be an integer")
    workers = state.get("workers", 1)
    history = state.get("history", [])
    if not _is_int(workers) or workers < 1 or state["readers"] % workers:
        raise ValueError(f"{owner}.load_state_dict(): the state's 'workers' should divide its 'readers'")
    if not isinstance(history, Sequence) or not all(
        isinstance(split, Sequence) and len(split) == 3 and all(_is_int(v) and v >= 0 for v in split)
        for split in history
    ):
        raise ValueError(
            f"{owner}.load_state_dict(): the state's 'history' should be a list of [readers, workers, position]"
        )
    return LoadedState(
        state["epoch"],
        state["seed"],
        state["position"],
        state["reader"],
        state["readers"],
        workers,
        tuple((int(a), int(b), int(c)) for a, b, c in history),
    )


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a reader's next iteration starts: ``position`` samples into its stream in the split that follows
    ``history`` (``[readers, workers, position]`` of each earlier split of the epoch, the first split first)."""

    position: int = 0
    history: tuple[tuple[int, int, int], ...] = ()


def resume_point(owner: str, loaded: LoadedState | None, reader: Reader, resplit_needs: str | None) -> ResumePoint:
    """Where ``reader`` resumes ``loaded`` (None: from the start).

    Every reader of a split is assumed to be at the same position: the state was taken at the same step on every
    rank, as a DDP checkpoint is, so the state of any rank (rank 0's, say) resumes every rank. With the same number of
    readers each goes on in its own stream. With another number (ranks x workers), what the earlier readers had not
    yet yielded is split again over the new ones (see ``resplit``); ``resplit_needs``, when not None, says what that
    would need and is missing, and the resume is refused with it.
    """
    if loaded is None:
        return ResumePoint()
    if loaded.readers == reader.slots:
        return ResumePoint(loaded.position, loaded.history)
    if loaded.position == 0 and not loaded.history:
        return ResumePoint()  # nothing was read yet: the epoch starts afresh with the new split
    if resplit_needs is not None:
        raise ValueError(
            f"{owner}: the loaded state is from {loaded.readers} readers (ranks x workers) and this split has "
            f"{reader.slots}: resuming with another number of readers {resplit_needs}; resume with the same ranks "
            "and workers, or start a new epoch"
        )
    return ResumePoint(0, (*loaded.history, (loaded.readers, loaded.workers, loaded.position)))


@dataclass(frozen=True, slots=True)
class Part:
    """Samples ``start`` to ``stop`` (exclusive) of what reader ``reader`` of the epoch's first split yields."""

    reader: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def resplit(lengths: Sequence[int], history: Sequence[tuple[int, int, int]], slots: int) -> list[list[Part]]:
    """The parts each of ``slots`` readers yields in an epoch split anew after ``history``.

    ``lengths`` are the samples of each reader of the epoch's first split (``history[0]``). For each split in turn,
    every reader had yielded ``position`` samples; what they had not is joined in reader order and cut into one equal
    run per reader of the next split. The at most ``readers - 1`` samples left over at a cut are left out, so every
    reader (hence every rank) yields the same count, as the first split leaves out what does not divide evenly.
    None is yielded twice, and none of the rest is lost but those few.
    """
    readers = [[Part(r, 0, length)] for r, length in enumerate(lengths)]
    for i, (count, _workers, position) in enumerate(history):
        if count != len(readers):
            raise ValueError(f"the state's history does not chain: a split of {count} readers follows {len(readers)}")
        rest = [part for parts in readers for part in _window(parts, position, sum(p.size for p in parts))]
        following = history[i + 1][0] if i + 1 < len(history) else slots
        share = sum(part.size for part in rest) // following
        readers = [_window(rest, k * share, (k + 1) * share) for k in range(following)]
    return readers


def _window(parts: list[Part], start: int, stop: int) -> list[Part]:
    """Samples ``start`` to ``stop`` of ``parts`` joined."""
    out, offset = [], 0
    for part in parts:
        lo, hi = max(start, offset), min(stop, offset + part.size)
        if lo < hi:
            out.append(Part(part.reader, part.start + lo - offset, part.start + hi - offset))
        offset += part.size
    return out
