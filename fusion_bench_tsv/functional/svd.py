"""Truncated SVD, per-task factor concatenation and orthogonalization.

These are the pieces shared by TSV-C, TSV-M and STI (Gargiulo et al., "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081). Pure torch: no models,
no I/O; they run on whatever device and dtype the input has.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import lapack
from .interference import SVDFactors
from .rank import numerical_rank, rank_threshold
from .tsv_compression import compute_dtype, layer_rank

__all__ = [
    "SVDFactors",
    "compute_dtype",
    "default_rank",
    "truncated_svd",
    "concat_factors",
    "orthogonalize",
    "inv_sqrt_gram",
    "gram",
    "eigh_top",
    "SVD_METHODS",
    "DEFAULT_SVD_METHOD",
    "check_svd_method",
    "orthogonalization_method",
]

#: ``truncated_svd`` methods: ``"svd"`` full LAPACK SVD (reference), ``"gram"`` eigendecomposition of
#: the smaller Gram matrix in float64 (exact to float32 round-off, faster), ``"randomized"``
#: randomized subspace iteration (approximate; never a default).
SVD_METHODS = ("svd", "gram", "randomized")

#: The default SVD method of TSV-M: of :func:`~.merge.tsv_merge_matrix`, :func:`~.merge.tsv_merge_factors` and
#: the ``svd_method`` option (factors and merge in float64: the float64 merge rounded to the input dtype; fastest). The building blocks
#: :func:`truncated_svd` and :func:`orthogonalize` default to ``"svd"``, the reference they are checked against.
DEFAULT_SVD_METHOD = "gram"


def check_svd_method(method: str) -> str:
    """``method`` when it is one of :data:`SVD_METHODS`, else a ``ValueError`` listing them."""
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; expected one of {SVD_METHODS}")
    return method


def orthogonalization_method(method: str) -> str:
    """The orthogonalization that goes with a truncated-SVD ``method``: ``"svd"`` (polar factor from the
    SVD, FusionBench's numerics) for ``"svd"``, the float64 Gram whitening for the others."""
    return "svd" if check_svd_method(method) == "svd" else "gram"

#: Largest condition number of a Gram matrix ``AᵀA`` that the Gram (whitening) paths accept in float64;
#: above it they fall back to the SVD. cond(AᵀA) = cond(A)², so this is cond(A) <= 1e5.
GRAM_COND_LIMIT = 1e10


def default_rank(shape: Sequence[int], num_tasks: int) -> int:
    """TSV's per-task rank ``max(1, floor(min(m, n) / T))``: :func:`~.tsv_compression.layer_rank` without options."""
    return layer_rank(shape, num_tasks)


def _check_matrix(delta: Tensor, name: str = "delta") -> None:
    if delta.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(delta.shape)}")


