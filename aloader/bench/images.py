"""The ``images`` workload of ``aloader bench``: mixed I/O and CPU per sample, with the dataset written as users write
it, run by each loader as users run it.

- ``synthetic_jpegs``: the JPEGs the object server serves (gradients, waves and noise: they compress like photos,
  not like random bytes, and decode at a photo's cost).
- ``HttpImages``: an unchanged torch ``Dataset`` whose ``__getitem__`` does a blocking ``requests.get``, decodes
  with Pillow, takes a random resized crop (224x224) and a random horizontal flip, and returns a uint8 CHW tensor
  and a label. Every system runs this same class; only the loader around it changes.
- ``measure_cpu_bound``: the reference row: the CPU time one sample costs the client (the GET's HTTP client, then
  decode, crop, flip and to-tensor), timed in one thread; ``cores / that`` is the most samples/s this machine can
  serve, whatever the loader.

Module-level and picklable throughout: aloader's worker processes (started by a forkserver) receive the dataset
and the collate function by pickle.
"""

from __future__ import annotations

import concurrent.futures
import io
import math
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import requests
import torch
import torch.utils.data
from PIL import Image

import aloader
from aloader.bench.config import IMAGE_WORKERS, BenchConfig, SystemName
from aloader.bench.samples import collate

__all__ = [
    "HttpImages",
    "augment",
    "collate_images",
    "image_loader",
    "machine_cores",
    "measure_cpu_bound",
    "random_resized_crop",
    "synthetic_jpegs",
]

IMAGE_SAMPLES = 2000
IMAGE_SIZE = 320  # pixels per side of the generated JPEGs: decode, crop and flip cost a few ms of CPU
CROP_SIZE = 224
LABELS = 10


