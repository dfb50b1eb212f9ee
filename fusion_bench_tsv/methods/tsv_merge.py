R"""
Task Singular Vector Merging (TSV-M) as a FusionBench algorithm, streaming one model at a time.

For every weight matrix, each task update ``Δᵢ = θᵢ − θ₀`` is reduced to its top-k singular
triplets (k = floor(min(m, n) / T) by default), the per-task singular vectors are concatenated and
decorrelated (orthogonal Procrustes), and the merged weight is ``θ₀ + α · U⊥ Σ V⊥ᵀ``. Parameters that
are not matrices (biases, LayerNorm, class token, conv kernels) and the ``exclude_keys`` are averaged
over tasks and scaled by α too (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
Model Merging", CVPR 2025, arXiv:2412.00081).

Unlike FusionBench's ``TaskSingularVectorMerging``, the fine-tuned models are loaded one at a time (or
read layer by layer) and only their rank-k factors and running sums are kept, so peak memory is about
the pretrained model, one fine-tuned model and the factors, whatever T is. Its defaults that change the
merged model, and the options that give FusionBench's: the table in ``docs/math.md``. The per-parameter
merge and its loops are in :mod:`fusion_bench_tsv.runtime.merge_job`.

Example (20 CLIP ViT-B/32 tasks)::

    fusion_bench \
        method=tsv/tsv_merge \
        modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TALL20_model_only \
        taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TALL20

With ``alpha_grid`` (and ``validation_taskpool``), α is chosen on validation tasks from one merge
(:mod:`fusion_bench_tsv.methods.alpha_grid`). The options, their defaults and meaning:
``config/method/tsv/tsv_merge.yaml``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fusion_bench import BaseModelPool
from fusion_bench.mixins import auto_register_config

from ..functional import DEFAULT_SVD_METHOD, merge_dtype
from ..io.hf_checkpoint import save_hf_model
from ..io.keys import DEFAULT_EXCLUDE_KEYS, unique_storage_keys
from ..io.streaming import iter_finetuned_states, open_lazy_states
from ..runtime.merge_job import ParameterMerge, merge_parameters
from ..runtime.parallel import resolve_workers
from ..runtime.sharding import send_to_rank_zero, split_by_size
from .alpha_grid import UpdateMerge, open_alpha_grid, run_alpha_grid, write_outputs
from .base import Opening, TSVAlgorithmBase, rank_report
from .options import validate_options

log = logging.getLogger(__name__)

__all__ = ["RANK_REPORT_FILE", "TSVMergeAlgorithm", "resolve_alpha"]

#: The per-matrix kept and dropped singular triplets (:func:`~.base.rank_report`), written in the log dir.
RANK_REPORT_FILE = "tsv_merge_ranks.json"


def resolve_alpha(alpha: Union[float, Sequence[float], None], num_tasks: int) -> tuple[List[float], float]:
    """Split ``alpha`` (validated by :func:`~.options.validate_options`) into per-task scales (applied to
    each Δᵢ before the SVD) and a final scale: a number scales the merged update; a list of T numbers
    scales each task vector, as FusionBench's TSVM does."""
    if alpha is None:
        return [1.0] * num_tasks, 1.0
    if not isinstance(alpha, (list, tuple)):
        return [1.0] * num_tasks, float(alpha)
    if len(alpha) != num_tasks:
        raise ValueError(
            f"option 'alpha' has {len(alpha)} values but the modelpool has {num_tasks} fine-tuned models: "
            f"give one number per task, or a single number"
        )
    return [float(a) for a in alpha], 1.0


