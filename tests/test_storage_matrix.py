"""One test matrix over every kind of store aloader reads, each a real server on 127.0.0.1 (or the disk):

- ``s3``: moto's S3 server (pages of ``S3_PAGE_SIZE`` keys; a second moto server checks credentials);
- ``gs``: fake-gcs-server (no authentication; lists a prefix in one page);
- ``az``: Azurite's blob service (shared-key and SAS signatures checked; pages of 5000 blobs);
- ``http``: aloader's object server (no listing, no authentication);
- ``local``: files in a temporary directory.

What a server cannot show is skipped with the reason, never passed in silence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import aloader
from aloader import storage
from aloader.datasets import ObjectDataset, ObjectStreamDataset, TarShardDataset
from aloader.errors import AccessDeniedError, BucketNotFoundError, ObjectNotFoundError
from aloader.storage import RetryPolicy, Store
from tests.conftest import Driver
from tests.servers import S3_PAGE_SIZE, make_shard, sample_payload

pytestmark = pytest.mark.usefixtures("object_server", "s3", "s3_with_auth", "gcs", "azurite")

FAST = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.01)
BUCKET = "matrix"
OBJECTS = {f"objs/{i:03d}.bin": f"object {i} ".encode() * (1 + i % 7) for i in range(3 * S3_PAGE_SIZE + 4)}
SHARDS, PER_SHARD = 4, 5
SHARD_OBJECTS = {f"shards/train-{s}.tar": make_shard(s, PER_SHARD) for s in range(SHARDS)}
ALL_TEXTS = sorted(sample_payload(s, i, "txt") for s in range(SHARDS) for i in range(PER_SHARD))
SCHEMES = ["s3", "gs", "az", "http", "local"]


@dataclass
class Bucket:
    """One store holding ``OBJECTS`` and ``SHARD_OBJECTS``, and what its server can show."""

    scheme: str
    root: str
    options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    lists: bool = True
    page_size: int | None = None  # keys per listing page, when the server pages
    missing_bucket: str | None = None  # the root of a bucket that does not exist
    bad_credentials: dict[str, Any] | None = None  # options the server refuses, or None: it checks none
    skip: dict[str, str] = field(default_factory=dict)  # feature -> why this server cannot show it

    def url(self, key: str) -> str:
        return f"{self.root}/{key}"

    def require(self, feature: str) -> None:
        if feature in self.skip:
            pytest.skip(f"{self.scheme}: {self.skip[feature]}")


@pytest.fixture(scope="module", params=SCHEMES)
def bucket(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bucket]:
    scheme = request.param
    objects = {**OBJECTS, **SHARD_OBJECTS}
    if scheme == "s3":
        s3 = request.getfixturevalue("s3")
        s3.put(BUCKET, objects)
        yield Bucket(
            "s3",
            f"s3://{BUCKET}",
            s3.options(),
            {
                "AWS_ENDPOINT_URL": s3.endpoint,
                "AWS_ACCESS_KEY_ID": s3.options()["access_key_id"],
                "AWS_SECRET_ACCESS_KEY": s3.options()["secret_access_key"],
                "AWS_REGION": "us-east-1",
            },
            page_size=S3_PAGE_SIZE,
            missing_bucket="s3://no-such-bucket",
            bad_credentials=request.getfixturevalue("s3_with_auth").options(secret_access_key="wrong-Secret-0000"),
        )
    elif scheme == "gs":
        gcs = request.getfixturevalue("gcs")
        gcs.put(BUCKET, objects)
        yield Bucket(
            "gs",
            f"gs://{BUCKET}",
            gcs.options(),
            gcs.env(),
            skip={
                "pages": "fake-gcs-server answers a listing in one page (it ignores GCS's page size)",
                "missing bucket": "fake-gcs-server answers a listing of a missing bucket with HTTP 500, where GCS "
                "answers 404 NoSuchBucket (aloader would retry it as a transient fault)",
                "credentials": "fake-gcs-server checks no credentials",
            },
        )
    elif scheme == "az":
        azurite = request.getfixturevalue("azurite")
        azurite.put(BUCKET, objects)
        yield Bucket(
            "az",
            f"az://{BUCKET}",
            azurite.options(),
            azurite.env(),
            missing_bucket="az://no-such-container",
            bad_credentials=azurite.options(account_key="V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="),
            skip={
                "pages": "Azurite pages at 5000 blobs, and obstore asks for no smaller page: one page here",
            },
        )
    elif scheme == "http":
        server = request.getfixturevalue("object_server")
        server.objects = dict(objects)
        yield Bucket(
            "http",
            server.base_url,
            lists=False,
            skip={
                "pages": "HTTP has no listing",
                "listing": "HTTP has no listing (datasets take explicit URLs)",
                "missing bucket": "HTTP has no buckets",
                "credentials": "aloader's object server checks no credentials",
                "bench": "run over HTTP by tests/test_bench.py::test_embedded_default_end_to_end (20 s a run)",
            },
        )
        server.objects = {}
    else:
        root = tmp_path_factory.mktemp("matrix")
        for key, data in objects.items():
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(data)
        yield Bucket(
            "local",
            str(root),
            missing_bucket=str(root / "no-such-directory"),
            skip={
                "pages": "a local directory is not paged",
                "credentials": "local files take no credentials",
                "bench": "run on a local directory by tests/test_bench.py::test_local_directory_and_system_choice",
            },
        )


def object_urls(bucket: Bucket) -> list[str]:
    return [bucket.url(key) for key in sorted(OBJECTS)]


def object_source(bucket: Bucket) -> str | list[str]:
    """The prefix of the objects, or their URLs where the store has no listing."""
    return bucket.url("objs/") if bucket.lists else object_urls(bucket)


# ------------------------------------------------------------------------------------------------- datasets
def test_object_dataset(driver: Driver, bucket: Bucket) -> None:
    dataset = ObjectDataset(object_source(bucket), storage_options=bucket.options, retry=FAST)
    assert dataset.urls == object_urls(bucket)
    batches = driver.collect(aloader.DataLoader(dataset, batch_size=5, concurrency=16))
    assert [sample for batch in batches for sample in batch] == [OBJECTS[key] for key in sorted(OBJECTS)]


def test_object_stream_dataset(driver: Driver, bucket: Bucket) -> None:
    dataset = ObjectStreamDataset(
        object_source(bucket), storage_options=bucket.options, retry=FAST, shuffle=True, seed=3, decode=bytes.decode
    )
    samples = [s for batch in driver.collect(aloader.DataLoader(dataset, batch_size=4)) for s in batch]
    assert sorted(samples) == sorted(data.decode() for data in OBJECTS.values())
    assert samples != [OBJECTS[key].decode() for key in sorted(OBJECTS)]  # shuffled


def test_tar_shard_dataset(driver: Driver, bucket: Bucket) -> None:
    source: str | list[str] = bucket.url("shards/train-{0..3}.tar")
    if bucket.lists:  # the shards of a prefix, listed
        source = asyncio.run(Store(bucket.options).list_prefix(bucket.url("shards/train-")))
        assert source == [bucket.url(key) for key in sorted(SHARD_OBJECTS)]
    dataset = TarShardDataset(source, storage_options=bucket.options, retry=FAST, chunk_size=1024)
    samples = driver.collect(aloader.DataLoader(dataset, batch_size=None))
    assert sorted(s["txt"] for s in samples) == ALL_TEXTS
    assert {s["__url__"] for s in samples} == {bucket.url(key) for key in SHARD_OBJECTS}


def test_listing_spans_several_pages(bucket: Bucket) -> None:
    bucket.require("listing")
    bucket.require("pages")
    assert bucket.page_size is not None and len(OBJECTS) > 2 * bucket.page_size
    urls = asyncio.run(storage.list_prefix(bucket.url("objs/"), storage_options=bucket.options))
    assert urls == object_urls(bucket)


def test_resumed_epoch(driver: Driver, bucket: Bucket) -> None:
    def loader() -> aloader.DataLoader:
        dataset = ObjectDataset(object_source(bucket), storage_options=bucket.options, retry=FAST)
        return aloader.DataLoader(dataset, batch_size=4, shuffle=True, generator=torch_generator())

    reference = [list(batch) for batch in driver.collect(loader())]
    first = loader()
    state = taken_after(driver, first, 3)
    resumed = loader()
    resumed.load_state_dict(state)
    assert [list(batch) for batch in driver.collect(resumed)] == reference[3:]


def torch_generator() -> Any:
    import torch

    return torch.Generator().manual_seed(7)


def taken_after(driver: Driver, loader: aloader.DataLoader, batches: int) -> dict[str, Any]:
    """The loader's state after ``batches`` batches were received, then the iterator closed."""
    if not driver.is_async:
        iterator = iter(loader)
        for _ in range(batches):
            next(iterator)
        state = loader.state_dict()
        iterator.close()  # type: ignore[attr-defined]
        return state

    async def run() -> dict[str, Any]:
        iterator = aiter(loader)
        for _ in range(batches):
            await anext(iterator)
        state = loader.state_dict()
        await iterator.aclose()  # type: ignore[attr-defined]
        return state

    result: dict[str, Any] = driver.run_async(run)
    return result


