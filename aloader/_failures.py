"""The failure budget (``max_failures``): samples that raise are skipped, logged and counted, up to a limit.

Where a sample fails (a fetch thread, the event loop, a worker process) it is replaced by a :class:`Skipped`
marker carrying the error, with the index or key in its message. The code that collates a batch drops the markers
and wraps what it made in :class:`Collated` (the batch, the skips, the samples seen), so skips made in a worker
process travel back with their batch. The pipeline settles each ``Collated`` in hand-off order
(:meth:`FailureBudget.settle`): it logs each skip once, counts it, and when the budget is spent puts a
:class:`~aloader.errors.FailureBudgetExceeded` at that batch's position instead.

With ``max_failures=None`` none of this runs: failures raise at their batch exactly as in torch.
"""

from __future__ import annotations

import collections
import logging
import math
import pickle
from collections.abc import Callable
from typing import Any, Final, Literal

from aloader.errors import FailureBudgetExceeded

__all__ = [
    "Collated",
    "FailureBudget",
    "Skipped",
    "check_max_failures",
    "logger",
    "named",
    "split_skipped",
    "transform_each",
]

logger: Final = logging.getLogger("aloader")
logger.addHandler(logging.NullHandler())  # quiet unless the application configures logging

_SHOWN: Final = 3  # failures named in FailureBudgetExceeded's message


def check_max_failures(max_failures: object) -> int | float | None:
    """``max_failures`` as given, or a ValueError in torch's style."""
    if max_failures is None:
        return None
    valid = (isinstance(max_failures, int) and not isinstance(max_failures, bool) and max_failures >= 0) or (
        isinstance(max_failures, float) and 0.0 < max_failures < 1.0
    )
    if not valid:
        raise ValueError(
            "max_failures option should be a non-negative integer (a count), a float in (0, 1) (a share of the "
            f"samples seen) or None, but got max_failures={max_failures!r}"
        )
    return max_failures  # type: ignore[return-value]


def named(sample: object) -> str:
    """`` (key '...' of <shard>)`` for a WebDataset-style sample dict (as TarShardDataset yields), else ``""``: an
    item's position in a stream says little, its key says which file to look at."""
    if isinstance(sample, dict) and "__key__" in sample:
        where = f" of {sample['__url__']}" if "__url__" in sample else ""
        return f" (key {sample['__key__']!r}{where})"
    return ""


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (to cross from a worker process), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__qualname__}: {error}")
    return error


class Skipped:
    """A sample that failed in ``stage`` and is left out of its batch.

    ``error`` is what would have been raised (its message names the index or key, the original chained);
    ``description`` says where it failed and what the original error was, for the log and the budget's error.
    """

    __slots__ = ("description", "error", "stage")

    def __init__(
        self,
        error: BaseException,
        stage: Literal["fetch", "transform"],
        where: str = "",
        original: BaseException | None = None,
        description: str | None = None,
    ) -> None:
        self.error = error
        self.stage = stage
        if description is None:
            original = error if original is None else original
            description = f"{where}: {type(original).__name__}: {original}" if where else f"{original}"
        self.description = description

    def __reduce__(self) -> tuple[Callable[..., Skipped], tuple[BaseException, str, str, None, str]]:
        return Skipped, (_portable(self.error), self.stage, "", None, self.description)


class Collated:
    """What collating makes while the budget is on: the batch (unless every sample failed), the skips, the count."""

    __slots__ = ("batch", "empty", "seen", "skipped")

    def __init__(self, batch: Any, skipped: list[Skipped], seen: int, empty: bool = False) -> None:
        self.batch = batch
        self.skipped = skipped
        self.seen = seen
        self.empty = empty

    def __reduce__(self) -> tuple[Callable[..., Collated], tuple[Any, list[Skipped], int, bool]]:
        return Collated, (self.batch, self.skipped, self.seen, self.empty)

    def pin_memory(self) -> Collated:
        # torch's pin_memory() calls this on objects it does not know: pin the batch inside.
        from torch.utils.data._utils.pin_memory import pin_memory

        pinned = self.batch if self.empty else pin_memory(self.batch)  # type: ignore[no-untyped-call]
        return Collated(pinned, self.skipped, self.seen, self.empty)


def transform_each(
    transform: Callable[[Any], Any],
    samples: list[Any],
    positions: list[Any],
    label: str,
    failed: Callable[[Exception, str], Any],
) -> list[Any]:
    """Apply ``transform`` to each sample (in a thread or a worker process), passing ``Skipped`` markers through.

    ``failed(exc, where)`` decides what a failure becomes: it raises (torch's behaviour) or returns a marker.
    """
    out = []
    for sample, position in zip(samples, positions, strict=True):
        if type(sample) is Skipped:
            out.append(sample)
            continue
        try:
            out.append(transform(sample))
        except Exception as exc:
            out.append(failed(exc, f"in transform for {label} {position!r}{named(sample)}"))
    return out


def split_skipped(samples: list[Any], positions: list[Any]) -> tuple[list[Any], list[Any], list[Skipped]]:
    """(samples kept, their positions, the skips), in order."""
    kept: list[Any] = []
    kept_positions: list[Any] = []
    skipped: list[Skipped] = []
    for sample, position in zip(samples, positions, strict=True):
        if type(sample) is Skipped:
            skipped.append(sample)
        else:
            kept.append(sample)
            kept_positions.append(position)
    return kept, kept_positions, skipped


class FailureBudget:
    """The parent's account of one epoch: samples seen, failures, and whether the budget is spent.

    Only the event loop calls :meth:`settle`, in hand-off order, so the error comes at the same batch in every
    run with the same failures.
    """

    def __init__(self, max_failures: int | float, on_skip: Callable[[Skipped], None]) -> None:
        self.max_failures = max_failures
        self.seen = 0
        self.failures = 0
        self._recent: collections.deque[Skipped] = collections.deque(maxlen=_SHOWN)
        self._on_skip = on_skip

    def allowed(self) -> float:
        """Failures the budget allows at this point: the count, or the share of the samples seen (at least 1)."""
        if isinstance(self.max_failures, float):
            return max(1.0, self.max_failures * self.seen)
        return self.max_failures

    def settle(self, outcome: object, skip: object, failed: Callable[[BaseException], object]) -> object:
        """The outcome to hand to the consumer for ``outcome``: its batch, ``skip`` (every sample failed: no batch),
        or ``failed(FailureBudgetExceeded)`` once the budget is spent."""
        if type(outcome) is not Collated:
            return outcome
        self.seen += outcome.seen
        for skipped in outcome.skipped:
            self.failures += 1
            self._recent.append(skipped)
            self._on_skip(skipped)
            logger.warning(
                "skipped a sample (failure %d, max_failures=%r): %s",
                self.failures,
                self.max_failures,
                skipped.description,
            )
        if outcome.skipped and self.failures > self.allowed():
            return failed(self._exceeded())
        return skip if outcome.empty else outcome.batch

    def _exceeded(self) -> FailureBudgetExceeded:
        budget = (
            f"max_failures={self.max_failures!r} allows {math.floor(self.allowed())} of {self.seen} samples seen"
            if isinstance(self.max_failures, float)
            else f"max_failures={self.max_failures}"
        )
        last = "; ".join(skipped.description for skipped in self._recent)
        error = FailureBudgetExceeded(
            f"DataLoader failure budget exceeded: {self.failures} samples failed ({budget}). "
            f"Last failures: {last}. Fix the data or raise max_failures.",
            failures=self.failures,
            seen=self.seen,
        )
        error.__cause__ = self._recent[-1].error
        return error