@auto_register_config
class TSVMergeAlgorithm(TSVAlgorithmBase):
    """Task Singular Vector Merging, streaming the modelpool one fine-tuned model (or one layer) at a time.

    Every option is documented, with its default, in ``config/method/tsv/tsv_merge.yaml``.

    Args:
        alpha: scale α of the merged update, or one scale per task vector.
        exclude_keys: glob patterns of parameters averaged instead of decomposed.
        rank: per-task rank k of every matrix (None: floor(min(m, n) / T), at least 1).
        device: where the linear algebra runs (None: the Fabric device).
        show_pbar: show progress bars.
        print_profile: print the profiler's table of where the time went.
        svd_method: how each task's top-k triplets are computed: ``gram``, ``svd`` or ``randomized``.
        lazy_loading: read local safetensors checkpoints tensor by tensor (layer by layer when all can be).
        save_path: directory for the merged model in Hugging Face format (None: not saved).
        max_shard_size: largest safetensors shard of ``save_path``.
        save_tokenizer: also save the pool's tokenizer to ``save_path``.
        num_workers: threads that decompose matrices side by side (None: the CPU cores, 1 on a GPU).
        allow_missing_keys: accept checkpoints that lack parameters of the model (filled at random).
        alpha_grid: values of α tried on ``validation_taskpool``; the best one is returned (None: ``alpha``).
        validation_taskpool: the task pool (config, config name or instance) that chooses α from ``alpha_grid``.
        rank_revealing: per task keep at most the numerical rank of Δᵢ of the top-k triplets.

    With a Fabric strategy of several processes the parameters are split across the ranks by size and
    rank 0 assembles the merged model, bitwise the one a single process makes; other ranks return None.
    """

    method_name = "TSV-M"
    output_name = "merged_model"

    def __init__(
        self,
        alpha: Union[float, Sequence[float], None] = 1.0,
        exclude_keys: Optional[Sequence[str]] = DEFAULT_EXCLUDE_KEYS,
        rank: Optional[int] = None,
        device: Optional[str] = None,
        show_pbar: bool = True,
        print_profile: bool = False,
        svd_method: str = DEFAULT_SVD_METHOD,
        lazy_loading: bool = True,
        save_path: Optional[str] = None,
        max_shard_size: Union[str, int] = "5GB",
        save_tokenizer: bool = True,
        num_workers: Optional[int] = None,
        allow_missing_keys: bool = False,
        alpha_grid: Optional[Sequence[float]] = None,
        validation_taskpool: Optional[Any] = None,
        rank_revealing: bool = True,
        **kwargs,
    ):
        super().__init__(**validate_options(self, kwargs))
        self.alpha_grid_results: Optional[dict] = None

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]) -> Optional[nn.Module]:
        """Merge the fine-tuned models of ``modelpool`` into one model and return it (on rank 0; other
        ranks of a multi-process Fabric run return None)."""
        self.start_run()
        modelpool = self.coerce_pool(modelpool)
        self.output_path()  # refuses a save_path in use before anything is computed
        validation = open_alpha_grid(self.alpha_grid, self.validation_taskpool, self.alpha, self.fabric, self.log_dir)
        opening = self.open_pool(modelpool, "merge")
        base, world, rank = opening.base, self.fabric.world_size, self.fabric.global_rank
        self._log_setup(opening)
        # tied weights: one storage, merged once; parameters split across the ranks of a multi-process run
        keys = unique_storage_keys(base, opening.matrix_keys + opening.other_keys)
        mine = split_by_size({k: base[k].numel() for k in keys}, world)[rank]
        workers = resolve_workers(self.num_workers, opening.device, world)
        log.info(f"TSV-M: rank {rank}/{world} merges {len(mine)} of {len(keys)} parameters on {workers} worker thread(s)")
        task_scales, final_scale = resolve_alpha(self.alpha, opening.num_tasks)
        updates: Dict[str, Tensor] = {}  # M per parameter, with alpha_grid
        merge = (UpdateMerge if self.alpha_grid else ParameterMerge)(
            opening.ranks, task_scales, final_scale, opening.device, self.svd_method, timer=self.record_time,
            theta_rms=opening.theta_rms)
        results: Dict[str, Tensor] = {}
        lazy_states = open_lazy_states(modelpool, base, self.lazy_loading)
        finetuned = None if lazy_states is not None else iter_finetuned_states(
            modelpool, base, desc="TSV-M: task vectors", show_pbar=self.show_pbar, profile=self.profile,
            lazy=self.lazy_loading, allow_missing_keys=self.allow_missing_keys,
        )
        write = updates.__setitem__ if self.alpha_grid else (lambda key, value: base[key].copy_(value))
        write = write if rank == 0 else results.__setitem__
        merge_parameters(merge, base, mine, write, workers=workers, lazy_states=lazy_states, finetuned=finetuned,
                         show_pbar=self.show_pbar)
        if world > 1:
            with self.profile("gather on rank 0"):
                send_to_rank_zero(self.fabric, results, write)
                send_to_rank_zero(self.fabric, {k: torch.tensor(v) for k, v in merge.kept.items()},
                                  lambda key, value: merge.kept.__setitem__(key, value.tolist()))
        if rank != 0:
            if self.print_profile:
                self.print_profile_summary("TSV-M profile")
            return None
        kept = {key: merge.kept[key] for key in keys if key in merge.kept}  # in model order
        ranks_file = self.save_rank_report(rank_report(opening.names, {k: base[k].shape for k in kept}, opening.ranks,
                                                       kept, self.rank_revealing), RANK_REPORT_FILE)
        grid_dir = self._choose_alpha(opening.pretrained, updates, task_scales, *validation) if self.alpha_grid else None
        saved = None
        if self.save_path is not None:
            with self.profile("save"):
                saved = self.save(opening.pretrained, modelpool)
        self._finish(opening, ranks_file, grid_dir, saved)
        return opening.pretrained

    def _finish(self, opening: Opening, ranks_file: Optional[Path], grid_dir: Optional[Path], saved: Optional[str]):
        """The run's summary: α (chosen or given), k, T, the SVD method; the outputs; α to TensorBoard."""
        alpha: Any = self.alpha
        results, scalars = {}, {}
        if self.alpha_grid_results is not None:
            best = self.alpha_grid_results["best"]
            alpha = best["alpha"]
            results["alpha chosen on validation"] = (f"{best['alpha']:g} of {list(self.alpha_grid)} "
                                                     f"(validation accuracy {100 * best['accuracy']:.2f}%)")
        if not isinstance(alpha, (list, tuple)):
            scalars["alpha"] = float(alpha)
        options = {"alpha": alpha}
        if self.alpha_grid_results is not None and isinstance(self.alpha, (list, tuple)):
            options["task scales"] = self.alpha  # each task vector's, before the SVD; alpha scales the merged update
        options.update(k=self.k_option(opening.ranks), T=opening.num_tasks, svd_method=self.svd_method)
        outputs = {"merged model (method.save_path)": saved, "alpha grid": grid_dir, "kept ranks per layer": ranks_file}
        self.finish_run("TSV-M profile", options, outputs=outputs, results=results, scalars=scalars)

    def save(self, model: nn.Module, modelpool: BaseModelPool) -> str:
        """Write ``model`` (and the pool's tokenizer) in Hugging Face format to ``save_path``, atomically."""
        tokenizer = None
        if self.save_tokenizer and getattr(modelpool, "tokenizer", None) is not None:
            tokenizer = modelpool.load_tokenizer()
        path = str(save_hf_model(model, self.output_path(), tokenizer=tokenizer, max_shard_size=self.max_shard_size))
        self.explain_program_save_line()
        return path

    def _choose_alpha(self, model: nn.Module, updates: Dict[str, Tensor], task_scales: List[float], taskpool: Any,
                      out_dir: Optional[Path]) -> Optional[Path]:
        """Evaluate the alpha grid on the validation task pool, leave ``model`` at the best alpha, write the curve
        (its directory returned)."""
        scales = task_scales if isinstance(self.alpha, (list, tuple)) else None
        self.alpha_grid_results = run_alpha_grid(model, updates, self.alpha_grid, taskpool, task_scales=scales,
                                                 profile=self.profile)
        updates.clear()  # M is freed before the model is saved and tested
        best = self.alpha_grid_results["best"]
        self.fabric.log_dict({"alpha_grid/best_alpha": best["alpha"], "alpha_grid/best_accuracy": best["accuracy"]})
        with self.profile("write outputs"):
            return write_outputs(out_dir, self.alpha_grid_results)

    def _log_setup(self, opening: Opening) -> None:
        base, matrix_keys, num_tasks = opening.base, opening.matrix_keys, opening.num_tasks
        dtypes = sorted({str(base[k].dtype) for k in matrix_keys + opening.other_keys})
        computed = sorted({str(merge_dtype(base[k].dtype, self.svd_method)) for k in matrix_keys})
        log.info(
            f"TSV-M: T={num_tasks} tasks {opening.names}; device={opening.device}; dtype={', '.join(dtypes)} "
            f"(matrices merged in {', '.join(computed) or '-'}, svd_method={self.svd_method}); {len(matrix_keys)} matrices decomposed, "
            f"{len(opening.other_keys)} other parameters averaged; "
            + (f"alpha chosen on validation from alpha_grid={list(self.alpha_grid)}" if self.alpha_grid else f"alpha={self.alpha}")
            + (f" (task scales alpha={self.alpha})" if self.alpha_grid and isinstance(self.alpha, (list, tuple)) else "")
        )
        low = [k for k in matrix_keys if min(base[k].shape) < num_tasks]
        if low:
            log.warning(
                f"TSV-M: {len(low)} matrices have rank below T={num_tasks} and keep 1 component per task "
                f"(FusionBench's TSVM would zero them): {low}"
            )
