"""What ``aloader bench`` streams: ``open_source`` turns a URL, a directory, a prefix or tar shards into a
``Source``, or with no source serves the synthetic image-like dataset (single ``.npy`` objects, or the same samples
packed into tar shards) from an object server on 127.0.0.1; for the ``images`` workload, it serves JPEGs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from aloader import storage
from aloader.bench.config import SourceFormat, Workload
from aloader.bench.objectserver import ObjectServer
from aloader.datasets import expand_braces
from aloader.storage._redact import redact_url

__all__ = ["FormatChoice", "Source", "open_source", "synthetic_images", "synthetic_shards"]

SYNTHETIC_SAMPLES = 2000
SYNTHETIC_SHAPE = (3, 64, 64)  # an image-like uint8 sample: 12 KiB of pixels
SYNTHETIC_SHARDS = 16


def synthetic_images(count: int, seed: int = 0) -> dict[str, bytes]:
    """``count`` image-like samples as ``.npy`` objects, named ``train/{index:06d}.npy``."""
    rng = np.random.default_rng(seed)
    objects = {}
    for index in range(count):
        buffer = io.BytesIO()
        np.save(buffer, rng.integers(0, 256, size=SYNTHETIC_SHAPE, dtype=np.uint8), allow_pickle=False)
        objects[f"train/{index:06d}.npy"] = buffer.getvalue()
    return objects


def synthetic_shards(samples: dict[str, bytes], shards: int) -> dict[str, bytes]:
    """Pack ``samples`` (``train/000042.npy``: bytes, as ``synthetic_images`` makes them) into ``shards`` tar
    shards named ``shards/train-{i:06d}.tar``, in key order, each sample with its ``.npy`` and a ``.cls`` label."""
    keys = sorted(samples)
    per_shard = -(-len(keys) // shards)
    out = {}
    for shard in range(shards):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key in keys[shard * per_shard : (shard + 1) * per_shard]:
                stem = key.rsplit(".", 1)[0]
                label = str(int(np.frombuffer(samples[key][-1:], dtype=np.uint8)[0]) % 10).encode()
                for name, data in ((f"{stem}.npy", samples[key]), (f"{stem}.cls", label)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        out[f"shards/train-{shard:06d}.tar"] = buffer.getvalue()
    return out


@dataclass(frozen=True)
class Source:
    """What ``open_source`` found: a label for the report, the URLs (objects, or tar shards), and their format."""

    label: str
    urls: list[str]
    format: SourceFormat
    limit: int | None = None  # tar: samples per epoch to stream (None: all)


FormatChoice = Literal["auto", "objects", "tar"]


@contextlib.contextmanager
def open_source(
    source: str | None,
    samples: int | None,
    latency: float,
    format: FormatChoice = "auto",
    workload: Workload = "read",
) -> Iterator[Source]:
    """Yield the ``Source`` for ``source``; for None, serve a synthetic dataset (single ``.npy`` objects, or with
    ``format="tar"`` the same samples in ``SYNTHETIC_SHARDS`` tar shards; for ``workload="images"``, JPEGs) while
    in the block. The ``images`` workload serves its own JPEGs only: it takes no ``source``.

    A source is tar shards when it is a brace pattern or a URL ending in ``.tar``, or a directory or prefix whose
    objects all end in ``.tar`` (``format="tar"`` takes the ``.tar`` objects under a prefix holding others too).
    """
    if workload == "images":
        if source is not None or format == "tar":
            raise ValueError("the images workload serves its own JPEGs: it takes no URL_OR_PATH and no --format tar")
        with _serve_jpegs(samples, latency) as served:
            yield served
        return
    if source is None:
        count = samples or SYNTHETIC_SAMPLES
        images = synthetic_images(count)
        if format == "tar":
            objects = synthetic_shards(images, min(SYNTHETIC_SHARDS, count))
            what = f"{count} image-like samples in {len(objects)} tar shards"
        else:
            objects, what = images, f"{count} image-like samples"
        with ObjectServer(objects, latency=latency) as server:
            urls = [server.url(key) for key in sorted(objects)]
            label = (
                f"synthetic: {what} ({'x'.join(map(str, SYNTHETIC_SHAPE))} uint8, .npy) "
                f"served from {server.base_url} with {latency * 1e3:.0f} ms per GET"
            )
            kind: SourceFormat = "tar" if format == "tar" else "objects"
            yield Source(label, urls, kind, limit=count if kind == "tar" else None)
        return
    if "{" in source or source.endswith(".tar"):
        urls = expand_braces(source)  # named explicitly: not listed
    else:
        # Listed once, sorted, as ObjectDataset lists a prefix; credentials come from the environment.
        urls = asyncio.run(storage.list_prefix(source))
    shards = [url for url in urls if url.split("?", 1)[0].endswith(".tar")]  # a SAS token may follow
    if format == "tar" or (format == "auto" and urls and len(shards) == len(urls)):
        if not shards:
            raise ValueError(f"no .tar shards found in {redact_url(source)}")
        yield Source(f"{redact_url(source)} ({len(shards)} tar shards)", shards, "tar", limit=samples)
        return
    if samples is not None:
        urls = urls[:samples]
    if not urls:
        raise ValueError(f"no objects found under {redact_url(source)}")
    yield Source(redact_url(source), urls, "objects")


@contextlib.contextmanager
def _serve_jpegs(samples: int | None, latency: float) -> Iterator[Source]:
    from aloader.bench.images import IMAGE_SAMPLES, IMAGE_SIZE, synthetic_jpegs  # Pillow only when asked for

    count = samples or IMAGE_SAMPLES
    objects = synthetic_jpegs(count)
    kib = sum(map(len, objects.values())) / len(objects) / 1024
    with ObjectServer(objects, latency=latency) as server:
        label = (
            f"synthetic: {count} JPEG images ({IMAGE_SIZE}x{IMAGE_SIZE} RGB, {kib:.0f} KiB on average) served from "
            f"{server.base_url} with {latency * 1e3:.0f} ms per GET; requests + Pillow decode, random 224 crop, flip"
        )
        yield Source(label, [server.url(key) for key in sorted(objects)], "objects")
