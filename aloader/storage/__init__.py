"""Async reads by URL from local files and object stores: ``read``, ``read_range``, ``stat``, ``list_prefix``.

URLs: a local path or ``file:///path``; ``s3://bucket/key`` (also S3-compatible stores through the ``endpoint``
option or ``AWS_ENDPOINT_URL``), ``gs://bucket/key``, ``az://container/key``, ``http(s)://host/path``. Local files
are read in threads, object stores through obstore's native async client; the event loop is never blocked.

Transient faults are retried with jittered exponential backoff (``RetryPolicy``); missing objects, missing buckets
and refused credentials raise at once (see ``aloader.errors``). Errors, logs and reprs never show a secret.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from aloader.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
    UnsupportedURLError,
)
from aloader.storage._retry import RetryPolicy
from aloader.storage._store import DEFAULT_CHUNK_SIZE, ObjectInfo, Store
from aloader.storage._url import parse_url

__all__ = [
    "read",
    "read_range",
    "stat",
    "list_prefix",
    "stream",
    "Store",
    "ObjectInfo",
    "RetryPolicy",
    "DEFAULT_CHUNK_SIZE",
    "parse_url",
    "StorageError",
    "ObjectNotFoundError",
    "BucketNotFoundError",
    "AccessDeniedError",
    "TransientStorageError",
    "UnsupportedURLError",
]

_stores: dict[tuple[tuple[str, str], ...], Store] = {}


def _store(storage_options: Mapping[str, Any] | None) -> Store:
    # One Store (and so one client per bucket, with its connection pool) per distinct set of options.
    key = tuple(sorted((name, repr(value)) for name, value in (storage_options or {}).items()))
    store = _stores.get(key)
    if store is None:
        store = _stores[key] = Store(storage_options)
    return store


async def read(url: str, *, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """All bytes of the object at ``url``."""
    return await _store(storage_options).read(url)


async def read_range(url: str, start: int, end: int, *, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Bytes ``start`` (inclusive) to ``end`` (exclusive) of the object at ``url``."""
    return await _store(storage_options).read_range(url, start, end)


async def stat(url: str, *, storage_options: Mapping[str, Any] | None = None) -> ObjectInfo:
    """Size and metadata of the object at ``url``."""
    return await _store(storage_options).stat(url)


async def list_prefix(url: str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """URLs of the objects under the prefix ``url``, sorted (a local directory: its files, recursively)."""
    return await _store(storage_options).list_prefix(url)


def stream(
    url: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE, storage_options: Mapping[str, Any] | None = None
) -> AsyncIterator[bytes]:
    """The bytes of the object at ``url`` in chunks as they arrive, resuming where a broken connection stopped."""
    return _store(storage_options).stream(url, chunk_size=chunk_size)
