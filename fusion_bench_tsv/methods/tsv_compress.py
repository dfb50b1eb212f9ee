R"""
Task Singular Vector Compression (TSV-C) as a FusionBench algorithm, with routed evaluation.

Every weight matrix's task update ``Δᵢ = θᵢ − θ₀`` is replaced by its top-k singular triplets (the
best rank-k approximation); every other parameter is kept as the fine-tuned model has it. Task i is
then served by ``θ₀ + Δ̂ᵢ`` and evaluated on task i only (oracle routing, :mod:`.routed_eval`), as in
Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025
(arXiv:2412.00081), where k = floor(r / T) keeps ≥ 99 % of the fine-tuned accuracy at about two
models' worth of storage. Fine-tuned models are loaded one at a time; only their factors (and
non-matrix parameters) are kept. The checkpoint format: :mod:`fusion_bench_tsv.io.compressed_checkpoint`.

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

The options, their defaults and meaning: ``config/method/tsv/tsv_compress.yaml``.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench import BaseModelPool
from fusion_bench.mixins import auto_register_config

from ..functional import check_rank_options, compress_matrix, layer_rank
from ..io.compressed_checkpoint import (
    CompressedTask,
    build_task_model,
    describe_storage,
    save_compressed,
    storage_accounting,
)
from ..io.keys import DEFAULT_EXCLUDE_KEYS, state_dict_of
from ..io.streaming import iter_finetuned_states
from ..runtime.parallel import bounded_threads
from .base import TSVAlgorithmBase, log_rank_report, rank_report, task_update
from .options import float_dtype, validate_options
from .routed_eval import program_report, routed_evaluation, supports_routing, write_report

log = logging.getLogger(__name__)

__all__ = ["TSVCompressAlgorithm", "compress_task"]


def compress_task(
    name: str,
    state: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    ranks: Mapping[str, Optional[int]],
    other_keys: Sequence[str],
    *,
    energy: Optional[float] = None,
    theta_rms: Optional[Mapping[str, float]] = None,
    device: torch.device = torch.device("cpu"),
    factor_dtype: Optional[torch.dtype] = None,
    profile: Callable[[str], ContextManager] = lambda action: nullcontext(),
    show_pbar: bool = False,
) -> CompressedTask:
    """One fine-tuned model compressed: rank-k factors of ``Δ = state − base`` for every matrix of ``ranks``
    (k from ``ranks``, or by ``energy`` when its value is None), the ``other_keys`` copied in full.

    Args:
        name: the task's name.
        state: the fine-tuned model's state dict.
        base: θ₀'s state dict.
        ranks: the matrices to compress and their rank k (None: chosen by ``energy``).
        other_keys: the parameters stored in full.
        energy: share of Σσ² kept when a rank is None.
        theta_rms: θ̄ (RMS of θ₀) of every matrix: rank revealing with the storage-noise floor of the
            coarsest of θ₀'s and the checkpoint's dtype (at most the numerical rank of Δ is kept); None: plain top-k.
        device: where the SVDs run.
        factor_dtype: dtype of the stored factors (None: each matrix's own dtype).
        profile: a context-manager factory timing ``"truncated svd"``.
        show_pbar: progress bar over the matrices.
    """
    task = CompressedTask(name)
    for key in tqdm(list(ranks), desc=f"  {name}", leave=False, disable=not show_pbar):
        with bounded_threads(base[key].numel()):
            delta, options = task_update(state, base, key, device, theta_rms)
            with profile("truncated svd"):
                k = ranks[key]
                factors = compress_matrix(delta, k, energy=energy if k is None else None, **options)
        store = factor_dtype or base[key].dtype
        task.factors[key] = type(factors)(*(f.to("cpu", store).clone(memory_format=torch.contiguous_format) for f in factors))
    for key in other_keys:
        task.others[key] = state[key].detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return task


@auto_register_config
class TSVCompressAlgorithm(TSVAlgorithmBase):
    """Task Singular Vector Compression, streaming the modelpool one fine-tuned model at a time.

    Every option is documented, with its default, in ``config/method/tsv/tsv_compress.yaml``.

    Args:
        fraction: per-task rank k = max(1, floor(fraction · min(m, n))).
        rank: a fixed per-task rank k of every matrix.
        energy: per task and matrix, the smallest k keeping this share of Σσ².
        exclude_keys: glob patterns of 2-D parameters stored in full instead of compressed.
        save_path: directory for the compressed checkpoint (None: not saved).
        factor_dtype: dtype of the stored factors (None: each matrix's own dtype).
        routed_eval: evaluate each task's model on its own task through the program's task pool.
        evaluate_finetuned: in routed evaluation, also evaluate each fine-tuned model.
        device: where the SVDs run (None: the Fabric device).
        show_pbar: show progress bars.
        print_profile: print the profiler's table of where the time went.
        allow_missing_keys: accept checkpoints that lack parameters of the model (filled at random).
        rank_revealing: per task keep at most the numerical rank of Δᵢ of the top-k triplets.
    """

    method_name = "TSV-C"
    output_name = "tsv_c"

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
        print_profile: bool = False,
        allow_missing_keys: bool = False,
        rank_revealing: bool = True,
        **kwargs,
    ):
        super().__init__(**validate_options(self, kwargs))
        check_rank_options(fraction=self.fraction, rank=self.rank, energy=self.energy)
        self.report: Optional[Dict[str, Any]] = None  # the full routed report (tsv_compress_report.json)

    def layer_ranks(self, base: Mapping[str, Tensor], keys: List[str], num_tasks: int) -> Dict[str, Optional[int]]:
        """k of every matrix from ``fraction``/``rank``/the default; None for each with ``energy``."""
        if self.energy is not None:
            return {key: None for key in keys}
        return {key: layer_rank(base[key].shape, num_tasks, fraction=self.fraction, rank=self.rank, name=key)
                for key in keys}

    def rank_choice(self, num_tasks: int) -> Dict[str, Any]:
        """The rank option in effect (and whether rank revealing caps it), as recorded in the checkpoint and the report."""
        if self.energy is not None:
            choice = {"mode": "energy", "energy": self.energy}
        elif self.rank is not None:
            choice = {"mode": "rank", "rank": self.rank}
        elif self.fraction is not None:
            choice = {"mode": "fraction", "fraction": self.fraction}
        else:
            choice = {"mode": "default", "fraction": f"1/{num_tasks}", "rule": "floor(min(m, n) / T), at least 1"}
        return {**choice, "rank_revealing": self.rank_revealing}

    @torch.no_grad()
    def compress(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]):
        """``(pretrained_model, tasks, storage)``: θ₀ as loaded, one :class:`CompressedTask` per fine-tuned
        model (factors on the CPU, in the storage dtype) and the storage accounting."""
        opening = self.open_pool(self.coerce_pool(modelpool), "compress")
        base, factor_dtype = opening.base, self._factor_dtype()
        log.info(
            f"TSV-C: T={opening.num_tasks} tasks {opening.names}; device={opening.device}; rank choice "
            f"{self.rank_choice(opening.num_tasks)}; {len(opening.matrix_keys)} matrices compressed, "
            f"{len(opening.other_keys)} other parameters stored in full"
        )
        tasks = [
            compress_task(name, state, base, opening.ranks, opening.other_keys, energy=self.energy,
                          theta_rms=opening.theta_rms, device=opening.device, factor_dtype=factor_dtype,
                          profile=self.profile, show_pbar=self.show_pbar)
            for _, name, state in iter_finetuned_states(
                opening.modelpool, base, desc="TSV-C: task vectors", show_pbar=self.show_pbar, profile=self.profile,
                allow_missing_keys=self.allow_missing_keys,
            )
        ]
        floating = {k: (tuple(base[k].shape), base[k].dtype) for k in opening.matrix_keys + opening.other_keys}
        storage = storage_accounting(floating, [t.ranks for t in tasks], factor_dtype)
        log.info(describe_storage(storage))
        for t in tasks if self.energy is not None else []:
            ks = list(t.ranks.values())
            log.info(f"TSV-C: task '{t.name}': energy {self.energy} keeps k in [{min(ks)}, {max(ks)}], mean {sum(ks) / len(ks):.1f}")
        return opening.pretrained, tasks, storage

    def rank_summary(self, pretrained: nn.Module, tasks: Sequence[CompressedTask]) -> Dict[str, Any]:
        """The kept and dropped triplets of ``tasks`` (:func:`~.base.rank_report`: k is the rank choice's, kᵢ
        what the checkpoint stores), logged."""
        base = state_dict_of(pretrained)
        kept = {key: [t.ranks[key] for t in tasks] for key in tasks[0].factors} if tasks else {}
        ranks = self.layer_ranks(base, list(kept), len(tasks))
        report = rank_report([t.name for t in tasks], {k: base[k].shape for k in kept}, ranks, kept, self.rank_revealing)
        log_rank_report(self.method_name, report)
        return report

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]):
        """Compress, optionally save, then evaluate (routed: the accuracies, in the shape of a task pool's report;
        the full report in :attr:`report`) or return ``{task: θ₀ + Δ̂ᵢ}``."""
        self.start_run()
        modelpool = self.coerce_pool(modelpool)
        checkpoint = self.output_path()  # refuses a save_path in use before anything is computed
        pretrained, tasks, storage = self.compress(modelpool)
        ranks = self.rank_summary(pretrained, tasks)
        rank_choice = self.rank_choice(len(tasks))
        if checkpoint is not None:
            with self.profile("save checkpoint"):
                save_compressed(checkpoint, tasks, state_dict_of(pretrained), base_model=_base_model_name(modelpool),
                                rank_choice=rank_choice)
            log.info(f"TSV-C: compressed checkpoint of {len(tasks)} tasks written to {checkpoint}")
            self.explain_program_save_line()
        taskpool = getattr(getattr(self, "_program", None), "taskpool", None)
        if self.routed_eval and supports_routing(taskpool):
            report = routed_evaluation(taskpool, modelpool, pretrained, tasks, evaluate_finetuned=self.evaluate_finetuned,
                                       allow_missing_keys=self.allow_missing_keys, profile=self.profile,
                                       show_pbar=self.show_pbar)
            report.update(storage=storage, rank_choice=rank_choice, checkpoint=None if checkpoint is None else str(checkpoint),
                          ranks=ranks)
            path = write_report(self.log_dir, report)
            self.report = report
            routed = program_report(report, path)
            results = {"not evaluated (no test set)": ", ".join(report["not_evaluated"])} if report["not_evaluated"] else {}
            self._finish(tasks, storage, checkpoint, path, results, routed)
            return routed
        if self.routed_eval and taskpool is not None:
            log.warning(
                f"TSV-C: task pool {type(taskpool).__name__} has no per-task test sets: no routed evaluation; "
                "returning one model per task (the program evaluates each on every task)"
            )
        self._finish(tasks, storage, checkpoint, None, {"evaluation": "none routed: one model per task returned"}, None)
        return {t.name: build_task_model(pretrained, t) for t in tasks}

    def _finish(self, tasks, storage: Mapping[str, Any], checkpoint, report_path: Optional[str],
                results: Dict[str, str], routed: Optional[Dict[str, Any]]) -> None:
        """The run's summary: the rank choice, T, the storage, the routed accuracies; the outputs."""
        choice = {k: v for k, v in self.rank_choice(len(tasks)).items() if k not in ("mode", "rule")}
        results = {"storage": _storage_line(storage), **results}
        self.finish_run("TSV-C profile", {**choice, "T": len(tasks)}, report=routed, results=results,
                        outputs={"compressed checkpoint": checkpoint, "full report": report_path})

    def _factor_dtype(self) -> Optional[torch.dtype]:
        return float_dtype(self.factor_dtype) if self.factor_dtype is not None else None


def _base_model_name(modelpool: BaseModelPool) -> str:
    """The pretrained model's path or hub id, recorded in the checkpoint."""
    try:
        return modelpool.get_model_path("_pretrained_")
    except Exception:  # a pool of instances or of configs: no single path
        return "_pretrained_"


def _storage_line(storage: Mapping[str, Any]) -> str:
    """The storage in one short line (the full accounting is logged and in the report)."""
    return (f"{storage['stored']['bytes'] / 2**20:.1f} MiB for all {storage['num_tasks']} tasks, "
            f"{storage['stored_over_full_task_vectors']:.3f} of the full task vectors, "
            f"{storage['stored_over_one_model']:.2f} models")
