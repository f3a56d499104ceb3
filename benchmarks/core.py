"""Core benchmark: aloader against torch's DataLoader, side by side in one run.

Workloads:

- ``latency``: a dataset whose samples each wait 30 ms (simulated storage latency), async ``__getitem__`` through
  aloader at concurrency 1 and 64, and the same as an unchanged sync torch Dataset (``time.sleep``) through
  aloader and through torch's DataLoader with ``num_workers=0``.
- ``in-memory``: a ``TensorDataset`` of tiny samples, batch 64, shuffled, timed from building the loader to the last
  batch: aloader (``for`` and ``async for``) against torch's DataLoader with ``num_workers=0``, the fastest torch
  setting for in-memory data; alone, and with a busy Python thread beside the consumer (as a training process has:
  a metrics or logging thread, only busier), each compared with torch in the same condition.
- ``in-memory, a dataset of one's own``: the same tensors in a plain map-style ``Dataset`` whose ``__getitem__``
  indexes them (what a custom in-memory dataset looks like): aloader gathers an unchanged ``TensorDataset``'s batches
  in one op per tensor, this one it fetches and collates sample by sample, as torch does. Every in-memory epoch
  stops after ``EPOCH_LIMIT_SECONDS`` (30 s) with what it delivered, for machines where a busy thread slows it 1000x.
- ``in-memory + model step``: the same, with the consumer running a small MLP's forward pass on each batch (about
  0.5 ms on one thread), as a training loop would: torch's ops release the GIL while they compute, so the loader's
  thread can make the next batches meanwhile; torch's ``num_workers=0`` makes them only between steps.

Run ``python -m benchmarks.core`` (``--quick`` for a smoke run). Results go to ``docs/benchmarks.md`` with
``--write`` (and a bar chart, ``core.png``, beside it); ratios are what to compare, since absolute figures depend on
the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

import aloader
from aloader.bench.plot import save_bars
from aloader.bench.report import machine

LATENCY_SECONDS = 0.03


class AsyncLatency:
    """Each sample waits ``latency`` seconds on the event loop, as an object-store GET would."""

    def __init__(self, n: int, latency: float = LATENCY_SECONDS) -> None:
        self.n, self.latency = n, latency

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, i: int) -> torch.Tensor:
        await asyncio.sleep(self.latency)
        return torch.full((16,), i, dtype=torch.float32)


class BlockingLatency(Dataset[torch.Tensor]):
    """An unchanged torch Dataset that blocks ``latency`` seconds per sample (a blocking GET in __getitem__)."""

    def __init__(self, n: int, latency: float = LATENCY_SECONDS) -> None:
        self.n, self.latency = n, latency

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.latency)
        return torch.full((16,), i, dtype=torch.float32)


@dataclass(frozen=True)
class Result:
    workload: str
    system: str
    samples: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds


def count_samples(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(first.shape[0])


def time_sync(loader: Any, step: Callable[[Any], Any] | None = None, limit: float | None = None) -> tuple[int, float]:
    """An epoch's samples and seconds; ``step`` (the consumer's work, as a training step) runs on each batch. With
    ``limit``, the epoch stops after that many seconds (``break``), with the samples delivered so far."""
    started = time.perf_counter()
    samples = 0
    for batch in loader:
        if step is not None:
            step(batch)
        samples += count_samples(batch)
        if limit is not None and time.perf_counter() - started > limit:
            break
    return samples, time.perf_counter() - started


def time_async(loader: aloader.DataLoader, limit: float | None = None) -> tuple[int, float]:
    async def run() -> tuple[int, float]:
        started = time.perf_counter()
        samples = 0
        async for batch in loader:
            samples += count_samples(batch)
            if limit is not None and time.perf_counter() - started > limit:
                break
        return samples, time.perf_counter() - started

    return asyncio.run(run())


# A run that delivers nothing for this long has stalled (the epoch limit is only checked as batches arrive): the
# benchmark then fails with every thread's stack on stderr (faulthandler) instead of waiting forever.
STALL_SECONDS = 600.0


def watched(fn: Callable[[], tuple[int, float]]) -> tuple[int, float]:
    """``fn()``, or the process exits (code 1) with every thread's traceback after ``STALL_SECONDS``."""
    faulthandler.dump_traceback_later(STALL_SECONDS, exit=True)
    try:
        return fn()
    finally:
        faulthandler.cancel_dump_traceback_later()


