"""The plots of ``aloader bench --plot`` and of every workload in ``benchmarks/``: lines over time, or bars.

matplotlib is imported only when a plot is drawn (it is in the ``bench`` and ``test`` extras), with the ``Agg``
backend: files only, no display needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["save_bars", "save_lines"]

Series = tuple[str, Sequence[float], Sequence[float]]  # (label, xs, ys)
Panel = tuple[str, Sequence[tuple[str, float]]]  # (title, [(bar label, value), ...])


@contextlib.contextmanager
def _figure(path: Path, rows: int = 1, height: float = 4.5) -> Iterator[tuple[Any, Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, 1, figsize=(9, height * rows), squeeze=False)
    try:
        yield figure, axes[:, 0]
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)


def save_lines(path: Path, series: Sequence[Series], *, title: str, xlabel: str, ylabel: str) -> None:
    """One line per series; markers when a line has few points."""
    with _figure(path) as (_, (axes,)):
        for label, xs, ys in series:
            if len(xs):
                axes.plot(xs, ys, label=label, marker="." if len(xs) < 20 else None)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.set_ylim(bottom=0)
        axes.legend()
        axes.grid(alpha=0.3)


def save_bars(path: Path, panels: Sequence[Panel], *, xlabel: str, value_format: str = ",.0f") -> None:
    """One horizontal bar chart per panel, stacked vertically, each bar labelled with its value."""
    height = max(2.0, 0.5 * max(len(bars) for _, bars in panels) + 1.2)
    with _figure(path, rows=len(panels), height=height) as (_, axes_list):
        for axes, (title, bars) in zip(axes_list, panels, strict=True):
            labels = [label for label, _ in bars]
            values = [value for _, value in bars]
            positions = range(len(bars))
            axes.barh(positions, values, color=[f"C{i}" for i in positions])
            axes.set_yticks(list(positions), labels)
            axes.invert_yaxis()  # the first row on top, as in the table
            for position, value in zip(positions, values, strict=True):
                axes.annotate(
                    f" {format(value, value_format)}", (value, position), va="center", fontsize=9, annotation_clip=False
                )
            axes.set_xlim(0, max(values, default=1) * 1.2 or 1)
            axes.set_title(title)
            axes.set_xlabel(xlabel)
            axes.grid(axis="x", alpha=0.3)
