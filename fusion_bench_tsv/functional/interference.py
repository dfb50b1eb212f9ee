r"""Singular Task Interference (STI) of one layer (Gargiulo et al., "Task Singular
Vectors: Reducing Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081,
Eq. 4). With each task's top-`k` triplets $\Delta_i \approx U_i \Sigma_i V_i^\top$,
$U = [U_1 \dots U_T]$, $V = [V_1 \dots V_T]$, $\Sigma = \mathrm{blockdiag}(\Sigma_i)$:

$$\mathrm{STI} = \lVert (U^\top U - I)\, \Sigma\, (V^\top V - I) \rVert_1$$

with the **entrywise** L1 norm (the paper does not say which): 0 when different tasks'
singular vectors are orthogonal, round-off after TSVM's decorrelation if `Tk <= min(m,
n)`. Singular vectors beyond a task's rank (an arbitrary basis of its null space) would
still count: `top_k_svd` leaves them out.
"""

from __future__ import annotations

from itertools import combinations_with_replacement
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .tsv_compression import compute_dtype, layer_rank


class SVDFactors(NamedTuple):
    """Rank-k factors `U (m × k)`, `S (k)`, `Vh (k × n)`, `U diag(S) Vh ≈ Δ`;
    the functions here take any `(U, S, Vh)` triple."""

    U: Tensor
    S: Tensor
    Vh: Tensor


def _check_tasks(num_tasks: int, what: str) -> None:
    if num_tasks < 2:
        raise ValueError(f"{what} needs at least 2 tasks, got {num_tasks}")


