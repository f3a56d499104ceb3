"""aloader: an asyncio-based streaming data loader for PyTorch.

``aloader.DataLoader`` is a drop-in for ``torch.utils.data.DataLoader`` that also supports ``async for``. The
dataset, sampler and collate names below are torch's own, re-exported so one import serves both.

``loader.state_dict()`` / ``loader.load_state_dict()`` resume iteration mid-epoch (docs/resume.md);
``aloader.samplers.DistributedSampler`` is torch's distributed split, resumable and elastic
(``aloader.DistributedSampler`` stays torch's own).

``aloader.storage`` reads by URL (local files, S3, GCS, Azure, HTTP) without blocking the loop, and
``aloader.datasets`` has datasets over buckets: one object per sample (map-style, or streamed and split across ranks
by itself), and WebDataset tar shards; they are also importable from ``aloader`` (loaded on first use).
``loader.stats()`` returns the snapshots defined in ``aloader.stats``.
"""

from typing import Any

from torch.utils.data import (
    BatchSampler,
    ChainDataset,
    ConcatDataset,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    StackDataset,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
    default_convert,
    get_worker_info,
    random_split,
)

from aloader import samplers
from aloader._iterators import AsyncLoaderIterator, LoaderIterator
from aloader.errors import AloaderError, FailureBudgetExceeded, WorkerDiedError
from aloader.loader import DEFAULT_CONCURRENCY, DataLoader
from aloader.stats import LoaderStats

__version__ = "0.1.0.dev0"

__all__ = [
    # the loader
    "DataLoader",
    "DEFAULT_CONCURRENCY",
    "LoaderIterator",
    "AsyncLoaderIterator",
    "AloaderError",
    "WorkerDiedError",
    "samplers",
    "FailureBudgetExceeded",
    "LoaderStats",
    # torch's data names, re-exported
    "Dataset",
    "IterableDataset",
    "TensorDataset",
    "ConcatDataset",
    "ChainDataset",
    "StackDataset",
    "Subset",
    "random_split",
    "Sampler",
    "SequentialSampler",
    "RandomSampler",
    "SubsetRandomSampler",
    "WeightedRandomSampler",
    "BatchSampler",
    "DistributedSampler",
    "default_collate",
    "default_convert",
    "get_worker_info",
    # aloader.datasets, imported on first use (it loads the storage clients)
    "ObjectDataset",
    "ObjectStreamDataset",
    "TarShardDataset",
]

_DATASETS = frozenset({"ObjectDataset", "ObjectStreamDataset", "TarShardDataset"})


def __getattr__(name: str) -> Any:
    if name in _DATASETS:
        from aloader import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'aloader' has no attribute {name!r}")