# over ~60 lines only by its docstring (one entry per argument)
def truncated_svd(
    delta: Tensor,
    k: int,
    method: str = "svd",
    *,
    oversample: int = 10,
    niter: int = 4,
    seed: int = 0,
    rank_revealing: bool = False,
    storage_dtype: Optional[torch.dtype] = None,
    weight_rms: Optional[float] = None,
    factor_dtype: Optional[torch.dtype] = None,
) -> SVDFactors:
    r"""Top-``k`` singular triplets of a matrix: :math:`\Delta \approx U_k \Sigma_k V_k^\top`.

    By Eckart–Young this is the best rank-``k`` approximation of ``delta``; the squared Frobenius
    error is the sum of the discarded :math:`\sigma^2`. Half-precision inputs are decomposed in
    float32 and the factors are returned in the input's dtype.

    Args:
        delta: an ``m × n`` matrix.
        k: number of triplets, ``1 <= k <= min(m, n)``.
        method: ``"svd"`` (default here: the exact reference): full LAPACK SVD, then the top k. ``"gram"``: eigendecomposition
            of the smaller Gram matrix :math:`G = \Delta^\top\Delta` (or :math:`\Delta\Delta^\top`)
            formed and decomposed in float64, :math:`G = V \Lambda V^\top`, :math:`\sigma = \sqrt{\lambda}`,
            :math:`U = \Delta V \Sigma^{-1}` (exact: float64 keeps the squared condition number
            harmless; it falls back to ``"svd"`` when a kept :math:`\sigma` is below round-off).
            ``"randomized"``: Halko–Martinsson–Tropp randomized range finder with ``oversample``
            extra columns and ``niter`` power iterations (approximate, ``seed`` fixes it).
        rank_revealing: keep only the triplets whose σ is above the numerical-rank threshold
            (:func:`~.rank.numerical_rank`): :math:`k_i = \max(1, \min(k, \mathrm{rank}_\tau(\Delta)))`, so
            a rank-deficient update (LoRA) returns no arbitrary null-space vectors; a zero update keeps
            one triplet with σ = 0. Triplets above the threshold are returned exactly as without it.
            Off here (this is the plain top-k); the TSV functions built on it turn it on by default.
        storage_dtype, weight_rms: the dtype the checkpoints were stored in and the RMS of their
            weights (both or neither): adds the rounding-noise floor of the storage dtype to the threshold.
        factor_dtype: the dtype of the returned factors (None: the input's). ``torch.float64`` returns the
            ``"gram"`` path's float64 factors unrounded; the rank threshold is still that of the input's dtype.

    Returns:
        ``SVDFactors(U, S, Vh)`` with shapes ``(m, kᵢ)``, ``(kᵢ,)``, ``(kᵢ, n)``; ``kᵢ = k`` unless
        rank revealing dropped triplets (``k - S.numel()`` of them).
    """
    _check_matrix(delta)
    r = min(delta.shape)
    if not 1 <= k <= r:
        raise ValueError(f"rank k={k} is out of range for a {tuple(delta.shape)} matrix (1 <= k <= {r})")
    check_svd_method(method)
    work = delta.to(compute_dtype(delta.dtype))
    kept = _rank_rule(delta.shape, work.dtype, rank_revealing, storage_dtype, weight_rms)
    dtype = factor_dtype or delta.dtype
    out = None
    if method == "gram":
        out = _top_k_gram(work, k, kept, dtype)
    elif method == "randomized":
        out = _top_k_randomized(work, k, oversample, niter, seed)
    if out is None:
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        out = U[:, :k], S[:k], Vh[:k, :]
    U, S, Vh = out
    k_i = kept(S) if kept is not None else k
    if k_i < S.numel():
        U, S, Vh = U[:, :k_i], S[:k_i], Vh[:k_i, :]
    if U.dtype != dtype:
        U, S, Vh = U.to(dtype), S.to(dtype), Vh.to(dtype)
    return SVDFactors(U, S, Vh)


def _rank_rule(
    shape: Sequence[int],
    dtype: torch.dtype,
    rank_revealing: bool,
    storage_dtype: Optional[torch.dtype],
    weight_rms: Optional[float],
) -> Optional[Callable[[Tensor], int]]:
    """``σ ↦ kᵢ = max(1, min(len(σ), numerical rank))`` for descending top singular values, or None
    (keep all) without rank revealing. Checks the threshold options at once."""
    if not rank_revealing:
        if storage_dtype is not None or weight_rms is not None:
            raise ValueError("options 'storage_dtype' and 'weight_rms' set the rank threshold: they need rank_revealing=True")
        return None
    rank_threshold(0.0, shape, dtype, storage_dtype=storage_dtype, weight_rms=weight_rms)
    return lambda s: max(1, min(s.numel(), numerical_rank(s, shape, dtype, storage_dtype=storage_dtype, weight_rms=weight_rms)))


def _top_k_gram(
    a: Tensor, k: int, kept: Optional[Callable[[Tensor], int]] = None, dtype: Optional[torch.dtype] = None
) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    r"""Top-k triplets from the eigendecomposition of the smaller Gram matrix, in float64, returned in
    ``dtype`` (None: ``a``'s).

    ``kept(σ)``, if given, says how many of the top-k to keep (rank revealing). Returns None (the caller
    uses the SVD) when a kept singular value is too small for :math:`U = \Delta V \Sigma^{-1}` to be
    accurate (rank-deficient or zero matrices without rank revealing, float64 input with it).
    """
    m, n = a.shape
    wide = m < n
    x = (a.T if wide else a).to(torch.float64)  # tall: rows >= columns
    w, q = eigh_top(gram(x), k)
    s = w.clamp_min(0).sqrt()
    if kept is not None:
        r = kept(s)
        s, q = s[:r], q[:, :r]
    # U = X V / σ loses accuracy like eps·σ_max/σ; demand σ_k >= 1e-6 σ_1 (float64 keeps ~1e-10)
    if s[0] <= 0 or s[-1] < 1e-6 * s[0]:
        return None
    u = (x @ q) / s
    dtype = dtype or a.dtype
    if wide:  # a = (x)ᵀ = (U S Vᵀ)ᵀ = V S Uᵀ
        return q.to(dtype), s.to(dtype), u.T.to(dtype)
    return u.to(dtype), s.to(dtype), q.T.to(dtype)


