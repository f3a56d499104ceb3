"""The figures of an ``aloader bench`` run: one ``SystemResult`` per system, the ``BenchReport``, and how they are
written out (the Markdown table, JSON, the throughput plot, and the line naming the machine)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from collections.abc import Iterator
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
    machine: str
    source: str
    config: BenchConfig
    results: list[SystemResult]
    interrupted: bool

    def result(self, system: SystemName) -> SystemResult | None:
        """The figures of ``system`` in this run, when it ran and delivered."""
        return next((r for r in self.results if r.system == system and r.samples), None)

    def ratio(self, result: SystemResult, baseline: SystemName) -> float | None:
        """Throughput of ``result`` over ``baseline``'s in the same run, when it ran."""
        base = self.result(baseline)
        if base is None or base.samples_per_second == 0:
            return None
        return result.samples_per_second / base.samples_per_second

    def memory_ratio(self, result: SystemResult, baseline: SystemName) -> float | None:
        """Peak PSS (else RSS, for both) of ``result`` over ``baseline``'s in the same run."""
        base = self.result(baseline)
        if base is None:
            return None
        if result.peak_pss_mb is not None and base.peak_pss_mb:
            return result.peak_pss_mb / base.peak_pss_mb
        return result.peak_rss_mb / base.peak_rss_mb if base.peak_rss_mb else None

    def speedup(self, result: SystemResult) -> float | None:
        """Throughput over torch's DataLoader in the same run (``torch-w2`` for images), when it ran."""
        return self.ratio(result, self.config.baseline)

    def ratios(self, result: SystemResult) -> dict[str, float | None]:
        """images: throughput over torch's DataLoader (2 workers), the CPU bound and SPDL; memory over torch's."""
        return {
            "vs_torch_w2": self.ratio(result, "torch-w2"),
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
        }


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
    """The Markdown table of a run: one row per system."""
    if report.config.workload == "images":
        return _image_table(report)
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
        f"| CPU ms per sample | peak {'PSS' if pss else 'RSS'} (MiB) | vs torch-w2 | vs CPU bound | vs SPDL "
        "| memory vs torch-w2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"| {_times(ratios['vs_torch_w2'])} | {_times(ratios['vs_cpu_bound'])} "
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
