"""Batches of an unchanged ``TensorDataset`` are gathered (one ``index_select`` per tensor): torch's batches, bit for
bit, through both drivers and in workers; whatever could tell the difference goes sample by sample, as torch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import TensorDataset, random_split
from torch.utils.data._utils import collate as torch_collate

import aloader
import aloader._core.collate as collate_module
from aloader._core.gather import gather, gathers
from tests.conftest import Driver, assert_same


def dataset(n: int = 200) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 3, 4, generator=g),
        torch.randint(0, 10, (n,), generator=g),
        torch.rand(n, generator=g, dtype=torch.float64) > 0.5,
        torch.arange(n, dtype=torch.int8),
    )


def same_as_torch(driver: Driver, data: Any, max_failures: int | None = None, **kwargs: Any) -> list[Any]:
    loader = aloader.DataLoader(data, generator=torch.Generator().manual_seed(3), max_failures=max_failures, **kwargs)
    ours = driver.collect(loader)
    theirs = list(TorchDataLoader(data, generator=torch.Generator().manual_seed(3), **kwargs))
    assert_same(ours, theirs)
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(a, b, strict=True) if isinstance(b, list) else [(a, b)]:
            assert x.stride() == y.stride() and x.is_contiguous() and x.is_shared() == y.is_shared()
            assert x.requires_grad == y.requires_grad
    return ours


@pytest.fixture
def gathered(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each batch made in this process was gathered (True) or fell back to sample by sample (False)."""
    seen: list[bool] = []

    def spy(data: TensorDataset, keys: list[Any]) -> Any:
        batch = gather(data, keys)
        seen.append(batch is not None)
        return batch

    monkeypatch.setattr(collate_module, "gather", spy)
    return seen


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 64, "shuffle": True},
        {"batch_size": 7, "drop_last": True},
        {"batch_size": 64, "shuffle": True, "max_failures": 3},
        {"batch_size": 1},
    ],
    ids=["shuffled", "drop_last", "max_failures", "batch_size=1"],
)
def test_batches_are_gathered_and_equal_torch(driver: Driver, gathered: list[bool], kwargs: dict[str, Any]) -> None:
    batches = same_as_torch(driver, dataset(), **kwargs)
    assert gathered and all(gathered) and len(gathered) == len(batches)


def test_a_split_tensor_dataset_is_gathered(driver: Driver, gathered: list[bool]) -> None:
    train, _ = random_split(dataset(), [150, 50], generator=torch.Generator().manual_seed(1))
    same_as_torch(driver, train, batch_size=32, shuffle=True)
    assert gathered and all(gathered)


def test_in_workers_batches_are_in_shared_memory_as_torch_makes_them(driver: Driver) -> None:
    batches = same_as_torch(driver, dataset(), batch_size=32, num_workers=2)
    assert all(t.is_shared() for batch in batches for t in batch)


def test_without_auto_collation_samples_are_fetched_one_by_one(driver: Driver, gathered: list[bool]) -> None:
    same_as_torch(driver, dataset(20), batch_size=None)
    assert not gathered  # a sample is not a batch: nothing to gather


class Shifted(TensorDataset):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] + 1 for t in self.tensors)


def rows(batch_sampler: list[list[Any]]) -> Iterator[list[Any]]:
    return iter(batch_sampler)


@pytest.mark.parametrize(
    "case",
    ["negative indices", "bool indices", "numpy indices", "requires_grad", "non-contiguous", "subclass"],
)
def test_what_could_differ_goes_sample_by_sample(driver: Driver, gathered: list[bool], case: str) -> None:
    import numpy as np

    data: Any = dataset(50)
    kwargs: dict[str, Any] = {"batch_size": 8}
    if case == "negative indices":
        kwargs = {"batch_sampler": [[-1, -2, 3], [0, -50]]}
    elif case == "bool indices":
        kwargs = {"batch_sampler": [[True, True]]}  # t[True] adds a dimension: not the index 1
    elif case == "numpy indices":
        kwargs = {"batch_sampler": [[np.int64(4), np.int64(2)]]}
    elif case == "requires_grad":
        data = TensorDataset(torch.randn(50, 2, requires_grad=True), torch.arange(50))
    elif case == "non-contiguous":
        data = TensorDataset(torch.randn(4, 50).t(), torch.randn(50, 6)[:, ::2])
    elif case == "subclass":
        data = Shifted(torch.arange(50.0))
    ours = driver.collect(aloader.DataLoader(data, **kwargs))
    theirs = list(TorchDataLoader(data, **kwargs))
    assert_same(ours, theirs)
    assert not any(gathered)


def test_a_custom_collate_or_transform_or_registered_tensor_collate_is_honoured(
    driver: Driver, gathered: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = dataset(40)
    same_as_torch(driver, data, batch_size=8, collate_fn=lambda batch: torch.utils.data.default_collate(batch))
    assert not any(gathered)

    ours = driver.collect(aloader.DataLoader(data, batch_size=8, transform=lambda s: (s[0] * 2, *s[1:])))
    assert torch.equal(ours[0][0], data.tensors[0][:8] * 2)
    assert not any(gathered)

    def halve(batch: Any, *, collate_fn_map: Any = None) -> Any:
        return torch.stack(batch) / 2

    monkeypatch.setitem(torch_collate.default_collate_fn_map, torch.Tensor, halve)
    same_as_torch(driver, TensorDataset(torch.arange(16.0)), batch_size=8)
    assert not any(gathered)


def test_an_index_out_of_range_raises_what_torch_raises_naming_the_index(driver: Driver) -> None:
    data = dataset(50)
    with pytest.raises(IndexError):
        list(TorchDataLoader(data, batch_sampler=[[1, 2, 50]]))
    with pytest.raises(IndexError, match="sample index 50"):
        driver.collect(aloader.DataLoader(data, batch_sampler=[[1, 2, 50]]))


def test_under_max_failures_only_the_sample_out_of_range_is_skipped(driver: Driver) -> None:
    data = dataset(50)
    ours = driver.collect(aloader.DataLoader(data, batch_sampler=[[1, 99, 2], [3, 4]], max_failures=1))
    theirs = list(TorchDataLoader(data, batch_sampler=[[1, 2], [3, 4]]))
    assert_same(ours, theirs)


def test_gathers_only_torchs_own_tensor_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    data = dataset(10)
    assert gathers(data) is data
    assert gathers(Shifted(torch.arange(3))) is None
    assert gathers([(torch.zeros(1),)]) is None
    monkeypatch.setattr(TensorDataset, "__getitem__", Shifted.__getitem__)  # a program patching the class
    assert gathers(data) is None