# --------------------------------------------------------------------------------------------------- reads
def test_ranged_reads(bucket: Bucket) -> None:
    key = sorted(OBJECTS)[6]
    data = OBJECTS[key]
    store = Store(bucket.options, retry=FAST)

    async def main() -> None:
        assert await store.read_range(bucket.url(key), 3, 17) == data[3:17]
        assert await store.read_range(bucket.url(key), 0, len(data)) == data
        assert await store.read_range(bucket.url(key), len(data) - 1, len(data)) == data[-1:]
        assert (await store.stat(bucket.url(key))).size == len(data)
        chunks = [chunk async for chunk in store.stream(bucket.url("shards/train-1.tar"), chunk_size=700)]
        assert b"".join(chunks) == SHARD_OBJECTS["shards/train-1.tar"]

    asyncio.run(main())


def test_missing_object(driver: Driver, bucket: Bucket) -> None:
    missing = bucket.url("objs/no-such-object.bin")
    dataset = ObjectDataset([bucket.url(sorted(OBJECTS)[0]), missing], storage_options=bucket.options, retry=FAST)
    outcomes = driver.outcomes(aloader.DataLoader(dataset, batch_size=1))
    assert outcomes[0] == ("ok", [OBJECTS[sorted(OBJECTS)[0]]])
    kind, error = outcomes[1]
    assert kind == "err" and isinstance(error, ObjectNotFoundError), error
    assert missing in str(error) and "sample index 1" in str(error)


