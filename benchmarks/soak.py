"""Soak benchmark: many epochs over streamed tar shards with injected faults and corrupt samples.

An object server on 127.0.0.1 serves WebDataset tar shards; a share of its responses fail (503s, dropped
connections, bodies cut off half-way) in every epoch, and storage retries must hide them. A few samples are corrupt
(their text is not UTF-8): the loader's ``transform`` fails on them and ``max_failures`` skips them. Epochs alternate
between the two drivers (``for`` and ``async for``). Each epoch checks that every good sample arrived exactly once;
the process's RSS is sampled throughout and must stay flat.

Run ``python -m benchmarks.soak --write docs/benchmarks.md`` (``--quick``, or ``--smoke``, for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import io
import random
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

import aloader
from aloader.bench.objectserver import Faults, ObjectServer
from aloader.bench.plot import save_lines
from aloader.bench.report import machine
from aloader.datasets import TarShardDataset
from aloader.storage import RetryPolicy
from benchmarks.core import write_section

RETRY = RetryPolicy(max_attempts=10, base_delay=0.001, max_delay=0.02)


@dataclass(frozen=True, slots=True)
class Size:
    shards: int
    per_shard: int
    payload: int  # bytes of the binary file of each sample
    epochs: int
    corrupt_every: int  # one sample in this many is corrupt
    faults: Faults  # which shards fail (once per epoch: the server's counters are reset before each)


FULL = Size(32, 250, 8192, 30, 500, Faults(every=3, times=1, kinds=("503", "drop", "cut")))
QUICK = Size(4, 25, 512, 3, 20, Faults(every=1, times=1, kinds=("503", "drop", "cut")))


def build_shards(size: Size) -> tuple[dict[str, bytes], set[int], set[int]]:
    """The shard objects, the serials of the good samples, and those of the corrupt ones."""
    rng = random.Random(0)
    objects: dict[str, bytes] = {}
    good: set[int] = set()
    corrupt: set[int] = set()
    for shard in range(size.shards):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for i in range(size.per_shard):
                serial = shard * size.per_shard + i
                bad = serial % size.corrupt_every == size.corrupt_every // 2
                (corrupt if bad else good).add(serial)
                files = {
                    "txt": b"\xff\xfe not text" if bad else str(serial).encode(),
                    "bin": rng.randbytes(size.payload),
                }
                for extension, data in files.items():
                    info = tarfile.TarInfo(f"{shard:04d}/{i:06d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        objects[f"soak/shard-{shard:04d}.tar"] = buffer.getvalue()
    return objects, good, corrupt


def decode(sample: dict[str, Any]) -> tuple[int, int]:
    """(serial, payload length); raises UnicodeDecodeError on a corrupt sample."""
    return int(sample["txt"].decode("utf-8")), len(sample["bin"])


@dataclass(slots=True)
class RssSampler:
    """The process's RSS every ``interval`` seconds, from a thread of its own."""

    interval: float
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    @contextmanager
    def running(self) -> Iterator[RssSampler]:
        process = psutil.Process()
        started = time.perf_counter()

        def sample() -> None:
            while True:
                self.samples.append((time.perf_counter() - started, process.memory_info().rss))
                if self._stop.wait(self.interval):  # a benchmark may sleep: this is the sampling period
                    return

        thread = threading.Thread(target=sample, name="soak-rss", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.samples.append((time.perf_counter() - started, process.memory_info().rss))


@dataclass(frozen=True, slots=True)
class Epoch:
    driver: str
    delivered: int
    duplicates: int
    losses: int
    unexpected: int
    skipped: int
    faults: int
    seconds: float
    rss_after: int
    python_blocks: int  # sys.getallocatedblocks() after a collection: Python objects alive


def _python_blocks() -> int:
    gc.collect()
    return sys.getallocatedblocks()


def run_epoch(loader: aloader.DataLoader, epoch: int, use_async: bool) -> list[int]:
    dataset = loader.dataset
    assert isinstance(dataset, TarShardDataset)
    dataset.set_epoch(epoch)
    serials: list[int] = []

    def take(batch: Any) -> None:
        numbers, lengths = batch
        serials.extend(int(n) for n in numbers)
        assert all(int(length) > 0 for length in lengths)

    if use_async:

        async def consume() -> None:
            async for batch in loader:
                take(batch)

        asyncio.run(consume())
    else:
        for batch in loader:
            take(batch)
    return serials


def soak(size: Size) -> tuple[list[Epoch], list[tuple[float, int]], int]:
    objects, good, corrupt = build_shards(size)
    epochs: list[Epoch] = []
    with ObjectServer(objects) as server, RssSampler(interval=0.25).running() as rss:
        server.faults = size.faults
        urls = [server.url(key) for key in sorted(objects)]
        dataset = TarShardDataset(urls, retry=RETRY, shuffle=True, shuffle_buffer=256, chunk_size=64 * 1024)
        # The budget is per epoch: twice the corrupt samples, as a count (they cluster at the start of shards, read
        # round-robin, so a share of the samples seen so far would be spent early).
        budget = 2 * len(corrupt)
        loader = aloader.DataLoader(dataset, batch_size=32, transform=decode, max_failures=budget)
        for epoch in range(size.epochs):
            server.reset_counters()  # the same keys fail again this epoch
            use_async = epoch % 2 == 1
            started = time.perf_counter()
            serials = run_epoch(loader, epoch, use_async)
            seconds = time.perf_counter() - started
            counts = Counter(serials)
            stats = loader.stats()
            epochs.append(
                Epoch(
                    driver="async for" if use_async else "for",
                    delivered=len(serials),
                    duplicates=sum(c - 1 for c in counts.values() if c > 1),
                    losses=len(good - counts.keys()),
                    unexpected=len(counts.keys() - good),
                    skipped=stats.skipped,
                    faults=server.faults_injected,
                    seconds=seconds,
                    rss_after=psutil.Process().memory_info().rss,
                    python_blocks=_python_blocks(),
                )
            )
            e = epochs[-1]
            print(
                f"epoch {epoch:3d} ({e.driver:9s}): {e.delivered} samples in {e.seconds:.1f} s, "
                f"{e.duplicates} duplicates, {e.losses} lost, {e.skipped} skipped, {e.faults} faults, "
                f"RSS {e.rss_after / 2**20:.0f} MiB",
                flush=True,
            )
    return epochs, rss.samples, len(corrupt)


def render(size: Size, epochs: list[Epoch], rss: list[tuple[float, int]], corrupt: int) -> str:
    mib = 2**20
    delivered = sum(e.delivered for e in epochs)
    seconds = sum(e.seconds for e in epochs)
    values = [r for _, r in rss]
    warm = epochs[0].rss_after  # after the first epoch: imports, pools and buffers are in place
    by_epoch = ", ".join(f"{e.rss_after / mib:.0f}" for e in epochs)
    lines = [
        f"{size.epochs} epochs over {size.shards} tar shards x {size.per_shard} samples ({size.payload} B payload "
        f"each) streamed from an object server on 127.0.0.1 with injected faults ({', '.join(size.faults.kinds)}; "
        f"about one shard in {size.faults.every} fails once per epoch) and storage retries; {corrupt} corrupt "
        "samples per epoch skipped by `max_failures`; batch 32, shuffled, epochs alternating `for` and `async for`.",
        "",
        "| epochs | samples delivered | duplicates | losses | unexpected | failures skipped | faults injected "
        "| samples/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {len(epochs)} | {delivered:,} | {sum(e.duplicates for e in epochs)} | {sum(e.losses for e in epochs)} "
        f"| {sum(e.unexpected for e in epochs)} | {sum(e.skipped for e in epochs)} | "
        f"{sum(e.faults for e in epochs):,} | {delivered / seconds:,.0f} |",
        "",
        "| RSS (MiB) | at start | after epoch 1 | at end | peak | end - after epoch 1 |",
        "|---|---:|---:|---:|---:|---:|",
        f"| process (loader and server) | {values[0] / mib:.0f} | {warm / mib:.0f} | {values[-1] / mib:.0f} "
        f"| {max(values) / mib:.0f} | {(epochs[-1].rss_after - warm) / mib:+.1f} |",
        "",
        f"RSS after each epoch (MiB): {by_epoch}. Sampled every 0.25 s ({len(values)} samples).",
        "",
        f"Python objects alive (`sys.getallocatedblocks()` after a collection) after epoch 1: "
        f"{epochs[0].python_blocks:,}; after the last: {epochs[-1].python_blocks:,} "
        f"({epochs[-1].python_blocks - epochs[0].python_blocks:+,}).",
    ]
    return "\n".join(lines)


def plot(rss: list[tuple[float, int]], path: Path) -> None:
    xs = [seconds for seconds, _ in rss]
    ys = [value / 2**20 for _, value in rss]
    save_lines(
        path,
        [("process RSS (loader and object server)", xs, ys)],
        title="Soak: RSS over the run",
        xlabel="seconds",
        ylabel="RSS (MiB)",
    )


def main(argv: list[str] | None = None) -> list[Epoch]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", "--smoke", action="store_true", help="a smoke run with a tiny dataset")
    parser.add_argument("--write", type=Path, help="write the tables into this file's soak section")
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.epochs:
        size = dataclasses.replace(size, epochs=args.epochs)
    epochs, rss, corrupt = soak(size)
    table = render(size, epochs, rss, corrupt)
    print(f"\nMachine: {machine()}\n\n{table}")
    if args.write:
        plot(rss, args.write.parent / "soak.png")
        body = f"Machine: {machine()}\n\n{table}\n![RSS over the run](soak.png)\n"
        write_section(args.write, body, section="soak")
    failed = [e for e in epochs if e.duplicates or e.losses or e.unexpected or e.skipped != corrupt]
    if failed:
        raise SystemExit(f"soak failed: {len(failed)} epochs lost, duplicated or wrongly skipped samples")
    return epochs


if __name__ == "__main__":
    main()
