"""Datasets over storage, for ``aloader.DataLoader``.

- ``ObjectDataset``: one object per sample, under a prefix or from a list of URLs (map-style, ``async def
  __getitem__``: the loader keeps ``concurrency`` reads in flight).
- ``ObjectStreamDataset``: the same objects as an async iterable that splits them across ranks and workers itself
  (every reader the same count), reading ``concurrency`` at once, resumable.
- ``TarShardDataset``: WebDataset-compatible tar shards, streamed, shuffled with a seed, split across ranks and
  workers (an async iterable).

See docs/datasets.md.
"""

from __future__ import annotations

from aloader.datasets._object_stream import ObjectStreamDataset
from aloader.datasets._objects import ObjectDataset
from aloader.datasets._shards import TarShardDataset
from aloader.datasets._split import rank_and_world_size
from aloader.datasets._tar import expand_braces, split_key

__all__ = [
    "ObjectDataset",
    "ObjectStreamDataset",
    "TarShardDataset",
    "expand_braces",
    "split_key",
    "rank_and_world_size",
]