def test_missing_bucket(bucket: Bucket) -> None:
    bucket.require("missing bucket")
    assert bucket.missing_bucket is not None
    prefix = f"{bucket.missing_bucket}/objs/"
    expected = FileNotFoundError if bucket.scheme == "local" else BucketNotFoundError
    with pytest.raises(expected) as raised:
        ObjectDataset(prefix, storage_options=bucket.options, retry=FAST)
    assert bucket.missing_bucket in str(raised.value)
    with pytest.raises(expected):
        asyncio.run(storage.read(f"{bucket.missing_bucket}/objs/000.bin", storage_options=bucket.options))


def test_bad_credentials(bucket: Bucket, caplog: pytest.LogCaptureFixture) -> None:
    bucket.require("credentials")
    assert bucket.bad_credentials is not None
    caplog.set_level(logging.DEBUG)
    secrets = [v for k, v in bucket.bad_credentials.items() if "key" in k and "id" not in k]
    store = Store(bucket.bad_credentials, retry=FAST)
    with pytest.raises(AccessDeniedError) as raised:
        asyncio.run(store.read(bucket.url(sorted(OBJECTS)[0])))
    shown = [str(raised.value), repr(store), *(record.getMessage() for record in caplog.records)]
    assert secrets and not [text for text in shown for secret in secrets if secret in text]


@pytest.mark.slow
def test_bench_reads_every_object(bucket: Bucket, tmp_path: Path) -> None:
    """``aloader bench URL`` with the credentials and endpoint in the environment, as a user runs it."""
    bucket.require("bench")
    source = object_source(bucket)
    target = source if isinstance(source, str) else bucket.url("shards/train-{0..3}.tar")
    expected = len(OBJECTS) if isinstance(source, str) else SHARDS * PER_SHARD
    out = tmp_path / "bench.json"
    env = {**os.environ, **bucket.env}
    command = [sys.executable, "-m", "aloader", "bench", target, "--systems", "aloader", "--no-progress"]
    result = subprocess.run(
        [*command, "--batch-size", "4", "--json", str(out)], capture_output=True, text=True, env=env, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    (system,) = report["systems"]
    assert system["error"] is None and system["samples"] == expected, system
