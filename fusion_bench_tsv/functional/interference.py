r"""Singular Task Interference (STI) of one layer (Gargiulo et al., CVPR 2025, Sec. 3, Eq. 4).

For task updates :math:`\Delta_i = U_i \Sigma_i V_i^\top` (top-``k`` triplets each),
:math:`U = [U_1 \dots U_T]` (``m × Tk``), :math:`V = [V_1 \dots V_T]` (``n × Tk``) and
:math:`\Sigma = \mathrm{blockdiag}(\Sigma_1 \dots \Sigma_T)`:

.. math::  \mathrm{STI} = \lVert (U^\top U - I)\, \Sigma\, (V^\top V - I) \rVert_1

The paper does not say which 1-norm; here it is the **entrywise** L1 norm (sum of absolute values
of the ``Tk × Tk`` matrix). It is 0 when the singular vectors of different tasks are mutually
orthogonal, and TSV-M drives it to (numerically) 0 by replacing U and V with their nearest
orthonormal matrices whenever ``Tk <= min(m, n)``.

If ``k`` exceeds the rank of some :math:`\Delta_i`, its extra singular vectors (σ ≈ 0) are an
arbitrary basis of the null space. Their σ ≈ 0 keeps them out of the product itself, but they enter
the orthogonalization of the decorrelated STI (as of TSV-M); the factors of :func:`task_factors` are rank-revealing by default, which drops them (:mod:`.rank`).

Pure torch: no models, no I/O.
"""

from __future__ import annotations

from itertools import combinations
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .svd import SVDFactors, compute_dtype, concat_factors, default_rank, orthogonalize, truncated_svd

__all__ = [
    "pairwise_singular_task_interference",
    "pairwise_sti_from_factors",
    "singular_task_interference",
    "sti_from_factors",
    "task_cosine_similarity",
    "mean_pairwise_cosine",
    "task_factors",
    "truncate_factors",
]


def _check_tasks(num_tasks: int, what: str) -> None:
    if num_tasks < 2:
        raise ValueError(f"{what} needs at least 2 tasks to measure interference, got {num_tasks}")


def task_factors(
    deltas: Sequence[Tensor],
    k: Optional[int] = None,
    *,
    rank_revealing: bool = True,
    storage_dtype: Optional[torch.dtype] = None,
    weight_rms: Optional[float] = None,
) -> list[SVDFactors]:
    """Validate per-task matrices and return their top-``k`` factors in the compute dtype.

    ``k=None`` is :func:`default_rank` (``floor(min(m, n) / T)``, at least 1); ``k = min(m, n)``
    is the full rank. With ``rank_revealing`` (default) a task keeps at most its numerical rank
    (:func:`truncated_svd`). Raises ``ValueError`` for fewer than 2 tasks, mismatched shapes or an
    out-of-range ``k``.
    """
    _check_tasks(len(deltas), "STI")
    shape = deltas[0].shape
    for i, d in enumerate(deltas):
        if d.dim() != 2 or d.shape != shape:
            raise ValueError(f"deltas[{i}] has shape {tuple(d.shape)}, expected the 2-D shape {tuple(shape)}")
    r = min(shape)
    k = default_rank(shape, len(deltas)) if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= r:
        raise ValueError(f"k={k!r} is out of range for {tuple(shape)} task matrices: need 1 <= k <= rank {r}")
    work = compute_dtype(deltas[0].dtype)
    return [
        truncated_svd(d.to(work), k, rank_revealing=rank_revealing, storage_dtype=storage_dtype, weight_rms=weight_rms)
        for d in deltas
    ]


def truncate_factors(factors: SVDFactors, k: int) -> SVDFactors:
    """The top-``k`` triplets of factors already sorted by decreasing singular value; all of them
    when there are fewer than ``k`` (factors that rank revealing cut at the numerical rank)."""
    if k < 1:
        raise ValueError(f"k={k} is out of range for factors: need k >= 1")
    return SVDFactors(factors.U[:, :k], factors.S[:k], factors.Vh[:k, :])


def _gram_minus_identity(a: Tensor) -> Tensor:
    """``AᵀA − I`` for the column matrix ``a`` (``m × p``)."""
    g = a.T @ a
    g.diagonal().sub_(1)
    return g


