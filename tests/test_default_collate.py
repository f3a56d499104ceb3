"""aloader's default collate (torch's ``default_collate``, its dispatch taken in fewer steps) gives torch's batches
and errors: for every sample structure, in the loader through both drivers, in worker processes, and with types
registered in torch's ``default_collate_fn_map``."""

from __future__ import annotations

import collections
import collections.abc
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset, TensorDataset, default_collate
from torch.utils.data._utils import collate as torch_collate

import aloader
from aloader._core.default_collate import collate, quicker
from tests.conftest import Driver, assert_same


class Point(NamedTuple):
    x: torch.Tensor
    y: int


class Box:
    """A type of the user's, registered in torch's ``default_collate_fn_map`` by the tests that need it."""

    def __init__(self, value: int) -> None:
        self.value = value


def collate_boxes(batch: Any, *, collate_fn_map: Any = None) -> Any:
    return ("boxes", [box.value for box in batch])


def _tensors(i: int) -> torch.Tensor:
    return torch.arange(6, dtype=torch.float32).reshape(2, 3) + i


# (name, samples): each a batch default_collate makes something of.
BATCHES: list[tuple[str, list[Any]]] = [
    ("tuple of tensors", [(_tensors(i), torch.tensor(i)) for i in range(5)]),
    ("tuple of tensor and int", [(_tensors(i), i) for i in range(5)]),
    ("tuple of float, str, bytes", [(i / 2, f"s{i}", b"b") for i in range(4)]),
    ("tuple of numpy", [(np.arange(3) + i, np.float32(i), np.bool_(i % 2)) for i in range(4)]),
    ("nested tuple", [((_tensors(i), i), {"k": i}) for i in range(3)]),
    ("tuple of lists", [([i, i + 1], (i,)) for i in range(3)]),
    ("empty tuples", [() for _ in range(3)]),
    ("one sample", [(_tensors(0), 0)]),
    ("dict of tensors", [{"x": _tensors(i), "y": i} for i in range(4)]),
    ("nested dict", [{"a": {"b": (i, float(i))}, "c": [torch.tensor([i])]} for i in range(3)]),
    ("empty dicts", [{} for _ in range(2)]),
    ("ordered dict", [collections.OrderedDict(x=i, y=_tensors(i)) for i in range(3)]),
    ("defaultdict", [collections.defaultdict(int, x=i) for i in range(3)]),
    ("namedtuple", [Point(_tensors(i), i) for i in range(3)]),
    ("list samples", [[i, _tensors(i)] for i in range(3)]),
    ("tensors", [_tensors(i) for i in range(3)]),
    ("ints", list(range(5))),
    ("strings", ["a", "b"]),
    ("tuple first, then a list", [(1, 2), [3, 4]]),
    ("dict first, then an ordered dict", [{"x": 1}, collections.OrderedDict(x=2)]),
]

# (name, samples): each a batch default_collate raises for.
BAD_BATCHES: list[tuple[str, list[Any]]] = [
    ("tuples of unequal lengths", [(1, 2), (3,)]),
    ("an unequal length before an unsized sample", [(1, 2), (3,), 5]),
    ("an unsized sample before an unequal length", [(1, 2), 5, (3,)]),
    ("tensors of unequal shapes", [(torch.zeros(2),), (torch.zeros(3),)]),
    ("a field of unknown type", [(object(),), (object(),)]),
    ("a tensor field, then not a tensor", [(torch.zeros(2),), (1,)]),
    ("a dict missing a key", [{"x": 1, "y": 2}, {"x": 3}]),
    ("a dict of unknown values", [{"x": object()}, {"x": object()}]),
    ("a dict, then not a mapping", [{"x": 1}, 5]),
    ("nested tensors", [(torch.nested.nested_tensor([torch.zeros(2)], layout=torch.jagged),)] * 2),
    ("empty batch", []),
]


