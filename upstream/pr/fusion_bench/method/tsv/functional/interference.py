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

from itertools import combinations_with_replacement
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
    factors: Sequence[SVDFactors],
    *,
    normalized: bool = False,
    decorrelate: bool = False,
    max_bytes: Optional[int] = None,
) -> Tensor:
    r"""STI :math:`\lVert (U^\top U - I)\Sigma(V^\top V - I)\rVert_1` (entrywise) of per-task factors.

    Args:
        factors: one ``SVDFactors`` per task (any rank each), all of the same ``m × n`` layer.
        normalized: divide by :math:`\lVert\Sigma\rVert_1 = \sum_i \sum_j \sigma_{ij}` (the sum of
            all kept singular values), so that layers of different sizes and scales compare.
        decorrelate: measure it after TSV-M's decorrelation, with :math:`U_\perp`, :math:`V_\perp`
            (orthogonal Procrustes) instead of U, V. This is ≈ 0 when ``Tk <= min(m, n)``.
        max_bytes: bound on the temporaries of the ``p × p`` product (``p = Σk``), which is never formed
            whole: it is summed over blocks of rows, each at most ``max_bytes`` (at least one row);
            ``None``: blocks of at most ``max(m, n)`` rows (temporaries about three times the factors).

    Returns:
        A 0-d tensor in the factors' dtype.
    """
    _check_tasks(len(factors), "STI")
    U, S, Vh = concat_factors(factors)
    if decorrelate:
        U, Vh = orthogonalize(U), orthogonalize(Vh)
    sti = _blocked_sti(U, S, Vh.T, max_bytes)
    return sti / S.abs().sum() if normalized else sti


def _blocked_sti(U: Tensor, S: Tensor, V: Tensor, max_bytes: Optional[int]) -> Tensor:
    r""":math:`\lVert (U^\top U - I)\Sigma(V^\top V - I)\rVert_1` summed over row blocks ``R`` of the product.

    ``(XΣY)ᵀ = YΣX`` has the same norm, so the rows are taken from the Gram matrix of the taller factor ``A``
    (formed once per row) and the other factor ``B`` is applied twice. When ``p <= max(m, n)`` (rank k) a block
    is ``X_R Σ (BᵀB − I) = ((X_R Σ) Bᵀ) B − X_R Σ`` with ``X_R = A_Rᵀ A − I_R``: ``X_R`` is formed directly, so
    after decorrelation (X ≈ 0) nothing large cancels. When ``p > max(m, n)`` (e.g. full rank) it is
    ``A_Rᵀ W − Σ_R B_Rᵀ B + Σ_R I_R`` with ``W = A Σ BᵀB − A Σ`` (``m × p``, once): a third fewer products, and
    the result is of the order of Σ, so no cancellation either.
    """
    A, B = (U, V) if U.shape[0] >= V.shape[0] else (V, U)
    (a, p), b = A.shape, B.shape[0]
    wide = p > a
    W = ((A * S) @ B.T) @ B - A * S if wide else None
    per_row = (2 * p + (0 if wide else b)) * A.element_size()  # bytes of one row of the block's temporaries
    rows = min(p, a) if max_bytes is None else max(1, min(p, max_bytes // per_row))
    total = torch.zeros((), dtype=A.dtype, device=A.device)
    for start in range(0, p, rows):
        R = slice(start, min(start + rows, p))
        if wide:
            block = A[:, R].T @ W
            block -= S[R, None] * (B[:, R].T @ B)
            block[:, R].diagonal().add_(S[R])
        else:
            x = A[:, R].T @ A
            x[:, R].diagonal().sub_(1)
            x *= S
            block = (x @ B.T) @ B
            block -= x
        total += block.abs().sum()
    return total


def pairwise_sti_from_factors(
    factors: Sequence[SVDFactors], *, normalized: bool = False, decorrelate: bool = False
) -> Tensor:
    r"""The ``T × T`` matrix of pairwise STI: entry ``(i, j)`` is the STI of the two-task
    concatenation :math:`U = [U_i\, U_j]`, :math:`V = [V_i\, V_j]`,
    :math:`\Sigma = \mathrm{blockdiag}(\Sigma_i, \Sigma_j)` (the same factors as for all T tasks),
    i.e. ``sti_from_factors([factors[i], factors[j]])``. The matrix is symmetric; the diagonal is 0
    by definition (a task does not interfere with itself). ``normalized`` divides entry ``(i, j)``
    by :math:`\lVert\Sigma_i\rVert_1 + \lVert\Sigma_j\rVert_1`.

    Each pair's Gram matrices are assembled from the tasks' own blocks ``U_iᵀU_i − I`` (formed once) and the
    pair's cross block ``U_iᵀU_j``: memory of the order of one pair, whatever T is.
    """
    T = len(factors)
    _check_tasks(T, "pairwise STI")
    if not decorrelate:
        own_u = [_gram_minus_identity(f.U) for f in factors]
        own_v = [_gram_minus_identity(f.Vh.T) for f in factors]

    def entry(i: int, j: int):
        if i == j:
            return 0.0
        if decorrelate:  # the pair's own decorrelation, not a sub-block of the T-task one
            Xp, Sp, Yp = _interference_parts([factors[i], factors[j]], True)
        else:
            fi, fj = factors[i], factors[j]
            Xp = _pair_gram(own_u[i], fi.U.T @ fj.U, own_u[j])
            Yp = _pair_gram(own_v[i], fi.Vh @ fj.Vh.T, own_v[j])
            Sp = torch.cat([fi.S, fj.S])
        value = ((Xp * Sp) @ Yp).abs().sum()
        return value / Sp.abs().sum() if normalized else value

    return _symmetric(T, entry, factors[0].S)


def _pair_gram(own_i: Tensor, cross: Tensor, own_j: Tensor) -> Tensor:
    """The symmetric two-task matrix ``[[G_ii, G_ij], [G_ijᵀ, G_jj]]`` from its blocks."""
    return torch.cat([torch.cat([own_i, cross], dim=1), torch.cat([cross.T, own_j], dim=1)])


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
        flat = [d.reshape(-1).to(compute_dtype(d.dtype)) for d in factors]  # views: no T × mn copy
        gram = _symmetric(len(flat), lambda i, j: flat[i] @ flat[j], flat[0])
    else:
        gram = _symmetric(len(factors), lambda i, j: _factor_inner(factors[i], factors[j]), factors[0].S)
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(gram.dtype).tiny), torch.zeros_like(gram))


def _symmetric(T: int, entry, like: Tensor) -> Tensor:
    """The symmetric ``T × T`` matrix of ``entry(i, j)`` for ``i <= j`` (one pair in memory at a time)."""
    out = torch.empty(T, T, dtype=like.dtype, device=like.device)
    for i, j in combinations_with_replacement(range(T), 2):
        out[i, j] = out[j, i] = entry(i, j)
    return out


def _factor_inner(a: SVDFactors, b: SVDFactors) -> Tensor:
    """Frobenius inner product of ``U_a Σ_a V_aᵀ`` and ``U_b Σ_b V_bᵀ`` from their factors."""
    return ((a.U.T @ b.U) * (a.Vh @ b.Vh.T) * a.S[:, None] * b.S[None, :]).sum()


def mean_pairwise_cosine(similarity: Tensor) -> Tensor:
    """Mean of the off-diagonal entries ``i < j`` of a ``T × T`` similarity matrix."""
    T = similarity.shape[0]
    _check_tasks(T, "mean pairwise cosine")
    i, j = torch.triu_indices(T, T, offset=1)
    return similarity[i, j].mean()
