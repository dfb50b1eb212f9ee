"""TSV-C of one matrix with rank revealing: :func:`.tsv_compression.compress_matrix` (the
top-k triplets, shared with FusionBench) capped at the numerical rank of the update (:mod:`.rank`).

The rank choice (:func:`~.tsv_compression.layer_rank`, ``fraction``/``rank``/``energy``), the
reconstruction and the storage layout are in :mod:`.tsv_compression`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import tsv_compression
from .rank import numerical_rank, rank_threshold
from .svd import SVDFactors, compute_dtype

__all__ = ["compress_matrix"]


def compress_matrix(
    delta: Tensor,
    k: Optional[int] = None,
    *,
    energy: Optional[float] = None,
    rank_revealing: bool = True,
    storage_dtype: Optional[torch.dtype] = None,
    weight_rms: Optional[float] = None,
) -> SVDFactors:
    r"""Compress one task update to its top-k singular triplets :math:`(U_k, \Sigma_k, V_k^\top)`.

    :func:`.tsv_compression.compress_matrix` (``k`` or ``energy``, exactly one). With ``rank_revealing``
    (default) at most the numerical rank of ``delta`` is kept, at least one triplet: the triplets dropped
    have σ at round-off or storage-noise level (``storage_dtype``/``weight_rms``, see :mod:`.rank`), so the
    result may have fewer than ``k`` triplets; the ones kept are exactly those of the plain top-k.
    """
    if not rank_revealing:
        if storage_dtype is not None or weight_rms is not None:
            raise ValueError("options 'storage_dtype' and 'weight_rms' set the rank threshold: they need rank_revealing=True")
        return SVDFactors(*tsv_compression.compress_matrix(delta, k, energy=energy))
    work = compute_dtype(delta.dtype)
    rank_threshold(0.0, delta.shape, work, storage_dtype=storage_dtype, weight_rms=weight_rms)  # checks the options
    U, S, Vh = tsv_compression.compress_matrix(delta, k, energy=energy)
    kept = max(1, min(S.numel(), numerical_rank(S.to(work), delta.shape, work, storage_dtype=storage_dtype,
                                                 weight_rms=weight_rms)))
    return SVDFactors(U[:, :kept], S[:kept], Vh[:kept, :])
