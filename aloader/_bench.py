"""``aloader bench``: stream one dataset through aloader and torch's DataLoader, side by side, and measure.

Each system runs in a child process of its own (started with ``forkserver``), so that its peak memory is its own
process tree's and a system's threads or workers cannot slow the next one. The child reports every batch over a
pipe as an event (arrival time, samples, bytes, per-sample fetch latencies); the parent draws the progress bars,
samples the child tree's RSS, and computes every figure from the events. Events carry the measurements, so an
interrupted run (Ctrl-C) still reports what it measured up to that point.

Sample latency is measured inside the dataset: the time one ``__getitem__`` takes to read and decode its object,
the same wrapper for every system.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import threading
import time
import traceback
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psutil
import torch
import torch.utils.data

import aloader
from aloader import storage
from aloader.datasets import ObjectDataset

__all__ = [
    "SYSTEMS",
    "BenchConfig",
    "BenchReport",
    "FormatChoice",
    "Source",
    "SourceFormat",
    "SystemName",
    "SystemResult",
    "render_table",
    "run_bench",
]

SystemName = Literal["ceiling", "aloader", "aloader-sync", "torch", "spdl"]
SYSTEMS: tuple[SystemName, ...] = ("ceiling", "aloader", "aloader-sync", "torch", "spdl")
SYSTEM_TITLES: dict[SystemName, str] = {
    "ceiling": "ceiling: bare concurrent reads, no loader",
    "aloader": "aloader, async dataset",
    "aloader-sync": "aloader, unchanged torch Dataset",
    "torch": "torch DataLoader, unchanged torch Dataset",
    "spdl": "SPDL pipeline, async dataset",
}
TAR_TITLES: dict[SystemName, str] = {
    "ceiling": "ceiling: bare streamed shard reads, no loader",
    "aloader": "aloader, TarShardDataset",
    "aloader-sync": "aloader, unchanged torch IterableDataset",
    "torch": "torch DataLoader, torch IterableDataset (tarfile)",
    "spdl": "SPDL pipeline, async shard reader",
}
SourceFormat = Literal["objects", "tar"]


def default_systems() -> tuple[SystemName, ...]:
    """Every system whose library is installed (SPDL is optional: the ``bench`` extra)."""
    try:
        import spdl.pipeline  # noqa: F401
    except ImportError:
        return ("ceiling", "aloader", "aloader-sync", "torch")
    return SYSTEMS


# RSS of the system's process tree is sampled this often. A measurement, not a synchronisation.
_RSS_INTERVAL = 0.05


@dataclass(frozen=True)
class BenchConfig:
    """What to stream and how; one config is shared by every system of a run."""

    urls: tuple[str, ...]
    batch_size: int = 32
    concurrency: int = 64
    num_workers: int = 2  # torch's DataLoader; aloader's pool when its own num_workers is set
    aloader_workers: int = 0
    epochs: int = 1
    systems: tuple[SystemName, ...] = ("ceiling", "aloader", "aloader-sync", "torch")
    format: SourceFormat = "objects"  # "tar": ``urls`` are tar shards
    shard_concurrency: int = 4  # tar: shards read at once by aloader, SPDL and the ceiling
    limit: int | None = None  # tar: stop each epoch after this many samples (None: every sample of every shard)

    def title(self, system: SystemName) -> str:
        return (TAR_TITLES if self.format == "tar" else SYSTEM_TITLES)[system]

    @property
    def samples_per_epoch(self) -> int | None:
        """Samples each system delivers per epoch, when known before the run."""
        return len(self.urls) if self.format == "objects" else self.limit


@dataclass(frozen=True)
class SystemResult:
    """The figures of one system, computed from its events."""

    system: SystemName
    title: str
    samples: int
    bytes: int
    seconds: float
    first_batch_seconds: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    peak_rss_mb: float
    interrupted: bool
    error: str | None = None
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, samples so far)
    # (seconds since start, bytes delivered so far, RSS of the process tree in bytes), every sample of the RSS
    rss_timeline: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class BenchReport:
    machine: str
    source: str
    config: BenchConfig
    results: list[SystemResult]
    interrupted: bool

    def speedup(self, result: SystemResult) -> float | None:
        """Throughput over torch's DataLoader in the same run, when it ran."""
        torch_result = next((r for r in self.results if r.system == "torch" and r.samples), None)
        if torch_result is None or torch_result.samples_per_second == 0:
            return None
        return result.samples_per_second / torch_result.samples_per_second

    def to_json(self) -> dict[str, Any]:
        config = asdict(self.config)
        config["urls"] = len(self.config.urls)
        return {
            "machine": self.machine,
            "source": self.source,
            "config": config,
            "interrupted": self.interrupted,
            "systems": [
                {
                    **{k: v for k, v in asdict(r).items() if k not in ("timeline", "rss_timeline")},
                    "samples_per_second": r.samples_per_second,
                    "megabytes_per_second": r.megabytes_per_second,
                    "speedup_over_torch": self.speedup(r),
                }
                for r in self.results
            ],
        }


