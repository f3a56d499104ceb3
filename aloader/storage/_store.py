"""``Store``: reads objects by URL from local files (in threads) and object stores (through obstore's async API).

Clients are made lazily, one per store root (``s3://bucket``, ``http://host:port``), in the process that uses
them: a ``Store`` that is pickled, or inherited across a fork, starts without clients and makes its own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import obstore
import obstore.store

from aloader.errors import StorageError, UnsupportedURLError
from aloader.storage._redact import option_secrets, redact
from aloader.storage._retry import RetryPolicy, classify, retrying, translate
from aloader.storage._url import Location, parse_url

__all__ = ["DEFAULT_CHUNK_SIZE", "ObjectInfo", "Store", "object_store_started"]

T = TypeVar("T")

DEFAULT_CHUNK_SIZE: Final = 1 << 20
"""Bytes per chunk when streaming: large enough to amortise a call, small enough to start parsing early."""

# obstore's client options (its ClientConfig); every other storage option is the store's own configuration.
_CLIENT_KEYS: Final = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "default_headers",
        "http1_only",
        "http2_only",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "read_timeout",
        "root_certificate",
        "timeout",
        "user_agent",
    }
)


# Options and environment variables that point a client at an endpoint of its own (an emulator, MinIO, a proxy):
# an http:// one is allowed without asking for allow_http.
_ENDPOINT_OPTIONS: Final = ("endpoint", "aws_endpoint", "aws_endpoint_url", "base_url", "google_base_url")
_ENDPOINT_ENV: Final = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT",
    "GOOGLE_BASE_URL",
    "AZURE_STORAGE_ENDPOINT",
    "AZURE_ENDPOINT",
    "AZURITE_BLOB_STORAGE_URL",
)
_EMULATOR_FLAGS: Final = ("use_emulator", "azure_storage_use_emulator")
_MAX_SIGNED_CLIENTS: Final = 256
"""Clients kept for pre-signed HTTP(S) URLs (one per object): the oldest are dropped past this many."""

_OBSTORE_PID: int | None = None
"""The process whose object-store clients started obstore's runtime (None: none yet)."""


