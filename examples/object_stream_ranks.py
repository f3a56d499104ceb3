"""One object per sample, split across ranks by the dataset itself, and resumed mid-epoch.

``ObjectStreamDataset`` is the streaming counterpart of ``ObjectDataset``: an async iterable over the objects under a
prefix (or a list of URLs) that splits them across ranks x DataLoader workers on its own -- no sampler -- with the
same count for every rank, reads ``concurrency`` objects at once and yields them in a fixed order. The script
serves 103 objects from aloader's HTTP object server on 127.0.0.1 (with 5 ms latency per request), plays three
ranks one after the other (``RANK``/``WORLD_SIZE``, as torchrun sets them), checkpoints rank 1 mid-epoch and
resumes it in a new loader, then resumes the same epoch with 2 ranks instead of 3.
Run: ``python examples/object_stream_ranks.py``.
"""

import json
import os

import aloader
from aloader.bench.objectserver import ObjectServer
from aloader.datasets import ObjectStreamDataset

COUNT, WORLD = 103, 3


def decode(data: bytes) -> int:
    return int(json.loads(data)["id"])


def make_loader(urls: list[str]) -> aloader.DataLoader:
    dataset = ObjectStreamDataset(urls, decode=decode, shuffle=True, seed=7, concurrency=16)
    dataset.set_epoch(3)
    return aloader.DataLoader(dataset, batch_size=8)


def main() -> None:
    objects = {f"records/{i:05d}.json": json.dumps({"id": i}).encode() for i in range(COUNT)}
    with ObjectServer(objects, latency=0.005) as server:
        urls = [server.url(key) for key in objects]
        os.environ["WORLD_SIZE"] = str(WORLD)
        per_rank = []
        for rank in range(WORLD):
            os.environ["RANK"] = str(rank)
            batches = [batch.tolist() for batch in make_loader(urls)]
            per_rank.append(batches)
            print(f"rank {rank}: {len(batches)} batches, {sum(map(len, batches))} samples")

        # Every rank the same number of batches (103 // 3 = 34 samples each; the one left over is skipped this
        # epoch), and no sample on two ranks.
        assert len({len(batches) for batches in per_rank}) == 1
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) == COUNT - COUNT % WORLD

        # Rank 1 is preempted after 2 batches; a new loader resumes from its checkpoint.
        os.environ["RANK"] = "1"
        loader = make_loader(urls)
        received = []
        for step, batch in enumerate(loader):
            received.append(batch.tolist())
            if step == 1:
                break
        checkpoint = json.dumps(loader.state_dict())
        server.reset_counters()
        resumed = make_loader(urls)
        resumed.load_state_dict(json.loads(checkpoint))
        received += [batch.tolist() for batch in resumed]
        assert received == per_rank[1]
        assert server.requests == 34 - 16  # the 16 objects received before the checkpoint are not read again
        print(f"rank 1 resumed after 2 batches: the same {len(received)} batches; {server.requests} objects read after")

        # The job restarts with 2 ranks instead of 3. Every rank had received 2 batches (16 objects) when rank 0
        # saved the checkpoint, which is what a DDP checkpoint does; rank 0's checkpoint resumes both new ranks,
        # and what the 3 old ranks had not yet read (3 x 18 = 54 objects) is split again, 27 each.
        os.environ["RANK"] = "0"
        loader = make_loader(urls)
        for step, _ in enumerate(loader):
            if step == 1:
                break
        checkpoint = json.dumps(loader.state_dict())
        os.environ["WORLD_SIZE"] = "2"
        rest = []
        for rank in range(2):
            os.environ["RANK"] = str(rank)
            resumed = make_loader(urls)
            resumed.load_state_dict(json.loads(checkpoint))
            rest.append([i for batch in resumed for i in batch.tolist()])
        assert [len(samples) for samples in rest] == [27, 27]  # the same count, hence batches, on both new ranks
        before = [i for batches in per_rank for batch in batches[:2] for i in batch]
        after = [i for samples in rest for i in samples]
        assert sorted(before + after) == sorted(seen)  # the epoch exactly once across the restart
        print(f"restarted with 2 ranks: {len(rest[0])} and {len(rest[1])} objects, none read twice")
    print("OK")


if __name__ == "__main__":
    main()