def best_of(repeats: int, fn: Callable[[], tuple[int, float]]) -> tuple[int, float]:
    runs = [watched(fn) for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def latency_workload(n_async: int, n_torch: int) -> list[Result]:
    results = []
    for concurrency in (1, 64):
        n = n_async if concurrency > 1 else max(16, n_async // 32)
        loader = aloader.DataLoader(AsyncLatency(n), batch_size=16, concurrency=concurrency)
        results.append(Result("latency", f"aloader async dataset, concurrency={concurrency}", *time_async(loader)))
    loader = aloader.DataLoader(BlockingLatency(n_async), batch_size=16, concurrency=64)
    results.append(Result("latency", "aloader unchanged sync dataset, concurrency=64", *time_sync(loader)))
    reference = torch.utils.data.DataLoader(BlockingLatency(n_torch), batch_size=16)
    results.append(Result("latency", "torch DataLoader, num_workers=0", *time_sync(reference)))
    return results


BUSY = ", busy thread beside it"


def with_busy_thread(fn: Callable[[], tuple[int, float]]) -> Callable[[], tuple[int, float]]:
    """``fn`` run with a thread of pure-Python work beside it, started before and stopped after."""

    def run() -> tuple[int, float]:
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                total = 0
                for i in range(10_000):
                    total = (total * 31 + i) % 1_000_003

        thread = threading.Thread(target=busy, name="busy")
        thread.start()
        try:
            return fn()
        finally:
            stop.set()
            thread.join()

    return run


class Rows(Dataset[tuple[torch.Tensor, ...]]):
    """In-memory rows of tensors, as a dataset of one's own holds them: ``__getitem__`` indexes each tensor, as
    ``TensorDataset``'s does, but it is not ``TensorDataset``, so every loader fetches it sample by sample."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(tensor[i] for tensor in self.tensors)


# An in-memory epoch beside a busy thread can run 1000x slower than alone (on some VMs, in some processes: each
# release of the GIL then waits out the busy thread's switch interval); an epoch stops after this long and counts
# the samples it delivered, so that the run ends.
EPOCH_LIMIT_SECONDS = 30.0


def in_memory_workload(n: int, repeats: int, rows_dataset: bool = False) -> list[Result]:
    """``TensorDataset`` (aloader gathers its batches: one op per tensor), or with ``rows_dataset`` the same tensors
    in :class:`Rows` (fetched and collated sample by sample by both loaders)."""
    tensors = (torch.randn(n, 32), torch.randint(0, 10, (n,)))
    dataset: Dataset[Any] = Rows(*tensors) if rows_dataset else TensorDataset(*tensors)
    kwargs: dict[str, Any] = {"batch_size": 64, "shuffle": True}
    limit = EPOCH_LIMIT_SECONDS

    # Each run builds its loader inside the timing: construction is part of what a user waits for.
    def torch_epoch() -> tuple[int, float]:
        started = time.perf_counter()
        samples, _ = time_sync(torch.utils.data.DataLoader(dataset, **kwargs), limit=limit)
        return samples, time.perf_counter() - started

    def aloader_for() -> tuple[int, float]:
        started = time.perf_counter()
        samples, _ = time_sync(aloader.DataLoader(dataset, **kwargs), limit=limit)
        return samples, time.perf_counter() - started

    def aloader_async_for() -> tuple[int, float]:
        started = time.perf_counter()
        samples, _ = time_async(aloader.DataLoader(dataset, **kwargs), limit=limit)
        return samples, time.perf_counter() - started

    rows = [
        ("torch DataLoader, num_workers=0", torch_epoch),
        ("aloader, for", aloader_for),
        ("aloader, async for", aloader_async_for),
    ]
    rows += [(name + BUSY, with_busy_thread(fn)) for name, fn in rows]
    return interleaved(IN_MEMORY_ROWS if rows_dataset else "in-memory", rows, repeats)


def interleaved(workload: str, rows: list[tuple[str, Callable[[], tuple[int, float]]]], repeats: int) -> list[Result]:
    """Each system's median over ``repeats``, the systems' runs interleaved so machine noise hits them alike."""
    timings: dict[str, list[tuple[int, float]]] = {name: [] for name, _ in rows}
    for _ in range(repeats):
        for name, fn in rows:
            timings[name].append(watched(fn))
    return [Result(workload, name, runs[0][0], statistics.median(s for _, s in runs)) for name, runs in timings.items()]


class ModelStep:
    """A small MLP's forward pass on ``(features, labels)`` batches: the consumer's share of a training step."""

    def __init__(self, features: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.weights = [
            torch.randn(features, 512, generator=generator),
            torch.randn(512, 512, generator=generator),
            torch.randn(512, 10, generator=generator),
        ]

    def __call__(self, batch: Any) -> float:
        hidden = batch[0]
        for weight in self.weights[:-1]:
            hidden = torch.relu(hidden @ weight)
        return float((hidden @ self.weights[-1]).sum())


def model_step_workload(n: int, repeats: int) -> list[Result]:
    dataset = TensorDataset(torch.randn(n, 32), torch.randint(0, 10, (n,)))
    kwargs: dict[str, Any] = {"batch_size": 64, "shuffle": True}
    step = ModelStep()
    reference = torch.utils.data.DataLoader(dataset, **kwargs)
    ours = aloader.DataLoader(dataset, **kwargs)
    rows = [
        ("torch DataLoader, num_workers=0, with a model step", lambda: time_sync(reference, step)),
        ("aloader, for, with a model step", lambda: time_sync(ours, step)),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the step on one core, the other left to the loader (and to torch's nothing)
    try:
        return interleaved("in-memory + model step", rows, repeats)
    finally:
        torch.set_num_threads(threads)


IN_MEMORY_ROWS = "in-memory, a dataset of one's own (sample by sample)"
WORKLOADS = ("latency", "in-memory", IN_MEMORY_ROWS, "in-memory + model step")


def render(results: list[Result]) -> str:
    """A table per workload; a workload measured beside a busy thread too gets that condition as columns, each
    ratio against torch in the same condition."""
    lines = []
    for workload in WORKLOADS:
        rows = [r for r in results if r.workload == workload]
        if not rows:
            continue
        alone = [r for r in rows if not r.system.endswith(BUSY)]
        busy = {r.system.removesuffix(BUSY): r for r in rows if r.system.endswith(BUSY)}
        lines.append(f"### {workload}")
        lines.append("")
        if busy:
            lines += [
                "| system | samples | samples/s | vs torch | samples/s, a busy thread beside it"
                " | vs torch, both beside it |",
                "|---|---:|---:|---:|---:|---:|",
            ]
        else:
            lines += ["| system | samples | samples/s | vs torch |", "|---|---:|---:|---:|"]
        base = next(r for r in alone if r.system.startswith("torch"))
        base_busy = busy.get(base.system)
        for r in alone:
            line = f"| {r.system} | {r.samples} | {r.samples_per_second:,.0f} | {_ratio(r, base):.2f}x |"
            if busy:
                other = busy.get(r.system)
                if other is None or base_busy is None:
                    line += " - | - |"
                else:
                    line += f" {other.samples_per_second:,.0f} | {_ratio(other, base_busy):.2f}x |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def _ratio(result: Result, baseline: Result) -> float:
    return result.samples_per_second / baseline.samples_per_second


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes")
    parser.add_argument("--write", type=Path, help="write the Markdown table into this file's core section")
    parser.add_argument(
        "--repeats",
        type=int,
        default=11,
        help="interleaved runs per in-memory system (the model step: about 2/3 as many); each run beside the busy "
        "thread may take up to 30 s",
    )
    args = parser.parse_args(argv)
    if args.quick:
        results = (
            latency_workload(n_async=64, n_torch=16)
            + in_memory_workload(n=2_000, repeats=1)
            + in_memory_workload(n=2_000, repeats=1, rows_dataset=True)
            + model_step_workload(n=2_000, repeats=1)
        )
    else:
        results = (
            latency_workload(n_async=4_096, n_torch=160)
            + in_memory_workload(n=200_000, repeats=args.repeats)
            + in_memory_workload(n=200_000, repeats=args.repeats, rows_dataset=True)
            + model_step_workload(n=100_000, repeats=max(1, args.repeats * 2 // 3))
        )
    repeats = 1 if args.quick else args.repeats
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    table = f"In memory: medians of {repeats} interleaved runs per system; load average at the end: {load}.\n\n"
    table += render(results)
    print(f"Machine: {machine()}\n")
    print(table)
    if args.write:
        plot = args.write.parent / "core.png"
        save_bars(
            plot,
            [
                (f"{workload}: samples/s (higher is better)", [(r.system, r.samples_per_second) for r in rows])
                for workload in WORKLOADS
                if (rows := [r for r in results if r.workload == workload])
            ],
            xlabel="samples/s",
        )
        write_section(args.write, f"Machine: {machine()}\n\n{table}\n![samples/s per system]({plot.name})\n")
    return results


BEGIN, END = "<!-- core:begin -->", "<!-- core:end -->"


def write_section(path: Path, body: str, section: str = "core") -> None:
    """Replace the text between ``<!-- {section}:begin -->`` and ``<!-- {section}:end -->`` (appended if absent)."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
