"""functional/interference.py: Singular Task Interference against a float64 oracle, its invariances, blocked
evaluation, pairwise STI and cosines."""

from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fusion_bench_tsv.functional import (
    mean_pairwise_cosine,
    pairwise_singular_task_interference,
    pairwise_sti_from_factors,
    singular_task_interference,
    sti_from_factors,
    task_cosine_similarity,
    task_factors,
)

from oracles import decorrelated_sti_bound, sti_bound, assert_within, oracle_sti, roundoff_bound


def low_rank_tasks(T=3, m=12, n=9, rank=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)).to(dtype)
        for _ in range(T)
    ]


@pytest.mark.parametrize("k, rank", [(None, 5), (1, 5), (2, 5), (5, 5), (9, 9)])
def test_matches_float64_formula(k, rank):
    # k <= rank(Δᵢ): beyond it the extra singular vectors are arbitrary and so is STI
    deltas = low_rank_tasks(rank=rank)
    kk = 9 // 3 if k is None else k
    expected, sigma_l1 = oracle_sti(deltas, kk)
    bound64 = sti_bound(deltas, kk, torch.float64)
    assert expected > 1e3 * bound64  # random tasks do interfere: the test can fail
    assert_within(singular_task_interference(deltas, k), expected, bound64, "STI")
    assert_within(singular_task_interference(deltas, k, normalized=True), expected / sigma_l1, bound64 / sigma_l1,
                  "normalized STI")
    # float32 input: computed in float32, close to the float64 value
    got32 = singular_task_interference([d.float() for d in deltas], k)
    assert got32.dtype == torch.float32
    assert_within(got32, expected, sti_bound(deltas, kk, torch.float32), "float32 STI")


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns inside the block."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("k", [2, 9])  # T·k = 6 <= max(m, n) (rank k) and 27 > max(m, n) (e.g. full rank)
def test_blocked_sti_matches_float64_formula_and_never_forms_the_product(k):
    T, m, n = 3, 12, 9
    deltas = low_rank_tasks(T=T, m=m, n=n, rank=9, seed=6)
    factors = task_factors(deltas, k)
    expected, _ = oracle_sti(deltas, k)
    p = T * k
    s_max = max(float(S.max()) for _, S, _ in factors)
    # each of the p² entries sums p terms |X_il σ_l Y_lj| <= σ_max (|X|, |Y| <= 1 for orthonormal task
    # factors), each from inner products of length <= m + n + p: error <= p²·p·(m + n + p)·ε64·σ_max
    bound = p**3 * (m + n + p) * torch.finfo(torch.float64).eps * s_max
    row_bytes = (2 * p + n) * 8  # a row of a block's temporaries (float64)
    for max_bytes, rows in ((1, 1), (2 * row_bytes, 2), (None, min(p, m))):
        with LargestTensor() as seen:
            got = sti_from_factors(factors, max_bytes=max_bytes)
        err = abs(float(got) - float(expected))
        assert err <= bound, f"max_bytes={max_bytes}: |STI - float64 formula| = {err:.3g} > bound {bound:.3g}"
        # nothing p × p: the concatenated factors (m × p) and blocks of `rows` rows are the largest tensors
        largest = max(m * p, rows * p)
        assert seen.numel <= largest, f"max_bytes={max_bytes}: a tensor of {seen.numel} elements > {largest}"
    with LargestTensor() as seen:
        pair = pairwise_sti_from_factors(factors)
    assert seen.numel <= max(m * k, T * T, (2 * k) ** 2), f"pairwise STI made a tensor of {seen.numel} elements"
    expected_01, _ = oracle_sti(deltas[:2], k)
    err = abs(float(pair[0, 1]) - float(expected_01))
    assert err <= bound, f"pairwise (0, 1): error {err:.3g} > bound {bound:.3g}"


