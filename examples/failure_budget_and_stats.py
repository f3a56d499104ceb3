"""Failure budgets, stats and progress: keep training through a few corrupt samples, and see where time goes.

A dataset of records where a few are corrupt (their decoding raises). With ``max_failures`` the loader skips them,
logs each once on the ``aloader`` logger, counts them in ``loader.stats()``, and raises ``FailureBudgetExceeded``
if more fail than allowed. See docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import torch
from torch.utils.data import Dataset

import aloader

CORRUPT = {13, 77, 140}


class Records(Dataset[Any]):
    """JSON records as bytes, as they would come from files; three of them are truncated."""

    def __init__(self, n: int = 200) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> bytes:
        record = json.dumps({"id": i, "features": [i * 0.5, i % 7], "label": i % 3}).encode()
        return record[:10] if i in CORRUPT else record


def decode(raw: bytes) -> dict[str, torch.Tensor]:
    record = json.loads(raw)  # raises json.JSONDecodeError on a corrupt record
    return {
        "id": torch.tensor(record["id"]),
        "features": torch.tensor(record["features"]),
        "label": torch.tensor(record["label"]),
    }


def main() -> None:
    # aloader is quiet by default (a NullHandler); configure logging to see each skipped sample.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    # 1. A budget of 5 failures per epoch: the 3 corrupt records are skipped, the rest arrive in torch's order.
    loader = aloader.DataLoader(Records(), batch_size=16, transform=decode, max_failures=5, progress=True)
    ids = [int(i) for batch in loader for i in batch["id"]]
    assert ids == [i for i in range(200) if i not in CORRUPT]
    stats = loader.stats()
    print(stats)
    assert (stats.skipped, stats.transform.failures, stats.batches) == (3, 3, 13)
    # The queue holds prefetch_factor (2) batches, or more once the fast lane makes several batches per call: these
    # records decode in well under a millisecond, so how wide it gets depends on the machine's speed.
    assert stats.fetch.items == 200
    assert stats.queue.capacity >= 2

    # 2. The same through `async for`, with a budget given as a share of the samples seen.
    async def consume() -> int:
        shared = aloader.DataLoader(Records(), batch_size=16, transform=decode, max_failures=0.05)
        return sum([len(batch["id"]) async for batch in shared])

    assert asyncio.run(consume()) == 197

    # 3. A budget too small: the error names the last failures and chains the last one.
    strict = aloader.DataLoader(Records(), batch_size=16, transform=decode, max_failures=2)
    stopped: aloader.FailureBudgetExceeded | None = None
    try:
        for _ in strict:
            pass
    except aloader.FailureBudgetExceeded as error:
        stopped = error
    print(f"stopped: {stopped}")
    assert stopped is not None
    assert "sample index 140" in str(stopped)
    assert isinstance(stopped.__cause__, json.JSONDecodeError)

    # 4. Without max_failures (the default) the loader behaves exactly as torch's: the batch raises.
    raised: json.JSONDecodeError | None = None
    try:
        list(aloader.DataLoader(Records(), batch_size=16, transform=decode))
    except json.JSONDecodeError as error:
        raised = error
    assert raised is not None
    assert "sample index 13" in " ".join(raised.__notes__)
    print("OK")


if __name__ == "__main__":
    main()
