"""Code written for torchdata's ``StatefulDataLoader``, with one import changed: the resumed stream is the same.

A training script checkpoints ``loader.state_dict()`` mid-epoch, with a stateful sampler (torchdata's
``StatefulDistributedSampler``, as torchtitan uses it), then a new process builds the loader again, calls
``load_state_dict()`` and goes on. Here both loaders run side by side: StatefulDataLoader and aloader's DataLoader,
each interrupted after 5 batches of epoch 0 and resumed in a new loader, give the same batches as each other and as
an uninterrupted run. See ``docs/resume.md``. Run: ``python examples/stateful_dataloader_migration.py``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

import aloader

DATASET = aloader.TensorDataset(torch.arange(96))
STOP_AFTER = 5  # batches of epoch 0 before the "checkpoint"


def make(cls: Any) -> Any:
    sampler = StatefulDistributedSampler(DATASET, num_replicas=1, rank=0, shuffle=True, seed=7)
    return cls(DATASET, batch_size=8, sampler=sampler, num_workers=2)


def epochs(loader: Any, count: int) -> list[list[int]]:
    out = []
    for epoch in range(count):
        loader.sampler.set_epoch(epoch)
        out.append([int(x) for (batch,) in loader for x in batch])
    return out


def interrupted_then_resumed(cls: Any) -> list[list[int]]:
    loader = make(cls)
    loader.sampler.set_epoch(0)
    seen: list[int] = []
    for step, (batch,) in enumerate(loader):
        seen += [int(x) for x in batch]
        if step + 1 == STOP_AFTER:
            state = json.loads(json.dumps(loader.state_dict()))  # saved as a checkpoint would save it
            break
    resumed = make(cls)  # a new process would build it again
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(0)
    seen += [int(x) for (batch,) in resumed for x in batch]  # the rest of epoch 0
    resumed.sampler.set_epoch(1)
    return [seen, [int(x) for (batch,) in resumed for x in batch]]


if __name__ == "__main__":
    uninterrupted = epochs(make(aloader.DataLoader), 2)
    theirs = interrupted_then_resumed(StatefulDataLoader)
    ours = interrupted_then_resumed(aloader.DataLoader)
    assert ours == uninterrupted, "aloader's resumed stream differs from its uninterrupted one"
    assert ours == theirs, "aloader's resumed stream differs from StatefulDataLoader's"
    print(f"epoch 0 resumed after {STOP_AFTER} batches, then epoch 1: {len(ours[0]) + len(ours[1])} samples each way")
    print("OK: the same batches as StatefulDataLoader after a resume")
