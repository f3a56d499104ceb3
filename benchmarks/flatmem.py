"""Flat-memory workload: stream several GB through aloader and torch's DataLoader; memory must not grow with it.

An object server (in a process of its own) holds ``--distinct`` objects of ``--size`` bytes and the sample list
names them over and over, so several GB are streamed (and decoded into tensors, batched, collated) while the server
holds a few dozen MB and nothing is written to disk. Each system runs in a child process of its own (``aloader
bench``'s machinery, ``aloader.bench``), while the parent samples the RSS of that child and all its descendants
(torch's workers included) every 50 ms, beside the bytes delivered so far.

Per system: RSS once the first batch has arrived (start), the peak, RSS at the end, and the slope of RSS against
the data streamed after a warm-up (the first quarter), in MiB per GiB, by least squares. End is the last sample
before the last batch arrived (after it, the system shuts down: torch's workers exit). A loader whose memory
does not grow with the data has a slope near 0; one that kept what it streamed would show about 1024.

Run ``python -m benchmarks.flatmem --write docs/benchmarks.md`` (``--quick`` for a smoke run); the plot of RSS
against the data streamed goes beside it (``flat-memory.png``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from aloader.bench.config import BenchConfig, SystemName
from aloader.bench.plot import save_lines
from aloader.bench.report import SystemResult
from aloader.bench.runner import run_bench
from benchmarks.core import write_section
from benchmarks.storage import served

SYSTEMS: tuple[SystemName, ...] = ("aloader", "torch")
WARM_UP = 0.25  # the share of the data after which RSS should no longer grow


@dataclass(frozen=True)
class Memory:
    """RSS figures of one system over the run, in MiB (slope: MiB of RSS per GiB streamed)."""

    title: str
    gib: float
    seconds: float
    start_mib: float
    peak_mib: float
    end_mib: float
    slope_mib_per_gib: float


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 with fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def memory_of(result: SystemResult) -> Memory:
    if result.error or not result.rss_timeline:
        raise RuntimeError(f"{result.title} failed: {result.error or 'no memory samples'}")
    streamed = [(nbytes / 2**30, rss / 2**20) for _, nbytes, rss in result.rss_timeline if nbytes > 0]
    if not streamed:
        raise RuntimeError(f"{result.title} delivered no data")
    total = streamed[-1][0]
    # Once the last batch is in, the system shuts down (torch's workers exit): its memory then is not the loader's.
    running = [(gib, mib) for gib, mib in streamed if gib < total] or streamed
    warm = [(gib, mib) for gib, mib in running if gib >= WARM_UP * total]
    return Memory(
        title=result.title,
        gib=result.bytes / 2**30,
        seconds=result.seconds,
        start_mib=streamed[0][1],
        peak_mib=result.peak_rss_mb,
        end_mib=running[-1][1],
        slope_mib_per_gib=slope(warm),
    )


def render(memories: list[Memory], label: str, config: BenchConfig) -> str:
    lines = [
        f"{label}; batch size {config.batch_size}, aloader's concurrency {config.concurrency}, torch's "
        f"num_workers {config.num_workers}. RSS: the process tree of each system (torch's workers included, so "
        "libraries they share count once per process), sampled every 50 ms; start is the first sample after the "
        f"first batch arrived. Slope: RSS against data streamed after the first {WARM_UP:.0%}.",
        "",
        "| system | GiB streamed | seconds | start RSS (MiB) | peak RSS (MiB) | end RSS (MiB) | slope (MiB per GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in memories:
        lines.append(
            f"| {m.title} | {m.gib:.2f} | {m.seconds:.1f} | {m.start_mib:,.0f} | {m.peak_mib:,.0f} "
            f"| {m.end_mib:,.0f} | {m.slope_mib_per_gib:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[SystemResult], path: Path) -> None:
    series = []
    for r in results:
        total = r.rss_timeline[-1][1] if r.rss_timeline else 0
        points = [(nbytes / 2**30, rss / 2**20) for _, nbytes, rss in r.rss_timeline if 0 < nbytes < total]
        if points:
            xs, ys = zip(*points, strict=True)
            series.append((r.title, xs, ys))
    save_lines(
        path,
        series,
        title="Flat memory: RSS of each system's process tree while streaming",
        xlabel="GiB delivered",
        ylabel="RSS (MiB)",
    )


def main(argv: list[str] | None = None) -> list[Memory]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64 MiB")
    parser.add_argument("--gib", type=float, default=4.0, help="data to stream per system (GiB)")
    parser.add_argument("--size", type=int, default=2**20, help="bytes per sample")
    parser.add_argument("--distinct", type=int, default=64, help="distinct objects the server holds")
    parser.add_argument("--write", type=Path, help="write the table into this file's flat-memory section")
    parser.add_argument("--plot", type=Path, help="draw RSS against data here (default: beside --write)")
    args = parser.parse_args(argv)
    gib = 1 / 16 if args.quick else args.gib
    samples = max(1, round(gib * 2**30 / args.size))
    distinct = min(args.distinct, samples)
    with served(distinct, args.size, latency=0.0) as base:
        urls = tuple(f"{base}/obj/{i % distinct:06d}.bin" for i in range(samples))
        config = BenchConfig(urls=urls, batch_size=16, concurrency=32, num_workers=2, systems=SYSTEMS)
        label = (
            f"{samples} samples of {args.size / 2**20:g} MiB ({samples * args.size / 2**30:.2f} GiB, {distinct} "
            f"distinct objects named over and over) from an object server on 127.0.0.1, no added latency"
        )
        report = run_bench(config, label, show_progress=False)
    memories = [memory_of(r) for r in report.results]
    load = "load average at the end of the run: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    table = render(memories, label, config)
    print(f"Machine: {report.machine}; {load}\n\n{table}")
    path = args.plot or (args.write.parent / "flat-memory.png" if args.write else None)
    if path is not None:
        plot(report.results, path)
    if args.write:
        body = f"Machine: {report.machine}; {load}\n\n{table}" + (
            f"\n![RSS against data streamed]({path.name})\n" if path is not None else ""
        )
        write_section(args.write, body, section="flat-memory")
    return memories


if __name__ == "__main__":
    main()
