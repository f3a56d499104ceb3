"""How the samples of a map-style dataset are reached, resolved once per epoch, and how indices are shown.

In: the dataset. Out: a :class:`MapAccess` telling the fetch stage which calls to make (``__getitem__`` or
``__getitems__``, sync or ``async def``) and how an index maps to the dataset's key. It owns nothing else.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Subset

from aloader._core.gather import gathers

__all__ = ["MapAccess", "any_awaitable", "describe_indices"]


class MapAccess:
    """How samples of a map-style dataset are fetched.

    torch's ``Subset`` (as made by ``random_split``) defines ``__getitems__``, which would turn every batch into a
    single sequential call; an unmodified ``Subset`` is unwrapped instead, so the samples of a split dataset are
    fetched concurrently too. The result is the same: ``Subset`` only maps indices.
    """

    __slots__ = ("getitem", "getitem_is_async", "getitems", "getitems_is_async", "remaps", "tensors")

    def __init__(self, dataset: Any) -> None:
        remaps: list[Sequence[Any]] = []
        while (
            type(dataset) is Subset
            or (
                isinstance(dataset, Subset)
                and type(dataset).__getitem__ is Subset.__getitem__
                and type(dataset).__getitems__ is Subset.__getitems__
            )
        ) and not callable(getattr(dataset.dataset, "__getitems__", None)):
            remaps.append(dataset.indices)
            dataset = dataset.dataset
        self.remaps = remaps[::-1]  # innermost mapping applied last
        getitems = getattr(dataset, "__getitems__", None)
        self.getitems: Callable[[list[Any]], Any] | None = getitems if callable(getitems) and getitems else None
        self.getitems_is_async = self.getitems is not None and inspect.iscoroutinefunction(self.getitems)
        self.getitem: Callable[[Any], Any] = dataset.__getitem__
        self.getitem_is_async = inspect.iscoroutinefunction(self.getitem)
        self.tensors = gathers(dataset)  # an unchanged TensorDataset: its batches may be gathered (see gather)

    @property
    def is_sync(self) -> bool:
        """Neither ``__getitem__`` nor ``__getitems__`` is ``async def``: every fetch is a thread call."""
        return not self.getitem_is_async and not self.getitems_is_async

    def key(self, index: Any) -> Any:
        for indices in reversed(self.remaps):
            index = indices[index]
        return index


def describe_indices(indices: Sequence[Any]) -> str:
    shown = ", ".join(map(repr, indices[:8]))
    return f"[{shown}{', ...' if len(indices) > 8 else ''}] ({len(indices)} samples)"


# Sample types seen not to be awaitable. Awaitability is a property of the type, except for generators (a
# generator-based coroutine is a generator whose code has a flag), which are never cached.
_plain_types: set[type] = set()


def any_awaitable(samples: list[Any]) -> bool:
    """Whether a sync fetch returned awaitables (e.g. a ConcatDataset over async datasets); cheap per sample."""
    if _plain_types.issuperset(map(type, samples)):  # the usual case, checked in C
        return False
    for sample in samples:
        kind = type(sample)
        if kind in _plain_types:
            continue
        if inspect.isawaitable(sample):
            return True
        if kind is not types.GeneratorType:
            _plain_types.add(kind)
    return False
