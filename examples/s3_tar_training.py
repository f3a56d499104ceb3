"""Train from tar shards in an S3 bucket: WebDataset shards streamed straight into a training loop.

The script starts its own S3-compatible server (moto) on 127.0.0.1, uploads eight small generated shards, and then
does what a real job does against S3: ``TarShardDataset("s3://bucket/train-{000000..000007}.tar")`` streams the
shards (several at once, none downloaded whole first), groups each sample's files (``00042.x.npy``,
``00042.cls``) into a dict, shuffles shards with a seed and the epoch and samples through a buffer, and the loader
batches them for the model. Against real S3, drop the server and ``storage_options``: credentials and region come
from the environment or ``~/.aws`` as for the AWS CLI. Run: ``python examples/s3_tar_training.py``.
"""

import io
import tarfile

import boto3
import numpy as np
import torch
from moto.server import ThreadedMotoServer
from torch import nn

import aloader
from aloader.datasets import TarShardDataset

N_SHARDS, PER_SHARD, N_FEATURES, N_CLASSES = 8, 32, 16, 4
BUCKET = "training-data"


def make_shard(shard: int, rng: np.random.Generator, centres: np.ndarray) -> bytes:
    """One WebDataset shard: per sample, a float32 feature vector (.x.npy) and its class (.cls)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for i in range(PER_SHARD):
            label = int(rng.integers(N_CLASSES))
            features = (centres[label] + 0.3 * rng.standard_normal(N_FEATURES)).astype(np.float32)
            npy = io.BytesIO()
            np.save(npy, features)
            for name, data in (
                (f"{shard:03d}{i:04d}.x.npy", npy.getvalue()),
                (f"{shard:03d}{i:04d}.cls", b"%d" % label),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def decode(sample: dict) -> tuple[torch.Tensor, int]:
    """Bytes to tensors; runs in a thread, off the event loop."""
    return torch.from_numpy(np.load(io.BytesIO(sample["x.npy"]))), int(sample["cls"])


def main() -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        credentials = {"aws_access_key_id": "example", "aws_secret_access_key": "example"}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials)
        s3.create_bucket(Bucket=BUCKET)
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((N_CLASSES, N_FEATURES)) * 2
        for shard in range(N_SHARDS):
            s3.put_object(Bucket=BUCKET, Key=f"train-{shard:06d}.tar", Body=make_shard(shard, rng, centres))

        dataset = TarShardDataset(
            f"s3://{BUCKET}/train-{{000000..{N_SHARDS - 1:06d}}}.tar",
            shuffle=True,
            seed=0,
            shuffle_buffer=128,
            shard_concurrency=4,
            decode=decode,
            storage_options={
                "endpoint": endpoint,
                "region": "us-east-1",
                "access_key_id": "example",
                "secret_access_key": "example",
            },
        )
        loader = aloader.DataLoader(dataset, batch_size=32)
        model = nn.Linear(N_FEATURES, N_CLASSES)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.2)
        for epoch in range(3):
            dataset.set_epoch(epoch)  # a new shard and sample order each epoch, the same on every rank
            seen, correct, total_loss = 0, 0, 0.0
            for features, labels in loader:
                optimiser.zero_grad()
                logits = model(features)
                loss = nn.functional.cross_entropy(logits, labels)
                loss.backward()
                optimiser.step()
                seen += len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                total_loss += float(loss) * len(labels)
            print(f"epoch {epoch}: {seen} samples, loss {total_loss / seen:.3f}, accuracy {correct / seen:.2f}")
        assert seen == N_SHARDS * PER_SHARD
        print(
            f"OK: streamed {N_SHARDS} tar shards from s3://{BUCKET} for 3 epochs, final accuracy {correct / seen:.2f}"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
