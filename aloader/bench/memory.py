"""The resident memory of a process tree (a system's child and its workers), sampled in a thread: its peak, and
a timeline that shows whether memory grows with what was streamed; the peak PSS of the tree, sampled less often;
and the CPU time of its processes.

RSS counts a page shared by several processes (libtorch's code, pages a forked worker shares with its parent) once
per process; PSS splits each shared page between its sharers, so the sum over a tree is the memory the tree uses.
Reading PSS costs the kernel about 10 ms per process (it walks the page tables), so it is sampled once a second:
every 50 ms would take a core from the system being measured on a small machine.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import psutil

__all__ = ["RssSampler", "tree_pss", "tree_rss"]

# RSS of the system's process tree is sampled this often. A measurement, not a synchronisation.
_RSS_INTERVAL = 0.05
_PSS_INTERVAL = 1.0


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of ``process`` and all its descendants, in bytes (0 once it is gone)."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


def tree_pss(process: psutil.Process) -> int | None:
    """Proportional set size of ``process`` and all its descendants, in bytes; None where the platform has no PSS
    (psutil has it on Linux only) or it cannot be read."""
    total = 0
    try:
        for p in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                total += p.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):
        return None
    except psutil.Error:  # the root has gone: nothing to add
        return 0
    return total


class RssSampler:
    """Samples the RSS of a process tree in a thread until stopped: the peak, and a timeline of (seconds since
    start, ``progress()`` at that moment, RSS) that shows whether memory grows with what was streamed; and the peak
    PSS (``peak_pss``, None where it cannot be read), every ``pss_interval`` seconds and at each ``sample()`` call while
    the process runs."""

    def __init__(
        self,
        pid: int,
        progress: Callable[[], int] = lambda: 0,
        interval: float = _RSS_INTERVAL,
        pss_interval: float = _PSS_INTERVAL,
    ) -> None:
        self._process = psutil.Process(pid)
        self._progress = progress
        self._interval = interval
        self._pss_interval = pss_interval
        self._pss_due = time.perf_counter() + pss_interval
        self.peak_pss: int | None = 0
        self._cpu: dict[int, float] = {}  # pid: user + system seconds, as last seen
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self.peak = 0
        self.timeline: list[tuple[float, int, int]] = []
        self._lock = threading.Lock()  # the sampling thread and sample() calls append in time order
        self._thread = threading.Thread(target=self._run, name="aloader-bench-rss", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """Take a sample now, besides the periodic ones: a stream shorter than the interval still gets a point
        while the process runs with data delivered (the first batch is a good moment). PSS is sampled too."""
        self._sample(explicit=True)

    def _sample(self, explicit: bool) -> None:
        with self._lock:
            rss = self._rss_and_cpu()
            if rss:
                self.peak = max(self.peak, rss)
                self.timeline.append((time.perf_counter() - self._started, self._progress(), rss))
            if (rss and explicit) or time.perf_counter() >= self._pss_due:
                self._sample_pss()

    @property
    def cpu_seconds(self) -> float:
        """The CPU time (user and system) of every process of the tree as last sampled: a worker that ends between
        two samples misses at most one interval's worth."""
        with self._lock:
            return sum(self._cpu.values())

    def _rss_and_cpu(self) -> int:
        total = 0
        with contextlib.suppress(psutil.Error):
            for p in [self._process, *self._process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error), p.oneshot():
                    total += p.memory_info().rss
                    times = p.cpu_times()
                    self._cpu[p.pid] = times.user + times.system
        return total

    def _sample_pss(self) -> None:
        self._pss_due = time.perf_counter() + self._pss_interval
        if self.peak_pss is None:
            return
        pss = tree_pss(self._process)
        self.peak_pss = None if pss is None else max(self.peak_pss, pss)

    def _run(self) -> None:
        while True:
            self._sample(explicit=False)
            if self._stop.wait(self._interval):  # a measurement, not a synchronisation
                return

    def stop(self) -> int:
        """Stop sampling (one last sample first); the peak RSS in bytes."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak
