"""Time-to-first-batch workload: how long ``iter(loader)`` takes to deliver its first batch, aloader against torch.

Two workloads, the same loaders as elsewhere in the suite:

- ``remote``: ``aloader bench``'s embedded default (image-like ``.npy`` objects behind a latency-injecting object
  server on 127.0.0.1): aloader's ``ObjectDataset`` at concurrency 64 against torch's DataLoader over an unchanged
  torch Dataset (a blocking GET per sample) with 2 workers, batch size 32;
- ``in-memory``: a ``TensorDataset`` of tiny samples, batch size 64, both at ``num_workers=0``.

Each measurement runs in a fresh process (started from a forkserver that has imported torch and aloader already,
so imports are not timed): the loader is built, then the first batch of a first iterator is timed (cold: the first
loader of the process, torch starting its workers, aloader its event loop and threads), the iterator closed, and
the first batch of a second one timed (warm). Median over ``--repeats`` processes per system, interleaved.

Before the first batch there is the import: ``import torch.utils.data`` and ``import aloader`` on top of it, timed in
fresh interpreters (median over ``--repeats``).

Then short epochs, where what a loader costs before its first batch and after its last is a share of the epoch: a
whole epoch in memory, timed from building the loader to its last batch (as a validation loop over a small set
runs), for 640 and 6,400 samples of 32 floats, batch size 64, shuffled, in a ``TensorDataset`` (aloader gathers its
batches) and in a dataset of one's own (``benchmarks.core.Rows``: both loaders fetch it sample by sample). Both at
``num_workers=0``, in this process after one untimed epoch of each, interleaved; median of ``--epochs`` epochs.
aloader runs each epoch with ``for`` and with ``async for`` (in one event loop that stays open between epochs).

Run ``python -m benchmarks.ttfb --write docs/benchmarks.md`` (``--quick`` for a smoke run); ``ttfb.png`` goes
beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.connection
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import TensorDataset

import aloader
from aloader.bench import runner
from aloader.bench.config import BenchConfig
from aloader.bench.plot import save_bars
from aloader.bench.report import machine
from aloader.bench.sources import open_source
from benchmarks.core import Rows, write_section

Workload = Literal["remote", "in-memory"]
System = Literal["aloader", "torch"]
TITLES: dict[System, dict[Workload, str]] = {
    "aloader": {"remote": "aloader, ObjectDataset, concurrency=64", "in-memory": "aloader, num_workers=0"},
    "torch": {"remote": "torch DataLoader, unchanged Dataset, num_workers=2", "in-memory": "torch, num_workers=0"},
}
LATENCY = 0.03


def make_loader(workload: Workload, system: System, urls: tuple[str, ...]) -> Any:
    if workload == "remote":
        config = BenchConfig(urls=urls, batch_size=32, concurrency=64, num_workers=2)
        return runner.make_loader(system, config)
    dataset = TensorDataset(torch.randn(10_000, 32), torch.randint(0, 10, (10_000,)))
    cls = aloader.DataLoader if system == "aloader" else torch.utils.data.DataLoader
    return cls(dataset, batch_size=64, shuffle=True)


def first_batch_seconds(loader: Any) -> float:
    started = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    seconds = time.perf_counter() - started
    close = getattr(iterator, "close", None)
    if close is not None:
        close()  # aloader's iterator stops its work at once; torch's stops its workers when it is collected
    del iterator
    return seconds


def _child(
    workload: Workload, system: System, urls: tuple[str, ...], conn: multiprocessing.connection.Connection
) -> None:
    runner.like_a_fresh_interpreter()  # as in aloader bench's children
    loader = make_loader(workload, system, urls)
    conn.send((first_batch_seconds(loader), first_batch_seconds(loader)))
    conn.close()


def measure(workload: Workload, system: System, urls: tuple[str, ...]) -> tuple[float, float]:
    """(cold, warm) seconds to the first batch, in a fresh process."""
    context = multiprocessing.get_context("forkserver")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(workload, system, urls, sender))
    process.start()
    sender.close()
    try:
        cold, warm = receiver.recv()
    except EOFError:
        raise RuntimeError(f"{workload}/{system}: the process exited with code {process.exitcode}") from None
    finally:
        receiver.close()
        process.join()
    return cold, warm


SHORT_SIZES = (640, 6_400)
ShortRow = tuple[str, int]  # (dataset kind, samples)


ShortSystem = Literal["torch", "aloader", "aloader-async"]


async def _async_epoch_seconds(dataset: Any) -> float:
    started = time.perf_counter()
    async for _ in aloader.DataLoader(dataset, batch_size=64, shuffle=True):
        pass
    return time.perf_counter() - started


def short_epoch_seconds(system: ShortSystem, dataset: Any, runner: asyncio.Runner) -> float:
    """One whole epoch, from building the loader to its last batch (``aloader-async``: ``async for`` in the
    runner's loop, which stays open between epochs as a service's does)."""
    if system == "aloader-async":
        return runner.run(_async_epoch_seconds(dataset))
    cls = aloader.DataLoader if system == "aloader" else torch.utils.data.DataLoader
    started = time.perf_counter()
    for _ in cls(dataset, batch_size=64, shuffle=True):
        pass
    return time.perf_counter() - started


def short_epochs(epochs: int) -> dict[ShortRow, dict[ShortSystem, float]]:
    """Median seconds of a short in-memory epoch per (dataset kind, samples) and system, interleaved."""
    datasets: dict[ShortRow, Any] = {}
    for n in SHORT_SIZES:
        tensors = (torch.randn(n, 32), torch.randint(0, 10, (n,)))
        datasets["TensorDataset", n] = TensorDataset(*tensors)
        datasets["a dataset of one's own", n] = Rows(*tensors)
    systems: tuple[ShortSystem, ...] = ("torch", "aloader", "aloader-async")
    times: dict[ShortRow, dict[ShortSystem, list[float]]] = {row: {s: [] for s in systems} for row in datasets}
    with asyncio.Runner() as runner:
        for dataset in datasets.values():
            for system in systems:
                short_epoch_seconds(system, dataset, runner)  # untimed: this loader class's first epoch here
        for _ in range(epochs):
            for row, dataset in datasets.items():
                for system in systems:
                    times[row][system].append(short_epoch_seconds(system, dataset, runner))
    return {row: {s: statistics.median(t) for s, t in by.items()} for row, by in times.items()}


def render_short(figures: dict[ShortRow, dict[ShortSystem, float]], epochs: int) -> str:
    lines = [
        f"Short epochs in memory, from building the loader to its last batch: median of {epochs} interleaved "
        "epochs per row, after one untimed epoch (batch size 64, shuffled, `num_workers=0`; `async for` in one "
        "event loop that stays open, as a service's). Speed: torch's time over aloader's (higher is better).",
        "",
        "| dataset | samples | torch (ms) | aloader `for` (ms) | `for` vs torch | aloader `async for` (ms) "
        "| `async for` vs torch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (kind, n), by in figures.items():
        ours, ours_async = by["aloader"], by["aloader-async"]
        lines.append(
            f"| {kind} | {n:,} | {by['torch'] * 1e3:.2f} | {ours * 1e3:.2f} | {by['torch'] / ours:.2f}x "
            f"| {ours_async * 1e3:.2f} | {by['torch'] / ours_async:.2f}x |"
        )
    return "\n".join(lines) + "\n"


IMPORT_SCRIPT = (
    "import time; started = time.perf_counter(); import torch.utils.data; middle = time.perf_counter(); "
    "import aloader; print(middle - started, time.perf_counter() - middle)"
)


def import_seconds() -> tuple[float, float]:
    """(``import torch.utils.data``, ``import aloader`` after it) in seconds, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True, check=True).stdout
    torch_seconds, aloader_seconds = (float(x) for x in out.split())
    return torch_seconds, aloader_seconds