def gram(x: Tensor, blocks: int = 4) -> Tensor:
    r"""The Gram matrix :math:`X^\top X` (``n × n``) of an ``m × n`` matrix.

    Only the blocks on and above the diagonal are multiplied (``blocks`` column blocks: 10 of 16 products
    for 4), the others are their transposes: about 1.5× faster than ``x.T @ x`` and exactly symmetric.
    """
    n = x.shape[1]
    if n < 128 * blocks:
        g = x.T @ x
        return (g + g.T) / 2
    edges = [n * i // blocks for i in range(blocks + 1)]
    cols = [x[:, edges[i] : edges[i + 1]] for i in range(blocks)]
    g = x.new_empty(n, n)
    for i in range(blocks):
        for j in range(i, blocks):
            block = cols[i].T @ cols[j]
            g[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = block
            if j != i:
                g[edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = block.T
    return g


def eigh_top(g: Tensor, k: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Largest ``k`` (default: all) eigenpairs of a symmetric matrix, eigenvalues in descending order.

    On the CPU, float32/float64 input goes to LAPACK ``?syevr`` (MRRR: only the requested eigenvectors
    are computed) without holding the GIL (:mod:`.lapack`), so threads can decompose several matrices at
    once; elsewhere (CUDA) ``torch.linalg.eigh``.
    """
    n = g.shape[-1]
    k = n if k is None else k
    if g.device.type == "cpu" and g.dim() == 2 and g.dtype in (torch.float32, torch.float64) and 1 <= k <= n:
        out = lapack.syevr_top(g.detach().numpy().copy(), k) if lapack.available(g.dtype) else None
        if out is not None:
            w, q = out
            return torch.from_numpy(w[::-1].copy()), torch.from_numpy(q[:, ::-1].copy())
    w, q = torch.linalg.eigh(g)
    return w.flip(-1)[..., :k], q.flip(-1)[..., :k]


def _top_k_randomized(a: Tensor, k: int, oversample: int, niter: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with QR-stabilized power iterations)."""
    m, n = a.shape
    p = min(k + oversample, m, n)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    q = torch.linalg.qr(a @ torch.randn(n, p, generator=gen, device=a.device, dtype=a.dtype)).Q
    for _ in range(niter):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub[:, :k]), s[:k], vh[:k]


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


def orthogonalize(a: Tensor, method: str = "svd") -> Tensor:
    r"""The nearest matrix to ``a`` with orthonormal columns (or rows, if ``a`` is wide).

    Orthogonal Procrustes / polar factor: with the thin SVD :math:`A = P D Q^\top`, returns
    :math:`P Q^\top`, which equals the whitening :math:`A (A^\top A)^{-1/2}` when :math:`A^\top A`
    is invertible (Gargiulo et al. 2025, Sec. 4).

    ``method`` is an SVD method (:func:`orthogonalization_method`): ``"svd"`` takes the SVD; the others
    compute the whitening form from the small Gram matrix in float64 (:func:`inv_sqrt_gram`) and fall
    back to the SVD when the Gram matrix is singular or ill-conditioned (condition number above
    ``GRAM_COND_LIMIT``).
    """
    _check_matrix(a, "a")
    if orthogonalization_method(method) == "gram":
        wide = a.shape[0] < a.shape[1]
        w = inv_sqrt_gram(a.T if wide else a)
        if w is not None:
            x = a.to(torch.float64)
            return ((w @ x) if wide else (x @ w)).to(a.dtype)
    P, _, Qh = torch.linalg.svd(a, full_matrices=False)
    return P @ Qh


def inv_sqrt_gram(a: Tensor) -> Optional[Tensor]:
    r""":math:`(A^\top A)^{-1/2}` of a tall ``m × p`` matrix (``p <= m``), in float64, or None.

    With :math:`A^\top A = Q \Lambda Q^\top` (symmetric eigendecomposition in float64) it is
    :math:`Q \Lambda^{-1/2} Q^\top`, so :math:`A (A^\top A)^{-1/2}` is the polar factor of ``A``
    (orthogonal Procrustes). Returns None when :math:`p > m`, or the Gram matrix is singular or its
    condition number exceeds ``GRAM_COND_LIMIT``: then use the SVD.
    """
    _check_matrix(a, "a")
    if a.shape[1] > a.shape[0]:
        return None
    x = a.to(torch.float64)
    lam, q = eigh_top(gram(x))
    if lam[0] <= 0 or lam[-1] <= lam[0] / GRAM_COND_LIMIT:
        return None
    return (q * lam.rsqrt()) @ q.T
