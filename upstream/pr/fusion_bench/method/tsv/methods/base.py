"""What TSV-M, TSV-C and STI share: pool coercion, the compute device, the opening sequence, ranks, the
output directory, a thread-safe profiler callback and the shape log.

The opening sequence (:meth:`TSVAlgorithmBase.open_pool`): check the pool, load the pretrained model,
copy it when the pool holds the caller's own instance, take its state dict, refuse NaN/Inf, split the
parameters into decomposed matrices and the rest (``exclude_keys``), and compute every matrix's
per-task rank (:meth:`TSVAlgorithmBase.layer_ranks`, which a method may override).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin

from ..functional import layer_rank
from ..io.keys import check_finite, split_keys, state_dict_of
from ..io.modelpool import as_modelpool, finetuned_model_names, load_pretrained_model
from ..io.outputs import output_dir

log = logging.getLogger(__name__)

__all__ = ["Opening", "TSVAlgorithmBase"]


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

    @property
    def num_tasks(self) -> int:
        return len(self.names)


class TSVAlgorithmBase(SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """The base of the three algorithms; a subclass sets :attr:`method_name` and :attr:`output_name` and
    has the options ``rank``, ``exclude_keys``, ``device``, ``save_path`` and ``allow_missing_keys``."""

    method_name: ClassVar[str] = "TSV"  # names the method in logs and errors
    output_name: ClassVar[str] = "output"  # the directory ``save_path='{log_dir}'`` means inside the log dir
    default_save_path: ClassVar[Optional[str]] = None  # where outputs go without ``save_path``

    def compute_device(self) -> torch.device:
        """The ``device`` option, or the Fabric device (a GPU when there is one)."""
        return torch.device(self.device) if self.device is not None else self.fabric.device

    def coerce_pool(self, modelpool: Union[BaseModelPool, Mapping[str, nn.Module]]) -> BaseModelPool:
        """``modelpool`` as a checked FusionBench pool (:func:`~fusion_bench.method.tsv.io.modelpool.as_modelpool`)."""
        return as_modelpool(modelpool, self.method_name)

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
        opening = Opening(modelpool, names, pretrained, base, matrix_keys, other_keys, ranks, self.compute_device())
        self.log_shapes(opening)
        return opening

    def log_shapes(self, opening: Opening) -> None:
        """Log how many matrices of each shape there are, and their rank k per task."""
        base, t = opening.base, opening.num_tasks
        counts = Counter((tuple(base[key].shape), opening.ranks[key]) for key in opening.matrix_keys)
        for (shape, k), count in sorted(counts.items(), key=str):
            share = "chosen per task" if k is None else f"{k} per task ({t * k} of rank {min(shape)})"
            log.info(f"{self.method_name}: {count} matrices of shape {shape}: k={share}")

    def output_path(self) -> Optional[Path]:
        """The directory ``save_path`` names (``{log_dir}`` alone: ``<log_dir>/<output_name>``), None when
        nothing is to be written; refused when something there was not written by this package
        (:func:`~fusion_bench.method.tsv.io.outputs.output_dir`)."""
        save_path = self.save_path if self.save_path is not None else self.default_save_path
        if save_path is None or (self.save_path is None and self.log_dir is None):
            return None
        return output_dir(save_path, self.log_dir, self.output_name, self.method_name)

    def record_time(self, action: str, seconds: float) -> None:
        """Add ``seconds`` to the profiler's ``action`` from any thread (times of concurrent jobs add up)."""
        with _PROFILER_LOCK:
            self.profiler.recorded_durations[action].append(seconds)


_PROFILER_LOCK = threading.Lock()
