"""Retries with jittered exponential backoff, and the translation of backend errors into aloader's errors.

aloader retries itself rather than through obstore's client: one policy then covers every backend, a stream that
breaks half-way is resumed from the byte it reached (obstore retries requests, not a body already being read), and
the error raised after the last attempt says how many were made.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

import obstore.exceptions as obe

from aloader.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
    UnsupportedURLError,
)
from aloader.storage._redact import redact

__all__ = ["RetryPolicy", "classify", "redact", "retrying"]

logger = logging.getLogger("aloader.storage")

T = TypeVar("T")

Kind = Literal["transient", "not-found", "no-bucket", "denied", "invalid", "permanent"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient faults are retried: up to ``max_attempts`` tries in all (1 means no retry), waiting a random
    time between 0 and ``min(max_delay, base_delay * 2**n)`` seconds before the n-th retry ("full jitter")."""

    max_attempts: int = 6
    base_delay: float = 0.05
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts should be a positive integer, but got {self.max_attempts!r}")
        if not self.base_delay >= 0 or not self.max_delay >= 0:
            raise ValueError(
                f"base_delay and max_delay should be >= 0, but got {self.base_delay!r} and {self.max_delay!r}"
            )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2.0**retry))


_STATUS = re.compile(r"status code: (\d{3})")
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
_HTTP_KINDS = {"Timeout": "timed out", "Connect": "could not connect", "Interrupted": "connection interrupted"}
_DURATION = re.compile(r" in [0-9.]+[a-zµ]+s?\b")
_TRANSIENT_ERRNOS = frozenset({4, 5, 11, 104, 110, 111})  # EINTR, EIO, EAGAIN, ECONNRESET, ETIMEDOUT, ECONNREFUSED


def _summary(exc: BaseException, secrets: Iterable[str]) -> str:
    """A one-line reason: the status and the service's error code when there are, else the first line."""
    text = str(exc)
    status = _STATUS.search(text)
    code = _S3_CODE.search(text)
    if status:
        return f"HTTP {status.group(1)}" + (f" {code.group(1)}" if code else "")
    first = redact(_DURATION.sub("", text.split("\n", 1)[0]), secrets)[:300]
    kind = _HTTP_KIND.search(text)  # obstore's debug text says what kind of connection failure it was
    if kind and kind.group(1) != "Request":
        first += f" ({_HTTP_KINDS.get(kind.group(1), kind.group(1))})"
    return first


def classify(exc: BaseException) -> Kind:
    """Whether a backend error is worth retrying, and if not, which condition it is."""
    text = str(exc)
    code_match = _S3_CODE.search(text)
    code = code_match.group(1) if code_match else ""
    if code == "NoSuchBucket" or code == "NoSuchContainer" or code == "ContainerNotFound":
        return "no-bucket"
    if isinstance(exc, (obe.PermissionDeniedError, obe.UnauthenticatedError, PermissionError)):
        return "denied"
    if isinstance(exc, (obe.NotFoundError, FileNotFoundError)):
        return "not-found"
    if isinstance(exc, (obe.InvalidPathError, obe.NotSupportedError, obe.UnknownConfigurationKeyError)):
        return "invalid"
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return "not-found"
    status_match = _STATUS.search(text)
    if status_match:
        status = int(status_match.group(1))
        if status in (401, 403):
            return "denied"
        if status == 404:
            return "not-found"
        if status in (408, 429) or status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            return "transient"
        return "permanent"
    if isinstance(exc, obe.BaseError):
        # No HTTP status: the request never got an answer (connection refused or reset, timeout, body cut short).
        return "transient"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "transient"
    if isinstance(exc, OSError):
        return "transient" if exc.errno in _TRANSIENT_ERRNOS else "permanent"
    return "permanent"


def translate(exc: BaseException, url: str, action: str, secrets: Iterable[str], attempts: int = 1) -> StorageError:
    """The aloader error to raise for backend error ``exc`` while doing ``action`` (e.g. "reading") on ``url``.

    The backend's own exception is not chained: its text can carry request details (signed query strings), so
    only a redacted summary is kept.
    """
    kind = classify(exc)
    shown = redact(url, secrets)
    reason = _summary(exc, secrets)
    if kind == "not-found":
        return ObjectNotFoundError(f"no object at {shown} ({reason})", url)
    if kind == "no-bucket":
        return BucketNotFoundError(f"the bucket of {shown} does not exist ({reason})", url)
    if kind == "denied":
        return AccessDeniedError(
            f"access denied {action} {shown} ({reason}): check the credentials (environment, config files or "
            "storage_options) and the permissions on the bucket",
            url,
        )
    if kind == "invalid":
        return UnsupportedURLError(f"cannot {action.removesuffix('ing')} {shown}: {reason}", url)
    if kind == "transient":
        tries = "attempt" if attempts == 1 else "attempts"
        return TransientStorageError(
            f"{action} {shown} failed after {attempts} {tries}, the last with: {reason}; the store may be "
            "overloaded or unreachable (raise RetryPolicy.max_attempts to wait longer)",
            url,
        )
    if reason.startswith("HTTP 412"):
        return StorageError(f"{shown} changed while it was being read ({reason}): read it again", url)
    return StorageError(f"{action} {shown} failed: {reason}", url)


async def retrying(
    operation: Callable[[], Awaitable[T]], policy: RetryPolicy, url: str, action: str, secrets: Iterable[str]
) -> T:
    """Await ``operation()``, retrying transient faults under ``policy``; raise a translated error otherwise."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await operation()
        except StorageError:
            raise
        except Exception as exc:
            if classify(exc) != "transient" or attempt >= policy.max_attempts:
                raise translate(exc, url, action, secrets, attempt) from None
            backoff_wait = policy.delay(attempt - 1)
            logger.debug(
                "retrying %s %s in %.3fs after: %s", action, redact(url, secrets), backoff_wait, _summary(exc, secrets)
            )
        await asyncio.sleep(backoff_wait)
