"""A small DDP job for ``torchrun --nproc_per_node=2`` (gloo, CPU), run by tests/test_samplers.py.

Every rank records the sample indices it received; rank 0 gathers them and writes a JSON report to ``argv[1]``:
epoch 0 with aloader's DistributedSampler; epoch 1 stopped after two batches, "killed" (the loaders dropped) and
resumed by new loaders from rank 0's JSON state; one epoch of tar shards split by the dataset itself; and one
epoch of tar shards of very unequal sizes with ``samples_per_epoch``, stepped like DDP (an ``all_reduce`` per batch,
which would wait forever -- here: time out -- on a rank that ran out of batches); and, in the directory
``argv[2]``, tar shards with ``samples_per_epoch`` and rank 0's loader state after one batch.

``torchrun --nproc_per_node=3 ddp_job.py OUT DIR --resume`` resumes that state with 3 ranks instead of 2 (the rest
of the epoch split again over them), stepped like DDP, and writes what each rank saw to ``OUT``.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import aloader
from aloader.datasets import TarShardDataset
from aloader.samplers import DistributedSampler

N = 38  # even: torch pads an odd count by repeating a sample, which is not "exactly once"
BATCH = 3


class Numbers(torch.utils.data.Dataset[Any]):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        return torch.tensor(i)


def make_loader(epoch: int) -> aloader.DataLoader[Any]:
    sampler = DistributedSampler(Numbers(), seed=17)  # rank and world size from torch.distributed
    sampler.set_epoch(epoch)
    return aloader.DataLoader(Numbers(), batch_size=BATCH, sampler=sampler, concurrency=4)


def gather(values: list[int]) -> list[list[int]]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def write_shards(directory: Path, shards: int, per_shard: int, sizes: list[int] | None = None) -> None:
    """``shards`` shards of ``per_shard`` samples (or of ``sizes``); samples are numbered from 0 across shards."""
    sizes = sizes if sizes is not None else [per_shard] * shards
    for s, size in enumerate(sizes):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for i in range(size):
                data = str(sum(sizes[:s]) + i).encode()
                info = tarfile.TarInfo(f"{s:03d}/{i:04d}.txt")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        (directory / f"shard-{s}.tar").write_bytes(buffer.getvalue())


def main() -> None:
    # A collective that waits longer than this fails the job (a hang would otherwise last until the test's timeout).
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    epochs: list[dict[str, Any]] = []

    seen = [i for batch in make_loader(0) for i in batch.tolist()]
    epochs.append({"name": "sampler epoch 0", "n": N, "per_rank": gather(seen)})

    loader = make_loader(1)
    before: list[int] = []
    for step, batch in enumerate(loader):
        before += batch.tolist()
        if step == 1:
            break
    state = [json.dumps(loader.state_dict()) if rank == 0 else None]
    dist.broadcast_object_list(state, src=0)  # rank 0's checkpoint is everyone's
    del loader  # "killed": a new loader resumes from the JSON state
    resumed = make_loader(1)
    resumed.load_state_dict(json.loads(state[0]))  # type: ignore[arg-type]
    after = [i for batch in resumed for i in batch.tolist()]
    epochs.append({"name": "sampler epoch 1 resumed", "n": N, "per_rank": gather(before + after)})

    with tempfile.TemporaryDirectory() as shared:
        directory = Path(shared)
        paths = [str(directory) if rank == 0 else None]
        dist.broadcast_object_list(paths, src=0)
        shard_dir = Path(paths[0])  # type: ignore[arg-type]
        if rank == 0:
            write_shards(shard_dir, shards=5, per_shard=6)  # 5 shards over 2 ranks: one is left out this epoch
        dist.barrier()
        dataset = TarShardDataset(
            [str(shard_dir / f"shard-{s}.tar") for s in range(5)],
            shuffle=True,
            seed=2,
            decode=lambda sample: int(sample["txt"]),
        )
        seen = [i for batch in aloader.DataLoader(dataset, batch_size=4) for i in batch.tolist()]
        per_rank = gather(seen)
        dist.barrier()  # rank 0's directory outlives every reader
    # The shard left out (an even split) is the one no rank read: coverage is checked over the shards read.
    read = sorted(i for r in per_rank for i in r)
    left_out = sorted(set(range(30)) - set(read))
    remap = {value: position for position, value in enumerate(read)}
    epochs.append(
        {
            "name": "tar shards",
            "n": len(read),
            "per_rank": [[remap[i] for i in r] for r in per_rank],
            "left_out": left_out,
        }
    )
    unequal = unequal_shards_epoch(rank)
    elastic = elastic_save(rank, Path(sys.argv[2]))
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps({"epochs": epochs, "unequal": unequal, "elastic": elastic}))
    dist.destroy_process_group()


ELASTIC_SHARDS = 6  # of 5 samples: 30, and 24 per epoch, 12 per rank of 2 (each rank's 3 shards hold 15)


def elastic_loader(directory: Path) -> aloader.DataLoader[Any]:
    urls = [str(directory / f"shard-{s}.tar") for s in range(ELASTIC_SHARDS)]
    dataset = TarShardDataset(urls, samples_per_epoch=24, decode=lambda sample: int(sample["txt"]))
    return aloader.DataLoader(dataset, batch_size=4)


def elastic_save(rank: int, directory: Path) -> dict[str, Any]:
    """The whole epoch on each rank, then the same epoch again stopped after one batch (the same step on every rank),
    with rank 0's state written to ``directory / "state.json"`` for a job with another number of ranks."""
    if rank == 0:
        write_shards(directory, shards=ELASTIC_SHARDS, per_shard=5)
    dist.barrier()
    whole = [i for batch in elastic_loader(directory) for i in batch.tolist()]
    loader = elastic_loader(directory)
    iterator = iter(loader)
    before = next(iterator).tolist()
    if rank == 0:
        (directory / "state.json").write_text(json.dumps(loader.state_dict()))
    iterator.close()  # "killed" after the checkpoint
    dist.barrier()
    return {"whole": gather(whole), "before": gather(before)}


