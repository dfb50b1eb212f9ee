"""What TSV-M, TSV-C and STI share: pool coercion, the compute device, the opening sequence, ranks, the
output directory, a thread-safe profiler callback and the shape log.

The opening sequence (:meth:`TSVAlgorithmBase.open_pool`): check the pool, load the pretrained model,
copy it when the pool holds the caller's own instance, take its state dict, refuse NaN/Inf, split the
parameters into decomposed matrices and the rest (``exclude_keys``), and compute every matrix's
per-task rank (:meth:`TSVAlgorithmBase.layer_ranks`, which a method may override) and, with rank revealing,
every matrix's θ̄ (RMS of θ₀[key], the storage-noise floor's scale). :func:`rank_report` counts the singular
triplets rank revealing dropped, per matrix and by shape.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Union

import lightning as L
import torch
from torch import Tensor, nn

from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin

from ..functional import compute_dtype, layer_rank, rank_options, weight_rms
from ..io.atomic import write_atomic
from ..io.keys import check_finite, split_keys, state_dict_of
from ..io.modelpool import (as_modelpool, check_taskpool_paths, finetuned_model_names, load_pretrained_model,
                            pool_input_paths)
from ..io.outputs import output_dir
from ..io.streaming import stored_dtype
from .summary import RunSummary

log = logging.getLogger(__name__)

__all__ = ["Opening", "TSVAlgorithmBase", "log_rank_report", "rank_report", "task_update"]


@dataclass
class Opening:
    """The state every method starts from (:meth:`TSVAlgorithmBase.open_pool`)."""

    modelpool: BaseModelPool
    names: List[str]  # the fine-tuned models, in pool order
    pretrained: nn.Module  # never the caller's own instance
    base: Dict[str, Tensor]  # θ₀: the pretrained model's state dict (shares its storage)
    matrix_keys: List[str]  # floating 2-D parameters that are decomposed
    other_keys: List[str]  # the other floating parameters
    ranks: Dict[str, Optional[int]]  # per-task rank of every matrix (None: chosen per task, e.g. by energy)
    device: torch.device  # where the linear algebra runs
    theta_rms: Optional[Dict[str, float]] = None  # θ̄ of every matrix with rank revealing; None: plain top-k

    @property
    def num_tasks(self) -> int:
        return len(self.names)


class TSVAlgorithmBase(SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """The base of the three algorithms; a subclass sets :attr:`method_name` and :attr:`output_name` and
    has the options ``rank``, ``exclude_keys``, ``device``, ``save_path``, ``allow_missing_keys`` and
    ``rank_revealing``."""

    method_name: ClassVar[str] = "TSV"  # names the method in logs and errors
    output_name: ClassVar[str] = "output"  # the directory ``save_path='{log_dir}'`` means inside the log dir
    default_save_path: ClassVar[Optional[str]] = None  # where outputs go without ``save_path``
    evaluated: ClassVar[bool] = True  # whether the program's task pool evaluates what ``run`` returns

    @property
    def fabric(self) -> L.Fabric:
        """The program's Fabric; from Python, FusionBench's default (one device, launched) without its warning
        that there is no fabric configuration."""
        if self._fabric_instance is None:
            self._fabric_instance = L.Fabric(devices=1)
            self._fabric_instance.launch()
        return self._fabric_instance

    @fabric.setter
    def fabric(self, instance: L.Fabric) -> None:
        self._fabric_instance = instance

    def start_run(self) -> None:
        """Start the clock of the run's summary."""
        self._started = time.perf_counter()

    def finish_run(self, title: str, options: Mapping[str, Any], *, outputs: Optional[Mapping[str, Any]] = None,
                   results: Optional[Mapping[str, str]] = None, scalars: Optional[Mapping[str, float]] = None,
                   report: Optional[Mapping[str, Any]] = None) -> None:
        """The profiler's table (with ``print_profile``) and the run's summary (:class:`~.summary.RunSummary`:
        printed now from Python, at the end of the job in the CLI). ``outputs``: label -> path (None: left out)."""
        if self.print_profile:
            self.print_profile_summary(title)
        RunSummary(self.method_name, dict(options), time.perf_counter() - getattr(self, "_started", time.perf_counter()),
                   self.log_dir, {k: os.path.abspath(v) for k, v in (outputs or {}).items() if v is not None},
                   dict(results or {}),
                   dict(scalars or {}), report, self.fabric).finish()

    def k_option(self, ranks: Mapping[str, Optional[int]]) -> str:
        """The per-task rank k of the summary: the values ``ranks`` holds (e.g. ``8``, or ``2-8`` where small
        matrices get a smaller k), and the ``rank`` option or the rule floor(min(m, n) / T) they come from."""
        values = sorted({k for k in ranks.values() if k is not None})
        shown = "-" if not values else str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
        return f"{shown} per task ({'option rank' if self.rank is not None else 'floor(min(m, n) / T)'})"

    def explain_program_save_line(self) -> None:
        """After writing ``method.save_path`` in a CLI run: log that FusionBench's program line 'No save path
        specified for the merged model. Skipping saving.', printed after ``run`` returns, is about its own
        ``merged_model_save_path`` only (it prints it for whatever ``run`` returns, TSV-C's report included)."""
        program = getattr(self, "_program", None)
        if program is not None and getattr(program, "merged_model_save_path", None) is None:
            log.info(f"{self.method_name}: saved by method.save_path; FusionBench's own merged_model_save_path is not "
                     "set, so its program's line after the run ('No save path specified ... Skipping saving.') is "
                     "about that option only")

    def compute_device(self) -> torch.device:
        """The ``device`` option, or the Fabric device (a GPU when there is one)."""
        return torch.device(self.device) if self.device is not None else self.fabric.device

    def coerce_pool(self, modelpool: Union[BaseModelPool, Mapping[str, nn.Module]]) -> BaseModelPool:
        """``modelpool`` as a checked FusionBench pool (:func:`~fusion_bench_tsv.io.modelpool.as_modelpool`);
        its local paths are the inputs :meth:`output_path` never replaces. The program's task pool, when the
        method's result is evaluated, is checked for local paths that do not exist (an unbuilt offline
        benchmark) before anything is computed."""
        modelpool = as_modelpool(modelpool, self.method_name)
        taskpool = getattr(getattr(self, "_program", None), "taskpool", None)
        if taskpool is not None and self.evaluated:
            check_taskpool_paths(taskpool, f"{self.method_name}: the program's taskpool")
        self._inputs, self._output = pool_input_paths(modelpool), None
        return modelpool

    def layer_ranks(self, base: Mapping[str, Tensor], keys: List[str], num_tasks: int) -> Dict[str, Optional[int]]:
        """The per-task rank k of every matrix of ``keys`` (option ``rank``, or floor(r / T)), checked against its shape."""
        return {key: layer_rank(base[key].shape, num_tasks, rank=self.rank, name=key) for key in keys}

    def open_pool(self, modelpool: BaseModelPool, purpose: str, minimum: int = 1) -> Opening:
        """The opening sequence (see the module's docstring) on a pool already coerced by :meth:`coerce_pool`."""
        names = finetuned_model_names(modelpool, purpose, minimum)
        with self.profile("load pretrained"):
            pretrained = load_pretrained_model(modelpool, self.allow_missing_keys)
            # a pool of in-memory models hands out the caller's own instance: never write into or return it
            if modelpool.has_instance_models:
                pretrained = deepcopy(pretrained)
        base = state_dict_of(pretrained)
        check_finite(base, "_pretrained_")
        matrix_keys, other_keys = split_keys(base, list(self.exclude_keys or []))
        ranks = self.layer_ranks(base, matrix_keys, len(names))
        theta_rms = {key: weight_rms(base[key]) for key in matrix_keys} if self.rank_revealing else None
        opening = Opening(modelpool, names, pretrained, base, matrix_keys, other_keys, ranks, self.compute_device(),
                          theta_rms)
        self.log_shapes(opening)
        return opening

    def log_shapes(self, opening: Opening) -> None:
        """Log, in one line, how many matrices of each shape there are and their rank k per task."""
        base, t = opening.base, opening.num_tasks
        counts = Counter((tuple(base[key].shape), opening.ranks[key]) for key in opening.matrix_keys)
        shares = [f"{count} × {shape}: " + ("chosen per task" if k is None else f"{k} ({t * k} of rank {min(shape)})")
                  for (shape, k), count in sorted(counts.items(), key=str)]
        log.info(f"{self.method_name}: k per task of the matrices: {'; '.join(shares)}")

    def output_path(self) -> Optional[Path]:
        """The directory ``save_path`` names (``{log_dir}`` alone: ``<log_dir>/<output_name>``), None when
        nothing is to be written; checked once per run, against the pool's inputs, by
        :func:`~fusion_bench_tsv.io.outputs.output_dir`."""
        save_path = self.save_path if self.save_path is not None else self.default_save_path
        if save_path is None or (self.save_path is None and self.log_dir is None):
            return None
        if getattr(self, "_output", None) is None:
            self._output = output_dir(save_path, self.log_dir, self.output_name, self.method_name,
                                      inputs=getattr(self, "_inputs", ()))
        return self._output

    def save_rank_report(self, report: Mapping[str, Any], file_name: str) -> Optional[Path]:
        """Log :func:`rank_report`'s summary and write the report as ``file_name`` in the log dir, atomically
        (nothing is written without a log dir); the path written, or None."""
        log_rank_report(self.method_name, report)
        if self.log_dir is None:
            return None
        return write_atomic(Path(self.log_dir) / file_name, lambda p: p.write_text(json.dumps(report, indent=1)))

    def record_time(self, action: str, seconds: float) -> None:
        """Add ``seconds`` to the profiler's ``action`` from any thread (times of concurrent jobs add up)."""
        with _PROFILER_LOCK:
            self.profiler.recorded_durations[action].append(seconds)


