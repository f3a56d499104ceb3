"""The process pool (``num_workers > 0``): worker processes that run the core, results back through shared memory.

``setup.py`` starts them (fork when safe, else the forkserver), ``pool.py`` is the main process's side (tasks out,
results and deaths in), ``worker.py`` what runs in each worker, ``transfer.py`` how results cross.
"""

from aloader._pool.pool import WorkerPool
from aloader._pool.setup import WorkerSetup, default_context, fork_is_safe

__all__ = ["WorkerPool", "WorkerSetup", "default_context", "fork_is_safe"]
