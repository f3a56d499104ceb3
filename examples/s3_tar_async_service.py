"""Stream tar shards from S3 inside an async service, with ``async for``.

An async application (a web service, an evaluation worker) already runs an event loop. Iterating
``aloader.DataLoader`` with ``async for`` runs the shard readers as tasks of that same loop: the service's other
tasks -- here a heartbeat and a request handler -- keep running while shards stream in. The script starts its own
S3-compatible server (moto) on 127.0.0.1 and uploads generated shards first. Run:
``python examples/s3_tar_async_service.py``.
"""

import asyncio
import io
import json
import tarfile

import boto3
from moto.server import ThreadedMotoServer

import aloader
from aloader import storage
from aloader.datasets import TarShardDataset

N_SHARDS, PER_SHARD = 6, 50
BUCKET = "eval-data"


def make_shard(shard: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for i in range(PER_SHARD):
            record = json.dumps({"id": shard * PER_SHARD + i, "text": f"document {i} of shard {shard}"}).encode()
            info = tarfile.TarInfo(f"doc-{shard:02d}-{i:04d}.json")
            info.size = len(record)
            archive.addfile(info, io.BytesIO(record))
    return buffer.getvalue()


async def decode(sample: dict) -> dict:
    """An ``async def`` decode runs on the loop: cheap parsing is fine here."""
    return json.loads(sample["json"])


async def heartbeat(beats: list[float]) -> None:
    while True:
        await asyncio.sleep(0.005)
        beats.append(asyncio.get_running_loop().time())


async def serve(endpoint: str) -> None:
    options = {"endpoint": endpoint, "region": "us-east-1", "access_key_id": "example", "secret_access_key": "example"}
    shards = await storage.list_prefix(f"s3://{BUCKET}/eval-", storage_options=options)  # async: the loop stays free
    dataset = TarShardDataset(shards, decode=decode, shard_concurrency=3, storage_options=options)
    beats: list[float] = []
    beating = asyncio.create_task(heartbeat(beats))
    ids: list[int] = []
    async for batch in aloader.DataLoader(dataset, batch_size=25, collate_fn=list):
        ids.extend(record["id"] for record in batch)
    beating.cancel()
    assert sorted(ids) == list(range(N_SHARDS * PER_SHARD)), "every document exactly once"
    print(f"{len(ids)} documents from {len(shards)} shards; the heartbeat ran {len(beats)} times meanwhile")


def main() -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        s3.create_bucket(Bucket=BUCKET)
        for shard in range(N_SHARDS):
            s3.put_object(Bucket=BUCKET, Key=f"eval-{shard:06d}.tar", Body=make_shard(shard))
        asyncio.run(serve(endpoint))
        print(f"OK: served {N_SHARDS * PER_SHARD} documents from s3://{BUCKET} with async for")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
