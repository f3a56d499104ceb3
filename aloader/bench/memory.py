"""The resident memory of a process tree (a system's child and its workers), sampled in a thread: its peak, and
a timeline that shows whether memory grows with what was streamed."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import psutil

__all__ = ["RssSampler", "tree_rss"]

# RSS of the system's process tree is sampled this often. A measurement, not a synchronisation.
_RSS_INTERVAL = 0.05


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of ``process`` and all its descendants, in bytes (0 once it is gone)."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


class RssSampler:
    """Samples the RSS of a process tree in a thread until stopped: the peak, and a timeline of (seconds since
    start, ``progress()`` at that moment, RSS) that shows whether memory grows with what was streamed."""

    def __init__(self, pid: int, progress: Callable[[], int] = lambda: 0, interval: float = _RSS_INTERVAL) -> None:
        self._process = psutil.Process(pid)
        self._progress = progress
        self._interval = interval
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self.peak = 0
        self.timeline: list[tuple[float, int, int]] = []
        self._lock = threading.Lock()  # the sampling thread and sample() calls append in time order
        self._thread = threading.Thread(target=self._run, name="aloader-bench-rss", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """Take a sample now, besides the periodic ones: a stream shorter than the interval still gets a point
        while the process runs with data delivered (the first batch is a good moment)."""
        with self._lock:
            rss = tree_rss(self._process)
            if rss:
                self.peak = max(self.peak, rss)
                self.timeline.append((time.perf_counter() - self._started, self._progress(), rss))

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval):  # a measurement, not a synchronisation
                return

    def stop(self) -> int:
        """Stop sampling (one last sample first); the peak RSS in bytes."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak
