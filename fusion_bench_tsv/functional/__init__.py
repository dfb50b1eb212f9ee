"""The math of Task Singular Vectors as pure tensor functions.

No FusionBench, no I/O, no models: one matrix (or a list of per-task matrices) in, tensors out.
Every algorithm of :mod:`fusion_bench_tsv` calls these.
"""

from .merge import tsv_merge_factors, tsv_merge_matrix
from .svd import (
    GRAM_COND_LIMIT,
    SVD_METHODS,
    SVDFactors,
    compute_dtype,
    concat_factors,
    default_rank,
    eigh_top,
    inv_sqrt_gram,
    orthogonalize,
    truncated_svd,
)

__all__ = [
    "SVDFactors",
    "GRAM_COND_LIMIT",
    "SVD_METHODS",
    "compute_dtype",
    "concat_factors",
    "default_rank",
    "eigh_top",
    "inv_sqrt_gram",
    "orthogonalize",
    "truncated_svd",
    "tsv_merge_factors",
    "tsv_merge_matrix",
]
