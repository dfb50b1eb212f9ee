"""The fast numeric paths of functional/ (Gram/eigh top-k SVD, LAPACK dsyevr, Gram whitening, randomized
SVD, their TSV-M) against float64 oracles and against the reference paths; one validation of SVD methods."""

from __future__ import annotations


import pytest
import torch
from oracles import assert_merge_matrix, assert_within, eps, inv_sqrt_psd, roundoff_bound

from fusion_bench_tsv import TSVMergeAlgorithm
from fusion_bench_tsv.functional import (
    eigh_top,
    inv_sqrt_gram,
    orthogonalize,
    truncated_svd,
    tsv_merge_factors,
    tsv_merge_matrix,
)


def matrix_with_spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """Q₁ diag(s) Q₂ᵀ in float64 with random orthonormal Q₁, Q₂: a prescribed spectrum."""
    gen = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=torch.float64)).Q
    return (q1 * s) @ q2.T


def noisy_low_rank(m, n, seed, rank=4, noise=1e-2):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, rank, generator=gen, dtype=torch.float64)
    b = torch.randn(rank, n, generator=gen, dtype=torch.float64)
    return a @ b + noise * torch.randn(m, n, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------------------------- truncated SVD
@pytest.mark.parametrize("shape,k", [((40, 40), 5), ((90, 30), 30), ((25, 70), 8), ((64, 48), 1)])
def test_gram_truncated_svd_is_the_float64_top_k(shape, k):
    d = noisy_low_rank(*shape, seed=shape[0] + k)
    U, S, Vh = truncated_svd(d, k, "gram")
    assert U.shape == (shape[0], k) and S.shape == (k,) and Vh.shape == (k, shape[1])
    u, s_all, vh = torch.linalg.svd(d, full_matrices=False)
    n, s1, sk = max(shape), s_all[0].item(), s_all[k - 1].item()
    # eigenvalues of G = DᵀD err by c·√n·ε₆₄·σ₁², so σ = √λ errs by that / (2σ) <= c·√n·ε₆₄·σ₁²/σ_k
    assert_within(S, s_all[:k], roundoff_bound(torch.float64, n, s1**2 / sk), "σ")
    residual = (s_all[k:] ** 2).sum()  # Eckart–Young; an entrywise error δ changes ‖R‖² by <= 2‖R‖δ√(mn) + mnδ²
    delta = roundoff_bound(torch.float64, n, s1**2 / sk)
    mn = shape[0] * shape[1]
    assert_within(torch.linalg.norm(d - (U * S) @ Vh) ** 2, residual,
                  2 * residual.sqrt().item() * delta * mn**0.5 + mn * delta**2, "Eckart–Young")
    # vectors: Gram eigenvectors err by c·√n·ε₆₄·σ₁²/(σ_i² − σ_j²) <= ...·σ₁²/(σ_k·gap); U = DV/σ adds σ₁/σ_k
    gaps = (s_all[:-1] - s_all[1:])[:k]  # next to each kept σ, the k-th's to σ_{k+1} included when there is one
    gap = gaps.min().item() if len(gaps) else sk
    vectors = roundoff_bound(torch.float64, n, s1**2 / (sk * gap) + s1 / sk)
    assert_within(U.T @ U, torch.eye(k, dtype=d.dtype), 2 * vectors, "UᵀU = I")
    assert_within(Vh @ Vh.T, torch.eye(k, dtype=d.dtype), 2 * vectors, "VᵀV = I")
    # the same triplets as the LAPACK SVD, up to the sign of each pair
    sign = torch.sign((U * u[:, :k]).sum(0))
    assert_within(U, u[:, :k] * sign, vectors, "U")
    assert_within(Vh, vh[:k] * sign[:, None], vectors, "V")


def test_gram_truncated_svd_near_degenerate_spectrum():
    """Clusters of singular values equal to 1e-9 relative: the rank-k approximation is still exact
    when the cut does not split a cluster (individual vectors inside a cluster are not unique)."""
    s = torch.tensor([5.0, 5.0 * (1 + 1e-9), 5.0 * (1 - 1e-9), 2.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.1], dtype=torch.float64)
    d = matrix_with_spectrum(60, 45, s.sort(descending=True).values, seed=3)
    for k in (3, 5, 6, 9):
        U, S, Vh = truncated_svd(d, k, "gram")
        u, s_ref, vh = torch.linalg.svd(d, full_matrices=False)
        # the Gram path squares the spectrum: c·√n·ε₆₄·σ₁²/σ_k for σ; the rank-k product sees the gap at the cut
        assert_within(S, s_ref[:k], roundoff_bound(torch.float64, 60, (s[0] ** 2 / s[k - 1]).item()), f"σ, k={k}")
        cut = (s[0] ** 2 / (s[k - 1] - s[k])).item()
        assert_within((U * S) @ Vh, (u[:, :k] * s_ref[:k]) @ vh[:k], roundoff_bound(torch.float64, 60, cut), f"k={k}")


def test_gram_float32_input_close_to_float64_and_keeps_dtype():
    d = noisy_low_rank(50, 30, seed=2)
    U, S, Vh = truncated_svd(d.float(), 6, "gram")
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    s_all = torch.linalg.svdvals(d)
    # rounding D to float32 moves each σ by <= ‖E‖ <= √(mn)·ε₃₂/2·max|D| (Weyl); σ is then rounded to float32
    weyl = (50 * 30) ** 0.5 * eps(torch.float32) / 2 * d.abs().max().item()
    assert_within(S, s_all[:6], weyl + eps(torch.float32) / 2 * s_all[0].item(), "float32 σ")


def test_gram_falls_back_to_svd_on_rank_deficient_and_zero_matrices():
    d = noisy_low_rank(30, 20, seed=4, rank=2, noise=0.0)  # exactly rank 2, k = 5
    U, S, Vh = truncated_svd(d, 5, "gram")
    s1 = torch.linalg.matrix_norm(d, 2).item()
    # the SVD fallback: backward stable, c·√n·ε₆₄·σ₁ for σ and for the reconstruction of the rank-2 matrix
    assert_within(S, torch.linalg.svd(d, full_matrices=False).S[:5], roundoff_bound(torch.float64, 30, s1), "σ")
    assert_within((U * S) @ Vh, d, roundoff_bound(torch.float64, 30, s1), "rank-2 reconstruction")
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    U, S, Vh = truncated_svd(torch.zeros(8, 6), 2, "gram")
    assert torch.equal(S, torch.zeros(2)) and torch.isfinite(U).all()


def test_randomized_svd_exact_on_low_rank_and_reported_error_on_noise():
    d = noisy_low_rank(80, 60, seed=5, rank=6, noise=0.0)
    U, S, Vh = truncated_svd(d, 6, "randomized")
    s_all = torch.linalg.svdvals(d)
    # exact rank 6: the range finder captures it; QR + SVD round-off c·√n·ε₆₄·σ₁·σ₁/σ₆ (power iterations)
    exact = roundoff_bound(torch.float64, 80, (s_all[0] ** 2 / s_all[5]).item())
    assert_within((U * S) @ Vh, d, exact, "exact low rank")
    d = noisy_low_rank(80, 60, seed=5, rank=6, noise=1e-2)
    U, S, Vh = truncated_svd(d, 6, "randomized")
    s_all = torch.linalg.svdvals(d)
    err = torch.linalg.norm(d - (U * S) @ Vh) ** 2
    tail = (s_all[6:] ** 2).sum()
    # never better than Eckart–Young, up to the float64 round-off of the squared norm (c·√(mn)·ε₆₄·‖D‖²)
    assert err >= tail - roundoff_bound(torch.float64, 80 * 60, (s_all**2).sum().item())
    # Halko–Martinsson–Tropp (Thm 10.8 with q = 4 power iterations, p = 10): the excess is a tiny fraction of the
    # tail here, as the gap σ₆/σ₇ > 10 is raised to the power 2q + 1 = 9; 5 % is far above it
    assert err <= tail * 1.05


def test_unknown_method_errors():
    # one validation for every function that takes an SVD method (check_svd_method)
    expected = r"unknown SVD method 'qr'; expected one of \('svd', 'gram', 'randomized'\)"
    with pytest.raises(ValueError, match=expected):
        truncated_svd(torch.eye(3), 1, "qr")
    with pytest.raises(ValueError, match=expected):
        orthogonalize(torch.eye(3), "qr")
    with pytest.raises(ValueError, match=expected):
        tsv_merge_factors([truncated_svd(torch.eye(3), 1)], "qr")
    with pytest.raises(ValueError, match=expected):
        tsv_merge_matrix([torch.eye(3)], method="qr")
    with pytest.raises(ValueError, match="option 'svd_method'"):
        TSVMergeAlgorithm(svd_method="qr")


# ---------------------------------------------------------------------------------- orthogonalization
def test_eigh_top_descending_subset_matches_torch():
    g = noisy_low_rank(30, 30, seed=6)
    g = g @ g.T
    w, q = eigh_top(g, 4)
    w_ref, q_ref = torch.linalg.eigh(g)
    lam = w_ref.flip(0)
    # two backward-stable eigensolvers: eigenvalues within c·√n·ε₆₄·‖G‖, vectors within that / gap
    assert_within(w, lam[:4], 2 * roundoff_bound(torch.float64, 30, lam[0].item()), "eigenvalues")
    gap = (lam[:4] - lam[1:5]).min().item()
    assert_within((q.T @ q_ref.flip(1)[:, :4]).abs(), torch.eye(4, dtype=g.dtype),
                  2 * roundoff_bound(torch.float64, 30, lam[0].item() / gap), "eigenvectors")


@pytest.mark.parametrize("shape", [(50, 12), (12, 50), (40, 40)])
def test_gram_orthogonalize_equals_polar_factor(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = torch.linalg.cond(a).item()
    # the polar factor's condition is cond(A); the whitening form goes through AᵀA: cond(A)² in float64
    assert_within(orthogonalize(a, "gram"), orthogonalize(a, "svd"), roundoff_bound(torch.float64, max(shape), cond**2),
                  "float64")
    # float32 input: the rounding of A (ε₃₂/2 relative) moves the polar factor by <= √n·ε₃₂·cond(A), + output rounding
    assert_within(orthogonalize(a.float(), "gram"), orthogonalize(a, "svd"),
                  roundoff_bound(torch.float32, max(shape), cond) + eps(torch.float32), "float32")


def test_inv_sqrt_gram_refuses_singular_ill_conditioned_and_wide():
    a = torch.randn(20, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g_cond = torch.linalg.cond(a.T @ a).item()  # (AᵀA)^(-1/2) from two eigendecompositions: ε₆₄·cond(G)·‖G^(-1/2)‖
    scale = inv_sqrt_psd(a.T @ a).abs().max().item()
    assert_within(inv_sqrt_gram(a), inv_sqrt_psd(a.T @ a), 2 * roundoff_bound(torch.float64, 20, g_cond * scale), "G^-1/2")
    assert inv_sqrt_gram(torch.cat([a, a[:, :1]], 1)) is None  # repeated column: singular
    bad = a.clone()
    bad[:, 0] = bad[:, 1] + 1e-7 * bad[:, 2]  # cond(A) ~ 1e7 > 1e5
    assert inv_sqrt_gram(bad) is None
    assert inv_sqrt_gram(a.T) is None  # more columns than rows
    # orthogonalize still answers (through the SVD)
    q = orthogonalize(torch.cat([a, a[:, :1]], 1), "gram")
    assert torch.isfinite(q).all()


# ----------------------------------------------------------------------------------------- TSV-M
@pytest.mark.parametrize("num_tasks,shape", [(3, (60, 40)), (8, (48, 96)), (20, (64, 64)), (5, (100, 20))])
def test_gram_tsv_merge_matches_float64_oracle(num_tasks, shape):
    deltas = [noisy_low_rank(*shape, seed=10 * num_tasks + i) for i in range(num_tasks)]
    k = max(1, min(shape) // num_tasks)
    assert_merge_matrix(tsv_merge_matrix(deltas, method="gram"), deltas, k, torch.float64, gram=True)
    # float32 input at a well-posed cut (k <= the updates' rank 4): the rounding of Δᵢ to float32 is a relative
    # ε₃₂/2 perturbation, amplified like a float32 computation; the Gram path itself runs in float64
    k32 = min(k, 4)
    got32 = tsv_merge_matrix([d.float() for d in deltas], k=k32, method="gram")
    assert got32.dtype == torch.float32
    assert_merge_matrix(got32, deltas, k32, torch.float32, what="float32 input")


def test_gram_tsv_merge_falls_back_when_tk_exceeds_rank():
    deltas = [noisy_low_rank(6, 40, seed=i, rank=2) for i in range(10)]  # k = 1, Tk = 10 > 6
    # U is a rank-deficient 6 × 10 matrix: both paths against the SVD-polar oracle (not against each other)
    assert_merge_matrix(tsv_merge_matrix(deltas, method="gram"), deltas, 1, torch.float64, gram=True, what="gram")
    assert_merge_matrix(tsv_merge_matrix(deltas, method="svd"), deltas, 1, torch.float64, what="svd")


def test_gram_tsv_merge_whitens_the_side_it_can(monkeypatch):
    """Tk > m on the U side only: U takes the SVD polar factor, V keeps its whitening (one SVD, not two), and the
    merge is still the exact formula."""
    from fusion_bench_tsv.functional import truncated_svd, tsv_merge_factors

    deltas = [noisy_low_rank(6, 40, seed=i, rank=2) for i in range(10)]  # k = 1: U is 6 × 10, V is 40 × 10
    factors = [truncated_svd(d, 1, "gram") for d in deltas]
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, *args, **kw: calls.append(tuple(a.shape)) or svd(a, *args, **kw))
    merged = tsv_merge_factors(factors, "gram")
    assert calls == [(6, 10)]
    monkeypatch.undo()
    assert_merge_matrix(merged, deltas, 1, torch.float64, gram=True, what="one side whitened")


def test_randomized_tsv_merge_exact_when_updates_are_low_rank():
    # rank 7 = k: the randomized range finder (k + 10 columns) captures each update exactly
    deltas = [noisy_low_rank(40, 30, seed=i, rank=7, noise=0.0) for i in range(4)]
    # the range finder's QR/power iterations act like a Gram path: the gram bound
    assert_merge_matrix(tsv_merge_matrix(deltas, method="randomized"), deltas, 7, torch.float64, gram=True)


# ----------------------------------------------------------------------------- threads and LAPACK
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_syevr_top_equals_scipy_eigh_subset(dtype, k):
    """The GIL-free ctypes call of LAPACK ?syevr gives SciPy's eigh(subset_by_index) result bit for bit."""
    import numpy as np
    from scipy.linalg import eigh

    from fusion_bench_tsv.functional.lapack import syevr_top

    x = torch.randn(90, 40, generator=torch.Generator().manual_seed(k), dtype=torch.float64).to(dtype)
    g = (x.T @ x).numpy()
    g = (g + g.T) / 2  # exactly symmetric, as gram() makes it: then either triangle is the same matrix
    original = g.copy()
    w, z = syevr_top(g.copy(), k)
    w_ref, z_ref = eigh(g, subset_by_index=[40 - k, 39], driver="evr")
    np.testing.assert_array_equal(w, w_ref)
    np.testing.assert_array_equal(np.abs(z), np.abs(z_ref))
    np.testing.assert_array_equal(g, original)  # callers pass a copy; eigh_top does
    lam, q = eigh_top(torch.from_numpy(original), k)
    assert torch.all(lam[:-1] >= lam[1:])  # descending
    ref = torch.linalg.eigvalsh(torch.from_numpy(original)).flip(0)[:k]
    assert_within(lam, ref, 2 * roundoff_bound(dtype, 40, ref[0].item()), "eigenvalues")  # two backward-stable solvers
