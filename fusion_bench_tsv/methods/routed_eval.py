"""Routed (oracle) evaluation through FusionBench's own task pools: one model on one task.

FusionBench's program evaluates every returned model on every task of the task pool (T × T). TSV-C
evaluates task i's model on task i only, as the paper does (task identity known at test time). The
task pools that evaluate per-task test sets, ``CLIPVisionModelTaskPool`` (Hugging Face CLIP) and
``OpenCLIPVisionModelTaskPool`` (open_clip), both build them in their public ``setup()`` as the public
mapping ``test_dataloaders`` and loop over it in ``evaluate`` (FusionBench 0.2.33 and main); neither has a
public way to evaluate one task or to list the tasks before ``setup()``. :func:`evaluate_on_task` sets
``test_dataloaders`` to the one task for the duration of one call, so the task pool's own classifier heads,
metrics and reports are used unchanged; only public attributes and methods of the task pool are used.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence

from torch import nn
from tqdm.auto import tqdm

from ..io.atomic import write_atomic
from ..io.compressed_checkpoint import CompressedTask, build_task_model
from ..io.modelpool import load_model

log = logging.getLogger(__name__)

__all__ = [
    "REPORT_FILE",
    "evaluate_on_task",
    "normalized_accuracy",
    "program_report",
    "routed_evaluation",
    "supports_routing",
    "taskpool_tasks",
    "write_report",
]

REPORT_FILE = "tsv_compress_report.json"
#: the task pool's own report of every routed evaluation, ``<model>-<task>.json`` (e.g. ``tsv_c-shapes.json``), in the log dir
TASKPOOL_REPORTS_DIR = "routed_eval"


def _routable_classes() -> tuple:
    """FusionBench's task pools whose ``setup()`` builds per-task ``test_dataloaders`` that ``evaluate`` loops
    over (the OpenCLIP one only where open_clip imports)."""
    from fusion_bench.taskpool import CLIPVisionModelTaskPool

    try:
        from fusion_bench.taskpool import OpenCLIPVisionModelTaskPool
    except ImportError:
        return (CLIPVisionModelTaskPool,)
    return CLIPVisionModelTaskPool, OpenCLIPVisionModelTaskPool


def supports_routing(taskpool) -> bool:
    """Whether ``taskpool`` has per-task test sets that :func:`evaluate_on_task` can restrict: one of
    :func:`_routable_classes` (or a subclass), or a task pool already holding a ``test_dataloaders`` mapping."""
    if taskpool is None:
        return False
    return isinstance(taskpool, _routable_classes()) or isinstance(getattr(taskpool, "test_dataloaders", None), Mapping)


def taskpool_tasks(taskpool) -> List[str]:
    """The names of the task pool's test sets (``setup()`` first, if it was not called yet)."""
    if not supports_routing(taskpool):
        raise TypeError(
            f"routed evaluation needs a task pool with per-task test sets (CLIPVisionModelTaskPool, "
            f"OpenCLIPVisionModelTaskPool), got {type(taskpool).__name__}"
        )
    if not isinstance(getattr(taskpool, "test_dataloaders", None), Mapping):
        taskpool.setup()
    return list(taskpool.test_dataloaders)


