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
          +-- WorkerDiedError    (also RuntimeError) a worker process exited while it held samples (names the
          |                      worker, pid, samples; torch's text inside, torch's per-worker error as cause)
          +-- FailureBudgetExceeded  more samples failed than ``max_failures`` allows (names the last failures)

A failing sample does not get an aloader exception type: the consumer sees an exception of the *original* type
(a ``KeyError`` stays a ``KeyError``), whose message names the sample index and whose ``__cause__`` is the original
exception with its traceback. Where the original type cannot be built from a message (a constructor with other
required arguments), the original exception itself is raised with the index added as a note (PEP 678), as torch
raises it without workers. An exception raised in a worker process reaches the consumer the same way; the worker's
traceback, as text, is a note on the cause. Only a worker's exception whose type cannot be built from a message
becomes a ``RuntimeError`` ("Caught Custom ... in DataLoader worker process 1: ...") with the original as cause: that
is what torch's workers raise for it. Timeouts raise ``RuntimeError`` with torch's text, so code that catches torch's
error keeps working.
Every condition torch raises as a given type is an instance of that type here too: ``WorkerDiedError`` is a
``RuntimeError`` (torch's dead-worker error), so retry loops and elastic agents written for torch still catch it.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "AloaderError",
    "BucketNotFoundError",
    "FailureBudgetExceeded",
    "ObjectNotFoundError",
    "ShardFormatError",
    "StorageError",
    "TransientStorageError",
    "UnsupportedURLError",
    "WorkerDiedError",
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
        exc._aloader_raised = where  # type: ignore[attr-defined]  # where a worker says it was raised (see _pool)
        return exc
    wrapped.__cause__ = exc
    wrapped._aloader_where = where  # type: ignore[attr-defined]  # a worker sends the original with it (see _pool)
    return wrapped


def context_of(exc: BaseException) -> tuple[BaseException, str] | None:
    """``(original, where)`` for an exception made by :func:`with_context`, else None."""
    where = getattr(exc, "_aloader_where", None)
    cause = exc.__cause__
    if isinstance(where, str) and cause is not None:
        return cause, where
    raised = getattr(exc, "_aloader_raised", None)  # returned as it was, with a note
    if isinstance(raised, str):
        return exc, raised
    return None


class WorkerDiedError(AloaderError, RuntimeError):
    """A worker process exited while it held samples: a crash, ``os._exit``, a signal, or the OOM killer.

    A ``RuntimeError``, as torch's error for it. The message starts with torch's words ("DataLoader worker (pid(s)
    ...) exited unexpectedly") and names the worker and the samples it held; ``__cause__`` is a ``RuntimeError`` with
    torch's per-worker text ("... is killed by signal: Killed. "), as torch chains it.
    """

    def __init__(
        self,
        message: str,
        *,
        worker_id: int | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
        advice: str = "",
    ) -> None:
        super().__init__(message + advice)
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode
        self._summary = message
        self._advice = advice

    def again(self, what: str) -> WorkerDiedError:
        """The same condition, for one task: ``what`` names the samples it held."""
        error = WorkerDiedError(
            f"{self._summary} while {what}",
            worker_id=self.worker_id,
            pid=self.pid,
            exitcode=self.exitcode,
            advice=self._advice,
        )
        error.__cause__ = self.__cause__
        return error


class FailureBudgetExceeded(AloaderError):
    """More samples failed than the loader's ``max_failures`` allows; ``__cause__`` is the last failure."""

    def __init__(self, message: str, *, failures: int = 0, seen: int = 0) -> None:
        super().__init__(message)
        self.failures = failures
        self.seen = seen
