"""Exceptions raised by aloader, and how a failing sample's error reaches the consumer.

Hierarchy::

    Exception
     +-- AloaderError            base of the conditions aloader itself detects (later: storage errors)
          +-- WorkerDiedError    a worker process exited while it held samples (names the worker, pid, samples)

A failing sample does not get an aloader exception type: the consumer sees an exception of the *original* type
(a ``KeyError`` stays a ``KeyError``), whose message names the sample index and whose ``__cause__`` is the original
exception with its traceback. Where the original type cannot be built from a message (a constructor with other
required arguments), the original exception itself is raised with the index added as a note (PEP 678).
An exception raised in a worker process reaches the consumer the same way; the worker's traceback, as text, is a
note on the cause. Timeouts raise ``RuntimeError`` with torch's text, so code that catches torch's error keeps working.
"""

from __future__ import annotations

__all__ = ["AloaderError", "WorkerDiedError", "with_context"]


class AloaderError(Exception):
    """Base class of the conditions aloader itself detects."""


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


class WorkerDiedError(AloaderError):
    """A worker process exited while it held samples: a crash, ``os._exit``, a signal, or the OOM killer."""

    def __init__(
        self, message: str, *, worker_id: int | None = None, pid: int | None = None, exitcode: int | None = None
    ) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode

    def again(self, what: str) -> WorkerDiedError:
        """The same condition, for one task: ``what`` names the samples it held."""
        return WorkerDiedError(
            f"{self.args[0]} while {what}", worker_id=self.worker_id, pid=self.pid, exitcode=self.exitcode
        )
