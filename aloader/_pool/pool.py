"""The parent's side of the process pool: ``num_workers`` processes, tasks out, results and deaths in.

One :class:`WorkerPool` per iterator (or per loader with ``persistent_workers=True``)::

    the core's worker stage --submit(worker, op)--> pipe to worker w  (sent at once if the socket takes it whole;
          ^                                                             else the rest goes to a sender thread of
          |                                                             that worker: a full pipe must not block
          |                                                             the event loop)
          |  asyncio future, resolved with call_soon_threadsafe
    reader thread: multiprocessing.connection.wait() on every worker's result pipe *and* process sentinel, so a
                   worker that dies fails the futures it held at once, naming the worker and its samples.

What runs in a worker is in ``worker.py``; how results cross, in ``transfer.py``; how processes start, in
``setup.py``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import pickle
import queue
import signal
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, Final

from aloader._core.plan import PoolKind
from aloader._pool.setup import (
    FORKSERVER_PRELOAD,
    WorkerSetup,
    default_context,
    fork_from_lasting_thread,
    fork_is_safe,
    freeze_parent,
    import_for_workers,
    thaw_parent,
)
from aloader._pool.transfer import FDS_PER_MESSAGE, HEADER, RemoteError, received, recvfds
from aloader._pool.worker import worker_main
from aloader._threads import FORK_GATE, _deliver
from aloader.errors import WorkerDiedError

__all__ = ["WorkerPool"]

# How long a fork waits for aloader's threads to leave user code (see FORK_GATE). The default start then uses the
# forkserver instead; a fork the user asked for goes ahead, as torch's would.
_FORK_WAIT_SECONDS: Final = 1.0
# How long close() lets an idle worker exit by itself (it sees end-of-file at once) before terminating it.
_EXIT_GRACE_SECONDS: Final = 5.0
_EXIT: Final = pickle.dumps(None)
_DONTWAIT: Final = getattr(socket, "MSG_DONTWAIT", 0)  # 0: not on this platform, every message goes to a thread
_SIZE: Final = struct.Struct("!i")  # multiprocessing.Connection's framing, which the worker's recv_bytes reads
_LARGE_SIZE: Final = struct.Struct("!Q")


def _frame(message: bytes) -> bytes:
    """``message`` framed as ``Connection.send_bytes`` frames it (a size, or -1 and a 64-bit size, then the bytes)."""
    if len(message) > 0x7FFFFFFF:
        return _SIZE.pack(-1) + _LARGE_SIZE.pack(len(message)) + message
    return _SIZE.pack(len(message)) + message


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A task whose batch was abandoned may still fail later; that is not an unretrieved error worth logging.
    if not future.cancelled():
        future.exception()


@dataclass(slots=True)
class _Pending:
    worker_id: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    what: str  # the samples it holds, for the error when the worker dies


_SHM_ADVICE: Final = (
    ". It is possible that dataloader's workers are out of shared memory. Please try to raise your shared memory limit."
)


_EXIT_ADVICE: Final = (
    ". Details are lost due to multiprocessing. Rerunning with num_workers=0 may give better error trace."
)


# torch's error when its main process runs out of file descriptors (torch's _try_get_data), word for word.
_TOO_MANY_FILES: Final = (
    "Too many open files. Communication with the workers is no longer possible. Please increase the limit using "
    "`ulimit -n` in the shell or change the sharing strategy by calling "
    "`torch.multiprocessing.set_sharing_strategy('file_system')` at the beginning of your code"
)


def _out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc`` says this process has run out of file descriptors: each shared-memory tensor received from a
    worker holds one while it is alive (torch's ``file_descriptor`` strategy)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "could not duplicate a shared memory file descriptor" in text  # torch, mapping a received segment
        or "items of ancdata" in text  # multiprocessing's recvfds: the kernel dropped descriptors (MSG_CTRUNC)
        or "Too many open files" in text
    )


def _too_many_open_files(exc: BaseException, worker_id: int, what: str) -> RuntimeError:
    """torch's error and advice (both hold here: aloader follows ``set_sharing_strategy``), chained to ``exc``."""
    error = RuntimeError(
        f"{_TOO_MANY_FILES}. Receiving the result of DataLoader worker process {worker_id} {what} failed: "
        f"{type(exc).__name__}: {exc}"
    )
    error.__cause__ = exc
    return error


