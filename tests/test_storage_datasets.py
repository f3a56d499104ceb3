"""ObjectDataset and TarShardDataset through aloader.DataLoader, against real servers on 127.0.0.1."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aloader
from aloader.bench.objectserver import Faults, ObjectServer
from aloader.datasets import ObjectDataset, TarShardDataset, expand_braces, split_key
from aloader.datasets._tar import TarStreamParser
from aloader.errors import ObjectNotFoundError, ShardFormatError
from aloader.storage import RetryPolicy
from tests.conftest import Driver
from tests.servers import make_shard, sample_payload

pytestmark = pytest.mark.usefixtures("object_server", "s3")

FAST = RetryPolicy(max_attempts=8, base_delay=0.001, max_delay=0.01)
SHARDS, PER_SHARD = 6, 15
SHARD_OBJECTS = {f"shards/train-{s:06d}.tar": make_shard(s, PER_SHARD) for s in range(SHARDS)}
IMAGES = {f"images/{i:04d}.{'png' if i % 3 else 'json'}": f"object {i}".encode() for i in range(40)}
PATTERN = "train-{000000..000005}.tar"
ALL_TEXTS = {sample_payload(s, i, "txt") for s in range(SHARDS) for i in range(PER_SHARD)}


@pytest.fixture(scope="module")
def bucket(s3: Any) -> Any:
    s3.put("datasets", {**SHARD_OBJECTS, **IMAGES})
    return s3


@pytest.fixture
def http(object_server: ObjectServer) -> Any:
    object_server.objects = {**SHARD_OBJECTS, **IMAGES}
    object_server.faults = Faults()
    object_server.reset_counters()
    yield object_server
    object_server.objects = {}
    object_server.faults = Faults()


# ---------------------------------------------------------------------------------------------- ObjectDataset
def test_object_dataset_over_a_prefix(driver: Driver, bucket: Any) -> None:
    dataset = ObjectDataset("s3://datasets/images/", suffixes=".png", storage_options=bucket.options(), retry=FAST)
    expected_keys = sorted(k for k in IMAGES if k.endswith(".png"))
    assert dataset.urls == [f"s3://datasets/{k}" for k in expected_keys]
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=4, concurrency=16))
    assert [sample for batch in batches for sample in batch] == [IMAGES[k] for k in expected_keys]


def test_object_dataset_decode_and_explicit_urls(driver: Driver, http: ObjectServer) -> None:
    keys = sorted(IMAGES)[::-1]  # an explicit list keeps its order
    dataset = ObjectDataset([http.url(k) for k in keys], decode=lambda data: data.decode().upper(), retry=FAST)
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=5))
    assert [s for batch in batches for s in batch] == [IMAGES[k].decode().upper() for k in keys]


def test_object_dataset_with_faults_delivers_each_sample_once(driver: Driver, http: ObjectServer) -> None:
    http.faults = Faults(every=3, times=2, kinds=("503", "drop", "cut", "429"))
    keys = sorted(IMAGES)
    dataset = ObjectDataset([http.url(k) for k in keys], retry=FAST)
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=8, shuffle=True, concurrency=32))
    got = [s for batch in batches for s in batch]
    assert Counter(got) == Counter(IMAGES[k] for k in keys)
    assert http.faults_injected > 0


def test_object_dataset_missing_object_raises_at_its_sample(driver: Driver, http: ObjectServer) -> None:
    dataset = ObjectDataset([http.url("images/0001.png"), http.url("images/missing.png")], retry=FAST)
    outcomes = driver.outcomes(aloader.DataLoader(dataset, batch_size=1))
    assert outcomes[0] == ("ok", [IMAGES["images/0001.png"]])
    kind, error = outcomes[1]
    assert kind == "err" and isinstance(error, ObjectNotFoundError)
    assert "sample index 1" in str(error) and "images/missing.png" in str(error)


def test_object_dataset_local_directory(driver: Driver, tmp_path: Path) -> None:
    for key, data in IMAGES.items():
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(data)
    dataset = ObjectDataset(str(tmp_path / "images"), suffixes=[".json"], decode=len)
    assert len(dataset) == len([k for k in IMAGES if k.endswith(".json")])
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=None))
    assert [int(b) for b in batches] == [len(IMAGES[k]) for k in sorted(IMAGES) if k.endswith(".json")]


def test_object_dataset_from_prefix_inside_a_loop(bucket: Any) -> None:
    async def main() -> ObjectDataset:
        with pytest.raises(RuntimeError, match="inside a running event loop"):
            ObjectDataset("s3://datasets/images/", storage_options=bucket.options())
        return await ObjectDataset.from_prefix("s3://datasets/images/", storage_options=bucket.options())

    dataset = Driver("async-asyncio").run_async(main)
    assert len(dataset) == len(IMAGES)
    assert "secret" not in repr(dataset).replace("secret_access_key", "")


def test_object_dataset_pickles(bucket: Any) -> None:
    dataset = ObjectDataset("s3://datasets/images/", storage_options=bucket.options(), retry=FAST)
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.urls == dataset.urls and clone.store._clients == {}


# -------------------------------------------------------------------------------------------- TarShardDataset
def samples_of(batches: list[Any]) -> list[dict[str, Any]]:
    return list(batches)


def test_tar_shards_from_s3(driver: Driver, bucket: Any) -> None:
    dataset = TarShardDataset(
        f"s3://datasets/shards/{PATTERN}", storage_options=bucket.options(), retry=FAST, chunk_size=4096
    )
    samples = driver.collect(aloader.DataLoader(dataset, batch_size=None))
    assert len(samples) == SHARDS * PER_SHARD
    assert {s["txt"] for s in samples} == ALL_TEXTS
    first = samples[0]
    assert set(first) == {"__key__", "__url__", "txt", "cls"}
    assert first["__key__"] == "s000/00000" and first["__url__"] == "s3://datasets/shards/train-000000.tar"
    # Round-robin over the shards being read: the first samples come from different shards, in order.
    assert [s["__key__"] for s in samples[:4]] == ["s000/00000", "s001/00000", "s002/00000", "s003/00000"]


def test_tar_shards_with_faults_deliver_each_sample_once(driver: Driver, http: ObjectServer) -> None:
    http.faults = Faults(every=2, times=2, kinds=("503", "drop", "cut"))
    dataset = TarShardDataset(
        f"{http.base_url}/shards/{PATTERN}", retry=FAST, chunk_size=1024, shuffle=True, shuffle_buffer=7
    )
    samples = driver.collect(aloader.DataLoader(dataset, batch_size=None))
    assert sorted(s["txt"] for s in samples) == sorted(ALL_TEXTS)
    assert http.faults_injected > 0


def test_tar_shuffle_is_seeded_by_seed_and_epoch(http: ObjectServer) -> None:
    def order(seed: int, epoch: int) -> list[str]:
        dataset = TarShardDataset(f"{http.base_url}/shards/{PATTERN}", shuffle=True, seed=seed, shuffle_buffer=10)
        dataset.set_epoch(epoch)
        return [s["__key__"] for s in aloader.DataLoader(dataset, batch_size=None)]

    first = order(0, 0)
    assert order(0, 0) == first
    assert order(0, 1) != first
    assert order(1, 0) != first
    assert sorted(first) == sorted(order(0, 1))


def test_tar_decode_and_batching(driver: Driver, http: ObjectServer) -> None:
    def decode(sample: dict[str, Any]) -> tuple[str, int]:
        return sample["txt"].decode(), int(sample["cls"])

    dataset = TarShardDataset(f"{http.base_url}/shards/{PATTERN}", decode=decode, shard_concurrency=2)
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=10))
    assert len(batches) == SHARDS * PER_SHARD // 10
    texts, labels = batches[0]
    assert len(texts) == 10 and labels.shape == (10,)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_tar_decode_runs_keep_order_and_fail_at_the_sample(driver: Driver, http: ObjectServer, kind: str) -> None:
    """Samples are decoded in runs (one thread call per run for a sync decode, awaited together for an async one):
    the order is the undecoded order, and a decode that raises at sample 37 yields the 37 before it, then raises
    its own exception there, chained, with the iterable's position."""
    seen: list[str] = []

    def decode_sync(sample: dict[str, Any]) -> str:
        seen.append(sample["txt"].decode())
        if len(seen) == 38:
            raise ValueError(f"cannot decode {sample['__key__']}")
        return sample["txt"].decode()

    async def decode_async(sample: dict[str, Any]) -> str:
        return decode_sync(sample)

    url = f"{http.base_url}/shards/{PATTERN}"
    plain = [
        sample["txt"].decode() for sample in driver.collect(aloader.DataLoader(TarShardDataset(url), batch_size=None))
    ]
    dataset = TarShardDataset(url, decode=decode_sync if kind == "sync" else decode_async)
    outcomes = driver.outcomes(aloader.DataLoader(dataset, batch_size=None))
    assert [value for k, value in outcomes if k == "ok"] == plain[:37]
    kind_of_last, error = outcomes[37]
    assert kind_of_last == "err" and isinstance(error, ValueError)
    assert "cannot decode" in str(error) and "item 37" in str(error)
    assert isinstance(error.__cause__, ValueError)
    assert len(outcomes) == 38


