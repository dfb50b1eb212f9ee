"""Routed (oracle) evaluation through FusionBench's own task pools: one model on one task.

FusionBench's program evaluates every returned model on every task of the task pool (T × T). TSV-C
evaluates task i's model on task i only, as the paper does (task identity known at test time). The
task pools that evaluate per-task test sets, ``CLIPVisionModelTaskPool`` (Hugging Face CLIP) and
``OpenCLIPVisionModelTaskPool`` (open_clip), both keep them in ``test_dataloaders`` after ``setup()``
and loop over that mapping in ``evaluate``; :func:`evaluate_on_task` restricts it to one task for the
duration of one call, so the task pool's own classifier heads, metrics and reports are used unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional

from torch import nn

log = logging.getLogger(__name__)

__all__ = ["evaluate_on_task", "normalized_accuracy", "supports_routing", "taskpool_tasks"]


def supports_routing(taskpool) -> bool:
    """Whether ``taskpool`` has per-task test sets that :func:`evaluate_on_task` can restrict."""
    return taskpool is not None and isinstance(getattr(taskpool, "_test_datasets", None), Mapping)


def taskpool_tasks(taskpool) -> List[str]:
    """The names of the task pool's test sets (without loading them)."""
    if not supports_routing(taskpool):
        raise TypeError(
            f"routed evaluation needs a task pool with per-task test sets (CLIPVisionModelTaskPool, "
            f"OpenCLIPVisionModelTaskPool), got {type(taskpool).__name__}"
        )
    return list(taskpool._test_datasets.keys())


def evaluate_on_task(taskpool, model: nn.Module, task: str) -> Dict[str, Any]:
    """Evaluate ``model`` on the test set of ``task`` only, with ``taskpool.evaluate``; its result for ``task``.

    The task pool's other test sets are hidden for this call and restored afterwards, even on error.
    """
    if task not in taskpool_tasks(taskpool):
        raise KeyError(f"the task pool has no test set '{task}'; it has {taskpool_tasks(taskpool)}")
    if not getattr(taskpool, "_is_setup", False):
        taskpool.setup()
    loaders = taskpool.test_dataloaders
    taskpool.test_dataloaders = {task: loaders[task]}
    try:
        report = taskpool.evaluate(model)
    finally:
        taskpool.test_dataloaders = loaders
    if task not in report:
        raise RuntimeError(f"the task pool's report has no entry for task '{task}': {list(report)}")
    return dict(report[task])


def normalized_accuracy(accuracy: float, finetuned_accuracy: Optional[float]) -> Optional[float]:
    """``accuracy / finetuned_accuracy`` (the paper's normalized accuracy); None if undefined."""
    if finetuned_accuracy is None or finetuned_accuracy <= 0:
        return None
    return accuracy / finetuned_accuracy
