"""Real servers on 127.0.0.1 for the storage tests: moto's S3 server (in a child process) and aloader's object
server (in a thread of this process). No mocking: requests go over TCP through obstore's real clients."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from typing import Any

import boto3

KEYS = {"access_key_id": "testing-key-id", "secret_access_key": "s3cr3t-Test-Value-0123456789"}

_MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serve until the test session closes our stdin
server.stop()
"""


class MotoServer:
    """moto's S3-compatible server in a child process; ``require_auth`` makes it check credentials (IAM)."""

    def __init__(self, *, require_auth: bool = False) -> None:
        env = dict(os.environ)
        if require_auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # every request must be signed with a known key
        self._process = subprocess.Popen(
            [sys.executable, "-c", _MOTO],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()  # blocks until the server listens: no polling
        if not line.strip():
            self.stop()
            raise RuntimeError("moto server did not start")
        self.port = int(line)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def options(self, **overrides: Any) -> dict[str, Any]:
        """storage_options for this server."""
        return {"endpoint": self.endpoint, "region": "us-east-1", **KEYS, **overrides}

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEYS["access_key_id"],
            aws_secret_access_key=KEYS["secret_access_key"],
            region_name="us-east-1",
        )

    def put(self, bucket: str, objects: dict[str, bytes], *, acl: str = "private") -> None:
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        for key, data in objects.items():
            client.put_object(Bucket=bucket, Key=key, Body=data, ACL=acl)
        client.close()

    def stop(self) -> None:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()


def make_shard(shard: int, samples: int, *, extensions: tuple[str, ...] = ("txt", "cls")) -> bytes:
    """A WebDataset tar: ``samples`` samples ``s{shard}/{i}`` with a file per extension."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for i in range(samples):
            for extension in extensions:
                data = sample_payload(shard, i, extension)
                info = tarfile.TarInfo(f"s{shard:03d}/{i:05d}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sample_payload(shard: int, index: int, extension: str) -> bytes:
    if extension == "cls":
        return str((shard * 7 + index) % 10).encode()
    return f"shard {shard} sample {index} {extension} ".encode() * (1 + index % 5)
