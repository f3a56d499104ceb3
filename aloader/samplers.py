"""Samplers with resumable state: ``DistributedSampler``, torch's split of a map-style dataset over ranks.

It gives every rank exactly the indices torch's ``torch.utils.data.DistributedSampler`` gives for the same
``seed``, ``epoch``, ``num_replicas``, ``rank``, ``shuffle`` and ``drop_last``, and adds ``state_dict()`` /
``load_state_dict()``. Given to ``aloader.DataLoader``, the loader saves the sampler's position as the consumer
sees it, and a resumed epoch continues from there, even with another number of ranks: the samples of the epoch
not yet seen by any rank are split again over the new ranks (none lost, none repeated, every rank the same count).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import torch
import torch.utils.data

__all__ = ["DistributedSampler"]


def _rank_and_world_size() -> tuple[int, int]:
    from aloader.datasets._split import rank_and_world_size

    return rank_and_world_size()


class DistributedSampler(torch.utils.data.DistributedSampler[int]):
    """torch's ``DistributedSampler`` order, resumable: ``set_epoch(epoch)`` before each epoch, as with torch's.

    A subclass of torch's, so code checking ``isinstance(sampler, torch.utils.data.DistributedSampler)`` still
    recognises it.

    Each rank gets ``len(self)`` indices: with ``drop_last=False`` the epoch's order is padded by repeating its
    first indices so every rank has as many (torch's rule); with ``drop_last=True`` its tail is dropped instead.
    Every rank therefore yields the same number of batches, so DDP never waits on a rank that ran out.

    ``num_replicas`` and ``rank`` default to ``torch.distributed``'s when it is initialised, else to the ``RANK``
    and ``WORLD_SIZE`` environment variables (as ``torchrun`` sets them), else to one rank.

    ``state_dict()`` is ``{"epoch", "seed", "shuffle", "drop_last", "start", "num_replicas"}``: ``start`` is how many
    samples of the epoch's order all ranks together have consumed (rank ``r`` took positions ``r, r + W, ...``, so
    after ``c`` samples each the first ``c * W`` positions are done). Standalone, it counts the indices this rank's
    iterator has yielded; ``aloader.DataLoader`` counts only those of batches its consumer received. Take it at the
    same step on every rank (as a DDP checkpoint is), and resume every new rank from it (rank 0's is enough).
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_replicas is None or rank is None:
            env_rank, env_world = _rank_and_world_size()
            num_replicas = env_world if num_replicas is None else num_replicas
            rank = env_rank if rank is None else rank
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas should be a positive integer, but got num_replicas={num_replicas!r}")
        # torch's checks (and messages) and attributes: dataset, num_replicas, rank, epoch, shuffle, seed, ...
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)  # type: ignore[arg-type]
        # A resumed epoch: positions of that epoch's order already consumed by all ranks before the snapshot.
        self._start = 0
        self._start_epoch: int | None = None
        self._yielded = 0  # indices yielded by the current iterator (standalone state)
        self._yielded_epoch: int | None = None
        self.state_epoch_started: int | None = None  # set by aloader.DataLoader when it starts an epoch

    # ------------------------------------------------------------------------------------------- torch's API
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with ``seed``, orders the samples (call it before each epoch, on every rank)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._layout_size(len(self._remaining()))[1]

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        mine = self._split(order[self._offset() :], order)
        self._yielded, self._yielded_epoch = 0, self.epoch
        return self._count(mine)

    def _count(self, indices: list[int]) -> Iterator[int]:
        for index in indices:
            self._yielded += 1
            yield index

    # ----------------------------------------------------------------------------------------------- order
    def _n(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # a Sized dataset, as torch's requires

    def order(self) -> list[int]:
        """The epoch's order of all samples, before the split over ranks (torch's permutation)."""
        n = self._n()
        if self.shuffle:  # torch's permutation, bit for bit
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=generator).tolist()
        return list(range(n))

    def _offset(self) -> int:
        return self._start if self._start_epoch == self.epoch else 0

    def _remaining(self) -> list[int]:
        return self.order()[self._offset() :]

    def _layout_size(self, n: int) -> tuple[int, int]:
        """(total positions after padding or dropping, positions per rank) for ``n`` samples: torch's rule."""
        w = self.num_replicas
        per_rank = math.ceil((n - w) / w) if self.drop_last and n % w != 0 else math.ceil(n / w)
        return per_rank * w, per_rank

    def _split(self, indices: list[int], order: list[int]) -> list[int]:
        """This rank's share of ``indices`` (the epoch's ``order`` from the resumed position), by torch's rule: padded
        with the epoch's first indices (so a resume with the same ranks pads exactly as the uninterrupted epoch), or
        cut with ``drop_last``."""
        total, _ = self._layout_size(len(indices))
        if not indices:
            return []
        if not self.drop_last:
            padding = total - len(indices)
            if padding <= len(order):
                indices = indices + order[:padding]
            else:
                indices = indices + (order * math.ceil(padding / len(order)))[:padding]
        else:
            indices = indices[:total]
        return indices[self.rank : total : self.num_replicas]

    # ----------------------------------------------------------------------------------------------- state
    def state_at(self, consumed: int) -> dict[str, Any]:
        """The state after this rank's consumer has received ``consumed`` indices of the current epoch."""
        offset = self._offset()
        remaining = self._n() - offset
        done = min(offset + consumed * self.num_replicas, offset + remaining)
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "start": done,
        }

    def state_dict(self) -> dict[str, Any]:
        """This sampler's state: its epoch and how far all ranks are into it (by what this iterator yielded)."""
        return self.state_at(self._yielded if self._yielded_epoch == self.epoch else 0)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the epoch's order from ``seed`` and ``epoch``, from position ``start``, split
        over this sampler's ``num_replicas`` (which may differ from the state's)."""
        for key in ("epoch", "seed", "start"):
            if isinstance(state.get(key), bool) or not isinstance(state.get(key), int):
                raise ValueError(f"DistributedSampler.load_state_dict(): the state's {key!r} should be an integer")
        if state.get("shuffle", self.shuffle) != self.shuffle:
            raise ValueError(
                f"DistributedSampler.load_state_dict(): the state was taken with shuffle={state['shuffle']}, "
                f"this sampler has shuffle={self.shuffle}"
            )
        self.epoch = state["epoch"]
        self.seed = state["seed"]
        self._start = max(0, min(state["start"], self._n()))
        self._start_epoch = self.epoch
        self._yielded, self._yielded_epoch = 0, None
