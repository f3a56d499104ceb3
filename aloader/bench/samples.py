"""What every system of ``aloader bench`` shares, whatever the source format: the blocking read of an unchanged
torch dataset, the decoding of one sample, the collate, and ``Datasets`` (what a format gives the systems).

Both ``objects`` and ``shards`` import this module; neither imports the other.
"""

from __future__ import annotations

import asyncio
import io
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aloader import storage

__all__ = ["Datasets", "collate", "decode_array", "read_blocking"]


def read_blocking(url: str) -> bytes:
    """A blocking read, as an unchanged torch Dataset does it: urllib for http(s), ``open()`` for local files, and
    for object stores one blocking call per object (obstore's client, as a ``boto3`` ``get_object`` would be)."""
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=60) as response:
            data: bytes = response.read()
            return data
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://")).read_bytes()
    return asyncio.run(storage.read(url))


def decode_array(data: bytes) -> torch.Tensor:
    """Decode one sample: ``.npy`` bytes (the synthetic dataset's format) to a tensor; other bytes as uint8."""
    if data[:6] == b"\x93NUMPY":
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The same collate for every system: stacks the tensors when they have one shape (else keeps a list, e.g. for
    images of different sizes), and carries what the figures need."""
    tensors = [sample["data"] for sample in samples]
    same_shape = all(t.shape == tensors[0].shape for t in tensors)
    return {
        "data": torch.stack(tensors) if same_shape else tensors,
        "count": len(tensors),
        "nbytes": sum(t.nbytes for t in tensors),
        # Tar samples arrive in a stream, with no request of their own to time: their latency is None.
        "latency": [sample["latency"] for sample in samples if sample["latency"] is not None],
    }


@dataclass(frozen=True)
class Datasets:
    """What one source format gives the systems: aloader's dataset, an unchanged torch dataset (for torch's
    DataLoader and for ``aloader-sync``), and the ceiling and SPDL loaders, each made when called."""

    aloader: Callable[[], Any]
    torch: Callable[[], Any]
    ceiling: Callable[[], Any]
    spdl: Callable[[], Any]