def elastic_resume() -> None:
    """Resume ``argv[2]``'s state with this job's ranks, stepped like DDP; rank 0 writes what each rank saw."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    directory = Path(sys.argv[2])
    loader = elastic_loader(directory)
    loader.load_state_dict(json.loads((directory / "state.json").read_text()))
    seen: list[int] = []
    steps = 0
    for batch in loader:
        total = batch.sum().double()
        dist.all_reduce(total)  # every rank takes part in every step: the same number of batches on each
        seen += batch.tolist()
        steps += 1
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, {"seen": seen, "steps": steps})
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps({"per_rank": reports}))
    dist.destroy_process_group()


SIZES = [1, 2, 11, 3, 2, 13]  # 32 samples in shards of very unequal sizes
PER_EPOCH = 26  # 13 per rank


def unequal_shards_epoch(rank: int) -> dict[str, Any]:
    """Tar shards of unequal sizes with ``samples_per_epoch``: every rank the same number of batches, stepped like DDP.

    Each step all-reduces a value from the batch, as DDP all-reduces gradients: a rank with fewer batches would leave
    the other waiting in its next step (here: failing after the process group's timeout).
    """
    with tempfile.TemporaryDirectory() as shared:
        paths = [shared if rank == 0 else None]
        dist.broadcast_object_list(paths, src=0)
        shard_dir = Path(paths[0])  # type: ignore[arg-type]
        if rank == 0:
            write_shards(shard_dir, shards=len(SIZES), per_shard=0, sizes=SIZES)
        dist.barrier()
        urls = [str(shard_dir / f"shard-{s}.tar") for s in range(len(SIZES))]
        dataset = TarShardDataset(
            urls, shuffle=True, seed=0, samples_per_epoch=PER_EPOCH, decode=lambda sample: int(sample["txt"])
        )
        dataset.set_epoch(1)
        shards = dataset.shards_for_this_reader()
        seen: list[int] = []
        steps = 0
        for batch in aloader.DataLoader(dataset, batch_size=4):
            total = batch.sum().double()
            dist.all_reduce(total)  # DDP's gradient all-reduce: every rank must take part in every step
            seen += batch.tolist()
            steps += 1
        batches = torch.tensor([steps])
        dist.all_reduce(batches, op=dist.ReduceOp.MAX)
        dist.barrier()  # rank 0's directory outlives every reader
    starts = [sum(SIZES[:s]) for s in range(len(SIZES))]
    held = sum(SIZES[int(Path(url).stem.split("-")[1])] for url in shards)
    own = sorted(
        starts[int(Path(url).stem.split("-")[1])] + i
        for url in shards
        for i in range(SIZES[int(Path(url).stem.split("-")[1])])
    )
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(
        reports, {"steps": steps, "most_steps": int(batches), "seen": seen, "own": own, "held": held}
    )
    return {"per_rank": reports}


if __name__ == "__main__":
    if "--resume" in sys.argv:
        elastic_resume()
    else:
        main()
