"""Independent float64 evaluations of the formulas, shared by the tests (not the package's code paths)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


def inv_sqrt_psd(g: torch.Tensor) -> torch.Tensor:
    """(G)^(-1/2) of a symmetric positive-definite matrix by eigendecomposition."""
    w, q = torch.linalg.eigh(g)
    return q @ torch.diag(w.rsqrt()) @ q.T


def oracle_tsv_merge(deltas, k):
    """U⊥ Σ V⊥ᵀ in float64 with the whitening form U (UᵀU)^(-1/2) (NOTES §1), block-diagonal Σ spelt out."""
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    U, V = torch.cat(us, 1), torch.cat(vs, 1)
    Sigma = torch.block_diag(*[torch.diag(s) for s in ss])
    U_perp = U @ inv_sqrt_psd(U.T @ U)
    V_perp = V @ inv_sqrt_psd(V.T @ V)
    return U_perp @ Sigma @ V_perp.T


class RankedMerge(NamedTuple):
    """A float64 NumPy TSV-M keeping a given number of triplets per task, with what bounds its perturbation."""

    merged: np.ndarray
    sigma_min_u: float  # σ_min of the concatenated U (the polar factor amplifies errors by 1/σ_min)
    sigma_min_v: float
    sigma_over_gap: float  # max over tasks of σ₁ / (smallest gap between kept σ, and from σ_r to 0)

    def error_bound(self, dtype: torch.dtype) -> float:
        """Relative Frobenius error of the merge computed in ``dtype``: an SVD's backward error ≈ c·ε·σ₁
        (c ≤ 2.5 measured at 64×48; 4 taken) moves each kept singular vector by ≈ c·ε·σ₁/gap; the polar
        factors amplify it by 1/σ_min(U), 1/σ_min(V); ‖M‖_F = ‖Σ‖_F."""
        return (1 / self.sigma_min_u + 1 / self.sigma_min_v) * 4 * torch.finfo(dtype).eps * self.sigma_over_gap


def numpy_ranked_merge(deltas, ranks) -> RankedMerge:
    """TSV-M in float64 NumPy keeping ``ranks[i]`` triplets of task i; polar factors from NumPy's SVD."""
    us, ss, vs, ratio = [], [], [], 0.0
    for d, r in zip(deltas, ranks):
        u, s, vh = np.linalg.svd(d.double().numpy(), full_matrices=False)
        us.append(u[:, :r]), ss.append(s[:r]), vs.append(vh[:r].T)
        ratio = max(ratio, s[0] / np.min(-np.diff(np.append(s[:r], 0.0))))
    U, S, V = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
    polar = [p @ qh for p, _, qh in (np.linalg.svd(x, full_matrices=False) for x in (U, V))]
    merged = polar[0] @ np.diag(S) @ polar[1].T
    return RankedMerge(merged, np.linalg.svd(U, compute_uv=False)[-1], np.linalg.svd(V, compute_uv=False)[-1], ratio)
