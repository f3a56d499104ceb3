"""Shared fixtures: every behaviour test runs through both drivers, and no test may leak a thread or a file."""

from __future__ import annotations

import asyncio
import collections.abc
import gc
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import uvloop

import aloader
import aloader._pool

DRIVER_NAMES = ["for", "async-asyncio", "async-uvloop"]


class Driver:
    """Consumes a loader with one of the two drivers: ``for`` (the sync bridge) or ``async for`` (in a loop)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_async = name.startswith("async")

    def __repr__(self) -> str:
        return f"Driver({self.name})"

    def run_async(self, coro_fn: Callable[[], Any]) -> Any:
        factory = uvloop.new_event_loop if self.name == "async-uvloop" else None
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro_fn())

    def collect(self, loader: aloader.DataLoader, limit: int | None = None) -> list[Any]:
        """All batches (or the first ``limit``, then break); exceptions propagate."""
        if not self.is_async:
            out = []
            for batch in loader:
                out.append(batch)
                if limit is not None and len(out) >= limit:
                    break
            return out

        async def consume() -> list[Any]:
            out = []
            async for batch in loader:
                out.append(batch)
                if limit is not None and len(out) >= limit:
                    break
            return out

        return self.run_async(consume)

    def outcomes(
        self, loader: aloader.DataLoader, on_error: Callable[[Exception], None] | None = None
    ) -> list[tuple[str, Any]]:
        """("ok", batch) or ("err", exception) per step, going on after errors as torch's iterators allow.

        ``on_error`` runs in the consumer as each error is caught, before iteration goes on.
        """
        out: list[tuple[str, Any]] = []
        if not self.is_async:
            it = iter(loader)
            while True:
                try:
                    out.append(("ok", next(it)))
                except StopIteration:
                    return out
                except Exception as exc:
                    out.append(("err", exc))
                    if on_error is not None:
                        on_error(exc)

        async def consume() -> list[tuple[str, Any]]:
            it = aiter(loader)
            while True:
                try:
                    out.append(("ok", await anext(it)))
                except StopAsyncIteration:
                    return out
                except Exception as exc:
                    out.append(("err", exc))
                    if on_error is not None:
                        on_error(exc)

        return self.run_async(consume)


@pytest.fixture(params=DRIVER_NAMES)
def driver(request: pytest.FixtureRequest) -> Driver:
    return Driver(request.param)


def torch_outcomes(reference: Any, error: type[Exception]) -> list[tuple[str, Any]]:
    """torch's ("ok", batch as a list) or ("err", error type) per step, going on after ``error`` as torch does."""
    iterator = iter(reference)
    out: list[tuple[str, Any]] = []
    while True:
        try:
            out.append(("ok", next(iterator).tolist()))
        except StopIteration:
            return out
        except error:
            out.append(("err", error))


def _warm_up_uvloop() -> None:
    # uvloop keeps one process-wide pipe from its first loop on (libuv's global state): open it before any test
    # counts descriptors, so that only what a test itself leaves open is reported.
    loop = uvloop.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


_warm_up_uvloop()


def _warm_up_forkserver() -> None:
    # The forkserver and the resource tracker are multiprocessing's session-long helpers: each keeps a pipe open in
    # this process from its start on. Start them (as aloader's default context configures them) before any test
    # counts descriptors and child processes.
    aloader._pool.default_context()
    multiprocessing.forkserver.ensure_running()
    multiprocessing.resource_tracker.ensure_running()
    # aloader's forker thread (forks asked for off the main thread) also lives as long as the process, once started.
    starter = threading.Thread(target=aloader._pool.setup.fork_from_lasting_thread, args=(lambda: None,))
    starter.start()
    starter.join()


_warm_up_forkserver()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


KEEPALIVE_PORTS: set[int] = set()
"""Ports of the session's test servers. Object-store clients keep idle connections in a pool for reuse (that is
their point), and the in-process object server holds the other end: sockets to or from these ports are not leaks."""


def _keepalive_socket_inodes() -> set[str]:
    inodes: set[str] = set()
    if not KEEPALIVE_PORTS:
        return inodes
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as file:
                lines = file.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port in KEEPALIVE_PORTS or remote_port in KEEPALIVE_PORTS:
                inodes.add(f"socket:[{fields[9]}]")
    return inodes


