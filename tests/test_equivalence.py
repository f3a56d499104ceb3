"""With in_order=True, aloader's batches equal torch's DataLoader's, bit for bit, for every concurrency."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    random_split,
)

import aloader
from tests.conftest import Driver, assert_same
from tests.datasets import BatchedDataset, CountingIterable, SquaresDataset


def tensors(n: int = 25) -> TensorDataset:
    return TensorDataset(torch.arange(n * 3, dtype=torch.float32).reshape(n, 3), torch.arange(n) % 4)


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pad_collate(batch: list[Any]) -> Any:
    xs = [b["x"] for b in batch]
    return torch.stack(xs).sum(dim=1), [b["name"] for b in batch]


# Each case builds fresh (dataset, kwargs) so torch and aloader each get their own generator and sampler objects.
CASES: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "sequential": lambda: (tensors(), {"batch_size": 4}),
    "default-batch-size": lambda: (tensors(7), {}),
    "drop-last": lambda: (tensors(), {"batch_size": 4, "drop_last": True}),
    "shuffle-generator": lambda: (tensors(), {"batch_size": 4, "shuffle": True, "generator": gen()}),
    "shuffle-global-rng": lambda: (tensors(), {"batch_size": 5, "shuffle": True}),
    "batch-size-none": lambda: (tensors(9), {"batch_size": None}),
    "batch-size-none-shuffle": lambda: (tensors(9), {"batch_size": None, "shuffle": True, "generator": gen(3)}),
    "subset-random-sampler": lambda: (
        tensors(),
        {"batch_size": 3, "sampler": SubsetRandomSampler(list(range(0, 25, 2)), generator=gen(1))},
    ),
    "weighted-sampler": lambda: (
        tensors(),
        {"batch_size": 4, "sampler": WeightedRandomSampler([0.1] * 20 + [5.0] * 5, 30, generator=gen(2))},
    ),
    "weighted-sampler-global-rng": lambda: (
        tensors(),
        {"batch_size": 4, "sampler": WeightedRandomSampler([0.1] * 20 + [5.0] * 5, 30)},
    ),
    "batch-sampler": lambda: (
        tensors(),
        {"batch_sampler": BatchSampler(RandomSampler(range(25), generator=gen(4)), 6, drop_last=False)},
    ),
    "batch-sampler-list": lambda: (tensors(), {"batch_sampler": [[3, 1], [0], [24, 2, 2, 5]]}),
    "sampler-list": lambda: (tensors(), {"sampler": [5, 4, 3, 9], "batch_size": 3}),
    "dict-namedtuple-numpy-str": lambda: (SquaresDataset(), {"batch_size": 4, "shuffle": True, "generator": gen()}),
    "dict-no-batching": lambda: (SquaresDataset(6), {"batch_size": None}),
    "custom-collate": lambda: (SquaresDataset(), {"batch_size": 5, "collate_fn": pad_collate}),
    "getitems": lambda: (BatchedDataset(), {"batch_size": 4, "shuffle": True, "generator": gen(5)}),
    "random-split": lambda: (
        random_split(SquaresDataset(), [0.6, 0.4], generator=gen(6))[0],
        {"batch_size": 3, "shuffle": True, "generator": gen(8)},
    ),
    "concat": lambda: (
        ConcatDataset([tensors(5), tensors(7)]),
        {"batch_size": 4, "sampler": SequentialSampler(range(12))},
    ),
    "iterable": lambda: (CountingIterable(), {"batch_size": 4}),
    "iterable-drop-last": lambda: (CountingIterable(), {"batch_size": 4, "drop_last": True}),
    "iterable-no-batching": lambda: (CountingIterable(5), {"batch_size": None}),
    "iterable-exact": lambda: (CountingIterable(8), {"batch_size": 4}),
}


@pytest.mark.parametrize("concurrency", [1, 3, 64])
@pytest.mark.parametrize("case", list(CASES))
def test_same_batches_as_torch(driver: Driver, case: str, concurrency: int) -> None:
    torch.manual_seed(1234)
    dataset, kwargs = CASES[case]()
    reference = torch.utils.data.DataLoader(dataset, **kwargs)
    expected = [list(reference), list(reference)]  # two epochs: the RNG carries over between them

    torch.manual_seed(1234)
    dataset, kwargs = CASES[case]()
    loader = aloader.DataLoader(dataset, concurrency=concurrency, **kwargs)
    got = [driver.collect(loader), driver.collect(loader)]

    assert_same(got, expected)
    try:
        expected_len: int | None = len(reference)
    except TypeError:
        expected_len = None
    if expected_len is not None:
        assert len(loader) == expected_len


def test_global_rng_state_after_epoch_matches_torch(driver: Driver) -> None:
    """The same draws in the same order: the global RNG ends in the same state as after torch's epoch."""
    torch.manual_seed(99)
    list(torch.utils.data.DataLoader(tensors(), batch_size=4, shuffle=True))
    after_torch = torch.rand(3)

    torch.manual_seed(99)
    driver.collect(aloader.DataLoader(tensors(), batch_size=4, shuffle=True))
    assert torch.equal(torch.rand(3), after_torch)


def test_in_order_false_yields_the_same_batches_in_some_order(driver: Driver) -> None:
    dataset = tensors(40)
    expected = list(torch.utils.data.DataLoader(dataset, batch_size=4))
    got = driver.collect(aloader.DataLoader(dataset, batch_size=4, in_order=False, concurrency=8))
    key = lambda batch: int(batch[1][0]) * 1000 + int(batch[0][0][0])  # noqa: E731
    assert_same(sorted(got, key=key), sorted(expected, key=key))


def test_is_a_torch_dataloader() -> None:
    loader = aloader.DataLoader(tensors())
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert loader.batch_size == 1 and loader.num_workers == 0 and loader.in_order is True
    assert loader.concurrency == aloader.DEFAULT_CONCURRENCY and loader.transform is None


def test_iterator_len_matches_torch() -> None:
    dataset = tensors()
    ours, theirs = (
        iter(aloader.DataLoader(dataset, batch_size=4)),
        iter(torch.utils.data.DataLoader(dataset, batch_size=4)),
    )
    try:
        assert len(ours) == len(theirs)
    finally:
        ours.close()


def test_iterable_len_warning_matches_torch(driver: Driver) -> None:
    class Liar(CountingIterable):
        def __len__(self) -> int:
            return 2

    loader = aloader.DataLoader(Liar(5), batch_size=None)
    assert len(loader) == 2
    with pytest.warns(UserWarning) as record:
        driver.collect(loader)
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert "was reported to be 2(when accessing len(dataloader)), but 3 samples have been fetched." in messages[0]
