R"""
Task Singular Vector Merging (TSV-M) as a FusionBench algorithm, streaming one model at a time.

For every weight matrix, each task update ``Δᵢ = θᵢ − θ₀`` is reduced to its top-k singular
triplets (k = floor(min(m, n) / T) by default), the per-task singular vectors are concatenated and
decorrelated (orthogonal Procrustes), and the merged weight is ``θ₀ + α · U⊥ Σ V⊥ᵀ``. Parameters that
are not matrices (biases, LayerNorm, class token, conv kernels) and the ``exclude_keys`` are averaged
over tasks and scaled by α too (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
Model Merging", CVPR 2025, arXiv:2412.00081).

Unlike FusionBench's ``TaskSingularVectorMerging``, the fine-tuned models are loaded one at a time and
only their rank-k factors and running sums are kept, so peak memory is about the pretrained model,
one fine-tuned model and the factors, whatever T is; and a layer whose rank is below T keeps one
component per task instead of being zeroed.

Example (20 CLIP ViT-B/32 tasks)::

    fusion_bench \
        method=tsv/tsv_merge \
        modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TALL20_model_only \
        taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TALL20

Options from the command line, e.g. ``method.alpha=1.5 method.rank=16 method.device=cuda``.
"""

from __future__ import annotations

import logging
from collections import Counter
from copy import deepcopy
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin, auto_register_config

from .functional import SVD_METHODS, SVDFactors, compute_dtype, default_rank, truncated_svd, tsv_merge_factors
from .streaming import check_finite, iter_finetuned_states, split_keys, state_dict_of

log = logging.getLogger(__name__)

__all__ = ["TSVMergeAlgorithm"]

DEFAULT_EXCLUDE_KEYS = ("*text_projection*",)


def resolve_alpha(alpha, num_tasks: int) -> tuple[List[float], float]:
    """Split ``alpha`` into per-task scales (applied to each Δᵢ before the SVD) and a final scale.

    A number scales the merged update; a list of T numbers scales each task vector, as FusionBench's
    TSVM does.
    """
    if alpha is None:
        return [1.0] * num_tasks, 1.0
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        return [1.0] * num_tasks, float(alpha)
    try:
        values = [float(a) for a in alpha]
    except TypeError as e:
        raise ValueError(f"option 'alpha' must be a number or a list of {num_tasks} numbers, got {alpha!r}") from e
    if len(values) != num_tasks:
        raise ValueError(
            f"option 'alpha' has {len(values)} values but the modelpool has {num_tasks} fine-tuned models"
        )
    return values, 1.0