def top_k_svd(delta: Tensor, k: int, rank_revealing: bool = True) -> SVDFactors:
    r"""The top-`k` singular triplets of `delta` (`torch.linalg.svd`); with
    `rank_revealing` at most its numerical rank, the σ above $\max(m, n)\varepsilon
    \sigma_1$ (`torch.linalg.matrix_rank`'s default tolerance), and at least one."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    if rank_revealing:
        tol = max(delta.shape) * torch.finfo(S.dtype).eps * float(S[0])
        k = max(1, min(k, int((S > tol).sum())))
    return SVDFactors(U[:, :k], S[:k], Vh[:k, :])


def task_factors(
    deltas: Sequence[Tensor],
    k: Optional[int] = None,
    *,
    svd: Callable[[Tensor, int], SVDFactors] = top_k_svd,
) -> List[SVDFactors]:
    """`svd(delta, k)` of each task, in float32 (float64 stays float64); `k=None`:
    `max(1, floor(min(m, n) / T))` (TSVM's), `min(m, n)`: full. `ValueError` for fewer
    than 2 tasks, mismatched shapes or an out-of-range `k`."""
    _check_tasks(len(deltas), "STI")
    shape = deltas[0].shape
    for i, d in enumerate(deltas):
        if d.dim() != 2 or d.shape != shape:
            raise ValueError(
                f"deltas[{i}] has shape {tuple(d.shape)}, "
                f"expected the 2-D shape {tuple(shape)}"
            )
    r = min(shape)
    k = layer_rank(shape, len(deltas)) if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= r:
        raise ValueError(
            f"k={k!r} is out of range for {tuple(shape)} task matrices: "
            f"need 1 <= k <= rank {r}"
        )
    work = compute_dtype(deltas[0].dtype)
    return [svd(d.to(work), k) for d in deltas]


def truncate_factors(factors: SVDFactors, k: int) -> SVDFactors:
    """The top-`k` of triplets sorted by decreasing σ (all if there are fewer)."""
    if k < 1:
        raise ValueError(f"k={k} is out of range for factors: need k >= 1")
    U, S, Vh = factors
    return SVDFactors(U[:, :k], S[:k], Vh[:k, :])


def _polar(a: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (rows if wide): `P Qᵀ` of the thin
    SVD `A = P D Qᵀ`, TSVM's decorrelation (orthogonal Procrustes)."""
    P, _, Qh = torch.linalg.svd(a, full_matrices=False)
    return P @ Qh


def _gram_minus_identity(a: Tensor) -> Tensor:
    g = a.T @ a
    g.diagonal().sub_(1)
    return g


def sti_from_factors(
    factors: Sequence[SVDFactors],
    *,
    normalized: bool = False,
    decorrelate: bool = False,
    max_bytes: Optional[int] = None,
) -> Tensor:
    r"""STI $\lVert (U^\top U - I)\Sigma(V^\top V - I)\rVert_1$ of task factors:
    `factors`: one `(U, S, Vh)` per task (any rank each). `normalized` divides by
    $\lVert\Sigma\rVert_1$ (the sum of the kept σ) so that layers compare;
    `decorrelate`: after TSVM's decorrelation (U, V replaced by their polar factors).
    The `p × p` product (`p = Σk`) is summed over blocks of rows of at most `max_bytes`
    (at least one row; None: `max(m, n)` rows). A 0-d tensor in the factors' dtype."""
    _check_tasks(len(factors), "STI")
    Us, Ss, Vhs = zip(*factors)
    U, S, Vh = torch.cat(Us, dim=1), torch.cat(Ss), torch.cat(Vhs)
    if decorrelate:
        U, Vh = _polar(U), _polar(Vh)
    sti = _blocked_sti(U, S, Vh.T, max_bytes)
    return sti / S.abs().sum() if normalized else sti


def _blocked_sti(U: Tensor, S: Tensor, V: Tensor, max_bytes: Optional[int]) -> Tensor:
    r"""The STI summed over row blocks `R` of `X Σ Y` (as `YΣX`: rows from the taller
    factor `A`). If `p <= max(m, n)` a block is `((X_R Σ) Bᵀ) B − X_R Σ`, `X_R = A_Rᵀ A
    − I_R`, so nothing large cancels after decorrelation (X ≈ 0); else `A_Rᵀ W − Σ_R
    B_Rᵀ B + Σ_R I_R` with `W = A Σ BᵀB − A Σ` (`m × p`, once): a third fewer products.
    """
    A, B = (U, V) if U.shape[0] >= V.shape[0] else (V, U)
    (a, p), b = A.shape, B.shape[0]
    wide = p > a
    W = ((A * S) @ B.T) @ B - A * S if wide else None
    per_row = (2 * p + (0 if wide else b)) * A.element_size()
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
    factors: Sequence[SVDFactors],
    *,
    normalized: bool = False,
    decorrelate: bool = False,
) -> Tensor:
    r"""The `T × T` pairwise STI, entry `(i, j)` that of the two tasks alone
    (diagonal 0); `normalized` divides it by $\lVert\Sigma_i\rVert_1 +
    \lVert\Sigma_j\rVert_1$. Without `decorrelate` a pair's Gram matrices are made of
    each task's `U_iᵀU_i − I` (formed once) and the pair's `U_iᵀU_j`.
    """
    T = len(factors)
    _check_tasks(T, "pairwise STI")
    if not decorrelate:
        own_u = [_gram_minus_identity(U) for U, _, _ in factors]
        own_v = [_gram_minus_identity(Vh.T) for _, _, Vh in factors]

    def entry(i: int, j: int):
        if i == j:
            return 0.0
        (Ui, Si, Vhi), (Uj, Sj, Vhj) = factors[i], factors[j]
        S = torch.cat([Si, Sj])
        if decorrelate:  # the pair's own decorrelation
            U, Vh = _polar(torch.cat([Ui, Uj], 1)), _polar(torch.cat([Vhi, Vhj]))
            X, Y = _gram_minus_identity(U), _gram_minus_identity(Vh.T)
        else:
            X = _pair_gram(own_u[i], Ui.T @ Uj, own_u[j])
            Y = _pair_gram(own_v[i], Vhi @ Vhj.T, own_v[j])
        value = ((X * S) @ Y).abs().sum()
        return value / S.abs().sum() if normalized else value

    return _symmetric(T, entry, factors[0][1])


def _pair_gram(own_i: Tensor, cross: Tensor, own_j: Tensor) -> Tensor:
    top = torch.cat([own_i, cross], dim=1)
    return torch.cat([top, torch.cat([cross.T, own_j], dim=1)])


def singular_task_interference(
    deltas: Sequence[Tensor],
    k: Optional[int] = None,
    *,
    normalized: bool = False,
    decorrelate: bool = False,
    svd: Callable[[Tensor, int], SVDFactors] = top_k_svd,
) -> Tensor:
    r"""STI of one layer from T >= 2 task updates $\Delta_i = \theta_i - \theta_0$
    of one shape `m × n` at per-task rank `k` (None: `max(1, floor(min(m, n) / T))`,
    `min(m, n)`: full); the options as `sti_from_factors`; `svd(delta, k)` returns a
    task's factors (`top_k_svd`). A 0-d tensor, float32 (float64 for float64 input)."""
    factors = task_factors(deltas, k, svd=svd)
    return sti_from_factors(factors, normalized=normalized, decorrelate=decorrelate)