def evaluate_on_task(taskpool, model: nn.Module, task: str, label: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate ``model`` on the test set of ``task`` only, with ``taskpool.evaluate``; its result for ``task``.

    The task pool's other test sets are hidden for this call and restored afterwards, even on error. The report
    file the task pool writes into the log dir (``report.json``, ``report_1.json``, … when it has a logger) is
    moved to ``routed_eval/<label>-<task>.json`` there (``label``: the model, e.g. ``tsv_c``; None: left as is).
    """
    available = taskpool_tasks(taskpool)  # sets the task pool up if needed
    if task not in available:
        raise KeyError(f"the task pool has no test set '{task}'; it has {available}")
    loaders = taskpool.test_dataloaders
    taskpool.test_dataloaders = {task: loaders[task]}
    log_dir = getattr(taskpool, "log_dir", None) if label is not None else None
    before = _taskpool_reports(log_dir)
    try:
        report = taskpool.evaluate(model)
    finally:
        taskpool.test_dataloaders = loaders
    new = sorted(set(_taskpool_reports(log_dir)) - set(before))
    if new:
        os.makedirs(os.path.join(log_dir, TASKPOOL_REPORTS_DIR), exist_ok=True)
        os.replace(os.path.join(log_dir, new[-1]), os.path.join(log_dir, TASKPOOL_REPORTS_DIR, f"{label}-{task}.json"))
    if task not in report:
        raise RuntimeError(f"the task pool's report has no entry for task '{task}': {list(report)}")
    return dict(report[task])


def _taskpool_reports(log_dir: Optional[str]) -> List[str]:
    """The names of the report files FusionBench's task pools write into ``log_dir`` (``report*.json``)."""
    if log_dir is None or not os.path.isdir(log_dir):
        return []
    return [n for n in os.listdir(log_dir) if n.startswith("report") and n.endswith(".json")]


def normalized_accuracy(accuracy: float, finetuned_accuracy: Optional[float]) -> Optional[float]:
    """``accuracy / finetuned_accuracy`` (the paper's normalized accuracy); None if undefined."""
    if finetuned_accuracy is None or finetuned_accuracy <= 0:
        return None
    return accuracy / finetuned_accuracy


# over ~60 lines only by its docstring (one line per argument)
def routed_evaluation(
    taskpool,
    modelpool,
    pretrained: nn.Module,
    tasks: Sequence[CompressedTask],
    *,
    evaluate_finetuned: bool = True,
    allow_missing_keys: bool = False,
    profile: Callable[[str], ContextManager] = lambda action: nullcontext(),
    show_pbar: bool = True,
) -> Dict[str, Any]:
    """Evaluate each task's compressed model (and, with ``evaluate_finetuned``, its fine-tuned model from
    ``modelpool``) on its own test set only; the report (plain values) with per-task entries and averages.

    Args:
        taskpool: a task pool with per-task test sets (:func:`supports_routing`).
        modelpool: the pool the fine-tuned models are loaded from.
        pretrained: θ₀, the base of every compressed model.
        tasks: the compressed tasks.
        evaluate_finetuned: also evaluate each fine-tuned model, for the normalized accuracy.
        allow_missing_keys: passed to :func:`~fusion_bench_tsv.io.modelpool.load_model`.
        profile: a context-manager factory timing ``"rebuild model"``, ``"load model"``, ``"evaluate"``.
        show_pbar: progress bar over the tasks.
    """
    available = taskpool_tasks(taskpool)
    names = [t.name for t in tasks]
    skipped = [n for n in names if n not in available]
    unmatched = [n for n in available if n not in names]
    if skipped:
        log.warning(f"TSV-C: no test set for tasks {skipped}: they are not evaluated")
    if unmatched:
        log.warning(f"TSV-C: test sets {unmatched} have no fine-tuned model: they are not evaluated")
    if len(skipped) == len(names):
        raise ValueError(f"none of the modelpool's tasks {names} has a test set in the task pool ({available})")

    evaluations: List[Dict[str, str]] = []
    per_task: Dict[str, Dict[str, Any]] = {}
    for task in tqdm([t for t in tasks if t.name in available], desc="TSV-C: routed evaluation", disable=not show_pbar):
        with profile("rebuild model"):
            model = build_task_model(pretrained, task)
        with profile("evaluate"):
            result = evaluate_on_task(taskpool, model, task.name, "tsv_c")
        evaluations.append({"model": f"tsv_c:{task.name}", "task": task.name})
        del model
        entry = {"accuracy": result.get("accuracy"), "loss": result.get("loss")}
        if evaluate_finetuned:
            with profile("load model"):
                finetuned = load_model(modelpool, task.name, allow_missing_keys)
            with profile("evaluate"):
                ft = evaluate_on_task(taskpool, finetuned, task.name, "finetuned")
            evaluations.append({"model": f"finetuned:{task.name}", "task": task.name})
            del finetuned
            entry["finetuned_accuracy"] = ft.get("accuracy")
            entry["normalized_accuracy"] = normalized_accuracy(entry["accuracy"], ft.get("accuracy"))
        per_task[task.name] = entry
    return {
        "method": "TSV-C",
        "routing": "oracle: each task's model is evaluated on its own task only",
        "tasks": per_task,
        "average": _average(per_task),
        "not_evaluated": skipped,
        "evaluations": evaluations,
    }


def _average(per_task: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """The mean of each metric that every task has."""
    out = {}
    for metric in ("accuracy", "loss", "finetuned_accuracy", "normalized_accuracy"):
        values = [e[metric] for e in per_task.values() if e.get(metric) is not None]
        if values and len(values) == len(per_task):
            out[metric] = sum(values) / len(values)
    return out


def write_report(log_dir: Optional[str], report: Mapping[str, Any]) -> Optional[str]:
    """Write the report (full precision) as :data:`REPORT_FILE` in ``log_dir``, atomically; its path, or
    None without a log dir."""
    if log_dir is None:
        return None
    path = write_atomic(os.path.join(log_dir, REPORT_FILE), lambda p: p.write_text(json.dumps(report, indent=1)))
    return str(path)


def program_report(report: Mapping[str, Any], path: Optional[str]) -> Dict[str, Any]:
    """What TSV-C returns to FusionBench's program, which prints it and saves it as ``program_report.json``: the
    shape of a task pool's report (``{task: {accuracy, …}}``, ``average``), routed, plus the method and the full
    report's path. The per-layer ranks, the storage and the evaluations list stay in the full report."""
    out: Dict[str, Any] = {"method": report["method"], "routing": "oracle"}
    for task, entry in report["tasks"].items():
        out[task] = {k: v for k, v in entry.items() if v is not None}
    out["average"] = dict(report["average"])
    if path is not None:
        out["full_report"] = os.path.abspath(path)
    return out