def test_zero_for_mutually_orthogonal_tasks():
    g = torch.Generator().manual_seed(1)
    m, n, T, r = 16, 12, 3, 4
    P, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    deltas = []
    for i in range(T):  # task i lives in its own block of left and right singular vectors
        cols = slice(i * r, (i + 1) * r)
        s = torch.rand(r, generator=g, dtype=torch.float64) + 0.5
        deltas.append(P[:, cols] @ torch.diag(s) @ Q[:, cols].T)
    for k in (1, 2, 4):
        bound = sti_bound(deltas, k, torch.float64)  # the exact value is 0
        assert_within(singular_task_interference(deltas, k), 0.0, bound, f"STI k={k}")
        assert_within(pairwise_singular_task_interference(deltas, k), torch.zeros(T, T), bound, f"pairwise k={k}")
    # sharing one left singular vector makes them interfere
    deltas[1] = deltas[1] + 2.0 * P[:, :1] @ Q[:, -1:].T
    assert singular_task_interference(deltas, 4) > 1e3 * sti_bound(deltas, 4, torch.float64)


def test_invariant_to_task_order():
    deltas = low_rank_tasks(T=4, m=14, n=10, rank=6, seed=2)
    perm = [2, 0, 3, 1]
    permuted = [deltas[i] for i in perm]
    for k in (None, 3, 10):
        bound = 2 * sti_bound(deltas, k or 14 // 4, torch.float64)  # two float64 evaluations of the same value
        assert_within(singular_task_interference(permuted, k), singular_task_interference(deltas, k), bound, "order")
        pair = pairwise_singular_task_interference(deltas, k)
        assert_within(pairwise_singular_task_interference(permuted, k), pair[perm][:, perm], bound, "pairwise order")


def test_decorrelation_removes_interference():
    deltas = low_rank_tasks(T=3, m=12, n=9, rank=5, seed=3)
    before = singular_task_interference(deltas, 3)
    after = singular_task_interference(deltas, 3, decorrelate=True)
    _, sigma_l1 = oracle_sti(deltas, 3)
    bound64 = sigma_l1 * decorrelated_sti_bound(12, 9, 9, torch.float64)  # the exact value is 0
    assert before > 1e3 * bound64
    assert_within(after, 0.0, bound64, "decorrelated STI")
    oracle_after, _ = oracle_sti(deltas, 3, decorrelate=True)
    assert_within(oracle_after, 0.0, bound64, "oracle's decorrelated STI")
    after32 = singular_task_interference([d.float() for d in deltas], 3, decorrelate=True, normalized=True)
    assert_within(after32, 0.0, decorrelated_sti_bound(12, 9, 9, torch.float32), "float32 decorrelated STI")
    pair = pairwise_singular_task_interference(deltas, 3, decorrelate=True)
    assert_within(pair, torch.zeros(3, 3), bound64, "decorrelated pairwise STI")
    # when T·k > min(m, n) the columns cannot all be orthonormal: interference remains
    assert singular_task_interference(deltas, 9, decorrelate=True) > 1e3 * sti_bound(deltas, 9, torch.float64)


def test_pairwise_symmetric_and_equal_to_two_task_sti():
    deltas = low_rank_tasks(T=4, m=12, n=10, rank=7, seed=4)
    k = 2
    pair = pairwise_singular_task_interference(deltas, k)
    pair_norm = pairwise_singular_task_interference(deltas, k, normalized=True)
    assert_within(pair, pair.T, 2 * sti_bound(deltas, k, torch.float64), "symmetry")
    assert torch.all(pair.diagonal() == 0)
    for i in range(4):
        for j in range(4):
            if i != j:
                expected, sigma_l1 = oracle_sti([deltas[i], deltas[j]], k)
                bound = sti_bound([deltas[i], deltas[j]], k, torch.float64)
                assert_within(pair[i, j], expected, bound, f"pair {i},{j}")
                assert_within(pair_norm[i, j], expected / sigma_l1, bound / sigma_l1, f"normalized pair {i},{j}")
    assert pair[0, 1] != pair[0, 2]


def test_cosine_similarity_from_factors():
    deltas = low_rank_tasks(T=3, m=12, n=9, rank=5, seed=5)
    deltas[2] = deltas[2] + 0.8 * deltas[0]  # correlated pair
    flat = torch.stack([d.flatten() for d in deltas])
    expected = torch.nn.functional.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
    got = task_cosine_similarity(task_factors(deltas, 9))
    # cosines of length-108 vectors in float64: c·√108·ε₆₄ (the factors reproduce Δ to the same order)
    bound = roundoff_bound(torch.float64, 12 * 9, 1.0)
    assert_within(got, expected, bound, "cosine from factors")
    assert_within(task_cosine_similarity(deltas), expected, bound, "cosine")
    assert_within(mean_pairwise_cosine(got), expected[[0, 0, 1], [1, 2, 2]].mean(), bound, "mean cosine")
    # rank k: the cosine of the rank-k reconstructions
    factors = task_factors(deltas, 2)
    recon = torch.stack([((f.U * f.S) @ f.Vh).flatten() for f in factors])
    expected_k = torch.nn.functional.cosine_similarity(recon[:, None], recon[None, :], dim=-1)
    assert_within(task_cosine_similarity(factors), expected_k, bound, "rank-k cosine")


def test_bad_input_errors():
    deltas = low_rank_tasks(T=2, m=6, n=5)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        singular_task_interference(deltas[:1])
    with pytest.raises(ValueError, match="at least 2 tasks"):
        singular_task_interference([])
    with pytest.raises(ValueError, match=r"k=6 .*rank 5"):
        singular_task_interference(deltas, 6)
    with pytest.raises(ValueError, match="k=0"):
        pairwise_singular_task_interference(deltas, 0)
    with pytest.raises(ValueError, match=r"deltas\[1\] has shape"):
        singular_task_interference([deltas[0], deltas[1].T])
    originals = [d.clone() for d in deltas]
    singular_task_interference(deltas, 2, decorrelate=True)
    assert all(torch.equal(a, b) for a, b in zip(deltas, originals))  # inputs untouched


def test_top_k_svd_keeps_the_numerical_rank_as_truncated_svd_does():
    from functools import partial

    from fusion_bench_tsv.functional import truncated_svd
    from fusion_bench_tsv.functional.interference import top_k_svd

    for dtype in (torch.float32, torch.float64):
        deltas = low_rank_tasks(T=2, m=12, n=9, rank=3, dtype=dtype)
        for k in (2, 3, 6):
            got, ref = top_k_svd(deltas[0], k), truncated_svd(deltas[0], k, rank_revealing=True)
            assert got.S.numel() == min(k, 3) and all(torch.equal(a, b) for a, b in zip(got, ref)), (dtype, k)
        plain = task_factors(deltas, 6, svd=partial(top_k_svd, rank_revealing=False))
        assert [f.S.numel() for f in plain] == [6, 6]  # the plain top-k on request
    zero = top_k_svd(torch.zeros(4, 3), 2)
    assert zero.S.numel() == 1 and float(zero.S[0]) == 0.0  # a zero update keeps one σ = 0 triplet


def test_svd_option_takes_the_storage_noise_floor():
    from functools import partial

    from fusion_bench_tsv.functional import truncated_svd
    from fusion_bench_tsv.functional.interference import top_k_svd

    g = torch.Generator().manual_seed(7)
    # rank 3 plus noise of σ ≈ 1e-4·(√12 + √9) = 6e-4: above the round-off floor, below bf16's storage floor
    # 2·2⁻⁹·1.0·(√12 + √9) = 0.025 for weights of RMS 1
    deltas = [d + 1e-4 * torch.randn(12, 9, generator=g, dtype=torch.float64) for d in low_rank_tasks(T=2, rank=3)]
    assert [f.S.numel() for f in task_factors(deltas, 6)] == [6, 6]
    floor = partial(truncated_svd, rank_revealing=True, storage_dtype=torch.bfloat16, weight_rms=1.0)
    assert [f.S.numel() for f in task_factors(deltas, 6, svd=floor)] == [3, 3]
    assert torch.equal(singular_task_interference(deltas, 6, svd=floor),
                       sti_from_factors([top_k_svd(d, 3) for d in deltas]))