def pairwise_singular_task_interference(
    deltas: Sequence[Tensor],
    k: Optional[int] = None,
    *,
    normalized: bool = False,
    decorrelate: bool = False,
    svd: Callable[[Tensor, int], SVDFactors] = top_k_svd,
) -> Tensor:
    """The `T × T` pairwise STI of one layer (`pairwise_sti_from_factors`) at
    the `k` of all T tasks; the options as `singular_task_interference`."""
    factors = task_factors(deltas, k, svd=svd)
    return pairwise_sti_from_factors(
        factors, normalized=normalized, decorrelate=decorrelate
    )


def task_cosine_similarity(tasks: Sequence) -> Tensor:
    r"""`T × T` cosine similarity of the flattened task matrices, or of the
    reconstructions $U_i\Sigma_iV_i^\top$ of per-task factors, which are never
    formed: $\langle\hat\Delta_i, \hat\Delta_j\rangle_F = \sum_{ab}
    \sigma_{ia}(U_i^\top U_j)_{ab}\sigma_{jb}(V_i^\top V_j)_{ab}$ (0 for a zero task).
    """
    if isinstance(tasks[0], Tensor):
        dtype = compute_dtype(tasks[0].dtype)
        flat = [d.reshape(-1).to(dtype) for d in tasks]
        gram = _symmetric(len(flat), lambda i, j: flat[i] @ flat[j], flat[0])
    else:
        gram = _symmetric(
            len(tasks), lambda i, j: _factor_inner(tasks[i], tasks[j]), tasks[0][1]
        )
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    tiny = torch.finfo(gram.dtype).tiny
    return torch.where(denom > 0, gram / denom.clamp_min(tiny), torch.zeros_like(gram))


def _symmetric(T: int, entry, like: Tensor) -> Tensor:
    out = torch.empty(T, T, dtype=like.dtype, device=like.device)
    for i, j in combinations_with_replacement(range(T), 2):
        out[i, j] = out[j, i] = entry(i, j)
    return out


def _factor_inner(a: SVDFactors, b: SVDFactors) -> Tensor:
    (Ua, Sa, Vha), (Ub, Sb, Vhb) = a, b
    return ((Ua.T @ Ub) * (Vha @ Vhb.T) * Sa[:, None] * Sb[None, :]).sum()


def mean_pairwise_cosine(similarity: Tensor) -> Tensor:
    """Mean of the off-diagonal entries `i < j` of a `T × T` similarity matrix."""
    T = similarity.shape[0]
    _check_tasks(T, "mean pairwise cosine")
    i, j = torch.triu_indices(T, T, offset=1)
    return similarity[i, j].mean()


def layer_interference(
    factors: Sequence[SVDFactors],
    k: int,
    *,
    full_rank: bool = False,
    cosine: Optional[Tensor] = None,
    max_bytes: Optional[int] = None,
) -> Tuple[Dict[str, Any], Tensor, Tensor]:
    r"""One layer's report from each task's full-rank factors (`full_rank`: the STI
    at full rank, then at rank `k` of their top `k`) or rank-`k` factors. Returns
    `(values, pairwise, pairwise_normalized)`: `values` has `kept` (each task's
    triplets at rank k), `sti_full` (None without `full_rank`), `sti`,
    `sti_decorrelated`, each also `*_normalized` by $\lVert\Sigma\rVert_1$, and
    `cosine_mean` (of `cosine`, the `T × T` cosines of the task matrices, None: of the
    factors); then the pairwise STI at rank k, float64 on the CPU."""
    full = factors if full_rank else None
    factors = [truncate_factors(f, k) for f in factors] if full_rank else factors
    cosine = task_cosine_similarity(factors) if cosine is None else cosine
    sigma = torch.stack([S.abs().sum() for _, S, _ in factors]).double().cpu()
    values: Dict[str, Any] = {"kept": [int(S.numel()) for _, S, _ in factors]}
    values["sti_full"] = values["sti_full_normalized"] = None
    if full is not None:
        values["sti_full"] = float(sti_from_factors(full, max_bytes=max_bytes).double())
        l1 = float(sum(S.abs().sum() for _, S, _ in full).double())
        values["sti_full_normalized"] = values["sti_full"] / l1
    for name, decorrelate in (("sti", False), ("sti_decorrelated", True)):
        sti = sti_from_factors(factors, decorrelate=decorrelate, max_bytes=max_bytes)
        values[name] = float(sti.double())
        values[f"{name}_normalized"] = values[name] / float(sigma.sum())
    values["cosine_mean"] = float(mean_pairwise_cosine(cosine).double())
    pair = pairwise_sti_from_factors(factors).double().cpu()
    return values, pair, pair / (sigma[:, None] + sigma[None, :])