@pytest.mark.parametrize(("world", "workers"), [(2, 1), (3, 2)])
def test_tar_shards_split_across_ranks_and_workers(
    http: ObjectServer, monkeypatch: pytest.MonkeyPatch, world: int, workers: int
) -> None:
    import torch.utils.data

    seen: list[str] = []
    for rank in range(world):
        for worker in range(workers):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            info = type("Info", (), {"id": worker, "num_workers": workers})()
            monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
            dataset = TarShardDataset(f"{http.base_url}/shards/{PATTERN}", shuffle=True, seed=3)
            seen += [s["txt"] for s in aloader.DataLoader(dataset, batch_size=None)]
    assert sorted(seen) == sorted(ALL_TEXTS)  # each sample exactly once over all ranks and workers


def test_tar_split_can_be_turned_off(http: ObjectServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dataset = TarShardDataset(f"{http.base_url}/shards/{PATTERN}", split_by_rank=False)
    assert dataset.shards_for_this_reader() == dataset.shards
    assert len(TarShardDataset(f"{http.base_url}/shards/{PATTERN}").shards_for_this_reader()) == SHARDS // 2


def test_tar_missing_shard(driver: Driver, http: ObjectServer) -> None:
    dataset = TarShardDataset(http.base_url + "/shards/train-{000000..000009}.tar", retry=FAST)
    outcomes = driver.outcomes(aloader.DataLoader(dataset, batch_size=None))
    errors = [value for kind, value in outcomes if kind == "err"]
    assert len(errors) == 1 and isinstance(errors[0], ObjectNotFoundError)
    assert "train-000006.tar" in str(errors[0])


def test_tar_truncated_shard(driver: Driver, http: ObjectServer) -> None:
    http.objects["shards/broken.tar"] = SHARD_OBJECTS["shards/train-000000.tar"][:1500]
    outcomes = driver.outcomes(aloader.DataLoader(TarShardDataset(http.url("shards/broken.tar")), batch_size=None))
    assert isinstance(outcomes[-1][1], ShardFormatError)
    assert "broken.tar" in str(outcomes[-1][1]) and "truncated" in str(outcomes[-1][1])


def test_tar_break_stops_the_readers(driver: Driver, http: ObjectServer) -> None:
    dataset = TarShardDataset(f"{http.base_url}/shards/{PATTERN}", prefetch_per_shard=2)
    assert len(driver.collect(aloader.DataLoader(dataset, batch_size=None), limit=3)) == 3


# ------------------------------------------------------------------------------------------------- the parts
def test_expand_braces() -> None:
    assert expand_braces("s3://b/train-{000..002}.tar") == [f"s3://b/train-{i:03d}.tar" for i in range(3)]
    assert expand_braces("a-{1..3}-{x,y}") == ["a-1-x", "a-1-y", "a-2-x", "a-2-y", "a-3-x", "a-3-y"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="counts down"):
        expand_braces("{5..1}")


def test_split_key() -> None:
    assert split_key("train/00042.seg.png") == ("train/00042", "seg.png")
    assert split_key("00042.jpg") == ("00042", "jpg")
    assert split_key("dir.v1/abc") == ("dir.v1/abc", "")


def tar_bytes(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@settings(max_examples=40, deadline=None)
@given(
    members=st.lists(
        st.tuples(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=150), st.binary(max_size=2000)),
        max_size=6,
    ),
    chunk=st.integers(min_value=1, max_value=3000),
    fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
)
def test_tar_parser_matches_tarfile_for_any_chunking(members: list[tuple[str, bytes]], chunk: int, fmt: int) -> None:
    data = tar_bytes(members, fmt)
    parser = TarStreamParser("mem://x")
    got = [item for start in range(0, len(data), chunk) for item in parser.feed(data[start : start + chunk])]
    parser.close()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        expected = [(m.name, archive.extractfile(m).read()) for m in archive.getmembers() if m.isfile()]  # type: ignore[union-attr]
    assert got == expected


@settings(max_examples=50, deadline=None)
@given(
    shards=st.integers(min_value=1, max_value=40),
    world=st.integers(min_value=1, max_value=5),
    workers=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=2**16),
    epoch=st.integers(min_value=0, max_value=10),
)
def test_shard_split_is_disjoint_and_complete(shards: int, world: int, workers: int, seed: int, epoch: int) -> None:
    import os
    from unittest import mock

    import torch.utils.data

    taken: list[list[str]] = []
    urls = [f"s3://b/{i}.tar" for i in range(shards)]
    for even_split in (True, False):
        taken = []
        for rank in range(world):
            for worker in range(workers):
                info = type("Info", (), {"id": worker, "num_workers": workers})()
                env = {"RANK": str(rank), "WORLD_SIZE": str(world)}
                with (
                    mock.patch.dict(os.environ, env),
                    mock.patch.object(torch.utils.data, "get_worker_info", lambda i=info: i),
                ):
                    dataset = TarShardDataset(urls, shuffle=True, seed=seed, even_split=even_split)
                    dataset.set_epoch(epoch)
                    taken.append(dataset.shards_for_this_reader())
                    # Stable under resume: a new reader loading this one's state reads the same shards.
                    again = TarShardDataset(urls, shuffle=True, seed=seed + 1, even_split=even_split)
                    again.load_state_dict(dataset.state_dict())
                    assert again.shards_for_this_reader() == taken[-1]
        flat = [url for reader in taken for url in reader]
        assert len(flat) == len(set(flat))  # disjoint
        if even_split and world > 1:
            assert len({len(reader) for reader in taken}) == 1  # balanced: every reader the same count
            assert len(urls) - len(flat) < world * workers  # only the remainder is left out
        else:
            assert sorted(flat) == sorted(urls)  # complete


