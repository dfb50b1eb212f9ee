"""Independent float64 evaluations of the formulas, and error bounds derived from the arithmetic, shared by
the tests (not the package's code paths).

Round-off model (Higham, *Accuracy and Stability of Numerical Algorithms*; Higham & Mary 2019 for the √n
growth of random round-off): a length-n inner product in a dtype with machine epsilon ε errs by about
√n·ε·(size of the terms); backward-stable SVD/eigensolvers err by about √n·ε·‖A‖ in the matrix, which a
singular vector amplifies by ‖A‖/gap (Wedin) and a polar factor by 1/σ_min (its Fréchet derivative).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

#: constant of every round-off bound: the √n·ε estimates count a handful of operations each
C_ROUNDOFF = 8.0


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (ε₆₄ = 2⁻⁵², ε₃₂ = 2⁻²³, fp16 2⁻¹⁰, bf16 2⁻⁷)."""
    return torch.finfo(dtype).eps


def roundoff_bound(dtype: torch.dtype, n: int, scale: float, c: float = C_ROUNDOFF) -> float:
    """c·√n·ε·scale: the round-off of length-n sums of terms of size ``scale`` in ``dtype``."""
    return c * math.sqrt(n) * eps(dtype) * scale


def _float64(a) -> torch.Tensor:
    return (a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))).detach().double()


def max_error(got, expected) -> float:
    """max |got − expected|, evaluated in float64."""
    got, expected = _float64(got), _float64(expected)
    assert got.shape == expected.shape, f"shape {tuple(got.shape)} != expected {tuple(expected.shape)}"
    return (got - expected).abs().max().item() if got.numel() else 0.0


def assert_within(got, expected, bound, what: str = "") -> float:
    """Assert |got − expected| <= bound (a number, or a tensor of entrywise bounds; NaN fails); the message
    shows the measured error and the bound where the bound is exceeded most. Returns max |got − expected|."""
    err = max_error(got, expected)
    diff = (_float64(got) - _float64(expected)).abs()
    excess = torch.nan_to_num(diff - _float64(bound), nan=float("inf"))
    if excess.numel() and excess.max().item() > 0:
        i = int(excess.flatten().argmax())
        at_bound = _float64(bound).expand_as(diff).flatten()[i].item()
        raise AssertionError(f"{what}: |error| = {diff.flatten()[i].item():.3e} exceeds the bound {at_bound:.3e}"
                             f" (entry {i}; max |error| {err:.3e})")
    return err


# ------------------------------------------------------------------------------------- float64 oracles
def inv_sqrt_psd(g: torch.Tensor) -> torch.Tensor:
    """(G)^(-1/2) of a symmetric positive-definite matrix by eigendecomposition."""
    w, q = torch.linalg.eigh(g)
    return q @ torch.diag(w.rsqrt()) @ q.T


def polar(a: np.ndarray) -> np.ndarray:
    """The polar factor P Qᵀ of the thin SVD A = P D Qᵀ (numpy, float64): the nearest matrix with
    orthonormal columns (rows, if A is wide), defined whenever A has full rank min(m, n), so also for a
    wide m × Tk concatenation with Tk > m."""
    p, _, qh = np.linalg.svd(np.asarray(a, dtype=np.float64), full_matrices=False)
    return p @ qh


def task_triplets(deltas: Sequence, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """U = [U₁…U_T] (m × Tk), the diagonal of Σ = blockdiag(Σᵢ) and V = [V₁…V_T] (n × Tk) from numpy's
    float64 SVDs of the Δᵢ, plus every Δᵢ's full spectrum."""
    us, ss, vs, spectra = [], [], [], []
    for d in deltas:
        u, s, vh = np.linalg.svd(as_float64(d), full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T), spectra.append(s)
    return np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1), spectra


def oracle_tsv_merge(deltas: Sequence, k: int) -> torch.Tensor:
    """TSV-M's U⊥ Σ V⊥ᵀ in float64 from the definition: U⊥ = P Qᵀ from the thin SVD of U (numpy), also
    when Tk > min(m, n) makes U rank-deficient (UᵀU singular)."""
    U, S, V, _ = task_triplets(deltas, k)
    return torch.from_numpy((polar(U) * S) @ polar(V).T)


