"""Storage benchmark: reading thousands of small objects over HTTP with per-request latency, side by side.

An object server (``aloader.bench.objectserver``, in a process of its own) serves ``--objects`` synthetic objects of
``--size`` bytes on 127.0.0.1 and answers each GET after ``--latency`` seconds, as a remote store would. Each
system then reads every object once, in a fresh process, while the parent samples the resident memory of that
process and all its children (torch's workers included):

- ``bare concurrent GETs``: obstore GETs with ``CONCURRENCY`` in flight and nothing else, on the event loop
  aloader's ``for`` uses (uvloop when installed): the ceiling here;
- ``aloader ObjectDataset``: ``aloader.DataLoader(ObjectDataset(urls), concurrency=CONCURRENCY)``;
- ``aloader, unchanged torch Dataset``: a torch ``Dataset`` doing a blocking GET (``urllib``) in ``__getitem__``,
  through ``aloader.DataLoader(concurrency=CONCURRENCY)``;
- ``torch DataLoader, num_workers=2`` and ``=8`` with that same Dataset (fewer objects: they are slow).

Run ``python -m benchmarks.storage`` (``--quick`` for a smoke run, ``--write docs/benchmarks.md`` to record, with
``storage.png`` beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

import aloader
from aloader._bridge import new_event_loop
from aloader.bench.memory import RssSampler
from aloader.bench.plot import save_bars
from benchmarks.core import machine, write_section

CONCURRENCY = 64
BATCH_SIZE = 32
SYSTEMS = ("bare", "aloader-objects", "aloader-blocking", "torch-2", "torch-8")
LABELS = {
    "bare": f"bare concurrent GETs (obstore, {CONCURRENCY} in flight): the ceiling",
    "aloader-objects": f"aloader ObjectDataset, concurrency={CONCURRENCY}",
    "aloader-blocking": f"aloader, unchanged torch Dataset (blocking GET), concurrency={CONCURRENCY}",
    "torch-2": "torch DataLoader, unchanged Dataset, num_workers=2",
    "torch-8": "torch DataLoader, unchanged Dataset, num_workers=8",
}


class BlockingGetDataset(Dataset[bytes]):
    """An unchanged torch Dataset: a blocking HTTP GET per sample, as with requests or boto3 in ``__getitem__``."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, index: int) -> bytes:
        with urllib.request.urlopen(self.urls[index], timeout=60) as response:
            data: bytes = response.read()
        return data


@dataclass(frozen=True)
class Result:
    system: str
    samples: int
    seconds: float
    peak_rss_mib: float

    @property
    def per_second(self) -> float:
        return self.samples / self.seconds


# ---------------------------------------------------------------------------------------- one system, in a child
def count(batch: Any) -> int:
    return len(batch)


def run_system(system: str, urls: list[str]) -> tuple[int, float]:
    """Read every URL once with ``system``; (samples, seconds)."""
    if system == "bare":
        import obstore
        from obstore.store import HTTPStore

        base = urls[0].rsplit("/", 2)[0]
        store = HTTPStore.from_url(base, client_options={"allow_http": True})
        paths = [url[len(base) + 1 :] for url in urls]

        async def bare() -> tuple[int, float]:
            # CONCURRENCY workers share one queue of paths: always CONCURRENCY GETs in flight, nothing else.
            todo = iter(paths)
            sizes: list[int] = []

            async def worker() -> None:
                for path in todo:
                    result = await obstore.get_async(store, path)
                    sizes.append(len(await result.bytes_async()))

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return len(sizes), time.perf_counter() - started

        with asyncio.Runner(loop_factory=new_event_loop) as runner:  # the loop aloader's `for` runs on
            return runner.run(bare())
    loader: Any
    if system == "aloader-objects":
        from aloader.datasets import ObjectDataset

        loader = aloader.DataLoader(ObjectDataset(urls), batch_size=BATCH_SIZE, concurrency=CONCURRENCY)
    elif system == "aloader-blocking":
        loader = aloader.DataLoader(BlockingGetDataset(urls), batch_size=BATCH_SIZE, concurrency=CONCURRENCY)
    else:
        workers = int(system.split("-")[1])
        loader = torch.utils.data.DataLoader(BlockingGetDataset(urls), batch_size=BATCH_SIZE, num_workers=workers)
    started = time.perf_counter()
    samples = sum(count(batch) for batch in loader)
    return samples, time.perf_counter() - started


