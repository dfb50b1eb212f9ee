"""The functional core against an independent float64 evaluation of the formulas."""

from __future__ import annotations

import pytest
import torch

from oracles import assert_merge_matrix, assert_within, inv_sqrt_psd, roundoff_bound

from fusion_bench_tsv.functional import (
    DEFAULT_SVD_METHOD,
    concat_factors,
    default_rank,
    orthogonalize,
    truncated_svd,
    tsv_merge_matrix,
)


def low_rank_deltas(num_tasks: int, m: int, n: int, rank: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen, dtype=torch.float64)
         + 1e-2 * torch.randn(m, n, generator=gen, dtype=torch.float64)).to(dtype)
        for _ in range(num_tasks)
    ]


@pytest.mark.parametrize("num_tasks", [3, 5, 8, 20])
@pytest.mark.parametrize("shape", [(60, 60), (80, 50), (40, 96)])
def test_tsv_merge_matrix_matches_float64_oracle(num_tasks, shape):
    m, n = shape
    deltas = low_rank_deltas(num_tasks, m, n, rank=6, seed=num_tasks * 100 + m)
    k = default_rank(shape, num_tasks)
    assert k == max(1, min(shape) // num_tasks)
    got = tsv_merge_matrix(deltas)  # the default method, "gram" (DEFAULT_SVD_METHOD)
    assert got.dtype == torch.float64 and got.shape == shape
    assert torch.equal(got, tsv_merge_matrix(deltas, method=DEFAULT_SVD_METHOD))
    assert_merge_matrix(got, deltas, k, torch.float64, gram=DEFAULT_SVD_METHOD == "gram")


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8, 13, 20])
@pytest.mark.parametrize("shape", [(64, 64), (96, 48), (48, 96)])
def test_default_merge_of_float32_updates_is_the_float64_merge_rounded(num_tasks, shape):
    """The default (Gram) path keeps the factors in float64 (merge_dtype), so on float32 updates its result is
    the float64 merge of those updates rounded to float32: within the float64 merge bound plus ε₃₂/2·|Mᵢⱼ|."""
    gen = torch.Generator().manual_seed(num_tasks * 1000 + shape[0])
    deltas32 = [torch.randn(*shape, generator=gen) for _ in range(num_tasks)]
    got = tsv_merge_matrix(deltas32)
    assert got.dtype == torch.float32
    k = default_rank(shape, num_tasks)
    assert_merge_matrix(got, [d.double() for d in deltas32], k, torch.float64, gram=True, what="float32 updates")


def test_tsv_merge_matrix_float32_close_to_float64():
    deltas64 = low_rank_deltas(5, 48, 32, rank=8, seed=3)
    got = tsv_merge_matrix([d.float() for d in deltas64], k=4)
    assert got.dtype == torch.float32
    assert_merge_matrix(got, deltas64, 4, torch.float32)


