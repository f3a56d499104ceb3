"""An async inference service: batches from an ``async def __getitem__`` dataset, with the event loop kept free.

The dataset stands for a remote store: each sample costs ``FETCH_LATENCY`` seconds of I/O (simulated with
``asyncio.sleep``). Inside a running event loop, ``async for batch in aloader.DataLoader(...)`` awaits up to
``concurrency`` fetches at once as tasks of that same loop, so 256 samples at 10 ms each take a small fraction of
the 2.56 s a one-at-a-time loop would need. Meanwhile the service's other tasks -- here a heartbeat -- keep
running, because the loader never blocks the loop. Run: ``python examples/async_service.py``.
"""

import asyncio
import time

import torch
from torch import nn

import aloader

FETCH_LATENCY = 0.01  # seconds of simulated I/O per sample
HEARTBEAT_INTERVAL = 0.005
N_SAMPLES = 256
N_FEATURES = 32


class RemoteFeatureStore:
    """A map-style dataset whose ``__getitem__`` is a coroutine: the loader awaits it on the event loop."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.features = torch.randn(n, N_FEATURES, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, idx: int) -> torch.Tensor:
        await asyncio.sleep(FETCH_LATENCY)  # network / object-store latency
        return self.features[idx]


class Heartbeat:
    """Another task of the service: counts how often it got to run."""

    def __init__(self) -> None:
        self.count = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            self.count += 1


async def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    dataset = RemoteFeatureStore(N_SAMPLES)

    heartbeat = Heartbeat()
    heartbeat_task = asyncio.create_task(heartbeat.run())
    predictions = []
    start = time.perf_counter()
    with torch.no_grad():
        async for batch in aloader.DataLoader(dataset, batch_size=16, concurrency=64):
            predicted = model(batch).argmax(dim=1)
            predictions.append(predicted)
            print(f"batch {len(predictions) - 1}: {tuple(batch.shape)} -> predicted classes {predicted.tolist()}")
    elapsed = time.perf_counter() - start
    beats = heartbeat.count
    heartbeat_task.cancel()
    await asyncio.gather(heartbeat_task, return_exceptions=True)

    served = sum(len(p) for p in predictions)
    sequential = N_SAMPLES * FETCH_LATENCY
    print(f"served {served} samples in {elapsed:.2f} s: {served / elapsed:.0f} samples/s")
    print(f"a one-at-a-time loop would need >= {sequential:.2f} s ({1 / FETCH_LATENCY:.0f} samples/s)")
    print(f"heartbeats while loading: {beats} (the event loop stayed responsive)")
    assert served == N_SAMPLES
    assert beats > 0
    print(f"OK async_service: {served / elapsed:.0f} samples/s, {beats} heartbeats during loading")


if __name__ == "__main__":
    asyncio.run(main())
