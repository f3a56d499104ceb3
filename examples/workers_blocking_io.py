"""An unchanged torch ``Dataset`` that blocks on HTTP, with ``num_workers=2`` kept from torch code.

Each ``__getitem__`` does a blocking GET (``urllib``) from an object server on 127.0.0.1 that answers after 30 ms,
then a little CPU work. torch's two workers fetch one sample at a time each; aloader's two workers run its async
core, each fetching many samples at once in its own threads (``concurrency`` per worker, as many as keep the
worker's share of the cores busy). The batches are the same, in the same order; only the speed differs. Both are
timed from building the loader, as a training script would see it.

The server runs on a thread of this process, as a user's process has other threads (a progress bar's, a logger's):
aloader forks its workers anyway, as torch does, holding only its own threads out of user code while it forks
(``docs/process-pool.md``). Both epochs start new workers; the second shows the speed once the dataset's speed is
known.
Run: ``python examples/workers_blocking_io.py``.
"""

from __future__ import annotations

import time
import urllib.request

import torch

import aloader
from aloader.bench.objectserver import ObjectServer, synthetic_objects

SAMPLES, BATCH, LATENCY = 240, 8, 0.03


class HttpBytes(torch.utils.data.Dataset[torch.Tensor]):
    """Sample i: the bytes of object i over HTTP, summed in 16 lanes (a stand-in for decoding)."""

    def __init__(self, base_url: str, keys: list[str]) -> None:
        self.base_url, self.keys = base_url, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> torch.Tensor:
        with urllib.request.urlopen(f"{self.base_url}/{self.keys[i]}", timeout=60) as response:
            data = response.read()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(16, -1).sum(dim=1)


def timed(loader: torch.utils.data.DataLoader[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    started = time.perf_counter()
    batches = list(loader)
    return batches, time.perf_counter() - started


if __name__ == "__main__":
    objects = synthetic_objects(SAMPLES, 4096)
    with ObjectServer(objects, latency=LATENCY) as server:
        dataset = HttpBytes(server.base_url, sorted(objects))
        theirs, torch_seconds = timed(torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=2))
        loader = aloader.DataLoader(dataset, batch_size=BATCH, num_workers=2)  # the one line that changed
        first, first_seconds = timed(loader)  # epoch 1: workers forked beside the server's thread
        ours, aloader_seconds = timed(loader)  # epoch 2: new workers
    for batches in (first, ours):
        assert len(batches) == len(theirs) == SAMPLES // BATCH
        assert all(torch.equal(a, b) for a, b in zip(batches, theirs, strict=True)), "other batches than torch's"
    print(f"torch, num_workers=2:            {SAMPLES / torch_seconds:7.0f} samples/s")
    print(f"aloader, num_workers=2, epoch 1: {SAMPLES / first_seconds:7.0f} samples/s")
    print(f"aloader, num_workers=2, epoch 2: {SAMPLES / aloader_seconds:7.0f} samples/s")
    print(f"fetch stage: {loader.stats().fetch.items} samples fetched in the workers")
    print("OK")