# ------------------------------------------------------------------------------------------------ the datasets
def read_blocking(url: str) -> bytes:
    """A blocking read, as an unchanged torch Dataset does it: urllib for http(s), ``open()`` for local files, and
    for object stores one blocking call per object (obstore's client, as a ``boto3`` ``get_object`` would be)."""
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=60) as response:
            data: bytes = response.read()
            return data
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://")).read_bytes()
    return asyncio.run(storage.read(url))


def decode_array(data: bytes) -> torch.Tensor:
    """Decode one sample: ``.npy`` bytes (the synthetic dataset's format) to a tensor; other bytes as uint8."""
    if data[:6] == b"\x93NUMPY":
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The same collate for every system: stacks the tensors when they have one shape (else keeps a list, e.g. for
    images of different sizes), and carries what the figures need."""
    tensors = [sample["data"] for sample in samples]
    same_shape = all(t.shape == tensors[0].shape for t in tensors)
    return {
        "data": torch.stack(tensors) if same_shape else tensors,
        "count": len(tensors),
        "nbytes": sum(t.nbytes for t in tensors),
        # Tar samples arrive in a stream, with no request of their own to time: their latency is None.
        "latency": [sample["latency"] for sample in samples if sample["latency"] is not None],
    }


class BlockingObjects(torch.utils.data.Dataset[dict[str, Any]]):
    """An unchanged torch Dataset: a blocking GET in ``__getitem__``, timed."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, index: int) -> dict[str, Any]:
        started = time.perf_counter()
        data = decode_array(read_blocking(self.urls[index]))
        return {"data": data, "latency": time.perf_counter() - started}


class TimedObjects:
    """aloader's bucket dataset (``ObjectDataset``, ``async def __getitem__``), each sample timed."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.objects = ObjectDataset(urls, decode=decode_array)

    def __len__(self) -> int:
        return len(self.objects)

    async def __getitem__(self, index: int) -> dict[str, Any]:
        started = time.perf_counter()
        data = await self.objects[index]
        return {"data": data, "latency": time.perf_counter() - started}


class BareReads:
    """The ceiling's reads: ``aloader.storage.read`` and the decoding, nothing else."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    def __len__(self) -> int:
        return len(self.urls)

    async def __getitem__(self, index: int) -> dict[str, Any]:
        started = time.perf_counter()
        data = decode_array(await storage.read(self.urls[index]))
        return {"data": data, "latency": time.perf_counter() - started}


@dataclass(frozen=True)
class Datasets:
    """What one source format gives the systems: aloader's dataset, an unchanged torch dataset (for torch's
    DataLoader and for ``aloader-sync``), and the ceiling and SPDL loaders, each made when called."""

    aloader: Callable[[], Any]
    torch: Callable[[], Any]
    ceiling: Callable[[], Any]
    spdl: Callable[[], Any]


def _make_loader(system: SystemName, config: BenchConfig) -> Any:
    if config.format == "tar":
        from aloader._bench_shards import tar_datasets

        datasets = tar_datasets(config)
    else:
        datasets = Datasets(
            aloader=lambda: TimedObjects(config.urls),
            torch=lambda: BlockingObjects(config.urls),
            ceiling=lambda: _Ceiling(config),
            spdl=lambda: _SpdlLoader(config),
        )
    if system == "ceiling":
        return datasets.ceiling()
    if system == "spdl":
        return datasets.spdl()
    if system == "torch":
        return torch.utils.data.DataLoader(
            datasets.torch(), batch_size=config.batch_size, collate_fn=collate, num_workers=config.num_workers
        )
    return aloader.DataLoader(
        datasets.aloader() if system == "aloader" else datasets.torch(),
        batch_size=config.batch_size,
        collate_fn=collate,
        concurrency=config.concurrency,
        num_workers=config.aloader_workers,
    )


