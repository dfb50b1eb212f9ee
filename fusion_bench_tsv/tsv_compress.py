R"""
Task Singular Vector Compression (TSV-C) as a FusionBench algorithm, with routed evaluation.

Every weight matrix's task update ``Δᵢ = θᵢ − θ₀`` is replaced by its top-k singular triplets (the
best rank-k approximation); every other parameter is kept as the fine-tuned model has it. Task i is
then served by ``θ₀ + Δ̂ᵢ`` and evaluated on task i only (oracle routing), as in Gargiulo et al.,
"Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025 (arXiv:2412.00081),
where k = floor(r / T) keeps ≥ 99 % of the fine-tuned accuracy at about two models' worth of storage.

Fine-tuned models are loaded one at a time; only their factors (and non-matrix parameters) are kept.

Example (8 CLIP ViT-B/32 tasks, routed evaluation, compressed checkpoint in the run's log dir)::

    fusion_bench \
        method=tsv/tsv_compress \
        "method.save_path='{log_dir}/tsv_c'" \
        modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only \
        taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8

With a task pool that has per-task test sets (HF CLIP or OpenCLIP), ``run`` evaluates each task's
compressed model on its own task (and, with ``evaluate_finetuned``, the fine-tuned model too), writes
``tsv_compress_report.json`` in the log dir and returns that report (a dict of plain values, no models),
which the program saves as ``program_report.json`` without evaluating anything again. Otherwise, or with
``routed_eval=false``, it returns ``{task: θ₀ + Δ̂ᵢ}`` like FusionBench's ``return_single_task_models``
(the program would then evaluate every model on every task).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from copy import deepcopy
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin, auto_register_config

from .compressed_checkpoint import CompressedTask, build_task_model, save_compressed, storage_accounting
from .functional import check_rank_options, compress_matrix, compute_dtype, layer_rank
from .routed_eval import evaluate_on_task, format_summary, normalized_accuracy, supports_routing, taskpool_tasks
from .atomic import write_atomic
from .options import float_dtype, validate_options
from .outputs import output_dir
from .parallel import bounded_threads
from .streaming import (
    as_modelpool,
    check_finite,
    DEFAULT_EXCLUDE_KEYS,
    finetuned_model_names,
    iter_finetuned_states,
    load_model,
    load_pretrained_model,
    split_keys,
    state_dict_of,
)

log = logging.getLogger(__name__)

__all__ = ["TSVCompressAlgorithm"]

REPORT_FILE = "tsv_compress_report.json"


@auto_register_config
class TSVCompressAlgorithm(SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """Task Singular Vector Compression, streaming the modelpool one fine-tuned model at a time.

    Args:
        fraction: per-task rank k = max(1, floor(fraction · min(m, n))), fraction in (0, 1].
        rank: a fixed per-task rank k for every matrix (at most min(m, n) of each).
        energy: per task and layer, the smallest k keeping this share in (0, 1] of Σσ².
            At most one of ``fraction``, ``rank``, ``energy``; none gives the reference's
            k = floor(min(m, n) / T), at least 1.
        exclude_keys: glob patterns of 2-D parameters that are stored in full instead of compressed.
        save_path: directory for the compressed checkpoint (``{log_dir}`` is replaced by the run's log
            dir; the log dir itself means ``<log_dir>/tsv_c``); ``None`` saves nothing. An existing path is
            replaced only when it is an empty directory or one this package wrote; anything else is refused
            before the compression starts.
        factor_dtype: dtype of the stored factors (e.g. ``float16``); ``None`` is each matrix's own dtype.
        routed_eval: evaluate each task's model on its own task through the program's task pool.
        evaluate_finetuned: in routed evaluation, also evaluate each fine-tuned model on its task, for the
            normalized accuracy.
        device: where the SVDs run; ``None`` is the Fabric device (a GPU when there is one).
        show_pbar: show progress bars over models and layers.
        allow_missing_keys: accept a checkpoint (fine-tuned or pretrained) that lacks parameters of the
            model it is loaded into; ``from_pretrained`` fills them with random values. ``False`` (default)
            refuses it with an error naming the model and the keys.
    """

    def __init__(
        self,
        fraction: Optional[float] = None,
        rank: Optional[int] = None,
        energy: Optional[float] = None,
        exclude_keys: Optional[Sequence[str]] = DEFAULT_EXCLUDE_KEYS,
        save_path: Optional[str] = None,
        factor_dtype: Optional[str] = None,
        routed_eval: bool = True,
        evaluate_finetuned: bool = True,
        device: Optional[str] = None,
        show_pbar: bool = True,
        allow_missing_keys: bool = False,
        **kwargs,
    ):
        super().__init__(**validate_options(self, kwargs))
        check_rank_options(fraction=self.fraction, rank=self.rank, energy=self.energy)
        self.evaluations: List[Dict[str, str]] = []

    # ------------------------------------------------------------------ compression
    def _factor_dtype(self) -> Optional[torch.dtype]:
        return float_dtype(self.factor_dtype) if self.factor_dtype is not None else None

    def _device(self) -> torch.device:
        return torch.device(self.device) if self.device is not None else self.fabric.device

    def rank_choice(self, num_tasks: int) -> Dict[str, Any]:
        if self.energy is not None:
            return {"mode": "energy", "energy": self.energy}
        if self.rank is not None:
            return {"mode": "rank", "rank": self.rank}
        if self.fraction is not None:
            return {"mode": "fraction", "fraction": self.fraction}
        return {"mode": "default", "fraction": f"1/{num_tasks}", "rule": "floor(min(m, n) / T), at least 1"}

    @torch.no_grad()
    def compress(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]):
        """Compress every fine-tuned model of ``modelpool``.

        Returns ``(pretrained_model, tasks, storage)``: the pretrained model as loaded, one
        :class:`CompressedTask` per fine-tuned model (factors on the CPU, in the storage dtype) and the
        storage accounting.
        """
        modelpool = as_modelpool(modelpool, "TSV-C")
        names = finetuned_model_names(modelpool, "compress")
        num_tasks = len(names)
        device = self._device()
        with self.profile("load pretrained"):
            pretrained = load_pretrained_model(modelpool, self.allow_missing_keys)
            if modelpool.has_instance_models:  # never hand back (or alias) the caller's own instance
                pretrained = deepcopy(pretrained)
        base = state_dict_of(pretrained)
        check_finite(base, "_pretrained_")
        matrix_keys, other_keys = split_keys(base, list(self.exclude_keys or []))
        fixed_ranks = (
            {}
            if self.energy is not None
            else {k: layer_rank(base[k].shape, num_tasks, fraction=self.fraction, rank=self.rank, name=k)
                  for k in matrix_keys}
        )
        self._log_setup(names, base, matrix_keys, other_keys, fixed_ranks, device)

        tasks: List[CompressedTask] = []
        for _, name, state in iter_finetuned_states(
            modelpool, base, desc="TSV-C: task vectors", show_pbar=self.show_pbar, profile=self.profile,
            allow_missing_keys=self.allow_missing_keys,
        ):
            task = CompressedTask(name)
            for key in tqdm(matrix_keys, desc=f"  {name}", leave=False, disable=not self.show_pbar):
                work = compute_dtype(base[key].dtype)
                store = self._factor_dtype() or base[key].dtype
                with bounded_threads(base[key].numel()):
                    delta = state[key].to(device, work) - base[key].to(device, work)
                    with self.profile("truncated svd"):
                        if self.energy is not None:
                            factors = compress_matrix(delta, energy=self.energy)
                        else:
                            factors = compress_matrix(delta, fixed_ranks[key])
                task.factors[key] = type(factors)(
                    *(f.to("cpu", store).clone(memory_format=torch.contiguous_format) for f in factors)
                )
            for key in other_keys:
                task.others[key] = state[key].detach().to("cpu").clone(memory_format=torch.contiguous_format)
            tasks.append(task)

        floating = {k: (tuple(base[k].shape), base[k].dtype) for k in matrix_keys + other_keys}
        storage = storage_accounting(floating, [t.ranks for t in tasks], self._factor_dtype())
        self._log_storage(storage)
        if self.energy is not None:
            for t in tasks:
                ks = list(t.ranks.values())
                log.info(f"TSV-C: task '{t.name}': energy {self.energy} keeps k in [{min(ks)}, {max(ks)}], mean {sum(ks) / len(ks):.1f}")
        return pretrained, tasks, storage

    # ------------------------------------------------------------------ the FusionBench entry point
    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]):
        """Compress, optionally save, then evaluate (routed) or return ``{task: θ₀ + Δ̂ᵢ}``."""
        modelpool = as_modelpool(modelpool, "TSV-C")
        # refuses a save_path in use before anything is computed; `{log_dir}` alone: <log_dir>/tsv_c
        checkpoint = None if self.save_path is None else str(output_dir(self.save_path, self.log_dir, "tsv_c", "TSV-C"))
        pretrained, tasks, storage = self.compress(modelpool)
        num_tasks = len(tasks)

        if checkpoint is not None:
            with self.profile("save checkpoint"):
                save_compressed(
                    checkpoint, tasks, state_dict_of(pretrained),
                    base_model=self._base_model_name(modelpool), rank_choice=self.rank_choice(num_tasks),
                )
            log.info(f"TSV-C: compressed checkpoint of {num_tasks} tasks written to {checkpoint}")

        taskpool = getattr(getattr(self, "_program", None), "taskpool", None)
        if self.routed_eval and supports_routing(taskpool):
            report = self.routed_evaluation(taskpool, modelpool, pretrained, tasks)
            report.update(storage=storage, rank_choice=self.rank_choice(num_tasks), checkpoint=checkpoint)
            path = self._write_report(report)
            self.print_profile_summary("TSV-C profile")
            self._print_summary(report, path)
            return report
        if self.routed_eval and taskpool is not None:
            log.warning(
                f"TSV-C: task pool {type(taskpool).__name__} has no per-task test sets: no routed evaluation; "
                "returning one model per task (the program evaluates each on every task)"
            )
        self.print_profile_summary("TSV-C profile")
        return {t.name: build_task_model(pretrained, t) for t in tasks}

    # ------------------------------------------------------------------ routed evaluation
    def routed_evaluation(self, taskpool, modelpool: BaseModelPool, pretrained: nn.Module, tasks: List[CompressedTask]):
        """Evaluate each task's compressed model (and fine-tuned model) on its own test set only."""
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

        self.evaluations = []
        per_task: Dict[str, Dict[str, Any]] = {}
        for task in tqdm(tasks, desc="TSV-C: routed evaluation", disable=not self.show_pbar):
            if task.name not in available:
                continue
            with self.profile("rebuild model"):
                model = build_task_model(pretrained, task)
            with self.profile("evaluate"):
                result = self._evaluate(taskpool, model, task.name, "tsv_c")
            del model
            entry = {"accuracy": result.get("accuracy"), "loss": result.get("loss")}
            if self.evaluate_finetuned:
                with self.profile("load model"):
                    finetuned = load_model(modelpool, task.name, self.allow_missing_keys)
                with self.profile("evaluate"):
                    ft = self._evaluate(taskpool, finetuned, task.name, "finetuned")
                del finetuned
                entry["finetuned_accuracy"] = ft.get("accuracy")
                entry["normalized_accuracy"] = normalized_accuracy(entry["accuracy"], ft.get("accuracy"))
            per_task[task.name] = entry

        report = {
            "method": "TSV-C",
            "routing": "oracle: each task's model is evaluated on its own task only",
            "tasks": per_task,
            "average": _average(per_task),
            "not_evaluated": skipped,
            "evaluations": list(self.evaluations),
        }
        return report

    def _evaluate(self, taskpool, model: nn.Module, task: str, kind: str) -> Dict[str, Any]:
        result = evaluate_on_task(taskpool, model, task)
        self.evaluations.append({"model": f"{kind}:{task}", "task": task})
        return result

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _base_model_name(modelpool: BaseModelPool) -> str:
        try:
            return modelpool.get_model_path("_pretrained_")
        except Exception:  # a pool of instances or of configs: no single path
            return "_pretrained_"

    def _write_report(self, report: Dict[str, Any]) -> Optional[str]:
        """Write the report (full precision) to the log dir; its path, or None without a log dir."""
        if self.log_dir is None:
            return None
        return str(write_atomic(os.path.join(self.log_dir, REPORT_FILE), lambda p: p.write_text(json.dumps(report, indent=1))))

    def _log_setup(self, names, base, matrix_keys, other_keys, ranks, device) -> None:
        num_tasks = len(names)
        log.info(
            f"TSV-C: T={num_tasks} tasks {names}; device={device}; rank choice {self.rank_choice(num_tasks)}; "
            f"{len(matrix_keys)} matrices compressed, {len(other_keys)} other parameters stored in full"
        )
        for (shape, k), count in sorted(Counter((tuple(base[key].shape), ranks.get(key)) for key in matrix_keys).items(),
                                        key=str):
            log.info(f"TSV-C: {count} matrices of shape {shape}: k={k if k is not None else 'by energy'} per task")

    @staticmethod
    def _log_storage(storage: Dict[str, Any]) -> None:
        s, f, m = storage["stored"], storage["full_task_vectors"], storage["one_model"]
        log.info(
            f"TSV-C storage, T={storage['num_tasks']}: stored {s['params']:,} params / {s['bytes']:,} bytes "
            f"(factors {s['matrix_factor_params']:,}, other {s['other_params']:,}); "
            f"T full task vectors {f['params']:,} / {f['bytes']:,} bytes; one model {m['params']:,} / {m['bytes']:,} bytes; "
            f"stored = {storage['stored_over_full_task_vectors']:.4f} x T task vectors = "
            f"{storage['stored_over_one_model']:.3f} models; matrix factors = "
            f"{storage['matrix_factors_over_one_model_matrices']:.3f} x one model's matrices"
        )

    @staticmethod
    def _print_summary(report: Dict[str, Any], path: Optional[str]) -> None:
        """Print the routed accuracies as a short table (printed, not logged: log formatting would wrap it)."""
        lines = [format_summary(report, "TSV-C, routed evaluation (each task's compressed model on its own task):")]
        if report["not_evaluated"]:
            lines.append(f"not evaluated (no test set): {', '.join(report['not_evaluated'])}")
        if path is not None:
            lines.append(f"full report: {os.path.abspath(path)}")
        print("\n".join(lines), flush=True)


def _average(per_task: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    out = {}
    for metric in ("accuracy", "loss", "finetuned_accuracy", "normalized_accuracy"):
        values = [e[metric] for e in per_task.values() if e.get(metric) is not None]
        if values and len(values) == len(per_task):
            out[metric] = sum(values) / len(values)
    return out
