"""TSV-M: Task Singular Vector Merging of one layer (Gargiulo et al., CVPR 2025, Alg. 1)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .svd import (
    DEFAULT_SVD_METHOD,
    SVDFactors,
    compute_dtype,
    concat_factors,
    default_rank,
    inv_sqrt_gram,
    orthogonalization_method,
    orthogonalize,
    truncated_svd,
)

__all__ = ["merge_dtype", "tsv_merge_factors", "tsv_merge_matrix"]


def merge_dtype(dtype: torch.dtype, method: str = DEFAULT_SVD_METHOD) -> torch.dtype:
    """The dtype TSV-M computes and keeps a matrix's per-task factors in: float64 on the Gram paths (``gram``,
    ``randomized``), whose whitening :math:`U (U^\top U)^{-1/2}` would amplify the float32 rounding of the
    factors by cond(U), large when Tk ≈ min(m, n); :func:`~.svd.compute_dtype` (float32 unless float64) for ``svd``."""
    return torch.float64 if orthogonalization_method(method) == "gram" else compute_dtype(dtype)


def tsv_merge_factors(factors: Sequence[SVDFactors], method: str = DEFAULT_SVD_METHOD) -> Tensor:
    r"""Merge per-task low-rank factors into one update :math:`M = U_\perp \Sigma V_\perp^\top`.

    :math:`U = [U_1 \dots U_T]` and :math:`V = [V_1 \dots V_T]` are replaced by their nearest
    orthonormal matrices (:func:`orthogonalize`), :math:`\Sigma = \mathrm{blockdiag}(\Sigma_i)`.
    The result is computed in the factors' dtype (pass float32/float64 factors) and is not scaled by α.

    ``method`` is the SVD method the factors came from (:func:`~.svd.orthogonalization_method`). ``"svd"``
    takes the polar factors from SVDs; ``"gram"`` and ``"randomized"`` never form :math:`U_\perp` or :math:`V_\perp`: with the whitening identity
    :math:`U_\perp = U (U^\top U)^{-1/2}` it solves two :math:`Tk \times Tk` eigenproblems in float64
    and returns :math:`U \,[(U^\top U)^{-1/2} \Sigma (V^\top V)^{-1/2}]\, V^\top`; a side whose
    :math:`U^\top U` (or :math:`V^\top V`) is singular or ill-conditioned (e.g. ``Tk > min(m, n)``) takes the
    SVD polar factor instead, the other side keeps its whitening.

    Triplets with σ = 0 exactly (what :func:`truncated_svd` keeps of a zero update) are left out: their
    singular vectors are arbitrary and would still enter the orthogonalization.
    """
    gram_path = orthogonalization_method(method) == "gram"
    U, S, Vh = concat_factors(factors)
    nonzero = S != 0
    if not bool(nonzero.all()):  # σ = 0 (a zero update): its vectors are arbitrary and add nothing to Σ
        if not bool(nonzero.any()):
            return U.new_zeros(U.shape[0], Vh.shape[1])
        U, S, Vh = U[:, nonzero], S[nonzero], Vh[nonzero, :]
    w_u = inv_sqrt_gram(U) if gram_path else None
    w_v = inv_sqrt_gram(Vh.T) if gram_path else None
    if w_u is None and w_v is None:
        return (orthogonalize(U, "svd") * S) @ orthogonalize(Vh, "svd")
    # a side whose Gram matrix is too ill-conditioned to whiten takes the SVD polar factor P Qᵀ, its P kept
    # as the outer factor and its Tk × Tk Qᵀ folded into the core; the other side keeps its whitening
    if w_u is None:
        U, _, w_u = torch.linalg.svd(U, full_matrices=False)
    if w_v is None:
        w_v, _, Vh = torch.linalg.svd(Vh, full_matrices=False)
    core = (w_u.to(torch.float64) * S.to(torch.float64)) @ w_v.to(torch.float64)  # Tk × Tk
    return U @ (core.to(Vh.dtype) @ Vh)


def tsv_merge_matrix(
    deltas: Sequence[Tensor],
    k: Optional[int] = None,
    method: str = DEFAULT_SVD_METHOD,
    *,
    rank_revealing: bool = True,
    storage_dtype: Optional[torch.dtype] = None,
    weight_rms: Optional[float] = None,
    return_ranks: bool = False,
) -> Union[Tensor, Tuple[Tensor, List[int]]]:
    r"""TSV-M of one weight matrix from the task updates :math:`\Delta_i = \theta_i - \theta_0`.

    :math:`M = U_\perp \Sigma V_\perp^\top` where :math:`U, \Sigma, V` concatenate the top-``k``
    singular triplets of every :math:`\Delta_i`; ``k`` defaults to ``floor(min(m, n) / T)`` (at least 1).
    The result has the inputs' dtype and is not scaled by α: the merged weight is :math:`\theta_0 + \alpha M`.

    ``method``: ``"gram"`` (default: Gram/eigh paths of :func:`truncated_svd` and :func:`tsv_merge_factors`,
    factors and merge in float64 (:func:`merge_dtype`), so on float32 updates the result is their float64 merge
    rounded to float32: 2.6e-8 relative (Frobenius) at most on random 64×64 … 96×48 updates, T = 2 … 20),
    ``"svd"`` (float32 SVDs on float32 updates, FusionBench's numerics: 1.8e-5 on the same updates, the SVD's
    float32 error amplified by cond(U)) or ``"randomized"`` (approximate per-task SVD, Gram orthogonalization).

    ``rank_revealing`` (default on) keeps :math:`k_i = \min(k, \mathrm{rank}_\tau(\Delta_i))` triplets per
    task (:func:`truncated_svd`, threshold in :mod:`.rank`; ``storage_dtype`` and ``weight_rms`` add the
    storage-rounding floor), so rank-deficient (LoRA) updates merge to one well-defined matrix; updates
    whose top-k σ all exceed the threshold merge exactly as without it. ``return_ranks=True`` returns
    ``(M, [k_1, ..., k_T])``.
    """
    if len(deltas) == 0:
        raise ValueError("tsv_merge_matrix needs at least one task matrix")
    shape, dtype = deltas[0].shape, deltas[0].dtype
    for i, d in enumerate(deltas):
        if d.dim() != 2 or d.shape != shape:
            raise ValueError(f"deltas[{i}] has shape {tuple(d.shape)}, expected the 2-D shape {tuple(shape)}")
    k = default_rank(shape, len(deltas)) if k is None else k
    factors = [
        truncated_svd(d, k, method, rank_revealing=rank_revealing, storage_dtype=storage_dtype, weight_rms=weight_rms,
                      factor_dtype=merge_dtype(dtype, method))
        for d in deltas
    ]
    merged = tsv_merge_factors(factors, method).to(dtype)
    return (merged, [int(f.S.numel()) for f in factors]) if return_ranks else merged
