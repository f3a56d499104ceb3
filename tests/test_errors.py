"""A failing sample raises in the consumer at its batch: original type, index in the message, cause chained."""

from __future__ import annotations

import asyncio
import threading
import traceback
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

import aloader
from tests.conftest import Driver, torch_outcomes
from tests.datasets import FailingAt


class Custom(Exception):
    def __init__(self, code: int, detail: str) -> None:  # cannot be built from a message alone
        super().__init__(code, detail)
        self.code = code


@pytest.mark.parametrize("exc_type", [ValueError, KeyError, OSError, RuntimeError])
def test_sample_error_keeps_type_names_index_chains_cause(driver: Driver, exc_type: type[Exception]) -> None:
    loader = aloader.DataLoader(FailingAt(10, bad=6, exc=exc_type("disk on fire")), batch_size=4)
    outcomes = driver.outcomes(loader)
    assert [kind for kind, _ in outcomes] == ["ok", "err", "ok"]  # raised at its batch; iteration goes on
    error = outcomes[1][1]
    assert type(error) is exc_type
    assert "sample index 6" in str(error) and "disk on fire" in str(error)
    assert isinstance(error.__cause__, exc_type) and "disk on fire" in str(error.__cause__)
    rendered = "".join(traceback.format_exception(error))
    assert "in __getitem__" in rendered and "raise self.exc" in rendered  # the original traceback is kept
    assert outcomes[2][1].tolist() == [8, 9]


def test_outcomes_match_torch_around_an_error(driver: Driver) -> None:
    """torch's iterator raises at the failing batch and goes on with the next one; so does aloader's."""
    expected = torch_outcomes(torch.utils.data.DataLoader(FailingAt(10, 5, ValueError("x")), batch_size=3), ValueError)
    got = [
        (kind, value.tolist() if kind == "ok" else type(value))
        for kind, value in driver.outcomes(aloader.DataLoader(FailingAt(10, 5, ValueError("x")), batch_size=3))
    ]
    assert got == expected


def test_exception_that_needs_other_arguments_keeps_identity_and_gets_a_note(driver: Driver) -> None:
    original = Custom(7, "bad header")
    error = driver.outcomes(aloader.DataLoader(FailingAt(4, 2, original), batch_size=2))[1][1]
    assert error is original and error.code == 7
    assert any("sample index 2" in note for note in error.__notes__)


def test_async_sample_error(driver: Driver) -> None:
    class AsyncFailing:
        def __len__(self) -> int:
            return 5

        async def __getitem__(self, i: int) -> int:
            await asyncio.sleep(0)
            if i == 3:
                raise LookupError("no such blob")
            return i

    outcomes = driver.outcomes(aloader.DataLoader(AsyncFailing(), batch_size=2))
    error = outcomes[1][1]
    assert type(error) is LookupError and "sample index 3" in str(error)
    assert isinstance(error.__cause__, LookupError)
    assert outcomes[2] == ("ok", torch.tensor([4])) or outcomes[2][1].tolist() == [4]


def test_transform_error_names_the_sample(driver: Driver) -> None:
    def transform(sample: Any) -> Any:
        if int(sample[0]) == 3:
            raise ZeroDivisionError("bad pixel")
        return sample

    loader = aloader.DataLoader(torch.utils.data.TensorDataset(torch.arange(6)), batch_size=2, transform=transform)
    error = driver.outcomes(loader)[1][1]
    assert type(error) is ZeroDivisionError and "in transform for sample index 3" in str(error)


def test_collate_error_names_the_batch(driver: Driver) -> None:
    ragged = [torch.zeros(2), torch.zeros(3)]
    loader = aloader.DataLoader(ragged, batch_size=2)
    with pytest.raises(RuntimeError, match=r"in collate_fn for the batch of sample indices \[0, 1\]") as info:
        driver.collect(loader)
    with pytest.raises(RuntimeError) as theirs:
        list(torch.utils.data.DataLoader(ragged, batch_size=2))
    assert str(theirs.value) in str(info.value)


def test_sampler_error_ends_the_epoch_after_earlier_batches(driver: Driver) -> None:
    def sampler() -> Any:
        yield 0
        yield 1
        raise OSError("index service down")

    class Sampler:
        def __iter__(self) -> Any:
            return sampler()

    outcomes = driver.outcomes(aloader.DataLoader(list(range(5)), batch_size=None, sampler=Sampler()))
    assert [kind for kind, _ in outcomes] == ["ok", "ok", "err"]
    assert type(outcomes[2][1]) is OSError and "in the sampler" in str(outcomes[2][1])


def test_iterable_dataset_error_like_torch(driver: Driver) -> None:
    class Breaks(IterableDataset[Any]):
        def __iter__(self) -> Any:
            yield 1
            yield 2
            raise ValueError("corrupt record")

    expected: list[Any] = []
    reference = iter(torch.utils.data.DataLoader(Breaks(), batch_size=None))
    while True:
        try:
            expected.append(int(next(reference)))
        except StopIteration:
            break
        except ValueError:
            expected.append("err")
    got = driver.outcomes(aloader.DataLoader(Breaks(), batch_size=None))
    assert [int(v) if kind == "ok" else "err" for kind, v in got] == expected
    assert "item 2 of the iterable dataset" in str(got[2][1])


def test_timeout_raises_torchs_error_text(driver: Driver) -> None:
    release = threading.Event()

    class Stalls(Dataset[Any]):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> int:
            if i == 1:
                release.wait(timeout=60)
            return i

    loader = aloader.DataLoader(Stalls(), batch_size=None, timeout=0.2)
    # The stalled call cannot be interrupted (it is a thread); the consumer releases it once the error arrives,
    # and the timeout ends the epoch.
    outcomes = driver.outcomes(loader, on_error=lambda exc: release.set())
    assert [kind for kind, _ in outcomes] == ["ok", "err"]
    assert type(outcomes[1][1]) is RuntimeError
    assert str(outcomes[1][1]) == "DataLoader timed out after 0.2 seconds"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_iterator_is_not_picklable_as_torchs(driver: Driver, num_workers: int) -> None:
    import pickle

    dataset = torch.utils.data.TensorDataset(torch.arange(4))
    with pytest.raises(NotImplementedError):
        pickle.dumps(iter(torch.utils.data.DataLoader(dataset, num_workers=num_workers)))
    loader = aloader.DataLoader(dataset, num_workers=num_workers)
    if driver.is_async:

        async def attempt() -> None:
            iterator = aiter(loader)
            try:
                with pytest.raises(NotImplementedError, match="AsyncLoaderIterator cannot be pickled"):
                    pickle.dumps(iterator)
            finally:
                await iterator.aclose()

        driver.run_async(attempt)
    else:
        with iter(loader) as iterator, pytest.raises(NotImplementedError, match="LoaderIterator cannot be pickled"):
            pickle.dumps(iterator)
