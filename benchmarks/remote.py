"""Remote I/O workload: ``aloader bench``'s embedded default, written to ``docs/benchmarks.md`` with its plot.

A synthetic image-like dataset behind a latency-injecting object server on 127.0.0.1, streamed through the bare
ceiling, aloader (its dataset and an unchanged torch dataset), torch's DataLoader and SPDL, side by side: first as
single objects (section ``bench``, ``bench-default.png``), then as tar shards (``aloader bench --format tar``:
section ``bench-tar``, ``bench-tar.png``).

Run ``python -m benchmarks.remote --write docs/benchmarks.md`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from aloader.bench.config import BenchConfig, default_systems
from aloader.bench.report import BenchReport, render_table, write_plot
from aloader.bench.runner import run_bench
from aloader.bench.sources import FormatChoice, open_source
from benchmarks.core import write_section

SECTIONS: dict[FormatChoice, tuple[str, str]] = {
    "objects": ("bench", "bench-default.png"),
    "tar": ("bench-tar", "bench-tar.png"),
}


def run(format: FormatChoice, quick: bool, write: Path | None) -> BenchReport:
    samples, latency = (48, 0.005) if quick else (None, 0.03)
    with open_source(None, samples=samples, latency=latency, format=format) as source:
        config = BenchConfig(
            urls=tuple(source.urls), systems=default_systems(), format=source.format, limit=source.limit
        )
        report = run_bench(config, source.label, show_progress=False)
    table = render_table(report)
    print(f"Machine: {report.machine}\n\n{table}\n")
    if write is not None:
        section, plot_name = SECTIONS[format]
        plot = write.parent / plot_name
        write_plot(report, plot)
        command = "aloader bench" + (" --format tar" if format == "tar" else "")
        shards = f", {config.shard_concurrency} shards at once" if format == "tar" else ""
        load = "load average at the end of the run: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        body = (
            f"Machine: {report.machine}; {load}\n\n"
            f"`{command}` on its embedded default ({source.label}); batch size {config.batch_size}, concurrency "
            f"{config.concurrency}{shards}, torch's num_workers {config.num_workers}.\n\n{table}\n"
            f"\n![throughput over time]({plot.name})\n"
        )
        write_section(write, body, section=section)
    return report


def main(argv: list[str] | None = None) -> list[BenchReport]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run with a tiny dataset")
    parser.add_argument("--write", type=Path, help="write the tables into this file's bench and bench-tar sections")
    parser.add_argument("--format", choices=("objects", "tar", "both"), default="both")
    args = parser.parse_args(argv)
    formats: list[FormatChoice] = ["objects", "tar"] if args.format == "both" else [args.format]
    return [run(format, args.quick, args.write) for format in formats]


if __name__ == "__main__":
    main()
