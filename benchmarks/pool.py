"""Process-pool benchmark: a CPU-bound dataset through aloader and torch's DataLoader at ``num_workers=2``.

Each sample spends a few milliseconds in pure Python (the GIL holds threads to one core), then returns a 3x64x64
image tensor and a label. Each system runs in a fresh interpreter, so both pay their real start-up (torch forks its
workers; so does aloader by default, as the consumer is the process's only thread at ``iter()``; with forkserver, a
server process imports torch once per process and workers are forked from it); the
benchmark process samples the resident memory of that interpreter and all its descendants together every 5 ms.

Measured per system, side by side in one run:

- time to first batch of the first epoch (cold: a fresh process) and of the second (warm),
- throughput over the second epoch (samples/s),
- peak memory of all processes together: the sum of PSS (proportional set size: a page shared by k processes
  counts 1/k in each), and for reference the sum of RSS (which counts shared pages, such as libtorch's, once per
  process, so it penalises every extra process, e.g. the forkserver, by the size of torch's shared libraries).

Then the transfer itself: one batch (16x3x64x64 float32) from a worker to the main process as pickled bytes in the
pipe against aloader's shared memory (descriptor passing), and the round trip of a trivial batch through the pool (the
per-task cost that the work per batch must dwarf).

Run ``python -m benchmarks.pool`` (``--quick`` for a smoke run); ``--write docs/benchmarks.md`` updates its section
and draws ``pool.png`` beside it.
Other users of the machine add noise: compare the systems within one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch.utils.data import Dataset

import aloader
from aloader import _pool
from aloader._pool import transfer as wire
from aloader.bench.plot import save_bars
from benchmarks.core import machine, write_section

SYSTEMS = {
    "torch": "torch DataLoader (fork)",
    "aloader": "aloader DataLoader (default: fork at iter())",
    "aloader-forkserver": 'aloader DataLoader, multiprocessing_context="forkserver"',
    "torch+thread": "torch DataLoader (fork), a busy thread beside it",
    "aloader+thread": "aloader DataLoader (default), a busy thread beside it",
}
BUSY = "+thread"


def burn(seconds_of_work: int) -> int:
    """Pure-Python CPU work (holds the GIL throughout)."""
    total = 0
    for i in range(seconds_of_work):
        total = (total * 31 + i) % 1_000_003
    return total


class CpuBound(Dataset[tuple[torch.Tensor, int]]):
    """A few milliseconds of pure Python per sample, then an image-sized tensor."""

    def __init__(self, n: int, work: int) -> None:
        self.n, self.work = n, work

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        value = burn(self.work)
        return torch.full((3, 64, 64), float(value % 255)), i % 10


class Trivial(Dataset[int]):
    def __len__(self) -> int:
        return 4096

    def __getitem__(self, i: int) -> int:
        return i


# ----------------------------------------------------------------------------------------------- one system
def busy_thread(stop: threading.Event) -> threading.Thread:
    """A thread of pure-Python work beside the consumer, as a training process has (a metrics or logging thread):
    it takes the GIL in turns with the loader's own Python."""

    def run() -> None:
        while not stop.is_set():
            burn(10_000)

    thread = threading.Thread(target=run, name="busy", daemon=True)
    thread.start()
    return thread


def run_system(system: str, n: int, work: int, batch_size: int) -> dict[str, float]:
    """In a fresh interpreter: two epochs, timing the first batch of each and the whole second epoch."""
    stop = threading.Event()
    if system.endswith(BUSY):
        busy_thread(stop)
        system = system.removesuffix(BUSY)
    cls = torch.utils.data.DataLoader if system == "torch" else aloader.DataLoader
    context = {"multiprocessing_context": "forkserver"} if system == "aloader-forkserver" else {}
    figures: dict[str, float] = {}
    for epoch in (1, 2):
        loader = cls(CpuBound(n, work), batch_size=batch_size, num_workers=2, **context)
        started = time.perf_counter()
        iterator = iter(loader)
        samples = len(next(iterator)[1])
        first = time.perf_counter() - started
        samples += sum(len(labels) for _, labels in iterator)
        elapsed = time.perf_counter() - started
        figures[f"first_batch_{epoch}"] = first
        if epoch == 2:
            figures["samples_per_second"] = samples / elapsed
        del iterator, loader
    stop.set()
    return figures