def test_public_names() -> None:
    import aloader.datasets

    for name in aloader.datasets.__all__:
        assert hasattr(aloader.datasets, name), name


# ------------------------------------------------------------------------------------------- samples_per_epoch
def write_local_shards(directory: Path, sizes: list[int]) -> list[str]:
    """Shards of the given sample counts; sample ``"s/i"`` is the ``i``-th of shard ``s``."""
    urls = []
    for s, size in enumerate(sizes):
        path = directory / f"shard-{s:03d}.tar"
        path.write_bytes(
            tar_bytes([(f"{s:03d}/{i:04d}.txt", f"{s}/{i}".encode()) for i in range(size)], tarfile.GNU_FORMAT)
        )
        urls.append(str(path))
    return urls


def read_as_reader(
    dataset: TarShardDataset, rank: int, world: int, worker: int, workers: int
) -> tuple[list[str], list[str], dict[str, Any]]:
    """(its shards, its samples, its state at the end): iterate ``dataset`` as reader (rank, worker) of (world,
    workers) would, straight (no DataLoader)."""
    import asyncio
    import os
    from unittest import mock

    import torch.utils.data

    info = type("Info", (), {"id": worker, "num_workers": workers})()

    async def collect() -> list[str]:
        return [sample["txt"].decode() async for sample in dataset]

    with (
        mock.patch.dict(os.environ, {"RANK": str(rank), "WORLD_SIZE": str(world)}),
        mock.patch.object(torch.utils.data, "get_worker_info", return_value=info),
    ):
        shards, got = dataset.shards_for_this_reader(), asyncio.run(collect())
        return shards, got, dataset.state_dict()


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=8),
    world=st.integers(min_value=1, max_value=3),
    workers=st.integers(min_value=1, max_value=3),
    per_sample=st.floats(min_value=0.1, max_value=2.5),
    shuffle=st.booleans(),
    seed=st.integers(min_value=0, max_value=100),
    concurrency=st.integers(min_value=1, max_value=3),
)
def test_samples_per_epoch_gives_every_reader_its_exact_count(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    world: int,
    workers: int,
    per_sample: float,
    shuffle: bool,
    seed: int,
    concurrency: int,
) -> None:
    readers = world * workers
    sizes = sizes + [1] * (readers - len(sizes))  # every reader needs a shard
    for slot in range(readers):
        if not any(sizes[slot::readers]):
            sizes[slot] = 1  # ... holding a sample (else it raises, tested below)
    if shuffle:
        sizes = [max(size, 1) for size in sizes]  # shuffled, any shard may be a reader's only one
    urls = write_local_shards(tmp_path_factory.mktemp("shards"), sizes)
    total = max(1, int(sum(sizes) * per_sample))  # below, at or above the samples the shards hold

    def make() -> TarShardDataset:
        return TarShardDataset(
            urls, samples_per_epoch=total, shuffle=shuffle, seed=seed, shuffle_buffer=3, shard_concurrency=concurrency
        )

    seen: list[str] = []
    cycled = False
    for rank in range(world):
        per_rank = 0
        for worker in range(workers):
            dataset = make()
            dataset.set_epoch(1)
            shards, got, state = read_as_reader(dataset, rank, world, worker, workers)
            quota = total // world // workers + (1 if worker < total // world % workers else 0)
            assert len(got) == quota  # exactly its count, the same for worker `worker` on every rank
            own = [f"{s}/{i}" for s in range(len(sizes)) if urls[s] in shards for i in range(sizes[s])]
            assert set(got) <= set(own)  # only its own shards: a split, whatever the sizes
            if quota <= len(own):
                assert len(got) == len(set(got))  # no pass repeated when its shards hold enough
            else:
                cycled = True
                assert set(got) == set(own)  # every sample of its shards, then again
            per_rank += len(got)
            seen += got
            # Stable under resume: a new reader loading this one's state part way yields exactly the rest.
            position = len(got) // 2
            again = make()
            again.load_state_dict({**state, "position": position})
            assert read_as_reader(again, rank, world, worker, workers)[:2] == (shards, got[position:])
        assert per_rank == total // world  # every rank the same number of samples, hence batches
    if not cycled:
        assert len(seen) == len(set(seen))  # disjoint across readers


