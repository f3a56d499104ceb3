"""The split of streaming datasets over ranks x workers, and its re-split when a resume changes the number of ranks.

``aloader/datasets/_split.py``: ``resplit`` and ``resume_point``, which ``TarShardDataset`` and
``ObjectStreamDataset`` share (their own tests run the same through the loader).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aloader.datasets._split import LoadedState, Part, Reader, ResumePoint, resplit, resume_point


def state(position: int, reader: int, readers: int, history: tuple[tuple[int, int, int], ...] = ()) -> LoadedState:
    return LoadedState(epoch=0, seed=0, position=position, reader=reader, readers=readers, workers=1, history=history)


@settings(max_examples=300, deadline=None)
@given(
    first=st.integers(min_value=1, max_value=6),
    length=st.integers(min_value=0, max_value=40),
    extra=st.integers(min_value=0, max_value=5),
    splits=st.lists(
        st.tuples(st.integers(min_value=1, max_value=7), st.floats(min_value=0, max_value=1)), min_size=1, max_size=4
    ),
)
def test_resplit_is_disjoint_balanced_and_loses_at_most_a_remainder(
    first: int, length: int, extra: int, splits: list[tuple[int, float]]
) -> None:
    # First-split streams as samplers_per_epoch gives them: the first `extra` readers one sample more.
    lengths = [length + (1 if r < min(extra, first - 1) else 0) for r in range(first)]
    history: list[tuple[int, int, int]] = []
    seen: list[tuple[int, int]] = []
    readers = [[Part(r, 0, n)] for r, n in enumerate(lengths)]
    count = first
    for following, fraction in splits:
        # Every reader of this split yields the same number of samples before the state is taken.
        shortest = min(sum(p.stop - p.start for p in parts) for parts in readers)
        position = int(shortest * fraction)
        for parts in readers:
            samples = [(p.reader, i) for p in parts for i in range(p.start, p.stop)]
            seen += samples[:position]
        history.append((count, 1, position))
        readers = resplit(lengths, history, following)
        count = following
        sizes = {sum(p.stop - p.start for p in parts) for parts in readers}
        assert len(sizes) == 1  # every new reader (hence rank) the same count
    for parts in readers:
        seen += [(p.reader, i) for p in parts for i in range(p.start, p.stop)]
    assert len(seen) == len(set(seen))  # none twice
    assert all(0 <= i < lengths[r] for r, i in seen)
    # Complete but for at most `readers - 1` left out at each re-split.
    assert sum(lengths) - len(seen) <= sum(following - 1 for following, _ in splits)


def test_resplit_joins_the_rest_in_reader_order() -> None:
    # Two readers of 6 had yielded 2 each; three readers share the 8 left: 2 each, 2 left out.
    assert resplit([6, 6], [(2, 1, 2)], 3) == [
        [Part(0, 2, 4)],
        [Part(0, 4, 6)],
        [Part(1, 2, 4)],
    ]
    # One reader takes everything that was left, reader 0's rest first.
    assert resplit([6, 6], [(2, 1, 2)], 1) == [[Part(0, 2, 6), Part(1, 2, 6)]]


def test_resplit_refuses_a_history_that_does_not_chain() -> None:
    with pytest.raises(ValueError, match="a split of 3 readers follows 2"):
        resplit([4, 4], [(3, 1, 1)], 2)


def test_resume_point_same_readers_any_slot() -> None:
    # Rank 0's state resumes rank 1 of the same split: every reader is at the same position.
    assert resume_point("D", state(5, 0, 2), Reader(1, 2, 0, 1), "needs x") == ResumePoint(5, ())
    assert resume_point("D", None, Reader(0, 1, 0, 1), None) == ResumePoint()


def test_resume_point_another_number_of_readers() -> None:
    assert resume_point("D", state(5, 0, 2), Reader(0, 3, 0, 1), None) == ResumePoint(0, ((2, 1, 5),))
    # Nothing read yet: a fresh epoch with the new split, whatever the dataset can re-split.
    assert resume_point("D", state(0, 0, 2), Reader(0, 3, 0, 1), "needs x") == ResumePoint()
    with pytest.raises(ValueError, match=r"D: the loaded state is from 2 readers .* this split has 3: resuming with"):
        resume_point("D", state(5, 0, 2), Reader(0, 3, 0, 1), "needs samples_per_epoch")