def _outcome(fn: Any, batch: list[Any]) -> tuple[str, Any]:
    try:
        return "ok", fn(batch)
    except Exception as exc:
        return "err", (type(exc), str(exc))


@pytest.mark.parametrize(("name", "batch"), BATCHES + BAD_BATCHES, ids=[n for n, _ in BATCHES + BAD_BATCHES])
def test_same_batch_or_error_as_torchs(name: str, batch: list[Any]) -> None:
    ours, theirs = _outcome(collate, batch), _outcome(default_collate, batch)
    assert ours[0] == theirs[0], (name, ours, theirs)
    if theirs[0] == "ok":
        assert_same(ours[1], theirs[1])
    else:
        assert ours[1] == theirs[1]


def test_only_torchs_default_collate_is_replaced() -> None:
    def mine(batch: Any) -> Any:
        return batch

    assert quicker(default_collate) is collate
    assert quicker(torch_collate.default_collate) is collate
    assert quicker(mine) is mine
    assert quicker(torch_collate.default_convert) is torch_collate.default_convert


@pytest.fixture
def registered() -> Iterator[dict[Any, Any]]:
    """torch's registry, restored after the test."""
    fn_map = torch_collate.default_collate_fn_map
    saved = dict(fn_map)
    yield fn_map
    fn_map.clear()
    fn_map.update(saved)


def test_types_registered_by_users_are_collated_by_their_function(registered: dict[Any, Any]) -> None:
    batch = [(Box(i), i) for i in range(3)]
    registered[Box] = collate_boxes
    assert_same(collate(batch), default_collate(batch))
    assert collate(batch)[0] == ("boxes", [0, 1, 2])


@pytest.mark.parametrize("kind", [tuple, collections.abc.Sequence, dict, collections.abc.Mapping, object])
def test_a_registered_type_that_matches_tuples_or_dicts_takes_over_as_in_torch(
    registered: dict[Any, Any], kind: type
) -> None:
    registered[kind] = collate_boxes
    for batch in ([(Box(1), 2), (Box(3), 4)], [{"x": Box(1)}, {"x": Box(2)}]):
        ours, theirs = _outcome(collate, batch), _outcome(default_collate, batch)
        assert ours[0] == theirs[0] and (ours[0] == "err" or ours[1] == theirs[1]), (ours, theirs)
    del registered[kind]  # and back: the registry is read again at the next call
    batch = [(torch.ones(2), 1), (torch.zeros(2), 0)]
    assert_same(collate(batch), default_collate(batch))


class _Records(Dataset[Any]):
    """Samples of every usual structure, by index."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> Any:
        kind = index // 8
        if kind == 0:
            return _tensors(index), index
        if kind == 1:
            return {"x": _tensors(index), "meta": {"i": index, "name": f"n{index}"}}
        return Point(_tensors(index), index)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_equal_torchs(driver: Driver, num_workers: int) -> None:
    dataset = _Records()
    theirs = list(TorchDataLoader(dataset, batch_size=4, num_workers=num_workers))
    ours = driver.collect(aloader.DataLoader(dataset, batch_size=4, num_workers=num_workers))
    assert_same(ours, theirs)


def test_loader_batches_equal_torchs_for_an_in_memory_dataset(driver: Driver) -> None:
    generator = torch.Generator().manual_seed(3)
    dataset = TensorDataset(torch.randn(1000, 8, generator=generator), torch.randint(0, 9, (1000,)))
    theirs = list(TorchDataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1)))
    loader = aloader.DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    assert_same(driver.collect(loader), theirs)


def test_loader_collates_registered_types_as_torch(driver: Driver, registered: dict[Any, Any]) -> None:
    registered[Box] = collate_boxes
    dataset = [(Box(i), i) for i in range(6)]
    theirs = list(TorchDataLoader(dataset, batch_size=3))
    assert_same(driver.collect(aloader.DataLoader(dataset, batch_size=3)), theirs)