def test_samples_per_epoch_gives_ranks_equal_batches_through_the_loader(
    driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two ranks: rank 0 reads shards 0 and 2 (3 + 1 samples), rank 1 shard 1 (12): very unequal. The dataset runs
    # in the loader's process (async datasets fetch on its loop even with num_workers), so the rank decides.
    urls = write_local_shards(tmp_path, [3, 12, 1])
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        dataset = TarShardDataset(urls, samples_per_epoch=19, decode=lambda s: s["txt"].decode())
        batches = driver.collect(aloader.DataLoader(dataset, batch_size=2, num_workers=2))
        per_rank.append([s for batch in batches for s in batch])
        assert len(batches) == 5  # 19 // 2 = 9 samples each: 5 batches on both ranks
    # Rank 0 yields its 4 samples, again, and once more the first; rank 1 the first 9 of its 12.
    assert Counter(per_rank[0]) == {"0/0": 3, "0/1": 2, "0/2": 2, "2/0": 2}
    assert per_rank[1] == [f"1/{i}" for i in range(9)]
    # Without samples_per_epoch: the same number of shards each (one cut: 2 of 3 read), unequal batch counts.
    counts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        counts.append(len(driver.collect(aloader.DataLoader(TarShardDataset(urls), batch_size=2))))
    assert counts == [2, 6]


def test_samples_per_epoch_stops_the_shard_readers(driver: Driver, http: ObjectServer) -> None:
    dataset = TarShardDataset(f"{http.base_url}/shards/{PATTERN}", samples_per_epoch=5, prefetch_per_shard=2)
    assert len([s for b in driver.collect(aloader.DataLoader(dataset, batch_size=None)) for s in [b]]) == 5


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "10"])
def test_samples_per_epoch_must_be_a_positive_integer(value: Any) -> None:
    with pytest.raises(
        ValueError, match=rf"samples_per_epoch should be a positive integer .* got samples_per_epoch={value!r}"
    ):
        TarShardDataset("a.tar", samples_per_epoch=value)


def test_samples_per_epoch_needs_a_shard_per_reader(
    driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = write_local_shards(tmp_path, [4])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    outcomes = driver.outcomes(aloader.DataLoader(TarShardDataset(urls, samples_per_epoch=4), batch_size=None))
    assert len(outcomes) == 1 and isinstance(outcomes[0][1], ValueError)
    assert "needs at least one shard per reader, but there are 1 shards for 2 readers" in str(outcomes[0][1])
    empty = write_local_shards(tmp_path / "e", [0]) if (tmp_path / "e").mkdir() is None else []
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    outcomes = driver.outcomes(aloader.DataLoader(TarShardDataset(empty, samples_per_epoch=4), batch_size=None))
    assert len(outcomes) == 1 and "hold no samples" in str(outcomes[0][1])