def measure(system: str, n: int, work: int, batch_size: int) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.pool", "--child", system, f"--n={n}", f"--work={work}"]
    command.append(f"--batch-size={batch_size}")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    root = psutil.Process(process.pid)
    peak_pss = peak_rss = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        pss = rss = 0
        for p in tree:
            p_pss, p_rss = _memory(p.pid)
            pss, rss = pss + p_pss, rss + p_rss
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.01)  # a sampling interval, not synchronisation
    out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{system} run failed with exit code {process.returncode}")
    figures: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    figures["peak_pss_mb"] = peak_pss / 2**20
    figures["peak_rss_mb"] = peak_rss / 2**20
    return figures


def _memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes; (0, 0) if it has gone. PSS splits each shared page between its sharers
    (libtorch's pages, mapped by every process, count once in total), so the sum over processes is the memory they
    use together; summed RSS counts shared pages once per process."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) * 1024 if rest.split() else 0
    return fields.get("Pss", 0), fields.get("Rss", 0)


# ----------------------------------------------------------------------------------------------- transfer
def _send_batches(conn: multiprocessing.connection.Connection, mode: str, count: int) -> None:
    # Each batch is made as the pipeline makes it: pickled, a private tensor; shared, a tensor allocated in shared
    # memory from the start, as default_collate does inside a worker.
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    for i in range(count):
        if mode == "pickle":
            conn.send_bytes(pickle.dumps(torch.full((16, 3, 64, 64), float(i)), pickle.HIGHEST_PROTOCOL))
        else:
            batch = torch.empty(16, 3, 64, 64).share_memory_()  # type: ignore[no-untyped-call]
            wire.send_result(conn, sock, i, batch.fill_(float(i)))
    conn.recv_bytes()  # wait until the receiver is done before the descriptors' storages go
    sock.close()


def transfer(count: int, rounds: int) -> dict[str, float]:
    """Seconds per 786 kB batch from a worker process to this one: pickled bytes against shared memory.

    The modes alternate over ``rounds``, and each keeps its best round: noise from the machine only adds time.
    """
    results: dict[str, float] = {}
    for _ in range(rounds):
        for mode in ("pickle", "shared"):
            seconds = _transfer_round(mode, count)
            results[mode] = min(results.get(mode, seconds), seconds)
    return results


def _transfer_round(mode: str, count: int) -> float:
    context = _pool.default_context()
    ours, theirs = context.Pipe(duplex=True)
    sock = socket.socket(fileno=os.dup(ours.fileno()))
    process = context.Process(target=_send_batches, args=(theirs, mode, count), daemon=True)  # type: ignore[attr-defined]
    process.start()
    theirs.close()
    ours.poll(None)
    started = time.perf_counter()
    for _ in range(count):
        data = ours.recv_bytes()
        if mode == "pickle":
            batch = pickle.loads(data)
        else:
            _, fd_count = wire.HEADER.unpack_from(data)
            fds = wire.recvfds(sock, fd_count)
            wire.received.fds = fds
            batch = pickle.loads(memoryview(data)[wire.HEADER.size :])
            wire.received.fds, wire.received.storages = [], {}
            for fd in fds:
                os.close(fd)
        float(batch.sum())  # touch every byte, as training would
    seconds = (time.perf_counter() - started) / count
    ours.send_bytes(b"done")
    process.join()
    ours.close()
    sock.close()
    return seconds


def round_trip(batches: int) -> float:
    """Seconds per trivial batch of 16 through the pool: the fixed cost of one task."""
    loader = aloader.DataLoader(Trivial(), batch_size=16, num_workers=2)
    iterator = iter(loader)
    next(iterator)  # the pool is up
    started = time.perf_counter()
    count = sum(1 for _ in zip(range(batches), iterator, strict=False))
    seconds = (time.perf_counter() - started) / count
    iterator.close()
    return seconds


# ----------------------------------------------------------------------------------------------- report
def torch_row_name(name: str) -> str:
    """The torch row a system is compared with: the one run in the same condition (with or without the thread)."""
    return "torch" + BUSY if name.endswith(BUSY) else "torch"


@dataclass(frozen=True)
class Report:
    work_ms: float
    samples: int
    batch_size: int
    systems: dict[str, dict[str, float]]
    transfer: dict[str, float]
    task_seconds: float
    repeats: int

    def plot(self, path: Path) -> None:
        """Bars per figure: throughput, peak PSS, and the first batch cold and warm."""
        panels = [
            ("samples/s, epoch 2 (higher is better)", "samples_per_second"),
            ("peak PSS of all processes, MiB (lower is better)", "peak_pss_mb"),
            ("first batch, cold process, s (lower is better)", "first_batch_1"),
            ("first batch, warm, s (lower is better)", "first_batch_2"),
        ]
        save_bars(
            path,
            [(title, [(SYSTEMS[name], row[key]) for name, row in self.systems.items()]) for title, key in panels],
            xlabel="",
            value_format=",.2f",
        )

    def render(self) -> str:
        lines = [
            f"Median of {self.repeats} interleaved runs. CPU-bound dataset: {self.samples} samples of "
            f"~{self.work_ms:.1f} ms pure Python each, batch_size={self.batch_size}, num_workers=2. "
            "A busy thread: a thread of pure-Python work in the main process, started before the loader and running "
            "throughout (as a metrics or logging thread would, only busier).",
            "",
            "| system | samples/s (epoch 2) | first batch, cold process (s) | first batch, warm (s) "
            "| peak PSS, all processes (MiB) | peak RSS sum (MiB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, row in self.systems.items():
            label = SYSTEMS[name]
            lines.append(
                f"| {label} | {row['samples_per_second']:,.0f} | {row['first_batch_1']:.2f} | "
                f"{row['first_batch_2']:.3f} | {row['peak_pss_mb']:,.0f} | {row['peak_rss_mb']:,.0f} |"
            )
        lines += ["", "Ratios to torch (throughput: higher is better; memory and first batch: lower is better):", ""]
        for name in [name for name in self.systems if not name.startswith("torch")]:
            ours = self.systems[name]
            torch_row = self.systems[torch_row_name(name)]
            speed = ours["samples_per_second"] / torch_row["samples_per_second"]
            lines.append(
                f"- {SYSTEMS[name]} (against {SYSTEMS[torch_row_name(name)]}): throughput {speed:.2f}x, "
                f"peak PSS {ours['peak_pss_mb'] / torch_row['peak_pss_mb']:.2f}x, "
                f"warm first batch {ours['first_batch_2'] / torch_row['first_batch_2']:.2f}x, "
                f"cold first batch {ours['first_batch_1'] / torch_row['first_batch_1']:.2f}x."
            )
        lines += [
            "",
            "Transfer of one 16x3x64x64 float32 batch (786 kB) from a worker, received and read:",
            "",
            "| transfer | ms per batch |",
            "|---|---:|",
            f"| pickled bytes through the pipe | {self.transfer['pickle'] * 1e3:.2f} |",
            f"| shared memory (descriptor passed on the socket) | {self.transfer['shared'] * 1e3:.2f} |",
            "",
            f"Fixed cost of one task through the pool (a trivial batch of 16): {self.task_seconds * 1e3:.2f} ms, "
            f"against ~{self.work_ms * self.batch_size:.0f} ms of work per batch here.",
            "",
        ]
        return "\n".join(lines)


def calibrate(target_seconds: float) -> int:
    """Loop iterations of ``burn`` that take about ``target_seconds`` on this machine (best of 5)."""
    iterations = 100_000
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        burn(iterations)
        best = min(best, time.perf_counter() - started)
    return max(1, int(iterations * target_seconds / best))


def main(argv: list[str] | None = None) -> Report | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes")
    parser.add_argument("--write", type=Path, help="write the Markdown tables into this file's pool section")
    parser.add_argument("--child", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_system(args.child, args.n, args.work, args.batch_size)))
        return None

    work_seconds = 0.003
    work = calibrate(work_seconds)
    n, batch_size = (16, 8) if args.quick else (1024, 16)
    # Interleaved repeats, median per figure: noise from other users of the machine hits both systems alike.
    repeats = 1 if args.quick else 5
    # The smoke run skips the opt-in forkserver row: it only checks that the script works end to end.
    names = ["torch", "aloader", "torch+thread", "aloader+thread"] if args.quick else list(SYSTEMS)
    runs: dict[str, list[dict[str, float]]] = {system: [] for system in names}
    for _ in range(repeats):
        for system in runs:
            runs[system].append(measure(system, n, work, batch_size))
    systems = {
        system: {key: statistics.median(run[key] for run in rows) for key in rows[0]} for system, rows in runs.items()
    }
    report = Report(
        work_ms=work_seconds * 1e3,
        samples=n,
        batch_size=batch_size,
        systems=systems,
        transfer=transfer(3, 1) if args.quick else transfer(50, 3),
        task_seconds=round_trip(10 if args.quick else 200),
        repeats=repeats,
    )
    text = report.render()
    print(f"Machine: {machine()}\n")
    print(text)
    if args.write:
        plot = args.write.parent / "pool.png"
        report.plot(plot)
        write_section(args.write, f"Machine: {machine()}\n\n{text}\n![pool figures]({plot.name})\n", section="pool")
    return report


if __name__ == "__main__":
    main()
