"""The math of Task Singular Vectors as pure tensor functions.

No FusionBench, no I/O, no models: one matrix (or a list of per-task matrices) in, tensors out.
Every algorithm of :mod:`fusion_bench_tsv` calls these.
"""

from .compress import compress_matrix
from .interference import (
    mean_pairwise_cosine,
    pairwise_singular_task_interference,
    pairwise_sti_from_factors,
    singular_task_interference,
    sti_from_factors,
    task_cosine_similarity,
    task_factors,
    truncate_factors,
)
from .merge import merge_dtype, tsv_merge_factors, tsv_merge_matrix
from .rank import (
    STORAGE_NOISE_FACTOR,
    coarsest_dtype,
    numerical_rank,
    rank_options,
    rank_threshold,
    roundoff_floor,
    storage_noise_floor,
    weight_rms,
)
from .svd import (
    DEFAULT_SVD_METHOD,
    GRAM_COND_LIMIT,
    SVD_METHODS,
    SVDFactors,
    check_svd_method,
    compute_dtype,
    concat_factors,
    default_rank,
    eigh_top,
    inv_sqrt_gram,
    orthogonalization_method,
    orthogonalize,
    truncated_svd,
)
from .tsv_compression import (
    check_rank_options,
    energy_rank,
    factor_numel,
    fraction_rank,
    layer_rank,
    reconstruct,
)

__all__ = [
    "SVDFactors",
    "check_rank_options",
    "compress_matrix",
    "check_svd_method",
    "coarsest_dtype",
    "compute_dtype",
    "concat_factors",
    "DEFAULT_SVD_METHOD",
    "default_rank",
    "eigh_top",
    "energy_rank",
    "factor_numel",
    "fraction_rank",
    "GRAM_COND_LIMIT",
    "inv_sqrt_gram",
    "layer_rank",
    "mean_pairwise_cosine",
    "numerical_rank",
    "orthogonalization_method",
    "orthogonalize",
    "pairwise_singular_task_interference",
    "pairwise_sti_from_factors",
    "rank_options",
    "rank_threshold",
    "reconstruct",
    "roundoff_floor",
    "singular_task_interference",
    "sti_from_factors",
    "STORAGE_NOISE_FACTOR",
    "storage_noise_floor",
    "SVD_METHODS",
    "task_cosine_similarity",
    "task_factors",
    "truncate_factors",
    "truncated_svd",
    "merge_dtype",
    "tsv_merge_factors",
    "tsv_merge_matrix",
    "weight_rms",
]
