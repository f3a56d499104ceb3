"""What travels between the stages: a unit's outcome, and the markers that are not batches.

A *unit* is what one batch is made from: a list of sample indices (auto-collation), a single index, or the items
pulled from an iterable dataset. Every unit has an *outcome*, handed from stage to stage and finally to the consumer:
a batch, a :class:`Failed` (the consumer raises it at that position), :data:`SKIPPED` (``max_failures`` dropped the
whole unit: counted, not yielded) or, inside the core only, :data:`NO_BATCH` (a worker's copy of an iterable
dataset was already exhausted) and :data:`DELIVERED` (the consumer made the batch and yielded it itself).
:data:`END` follows the last outcome of an epoch.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["DELIVERED", "END", "NO_BATCH", "SKIPPED", "Failed", "WithState"]


class _Marker:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name  # the same object after crossing from a worker process


END: Final = _Marker("END")
"""The last item a pipeline hands to its sink: the epoch is complete."""

SKIPPED: Final = _Marker("SKIPPED")
"""Handed to the sink in place of a unit that ``max_failures`` skipped whole (every sample failed): the consumer
counts it as a consumed unit (so a resume skips it too) and yields nothing for it."""

NO_BATCH: Final = _Marker("NO_BATCH")
"""A unit that yields nothing and is not counted: a worker's answer to ``next`` when its copy of an iterable dataset
is exhausted for this epoch. Never reaches the sink; its window slot is released at once."""

DELIVERED: Final = _Marker("DELIVERED")
"""A unit whose batch the sync driver's consumer made in its own thread and yielded itself, in order (the fast
lane's calls, see ``lane.py``): it completes the unit's place in the order and never reaches the sink; its window
slot is freed when the consumer has yielded the batch."""


class Failed:
    """An outcome that is an exception: the consumer raises ``error`` at this batch's position."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class WithState:
    """A worker's answer with the state of its copy of the dataset (and of its iterator) taken right after the
    answer's items were fetched or pulled: ``outcome`` is the batch (or ``NO_BATCH``, or None for the start of an
    epoch). Only sent when the dataset or its iterator has ``state_dict()``; see ``aloader._worker_state``."""

    __slots__ = ("outcome", "state")

    def __init__(self, outcome: Any, state: Any) -> None:
        self.outcome = outcome
        self.state = state

    def __reduce__(self) -> tuple[type[WithState], tuple[Any, Any]]:
        return WithState, (self.outcome, self.state)
