"""Independent per-layer linear algebra on several CPU cores: one worker thread per core, one BLAS thread
per worker.

The truncated SVDs of TSV-M are many small LAPACK calls (``syevr``/``gesdd`` on matrices of a few
thousand rows) that do not scale with BLAS threads; running them side by side does. Each job runs with
one BLAS thread whatever the number of workers, so the result does not depend on ``num_workers``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import torch

__all__ = ["LayerExecutor", "resolve_workers", "available_cores"]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (not Linux)
        return os.cpu_count() or 1


def resolve_workers(num_workers: Optional[int], device: torch.device, world_size: int = 1) -> int:
    """``num_workers`` or, for ``None``, the CPU cores per process when the math runs on the CPU (1 on a GPU)."""
    if num_workers is not None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"option 'num_workers' must be a non-negative integer or null, got {num_workers!r}")
        return max(1, num_workers)
    if device.type != "cpu":
        return 1
    return max(1, available_cores() // max(1, world_size))


class LayerExecutor:
    """A context manager that runs jobs on ``workers`` threads (in the caller's thread when ``workers <= 1``).

    A reader that reads one tensor per job calls ``room(cost)`` before reading and ``submit(..., cost=...)``
    after: it blocks while ``max_pending`` jobs are unfinished or their tensors hold more than ``max_bytes``
    (one job is always allowed, however large), so it never runs far ahead of the math and memory stays
    bounded. While the pool is open, torch and the BLAS libraries it or SciPy loaded use one thread each.
    """

    def __init__(self, workers: int, max_pending: Optional[int] = None, max_bytes: int = 256 * 2**20):
        self.workers = max(1, int(workers))
        self.max_pending = max_pending or 2 * self.workers
        self.max_bytes = max_bytes
        self._pool: Optional[ThreadPoolExecutor] = None
        self._room = threading.Condition()
        self._count = self._bytes = 0

    def __enter__(self) -> "LayerExecutor":
        if self.workers > 1:
            from threadpoolctl import threadpool_limits

            self._torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            self._limits = threadpool_limits(limits=1)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tsv", initializer=torch.set_num_threads,
                                            initargs=(1,))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
            self._pool = None
            self._limits.restore_original_limits()
            torch.set_num_threads(self._torch_threads)

    def _full(self, cost: int) -> bool:
        return self._count >= self.max_pending or (self._count > 0 and self._bytes + cost > self.max_bytes)

    def room(self, cost: int = 0) -> None:
        """Wait until a job of ``cost`` bytes may be submitted (call it before reading the job's tensor)."""
        if self._pool is not None:
            with self._room:
                self._room.wait_for(lambda: not self._full(cost))

    def _done(self, cost: int) -> None:
        with self._room:
            self._count -= 1
            self._bytes -= cost
            self._room.notify_all()

    def submit(self, fn: Callable, *args, cost: int = 0, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)``: on a worker, or now when there is no pool (the returned future is done)."""
        if self._pool is None:
            future: Future = Future()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # re-raised by future.result(), as a worker's would be
                future.set_exception(e)
            return future
        with self._room:
            self._room.wait_for(lambda: not self._full(cost))
            self._count += 1
            self._bytes += cost
        try:
            future = self._pool.submit(fn, *args, **kwargs)
        except BaseException:
            self._done(cost)
            raise
        future.add_done_callback(lambda _: self._done(cost))
        return future