@auto_register_config
class TSVMergeAlgorithm(SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """Task Singular Vector Merging, streaming the modelpool one fine-tuned model at a time.

    Args:
        alpha: scaling of the merged update, ``θ = θ₀ + α·M`` (default 1.0, the paper's choice); or a
            list of one float per task, applied to each task vector before the SVD.
        exclude_keys: glob patterns of parameter names that are averaged instead of decomposed. The
            default, ``["*text_projection*"]``, reproduces the reference implementation.
        rank: per-task rank k of every matrix; ``None`` (default) is ``floor(min(m, n) / T)``,
            at least 1.
        device: where the linear algebra runs; ``None`` (default) is the Fabric device, so a GPU is
            used when there is one. The merged model stays where the pretrained model was loaded.
        show_pbar: show progress bars over models and layers.
        svd_method: how each task's top-k triplets are computed. ``"gram"`` (default): eigenvectors of
            the smaller Gram matrix in float64 (only the top k, LAPACK ``dsyevr``), and the
            orthogonalization by whitening the ``Tk × Tk`` Gram matrices in float64 (SVD fallback when
            ill-conditioned); factors are kept in float64. Exact (closer to a float64 evaluation than
            float32 SVDs are) and several times faster than full SVDs. ``"svd"``: full SVDs as
            FusionBench's TSVM (bit-for-bit the same per-task factors). ``"randomized"``: randomized SVD,
            approximate (never the default; its error is reported in ``benchmarks/results``).
        lazy_loading: read fine-tuned checkpoints tensor by tensor from ``model.safetensors`` where the
            pool allows (a ``CLIPVisionModelPool`` entry that is a local directory) instead of building
            each model; other pools are loaded with ``load_model``.
    """

    def __init__(
        self,
        alpha: Union[float, Sequence[float], None] = 1.0,
        exclude_keys: Optional[Sequence[str]] = DEFAULT_EXCLUDE_KEYS,
        rank: Optional[int] = None,
        device: Optional[str] = None,
        show_pbar: bool = True,
        svd_method: str = "gram",
        lazy_loading: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if svd_method not in SVD_METHODS:
            raise ValueError(f"option 'svd_method' must be one of {list(SVD_METHODS)}, got {svd_method!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"option 'rank' must be a positive integer or null, got {rank!r}")

    def _device(self) -> torch.device:
        return torch.device(self.device) if self.device is not None else self.fabric.device

    def layer_ranks(self, shapes: Dict[str, torch.Size], num_tasks: int) -> Dict[str, int]:
        """The per-task rank k of every matrix, validated against its shape."""
        ranks = {}
        for key, shape in shapes.items():
            r = min(shape)
            k = default_rank(shape, num_tasks) if self.rank is None else self.rank
            if k > r:
                raise ValueError(
                    f"option 'rank'={k} exceeds the rank of parameter '{key}' of shape {tuple(shape)} (at most {r})"
                )
            ranks[key] = k
        return ranks

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Dict[str, nn.Module]]) -> nn.Module:
        """Merge the fine-tuned models of ``modelpool`` into one model and return it."""
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        names = list(modelpool.model_names)
        num_tasks = len(names)
        if num_tasks == 0:
            raise ValueError("the modelpool has no fine-tuned models to merge (only '_pretrained_' or nothing)")
        task_scales, final_scale = resolve_alpha(self.alpha, num_tasks)
        exclude = list(self.exclude_keys or [])
        device = self._device()

        with self.profile("load pretrained"):
            pretrained = modelpool.load_pretrained_model()
            # a pool of in-memory models hands out the caller's own instance: never write into it
            merged = deepcopy(pretrained) if modelpool.has_instance_models else pretrained
        base = state_dict_of(merged)
        check_finite(base, "_pretrained_")
        matrix_keys, other_keys = split_keys(base, exclude)
        ranks = self.layer_ranks({k: base[k].shape for k in matrix_keys}, num_tasks)
        self._log_setup(names, base, matrix_keys, other_keys, ranks, device)

        factors: Dict[str, List[SVDFactors]] = {k: [] for k in matrix_keys}
        sums: Dict[str, Tensor] = {}
        for i, name, state in iter_finetuned_states(
            modelpool,
            base,
            desc="TSV-M: task vectors",
            show_pbar=self.show_pbar,
            profile=self.profile,
            lazy=self.lazy_loading,
        ):
            keys = tqdm(matrix_keys + other_keys, desc=f"  {name}", leave=False, disable=not self.show_pbar)
            for key in keys:
                work = compute_dtype(base[key].dtype)
                if key in ranks and self.svd_method != "svd":
                    # the Gram paths keep the factors in float64: UᵀU is ill-conditioned when Tk ≈ r,
                    # and float32 factors would lose cond(U)·eps32 in U (UᵀU)^(-1/2)
                    work = torch.float64
                with self.profile("read tensors"):
                    value = state[key]  # a SafetensorsState reads the tensor here
                delta = value.to(device, work) - base[key].to(device, work)
                del value
                if task_scales[i] != 1.0:
                    delta.mul_(task_scales[i])
                if key in ranks:
                    with self.profile("truncated svd"):
                        factors[key].append(truncated_svd(delta, ranks[key], self.svd_method))
                elif key in sums:
                    sums[key].add_(delta)
                else:
                    sums[key] = delta

        written = set()
        for key in tqdm(matrix_keys + other_keys, desc="TSV-M: merging", disable=not self.show_pbar):
            target = base[key]
            if target.data_ptr() in written:  # tied weights: one storage, already merged
                continue
            with self.profile("merge"):
                if key in factors:
                    update = tsv_merge_factors(factors.pop(key), "svd" if self.svd_method == "svd" else "gram")
                else:
                    update = sums.pop(key).div_(num_tasks)
                update.mul_(final_scale)
                target.copy_((target.to(device, update.dtype) + update).to(target.device, target.dtype))
            written.add(target.data_ptr())

        self.print_profile_summary("TSV-M profile")
        return merged

    def _log_setup(self, names, base, matrix_keys, other_keys, ranks, device) -> None:
        dtypes = sorted({str(base[k].dtype) for k in matrix_keys + other_keys})
        num_tasks = len(names)
        log.info(
            f"TSV-M: T={num_tasks} tasks {names}; device={device}; dtype={', '.join(dtypes)} "
            f"(computed in {', '.join(sorted({str(compute_dtype(base[k].dtype)) for k in matrix_keys})) or '-'}); "
            f"{len(matrix_keys)} matrices decomposed, {len(other_keys)} other parameters averaged; alpha={self.alpha}"
        )
        by_shape = Counter((tuple(base[k].shape), ranks[k]) for k in matrix_keys)
        for (shape, k), count in sorted(by_shape.items()):
            log.info(f"TSV-M: {count} matrices of shape {shape}: k={k} per task ({num_tasks * k} of rank {min(shape)})")
        low = [k for k in matrix_keys if min(base[k].shape) < num_tasks]
        if low:
            log.warning(
                f"TSV-M: {len(low)} matrices have rank below T={num_tasks} and keep 1 component per task "
                f"(FusionBench's TSVM would zero them): {low}"
            )
