"""A dataset with state of its own, read by worker processes, resumed mid-epoch where each worker was.

A stream of records (lines of a log, rows of shards) is read by an ``IterableDataset`` that splits the records
between the workers (``get_worker_info()``) and keeps its read position: ``state_dict()`` / ``load_state_dict()``,
the ``Stateful`` protocol torchdata's ``StatefulDataLoader`` uses. With ``num_workers=2`` each worker reads its own
copy, so the position to save is each worker's: aloader's ``loader.state_dict()`` holds the state of every worker's
copy as it was right after the last batch the consumer received from it, and a new loader given that state starts
each worker where it was, so a resumed run reads every record once, as StatefulDataLoader does.

Here the same script runs with both loaders, each interrupted after 5 batches and resumed in a new loader, and
checks that the records are the same as each other's and as an uninterrupted run's. See ``docs/resume.md``. Run:
``python examples/stateful_workers.py``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import aloader

RECORDS = 120  # records in the stream
STOP_AFTER = 5  # batches before the "checkpoint"


class RecordStream(torch.utils.data.IterableDataset[int]):
    """Records ``0 .. n-1``, split between the workers (every ``num_workers``-th), with a read position as state."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.position = 0  # records of this worker's share already read

    def __iter__(self) -> Any:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        share = list(range(worker, self.n, workers))
        while self.position < len(share):
            record = share[self.position]
            self.position += 1
            yield record
        self.position = 0  # the next epoch reads the share again from its start

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def make(cls: Any) -> Any:
    return cls(RecordStream(RECORDS), batch_size=4, num_workers=2)


def read(loader: Any) -> list[int]:
    return [int(x) for batch in loader for x in batch]


def interrupted_then_resumed(cls: Any) -> list[int]:
    loader = make(cls)
    seen: list[int] = []
    for step, batch in enumerate(loader):
        seen += [int(x) for x in batch]
        if step + 1 == STOP_AFTER:
            state = json.loads(json.dumps(loader.state_dict()))  # saved as a checkpoint would save it
            break
    resumed = make(cls)  # a new process would build it again
    resumed.load_state_dict(state)
    return seen + read(resumed)


if __name__ == "__main__":
    uninterrupted = read(make(aloader.DataLoader))
    assert sorted(uninterrupted) == list(range(RECORDS)), "every record once in an uninterrupted epoch"
    theirs = interrupted_then_resumed(StatefulDataLoader)
    ours = interrupted_then_resumed(aloader.DataLoader)
    assert ours == uninterrupted, "aloader's resumed stream differs from its uninterrupted one"
    assert ours == theirs, "aloader's resumed stream differs from StatefulDataLoader's"
    print(f"{len(ours)} records, interrupted after {STOP_AFTER} batches with 2 workers and resumed: each read once")
    print("OK: each worker's copy resumed where it was, as with StatefulDataLoader")