# ------------------------------------------------------------------------------------------------------ the data
def synthetic_jpegs(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> dict[str, bytes]:
    """``count`` RGB JPEGs of ``size`` x ``size`` (quality 90, about 35 KiB each), named ``images/{i:06d}.jpg``; the
    same bytes for the same seed. Each is two colour gradients and a wave, plus Gaussian noise taken at a random
    offset from one shared noise field (drawing fresh noise per image would triple the time to generate them)."""
    rng = np.random.default_rng(seed)
    y, x = (axis[..., None] for axis in np.mgrid[0:size, 0:size].astype(np.float32) / size)
    noise = rng.normal(0, 10, (2 * size, 2 * size, 3)).astype(np.float32)
    objects = {}
    for index in range(count):
        across, down, wave_colour = rng.uniform(0, 255, (3, 3)).astype(np.float32)
        fx, fy, phase = rng.uniform(1, 8), rng.uniform(1, 8), rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        pixels = across * (1 - x) + down * y + wave_colour * wave
        pixels *= 255 / max(float(pixels.max()), 1.0)
        ox, oy = rng.integers(0, size, 2)
        pixels += noise[oy : oy + size, ox : ox + size]
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        objects[f"images/{index:06d}.jpg"] = buffer.getvalue()
    return objects


# ---------------------------------------------------------------------------------- the dataset as users write it
def random_resized_crop(
    image: Image.Image,
    size: int = CROP_SIZE,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """torchvision's ``RandomResizedCrop`` with Pillow: a random area and aspect ratio (10 tries, else the whole
    image), resized to ``size`` x ``size`` with bilinear filtering."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = random.randint(0, width - w), random.randint(0, height - h)
            break
    else:
        left, top, w, h = 0, 0, width, height
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def augment(data: bytes) -> torch.Tensor:
    """One sample's CPU work: decode the JPEG, random resized crop, random horizontal flip, uint8 CHW tensor."""
    image = random_resized_crop(Image.open(io.BytesIO(data)).convert("RGB"))
    if random.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


_local = threading.local()


def _session() -> requests.Session:
    """A ``requests.Session`` per thread, as users keep one (a Session is not documented as thread-safe), and per
    process: a forked worker must not share its parent's pooled connections."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None or getattr(_local, "pid", None) != os.getpid():
        session = _local.session = requests.Session()
        _local.pid = os.getpid()
    return session


class HttpImages(torch.utils.data.Dataset[dict[str, Any]]):
    """An unchanged torch Dataset over JPEG URLs: a blocking ``requests.get``, Pillow, a random crop and flip.

    The ``latency`` (the whole ``__getitem__``, timed) and ``index`` entries are the bench's: the figures need them.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, index: int) -> dict[str, Any]:
        started = time.perf_counter()
        response = _session().get(self.urls[index], timeout=60)
        response.raise_for_status()
        image = augment(response.content)
        return {"data": image, "label": index % LABELS, "index": index, "latency": time.perf_counter() - started}


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The bench's collate (a stacked tensor and the figures), plus the labels and the indices delivered."""
    batch = collate(samples)
    batch["label"] = torch.tensor([sample["label"] for sample in samples])
    batch["index"] = [sample["index"] for sample in samples]
    return batch


# ------------------------------------------------------------------------------------------------------ the loaders
class _SpdlThreads:
    """SPDL's pipeline over the same sync dataset: ``pipe`` runs a sync function in the pipeline's executor, a pool
    of ``concurrency`` threads here, ``concurrency`` samples at once; then batch and collate."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.dataset = HttpImages(config.urls)

    def __iter__(self) -> Iterator[Any]:
        from spdl.pipeline import PipelineBuilder

        builder: Any = PipelineBuilder()  # SPDL's generics do not infer through the chain
        pipeline = (
            builder.add_source(range(len(self.dataset)))
            .pipe(self.dataset.__getitem__, concurrency=self.config.concurrency, output_order="input")
            .aggregate(self.config.batch_size)
            .pipe(collate_images)
            .add_sink(3)
            .build(num_threads=self.config.concurrency)
        )
        with pipeline.auto_stop():
            yield from pipeline.get_iterator()


def image_loader(system: SystemName, config: BenchConfig) -> Any:
    """The loader ``system`` runs ``HttpImages`` with: torch's or aloader's DataLoader (workers as the name says),
    or SPDL's pipeline."""
    if system == "spdl-threads":
        return _SpdlThreads(config)
    workers = IMAGE_WORKERS[system]
    if system.startswith("torch"):
        return torch.utils.data.DataLoader(
            HttpImages(config.urls), batch_size=config.batch_size, collate_fn=collate_images, num_workers=workers
        )
    return aloader.DataLoader(
        HttpImages(config.urls),
        batch_size=config.batch_size,
        collate_fn=collate_images,
        concurrency=config.concurrency,
        num_workers=workers,
    )


# ---------------------------------------------------------------------------------------------------- the bound
def machine_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fetch_bytes(url: str) -> bytes:
    """The dataset's GET alone: ``requests.get`` on this thread's session."""
    response = _session().get(url, timeout=60)
    response.raise_for_status()
    return response.content


def measure_cpu_bound(urls: Sequence[str], threads: int = 64, timed_gets: int = 32) -> tuple[int, float, float]:
    """(samples, CPU seconds of the whole samples, CPU seconds of their GETs): what one sample costs the client's CPU,
    timed in one thread, times the number of samples. ``cores / (that per sample)`` is the most samples/s this
    machine can serve, whatever the loader.

    A sample is the dataset's ``requests.get`` and its ``augment`` (decode, crop, flip, to tensor). The GET's CPU
    (the HTTP client's, not the wait) is this thread's CPU time (``time.thread_time``) over ``timed_gets`` GETs one
    after another; the bytes of every sample are then read ``threads`` at once (untimed) and ``augment`` is timed
    on each, in this thread, so other processes on the machine do not count. One sample is augmented before the
    clock starts, so the JPEG plugin's import does not count either.
    """
    timed = list(urls[: max(1, timed_gets)])
    fetch_bytes(timed[0])  # the session and its connection, as in a running loader
    started = time.thread_time()
    for url in timed:
        fetch_bytes(url)
    get_cpu = (time.thread_time() - started) / len(timed)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        blobs = list(pool.map(fetch_bytes, urls))
    augment(blobs[0])
    started = time.thread_time()
    for blob in blobs:
        augment(blob)
    augment_cpu = time.thread_time() - started
    return len(blobs), augment_cpu + get_cpu * len(blobs), get_cpu * len(blobs)
