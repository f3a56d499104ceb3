"""Remote I/O workload: ``aloader bench``'s embedded default, written to ``docs/benchmarks.md`` with its plot.

A synthetic image-like dataset behind a latency-injecting object server on 127.0.0.1, streamed through the bare
ceiling, aloader (bucket dataset and an unchanged torch Dataset), torch's DataLoader and SPDL, side by side.

Run ``python -m benchmarks.remote --write docs/benchmarks.md`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aloader import _bench
from benchmarks.core import write_section


def main(argv: list[str] | None = None) -> _bench.BenchReport:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run with a tiny dataset")
    parser.add_argument("--write", type=Path, help="write the table into this file's bench section")
    parser.add_argument("--plot", type=Path, help="draw throughput over time here (default: beside --write)")
    args = parser.parse_args(argv)
    samples, latency = (48, 0.005) if args.quick else (None, 0.03)
    with _bench.open_source(None, samples=samples, latency=latency) as source:
        label = source.label
        config = _bench.BenchConfig(urls=tuple(source.urls), systems=_bench.default_systems())
        report = _bench.run_bench(config, label, show_progress=False)
    table = _bench.render_table(report)
    print(f"Machine: {report.machine}\n\n{table}")
    plot = args.plot or (args.write.parent / "bench-default.png" if args.write else None)
    if plot is not None:
        _bench.write_plot(report, plot)
    if args.write:
        body = (
            f"Machine: {report.machine}\n\n"
            f"`aloader bench` on its embedded default ({label}); batch size {config.batch_size}, concurrency "
            f"{config.concurrency}, torch's num_workers {config.num_workers}.\n\n{table}\n"
            + (f"\n![throughput over time]({plot.name})\n" if plot is not None else "")
        )
        write_section(args.write, body, section="bench")
    return report


if __name__ == "__main__":
    main()
