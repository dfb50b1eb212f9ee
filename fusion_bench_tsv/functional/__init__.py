"""The math of Task Singular Vectors as pure tensor functions.

No FusionBench, no I/O, no models: one matrix (or a list of per-task matrices) in, tensors out.
Every algorithm of :mod:`fusion_bench_tsv` calls these.
"""

from .compress import (
    check_rank_options,
    compress_matrix,
    energy_rank,
    factor_numel,
    fraction_rank,
    layer_rank,
    reconstruct,
)
from .merge import tsv_merge_factors, tsv_merge_matrix
from .svd import SVDFactors, compute_dtype, concat_factors, default_rank, orthogonalize, truncated_svd

__all__ = [
    "SVDFactors",
    "check_rank_options",
    "compress_matrix",
    "compute_dtype",
    "concat_factors",
    "default_rank",
    "energy_rank",
    "factor_numel",
    "fraction_rank",
    "layer_rank",
    "orthogonalize",
    "reconstruct",
    "truncated_svd",
    "tsv_merge_factors",
    "tsv_merge_matrix",
]