def merge_sensitivity(deltas: Sequence, k: int, gram: bool = False, truncation: bool = True) -> float:
    """κ, the factor by which TSV-M amplifies a relative perturbation of the Δᵢ (first order): max over
    tasks of max(1, σ_k/(σ_k − σ_{k+1})) (the kept part of a top-k truncation, Wedin), times σ₁/σ_k when
    the factors come from the Gram matrix ΔᵀΔ (``gram``: its eigenvectors see ε·σ₁², and U = ΔV/σ divides
    by σ_k), times the polar factors' 1/σ_min(U), 1/σ_min(V) (the m × Tk / n × Tk concatenations).
    ``truncation=False``: the factors are the same on both sides (the same SVD of the same Δᵢ), only the
    orthogonalization and products differ."""
    U, _, V, spectra = task_triplets(deltas, k)
    cut = 1.0
    for s in spectra if truncation else ():
        kept = max(1.0, s[k - 1] / (s[k - 1] - s[k])) if k < len(s) else 1.0
        cut = max(cut, kept * (s[0] / s[k - 1] if gram else 1.0))
    smin = min(np.linalg.svd(U, compute_uv=False)[-1], np.linalg.svd(V, compute_uv=False)[-1])
    return float(cut / smin)


def merge_bound(deltas: Sequence, k: int, dtype: torch.dtype, gram: bool = False, truncation: bool = True,
                c: float = C_ROUNDOFF) -> float:
    """Bound on max |TSV-M computed in ``dtype`` − the float64 oracle|: c·√n·ε·σ₁·κ with n = max(m, n),
    σ₁ the largest singular value of any Δᵢ (the size of M) and κ = :func:`merge_sensitivity`."""
    shape = tuple(deltas[0].shape)
    sigma1 = max(float(np.linalg.norm(as_float64(d), 2)) for d in deltas)
    return roundoff_bound(dtype, max(shape), sigma1 * merge_sensitivity(deltas, k, gram, truncation), c)


def as_float64(a) -> np.ndarray:
    """A tensor or array as a float64 numpy array."""
    return a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)


