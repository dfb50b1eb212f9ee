R"""Task Singular Vector Compression (TSV-C).

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025 (arXiv:2412.00081). Each task's update of every weight matrix is replaced by
its top-k singular triplets (``.utils.tsv_compression``); task i is served by
$W_0 + U_k \Sigma_k V_k^\top$ and, as in the paper, evaluated on task i only.
"""

import logging
import os
from copy import deepcopy
from fnmatch import fnmatch
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import auto_register_config

from .utils.tsv_compression import (
    CompressedTask,
    apply_compressed,
    check_rank_options,
    checkpoint_tensors,
    compress_matrix,
    layer_rank,
    storage_accounting,
)

log = logging.getLogger(__name__)


@auto_register_config
class TaskSingularVectorCompression(BaseAlgorithm):
    """Task Singular Vector Compression, the fine-tuned models loaded one at a time.

    Args:
        fraction: k = max(1, floor(fraction * min(m, n))), fraction in (0, 1].
        rank: the same k for every matrix.
        energy: per task and matrix, the smallest k keeping this share of the sum of
            squared singular values, in (0, 1].
        exclude_keys: names or fnmatch patterns of 2-D parameters kept in full.
        save_path: a ``.safetensors`` file for the compressed tasks (None: not saved).
        routed_eval: with a task pool whose ``test_dataloaders`` keys are the model
            names (e.g. ``CLIPVisionModelTaskPool``), evaluate each task's model on
            its own task and return the report; otherwise return ``{task: model}``.

    At most one of ``fraction``, ``rank``, ``energy``; none: k = max(1,
    floor(min(m, n) / T)) for T tasks, the paper's choice.
    """

    def __init__(
        self,
        fraction: Optional[float] = None,
        rank: Optional[int] = None,
        energy: Optional[float] = None,
        exclude_keys: Optional[List[str]] = None,
        save_path: Optional[str] = None,
        routed_eval: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_rank_options(fraction=fraction, rank=rank, energy=energy)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool):
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        pretrained = modelpool.load_pretrained_model()
        base = pretrained.state_dict()
        names = modelpool.model_names
        k_options = {"fraction": self.fraction, "rank": self.rank}
        ranks = {
            key: (
                None
                if self.energy is not None
                else layer_rank(value.shape, len(names), name=key, **k_options)
            )
            for key, value in base.items()
            if value.dim() == 2
            and value.is_floating_point()
            and not any(fnmatch(key, p) for p in self.exclude_keys or ())
        }
        tasks = [
            self.compress_task(
                name, modelpool.load_model(name).state_dict(), base, ranks
            )
            for name in names
        ]
        params = {
            k: (v.shape, v.dtype) for k, v in base.items() if v.is_floating_point()
        }
        storage = storage_accounting(params, [t.ranks for t in tasks])
        log.info(f"TSV-C storage: {storage['stored_over_one_model']:.3f} models")
        if self.save_path is not None:
            self.save(tasks)
        taskpool = getattr(self._program, "taskpool", None)
        if self.routed_eval and _routable(taskpool, names):
            report = self.routed_evaluation(taskpool, pretrained, tasks)
            return {**report, "storage": storage}
        return {t.name: task_model(pretrained, t) for t in tasks}

    def compress_task(
        self,
        name: str,
        state: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor],
        ranks: Mapping[str, Optional[int]],
    ) -> CompressedTask:
        """Top-k factors of ``state - base`` on the matrices of ``ranks`` (k None: by
        ``energy``), in each parameter's dtype; the other floating-point parameters of
        ``state`` in full."""
        task = CompressedTask(name)
        for key, value in state.items():
            if key in ranks:
                work = torch.float64 if value.dtype == torch.float64 else torch.float32
                delta = value.to(work) - base[key].to(work)
                energy = self.energy if ranks[key] is None else None
                factors = compress_matrix(delta, ranks[key], energy=energy)
                task.factors[key] = tuple(f.to(value.dtype) for f in factors)
            elif value.is_floating_point():
                task.others[key] = value.detach().clone()
        return task

    def save(self, tasks: List[CompressedTask]) -> None:
        """Write the tasks to ``save_path`` (safetensors, the layout and k per matrix
        in its metadata), through a temporary file in the same directory."""
        from safetensors.torch import save_file

        tensors, metadata = checkpoint_tensors(tasks)
        path = os.path.abspath(os.path.expanduser(self.save_path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(tensors, f"{path}.tmp{os.getpid()}", metadata=metadata)
        os.replace(f"{path}.tmp{os.getpid()}", path)
        log.info(f"TSV-C: {len(tasks)} compressed tasks saved to {path}")

    def routed_evaluation(
        self, taskpool, pretrained: nn.Module, tasks: List[CompressedTask]
    ) -> Dict[str, Any]:
        """Evaluate each task's model on its own test set only (``evaluate`` with
        ``test_dataloaders`` set to that one task); the report and the average."""
        loaders = taskpool.test_dataloaders
        report: Dict[str, Any] = {}
        try:
            for task in tasks:
                if task.name not in loaders:
                    log.warning(f"TSV-C: no test set for task '{task.name}'")
                    continue
                taskpool.test_dataloaders = {task.name: loaders[task.name]}
                result = taskpool.evaluate(task_model(pretrained, task))
                report[task.name] = result[task.name]
        finally:
            taskpool.test_dataloaders = loaders
        report["average"] = {
            m: sum(e[m] for e in report.values()) / len(report)
            for m in ("accuracy", "loss")
            if report and all(m in e for e in report.values())
        }
        return report


def task_model(pretrained: nn.Module, task: CompressedTask) -> nn.Module:
    """A copy of ``pretrained`` holding task ``task``'s compressed model."""
    model = deepcopy(pretrained)
    model.load_state_dict(apply_compressed(pretrained.state_dict(), task))
    return model


def _routable(taskpool, names: List[str]) -> bool:
    """Whether one of ``names`` is a key of ``taskpool.test_dataloaders`` (set up)."""
    if taskpool is None or not callable(getattr(taskpool, "setup", None)):
        return False
    if not isinstance(getattr(taskpool, "test_dataloaders", None), Mapping):
        taskpool.setup()
    loaders = getattr(taskpool, "test_dataloaders", None)
    return isinstance(loaders, Mapping) and any(name in loaders for name in names)
