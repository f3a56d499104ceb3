"""``ObjectDataset``: one object per sample, under a prefix or from a list of URLs, fetched concurrently."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aloader.storage import RetryPolicy, Store
from aloader.storage._redact import redact_url

__all__ = ["ObjectDataset", "run_sync"]


def run_sync(coro_fn: Callable[[], Any]) -> Any:
    """Run ``coro_fn()`` to completion from sync code; refuse inside a running loop (it would block that loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    raise RuntimeError("cannot list a prefix synchronously inside a running event loop") from None


async def apply_decode(decode: Callable[[Any], Any] | None, value: Any) -> Any:
    """``decode(value)``: awaited if it is ``async def``, else in a thread (decoding is CPU work, not loop work)."""
    if decode is None:
        return value
    if inspect.iscoroutinefunction(decode):
        return await decode(value)
    return await asyncio.to_thread(decode, value)


def _normalise_suffixes(suffixes: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if suffixes is None:
        return None
    if isinstance(suffixes, str):
        return (suffixes,)
    result = tuple(suffixes)
    if not all(isinstance(s, str) for s in result):
        raise TypeError(f"suffixes should be a string or strings, but got {suffixes!r}")
    return result


class ObjectDataset:
    """A map-style dataset with one object per sample: ``dataset[i]`` is ``decode(bytes of object i)``.

    ``source`` is either a prefix URL (``s3://bucket/train/``, ``gs://...``, ``/data/images/``), listed once, or a
    sequence of URLs, used as given. ``suffixes`` keeps only URLs ending with one of them (e.g. ``(".jpg",
    ".png")``). ``decode`` turns bytes into a sample: a sync callable runs in a thread, an ``async def`` one on the
    loop; without it, samples are the raw bytes.

    **Order.** A prefix is listed at construction, and its URLs are sorted, so index ``i`` is the same object in
    every process and run. Inside a running event loop, where a blocking listing would stall the loop, use
    ``await ObjectDataset.from_prefix(...)`` instead.

    ``__getitem__`` is ``async def``, so ``aloader.DataLoader`` keeps ``concurrency`` reads in flight from one
    process (torch's own DataLoader cannot call it). Clients are made in the process that reads, on first use.
    """

    def __init__(
        self,
        source: str | Sequence[str],
        *,
        decode: Callable[[bytes], Any] | None = None,
        suffixes: str | Iterable[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if decode is not None and not callable(decode):
            raise TypeError(f"decode should be a callable or None, but got {decode!r}")
        self.decode = decode
        self.suffixes = _normalise_suffixes(suffixes)
        self.store = Store(storage_options, retry=retry)
        if isinstance(source, str):
            self.source: str | None = source
            urls: list[str] = run_sync(lambda: self.store.list_prefix(source))
        else:
            self.source = None
            urls = list(source)
            if not all(isinstance(url, str) for url in urls):
                raise TypeError("source should be a prefix URL or a sequence of URL strings")
        self.urls: list[str] = self._filter(urls)

    @classmethod
    async def from_prefix(
        cls,
        prefix: str,
        *,
        decode: Callable[[bytes], Any] | None = None,
        suffixes: str | Iterable[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> ObjectDataset:
        """List ``prefix`` without blocking the running loop, and return the dataset of its objects."""
        urls = await Store(storage_options, retry=retry).list_prefix(prefix)
        dataset = cls(urls, decode=decode, suffixes=suffixes, storage_options=storage_options, retry=retry)
        dataset.source = prefix
        return dataset

    def _filter(self, urls: list[str]) -> list[str]:
        if self.suffixes is None:
            return urls
        # The path decides, not a SAS token after it.
        return [url for url in urls if url.split("?", 1)[0].endswith(self.suffixes)]

    def __len__(self) -> int:
        return len(self.urls)

    async def __getitem__(self, index: int) -> Any:
        url = self.urls[index]
        return await apply_decode(self.decode, await self.store.read(url))

    def __repr__(self) -> str:
        where = repr(redact_url(self.source)) if self.source is not None else "a list of URLs"
        return f"ObjectDataset({where}, {len(self.urls)} objects, store={self.store!r})"
