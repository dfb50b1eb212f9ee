"""Independent float64 evaluations of the formulas, shared by the tests (not the package's code paths)."""

from __future__ import annotations

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
