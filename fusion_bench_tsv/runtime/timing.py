"""A timing callback that any thread may call: ``timer(action, seconds)``.

Not FusionBench's ``SimpleProfilerMixin.profile``: Lightning's ``SimpleProfiler.start`` raises for an action
already running, which two worker threads timing ``"truncated svd"`` at once do; nor ``timeit_context``,
which logs two lines per call (thousands of SVDs) and reports to no one.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

__all__ = ["Timer", "timed"]

Timer = Callable[[str, float], None]
"""``timer(action, seconds)``: called (from any thread) with the duration of one timed action."""


@contextmanager
def timed(timer: Optional[Timer], action: str) -> Iterator[None]:
    """Report the block's wall time to ``timer`` as ``action`` (nothing without a timer)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timer is not None:
            timer(action, time.perf_counter() - start)