def _died(worker_id: int, pid: int | None, code: int | None) -> WorkerDiedError:
    """The error for a worker that exited: torch's words in ours, and torch's per-worker error as the cause."""
    advice, torch_text = "", ""
    if code is None:
        how = "closed its connection"
    elif code < 0:
        name = signal.strsignal(-code) or f"signal {-code}"
        try:
            how = f"is killed by signal: {name} ({signal.Signals(-code).name})"
        except ValueError:
            how = f"is killed by signal: {name}"
        torch_text = f"DataLoader worker (pid {pid}) is killed by signal: {name}. "
        if -code == signal.SIGBUS:
            advice = _SHM_ADVICE
            torch_text += advice[2:]
    else:
        how = f"exited with code {code}"
        if code > 0:
            advice = _EXIT_ADVICE
            torch_text = f"DataLoader worker (pid {pid}) exited unexpectedly with exit code {code}{advice}"
    error = WorkerDiedError(
        f"DataLoader worker (pid(s) {pid}) exited unexpectedly: worker {worker_id} {how}",
        worker_id=worker_id,
        pid=pid,
        exitcode=code,
        advice=advice,
    )
    if torch_text:
        error.__cause__ = RuntimeError(torch_text)  # torch raises its error from this one (see torch's _try_get_data)
    return error