class _Ceiling:
    """The most this machine can do: the same async reads and decoding, ``concurrency`` at once, batched and
    collated, with no loader in between (one event loop, a semaphore and a reorder buffer)."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.dataset = BareReads(config.urls)

    async def __aiter__(self) -> AsyncIterator[Any]:
        limit = asyncio.Semaphore(self.config.concurrency)

        async def one(index: int) -> dict[str, Any]:
            async with limit:
                return await self.dataset[index]

        # Tasks are created a window at a time so that memory stays bounded, as in a loader.
        size, total = self.config.batch_size, len(self.dataset)
        window = (math.ceil(self.config.concurrency / size) + 1) * size
        pending: list[asyncio.Task[dict[str, Any]]] = []
        try:
            for start in range(0, total, size):
                stop = min(start + size, total)
                pending.extend(asyncio.ensure_future(one(i)) for i in range(start, stop))
                while len(pending) >= window or (stop == total and pending):
                    samples = [await task for task in pending[:size]]
                    del pending[:size]
                    yield collate(samples)
        finally:
            for task in pending:
                task.cancel()


class _SpdlLoader:
    """SPDL's pipeline over the same async reads as aloader's: fetch (``concurrency`` at once), batch, collate."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.dataset = TimedObjects(config.urls)

    def __iter__(self) -> Iterator[Any]:
        from spdl.pipeline import PipelineBuilder

        builder: Any = PipelineBuilder()  # SPDL's generics do not infer through the chain
        pipeline = (
            builder.add_source(range(len(self.dataset)))
            .pipe(self.dataset.__getitem__, concurrency=self.config.concurrency, output_order="input")
            .aggregate(self.config.batch_size)
            .pipe(collate)
            .add_sink(3)
            .build(num_threads=2)
        )
        with pipeline.auto_stop():
            yield from pipeline.get_iterator()


# ----------------------------------------------------------------------------------------- the child process
def like_a_fresh_interpreter() -> None:
    """Make a bench child (started by ``forkserver``) start processes as a user's script would.

    multiprocessing sets a forkserver child's default start method to ``forkserver``, so torch's DataLoader there
    would start its workers through a new forkserver, each importing torch again (seconds per iterator) where a
    user's script gets the platform's default (``fork`` on Linux up to Python 3.13). The default is listed first.
    aloader's pool picks its own start method and is not affected.
    """
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    torch.set_num_threads(1)


def _child(system: SystemName, config: BenchConfig, conn: multiprocessing.connection.Connection) -> None:
    """Run one system to the end, sending ("batch", seconds, samples, bytes, latencies) per batch."""
    # Ctrl-C goes to the whole process group; the parent decides what happens (it stops this child).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    like_a_fresh_interpreter()
    try:
        loader = _make_loader(system, config)
        conn.send(("ready",))
        started = time.perf_counter()

        def report(batch: Any) -> None:
            now = time.perf_counter() - started
            conn.send(("batch", now, batch["count"], batch["nbytes"], batch["latency"]))

        limit = config.limit or math.inf
        if not hasattr(loader, "__iter__"):  # the ceilings: async only, on a loop of their own

            async def consume() -> None:
                for _ in range(config.epochs):
                    seen = 0
                    async with contextlib.aclosing(aiter(loader)) as batches:
                        async for batch in batches:
                            report(batch)
                            seen += batch["count"]
                            if seen >= limit:
                                break

            asyncio.run(consume())
        else:
            for _ in range(config.epochs):
                seen = 0
                for batch in loader:
                    report(batch)
                    seen += batch["count"]
                    if seen >= limit:
                        break
        conn.send(("done", time.perf_counter() - started))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of ``process`` and all its descendants, in bytes (0 once it is gone)."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


