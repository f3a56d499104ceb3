"""``max_failures``: failing samples are skipped, logged and counted; past the budget a clear error; None is torch."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader as TorchDataLoader

import aloader
from aloader.errors import AloaderError
from tests.conftest import Driver, torch_outcomes
from tests.reliability_datasets import (
    AsyncBadItems,
    AsyncBadSamples,
    BadItems,
    BadSamples,
    BadSamplesBatched,
    Numbers,
    RaisesUnpicklable,
    async_bad_transform,
    bad_transform,
    is_bad,
)


def torch_index_batches(n: int, batch_size: int, seed: int | None) -> list[list[int]]:
    """torch's batches of indices for the same sampler arguments (shuffled with ``seed`` when given)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    loader = TorchDataLoader(Numbers(n), batch_size=batch_size, shuffle=seed is not None, generator=generator)
    return [batch.tolist() for batch in loader]


def without_bad(batches: list[list[int]], scale: int = 1) -> list[list[int]]:
    """The batches with the bad samples left out, and batches left empty dropped."""
    kept = [[i * scale for i in batch if not is_bad(i)] for batch in batches]
    return [batch for batch in kept if batch]


def values(batches: list[Any]) -> list[list[int]]:
    return [batch.tolist() for batch in batches]


def loader_for(dataset: Any, seed: int | None = None, **kwargs: Any) -> aloader.DataLoader:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return aloader.DataLoader(dataset, batch_size=4, shuffle=seed is not None, generator=generator, **kwargs)


# ------------------------------------------------------------------------------------------------ skipping
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("dataset", [BadSamples, BadSamplesBatched, AsyncBadSamples])
def test_bad_samples_are_left_out_of_torchs_batches(driver: Driver, dataset: type, num_workers: int) -> None:
    loader = loader_for(dataset(), seed=5, max_failures=10, num_workers=num_workers)
    assert values(driver.collect(loader)) == without_bad(torch_index_batches(30, 4, seed=5))
    stats = loader.stats()
    assert stats.skipped == 4 and stats.fetch.failures == 4 and stats.failed_batches == 0


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("dataset", [Numbers, AsyncBadSamples])
@pytest.mark.parametrize("transform", [bad_transform, async_bad_transform])
def test_failing_transform_skips_the_sample(driver: Driver, dataset: type, transform: Any, num_workers: int) -> None:
    source = Numbers(30) if dataset is Numbers else AsyncBadSamples()
    loader = loader_for(source, transform=transform, max_failures=10, num_workers=num_workers)
    assert values(driver.collect(loader)) == without_bad(torch_index_batches(30, 4, None), scale=10)
    stats = loader.stats()
    if dataset is Numbers:  # only the transform fails; AsyncBadSamples fails at fetch first
        assert stats.transform.failures == 4
    assert stats.skipped == 4


@pytest.mark.parametrize("dataset", [BadItems, AsyncBadItems])
def test_iterable_dataset_items_that_raise_are_skipped(driver: Driver, dataset: type) -> None:
    loader = aloader.DataLoader(dataset(), batch_size=4, max_failures=5)
    # Each batch is four pulls from the iterator; a pull that raised leaves a hole.
    chunks = [list(range(start, min(start + 4, 30))) for start in range(0, 30, 4)]
    assert values(driver.collect(loader)) == without_bad(chunks)
    assert loader.stats().skipped == 4


