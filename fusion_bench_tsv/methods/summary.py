"""The short summary every run ends with: method, the options that matter, average accuracy, time, outputs.

From Python, :meth:`RunSummary.finish` prints the method's summary when ``run`` returns (no accuracy: nothing
was evaluated yet). In the ``fusion_bench`` CLI, FusionBench's program evaluates the returned model after
``run`` returns, so the summary is deferred to the end of the Hydra job: every method config includes
``config/tsv/cli.yaml``, which registers :class:`RunSummaryCallback` (a Hydra callback, ``hydra.callbacks``).
Its ``on_job_end`` reads the program's report (``program_report.json``; not a file that was already there,
unchanged, when the job started: an earlier run's report at a fixed ``report_save_path``), logs the accuracies as TensorBoard
scalars through the method's Fabric logger, and prints the summary: the last lines of a successful run. A
failed job prints nothing here, so its error stays the last thing printed.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["RunSummary", "RunSummaryCallback", "averages", "task_accuracies", "task_entries"]

#: summaries of the current CLI job, printed at its end by :class:`RunSummaryCallback`
_PENDING: List["RunSummary"] = []
_IN_CLI_JOB = [False]


def task_entries(report: Mapping[str, Any]) -> Mapping[str, Any]:
    """``{task: entry}`` of a report: TSV-C's full report (``tsv_compress_report.json``) nests them under ``tasks``;
    a task pool's report and TSV-C's ``program_report.json`` hold them at the top level, beside ``average``."""
    if isinstance(report.get("tasks"), Mapping) and "routing" in report:
        return report["tasks"]
    return {task: entry for task, entry in report.items() if task != "average" and isinstance(entry, Mapping)}


def task_accuracies(report: Mapping[str, Any]) -> Dict[str, float]:
    """``{task: accuracy}`` (a fraction) of a FusionBench task pool report (``taskpool.evaluate``: ``{task:
    {"accuracy": …}}``, plus ``average`` and ``model_info``) or of TSV-C's reports."""
    return {task: float(entry["accuracy"]) for task, entry in task_entries(report).items()
            if isinstance(entry, Mapping) and isinstance(entry.get("accuracy"), numbers.Real)}


def averages(report: Mapping[str, Any]) -> Dict[str, float]:
    """``average_accuracy`` and ``normalized_accuracy`` of the report's ``average`` entry (FusionBench's mean over
    tasks; the normalized one where fine-tuned accuracies are known), those it has."""
    average = report.get("average")
    average = average if isinstance(average, Mapping) else {}
    return {f"{name}_accuracy": float(average[key]) for name, key in (("average", "accuracy"),
                                                                     ("normalized", "normalized_accuracy"))
            if average.get(key) is not None}


@dataclass
class RunSummary:
    """What a run did, in a few lines; ``scalars`` also go to TensorBoard (``<method>/<name>``)."""

    method: str  # e.g. "TSV-M"
    options: Dict[str, Any]  # the options that matter, as shown
    seconds: float  # the method's own time (``run``)
    log_dir: Optional[str] = None
    outputs: Dict[str, str] = field(default_factory=dict)  # label -> path
    results: Dict[str, str] = field(default_factory=dict)  # label -> value, already formatted
    scalars: Dict[str, float] = field(default_factory=dict)
    report: Optional[Mapping[str, Any]] = None  # the method's own evaluation (TSV-C's routed one), if any
    fabric: Any = None

    def lines(self, report: Optional[Mapping[str, Any]] = None) -> List[str]:
        """The summary; with the program's ``report``, its average accuracy first (and the normalized one when
        the report has the fine-tuned accuracies: the mean over tasks of accuracy / fine-tuned accuracy)."""
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        lines = [f"{self.method} summary: {options}"]
        results = dict(self.results)
        report = report if report is not None else self.report
        if report is not None:
            values, tasks = averages(report), task_accuracies(report)
            first = {}
            if "average_accuracy" in values:
                first["average accuracy"] = (f"{100 * values['average_accuracy']:.2f}% over {len(tasks)} "
                                             f"task{'s' * (len(tasks) != 1)}")
            if "normalized_accuracy" in values:
                first["normalized accuracy"] = (f"{100 * values['normalized_accuracy']:.2f}% (mean over tasks of "
                                                "acc / fine-tuned acc)")
            results = {**first, **results}
        lines += [f"  {label}: {value}" for label, value in results.items()]
        lines.append(f"  time: {self.seconds:.1f} s ({self.method}'s run)")
        outputs = dict(self.outputs)
        if self.log_dir is not None:
            outputs = {"run directory": os.path.abspath(self.log_dir), **outputs}
        lines += [f"  {label}: {path}" for label, path in outputs.items()]
        return lines

    def log_scalars(self, report: Optional[Mapping[str, Any]] = None) -> None:
        """The scalars, and the report's average and per-task accuracies, to the Fabric loggers (TensorBoard)."""
        if self.fabric is None or not self.fabric.loggers:
            return
        prefix = self.method.lower().replace("-", "_")
        values = {f"{prefix}/{k}": v for k, v in self.scalars.items()}
        report = report if report is not None else self.report
        if report is not None:
            values.update({f"{prefix}/{name}": value for name, value in averages(report).items()})
            values.update({f"{prefix}/accuracy/{task}": acc for task, acc in task_accuracies(report).items()})
        if values:
            self.fabric.log_dict(values, step=0)
        for logger in self.fabric.loggers:
            logger.save()

    def finish(self) -> None:
        """End of ``run``: print now (Python), or leave it for :class:`RunSummaryCallback` (CLI)."""
        if _IN_CLI_JOB[0]:
            _PENDING.append(self)
            return
        self.log_scalars()
        print("\n".join(self.lines()), flush=True)