_PROFILER_LOCK = threading.Lock()


def task_update(state: Mapping[str, Tensor], base: Mapping[str, Tensor], key: str, device: torch.device,
                theta_rms: Optional[Mapping[str, float]]) -> tuple[Tensor, Dict[str, Any]]:
    """``Δ = θᵢ[key] − θ₀[key]`` in the compute dtype on ``device``, and the keywords of its top-k: rank revealing
    with the storage floor of the coarser of θ₀'s and the checkpoint's dtype (:func:`~..functional.rank_options`),
    or the plain top-k when ``theta_rms`` is None."""
    work = compute_dtype(base[key].dtype)
    options = rank_options(None if theta_rms is None else theta_rms[key], (base[key].dtype, stored_dtype(state, key)))
    return state[key].to(device, work) - base[key].to(device, work), options


def rank_report(
    names: Sequence[str],
    shapes: Mapping[str, Sequence[int]],
    ranks: Mapping[str, Optional[int]],
    kept: Mapping[str, Sequence[int]],
    rank_revealing: bool,
) -> Dict[str, Any]:
    """How many singular triplets each task kept of every matrix of ``kept`` (plain values, for a JSON file).

    ``layers``: per matrix its shape, k (None: chosen per task), the kept counts kᵢ of the tasks ``names``
    and the dropped ones Σᵢ(k − kᵢ); ``by_shape``: the same summed over the matrices of one shape and k;
    ``totals``: over all matrices."""
    layers: Dict[str, Dict[str, Any]] = {}
    groups: Dict[tuple, Dict[str, Any]] = {}
    for key, counts in kept.items():
        shape, k, counts = [int(d) for d in shapes[key]], ranks[key], [int(c) for c in counts]
        dropped = None if k is None else sum(k - c for c in counts)
        layers[key] = {"shape": shape, "k": k, "kept": counts, "dropped": dropped}
        group = groups.setdefault((tuple(shape), k), {"shape": shape, "k": k, "matrices": 0, "rank_deficient": 0,
                                                      "kept_min": min(counts), "kept_max": max(counts),
                                                      "kept": 0, "dropped": None if k is None else 0})
        group["matrices"] += 1
        group["rank_deficient"] += int(bool(dropped))
        group["kept_min"], group["kept_max"] = min(group["kept_min"], *counts), max(group["kept_max"], *counts)
        group["kept"] += sum(counts)
        if k is not None:
            group["dropped"] += dropped
    by_shape = [groups[g] for g in sorted(groups, key=str)]
    return {
        "rank_revealing": rank_revealing,
        "tasks": list(names),
        "kept_counts": "per matrix and task, the singular triplets of the update the method kept (at most the "
                       "numerical rank with rank revealing, else k; TSV-M counts those with sigma != 0 that entered "
                       "the merge, TSV-C those stored); dropped = sum over tasks of k - kept",
        "totals": {"matrices": len(layers), "kept": sum(g["kept"] for g in by_shape),
                   "dropped": sum(g["dropped"] or 0 for g in by_shape)},
        "by_shape": by_shape,
        "layers": layers,
    }


