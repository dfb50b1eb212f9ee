"""Thread control for the linear algebra: one worker thread per core with one BLAS thread each, and one
thread for small work.

The truncated SVDs of TSV-M are many small LAPACK calls (``syevr``/``gesdd`` on matrices of a few
thousand rows) that do not scale with BLAS threads; running them side by side does. Each job runs with
one torch/BLAS thread whatever the number of workers (BLAS results depend on the thread count), so the
result does not depend on ``num_workers``.

Small matrices gain nothing from threads, and when other processes keep the cores busy, torch's OpenMP
threads spin-wait for each other: tens of 64 × 64 SVDs took 100× longer with torch's default threads
than with one. :func:`bounded_threads` runs such work on one thread (TSV-C and STI use it per matrix).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from typing import Callable, Iterator, Optional

import torch

__all__ = ["LayerExecutor", "resolve_workers", "available_cores", "single_thread", "bounded_threads", "SMALL_WORK_NUMEL"]

#: Work on fewer elements than this (e.g. a matrix below 1024 × 1024) runs on one thread in
#: :func:`bounded_threads`; ``0`` turns the bound off (torch's threads for everything).
SMALL_WORK_NUMEL = 1 << 20


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (not Linux)
        return os.cpu_count() or 1


def resolve_workers(num_workers: Optional[int], device: torch.device, world_size: int = 1) -> int:
    """``num_workers`` or, for ``None``, the CPU cores per process when the math runs on the CPU (1 on a GPU)."""
    if num_workers is not None:  # checked by the options (methods/options.py)
        return max(1, num_workers)
    if device.type != "cpu":
        return 1
    return max(1, available_cores() // max(1, world_size))


@lru_cache(maxsize=None)
def _blas_controller():
    """threadpoolctl's view of the BLAS/OpenMP libraries of torch, NumPy and SciPy (made once: 0.05 ms a use
    instead of 3 ms for ``threadpool_limits``)."""
    from threadpoolctl import ThreadpoolController

    try:
        import scipy.linalg  # noqa: F401  (loads SciPy's BLAS, which eigh_top calls, before the scan)
    except ImportError:  # pragma: no cover
        pass
    return ThreadpoolController()


@contextmanager
def single_thread() -> Iterator[None]:
    """torch (in this thread) and the BLAS/OpenMP libraries use one thread inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas_controller().limit(limits=1):
            yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def bounded_threads(numel: int) -> Iterator[None]:
    """:func:`single_thread` for work on fewer than :data:`SMALL_WORK_NUMEL` elements, else nothing."""
    if numel < SMALL_WORK_NUMEL:
        with single_thread():
            yield
    else:
        yield


class LayerExecutor:
    """A context manager that runs jobs on ``workers`` threads (in the caller's thread when ``workers <= 1``).

    A reader that reads one tensor per job calls ``room(cost)`` before reading and ``submit(..., cost=...)``
    after: it blocks while ``max_pending`` jobs are unfinished or their tensors hold more than ``max_bytes``
    (one job is always allowed, however large), so it never runs far ahead of the math and memory stays
    bounded. While it is open, torch and the BLAS libraries it or SciPy loaded use one thread each, in the
    calling thread too, so a job computes the same bits whatever ``workers`` is. (Not a bare
    ``ThreadPoolExecutor``: its queue is unbounded, so a reader would load every tensor ahead of the math.)
    """

    def __init__(self, workers: int, max_pending: Optional[int] = None, max_bytes: int = 256 * 2**20):
        self.workers = max(1, int(workers))
        self.max_pending = max_pending or 2 * self.workers
        self.max_bytes = max_bytes
        self._pool: Optional[ThreadPoolExecutor] = None
        self._room = threading.Condition()
        self._count = self._bytes = 0
        self._threads = ExitStack()

    def __enter__(self) -> "LayerExecutor":
        self._threads.enter_context(single_thread())
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tsv", initializer=torch.set_num_threads,
                                            initargs=(1,))
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
                self._pool = None
        finally:
            self._threads.close()

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
