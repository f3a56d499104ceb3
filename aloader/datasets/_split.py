"""Which reader this is: the split of a streaming dataset over ranks x DataLoader worker processes.

Shared by ``TarShardDataset`` and ``ObjectStreamDataset``. A *reader* is one (rank, worker) pair; reader ``k`` of
``n = world_size * num_workers`` is ``rank * num_workers + worker``, so a rank's readers are consecutive and every
rank has the same number of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.data

__all__ = ["Reader", "check_same_reader", "load_reader_state", "rank_and_world_size", "reader_state", "this_reader"]


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


# A streaming dataset's state: where one reader is in one epoch. Resuming needs the same split.
def reader_state(epoch: int, seed: int, position: int, reader: Reader) -> dict[str, Any]:
    """``{"epoch", "seed", "position", "reader", "readers"}``: where ``reader``'s iteration is."""
    return {"epoch": epoch, "seed": seed, "position": position, "reader": reader.slot, "readers": reader.slots}


def load_reader_state(owner: str, state: Mapping[str, Any]) -> tuple[int, int, int, tuple[int, int]]:
    """``state`` checked: (epoch, seed, position, (reader, readers)); ``owner`` names the dataset in errors."""
    for key in ("epoch", "seed", "position", "reader", "readers"):
        if isinstance(state.get(key), bool) or not isinstance(state.get(key), int):
            raise ValueError(f"{owner}.load_state_dict(): the state's {key!r} should be an integer")
    return state["epoch"], state["seed"], state["position"], (state["reader"], state["readers"])


def check_same_reader(owner: str, saved: tuple[int, int] | None, reader: Reader) -> None:
    """Refuse to resume a position saved by another reader of another split (it would skip others' samples)."""
    if saved is not None and saved != (reader.slot, reader.slots):
        raise ValueError(
            f"{owner}: the loaded state is reader {saved[0]} of {saved[1]} (ranks x workers), this is reader "
            f"{reader.slot} of {reader.slots}: resume with the same ranks and workers, or start a new epoch"
        )