def object_store_started() -> bool:
    """Whether this process has started an object-store client (whose runtime threads a fork would not copy)."""
    return os.getpid() == _OBSTORE_PID


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What ``stat`` tells about one object."""

    url: str
    size: int
    last_modified: dt.datetime | None = None
    etag: str | None = None


class Store:
    """Reads objects by URL with one set of ``storage_options`` and one ``RetryPolicy``.

    ``storage_options`` are passed to obstore as the store's configuration (``endpoint``, ``region``,
    ``access_key_id``, ``secret_access_key``, ``skip_signature``, ... see docs/storage.md) or, for HTTP client
    settings (``timeout``, ``allow_http``, ...), as its client options. ``anonymous=True`` is short for
    ``skip_signature=True``; ``profile`` names an AWS CLI profile (read with boto3, when installed). Anything not
    given comes from the environment and config files as the clouds' own tools read them. The module-level
    functions of ``aloader.storage`` use a shared default ``Store`` per set of options.

    Object-store clients cannot cross a ``fork()`` (obstore's runtime does not survive it): a forked child of a
    process that has read from an object store gets a ``StorageError`` saying so, rather than a hang.
    """

    def __init__(self, storage_options: Mapping[str, Any] | None = None, *, retry: RetryPolicy | None = None) -> None:
        options = dict(storage_options or {})
        for key in options:
            if not isinstance(key, str):
                raise UnsupportedURLError(f"storage option names should be strings, but got {key!r}")
        self._options = options
        self.retry = retry if retry is not None else RetryPolicy()
        self._clients: dict[str, Any] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # Option names only: values may be secrets.
        return f"Store(storage_options=<{', '.join(sorted(self._options)) or 'none'}>, retry={self.retry!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self._options, "retry": self.retry}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"], retry=state["retry"])  # type: ignore[misc]

    @property
    def _secrets(self) -> list[str]:
        # Values of options whose names suggest a secret; the endpoint and region stay readable in messages.
        return option_secrets(self._options)

    # ------------------------------------------------------------------------------------------------ clients
    def _client(self, location: Location) -> Any:
        global _OBSTORE_PID
        if _OBSTORE_PID is None:
            _OBSTORE_PID = os.getpid()
        elif os.getpid() != _OBSTORE_PID:
            # obstore's async runtime (tokio) does not survive fork(): a forked child that used it would hang.
            raise StorageError(
                f"cannot read {redact(location.url, self._secrets)} in a process forked after object-store reads "
                "began in its parent: start worker processes with the 'spawn' or 'forkserver' method "
                "(aloader's default), or make the first read in the child",
                location.url,
            )
        if os.getpid() != self._pid:  # inherited across a fork: the parent's clients are not ours to use
            self._clients, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        key = location.client_url + (f"?{location.query}" if location.query and location.scheme == "az" else "")
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                if location.query and len(self._clients) >= _MAX_SIGNED_CLIENTS:
                    # A pre-signed URL's client serves that one object: keep the most recent ones only.
                    signed = [k for k in self._clients if "?" in k]
                    if signed:
                        del self._clients[signed[0]]
                client = self._clients[key] = self._make_client(location)
            return client

    def _make_client(self, location: Location) -> Any:
        config: dict[str, Any] = {}
        client_options: dict[str, Any] = {}
        for key, value in self._options.items():
            if key == "anonymous":
                if value:
                    config["skip_signature"] = True
            elif key in _CLIENT_KEYS:
                client_options[key] = value
            else:
                config[key] = value
        endpoints = [config.get(name) for name in _ENDPOINT_OPTIONS] + [os.environ.get(name) for name in _ENDPOINT_ENV]
        emulator = any(_truthy(config.get(name)) for name in _EMULATOR_FLAGS) or _truthy(
            os.environ.get("AZURE_STORAGE_USE_EMULATOR")
        )
        if location.scheme == "http" or emulator or any(str(e or "").startswith("http://") for e in endpoints):
            client_options.setdefault("allow_http", True)
        if location.scheme == "az" and location.query:
            config["sas_key"] = location.query  # a SAS token in the URL, as the portal hands it out
        profile = config.pop("profile", None)
        extra: dict[str, Any] = {}
        if location.scheme in ("http", "https"):
            config = {}  # an HTTP store has no configuration of its own
        elif location.scheme == "s3":
            provider = _aws_config_file_credentials(config, profile)
            if provider is not None:
                extra["credential_provider"] = provider
        try:
            from_url: Any = obstore.store.from_url  # its overloads want a TypedDict per store kind
            return from_url(
                location.client_url,
                config=config or None,
                client_options=client_options or None,
                retry_config={"max_retries": 0},  # retries are ours: see _retry
                **extra,
            )
        except Exception as exc:
            raise UnsupportedURLError(
                f"cannot make a client for {redact(location.url, self._secrets)}: "
                f"{redact(str(exc).split(chr(10), 1)[0], self._secrets)}",
                location.url,
            ) from None

    async def _call(self, url: str, action: str, work: Callable[[], Awaitable[T]]) -> T:
        return await retrying(work, self.retry, url, action, self._secrets)

    # ------------------------------------------------------------------------------------------------- reads
    async def read(self, url: str) -> bytes:
        """All bytes of the object at ``url``."""
        location = parse_url(url)
        if location.scheme == "file":
            return await self._call(url, "reading", lambda: asyncio.to_thread(Path(location.path).read_bytes))
        client = self._client(location)

        async def get() -> bytes:
            result = await obstore.get_async(client, location.key)
            return bytes(await result.bytes_async())

        return await self._call(url, "reading", get)

    async def read_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes ``start`` (inclusive) to ``end`` (exclusive) of the object at ``url``."""
        if start < 0 or end < start:
            raise ValueError(f"expected 0 <= start <= end, but got start={start!r}, end={end!r}")
        if start == end:
            return b""
        location = parse_url(url)
        if location.scheme == "file":
            return await self._call(
                url, "reading", lambda: asyncio.to_thread(_pread, location.path, start, end - start)
            )
        client = self._client(location)

        async def get_range() -> bytes:
            return bytes(await obstore.get_range_async(client, location.key, start=start, end=end))

        return await self._call(url, "reading", get_range)

    async def stat(self, url: str) -> ObjectInfo:
        """Size and metadata of the object at ``url``."""
        location = parse_url(url)
        if location.scheme == "file":

            def local_stat() -> ObjectInfo:
                info = os.stat(location.path)
                if not os.path.isfile(location.path):
                    raise IsADirectoryError(f"{location.path} is not a file")
                modified = dt.datetime.fromtimestamp(info.st_mtime, tz=dt.UTC)
                return ObjectInfo(url, info.st_size, modified, None)

            return await self._call(url, "reading metadata of", lambda: asyncio.to_thread(local_stat))
        client = self._client(location)

        async def head() -> ObjectInfo:
            meta = await obstore.head_async(client, location.key)
            return ObjectInfo(url, int(meta["size"]), meta.get("last_modified"), meta.get("e_tag"))

        return await self._call(url, "reading metadata of", head)

    async def list_prefix(self, url: str) -> list[str]:
        """URLs of the objects whose URL starts with ``url``, sorted.

        A prefix is a string prefix, as in S3 (``s3://bkt/train-`` matches ``train-000.tar``); a local directory
        lists the files below it, recursively. HTTP servers offer no listing: give their URLs explicitly.
        """
        location = parse_url(url)
        if location.scheme in ("http", "https"):
            raise UnsupportedURLError(
                f"cannot list {redact(url, self._secrets)}: HTTP servers offer no listing; give the URLs explicitly",
                url,
            )
        if location.scheme == "file":
            paths = await self._call(url, "listing", lambda: asyncio.to_thread(_list_local, location.path))
            return [location.child(path) for path in paths]
        client = self._client(location)
        # obstore lists whole path segments; list the parent "directory" and keep the keys with the string prefix.
        parent = location.path.rsplit("/", 1)[0] if "/" in location.path else ""

        async def list_keys() -> list[str]:
            keys: list[str] = []
            async for chunk in obstore.list(client, parent or None, chunk_size=1000):
                keys.extend(meta["path"] for meta in chunk if meta["path"].startswith(location.path))
            return keys

        keys = await self._call(url, "listing", list_keys)
        return [location.child(key) for key in sorted(keys)]

    async def stream(self, url: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> AsyncIterator[bytes]:
        """The object's bytes in chunks, as they arrive; a connection that breaks is resumed where it stopped.

        Transient faults are retried under the policy, counting consecutive failures without progress.
        """
        location = parse_url(url)
        offset = 0
        failures = 0
        etag: str | None = None
        while True:
            try:
                if location.scheme == "file":
                    while True:
                        chunk = await asyncio.to_thread(_pread, location.path, offset, chunk_size)
                        if not chunk:
                            return
                        offset += len(chunk)
                        failures = 0
                        yield chunk
                else:
                    client = self._client(location)
                    options: Any = None
                    if offset:
                        # Resume where the broken stream stopped, and only if the object is still the same one.
                        options = {"range": {"offset": offset}}
                        if etag:
                            options["if_match"] = etag
                    result = await obstore.get_async(client, location.key, options=options)
                    if not offset:
                        etag = result.meta.get("e_tag")
                    async for part in result.stream(min_chunk_size=chunk_size):
                        data = bytes(part)
                        offset += len(data)
                        failures = 0
                        yield data
                    return
            except StorageError:
                raise
            except Exception as exc:
                failures += 1
                if classify(exc) != "transient" or failures >= self.retry.max_attempts:
                    raise translate(exc, url, "reading", self._secrets, failures) from None
            await asyncio.sleep(self.retry.delay(failures - 1))


_AWS_ENV_CREDENTIALS: Final = (
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_SKIP_SIGNATURE",
)
_AWS_OPTION_CREDENTIALS: Final = ("access_key_id", "aws_access_key_id", "skip_signature", "aws_skip_signature")


def _aws_config_file_credentials(config: Mapping[str, Any], profile: str | None) -> Any:
    """A credential provider reading ~/.aws/credentials and ~/.aws/config (through boto3), when they are the only
    source: obstore itself reads the environment and instance metadata, but not the AWS CLI's files."""
    if any(key in config for key in _AWS_OPTION_CREDENTIALS) or any(k in os.environ for k in _AWS_ENV_CREDENTIALS):
        return None
    home = os.path.expanduser("~")
    files = (
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", os.path.join(home, ".aws", "credentials")),
        os.environ.get("AWS_CONFIG_FILE", os.path.join(home, ".aws", "config")),
    )
    if profile is None and "AWS_PROFILE" not in os.environ and not any(os.path.exists(f) for f in files):
        return None
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:  # boto3 is optional: without it, config files are not read
        return None
    return Boto3CredentialProvider(boto3.Session(profile_name=profile))


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")


def _pread(path: str, offset: int, size: int) -> bytes:
    # Open, read, close in one call: no descriptor stays open between chunks (or if the reader is abandoned).
    with open(path, "rb") as file:
        return os.pread(file.fileno(), size, offset)


def _list_local(prefix: str) -> list[str]:
    if os.path.isdir(prefix):
        root, name_prefix = prefix, ""
    else:
        root, name_prefix = os.path.dirname(prefix) or ".", prefix
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no directory {root}")
    found = []
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if path.startswith(name_prefix):
                found.append(path)
    return sorted(found)