class RunSummaryCallback(Callback):
    """Hydra callback of the ``fusion_bench`` CLI (``config/tsv/cli.yaml``): prints the run's summary with the
    program's evaluation as the job's last lines, and logs the accuracies to TensorBoard.

    ``print_function_call``: whether FusionBench prints its "Instantiate by calling" box for every object it
    builds (the program, Fabric, the pools, the method, each dataset), set for the job through FusionBench's
    :func:`~fusion_bench.utils.instantiate_utils.set_print_function_call_permeanent`. FusionBench's own
    ``print_function_call=false`` has no effect in 0.2.33: the program assigns it to ``RuntimeConstants``'
    class, replacing the property whose setter calls a context manager without entering it.
    """

    def __init__(self, print_function_call: bool = False):
        self.print_function_call = print_function_call
        self._previous: Optional[bool] = None
        self._before: Optional[tuple] = None  # (report path, its stat) at the job's start

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from fusion_bench.utils import instantiate_utils

        _IN_CLI_JOB[0] = True
        _PENDING.clear()
        self._previous = instantiate_utils.PRINT_FUNCTION_CALL
        instantiate_utils.set_print_function_call_permeanent(self.print_function_call)
        try:  # a report_save_path that already holds a file (an earlier run's): not this run's report
            log_dir = OmegaConf.select(config, "path.log_dir", default=None)
        except Exception:  # an interpolation that does not resolve here: the log dir is named later
            log_dir = None
        path = _report_path(config.get("report_save_path"), log_dir)
        self._before = (path, _stat(path)) if path is not None else None

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from fusion_bench.utils import instantiate_utils

        _IN_CLI_JOB[0] = False
        if self._previous is not None:
            instantiate_utils.set_print_function_call_permeanent(self._previous)
        summaries = list(_PENDING)
        _PENDING.clear()
        if job_return.status != JobStatus.COMPLETED:
            return  # the error is the last thing printed
        for summary in summaries:
            path = _report_path(config.get("report_save_path"), summary.log_dir)
            stale = self._before is not None and self._before[1] is not None and self._before == (path, _stat(path))
            report = None if path is None or stale else _program_report(path)
            summary.log_scalars(report)
            print("\n".join(summary.lines(report)), flush=True)


def _report_path(report_save_path: Optional[str], log_dir: Optional[str]) -> Optional[str]:
    """The program's report file (``report_save_path``, ``{log_dir}`` filled in as FusionBench's program does),
    or None when there is none."""
    if not report_save_path or ("{log_dir}" in report_save_path and log_dir is None):
        return None
    return report_save_path.format(log_dir=log_dir) if "{log_dir}" in report_save_path else report_save_path


def _stat(path: str) -> Optional[tuple]:
    """(inode, size, modification time in ns) of ``path``, or None when there is no such file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _program_report(path: str) -> Optional[Dict[str, Any]]:
    """The program's saved report at ``path``, or None when it cannot be read as a JSON object."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None