def test_iterable_dataset_in_workers_skips_too(driver: Driver) -> None:
    # As in torch each worker iterates its own copy (BadItems does not shard), batches round-robin over workers.
    loader = aloader.DataLoader(BadItems(12), batch_size=4, max_failures=4, num_workers=2)
    chunks = without_bad([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    assert values(driver.collect(loader)) == [chunk for chunk in chunks for _ in range(2)]
    assert loader.stats().skipped == 4


def test_a_batch_left_empty_is_dropped(driver: Driver) -> None:
    loader = aloader.DataLoader(BadSamples(12), batch_size=1, max_failures=3)
    assert values(driver.collect(loader)) == [[i] for i in range(12) if not is_bad(i)]
    unbatched = aloader.DataLoader(BadSamples(12), batch_size=None, max_failures=3)
    assert [int(sample) for sample in driver.collect(unbatched)] == [i for i in range(12) if not is_bad(i)]


def test_each_skip_is_logged_once_with_the_index_and_the_error(driver: Driver, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="aloader")
    driver.collect(loader_for(BadSamples(), max_failures=10, num_workers=0, concurrency=3))
    records = [r for r in caplog.records if r.name == "aloader"]
    assert len(records) == 4
    for record, index in zip(records, [3, 10, 17, 24], strict=True):
        assert record.levelno == logging.WARNING
        assert f"sample index {index}" in record.getMessage() and "corrupt sample" in record.getMessage()


def test_the_aloader_logger_is_quiet_by_default() -> None:
    logger = logging.getLogger("aloader")
    assert any(isinstance(handler, logging.NullHandler) for handler in logger.handlers)


# ------------------------------------------------------------------------------------------------ the budget
@pytest.mark.parametrize("num_workers", [0, 2])
def test_spent_budget_raises_naming_the_last_failures(driver: Driver, num_workers: int) -> None:
    loader = loader_for(BadSamples(), max_failures=2, num_workers=num_workers)
    outcomes = driver.outcomes(loader)
    kinds = [kind for kind, _ in outcomes]
    # Samples 3 and 10 are skipped; 17 (batch [16..19], the fifth) is one too many.
    assert kinds[:4] == ["ok"] * 4 and kinds[4] == "err"
    error = outcomes[4][1]
    assert type(error) is aloader.FailureBudgetExceeded and isinstance(error, AloaderError)
    message = str(error)
    assert "3 samples failed" in message and "max_failures=2" in message
    for index in (3, 10, 17):
        assert f"sample index {index}" in message
    assert isinstance(error.__cause__, ValueError) and "sample index 17" in str(error.__cause__)
    assert error.failures == 3


def test_a_fraction_is_a_share_of_the_samples_seen(driver: Driver) -> None:
    # One bad sample in seven is more than 10%: at the third batch 2 failures > max(1, 0.1 * 12 samples seen).
    outcomes = driver.outcomes(loader_for(BadSamples(), max_failures=0.1))
    assert [kind for kind, _ in outcomes][:3] == ["ok", "ok", "err"]
    error = outcomes[2][1]
    assert isinstance(error, aloader.FailureBudgetExceeded) and "max_failures=0.1" in str(error)
    # One in seven is within 20%.
    loader = loader_for(BadSamples(), max_failures=0.2)
    assert values(driver.collect(loader)) == without_bad(torch_index_batches(30, 4, None))


def test_zero_budget_raises_at_the_first_failure(driver: Driver) -> None:
    outcomes = driver.outcomes(loader_for(BadSamples(8), max_failures=0))
    assert [kind for kind, _ in outcomes] == ["err", "ok"]
    assert isinstance(outcomes[0][1], aloader.FailureBudgetExceeded)


def test_without_a_budget_errors_are_torchs(driver: Driver) -> None:
    """max_failures=None (the default): the failing batch raises the sample's error and iteration goes on."""
    expected = torch_outcomes(TorchDataLoader(BadSamples(12), batch_size=4), ValueError)
    got = driver.outcomes(loader_for(BadSamples(12)))
    assert [(kind, value.tolist() if kind == "ok" else type(value)) for kind, value in got] == expected


def test_unpicklable_error_in_a_worker_is_skipped_with_its_text(driver: Driver, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="aloader")
    loader = aloader.DataLoader(RaisesUnpicklable(), batch_size=3, max_failures=1, num_workers=2)
    assert values(driver.collect(loader)) == [[0, 1], [3, 4, 5]]
    (record,) = [r for r in caplog.records if r.name == "aloader"]
    assert "sample index 2" in record.getMessage() and "bad header" in record.getMessage()


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("bad", [-1, 1.0, 0.0, 1.5, True, "3", [1]])
def test_max_failures_argument_is_checked(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"max_failures option should be a non-negative integer") as info:
        aloader.DataLoader(Numbers(4), max_failures=bad)
    assert f"max_failures={bad!r}" in str(info.value)


def test_progress_argument_is_checked() -> None:
    with pytest.raises(TypeError, match=r"^progress option should be a bool, but got progress=1$"):
        aloader.DataLoader(Numbers(4), progress=1)  # type: ignore[arg-type]


def test_failure_budget_exceeded_is_in_the_hierarchy_drawing() -> None:
    assert "FailureBudgetExceeded" in (aloader.errors.__doc__ or "")
    assert dataclasses.is_dataclass(aloader.LoaderStats)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_out_of_order_and_persistent_workers_skip_the_same_samples(driver: Driver, num_workers: int) -> None:
    loader = loader_for(
        BadSamples(), max_failures=4, in_order=False, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    expected = sorted(i for batch in without_bad(torch_index_batches(30, 4, None)) for i in batch)
    for _ in range(2):  # the budget is per epoch: the second epoch skips the same four again
        got = sorted(i for batch in values(driver.collect(loader)) for i in batch)
        assert got == expected
        assert loader.stats().skipped == 4
    loader.close()
