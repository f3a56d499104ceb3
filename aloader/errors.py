"""Exceptions raised by aloader, and how a failing sample's error reaches the consumer.

Hierarchy::

    Exception
     +-- AloaderError            base of the conditions aloader itself detects
          +-- StorageError       reading from a store failed; the message names the URL (never a secret)
               +-- ObjectNotFoundError     (also FileNotFoundError) no object at the URL
               +-- BucketNotFoundError     (also FileNotFoundError) the bucket or container does not exist
               +-- AccessDeniedError       (also PermissionError) credentials missing, wrong, or not allowed
               +-- TransientStorageError   a retryable fault (5xx, throttling, timeout, reset) outlasted the retries
               +-- UnsupportedURLError     (also ValueError) a URL aloader cannot read, or bad storage options
               +-- ShardFormatError        (also ValueError) a tar shard is malformed or truncated

A failing sample does not get an aloader exception type: the consumer sees an exception of the *original* type
(a ``KeyError`` stays a ``KeyError``), whose message names the sample index and whose ``__cause__`` is the original
exception with its traceback. Where the original type cannot be built from a message (a constructor with other
required arguments), the original exception itself is raised with the index added as a note (PEP 678).
Timeouts raise ``RuntimeError`` with torch's text, so code that catches torch's error keeps working.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "AloaderError",
    "BucketNotFoundError",
    "ObjectNotFoundError",
    "ShardFormatError",
    "StorageError",
    "TransientStorageError",
    "UnsupportedURLError",
    "with_context",
]


class AloaderError(Exception):
    """Base class of the conditions aloader itself detects."""


class StorageError(AloaderError):
    """Reading from local or object storage failed. ``url`` is the object (or prefix) concerned."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object exists at the URL: a missing key or file. Not retried."""


class BucketNotFoundError(StorageError, FileNotFoundError):
    """The bucket (or container) named in the URL does not exist. Not retried."""


class AccessDeniedError(StorageError, PermissionError):
    """The store refused the request: missing or wrong credentials, or no permission. Not retried."""


class TransientStorageError(StorageError):
    """A retryable fault (5xx, throttling, timeout, dropped connection) persisted through every retry."""


class UnsupportedURLError(StorageError, ValueError):
    """The URL's scheme is not supported, the URL is malformed, or a storage option is not understood."""


class ShardFormatError(StorageError, ValueError):
    """A tar shard is not a valid (or is a truncated) tar stream."""


class _KeyErrorMessage(str):
    """A ``KeyError`` message that prints as written (``KeyError`` otherwise shows its message's repr)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return self


def with_context(exc: BaseException, where: str) -> BaseException:
    """Return the exception to raise for ``exc``: same type, ``where`` in its message, ``exc`` chained as cause.

    ``where`` says what failed, e.g. ``"fetching sample index 7"``. Exceptions that are not ``Exception``
    (``KeyboardInterrupt``, ``SystemExit``) are returned unchanged: they are not about the sample.
    """
    if not isinstance(exc, Exception):
        return exc
    message = f"Caught {type(exc).__name__} {where}: {exc}"
    wrapped: BaseException
    try:
        wrapped = type(exc)(_KeyErrorMessage(message) if isinstance(exc, KeyError) else message)
    except Exception:
        exc.add_note(f"aloader: raised {where}")
        return exc
    wrapped.__cause__ = exc
    return wrapped
