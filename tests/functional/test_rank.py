"""Rank-revealing TSV on rank-deficient (LoRA-like) task updates: one well-defined merged matrix.

The oracle is a float64 NumPy evaluation of TSV-M that keeps each task's known rank (built into the
data), with the polar factor from NumPy's SVD; the package's paths (svd/gram, float32/float64) must all
match it. Without dropping the null-space triplets the same paths disagree by O(1) (the ill-posedness).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oracles import numpy_ranked_merge

from fusion_bench_tsv.functional import (
    STORAGE_NOISE_FACTOR,
    compress_matrix,
    numerical_rank,
    storage_noise_floor,
    task_factors,
    truncate_factors,
    truncated_svd,
    tsv_merge_matrix,
)

SHAPE, RANK, T, K = (64, 48), 3, 4, 12
SIGMAS = (3.0, 2.0, 1.0)  # gap/σ₁ = 1/3 between kept triplets and to the null space
PATHS = [(method, dtype) for method in ("svd", "gram") for dtype in (torch.float32, torch.float64)]


def _orth(gen: torch.Generator, m: int, r: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q


def _low_rank_deltas(seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    """T float64 updates of exact rank RANK with singular values ``scale · SIGMAS``."""
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.diag(scale * torch.tensor(SIGMAS, dtype=torch.float64))
    return [_orth(gen, SHAPE[0], RANK) @ sigma @ _orth(gen, SHAPE[1], RANK).T for _ in range(T)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _merge_all_paths(deltas_of, **options) -> dict:
    return {
        (method, dtype): tsv_merge_matrix(deltas_of(dtype), K, method, return_ranks=True, **options)
        for method, dtype in PATHS
    }


def test_rank_deficient_merge_is_one_matrix_across_paths():
    deltas = _low_rank_deltas()
    ref = numpy_ranked_merge(deltas, [RANK] * T)
    outs = _merge_all_paths(lambda dt: [d.to(dt) for d in deltas])
    for (method, dtype), (merged, ranks) in outs.items():
        assert ranks == [RANK] * T, f"{method}/{dtype}: kept {ranks}, expected {RANK} per task"
        err, tol = _rel(merged.double().numpy(), ref.merged), ref.error_bound(dtype)
        assert tol <= 1e-5 and err <= tol, f"{method}/{dtype}: relative error {err:.3g} > bound {tol:.3g}"


def test_without_dropping_the_paths_disagree():
    """The ill-posedness that the test above would fail on: null-space vectors enter the orthogonalization."""
    deltas = _low_rank_deltas()
    outs = {p: tsv_merge_matrix([d.to(p[1]) for d in deltas], K, p[0], rank_revealing=False) for p in PATHS}
    base = outs[PATHS[0]].double().numpy()
    spread = max(_rel(m.double().numpy(), base) for m in outs.values())
    assert spread > 1e-2, f"paths agree to {spread:.3g} without rank revealing: the case is not ill-posed"


def _bf16_case(seed: int = 1):
    """θ₀ (RMS 0.02) and θᵢ = θ₀ + Δᵢ, both stored in bf16; Δᵢ of rank 3 with σ = 0.1·(3, 2, 1)."""
    gen = torch.Generator().manual_seed(seed)
    theta0 = 0.02 * torch.randn(*SHAPE, generator=gen, dtype=torch.float64)
    deltas = _low_rank_deltas(seed, scale=0.1)
    stored0 = theta0.to(torch.bfloat16)
    stored = [(theta0 + d).to(torch.bfloat16) for d in deltas]
    mean_sq = sum(float((t.double() ** 2).mean()) for t in stored) / T
    weight_rms = math.sqrt((mean_sq + float((stored0.double() ** 2).mean())) / 2)
    return stored0, stored, weight_rms


def test_bf16_storage_noise_is_dropped_and_the_merge_is_one_matrix():
    stored0, stored, weight_rms = _bf16_case()
    floor = storage_noise_floor(SHAPE, torch.bfloat16, weight_rms)
    deltas_of = lambda dt: [t.to(dt) - stored0.to(dt) for t in stored]  # noqa: E731
    rounded = deltas_of(torch.float64)  # differences of bf16 values: exact in float64
    noise_sigma = [float(torch.linalg.svdvals(d)[RANK]) for d in rounded]
    assert max(noise_sigma) < floor < 0.1 * min(SIGMAS), f"noise σ {max(noise_sigma):.3g}, floor {floor:.3g}"
    ref = numpy_ranked_merge(rounded, [RANK] * T)
    outs = _merge_all_paths(deltas_of, storage_dtype=torch.bfloat16, weight_rms=weight_rms)
    for (method, dtype), (merged, ranks) in outs.items():
        assert ranks == [RANK] * T, f"{method}/{dtype}: kept {ranks}, expected {RANK} per task"
        err, tol = _rel(merged.double().numpy(), ref.merged), ref.error_bound(dtype)
        assert tol <= 1e-5 and err <= tol, f"{method}/{dtype}: relative error {err:.3g} > bound {tol:.3g}"


def test_bf16_without_the_storage_floor_keeps_noise_and_the_paths_disagree():
    stored0, stored, _ = _bf16_case()
    outs = _merge_all_paths(lambda dt: [t.to(dt) - stored0.to(dt) for t in stored])
    assert all(ranks == [K] * T for _, ranks in outs.values()), "round-off floor alone should keep the bf16 noise"
    base = outs[PATHS[0]][0].double().numpy()
    spread = max(_rel(m.double().numpy(), base) for m, _ in outs.values())
    assert spread > 1e-5, f"paths agree to {spread:.3g} with the noise triplets kept"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_storage_noise_floor_is_above_the_rounding_noise(dtype):
    """‖E‖₂ of rounding θ₀ and θᵢ: ≤ √(2/3)·u·θ̄·(√m+√n) (derivation in functional/rank.py), floor = c_s·u·θ̄·(√m+√n)."""
    m, n = 256, 256
    gen = torch.Generator().manual_seed(2)
    theta0 = 0.02 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    theta = theta0 + 1e-3 * torch.randn(m, 4, generator=gen, dtype=torch.float64) @ torch.randn(4, n, generator=gen, dtype=torch.float64)
    noise = (theta.to(dtype).double() - theta0.to(dtype).double()) - (theta - theta0)
    rms = math.sqrt(float((theta0**2).mean() + (theta**2).mean()) / 2)
    u = torch.finfo(dtype).eps / 2
    unit = u * rms * (math.sqrt(m) + math.sqrt(n))
    measured = float(torch.linalg.matrix_norm(noise, 2))
    assert measured <= math.sqrt(2 / 3) * unit, f"‖E‖₂ = {measured:.3g} > √(2/3)·u·θ̄·(√m+√n) = {math.sqrt(2 / 3) * unit:.3g}"
    floor = storage_noise_floor((m, n), dtype, rms)
    assert math.isclose(floor, STORAGE_NOISE_FACTOR * unit, rel_tol=1e-12), f"floor {floor!r} vs {STORAGE_NOISE_FACTOR * unit!r}"
    assert floor >= 2 * measured, f"floor {floor:.3g} is not 2× above the measured noise {measured:.3g}"


def test_full_rank_updates_are_unchanged_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    deltas = [torch.randn(*SHAPE, generator=gen) for _ in range(T)]
    for method in ("svd", "gram"):
        on, ranks = tsv_merge_matrix(deltas, K, method, return_ranks=True)
        off = tsv_merge_matrix(deltas, K, method, rank_revealing=False)
        assert ranks == [K] * T and torch.equal(on, off), f"{method}: rank revealing changed a full-rank merge"
    assert torch.equal(compress_matrix(deltas[0], K).U, compress_matrix(deltas[0], K, rank_revealing=False).U)


def test_a_zero_update_does_not_change_the_others_merge():
    """A task that left a layer untouched (LoRA on other modules) keeps one σ = 0 triplet; the merge leaves it out."""
    deltas = _low_rank_deltas()
    zero = torch.zeros(*SHAPE, dtype=torch.float64)
    with_zero, ranks = tsv_merge_matrix(deltas + [zero], K, return_ranks=True)
    without = tsv_merge_matrix(deltas, K)
    err = float((with_zero - without).norm() / without.norm())
    assert ranks == [RANK] * T + [1] and err <= 1e-13, f"ranks {ranks}, relative difference {err:.3g} (float64: ≲ 100·ε)"
    assert torch.equal(tsv_merge_matrix([zero, zero], 5), zero)


def test_compression_and_sti_factors_stop_at_the_numerical_rank():
    deltas = _low_rank_deltas()
    factors = compress_matrix(deltas[0].float(), K)
    err = float(((factors.U * factors.S) @ factors.Vh - deltas[0].float()).norm() / deltas[0].norm())
    # Eckart–Young: the dropped σ are round-off, so the rank-3 factors reproduce Δ to float32 round-off (≈ √n·ε₃₂)
    assert factors.S.numel() == RANK and err <= 10 * math.sqrt(max(SHAPE)) * torch.finfo(torch.float32).eps, err
    assert compress_matrix(deltas[0], energy=1.0).S.numel() == RANK
    assert [f.S.numel() for f in task_factors(deltas, K)] == [RANK] * T
    full = truncated_svd(deltas[0], min(SHAPE), rank_revealing=True)
    assert truncated_svd(deltas[0], K).S.numel() == K  # the plain top-k primitive keeps k unless asked
    assert truncate_factors(full, K).S.numel() == RANK  # STI's full-rank path asks for k > numerical rank


def test_numerical_rank_threshold_and_option_errors():
    s = torch.tensor([1.0, 1e-3, 64 * torch.finfo(torch.float32).eps * 0.99, 0.0])
    assert numerical_rank(s, SHAPE) == 2  # max(m, n)·ε₃₂·σ₁ = 7.6e-6 drops the third
    assert numerical_rank(s.double(), SHAPE) == 3  # in float64 the third is far above 64·ε₆₄
    assert numerical_rank(torch.zeros(3), SHAPE) == 0
    with pytest.raises(ValueError, match="weight_rms"):
        tsv_merge_matrix([torch.eye(4)] * 2, 2, storage_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="rank_revealing"):
        truncated_svd(torch.eye(4), 2, storage_dtype=torch.bfloat16, weight_rms=0.1)
    with pytest.raises(ValueError, match="storage_dtype"):
        storage_noise_floor(SHAPE, torch.int8, 0.1)
    with pytest.raises(ValueError, match="weight_rms"):
        storage_noise_floor(SHAPE, torch.float16, float("nan"))
