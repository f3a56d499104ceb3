"""Moving results from a worker process to the main process: pickles whose tensors travel as shared memory.

Work goes to the worker as plain pickles (small: indices, or samples of async datasets). Results come back pickled
with torch's tensor reductions, except that each tensor storage travels as the file descriptor of an unlinked
shared-memory segment (torch's ``file_descriptor`` strategy: ``_share_fd_cpu_``), passed with ``SCM_RIGHTS`` on the
worker's own socket right behind the message. Only metadata crosses the pipe, no named ``/dev/shm`` entry exists that
a killed process could leave behind, and, unlike torch's ``resource_sharer`` (which serves each descriptor from a
thread of the sending process), a batch sent just before its worker dies still arrives: the kernel holds descriptors
in flight. ``default_collate`` already allocates its output in shared memory inside a worker (it checks
``get_worker_info()``), so a collated batch is not copied again. numpy arrays of ``_SHARE_MIN_BYTES`` or more travel
as shared tensors and are rebuilt as arrays of the same dtype. An exception travels as data (:class:`RemoteError`).
"""

from __future__ import annotations

import io
import multiprocessing.connection
import pickle
import socket
import struct
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler, recvfds, sendfds
from typing import Any, Final

import numpy as np
import torch
import torch.multiprocessing  # registers torch's shared-memory reductions with ForkingPickler

from aloader.errors import with_context

__all__ = ["FDS_PER_MESSAGE", "HEADER", "RemoteError", "received", "recvfds", "send_result"]

# Arrays smaller than this are pickled inline: a shared segment costs a file descriptor round trip (~100 us).
_SHARE_MIN_BYTES: Final = 64 * 1024
HEADER: Final = struct.Struct("<qi")  # in front of each result message: task id, file descriptors that follow it
FDS_PER_MESSAGE: Final = 200  # below the kernel's SCM_MAX_FD (253)


def _rebuild_array(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    return tensor.numpy()


def _reduce_array(array: np.ndarray[Any, Any]) -> Any:
    if type(array) is np.ndarray and array.nbytes >= _SHARE_MIN_BYTES and not array.dtype.hasobject:
        try:
            tensor = torch.from_numpy(np.array(array, order="C", copy=True))
        except (TypeError, ValueError):  # a dtype torch has no tensor for (strings, non-native byte order)
            pass
        else:
            return _rebuild_array, (tensor.share_memory_(),)  # type: ignore[no-untyped-call]
    return array.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def _dumps_shared(obj: object) -> tuple[bytes, list[int], list[torch.UntypedStorage]]:
    """Pickle ``obj`` with tensor storages moved to shared memory: (bytes, descriptors to send after them, storages).

    The descriptors belong to the storages (some made only for pickling, e.g. from numpy arrays): keep the storages
    alive until the descriptors are sent.
    """
    fds: list[int] = []
    keep: list[torch.UntypedStorage] = []
    seen: dict[int, int] = {}  # storage address -> index in fds: views of one storage stay one storage

    def reduce_storage(storage: torch.UntypedStorage) -> Any:
        if storage.size() == 0:  # cannot be mapped
            return torch.UntypedStorage, ()
        key = storage.data_ptr()
        if key not in seen:
            fd, _ = storage._share_fd_cpu_()
            seen[key] = len(fds)
            fds.append(fd)
            keep.append(storage)
        return _rebuild_storage, (seen[key], storage.size())

    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table[np.ndarray] = _reduce_array
    if torch.multiprocessing.get_sharing_strategy() == "file_descriptor":  # type: ignore[no-untyped-call]
        pickler.dispatch_table[torch.UntypedStorage] = reduce_storage
    # else "file_system" (set by the user, as torch advises when descriptors run out): torch's own reduction, named
    # segments that hold no descriptor in the receiving process.
    pickler.dump(obj)
    return buffer.getvalue(), fds, keep


class _Received(threading.local):
    fds: list[int]
    storages: dict[int, torch.UntypedStorage]

    def __init__(self) -> None:
        self.fds, self.storages = [], {}


received = _Received()  # the descriptors of the message the reader thread is unpickling


def _rebuild_storage(index: int, size: int) -> torch.UntypedStorage:
    storage = received.storages.get(index)
    if storage is None:
        # Maps the segment and keeps its own duplicate of the descriptor; the reader closes the received one.
        new_shared = torch.UntypedStorage._new_shared_fd_cpu  # type: ignore[attr-defined]
        storage = received.storages[index] = new_shared(received.fds[index], size)
    return storage


def send_result(conn: multiprocessing.connection.Connection, sock: socket.socket, task_id: int, result: object) -> None:
    try:
        data, fds, keep = _dumps_shared(result)
    except Exception as exc:
        data, fds, keep = _dumps_shared(RemoteError.capture(exc, "sending the result to the main process"))
    conn.send_bytes(HEADER.pack(task_id, len(fds)) + data)
    for start in range(0, len(fds), FDS_PER_MESSAGE):
        sendfds(sock, fds[start : start + FDS_PER_MESSAGE])
    del keep


@dataclass(frozen=True, slots=True)
class RemoteError:
    """An exception raised in a worker, sent as data: its type may not survive pickling, its text always does."""

    where: str
    pickled: bytes | None
    type_name: str
    message: str
    traceback: str

    @classmethod
    def capture(cls, exc: BaseException, where: str) -> RemoteError:
        text = "".join(traceback.format_exception(exc))
        pickled: bytes | None
        try:
            pickled = pickle.dumps(exc)
            pickle.loads(pickled)  # an exception whose __init__ takes other arguments cannot be rebuilt
        except Exception:
            pickled = None
        return cls(where, pickled, type(exc).__qualname__, str(exc), text)

    def rebuild(self, worker_id: int, pid: int | None) -> BaseException:
        original: BaseException
        try:
            original = pickle.loads(self.pickled) if self.pickled is not None else RuntimeError(self.message)
        except Exception:
            original = RuntimeError(f"{self.type_name}: {self.message}")
        original.add_note(f"Traceback in DataLoader worker process {worker_id} (pid {pid}):\n{self.traceback}")
        where = f"{self.where} in DataLoader worker process {worker_id}"
        error = with_context(original, where)
        if error is original and isinstance(original, Exception):
            # Its type cannot be built from a message: torch's workers raise a RuntimeError for it then (see torch's
            # ExceptionWrapper.reraise), so code written for torch catches it as one. The original is its cause.
            error = RuntimeError(f"Caught {self.type_name} {where}: {self.message}")
            error.__cause__ = original
        return error