# ------------------------------------------------------------------------------------------------ the parent
def measure(system: str, urls: list[str]) -> Result:
    """Run ``system`` in a fresh process, sampling its memory (and its children's) every 20 ms."""
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.storage", "--child", system],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    sampler = RssSampler(child.pid, interval=0.02)
    output, _ = child.communicate(json.dumps(urls))
    peak = sampler.stop()
    if child.returncode != 0:
        raise RuntimeError(f"{system} failed with exit code {child.returncode}")
    figures = json.loads(output.strip().splitlines()[-1])
    return Result(LABELS[system], figures["samples"], figures["seconds"], peak / 2**20)


@contextlib.contextmanager
def served(objects: int, size: int, latency: float) -> Iterator[str]:
    """Serve ``objects`` synthetic objects (``obj/{i:06d}.bin``, ``size`` random bytes each) from an object server
    in a process of its own (so it does not share a GIL with what it measures); yields its base URL."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aloader.bench.objectserver",
            f"--synthetic={objects}",
            f"--size={size}",
            f"--latency={latency}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None
    assert server.stdout is not None
    try:
        port = int(server.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stdin.close()  # the server serves until its standard input closes
        server.wait()
        server.stdout.close()


def render(results: list[Result], objects: int, size: int, latency: float) -> str:
    ceiling = results[0].per_second
    torch2 = next(r for r in results if "num_workers=2" in r.system)
    lines = [
        f"{objects} objects of {size // 1024} KiB over HTTP on 127.0.0.1, each GET answered after "
        f"{latency * 1000:.0f} ms; batch size {BATCH_SIZE}. Peak memory: resident memory of the process and its "
        "children (torch's workers), sampled every 20 ms. Times include start-up (torch's worker processes), as "
        "an epoch does; torch reads fewer objects, since it is slow.",
        "",
        "| system | samples | samples/s | vs ceiling | vs torch num_workers=2 | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.system} | {r.samples} | {r.per_second:,.0f} | {r.per_second / ceiling:.0%} | "
            f"{r.per_second / torch2.per_second:.1f}x | {r.peak_rss_mib:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes")
    parser.add_argument("--objects", type=int, default=4096)
    parser.add_argument("--size", type=int, default=16 * 1024)
    parser.add_argument("--latency", type=float, default=0.03)
    parser.add_argument("--write", type=Path, help="write the Markdown table into this file's storage section")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        samples, seconds = run_system(args.child, json.loads(sys.stdin.read()))
        print(json.dumps({"samples": samples, "seconds": seconds}), flush=True)
        return []
    objects = 64 if args.quick else args.objects
    with served(objects, args.size, args.latency) as base:
        urls = [f"{base}/obj/{i:06d}.bin" for i in range(objects)]
        # torch's workers wait out the latency a few at a time: give them fewer objects (samples/s is compared),
        # still enough that their start-up (timed, as an epoch pays it) is a small part of the time.
        torch_urls = {"torch-2": urls[: max(16, objects // 8)], "torch-8": urls[: max(32, objects // 2)]}
        results = [measure(system, torch_urls.get(system, urls)) for system in SYSTEMS]
    table = render(results, objects, args.size, args.latency)
    # The machine may be shared: say how busy it was, since every figure here depends on it.
    load = "load average at the end of the run: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    header = f"Machine: {machine()}; {load}"
    print(f"{header}\n")
    print(table)
    if args.write:
        plot = args.write.parent / "storage.png"
        save_bars(
            plot,
            [
                ("samples/s (higher is better)", [(r.system, r.per_second) for r in results]),
                ("peak RSS, process tree, MiB (lower is better)", [(r.system, r.peak_rss_mib) for r in results]),
            ],
            xlabel="",
        )
        write_section(args.write, f"{header}\n\n{table}\n![samples/s and memory]({plot.name})\n", section="storage")
    return results


if __name__ == "__main__":
    main()
