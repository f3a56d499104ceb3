"""The figures of an ``aloader bench`` run: one ``SystemResult`` per system, the ``BenchReport``, and how they are
written out (the Markdown table, JSON, the throughput plot, and the line naming the machine)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

import aloader
from aloader.bench.config import BenchConfig, SystemName
from aloader.bench.plot import save_lines

__all__ = ["BenchReport", "SystemResult", "dump_json", "machine", "render_table", "write_plot"]


@dataclass(frozen=True)
class SystemResult:
    """The figures of one system, computed from its events."""

    system: SystemName
    title: str
    samples: int
    bytes: int
    seconds: float
    first_batch_seconds: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    peak_rss_mb: float
    interrupted: bool
    error: str | None = None
    peak_pss_mb: float | None = None  # None where PSS cannot be read (psutil has it on Linux only)
    distinct_samples: int | None = None  # different samples delivered, when the batches name them (images)
    cpu_ms_per_sample: float | None = None  # the CPU bound's measure; its samples/s is cores / this
    fetch_cpu_ms_per_sample: float | None = None  # the CPU bound's row: of its CPU per sample, the HTTP client's
    # CPU time (user + system) of the whole process tree per sample delivered, start-up included: what a system
    # costs whatever else runs on the machine
    tree_cpu_ms_per_sample: float | None = None
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, samples so far)
    # (seconds since start, bytes delivered so far, RSS of the process tree in bytes), every sample of the RSS
    rss_timeline: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class BenchReport:
    """A run's figures. With several rounds (``config.rounds``: every system once a round, the rounds one after the
    other, so that the machine's noise hits every system alike), ``results`` holds each system's median round (by
    samples/s) and each ratio is the median of that ratio's value in every round, between runs of the same round."""

    machine: str
    source: str
    config: BenchConfig
    results: list[SystemResult]
    interrupted: bool
    rounds: list[list[SystemResult]] = field(default_factory=list)  # every round's results; empty: ``results``

    @classmethod
    def of_rounds(
        cls, machine: str, source: str, config: BenchConfig, rounds: list[list[SystemResult]], interrupted: bool
    ) -> BenchReport:
        """The report of ``rounds`` (the last may be cut short by Ctrl-C): each system's median round as its row."""
        return cls(machine, source, config, median_results(rounds), interrupted, rounds)

    @property
    def every_round(self) -> list[list[SystemResult]]:
        """Every round's results (one round: ``results``)."""
        return self.rounds or [self.results]

    def result(self, system: SystemName) -> SystemResult | None:
        """The figures of ``system`` in this run (its median round), when it ran and delivered."""
        return _delivered(self.results, system)

    def ratio(self, result: SystemResult, baseline: SystemName) -> float | None:
        """Throughput of ``result``'s system over ``baseline``'s in the same round (the median over the rounds where
        both delivered), when both ran."""

        def throughput(ours: SystemResult, base: SystemResult) -> float | None:
            return ours.samples_per_second / base.samples_per_second if base.samples_per_second else None

        return self._paired(result.system, baseline, throughput)

    def memory_ratio(self, result: SystemResult, baseline: SystemName) -> float | None:
        """Peak PSS (else RSS, for both) of ``result``'s system over ``baseline``'s in the same round (the median
        over the rounds)."""

        def memory(ours: SystemResult, base: SystemResult) -> float | None:
            if ours.peak_pss_mb is not None and base.peak_pss_mb:
                return ours.peak_pss_mb / base.peak_pss_mb
            return ours.peak_rss_mb / base.peak_rss_mb if base.peak_rss_mb else None

        return self._paired(result.system, baseline, memory)

    def _paired(
        self,
        system: SystemName,
        baseline: SystemName,
        ratio: Callable[[SystemResult, SystemResult], float | None],
    ) -> float | None:
        values = []
        for results in self.every_round:
            ours, base = _delivered(results, system), _delivered(results, baseline)
            if ours is not None and base is not None and (value := ratio(ours, base)) is not None:
                values.append(value)
        return statistics.median(values) if values else None

    def speedup(self, result: SystemResult) -> float | None:
        """Throughput over torch's DataLoader in the same run (``torch-w2`` for images), when it ran."""
        return self.ratio(result, self.config.baseline)

    def ratios(self, result: SystemResult) -> dict[str, float | None]:
        """images: throughput over torch's DataLoader (2 and 8 workers), the CPU bound and SPDL; memory over torch's
        with 2 workers."""
        return {
            "vs_torch_w2": self.ratio(result, "torch-w2"),
            "vs_torch_w8": self.ratio(result, "torch-w8"),
            "vs_cpu_bound": self.ratio(result, "cpu-bound"),
            "vs_spdl": self.ratio(result, "spdl-threads"),
            "memory_vs_torch_w2": self.memory_ratio(result, "torch-w2"),
        }

    def to_json(self) -> dict[str, Any]:
        config = asdict(self.config)
        config["urls"] = len(self.config.urls)
        return {
            "machine": self.machine,
            "source": self.source,
            "config": config,
            "interrupted": self.interrupted,
            "systems": [
                {
                    **{k: v for k, v in asdict(r).items() if k not in ("timeline", "rss_timeline")},
                    "samples_per_second": r.samples_per_second,
                    "megabytes_per_second": r.megabytes_per_second,
                    "speedup_over_torch": self.speedup(r),
                    **({"ratios": self.ratios(r)} if self.config.workload == "images" else {}),
                }
                for r in self.results
            ],
            # every round's figures, in the order they ran (the rows above are each system's median round)
            "rounds": [
                [
                    {
                        "system": r.system,
                        "samples": r.samples,
                        "seconds": r.seconds,
                        "samples_per_second": r.samples_per_second,
                        "first_batch_seconds": r.first_batch_seconds,
                        "peak_rss_mb": r.peak_rss_mb,
                        "peak_pss_mb": r.peak_pss_mb,
                        "interrupted": r.interrupted,
                        "error": r.error,
                    }
                    for r in results
                ]
                for results in self.every_round
            ],
        }


