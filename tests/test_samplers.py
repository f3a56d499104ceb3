"""``aloader.samplers.DistributedSampler``: torch's indices per rank, resumable, elastic; and a real torchrun job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils.data
from hypothesis import given, settings
from hypothesis import strategies as st

import aloader
import aloader.samplers
from aloader.samplers import DistributedSampler
from tests.conftest import Driver
from tests.reliability_datasets import Numbers

ROOT = Path(__file__).resolve().parent.parent


sizes = st.integers(min_value=1, max_value=60)
worlds = st.integers(min_value=1, max_value=6)


@settings(max_examples=60, deadline=None)
@given(n=sizes, world=worlds, seed=st.integers(0, 2**16), epoch=st.integers(0, 5), shuffle=st.booleans(),
       drop_last=st.booleans())  # fmt: skip
def test_same_indices_per_rank_as_torch(
    n: int, world: int, seed: int, epoch: int, shuffle: bool, drop_last: bool
) -> None:
    for rank in range(world):
        ours = DistributedSampler(range(n), world, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        theirs = torch.utils.data.DistributedSampler(
            range(n),  # type: ignore[arg-type]
            world,
            rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert list(ours) == list(theirs) and len(ours) == len(theirs)


def _epoch(samplers: list[DistributedSampler], steps: int | None = None) -> tuple[list[list[int]], dict[str, Any]]:
    """Each rank's indices for ``steps`` lock-step samples (all, if None), and the state after them (rank 0's)."""
    per_rank = [list(s) for s in samplers]
    taken = [indices[:steps] for indices in per_rank] if steps is not None else per_rank
    return taken, samplers[0].state_at(len(taken[0]))


@settings(max_examples=80, deadline=None)
@given(n=sizes, world=worlds, new_world=worlds, seed=st.integers(0, 99), drop_last=st.booleans(), data=st.data())
def test_sharding_is_disjoint_complete_balanced_and_stable_under_resume(
    n: int, world: int, new_world: int, seed: int, drop_last: bool, data: st.DataObject
) -> None:
    samplers = [DistributedSampler(range(n), world, r, seed=seed, drop_last=drop_last) for r in range(world)]
    full, _ = _epoch(samplers)
    assert len({len(indices) for indices in full}) == 1  # balanced: every rank the same count
    seen = [i for indices in full for i in indices]
    if drop_last:
        assert len(seen) == len(set(seen)) and n - len(seen) < world  # disjoint; only the remainder dropped
    else:
        assert set(seen) == set(range(n)) and len(seen) - n < world  # complete; padding repeats fewer than W

    # Stop after some lock-step samples, resume every rank of a new world size from rank 0's state.
    steps = data.draw(st.integers(0, len(full[0])))
    before, state = _epoch(samplers, steps)
    state = json.loads(json.dumps(state))
    resumed = [DistributedSampler(range(n), new_world, r, seed=seed, drop_last=drop_last) for r in range(new_world)]
    for sampler in resumed:
        sampler.load_state_dict(state)
    after, _ = _epoch(resumed)
    assert len({len(indices) for indices in after}) == 1  # still balanced
    first = [i for indices in before for i in indices]
    rest = [i for indices in after for i in indices]
    if new_world == world:
        assert [b + a for b, a in zip(before, after, strict=True)] == full  # the same indices as uninterrupted
    seen = first + rest
    repeats = len(seen) - len(set(seen))
    if drop_last:
        assert repeats == 0 and set(seen) <= set(range(n))  # none repeated; only remainders dropped
    else:
        assert set(seen) == set(range(n))  # none lost
        assert repeats < world + new_world  # none repeated but torch's padding of each split


def test_next_epoch_after_a_resume_is_torch_order_again() -> None:
    sampler = DistributedSampler(range(10), 2, 0, seed=1)
    sampler.load_state_dict({"epoch": 0, "seed": 1, "start": 4})
    assert len(list(sampler)) == 3  # 6 left over 2 ranks
    sampler.set_epoch(1)
    theirs = torch.utils.data.DistributedSampler(range(10), 2, 0, seed=1)  # type: ignore[arg-type]
    theirs.set_epoch(1)
    assert list(sampler) == list(theirs)


def test_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    sampler = DistributedSampler(range(9))
    assert (sampler.rank, sampler.num_replicas) == (2, 3)
    with pytest.raises(ValueError, match=r"Invalid rank 3, rank should be in the interval \[0, 2\]"):
        DistributedSampler(range(9), rank=3)
    with pytest.raises(ValueError, match="shuffle=False"):
        DistributedSampler(range(9), 3, 0).load_state_dict({"epoch": 0, "seed": 0, "start": 0, "shuffle": False})


@pytest.mark.parametrize("cls", [torch.utils.data.DistributedSampler, DistributedSampler])
def test_distributed_samplers_give_torchs_batches(driver: Driver, cls: Any) -> None:
    batches = {}
    for rank in range(3):
        sampler = cls(range(20), num_replicas=3, rank=rank, seed=5)
        sampler.set_epoch(2)
        ours = driver.collect(aloader.DataLoader(Numbers(20), batch_size=3, sampler=sampler))
        theirs = list(torch.utils.data.DataLoader(Numbers(20), batch_size=3, sampler=sampler))
        assert [b.tolist() for b in ours] == [b.tolist() for b in theirs]
        batches[rank] = len(ours)
    assert len(set(batches.values())) == 1


def test_loader_resumes_with_another_world_size(driver: Driver) -> None:
    """2 ranks stop mid-epoch; 3 ranks resume from rank 0's loader state: the epoch's samples exactly once."""
    n, batch = 29, 2

    def loader(world: int, rank: int) -> aloader.DataLoader[Any]:
        sampler = DistributedSampler(range(n), world, rank, seed=3)
        return aloader.DataLoader(Numbers(n), batch_size=batch, sampler=sampler)

    first = [loader(2, r) for r in range(2)]
    seen: list[int] = []
    for one in first:
        seen += [i for b in driver.collect(one, limit=3) for i in b.tolist()]
    state = json.loads(json.dumps(first[0].state_dict()))
    assert state["distributed"]["start"] == 3 * batch * 2
    again = [loader(3, r) for r in range(3)]
    counts = []
    for one in again:
        one.load_state_dict(state)
        batches = driver.collect(one)
        counts.append(len(batches))
        seen += [i for b in batches for i in b.tolist()]
    assert len(set(counts)) == 1  # every new rank the same number of batches
    assert set(seen) == set(range(n))  # none lost
    assert len(seen) - n < 3  # none repeated but torch's padding of the re-split remainder (23 over 3 ranks: 1)


def test_public_names() -> None:
    for module in (aloader, aloader.samplers):
        for name in module.__all__:
            assert hasattr(module, name), name


# ------------------------------------------------------------------------------------------------- torchrun
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(ranks: int, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            "--nnodes=1",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(ROOT / "tests" / "ddp_job.py"),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_torchrun_two_ranks_see_each_sample_once_per_epoch(tmp_path: Path) -> None:
    """A real 2-process job (gloo, CPU): ranks gather what they saw; each epoch covers every sample exactly once.
    Then a 3-process job resumes a tar shard epoch the 2 ranks had begun: it reads exactly the rest, split evenly."""
    out = tmp_path / "seen.json"
    _torchrun(2, str(out), str(tmp_path))
    report = json.loads(out.read_text())
    for epoch in report["epochs"]:
        ranks = epoch["per_rank"]
        assert len(ranks) == 2 and len(ranks[0]) == len(ranks[1])  # same number of samples (and batches)
        assert sorted(ranks[0] + ranks[1]) == list(range(epoch["n"])), epoch["name"]  # exactly once
    tar = report["epochs"][-1]
    # 5 shards of 6 over 2 ranks: an even split reads 4, and one whole shard is left out this epoch.
    assert tar["n"] == 24 and len(tar["left_out"]) == 6 and tar["left_out"][0] % 6 == 0
    names = [epoch["name"] for epoch in report["epochs"]]
    assert names == ["sampler epoch 0", "sampler epoch 1 resumed", "tar shards"]
    # Unequal tar shards with samples_per_epoch=26: each rank 13 samples in 4 batches, stepped like DDP (a rank
    # with fewer steps would have failed the other's all_reduce), from its own shards only, again if they hold fewer.
    unequal = report["unequal"]["per_rank"]
    assert [r["steps"] for r in unequal] == [4, 4] and [r["most_steps"] for r in unequal] == [4, 4]
    assert [len(r["seen"]) for r in unequal] == [13, 13]
    assert sorted(unequal[0]["own"] + unequal[1]["own"]) == list(range(32))  # the shards split, none left out
    for r in unequal:
        assert set(r["seen"]) == set(r["own"]) if r["held"] <= 13 else set(r["seen"]) < set(r["own"])
        assert len(set(r["seen"])) == min(13, r["held"])  # a sample again only after all of the rank's shards
    # Seed 0 gives one rank shards holding 26 samples, the other 6: split by shards alone, one rank would run
    # 7 batches and the other 2 (and DDP would hang).
    assert sorted(r["held"] for r in unequal) == [6, 26]

    # World size 2 -> 3: rank 0's state after one batch (4 samples on each rank) resumes 3 ranks, stepped like DDP.
    elastic = report["elastic"]
    whole, before = elastic["whole"], elastic["before"]
    assert [len(r) for r in whole] == [12, 12] and before == [r[:4] for r in whole]
    resumed = tmp_path / "resumed.json"
    _torchrun(3, str(resumed), str(tmp_path), "--resume")
    after = json.loads(resumed.read_text())["per_rank"]
    assert [r["steps"] for r in after] == [2, 2, 2]  # every rank the same batches: 16 left, 5 each, 1 left out
    assert [len(r["seen"]) for r in after] == [5, 5, 5]
    # Exactly the old ranks' rest, in rank order, cut evenly: none twice, none lost but the one left over.
    assert [i for r in after for i in r["seen"]] == (whole[0][4:] + whole[1][4:])[:15]
