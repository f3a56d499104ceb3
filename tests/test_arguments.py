"""Argument errors match torch's DataLoader: same exception type, same message text."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler, TensorDataset

import aloader
from tests.datasets import AsyncCounting, CountingIterable


def tensors() -> TensorDataset:
    return TensorDataset(torch.arange(10))


BAD_ARGUMENTS: dict[str, tuple[Any, dict[str, Any]]] = {
    "negative-workers": (tensors(), {"num_workers": -1}),
    "negative-timeout": (tensors(), {"timeout": -1}),
    "prefetch-without-workers": (tensors(), {"prefetch_factor": 2}),
    "negative-prefetch": (tensors(), {"num_workers": 1, "prefetch_factor": -1}),
    "persistent-without-workers": (tensors(), {"persistent_workers": True}),
    "iterable-shuffle": (CountingIterable(), {"shuffle": True}),
    "iterable-sampler": (CountingIterable(), {"sampler": [0, 1]}),
    "iterable-batch-sampler": (CountingIterable(), {"batch_sampler": [[0, 1]]}),
    "sampler-and-shuffle": (tensors(), {"sampler": [0, 1], "shuffle": True}),
    "batch-sampler-and-batch-size": (tensors(), {"batch_sampler": [[0]], "batch_size": 2}),
    "batch-sampler-and-shuffle": (tensors(), {"batch_sampler": [[0]], "shuffle": True}),
    "batch-sampler-and-sampler": (tensors(), {"batch_sampler": [[0]], "sampler": [0]}),
    "batch-sampler-and-drop-last": (tensors(), {"batch_sampler": [[0]], "drop_last": True}),
    "no-batching-and-drop-last": (tensors(), {"batch_size": None, "drop_last": True}),
    "context-without-workers": (tensors(), {"multiprocessing_context": "spawn"}),
    "bad-start-method": (tensors(), {"num_workers": 1, "multiprocessing_context": "teleport"}),
    "bad-context-type": (tensors(), {"num_workers": 1, "multiprocessing_context": 42}),
    "zero-batch-size": (tensors(), {"batch_size": 0}),
    "bad-batch-size": (tensors(), {"batch_size": "four"}),
    "bad-drop-last": (tensors(), {"sampler": SequentialSampler(range(3)), "drop_last": "yes"}),
}


def raised(factory: type, dataset: Any, kwargs: dict[str, Any]) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: PT011 - compared to torch's below
        factory(dataset, **kwargs)
    return info.value


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_argument_errors_match_torch(case: str) -> None:
    dataset, kwargs = BAD_ARGUMENTS[case]
    theirs = raised(torch.utils.data.DataLoader, dataset, kwargs)
    ours = raised(aloader.DataLoader, dataset, kwargs)
    assert type(ours) is type(theirs)
    assert str(ours) == str(theirs)


def test_async_iterable_gets_torch_iterable_dataset_errors() -> None:
    with pytest.raises(ValueError, match="DataLoader with IterableDataset: expected unspecified shuffle option"):
        aloader.DataLoader(AsyncCounting(), shuffle=True)
    with pytest.raises(ValueError, match="expected unspecified sampler option"):
        aloader.DataLoader(AsyncCounting(), sampler=[1])


def test_valid_worker_arguments_are_accepted() -> None:
    loader = aloader.DataLoader(
        tensors(),
        num_workers=2,
        prefetch_factor=3,
        persistent_workers=True,
        multiprocessing_context="spawn",
        worker_init_fn=print,
        timeout=5,
    )
    assert loader.prefetch_factor == 3 and loader.persistent_workers
    assert isinstance(loader.multiprocessing_context, multiprocessing.context.BaseContext)
    assert aloader.DataLoader(tensors(), num_workers=1).prefetch_factor == 2  # torch's default with workers


def test_positional_order_matches_torch() -> None:
    sampler = BatchSampler(SequentialSampler(range(10)), 3, False)
    loader = aloader.DataLoader(tensors(), 1, False, None, sampler, 0, None, False, False, 0, None, None, None)
    assert loader.batch_sampler is sampler and loader.batch_size is None


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_bad_concurrency(value: Any) -> None:
    with pytest.raises(ValueError, match=r"concurrency option should be a positive integer or None, but got"):
        aloader.DataLoader(tensors(), concurrency=value)


def test_bad_transform() -> None:
    with pytest.raises(TypeError, match=r"transform option should be a callable or None, but got transform=3"):
        aloader.DataLoader(tensors(), transform=3)  # type: ignore[arg-type]


def test_concurrency_and_transform_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        aloader.DataLoader(tensors(), 1, None, None, None, 0, None, False, False, 0, None, None, None, 2)


def test_attributes_cannot_be_reassigned_like_torch() -> None:
    loader = aloader.DataLoader(tensors())
    with pytest.raises(ValueError, match="batch_size attribute should not be set after DataLoader is initialized"):
        loader.batch_size = 3


def test_len_errors_match_torch() -> None:
    class NoLen(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield 1

    for factory in (torch.utils.data.DataLoader, aloader.DataLoader):
        with pytest.raises(TypeError):
            len(factory(NoLen()))