@pytest.mark.parametrize("method", ["svd", "gram"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rank_below_num_tasks_matches_svd_polar_oracle(method, dtype):
    """T·k = 10 > r = 6: U = [U₁…U₁₀] is a rank-deficient 6 × 10 matrix (UᵀU singular); its polar factor
    PQᵀ from the thin SVD is still defined and uses every task's column."""
    deltas = low_rank_deltas(10, 6, 40, rank=2, seed=5)
    got = tsv_merge_matrix([d.to(dtype) for d in deltas], method=method)
    assert got.dtype == dtype
    assert_merge_matrix(got, deltas, 1, dtype, what=f"T·k > r, {method}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_half_out_computed_in_float32(dtype):
    deltas = [d.to(dtype) for d in low_rank_deltas(4, 32, 24, rank=3, seed=7, dtype=torch.float32)]
    assert tsv_merge_matrix(deltas).dtype == dtype
    # k = 3 cuts at the gap above the noise (well posed); the half inputs are exact in float64, the merge runs
    # in float32, and its result is rounded once to the half dtype: each entry within ε/2 of its own size
    got = tsv_merge_matrix(deltas, k=3)
    assert_merge_matrix(got, deltas, 3, torch.float32, what=str(dtype))
    u, s, vh = truncated_svd(deltas[0], 5)
    assert u.dtype == s.dtype == vh.dtype == dtype


@pytest.mark.parametrize("shape,k", [((30, 20), 1), ((30, 20), 7), ((20, 45), 20)])
def test_truncated_svd_is_the_float64_top_k(shape, k):
    (d,) = low_rank_deltas(1, *shape, rank=10, seed=11)
    U, S, Vh = truncated_svd(d, k)
    assert U.shape == (shape[0], k) and S.shape == (k,) and Vh.shape == (k, shape[1])
    s_all = torch.linalg.svdvals(d)
    # backward-stable SVD: every σ within c·√n·ε₆₄·σ₁ (Weyl)
    assert_within(S, s_all[:k], roundoff_bound(torch.float64, max(shape), s_all[0].item()), "singular values")
    approx = U @ torch.diag(S) @ Vh
    # Eckart–Young: the squared Frobenius error is the sum of the discarded squared singular values; an
    # error δ ≤ c·√(mn)·ε₆₄·σ₁ in the residual changes its square by at most 2‖residual‖δ + δ²
    tail = (s_all[k:] ** 2).sum()
    delta = roundoff_bound(torch.float64, shape[0] * shape[1], s_all[0].item())
    assert_within(torch.linalg.norm(d - approx) ** 2, tail, 2 * tail.sqrt().item() * delta + delta**2, "Eckart–Young")
    assert_within(U.T @ U, torch.eye(k, dtype=d.dtype), roundoff_bound(torch.float64, shape[0], 1.0), "UᵀU = I")


def test_orthogonalize_is_nearest_orthonormal_and_equals_whitening():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    q = orthogonalize(a)
    identity = roundoff_bound(torch.float64, 50, 1.0)  # inner products of length 50 of unit vectors
    assert_within(q.T @ q, torch.eye(12, dtype=torch.float64), identity, "QᵀQ = I")
    # the two forms are evaluated differently: each errs by about √n·ε₆₄·cond(A) (polar factor's condition)
    cond = torch.linalg.cond(a).item()
    assert_within(q, a @ inv_sqrt_psd(a.T @ a), roundoff_bound(torch.float64, 50, cond), "polar = whitening")
    wide = orthogonalize(a.T)  # rows orthonormal for a wide matrix
    assert_within(wide @ wide.T, torch.eye(12, dtype=torch.float64), identity, "QQᵀ = I")


def test_rank_below_num_tasks_keeps_one_component_per_task():
    deltas = low_rank_deltas(10, 6, 40, rank=2, seed=5)
    assert default_rank((6, 40), 10) == 1
    merged = tsv_merge_matrix(deltas)
    assert merged.abs().max() > 0
    factors = [truncated_svd(d, 1) for d in deltas]
    U, S, Vh = concat_factors(factors)
    assert U.shape == (6, 10) and S.shape == (10,) and Vh.shape == (10, 40)


def test_concat_factors_column_and_row_order():
    deltas = low_rank_deltas(3, 10, 8, rank=2, seed=9)
    factors = [truncated_svd(d, 2) for d in deltas]
    U, S, Vh = concat_factors(factors)
    for i, f in enumerate(factors):  # a concatenation: exact copies
        assert torch.equal(U[:, 2 * i : 2 * i + 2], f.U)
        assert torch.equal(S[2 * i : 2 * i + 2], f.S)
        assert torch.equal(Vh[2 * i : 2 * i + 2], f.Vh)


def test_inputs_are_not_modified():
    deltas = low_rank_deltas(4, 16, 12, rank=3, seed=1)
    before = [d.clone() for d in deltas]
    tsv_merge_matrix(deltas)
    truncated_svd(deltas[0], 3)
    for d, b in zip(deltas, before):
        assert torch.equal(d, b)


def test_bad_input_errors():
    deltas = low_rank_deltas(2, 8, 6, rank=2, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        tsv_merge_matrix([])
    with pytest.raises(ValueError, match=r"deltas\[1\]"):
        tsv_merge_matrix([deltas[0], deltas[1][:, :5]])
    with pytest.raises(ValueError, match="out of range"):
        truncated_svd(deltas[0], 7)
    with pytest.raises(ValueError, match="out of range"):
        truncated_svd(deltas[0], 0)
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(torch.zeros(3, 3, 3), 1)