def _delivered(results: list[SystemResult], system: SystemName) -> SystemResult | None:
    return next((r for r in results if r.system == system and r.samples), None)


def median_results(rounds: list[list[SystemResult]]) -> list[SystemResult]:
    """Each system's median round by samples/s (the lower of the two middle ones for an even count), in the order the
    systems ran. Rounds cut short by Ctrl-C count only for a system that has no complete one; a system that never
    delivered keeps its first round's result (its error)."""
    order: list[SystemName] = []
    by_system: dict[SystemName, list[SystemResult]] = {}
    for results in rounds:
        for r in results:
            if r.system not in by_system:
                order.append(r.system)
                by_system[r.system] = []
            by_system[r.system].append(r)
    medians = []
    for system in order:
        runs = by_system[system]
        delivered = [r for r in runs if r.samples and not r.error]
        complete = [r for r in delivered if not r.interrupted] or delivered
        if not complete:
            medians.append(runs[0])
            continue
        ranked = sorted(complete, key=lambda r: r.samples_per_second)
        medians.append(ranked[(len(ranked) - 1) // 2])
    return medians


def machine() -> str:
    """One line naming this machine: cores, CPU model, OS, Python, torch and aloader versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, aloader {aloader.__version__}"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def render_table(report: BenchReport) -> str:
    """The Markdown table of a run: one row per system (its median round, with several rounds, said above it)."""
    table = _image_table(report) if report.config.workload == "images" else _read_table(report)
    rounds = len(report.every_round)
    if rounds == 1:
        return table
    return (
        f"Medians of {rounds} rounds (every system once a round): each row is the system's median round by "
        "samples/s; each ratio is the median of its values in every round.\n\n" + table
    )


def _read_table(report: BenchReport) -> str:
    lines = [
        "| system | samples | samples/s | MB/s | first batch (s) | p50 latency (ms) | p99 latency (ms) "
        "| peak RSS (MiB) | vs torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        note = " (interrupted)" if r.interrupted else " (failed)" if r.error else ""
        speedup = report.speedup(r)
        lines.append(
            f"| {r.title}{note} | {r.samples} | {r.samples_per_second:,.0f} | {r.megabytes_per_second:,.1f} "
            f"| {_fmt(r.first_batch_seconds, '.2f')} | {_fmt(r.latency_p50_ms, '.1f')} "
            f"| {_fmt(r.latency_p99_ms, '.1f')} | {r.peak_rss_mb:,.0f} | {_fmt(speedup, '.1f')}x |"
        )
    return "\n".join(lines)


def _image_table(report: BenchReport) -> str:
    """images: throughput, first batch, latency and memory, with the ratios the workload is judged by."""
    pss = any(r.peak_pss_mb is not None for r in report.results)
    lines = [
        "| system | samples | samples/s | first batch (s) | p50 latency (ms) | p99 latency (ms) "
        f"| CPU ms per sample | peak {'PSS' if pss else 'RSS'} (MiB) | vs torch-w2 | vs torch-w8 | vs CPU bound "
        "| vs SPDL | memory vs torch-w2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        note = " (interrupted)" if r.interrupted else " (failed)" if r.error else ""
        title = f"`{r.system}`: {r.title}"
        if r.fetch_cpu_ms_per_sample is not None:
            title += f" (of which the GET's HTTP client: {r.fetch_cpu_ms_per_sample:.2f} ms)"
        cpu_ms = r.cpu_ms_per_sample if r.cpu_ms_per_sample is not None else r.tree_cpu_ms_per_sample
        ratios = report.ratios(r)
        memory = r.peak_pss_mb if pss and r.peak_pss_mb is not None else r.peak_rss_mb
        lines.append(
            f"| {title}{note} | {r.samples} | {r.samples_per_second:,.0f} | {_fmt(r.first_batch_seconds, '.2f')} "
            f"| {_fmt(r.latency_p50_ms, '.1f')} | {_fmt(r.latency_p99_ms, '.1f')} | {_fmt(cpu_ms, '.2f')} "
            f"| {memory:,.0f} "
            f"| {_times(ratios['vs_torch_w2'])} | {_times(ratios['vs_torch_w8'])} | {_times(ratios['vs_cpu_bound'])} "
            f"| {_times(ratios['vs_spdl'])} | {_times(ratios['memory_vs_torch_w2'])} |"
        )
    return "\n".join(lines)


def write_plot(report: BenchReport, path: Path) -> None:
    """Throughput over time, one line per system (samples/s in about 40 bins of the longest run); a reference
    without a timeline (the CPU bound) is a flat line across the plot."""
    longest = max((r.timeline[-1][0] for r in report.results if r.timeline), default=1.0)
    width = max(longest / 40, 0.01)
    series = []
    for r in report.results:
        if r.timeline:
            xs, ys = zip(*_rates(r.timeline, width), strict=True)
            series.append((r.title, xs, ys))
        elif r.cpu_ms_per_sample is not None:
            series.append((r.title, (0.0, longest), (r.samples_per_second, r.samples_per_second)))
    save_lines(
        path,
        series,
        title="aloader bench: throughput over time",
        xlabel="seconds since the loader was built",
        ylabel="samples/s",
    )


def _rates(timeline: list[tuple[float, int]], width: float) -> Iterator[tuple[float, float]]:
    end = timeline[-1][0]
    bins = max(1, math.ceil(end / width))
    counts = [0] * bins
    previous = 0
    for at, total in timeline:
        counts[min(bins - 1, int(at / width))] += total - previous
        previous = total
    for i, count in enumerate(counts):
        yield (i + 0.5) * width, count / width


def dump_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
