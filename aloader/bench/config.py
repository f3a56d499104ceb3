"""The systems ``aloader bench`` compares, and ``BenchConfig``: what to stream and how, shared by every system."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["SYSTEMS", "BenchConfig", "SourceFormat", "SystemName", "default_systems"]

SystemName = Literal["ceiling", "aloader", "aloader-sync", "torch", "spdl"]
SYSTEMS: tuple[SystemName, ...] = ("ceiling", "aloader", "aloader-sync", "torch", "spdl")
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
SourceFormat = Literal["objects", "tar"]


def default_systems() -> tuple[SystemName, ...]:
    """Every system whose library is installed (SPDL is optional: the ``bench`` extra)."""
    try:
        import spdl.pipeline  # noqa: F401
    except ImportError:
        return ("ceiling", "aloader", "aloader-sync", "torch")
    return SYSTEMS


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

    def title(self, system: SystemName) -> str:
        return (TAR_TITLES if self.format == "tar" else SYSTEM_TITLES)[system]

    @property
    def samples_per_epoch(self) -> int | None:
        """Samples each system delivers per epoch, when known before the run."""
        return len(self.urls) if self.format == "objects" else self.limit
