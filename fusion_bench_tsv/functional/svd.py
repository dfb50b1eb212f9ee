"""Truncated SVD, per-task factor concatenation and orthogonalization.

These are the pieces shared by TSV-C, TSV-M and STI (Gargiulo et al., "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081). Pure torch: no models,
no I/O; they run on whatever device and dtype the input has.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "SVDFactors",
    "compute_dtype",
    "default_rank",
    "truncated_svd",
    "concat_factors",
    "orthogonalize",
]


class SVDFactors(NamedTuple):
    """Rank-k factors ``U (m×k)``, ``S (k)``, ``Vh (k×n)`` with ``U diag(S) Vh ≈ Δ``."""

    U: Tensor
    S: Tensor
    Vh: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the linear algebra runs in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_rank(shape: Sequence[int], num_tasks: int) -> int:
    """Per-task rank of the reference implementation, ``floor(min(m, n) / T)``, but never 0.

    FusionBench's TSV-M gives layers with ``min(m, n) < T`` zero components (the layer's update is
    silently dropped); we keep at least one singular triplet per task instead.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    return max(1, min(shape[-2:]) // num_tasks)


def _check_matrix(delta: Tensor, name: str = "delta") -> None:
    if delta.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(delta.shape)}")


def truncated_svd(delta: Tensor, k: int) -> SVDFactors:
    r"""Top-``k`` singular triplets of a matrix: :math:`\Delta \approx U_k \Sigma_k V_k^\top`.

    By Eckart–Young this is the best rank-``k`` approximation of ``delta``; the squared Frobenius
    error is the sum of the discarded :math:`\sigma^2`. Half-precision inputs are decomposed in
    float32 and the factors are returned in the input's dtype.

    Args:
        delta: an ``m × n`` matrix.
        k: number of triplets, ``1 <= k <= min(m, n)``.

    Returns:
        ``SVDFactors(U, S, Vh)`` with shapes ``(m, k)``, ``(k,)``, ``(k, n)``.
    """
    _check_matrix(delta)
    r = min(delta.shape)
    if not 1 <= k <= r:
        raise ValueError(f"rank k={k} is out of range for a {tuple(delta.shape)} matrix (1 <= k <= {r})")
    work = delta.to(compute_dtype(delta.dtype))
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    U, S, Vh = U[:, :k], S[:k], Vh[:k, :]
    if work.dtype != delta.dtype:
        U, S, Vh = U.to(delta.dtype), S.to(delta.dtype), Vh.to(delta.dtype)
    return SVDFactors(U, S, Vh)


def concat_factors(factors: Sequence[SVDFactors]) -> SVDFactors:
    r"""Concatenate per-task factors: :math:`U = [U_1 \dots U_T]` (column-wise, ``m × Σk``),
    :math:`\Sigma = \mathrm{blockdiag}(\Sigma_1 \dots \Sigma_T)` (returned as its diagonal) and
    :math:`V^\top = [V_1 \dots V_T]^\top` (row-wise, ``Σk × n``)."""
    if len(factors) == 0:
        raise ValueError("concat_factors needs at least one task's factors")
    return SVDFactors(
        torch.cat([f.U for f in factors], dim=1),
        torch.cat([f.S for f in factors], dim=0),
        torch.cat([f.Vh for f in factors], dim=0),
    )


def orthogonalize(a: Tensor) -> Tensor:
    r"""The nearest matrix to ``a`` with orthonormal columns (or rows, if ``a`` is wide).

    Orthogonal Procrustes / polar factor: with the thin SVD :math:`A = P D Q^\top`, returns
    :math:`P Q^\top`, which equals the whitening :math:`A (A^\top A)^{-1/2}` when :math:`A^\top A`
    is invertible (Gargiulo et al. 2025, Sec. 4).
    """
    _check_matrix(a, "a")
    P, _, Qh = torch.linalg.svd(a, full_matrices=False)
    return P @ Qh