def log_rank_report(method_name: str, report: Mapping[str, Any]) -> None:
    """The total, after one log line per shape and k of :func:`rank_report` where triplets were dropped or k was
    chosen per task, e.g. ``TSV-M: 4 matrices of shape (64, 64), k=8: kept 4/8 per task on 8 tasks (128 dropped;
    4 rank-deficient)``; every matrix's counts are in the report's file."""
    t = len(report["tasks"])
    for g in report["by_shape"]:
        if g["k"] is not None and not g["dropped"]:
            continue
        lo, hi = g["kept_min"], g["kept_max"]
        span = str(lo) if lo == hi else f"{lo}-{hi}"
        if g["k"] is None:
            choice = f"k chosen per task: kept {span}"
        else:
            choice = f"k={g['k']}: kept {span}/{g['k']}"
        dropped = "" if g["dropped"] is None else f" ({g['dropped']} dropped; {g['rank_deficient']} rank-deficient)"
        log.info(f"{method_name}: {g['matrices']} matrices of shape {tuple(g['shape'])}, {choice} per task on "
                 f"{t} tasks{dropped}")
    totals = report["totals"]
    log.info(f"{method_name}: rank revealing {'on' if report['rank_revealing'] else 'off'}: {totals['kept']} "
             f"singular triplets kept, {totals['dropped']} dropped, over {totals['matrices']} matrices and {t} tasks")
