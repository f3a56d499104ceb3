"""Run the systems of ``aloader bench`` and measure them.

Each system runs in a child process of its own (started with ``forkserver``), so that its peak memory is its own
process tree's and a system's threads or workers cannot slow the next one. The child reports every batch over a
pipe as an event (arrival time, samples, bytes, per-sample fetch latencies); the parent draws the progress bars,
samples the child tree's RSS, and computes every figure from the events. Events carry the measurements, so an
interrupted run (Ctrl-C) still reports what it measured up to that point.

Sample latency is measured inside the dataset: the time one ``__getitem__`` takes to read and decode its object,
the same wrapper for every system.

The ``images`` workload's ``cpu-bound`` row is measured in a child too, with no loader: it sends one ("bound",
samples, CPU seconds, cores, CPU seconds of the GETs) event instead of batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import torch
import torch.utils.data

import aloader
from aloader.bench.config import BenchConfig, SystemName
from aloader.bench.memory import RssSampler
from aloader.bench.objects import object_datasets
from aloader.bench.report import BenchReport, SystemResult, machine
from aloader.bench.samples import collate
from aloader.bench.shards import tar_datasets

__all__ = ["like_a_fresh_interpreter", "make_loader", "run_bench", "run_system"]


def make_loader(system: SystemName, config: BenchConfig) -> Any:
    """The loader ``system`` streams ``config`` with: an iterable of batches, or an async one for the ceilings."""
    if config.workload == "images":
        from aloader.bench.images import image_loader  # Pillow and requests only for this workload

        return image_loader(system, config)
    datasets = tar_datasets(config) if config.format == "tar" else object_datasets(config)
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
    """Run one system to the end, sending ("batch", seconds, samples, bytes, latencies) per batch, then ("done",
    seconds, distinct samples or None) (distinct when the batches name their samples' ``index``)."""
    # Ctrl-C goes to the whole process group; the parent decides what happens (it stops this child).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    like_a_fresh_interpreter()
    try:
        if system == "cpu-bound":
            from aloader.bench.images import machine_cores, measure_cpu_bound

            samples, cpu_seconds, fetch_cpu = measure_cpu_bound(config.urls, threads=config.concurrency)
            conn.send(("bound", samples, cpu_seconds, machine_cores(), fetch_cpu))
            conn.send(("done", None, samples))
            return
        # Timed from building the loader, as a training script waits from there; the CPU time spent so far
        # (importing torch) is not the system's.
        times = psutil.Process().cpu_times()
        conn.send(("start", times.user + times.system))
        started = time.perf_counter()
        loader = make_loader(system, config)
        conn.send(("ready",))
        indices: set[int] = set()

        def report(batch: Any) -> None:
            now = time.perf_counter() - started
            indices.update(batch.get("index", ()))
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
        conn.send(("done", time.perf_counter() - started, len(indices) if indices else None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------- the parent
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
    distinct: int | None = None
    cpu_ms: float | None = None
    fetch_cpu_ms: float | None = None
    cpu_before = 0.0
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
            elif kind == "start":
                cpu_before = event[1]
            elif kind == "bound":  # the CPU bound: cores / CPU time per sample, as if all cores served samples
                _, samples, cpu_seconds, cores, fetch_cpu = event
                if rss is not None:
                    rss.sample()
                cpu_ms = cpu_seconds / samples * 1e3 if samples else None
                fetch_cpu_ms = fetch_cpu / samples * 1e3 if samples else None
                seconds = cpu_seconds / cores
                if progress is not None:
                    progress(system, samples)
            elif kind == "done":
                if event[1] is not None:
                    seconds = event[1]
                distinct = event[2]
                break
            elif kind == "error":
                error = event[1]
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        peak = rss.stop() if rss is not None else 0
        tree_cpu = rss.cpu_seconds - cpu_before if rss is not None else 0.0
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
        peak_pss_mb=rss.peak_pss / 2**20 if rss is not None and rss.peak_pss else None,
        distinct_samples=distinct,
        cpu_ms_per_sample=cpu_ms,
        fetch_cpu_ms_per_sample=fetch_cpu_ms,
        tree_cpu_ms_per_sample=tree_cpu / samples * 1e3 if samples and cpu_ms is None else None,
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
    """Run every system of ``config`` one after the other, ``config.rounds`` times; Ctrl-C ends the run with what was
    measured."""
    rounds: list[list[SystemResult]] = []
    per_epoch = config.samples_per_epoch
    total = per_epoch * config.epochs if per_epoch is not None else None
    interrupted = False
    with _one_keyboard_interrupt():
        for number in range(1, config.rounds + 1):
            results: list[SystemResult] = []
            rounds.append(results)
            label = f" {number}/{config.rounds}" if config.rounds > 1 else ""
            for system in config.systems:
                result = _run_with_bar(system, config, total, show_progress, label)
                results.append(result)
                if result.interrupted:
                    interrupted = True
                    break
            if interrupted:
                break
    return BenchReport.of_rounds(machine(), source, config, rounds, interrupted)


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


def _run_with_bar(
    system: SystemName, config: BenchConfig, total: int | None, show_progress: bool, label: str = ""
) -> SystemResult:
    bar: Any = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"{system:>12}{label}", unit="sample", dynamic_ncols=True, leave=True)
    try:
        return run_system(system, config, progress=(lambda _s, n: bar.update(n)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