def render_imports(imports: list[tuple[float, float]]) -> str:
    torch_seconds = statistics.median(t for t, _ in imports)
    aloader_seconds = statistics.median(a for _, a in imports)
    return (
        f"Imports, median of {len(imports)} fresh interpreters: `import torch.utils.data` {torch_seconds:.3f} s; "
        f"`import aloader` after it {aloader_seconds:.3f} s more ({aloader_seconds / torch_seconds:.0%} of "
        "torch's).\n"
    )


def render(figures: dict[Workload, dict[System, tuple[float, float]]], repeats: int, label: str) -> str:
    lines = [
        f"Median of {repeats} fresh processes per system. remote: {label}; batch size 32. in-memory: a "
        "TensorDataset of 10,000 samples of 32 floats, batch size 64, shuffled. Cold: the first iterator of a "
        "process; warm: the next one. Ratio: aloader's time over torch's (lower is better).",
        "",
        "| workload | torch, cold (s) | aloader, cold (s) | cold ratio | torch, warm (s) | aloader, warm (s) "
        "| warm ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, systems in figures.items():
        (torch_cold, torch_warm), (ours_cold, ours_warm) = systems["torch"], systems["aloader"]
        lines.append(
            f"| {workload} ({TITLES['aloader'][workload]} against {TITLES['torch'][workload]}) "
            f"| {torch_cold:.4f} | {ours_cold:.4f} | {ours_cold / torch_cold:.2f}x "
            f"| {torch_warm:.4f} | {ours_warm:.4f} | {ours_warm / torch_warm:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(figures: dict[Workload, dict[System, tuple[float, float]]], path: Path) -> None:
    panels = []
    for workload, systems in figures.items():
        bars = [
            (f"{system}, {which}", systems[system][index] * 1e3)
            for index, which in enumerate(("cold", "warm"))
            for system in ("torch", "aloader")
        ]
        panels.append((f"{workload}: time to first batch, ms (lower is better)", bars))
    save_bars(path, panels, xlabel="ms", value_format=",.1f")


def main(argv: list[str] | None = None) -> dict[Workload, dict[System, tuple[float, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: one process per system")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=41, help="short epochs timed per row and system")
    parser.add_argument("--write", type=Path, help="write the table into this file's ttfb section")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    latency = 0.005 if args.quick else LATENCY
    runs: dict[Workload, dict[System, list[tuple[float, float]]]] = {
        "remote": {"torch": [], "aloader": []},
        "in-memory": {"torch": [], "aloader": []},
    }
    imports: list[tuple[float, float]] = []
    with open_source(None, samples=256, latency=latency) as source:
        urls = tuple(source.urls)
        for _ in range(repeats):  # interleaved: noise from other users of the machine hits both alike
            imports.append(import_seconds())
            for workload, systems in runs.items():
                for system, rows in systems.items():
                    rows.append(measure(workload, system, urls))
    figures = {
        workload: {
            system: (statistics.median(c for c, _ in rows), statistics.median(w for _, w in rows))
            for system, rows in systems.items()
        }
        for workload, systems in runs.items()
    }
    epochs = 3 if args.quick else args.epochs
    short = short_epochs(epochs)
    load = "load average at the end of the run: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    header = f"Machine: {machine()}; {load}"
    table = render(figures, repeats, source.label) + "\n" + render_imports(imports) + "\n" + render_short(short, epochs)
    print(f"{header}\n\n{table}")
    if args.write:
        path = args.write.parent / "ttfb.png"
        plot(figures, path)
        write_section(args.write, f"{header}\n\n{table}\n![time to first batch]({path.name})\n", section="ttfb")
    return figures


if __name__ == "__main__":
    main()