def _interference_parts(factors: Sequence[SVDFactors], decorrelate: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(UᵀU − I, diag(Σ), VᵀV − I)`` of the concatenated factors, optionally after TSV-M's
    decorrelation (U, Vᵀ replaced by :func:`orthogonalize`)."""
    U, S, Vh = concat_factors(factors)
    if decorrelate:
        U, Vh = orthogonalize(U), orthogonalize(Vh)
    # V = Vhᵀ, so VᵀV = Vh Vhᵀ
    return _gram_minus_identity(U), S, _gram_minus_identity(Vh.T)


def sti_from_factors(
    factors: Sequence[SVDFactors], *, normalized: bool = False, decorrelate: bool = False
) -> Tensor:
    r"""STI :math:`\lVert (U^\top U - I)\Sigma(V^\top V - I)\rVert_1` (entrywise) of per-task factors.

    Args:
        factors: one ``SVDFactors`` per task (any rank each), all of the same ``m × n`` layer.
        normalized: divide by :math:`\lVert\Sigma\rVert_1 = \sum_i \sum_j \sigma_{ij}` (the sum of
            all kept singular values), so that layers of different sizes and scales compare.
        decorrelate: measure it after TSV-M's decorrelation, with :math:`U_\perp`, :math:`V_\perp`
            (orthogonal Procrustes) instead of U, V. This is ≈ 0 when ``Tk <= min(m, n)``.

    Returns:
        A 0-d tensor in the factors' dtype.
    """
    _check_tasks(len(factors), "STI")
    U, S, Vh = concat_factors(factors)
    if decorrelate:
        U, Vh = orthogonalize(U), orthogonalize(Vh)
    (m, p), n = U.shape, Vh.shape[1]
    if p > max(m, n):
        # (UᵀU − I)Σ(VᵀV − I) = Uᵀ(UΣVᵀ)V − UᵀUΣ − ΣVᵀV + Σ costs p·m·n + p²·n instead of p³. Used
        # only here (e.g. full rank), where p > min(m, n) keeps STI of the order of Σ: no cancellation.
        gu, gv = U.T @ U, Vh @ Vh.T
        prod = (U.T @ ((U * S) @ Vh)) @ Vh.T
        prod -= gu * S[None, :] + S[:, None] * gv
        prod.diagonal().add_(S)
    else:
        X, Y = _gram_minus_identity(U), _gram_minus_identity(Vh.T)
        prod = (X * S) @ Y
    sti = prod.abs().sum()
    return sti / S.abs().sum() if normalized else sti


def pairwise_sti_from_factors(
    factors: Sequence[SVDFactors], *, normalized: bool = False, decorrelate: bool = False
) -> Tensor:
    r"""The ``T × T`` matrix of pairwise STI: entry ``(i, j)`` is the STI of the two-task
    concatenation :math:`U = [U_i\, U_j]`, :math:`V = [V_i\, V_j]`,
    :math:`\Sigma = \mathrm{blockdiag}(\Sigma_i, \Sigma_j)` (the same factors as for all T tasks),
    i.e. ``sti_from_factors([factors[i], factors[j]])``. The matrix is symmetric; the diagonal is 0
    by definition (a task does not interfere with itself). ``normalized`` divides entry ``(i, j)``
    by :math:`\lVert\Sigma_i\rVert_1 + \lVert\Sigma_j\rVert_1`.

    Computed from one pair of Gram matrices of all T tasks, whose blocks the pairs share.
    """
    T = len(factors)
    _check_tasks(T, "pairwise STI")
    if not decorrelate:
        X, S, Y = _interference_parts(factors, False)
        offsets = [0]
        for f in factors:
            offsets.append(offsets[-1] + f.S.numel())
        blocks = [torch.arange(a, b, device=S.device) for a, b in zip(offsets[:-1], offsets[1:])]
    out = torch.zeros(T, T, dtype=factors[0].S.dtype, device=factors[0].S.device)
    for i, j in combinations(range(T), 2):
        if decorrelate:  # the pair's own decorrelation, not a sub-block of the T-task one
            Xp, Sp, Yp = _interference_parts([factors[i], factors[j]], True)
        else:
            idx = torch.cat([blocks[i], blocks[j]])
            Xp, Sp, Yp = X[idx][:, idx], S[idx], Y[idx][:, idx]
        value = ((Xp * Sp) @ Yp).abs().sum()
        out[i, j] = out[j, i] = value / Sp.abs().sum() if normalized else value
    return out


def singular_task_interference(
    deltas: Sequence[Tensor], k: Optional[int] = None, *, normalized: bool = False, decorrelate: bool = False
) -> Tensor:
    r"""Singular Task Interference of one layer from the task updates :math:`\Delta_i = \theta_i - \theta_0`.

    .. math::  \mathrm{STI} = \lVert (U^\top U - I)\,\Sigma\,(V^\top V - I) \rVert_1

    with :math:`U, V` the column-wise concatenations of each task's top-``k`` left/right singular
    vectors and :math:`\Sigma` block-diagonal; :math:`\lVert\cdot\rVert_1` is the **entrywise** L1
    norm (sum of absolute values). Gargiulo et al., "Task Singular Vectors", CVPR 2025, Eq. 4.

    Args:
        deltas: T >= 2 task matrices of one shape ``m × n``.
        k: per-task rank; ``None`` is ``floor(min(m, n) / T)`` (at least 1); ``min(m, n)`` is full rank.
        normalized: divide by :math:`\lVert\Sigma\rVert_1` (the sum of the kept singular values).
        decorrelate: after TSV-M's decorrelation (≈ 0 when ``T·k <= min(m, n)``).

    Returns:
        A 0-d tensor, computed in float32 at least (float64 stays float64).
    """
    return sti_from_factors(task_factors(deltas, k), normalized=normalized, decorrelate=decorrelate)


def pairwise_singular_task_interference(
    deltas: Sequence[Tensor], k: Optional[int] = None, *, normalized: bool = False, decorrelate: bool = False
) -> Tensor:
    """The ``T × T`` pairwise STI of one layer (see :func:`pairwise_sti_from_factors`); entry
    ``(i, j)`` equals ``singular_task_interference([deltas[i], deltas[j]], k)`` with the ``k`` of all
    T tasks (default ``floor(min(m, n) / T)``)."""
    return pairwise_sti_from_factors(task_factors(deltas, k), normalized=normalized, decorrelate=decorrelate)


def task_cosine_similarity(factors: Sequence[SVDFactors | Tensor]) -> Tensor:
    r"""``T × T`` cosine similarity of the flattened task matrices, or of the flattened
    reconstructions :math:`\hat\Delta_i = U_i\Sigma_iV_i^\top` when given per-task factors.

    For factors it uses :math:`\langle\hat\Delta_i, \hat\Delta_j\rangle_F = \sum_{ab} \sigma_{ia}\,(U_i^\top U_j)_{ab}\,
    \sigma_{jb}\,(V_i^\top V_j)_{ab}` and :math:`\lVert\hat\Delta_i\rVert_F^2 = \sum_a \sigma_{ia}^2`, so
    it never forms the matrices. With full-rank factors it is the exact cosine similarity of the task
    vectors of the layer. A task with a zero update has cosine 0 with every task.
    """
    if isinstance(factors[0], Tensor):
        flat = torch.stack([d.reshape(-1).to(compute_dtype(d.dtype)) for d in factors])
        gram = flat @ flat.T
    else:
        gram = _factor_gram(factors)
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(gram.dtype).tiny), torch.zeros_like(gram))


def _factor_gram(factors: Sequence[SVDFactors]) -> Tensor:
    """``T × T`` Frobenius inner products of the tasks' ``U_i Σ_i V_iᵀ`` from their factors."""
    U, S, Vh = concat_factors(factors)
    inner = (U.T @ U) * (Vh @ Vh.T) * S[:, None] * S[None, :]
    sizes = torch.tensor([f.S.numel() for f in factors])
    # sum the Tk × Tk entries into T × T task blocks
    owner = torch.repeat_interleave(torch.arange(len(factors)), sizes).to(U.device)
    onehot = torch.nn.functional.one_hot(owner, len(factors)).to(inner.dtype)
    return onehot.T @ inner @ onehot


def mean_pairwise_cosine(similarity: Tensor) -> Tensor:
    """Mean of the off-diagonal entries ``i < j`` of a ``T × T`` similarity matrix."""
    T = similarity.shape[0]
    _check_tasks(T, "mean pairwise cosine")
    i, j = torch.triu_indices(T, T, offset=1)
    return similarity[i, j].mean()
