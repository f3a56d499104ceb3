"""The ``aloader`` command: ``aloader bench [URL_OR_PATH]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"should be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from aloader.bench.config import IMAGE_SYSTEMS, SYSTEMS

    parser = argparse.ArgumentParser(prog="aloader", description="aloader: an asyncio streaming data loader")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="measure how fast a dataset loads through aloader and torch's DataLoader",
        description=(
            "Stream a dataset through aloader and torch's DataLoader side by side and report samples/s, MB/s, "
            "time to first batch, sample latency and peak memory. With no URL_OR_PATH, a synthetic image-like "
            "dataset is served from an object server on 127.0.0.1 with --latency per request. --workload images "
            "serves JPEGs instead and runs one torch Dataset (requests, Pillow decode, random crop and flip) "
            "through each loader as users run it, against this machine's CPU bound."
        ),
    )
    bench.add_argument(
        "source",
        nargs="?",
        metavar="URL_OR_PATH",
        help="objects under a prefix or a local dir, or tar shards (a dir of .tar files, shards-{000..009}.tar)",
    )
    bench.add_argument(
        "--workload",
        choices=("read", "images"),
        default="read",
        help="read: how fast samples arrive (reads and a trivial decode; the default); images: JPEGs served "
        "by the bench, fetched and augmented by an unchanged torch Dataset (mixed I/O and CPU)",
    )
    bench.add_argument("--samples", type=_positive, help="how many samples to stream (default: all, or 2000)")
    bench.add_argument(
        "--format",
        choices=("auto", "objects", "tar"),
        default="auto",
        help="objects (one sample each) or tar shards; auto: tar when the source names only .tar files; "
        "with no URL_OR_PATH, tar serves the synthetic samples as tar shards",
    )
    bench.add_argument(
        "--shard-concurrency", type=_positive, default=4, help="tar: shards read at once by aloader and SPDL"
    )
    bench.add_argument("--batch-size", type=_positive, default=32)
    bench.add_argument("--concurrency", type=_positive, default=64, help="aloader's samples in flight")
    bench.add_argument(
        "--num-workers", type=int, default=2, help="read: torch DataLoader's workers (default 2; images: in the names)"
    )
    bench.add_argument("--aloader-workers", type=int, default=0, help="read: aloader's process pool (default 0)")
    bench.add_argument("--epochs", type=_positive, default=1)
    bench.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="run every system this many times, one round after the other, and report medians: each system's "
        "median round, and each ratio's median over the rounds (default 1)",
    )
    bench.add_argument("--latency", type=float, default=0.03, help="seconds per GET of the embedded server")
    bench.add_argument(
        "--systems",
        help=f"comma-separated, from {', '.join(SYSTEMS)}; with --workload images from {', '.join(IMAGE_SYSTEMS)} "
        "(default: all installed)",
    )
    bench.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")
    bench.add_argument("--plot", type=Path, metavar="FILE.png", help="draw throughput over time")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aloader`` console script and ``python -m aloader``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    from aloader.bench.config import BenchConfig, default_systems, systems_of
    from aloader.bench.report import dump_json, render_table, write_plot
    from aloader.bench.runner import run_bench
    from aloader.bench.sources import open_source

    known = systems_of(args.workload)
    if args.systems is None:
        systems = default_systems(args.workload)
    else:
        systems = tuple(name.strip() for name in args.systems.split(",") if name.strip())
    unknown = [name for name in systems if name not in known]
    if unknown or not systems:
        parser.error(f"--systems: unknown {unknown}; choose from {', '.join(known)}")
    if args.workload == "images" and (args.source is not None or args.format == "tar"):
        parser.error("--workload images serves its own JPEGs: it takes no URL_OR_PATH and no --format tar")
    with open_source(
        args.source, samples=args.samples, latency=args.latency, format=args.format, workload=args.workload
    ) as source:
        label, urls = source.label, source.urls
        config = BenchConfig(
            urls=tuple(urls),
            format=source.format,
            shard_concurrency=args.shard_concurrency,
            limit=source.limit,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            num_workers=args.num_workers,
            aloader_workers=args.aloader_workers,
            epochs=args.epochs,
            systems=systems,
            workload=args.workload,
            rounds=args.rounds,
        )
        per_epoch = config.samples_per_epoch
        what = f"{per_epoch} samples" if per_epoch is not None else "every sample"
        rounds = f", {args.rounds} rounds" if args.rounds > 1 else ""
        print(f"aloader bench: {label}, {what} x {args.epochs} epoch(s){rounds}", flush=True)
        report = run_bench(config, label, show_progress=not args.no_progress)
    print()
    print(f"Machine: {report.machine}")
    print(f"Source: {report.source}")
    print()
    print(render_table(report))
    if report.interrupted:
        print("\nInterrupted: the figures above cover what was measured until Ctrl-C.")
    if args.json:
        dump_json(report, args.json)
        print(f"\nJSON written to {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"Plot written to {args.plot}")
    failed = [(number, r) for number, results in enumerate(report.every_round, 1) for r in results if r.error]
    for number, r in failed:
        where = f" (round {number})" if len(report.every_round) > 1 else ""
        print(f"\n{r.title} failed{where}:\n{r.error}", file=sys.stderr)
    return 130 if report.interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