def _readlink(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.fixture(scope="session")
def object_server() -> Any:
    """aloader's HTTP object server, for the whole session; tests set its objects, latency and faults."""
    from aloader.bench.objectserver import ObjectServer

    with ObjectServer() as server:
        KEEPALIVE_PORTS.add(server.port)
        _warm_up_obstore(server)
        yield server
        KEEPALIVE_PORTS.discard(server.port)


@pytest.fixture(scope="session")
def s3(object_server: Any) -> Any:
    """moto's S3 server for the whole session (``object_server`` first: it warms obstore up)."""
    yield from _moto_server(require_auth=False)


@pytest.fixture(scope="session")
def s3_with_auth(object_server: Any) -> Any:
    """A second moto server that checks credentials, for the access-denied tests."""
    yield from _moto_server(require_auth=True)


@pytest.fixture(scope="session")
def gcs(object_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """fake-gcs-server on 127.0.0.1 for the whole session."""
    from tests.servers import FakeGCS

    yield from _emulator(FakeGCS, tmp_path_factory)


@pytest.fixture(scope="session")
def azurite(object_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Azurite's blob service on 127.0.0.1 for the whole session."""
    from tests.servers import Azurite

    yield from _emulator(Azurite, tmp_path_factory)


def _emulator(kind: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.servers import MissingEmulator

    try:
        server = kind(tmp_path_factory.mktemp(kind.__name__.lower()))
    except MissingEmulator as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}: CI must run every storage test")  # .ci/run installs the emulators
        pytest.skip(str(exc))
    yield from _serving(server)


def _moto_server(require_auth: bool) -> Any:
    from tests.servers import MotoServer

    yield from _serving(MotoServer(require_auth=require_auth))


def _serving(server: Any) -> Any:
    """Yield a started test server, its pooled keep-alive connections not counted as leaks; stop it after."""
    KEEPALIVE_PORTS.add(server.port)
    try:
        yield server
    finally:
        KEEPALIVE_PORTS.discard(server.port)
        server.stop()


def _warm_up_obstore(server: Any) -> None:
    # obstore starts one process-wide async runtime (threads outside Python, an epoll and an eventfd) on first use:
    # start it before any test counts descriptors, as with uvloop above.
    from aloader import storage

    server.objects["warm-up"] = b"x"
    asyncio.run(storage.read(server.url("warm-up")))
    del server.objects["warm-up"]


def _child_processes() -> set[int]:
    """Our descendants, less multiprocessing's own long-lived helpers (the forkserver, the resource tracker), which
    serve the whole test session; the workers they fork are listed, as descendants of the forkserver."""
    helpers = {
        getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
        getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None),
    }
    return {p.pid for p in psutil.Process().children(recursive=True) if p.pid not in helpers}


# torch names its segments torch_<pid>_<random>_<counter>; aloader makes no other kind (no semaphores, no queues).
_TORCH_SEGMENT = re.compile(r"^torch_(\d+)_")


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:  # no /dev/shm on this platform
        return set()


def _ours_or_orphaned(entry: str) -> bool:
    # Other engineers' test runs share this machine's /dev/shm: count a torch segment as a leak if it names this
    # process, or a process that no longer exists (a worker of ours that died without cleaning up). Others' entries
    # (multiprocessing semaphores, segments of their live processes) are not ours to judge.
    match = _TORCH_SEGMENT.match(entry)
    if match is None:
        return False
    pid = int(match.group(1))
    return pid == os.getpid() or not psutil.pid_exists(pid)


@pytest.fixture(autouse=True)
def no_leaks() -> Any:
    """Fail a test that leaves a thread running, a file descriptor open, a child process, or a /dev/shm entry."""
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    children_before = _child_processes()
    shm_before = _shm_entries()
    yield
    # Shared-memory tensors hold a descriptor each; one kept alive only by a reference cycle (an exception and its
    # traceback's frames) is garbage, not a leak: collect it before counting.
    gc.collect()
    left = _child_processes() - children_before
    assert not left, f"child processes left running: {[psutil.Process(pid) for pid in left if psutil.pid_exists(pid)]}"
    new_shm = {e for e in _shm_entries() - shm_before if _ours_or_orphaned(e)}
    assert not new_shm, f"/dev/shm entries left behind: {sorted(new_shm)}"
    leaked = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"
    left_open = fds_opened_since(fds_before)
    assert not left_open, f"file descriptors left open: {left_open}"


def fds_opened_since(before: set[str]) -> list[str]:
    """What the descriptors opened since ``before`` (an ``open_fds()``) and still open point to, leaving out the
    test servers' pooled keep-alive connections. Descriptors that closed meanwhile are not counted either way."""
    # Listing /proc/self/fd opens one descriptor itself; compare the sets, ignoring ones that closed.
    new_fds = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    if new_fds and KEEPALIVE_PORTS:
        pooled = _keepalive_socket_inodes()
        # A pooled connection may be closing at this very moment: a descriptor that is gone is not a leak.
        new_fds = {fd for fd in new_fds if _readlink(fd) not in pooled}
        new_fds = {fd for fd in new_fds if _readlink(fd)}
    return sorted(_readlink(fd) for fd in new_fds)


def assert_same(ours: Any, theirs: Any, path: str = "batch") -> None:
    """Equal values, types, dtypes and structure, bit for bit."""
    assert type(ours) is type(theirs), f"{path}: {type(ours)} != {type(theirs)}"
    if isinstance(theirs, torch.Tensor):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, path
        assert torch.equal(ours, theirs), f"{path}: {ours} != {theirs}"
    elif isinstance(theirs, np.ndarray):
        assert ours.dtype == theirs.dtype, path
        np.testing.assert_array_equal(ours, theirs)
    elif isinstance(theirs, (str, bytes, int, float, bool, type(None))):
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"
    elif isinstance(theirs, collections.abc.Mapping):
        assert list(ours) == list(theirs), path
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(theirs, collections.abc.Sequence):
        assert len(ours) == len(theirs), f"{path}: length {len(ours)} != {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"
