"""What every system of ``aloader bench`` shares, whatever the source format: the blocking read of an unchanged
torch dataset, the decoding of one sample, the collate, and ``Datasets`` (what a format gives the systems).

Both ``objects`` and ``shards`` import this module; neither imports the other.
"""

from __future__ import annotations

import asyncio
import io
import math
import threading
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


# numpy parses a .npy header with ast.literal_eval, and CPython before 3.12 keeps the ast module's recursion count in
# state shared by all threads: samples decoded in many threads at once could fail with "SystemError: AST constructor
# recursion depth mismatch" (python/cpython#106905; seen once in ~20 runs of benchmarks.ttfb). The header is parsed
# under this lock; the array itself is read outside it.
_NPY_HEADER = threading.Lock()


def decode_array(data: bytes) -> torch.Tensor:
    """Decode one sample: ``.npy`` bytes (the synthetic dataset's format) to a tensor; other bytes as uint8."""
    if data[:6] == b"\x93NUMPY":
        stream = io.BytesIO(data)
        with _NPY_HEADER:
            version = np.lib.format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):  # a later format: numpy's own reader, wholly under the lock
                stream.seek(0)
                return torch.from_numpy(np.load(stream, allow_pickle=False))
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(stream)
        if dtype.hasobject:
            raise ValueError("an .npy sample of Python objects (it would need pickle)")
        count = math.prod(shape)
        body = bytearray(data[stream.tell() : stream.tell() + count * dtype.itemsize])  # writable: torch shares it
        array = np.frombuffer(body, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")
        return torch.from_numpy(array)
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