def oracle_rank_k(delta, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-k approximation (Eckart–Young) and all singular values, by numpy's float64 SVD."""
    U, S, Vh = np.linalg.svd(as_float64(delta), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k, :], S


def rank_k_bound(delta, k: int, dtype: torch.dtype, gram: bool = False, c: float = C_ROUNDOFF) -> float:
    """Bound on max |rank-k reconstruction computed in ``dtype`` − the float64 one|: c·√n·ε·σ₁·max(1, σ_k/(σ_k − σ_{k+1}))
    (the SVD's backward error, amplified at the cut by Wedin's gap; no cut when k = rank), times σ₁/σ_k for
    factors from the Gram matrix (``gram``, as in :func:`merge_sensitivity`)."""
    _, s = oracle_rank_k(delta, k)
    amplification = max(1.0, s[k - 1] / (s[k - 1] - s[k])) if k < len(s) else 1.0
    amplification *= s[0] / s[k - 1] if gram else 1.0
    return roundoff_bound(dtype, max(delta.shape), float(s[0]) * amplification, c)


def oracle_sti(deltas: Sequence, k: int, *, decorrelate: bool = False) -> tuple[float, float]:
    """STI = ‖(UᵀU − I) Σ (VᵀV − I)‖₁ (entrywise) in float64 and ‖Σ‖₁; with ``decorrelate`` U, V are first
    replaced by their polar factors."""
    U, S, V, _ = task_triplets(deltas, k)
    if decorrelate:
        U, V = polar(U), polar(V)
    eye = np.eye(U.shape[1])
    return float(np.abs((U.T @ U - eye) @ np.diag(S) @ (V.T @ V - eye)).sum()), float(np.abs(S).sum())


def mean_of_updates(states: Sequence[dict], base: dict, key: str) -> torch.Tensor:
    """θ₀ + the mean of the task updates of one parameter, in float64."""
    theta0 = base[key].double()
    return theta0 + sum(s[key].double() - theta0 for s in states) / len(states)


def oracle_merge_state(base: dict, states: Sequence[dict], dtype: torch.dtype, *, gram: bool = False,
                       truncation: bool = True, alpha=1.0, exclude=(), rank: Optional[int] = None) -> tuple[dict, dict]:
    """TSV-M of whole state dicts in float64, and for each parameter the bound on a computation in ``dtype``.

    2-D floating parameters not matched by an ``exclude`` glob: :func:`oracle_tsv_merge` with
    k = ``rank`` or max(1, floor(min(m, n)/T)), bound :func:`merge_bound` in ``dtype``; the others: the mean
    update, bound c·√T·ε·max|Δ| (a sum of T terms in θ's precision, at least float32). ``alpha``: a number scales the update, a list scales each
    Δᵢ before the SVD (as the package and FusionBench do). Every bound adds the rounding of the result to
    the parameter's dtype, ε·max|θ| (twice ε/2: either side of a comparison of two computed results).
    """
    from fnmatch import fnmatchcase

    T = len(states)
    scales, final = (list(alpha), 1.0) if isinstance(alpha, (list, tuple)) else ([1.0] * T, float(alpha))
    expected, bounds = {}, {}
    for key, theta0 in base.items():
        if not torch.is_floating_point(theta0):
            expected[key], bounds[key] = theta0, 0.0
            continue
        deltas = [a * (s[key].double() - theta0.double()) for a, s in zip(scales, states)]  # exact in float64
        if theta0.dim() == 2 and not any(fnmatchcase(key, p) for p in exclude):
            k = rank or max(1, min(theta0.shape) // T)
            update, bound = oracle_tsv_merge(deltas, k), merge_bound(deltas, k, dtype, gram, truncation)
        else:
            update = sum(deltas) / T  # accumulated in θ's own precision, at least float32
            work = torch.float64 if theta0.dtype == torch.float64 else torch.float32
            bound = roundoff_bound(work, T, max(d.abs().max().item() for d in deltas))
        expected[key] = theta0.double() + final * update
        bounds[key] = abs(final) * bound + eps(theta0.dtype) * expected[key].abs().max().item()
    return expected, bounds


def assert_state_within(got: dict, expected: dict, bounds: dict, what: str = "", keys=None) -> dict:
    """:func:`assert_within` for every parameter (or ``keys``); returns the measured errors."""
    assert keys is not None or set(got) == set(expected), f"{what}: keys {set(got) ^ set(expected)} differ"
    return {key: assert_within(got[key], expected[key], bounds[key], f"{what} {key}") for key in keys or expected}


def assert_merge_matrix(got: torch.Tensor, deltas: Sequence, k: int, dtype: torch.dtype, gram: bool = False,
                        what: str = "TSV-M") -> float:
    """``got`` (computed in ``dtype``, returned in ``got.dtype``) against :func:`oracle_tsv_merge`, within
    :func:`merge_bound` plus, entry by entry, the rounding of the result to its dtype (ε/2·|Mᵢⱼ|).

    The bound must be below max|M|/T, the share of one task: else a merge that drops a task could pass."""
    expected = oracle_tsv_merge(deltas, k)
    size = expected.abs().max().item()
    computed = merge_bound(deltas, k, dtype, gram)
    bound = computed + eps(got.dtype) / 2 * expected.abs()
    assert computed + eps(got.dtype) / 2 * size < size / len(deltas), (
        f"{what}: the bound {computed:.3e} + rounding cannot tell one task's share {size / len(deltas):.3e}")
    return assert_within(got, expected, bound, what)


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


def sti_bound(deltas, k, dtype) -> float:
    """Bound on |STI computed in ``dtype`` − the float64 oracle|: the entries of UᵀU − I err by c·√m·ε·κ
    (κ = 1 + σ₁/gap, the singular vectors' sensitivity at the cut), weighted by Σ and by |VᵀV − I| ≤ Tk:
    c·√n·ε·κ·‖Σ‖₁·(Tk + 1) in all."""
    U, S, V, spectra = task_triplets(deltas, k)
    kappa = 1 + max(s[0] / (s[k - 1] - s[k]) if k < len(s) and s[k - 1] > s[k] else 0.0 for s in spectra)
    return roundoff_bound(dtype, max(deltas[0].shape), kappa * float(np.abs(S).sum()) * (U.shape[1] + 1))


def decorrelated_sti_bound(m: int, n: int, tk: int, dtype) -> float:
    """Bound on the normalized STI after decorrelation (exactly 0 when Tk <= min(m, n)): U⊥ = PQᵀ from an SVD
    is orthonormal to round-off whatever U's conditioning, so every entry of U⊥ᵀU⊥ − I is at most c·√m·ε
    (of V⊥ᵀV⊥ − I: c·√n·ε), and ‖AΣB‖₁ <= ‖Σ‖₁·max column sum of |A|·max row sum of |B|."""
    return tk**2 * roundoff_bound(dtype, m, 1.0) * roundoff_bound(dtype, n, 1.0)