class RssSampler:
    """Samples the RSS of a process tree in a thread until stopped: the peak, and a timeline of (seconds since
    start, ``progress()`` at that moment, RSS) that shows whether memory grows with what was streamed."""

    def __init__(self, pid: int, progress: Callable[[], int] = lambda: 0, interval: float = _RSS_INTERVAL) -> None:
        self._process = psutil.Process(pid)
        self._progress = progress
        self._interval = interval
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self.peak = 0
        self.timeline: list[tuple[float, int, int]] = []
        self._lock = threading.Lock()  # the sampling thread and sample() calls append in time order
        self._thread = threading.Thread(target=self._run, name="aloader-bench-rss", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """Take a sample now, besides the periodic ones: a stream shorter than the interval still gets a point
        while the process runs with data delivered (the first batch is a good moment)."""
        with self._lock:
            rss = tree_rss(self._process)
            if rss:
                self.peak = max(self.peak, rss)
                self.timeline.append((time.perf_counter() - self._started, self._progress(), rss))

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval):  # a measurement, not a synchronisation
                return

    def stop(self) -> int:
        """Stop sampling (one last sample first); the peak RSS in bytes."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


def _kill_tree(process: multiprocessing.process.BaseProcess) -> None:
    if process.pid is None:
        return
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(process.pid).children(recursive=True)
        for p in children:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(children, timeout=10)
    if process.is_alive():
        process.kill()
    process.join()


Progress = Callable[[SystemName, int], None]


def run_system(
    system: SystemName, config: BenchConfig, progress: Progress | None = None, total: int | None = None
) -> SystemResult:
    """Run ``system`` in a child process and measure it; Ctrl-C stops it and returns what was measured."""
    context = multiprocessing.get_context("forkserver")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(system, config, sender), name=f"aloader-bench-{system}")
    process.start()
    sender.close()
    samples = nbytes = 0
    rss = RssSampler(process.pid, progress=lambda: nbytes) if process.pid is not None else None
    latencies: list[float] = []
    timeline: list[tuple[float, int]] = []
    first: float | None = None
    seconds = 0.0
    interrupted = False
    error: str | None = None
    try:
        while True:
            try:
                event = receiver.recv()
            except EOFError:
                error = error or f"the {system} process exited with code {process.exitcode} before finishing"
                break
            kind = event[0]
            if kind == "batch":
                _, at, count, size, lat = event
                samples += count
                nbytes += size
                if first is None and rss is not None:
                    rss.sample()  # the child goes on streaming: a point with data, however short the stream
                first = at if first is None else first
                latencies.extend(lat)
                seconds = at
                timeline.append((at, samples))
                if progress is not None:
                    progress(system, count)
            elif kind == "done":
                seconds = event[1]
                break
            elif kind == "error":
                error = event[1]
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        peak = rss.stop() if rss is not None else 0
        receiver.close()
        if not interrupted and error is None:
            process.join(30)  # finished: let it exit by itself (a bound, in case its teardown hangs)
        _kill_tree(process)
    p50, p99 = _percentiles(latencies)
    return SystemResult(
        system=system,
        title=config.title(system),
        samples=samples,
        bytes=nbytes,
        seconds=seconds,
        first_batch_seconds=first,
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        peak_rss_mb=peak / 2**20,
        interrupted=interrupted,
        error=error,
        timeline=timeline,
        rss_timeline=rss.timeline if rss is not None else [],
    )


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1e3

    return at(0.50), at(0.99)


def run_bench(config: BenchConfig, source: str, show_progress: bool = True) -> BenchReport:
    """Run every system of ``config`` one after the other; Ctrl-C ends the run with what was measured."""
    results: list[SystemResult] = []
    per_epoch = config.samples_per_epoch
    total = per_epoch * config.epochs if per_epoch is not None else None
    interrupted = False
    with _one_keyboard_interrupt():
        for system in config.systems:
            result = _run_with_bar(system, config, total, show_progress)
            results.append(result)
            if result.interrupted:
                interrupted = True
                break
    return BenchReport(machine=machine(), source=source, config=config, results=results, interrupted=interrupted)


@contextlib.contextmanager
def _one_keyboard_interrupt() -> Iterator[None]:
    """The first Ctrl-C raises KeyboardInterrupt; later ones are ignored until the block ends, so that stopping the
    child processes and printing the figures cannot be interrupted half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = False

    def handler(signum: int, frame: object) -> None:
        nonlocal pressed
        if not pressed:
            pressed = True
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_with_bar(system: SystemName, config: BenchConfig, total: int | None, show_progress: bool) -> SystemResult:
    bar: Any = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"{system:>12}", unit="sample", dynamic_ncols=True, leave=True)
    try:
        return run_system(system, config, progress=(lambda _s, n: bar.update(n)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------------- output
def machine() -> str:
    """One line naming this machine: cores, CPU model, OS, Python, torch and aloader versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, aloader {aloader.__version__}"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(report: BenchReport) -> str:
    """The Markdown table of a run: one row per system."""
    lines = [
        "| system | samples | samples/s | MB/s | first batch (s) | p50 latency (ms) | p99 latency (ms) "
        "| peak RSS (MiB) | vs torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        note = " (interrupted)" if r.interrupted else " (failed)" if r.error else ""
        speedup = report.speedup(r)
        lines.append(
            f"| {r.title}{note} | {r.samples} | {r.samples_per_second:,.0f} | {r.megabytes_per_second:,.1f} "
            f"| {_fmt(r.first_batch_seconds, '.2f')} | {_fmt(r.latency_p50_ms, '.1f')} "
            f"| {_fmt(r.latency_p99_ms, '.1f')} | {r.peak_rss_mb:,.0f} | {_fmt(speedup, '.1f')}x |"
        )
    return "\n".join(lines)


def write_plot(report: BenchReport, path: Path) -> None:
    """Throughput over time, one line per system (samples/s in about 40 bins of the longest run)."""
    from aloader._plot import save_lines

    longest = max((r.timeline[-1][0] for r in report.results if r.timeline), default=1.0)
    width = max(longest / 40, 0.01)
    series = []
    for r in report.results:
        if r.timeline:
            xs, ys = zip(*_rates(r.timeline, width), strict=True)
            series.append((r.title, xs, ys))
    save_lines(
        path,
        series,
        title="aloader bench: throughput over time",
        xlabel="seconds since the first batch was requested",
        ylabel="samples/s",
    )


def _rates(timeline: list[tuple[float, int]], width: float) -> Iterator[tuple[float, float]]:
    end = timeline[-1][0]
    bins = max(1, math.ceil(end / width))
    counts = [0] * bins
    previous = 0
    for at, total in timeline:
        counts[min(bins - 1, int(at / width))] += total - previous
        previous = total
    for i, count in enumerate(counts):
        yield (i + 0.5) * width, count / width


def dump_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------- sources
SYNTHETIC_SAMPLES = 2000
SYNTHETIC_SHAPE = (3, 64, 64)  # an image-like uint8 sample: 12 KiB of pixels


def synthetic_images(count: int, seed: int = 0) -> dict[str, bytes]:
    """``count`` image-like samples as ``.npy`` objects, named ``train/{index:06d}.npy``."""
    rng = np.random.default_rng(seed)
    objects = {}
    for index in range(count):
        buffer = io.BytesIO()
        np.save(buffer, rng.integers(0, 256, size=SYNTHETIC_SHAPE, dtype=np.uint8), allow_pickle=False)
        objects[f"train/{index:06d}.npy"] = buffer.getvalue()
    return objects


SYNTHETIC_SHARDS = 16


@dataclass(frozen=True)
class Source:
    """What ``open_source`` found: a label for the report, the URLs (objects, or tar shards), and their format."""

    label: str
    urls: list[str]
    format: SourceFormat
    limit: int | None = None  # tar: samples per epoch to stream (None: all)


FormatChoice = Literal["auto", "objects", "tar"]


@contextlib.contextmanager
def open_source(
    source: str | None, samples: int | None, latency: float, format: FormatChoice = "auto"
) -> Iterator[Source]:
    """Yield the ``Source`` for ``source``; for None, serve a synthetic dataset (single ``.npy`` objects, or with
    ``format="tar"`` the same samples in ``SYNTHETIC_SHARDS`` tar shards) while in the block.

    A source is tar shards when it is a brace pattern or a URL ending in ``.tar``, or a directory or prefix whose
    objects all end in ``.tar`` (``format="tar"`` takes the ``.tar`` objects under a prefix holding others too).
    """
    if source is None:
        count = samples or SYNTHETIC_SAMPLES
        from aloader._objectserver import ObjectServer

        images = synthetic_images(count)
        if format == "tar":
            from aloader._bench_shards import synthetic_shards

            objects = synthetic_shards(images, min(SYNTHETIC_SHARDS, count))
            what = f"{count} image-like samples in {len(objects)} tar shards"
        else:
            objects, what = images, f"{count} image-like samples"
        with ObjectServer(objects, latency=latency) as server:
            urls = [server.url(key) for key in sorted(objects)]
            label = (
                f"synthetic: {what} ({'x'.join(map(str, SYNTHETIC_SHAPE))} uint8, .npy) "
                f"served from {server.base_url} with {latency * 1e3:.0f} ms per GET"
            )
            kind: SourceFormat = "tar" if format == "tar" else "objects"
            yield Source(label, urls, kind, limit=count if kind == "tar" else None)
        return
    from aloader.datasets import expand_braces

    if "{" in source or source.endswith(".tar"):
        urls = expand_braces(source)  # named explicitly: not listed
    else:
        # Listed once, sorted, as ObjectDataset lists a prefix; credentials come from the environment.
        urls = asyncio.run(storage.list_prefix(source))
    shards = [url for url in urls if url.endswith(".tar")]
    if format == "tar" or (format == "auto" and urls and len(shards) == len(urls)):
        if not shards:
            raise ValueError(f"no .tar shards found in {source}")
        yield Source(f"{source} ({len(shards)} tar shards)", shards, "tar", limit=samples)
        return
    if samples is not None:
        urls = urls[:samples]
    if not urls:
        raise ValueError(f"no objects found under {source}")
    yield Source(source, urls, "objects")
