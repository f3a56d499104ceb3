"""A small HTTP object server on 127.0.0.1 with injected latency and faults, for tests and benchmarks.

It serves a mapping of keys to bytes over HTTP/1.1 (keep-alive, ``GET`` with ``Range`` and ``If-Match``, ``HEAD``,
``ETag``) from an asyncio loop in one background thread, so thousands of connections cost no thread each. It
stands in for an object store:

- ``latency``: seconds each ``GET``/``HEAD`` waits before it is answered (a remote store's time to first byte);
- ``faults``: a deterministic share of keys whose first requests fail, with a 503, a 429, a connection dropped
  before any answer, a body cut off half-way, or a stall (no answer at all until the client gives up and closes
  the connection: only a client with a timeout gets past it). The same keys fail in every run, and each succeeds after
  ``Faults.times`` failures, so a client that retries must still deliver every object exactly once.

Use it as a context manager (``with ObjectServer(objects) as server: server.url("key")``) or run
``python -m aloader.bench.objectserver --synthetic 4096 --size 16384 --latency 0.03``, which prints the port and
serves until its standard input closes (benchmarks run it in a process of its own so it does not share the GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal, Self

__all__ = ["FaultKind", "Faults", "ObjectServer", "synthetic_objects"]

FaultKind = Literal["503", "429", "drop", "cut", "stall"]

_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)$")
_REASONS: Final = {
    200: "OK",
    206: "Partial Content",
    404: "Not Found",
    405: "Method Not Allowed",
    412: "Precondition Failed",
    416: "Range Not Satisfiable",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Faults:
    """Which requests fail: one key in ``every`` (by a stable hash of the key; 0 for none) fails its first
    ``times`` requests, with a kind taken from ``kinds`` by the same hash."""

    every: int = 0
    times: int = 1
    kinds: tuple[FaultKind, ...] = ("503", "drop", "cut")

    def kind_for(self, key: str) -> FaultKind | None:
        """The fault ``key`` gets, or None if it is always served."""
        if self.every <= 0 or not self.kinds:
            return None
        digest = zlib.crc32(key.encode())
        if digest % self.every:
            return None
        return self.kinds[(digest // self.every) % len(self.kinds)]


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    faults: int = 0
    per_key: dict[str, int] = field(default_factory=dict)  # faults injected per key
    read: dict[str, int] = field(default_factory=dict)  # requests per key


def synthetic_objects(count: int, size: int, *, prefix: str = "obj/", seed: int = 0) -> dict[str, bytes]:
    """``count`` objects of ``size`` random bytes, keyed ``{prefix}{i:06d}.bin``; the same for the same seed."""
    rng = random.Random(seed)
    return {f"{prefix}{i:06d}.bin": rng.randbytes(size) for i in range(count)}


class ObjectServer:
    """Serves ``objects`` on ``http://127.0.0.1:<port>/<key>``; see the module docstring."""

    def __init__(
        self,
        objects: Mapping[str, bytes] | None = None,
        *,
        latency: float = 0.0,
        faults: Faults | None = None,
        port: int = 0,
    ) -> None:
        self.objects: dict[str, bytes] = dict(objects or {})
        self.latency = latency
        self.faults = faults or Faults()
        self._port = port
        self._counters = _Counters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._thread else "stopped"
        return f"ObjectServer({len(self.objects)} objects, latency={self.latency}, faults={self.faults}, {state})"

    # ---------------------------------------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def url(self, key: str) -> str:
        return f"{self.base_url}/{key}"

    @property
    def requests(self) -> int:
        """Requests answered or failed so far."""
        return self._counters.requests

    def requests_for(self, key: str) -> int:
        """Requests for ``key`` answered or failed since the counters were reset."""
        return self._counters.read.get(key, 0)

    @property
    def faults_injected(self) -> int:
        return self._counters.faults

    def reset_counters(self) -> None:
        """Forget which keys have failed already: faulty keys fail their first requests again."""
        self._counters = _Counters()

    def start(self) -> Self:
        """Listen on 127.0.0.1 and serve from a background thread; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("the object server is already running")
        self._started.clear()
        self._thread = threading.Thread(target=self._run, name="aloader-objectserver", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(self._shutdown.set)
        thread.join()
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        from aloader._bridge import new_event_loop  # uvloop when installed: the server should not be the limit

        loop = new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread ends either way
            self._error = exc
            self._started.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._shutdown = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._port, backlog=1024)
        self._port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            await self._shutdown.wait()
        finally:
            self._server.close()
            # Stop every connection's handler (each closes its socket on the way out), then the listener.
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    # ---------------------------------------------------------------------------------------------- requests
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away: nothing to answer
        except asyncio.CancelledError:
            # Our own shutdown (stop()): end quietly, or asyncio's stream callback logs the cancelled task.
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection should close."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length:
            await reader.readexactly(length)
        keep_alive = headers.get("connection", "").lower() != "close"
        key = target.split("?", 1)[0].lstrip("/")
        counters = self._counters
        counters.requests += 1
        counters.read[key] = counters.read.get(key, 0) + 1
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"", method)
            return keep_alive
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        kind = self.faults.kind_for(key) if key in self.objects else None
        cut = False
        if kind is not None and counters.per_key.get(key, 0) < self.faults.times:
            counters.per_key[key] = counters.per_key.get(key, 0) + 1
            counters.faults += 1
            if kind in ("503", "429"):
                await self._respond(writer, int(kind), b"injected fault\n", method, close=True)
                return False
            if kind == "stall":
                await reader.read()  # no answer: wait until the client times out and closes the connection
                return False
            if kind == "drop" or method == "HEAD":
                return False  # close without a word, as a reset connection looks to the client
            cut = True  # answered below, with the body cut off half-way
        found = self.objects.get(key)
        if found is None:
            await self._respond(writer, 404, f"no object {key}\n".encode(), method)
            return keep_alive
        data = found
        etag = f'"{zlib.crc32(data):08x}-{len(data)}"'
        wanted_etag = headers.get("if-match")
        if wanted_etag and wanted_etag not in ("*", etag):  # the object changed since the client's first read
            await self._respond(writer, 412, b"", method, {"ETag": etag})
            return keep_alive
        status, extra, body = 200, {"Accept-Ranges": "bytes", "ETag": etag}, data
        wanted = headers.get("range")
        if wanted:
            match = _RANGE.match(wanted.strip())
            size = len(data)
            if match is None or (not match.group(1) and not match.group(2)):
                await self._respond(writer, 416, b"", method, {"Content-Range": f"bytes */{size}"})
                return keep_alive
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # a suffix range: the last n bytes
                start, end = max(0, size - int(match.group(2))), size - 1
            if start >= size or end < start:
                await self._respond(writer, 416, b"", method, {"Content-Range": f"bytes */{size}"})
                return keep_alive
            status, body = 206, data[start : end + 1]
            extra["Content-Range"] = f"bytes {start}-{end}/{size}"
        if cut:
            # The full length announced, half the body sent, then the connection closed.
            writer.write(self._header(status, len(body), extra, close=True) + body[: len(body) // 2])
            await writer.drain()
            return False
        await self._respond(writer, status, body, method, extra)
        return keep_alive

    @staticmethod
    def _header(status: int, length: int, extra: Mapping[str, str], close: bool = False) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", f"Content-Length: {length}"]
        lines += [f"{name}: {value}" for name, value in extra.items()]
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        method: str,
        extra: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        writer.write(self._header(status, len(body), extra or {}, close))
        if method != "HEAD":
            writer.write(body)
        await writer.drain()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve synthetic objects over HTTP on 127.0.0.1.")
    parser.add_argument("--synthetic", type=int, default=1024, help="number of objects (keys obj/000000.bin, ...)")
    parser.add_argument("--size", type=int, default=16384, help="bytes per object")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with ObjectServer(synthetic_objects(args.synthetic, args.size), latency=args.latency, port=args.port) as server:
        print(server.port, flush=True)
        sys.stdin.read()  # serve until the parent closes our stdin (or exits)


if __name__ == "__main__":
    main()
