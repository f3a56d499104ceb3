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

    def speedup(self, result: SystemResult) -> float | None:
        """Throughput over torch's DataLoader in the same run, when it ran."""
        torch_result = next((r for r in self.results if r.system == "torch" and r.samples), None)
        if torch_result is None or torch_result.samples_per_second == 0:
            return None
        return result.samples_per_second / torch_result.samples_per_second

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


def render_table(report: BenchReport) -> str:
    """The Markdown table of a run: one row per system."""
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


def write_plot(report: BenchReport, path: Path) -> None:
    """Throughput over time, one line per system (samples/s in about 40 bins of the longest run)."""
    longest = max((r.timeline[-1][0] for r in report.results if r.timeline), default=1.0)
    width = max(longest / 40, 0.01)
    series = []
    for r in report.results:
        if r.timeline:
            xs, ys = zip(*_rates(r.timeline, width), strict=True)
            series.append((r.title, xs, ys))
    save_lines(
        path,
        series,
        title="aloader bench: throughput over time",
        xlabel="seconds since the first batch was requested",
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
