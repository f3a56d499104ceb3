"""The systems ``aloader bench`` compares, and ``BenchConfig``: what to stream and how, shared by every system."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "IMAGE_SYSTEMS",
    "SYSTEMS",
    "BenchConfig",
    "SourceFormat",
    "SystemName",
    "Workload",
    "default_systems",
    "systems_of",
]

SystemName = Literal[
    # the read workload: how fast samples arrive (reads plus a trivial decode)
    "ceiling",
    "aloader",
    "aloader-sync",
    "torch",
    "spdl",
    # the images workload: one torch Dataset (requests + Pillow), run by each loader as users run it
    "torch-w2",
    "torch-w8",
    "aloader-w0",
    "aloader-w2",
    "spdl-threads",
    "cpu-bound",
]
SYSTEMS: tuple[SystemName, ...] = ("ceiling", "aloader", "aloader-sync", "torch", "spdl")
IMAGE_SYSTEMS: tuple[SystemName, ...] = (
    "torch-w2",
    "torch-w8",
    "aloader-w0",
    "aloader-w2",
    "spdl-threads",
    "cpu-bound",
)
SYSTEM_TITLES: dict[SystemName, str] = {
    "ceiling": "ceiling: bare concurrent reads, no loader",
    "aloader": "aloader, async dataset",
    "aloader-sync": "aloader, unchanged torch Dataset",
    "torch": "torch DataLoader, unchanged torch Dataset",
    "spdl": "SPDL pipeline, async dataset",
}
TAR_TITLES: dict[SystemName, str] = {
    "ceiling": "ceiling: bare streamed shard reads, no loader",
    "aloader": "aloader, TarShardDataset",
    "aloader-sync": "aloader, unchanged torch IterableDataset",
    "torch": "torch DataLoader, torch IterableDataset (tarfile)",
    "spdl": "SPDL pipeline, async shard reader",
}
IMAGE_TITLES: dict[SystemName, str] = {
    "torch-w2": "torch DataLoader, num_workers=2",
    "torch-w8": "torch DataLoader, num_workers=8",
    "aloader-w0": "aloader, num_workers=0 (threads)",
    "aloader-w2": "aloader, num_workers=2",
    "spdl-threads": "SPDL pipeline, the dataset in a thread pool",
    "cpu-bound": "CPU bound: cores / CPU time per sample",
}
# The workers of each images system, in its name: the same for every run, so that rows compare across runs.
IMAGE_WORKERS: dict[SystemName, int] = {"torch-w2": 2, "torch-w8": 8, "aloader-w0": 0, "aloader-w2": 2}
SourceFormat = Literal["objects", "tar"]
Workload = Literal["read", "images"]


def systems_of(workload: Workload) -> tuple[SystemName, ...]:
    """The systems a workload can run."""
    return IMAGE_SYSTEMS if workload == "images" else SYSTEMS


def default_systems(workload: Workload = "read") -> tuple[SystemName, ...]:
    """Every system of ``workload`` whose library is installed (SPDL is optional: the ``bench`` extra)."""
    try:
        import spdl.pipeline  # noqa: F401
    except ImportError:
        return tuple(name for name in systems_of(workload) if not name.startswith("spdl"))
    return systems_of(workload)


@dataclass(frozen=True)
class BenchConfig:
    """What to stream and how; one config is shared by every system of a run."""

    urls: tuple[str, ...]
    batch_size: int = 32
    concurrency: int = 64
    num_workers: int = 2  # torch's DataLoader; aloader's pool when its own num_workers is set
    aloader_workers: int = 0
    epochs: int = 1
    systems: tuple[SystemName, ...] = ("ceiling", "aloader", "aloader-sync", "torch")
    format: SourceFormat = "objects"  # "tar": ``urls`` are tar shards
    shard_concurrency: int = 4  # tar: shards read at once by aloader, SPDL and the ceiling
    limit: int | None = None  # tar: stop each epoch after this many samples (None: every sample of every shard)
    workload: Workload = "read"  # "images": ``urls`` are JPEGs, decoded and augmented by a torch Dataset
    rounds: int = 1  # every system runs this many times, the rounds one after the other; figures are medians

    def title(self, system: SystemName) -> str:
        if self.workload == "images":
            return IMAGE_TITLES[system]
        return (TAR_TITLES if self.format == "tar" else SYSTEM_TITLES)[system]

    @property
    def baseline(self) -> SystemName:
        """The system every other is compared with: torch's DataLoader as users run it."""
        return "torch-w2" if self.workload == "images" else "torch"

    @property
    def samples_per_epoch(self) -> int | None:
        """Samples each system delivers per epoch, when known before the run."""
        return len(self.urls) if self.format == "objects" else self.limit