class WorkerPool:
    """``num_workers`` processes with a pipe each, and one reader thread resolving the tasks' futures.

    ``start()`` and ``close()`` block (process start and join): call them off the event loop. ``submit`` is for the
    event loop's side; its send runs in a thread. Idempotent ``close()``; safe from any thread but the reader.
    """

    def __init__(
        self, setup: WorkerSetup, num_workers: int, context: multiprocessing.context.BaseContext | None
    ) -> None:
        self.setup = setup
        self.num_workers = num_workers
        # None: the default, decided when the workers start (start_by_fork_if_safe, else default_context()).
        self._context = context
        self._lock = threading.Lock()  # start/close/pending
        # Per worker: what could not be sent at once (frames, in order; None stops the sender), the thread sending it,
        # started at the first need (most pools never need one: the worker's reader drains its pipe continuously),
        # and how many frames wait in it (while any do, later ones queue behind them).
        self._send_queues: list[queue.SimpleQueue[bytes | None]] = [queue.SimpleQueue() for _ in range(num_workers)]
        self._senders: list[threading.Thread | None] = [None] * num_workers
        self._backlog = [0] * num_workers
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._socks: list[socket.socket] = []  # the same sockets as _conns, for receiving descriptors
        self._pending: dict[int, _Pending] = {}
        self._in_flight = [0] * num_workers  # tasks sent and not answered, awaited or not
        self._ids = itertools.count()
        self._dead: dict[int, WorkerDiedError] = {}
        self._reader: threading.Thread | None = None
        self._wake_r: multiprocessing.connection.Connection | None = None
        self._wake_w: multiprocessing.connection.Connection | None = None
        self._started = False
        self._closed = False
        self._froze_parent = False  # this pool's fork froze the parent's heap (see freeze_parent)

    @property
    def kind(self) -> PoolKind:
        return self.setup.kind

    @property
    def started(self) -> bool:
        return self._started

    @property
    def broken(self) -> bool:
        """A worker has died: the pool cannot serve another epoch."""
        return bool(self._dead)

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self._processes]

    @property
    def start_method(self) -> str | None:
        """The start method the workers were (or will be) started with; None while the default is undecided."""
        return self._context.get_start_method() if self._context is not None else None

    def start_by_fork_if_safe(self) -> bool:
        """The sync driver's early start, in the consumer's thread before the pipeline's threads exist: when no start
        method is given and :func:`fork_is_safe`, start the workers now (True if they were forked; False if another
        loader's thread stayed in user code and the forkserver started them). Otherwise nothing is started here."""
        if self._started or self._context is not None or not fork_is_safe():
            return False
        self.start()
        return self.start_method == "fork"

    def start(self) -> None:
        """Start the workers (blocking: process starts; call it off the event loop). With no start method given,
        fork when :func:`fork_is_safe` and aloader's threads leave user code in time, else :func:`default_context`."""
        if self._context is None and not self._started and fork_is_safe():
            with FORK_GATE.closed(_FORK_WAIT_SECONDS) as quiet:
                if quiet:
                    self._context = multiprocessing.get_context("fork")
                    self._start(gate_closed=True)
                    return
        self._start(gate_closed=False)

    def _start(self, gate_closed: bool) -> None:
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            if self._context is None:
                self._context = default_context()
            elif self._context.get_start_method() == "forkserver":
                # multiprocessing_context="forkserver" given by the user: the same preload as our default (it only
                # takes effect if the server is not running yet).
                self._context.set_forkserver_preload(FORKSERVER_PRELOAD)
            # A forked worker gets the setup itself (no pickling, as torch's fork workers); others its pickle.
            forked = self._context.get_start_method() == "fork"
            setup_arg = self.setup if forked else pickle.dumps(self.setup, pickle.HIGHEST_PROTOCOL)
            if forked:
                import_for_workers()
                self._froze_parent = freeze_parent()
            try:
                start = functools.partial(self._start_processes, setup_arg)
                if self._context.get_start_method() == "forkserver":
                    start()  # the server forks them: their parent lives as long as this process
                elif gate_closed or not forked:
                    fork_from_lasting_thread(start)  # spawn forks too, so its workers need a lasting parent thread
                else:
                    # "fork" asked for by the user: aloader's threads still leave user code first if they can.
                    with FORK_GATE.closed(_FORK_WAIT_SECONDS):
                        fork_from_lasting_thread(start)
            except BaseException:
                self._shutdown_locked()
                raise
            self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
            self._reader = threading.Thread(target=self._read, name="aloader-pool-reader", daemon=True)
            self._reader.start()

    def _start_processes(self, setup_arg: WorkerSetup | bytes) -> None:
        assert self._context is not None
        for worker_id in range(self.num_workers):
            ours, theirs = self._context.Pipe(duplex=True)
            process = self._context.Process(  # type: ignore[attr-defined]
                target=worker_main,
                args=(worker_id, theirs, setup_arg),
                name=f"aloader-worker-{worker_id}",
                daemon=True,  # multiprocessing terminates daemonic children at interpreter exit
            )
            self._conns.append(ours)
            self._socks.append(socket.socket(fileno=os.dup(ours.fileno())))
            try:
                process.start()
            finally:
                theirs.close()
            self._processes.append(process)

    # ------------------------------------------------------------------------------------------------ tasks
    def submit(self, worker_id: int, op: str, payload: Any, what: str) -> asyncio.Future[Any]:
        """Queue a task for ``worker_id`` (never blocks); its future resolves with the result or raises.

        Tasks reach a worker in the order they are submitted (sent at once, or behind what waits in that worker's
        sender thread): with the same seeds, the same batches in the same order give the same random draws as in
        torch's workers.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(_retrieve)
        with self._lock:
            task_id = next(self._ids)
            dead = self._dead.get(worker_id)
            if dead is None and self._closed:
                dead = WorkerDiedError("the DataLoader's worker pool is closed")
            if dead is None:
                self._pending[task_id] = _Pending(worker_id, loop, future, what)
                self._in_flight[worker_id] += 1
                self._post(worker_id, _frame(pickle.dumps((task_id, op, payload), pickle.HIGHEST_PROTOCOL)))
        if dead is not None:
            future.set_exception(dead.again(what))
        return future

    def _post(self, worker_id: int, frame: bytes) -> None:
        """Under the lock: send ``frame`` now if nothing waits before it and the socket takes it whole (never
        blocking); else queue the rest for this worker's sender thread. A send from the submitting thread saves the
        sender thread's start and its turn at the GIL per task (measured beside a busy thread: the pool's start took
        ~25 ms, most of it starting the sender threads)."""
        if self._backlog[worker_id] == 0 and _DONTWAIT:
            try:
                sent = self._socks[worker_id].send(frame, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:  # the worker died (the reader fails its tasks) or was terminated
                return
            if sent == len(frame):
                return
            frame = frame[sent:]
        self._backlog[worker_id] += 1
        self._send_queues[worker_id].put(frame)
        if self._senders[worker_id] is None:
            sender = threading.Thread(
                target=self._send, args=(worker_id,), name=f"aloader-pool-sender-{worker_id}", daemon=True
            )
            self._senders[worker_id] = sender
            sender.start()

    def _send(self, worker_id: int) -> None:
        sock, work = self._socks[worker_id], self._send_queues[worker_id]
        while True:
            frame = work.get()
            if frame is None:
                return
            try:
                sock.sendall(frame)
            except OSError:  # the worker died (the reader fails its tasks) or was terminated
                pass
            del frame
            with self._lock:
                self._backlog[worker_id] -= 1

    def _read(self) -> None:
        assert self._wake_r is not None
        conns = {conn: worker_id for worker_id, conn in enumerate(self._conns)}
        sentinels = {p.sentinel: worker_id for worker_id, p in enumerate(self._processes)}
        waiting: list[Any] = [self._wake_r, *conns, *sentinels]
        while True:
            ready = multiprocessing.connection.wait(waiting)
            if self._wake_r in ready:
                return
            for obj in ready:
                if obj in conns:
                    self._drain(obj, conns[obj])
            for obj in ready:
                if obj in sentinels:
                    worker_id = sentinels[obj]
                    conn = self._conns[worker_id]
                    if conn in conns:
                        self._drain(conn, worker_id)  # results it sent before dying still count
                    self._worker_died(worker_id)
                    waiting.remove(obj)
                    if conn in waiting:
                        waiting.remove(conn)
                    conns.pop(conn, None)

    def _drain(self, conn: multiprocessing.connection.Connection, worker_id: int) -> None:
        sock = self._socks[worker_id]
        try:
            while conn.poll():
                data = conn.recv_bytes()
                task_id, count = HEADER.unpack_from(data)
                fds: list[int] = []
                lost: BaseException | None = None  # this process ran out of descriptors receiving them
                try:
                    received_count = 0
                    while received_count < count:
                        chunk = min(FDS_PER_MESSAGE, count - received_count)
                        try:
                            fds += recvfds(sock, chunk)
                        except (OSError, RuntimeError) as exc:
                            if not _out_of_descriptors(exc):
                                raise
                            lost = exc  # the kernel dropped (closed) what did not fit; the stream goes on
                        received_count += chunk
                    self._deliver(task_id, memoryview(data)[HEADER.size :], fds, worker_id, lost)
                finally:
                    for fd in fds:
                        os.close(fd)
        except (EOFError, OSError, RuntimeError):
            pass  # the worker is gone mid-message: its sentinel fails the task

    def _deliver(
        self, task_id: int, data: memoryview, fds: list[int], worker_id: int, lost: BaseException | None = None
    ) -> None:
        with self._lock:
            pending = self._pending.pop(task_id, None)
            self._in_flight[worker_id] -= 1
        if pending is None:
            return  # its batch was abandoned (break, cancellation): the shared memory goes with the descriptors
        ok = True
        value: Any = lost
        if lost is None:
            received.fds, received.storages = fds, {}
            try:
                value = pickle.loads(data)
            except Exception as exc:
                ok, value = False, exc
            finally:
                received.fds, received.storages = [], {}
        if isinstance(value, BaseException) and _out_of_descriptors(value):
            ok, value = False, _too_many_open_files(value, worker_id, pending.what)
        if isinstance(value, RemoteError):
            ok, value = False, value.rebuild(worker_id, self._processes[worker_id].pid)
        try:
            pending.loop.call_soon_threadsafe(_deliver, pending.future, ok, value)
        except RuntimeError:  # the loop closed: nobody waits
            pass

    def _worker_died(self, worker_id: int) -> None:
        process = self._processes[worker_id]
        # The sentinel of a forked worker is a pipe that reads end-of-file as the process exits, a moment before the
        # kernel makes its exit status available: wait that moment out (bounded, should it live on without it).
        process.join(_EXIT_GRACE_SECONDS)
        code = process.exitcode
        error = _died(worker_id, process.pid, code)
        with self._lock:
            if self._closed:
                return
            held = {tid: p for tid, p in self._pending.items() if p.worker_id == worker_id}
            for task_id in held:
                del self._pending[task_id]
            self._dead[worker_id] = error
        for pending in held.values():
            try:
                pending.loop.call_soon_threadsafe(_deliver, pending.future, False, error.again(pending.what))
            except RuntimeError:
                pass

    # ------------------------------------------------------------------------------------------------ close
    def close(self) -> None:
        """Stop the reader and every worker, and wait until all have exited. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shutdown_locked()

    def _shutdown_locked(self) -> None:
        self._closed = True
        if self._wake_w is not None:
            self._wake_w.send_bytes(b"")
        if self._reader is not None and self._reader is not threading.current_thread():
            # Released while joining: the reader may need the lock to finish delivering.
            self._lock.release()
            try:
                self._reader.join()
            finally:
                self._lock.acquire()
        for worker_id, process in enumerate(self._processes):
            if self._in_flight[worker_id] > 0:
                process.terminate()  # running user code (maybe for an abandoned batch): do not wait for it
        # Tell each worker to exit rather than rely on end-of-file: with "fork", the other workers inherited this
        # socket's parent end, so closing ours alone does not end the stream. Behind what waits in its sender, if
        # any (a send blocked on a full pipe ends: the worker reads, or was terminated just now).
        exit_frame = _frame(_EXIT)
        for worker_id in range(len(self._socks)):
            if self._senders[worker_id] is not None:
                self._send_queues[worker_id].put(exit_frame)
                self._send_queues[worker_id].put(None)
                continue
            try:  # nothing waits in its pipe: it answered every task, or was terminated above
                self._socks[worker_id].send(exit_frame, _DONTWAIT)
            except OSError:
                pass
        for sender in self._senders:
            if sender is not None and sender is not threading.current_thread():  # a collection may close() anywhere
                # Released while joining: a sender takes the lock after each send.
                self._lock.release()
                try:
                    sender.join()
                finally:
                    self._lock.acquire()
        held = list(self._pending.values())
        self._pending.clear()
        closed = WorkerDiedError("the DataLoader's worker pool was closed")
        for pending in held:  # a persistent pool closed during an epoch: nobody may wait forever
            try:
                pending.loop.call_soon_threadsafe(_deliver, pending.future, False, closed.again(pending.what))
            except RuntimeError:
                pass
        for conn in self._conns:
            conn.close()
        for sock in self._socks:
            sock.close()
        for process in self._processes:
            process.join(_EXIT_GRACE_SECONDS)
            if process.exitcode is None:
                process.kill()
                process.join()
            process.close()
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()
        if self._froze_parent:
            self._froze_parent = False
            thaw_parent()

    def __del__(self) -> None:
        if getattr(self, "_started", False) and not self._closed:
            try:
                self.close()
            except Exception:
                pass
