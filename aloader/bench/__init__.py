"""``aloader bench`` and what the benchmark suite shares with it: imported by the CLI, ``benchmarks/``, tests and
examples, never by ``import aloader``.

Import the module that holds what you need; this package imports none of them, so that the object server
(``python -m aloader.bench.objectserver``, run in a process of its own by benchmarks) or the plots do not pull in
the whole suite.

- ``config``: the systems compared, and ``BenchConfig`` (what to stream and how).
- ``sources``: what to stream: a URL, a directory or tar shards, or the synthetic dataset on an object server.
- ``samples``: what every system shares: the blocking read, decoding, collate, and the datasets of a format.
- ``objects``: the systems over single objects (one per sample).
- ``shards``: the systems over WebDataset tar shards.
- ``images``: the ``images`` workload: JPEGs, one torch Dataset (requests, Pillow, random crop and flip) run by
  each loader, and the CPU bound it is judged against.
- ``runner``: each system in a child process of its own, measured from the events it sends; Ctrl-C handling.
- ``memory``: the RSS, PSS and CPU time of a process tree, sampled in a thread.
- ``report``: the figures of a run: results, the Markdown table, JSON and the throughput plot.
- ``objectserver``: an HTTP object server on 127.0.0.1 with injected latency and faults.
- ``plot``: the plots of ``aloader bench --plot`` and of ``benchmarks/``.
"""
