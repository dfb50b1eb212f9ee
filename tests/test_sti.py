"""Singular Task Interference: the formula against a float64 oracle, its invariances, the streaming
analysis against the functional core, and the CLI on the tiny local CLIP pool."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn
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

from conftest import run_fusion_bench


def oracle_sti(deltas, k, *, decorrelate=False):
    """The paper's formula written out in float64: explicit block-diagonal Σ and identity."""
    Us, Ss, Vs = [], [], []
    for d in deltas:
        U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False)
        Us.append(U[:, :k])
        Ss.append(torch.diag(S[:k]))
        Vs.append(Vh[:k].T)
    U, V, Sigma = torch.cat(Us, dim=1), torch.cat(Vs, dim=1), torch.block_diag(*Ss)
    if decorrelate:  # whitening U (UᵀU)^(-1/2), the closed form of the polar factor
        def whiten(A):
            w, Q = torch.linalg.eigh(A.T @ A)
            return A @ Q @ torch.diag(w.rsqrt()) @ Q.T

        U, V = whiten(U), whiten(V)
    eye = torch.eye(U.shape[1], dtype=torch.float64)
    return ((U.T @ U - eye) @ Sigma @ (V.T @ V - eye)).abs().sum(), Sigma.abs().sum()


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
    assert expected > 1.0  # random tasks do interfere: the test can fail
    torch.testing.assert_close(singular_task_interference(deltas, k), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        singular_task_interference(deltas, k, normalized=True), expected / sigma_l1, rtol=1e-10, atol=1e-12
    )
    # float32 input: computed in float32, close to the float64 value
    got32 = singular_task_interference([d.float() for d in deltas], k)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-4)


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
    s_max = max(float(f.S.max()) for f in factors)
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
        assert singular_task_interference(deltas, k) < 1e-12
        assert pairwise_singular_task_interference(deltas, k).abs().max() < 1e-12
    # sharing one left singular vector makes them interfere
    deltas[1] = deltas[1] + 2.0 * P[:, :1] @ Q[:, -1:].T
    assert singular_task_interference(deltas, 4) > 0.1


def test_invariant_to_task_order():
    deltas = low_rank_tasks(T=4, m=14, n=10, rank=6, seed=2)
    perm = [2, 0, 3, 1]
    permuted = [deltas[i] for i in perm]
    for k in (None, 3, 10):
        torch.testing.assert_close(singular_task_interference(permuted, k), singular_task_interference(deltas, k))
        pair = pairwise_singular_task_interference(deltas, k)
        torch.testing.assert_close(pairwise_singular_task_interference(permuted, k), pair[perm][:, perm])


def test_decorrelation_removes_interference():
    deltas = low_rank_tasks(T=3, m=12, n=9, rank=5, seed=3)
    before = singular_task_interference(deltas, 3)
    after = singular_task_interference(deltas, 3, decorrelate=True)
    assert before > 1.0
    assert after < 1e-10 * before
    oracle_after, _ = oracle_sti(deltas, 3, decorrelate=True)
    assert oracle_after < 1e-8 * before
    after32 = singular_task_interference([d.float() for d in deltas], 3, decorrelate=True, normalized=True)
    assert after32 < 1e-5
    pair = pairwise_singular_task_interference(deltas, 3, decorrelate=True)
    assert pair.abs().max() < 1e-10 * before
    # when T·k > min(m, n) the columns cannot all be orthonormal: interference remains
    assert singular_task_interference(deltas, 9, decorrelate=True) > 1e-3


def test_pairwise_symmetric_and_equal_to_two_task_sti():
    deltas = low_rank_tasks(T=4, m=12, n=10, rank=7, seed=4)
    k = 2
    pair = pairwise_singular_task_interference(deltas, k)
    pair_norm = pairwise_singular_task_interference(deltas, k, normalized=True)
    torch.testing.assert_close(pair, pair.T)
    assert torch.all(pair.diagonal() == 0)
    for i in range(4):
        for j in range(4):
            if i != j:
                expected, sigma_l1 = oracle_sti([deltas[i], deltas[j]], k)
                torch.testing.assert_close(pair[i, j], expected)
                torch.testing.assert_close(pair_norm[i, j], expected / sigma_l1)
    assert pair[0, 1] != pair[0, 2]


def test_cosine_similarity_from_factors():
    deltas = low_rank_tasks(T=3, m=12, n=9, rank=5, seed=5)
    deltas[2] = deltas[2] + 0.8 * deltas[0]  # correlated pair
    flat = torch.stack([d.flatten() for d in deltas])
    expected = torch.nn.functional.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
    got = task_cosine_similarity(task_factors(deltas, 9))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(task_cosine_similarity(deltas), expected)
    torch.testing.assert_close(mean_pairwise_cosine(got), expected[[0, 0, 1], [1, 2, 2]].mean())
    # rank k: the cosine of the rank-k reconstructions
    factors = task_factors(deltas, 2)
    recon = torch.stack([((f.U * f.S) @ f.Vh).flatten() for f in factors])
    expected_k = torch.nn.functional.cosine_similarity(recon[:, None], recon[None, :], dim=-1)
    torch.testing.assert_close(task_cosine_similarity(factors), expected_k)


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


# --- the streaming analysis --------------------------------------------------------------------


def make_pool(T=3, seed=0):
    torch.manual_seed(seed)
    pre = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    pool = {"_pretrained_": pre}
    for i in range(T):
        m = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
        m.load_state_dict(pre.state_dict())
        for p in m.parameters():
            p.data += 0.1 * torch.randn_like(p)
        pool[f"task_{i}"] = m
    return pool


@pytest.mark.parametrize("max_memory_gb", [4.0, 1e-9], ids=["one-block", "one-row-blocks"])
def test_analysis_matches_functional(tmp_path, max_memory_gb):
    from fusion_bench_tsv import STIAnalysis

    pool = make_pool()
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in pool.items()}
    algo = STIAnalysis(output_dir=str(tmp_path), show_pbar=False, device="cpu", max_memory_gb=max_memory_gb)
    assert algo.run(pool) is None
    results = algo.results
    assert results["tasks"] == ["task_0", "task_1", "task_2"]
    layers = ["0.weight", "2.weight"]
    assert [r["layer"] for r in results["layers"]] == layers
    pair_sum = torch.zeros(3, 3, dtype=torch.float64)
    pair_norm = torch.zeros(3, 3, dtype=torch.float64)
    for row, key in zip(results["layers"], layers):
        deltas = [(pool[f"task_{i}"].state_dict()[key] - pool["_pretrained_"].state_dict()[key]).double() for i in range(3)]
        r = min(deltas[0].shape)
        assert row["k"] == r // 3
        full, full_l1 = oracle_sti(deltas, r)
        low, low_l1 = oracle_sti(deltas, r // 3)
        assert row["sti_full"] == pytest.approx(float(full), rel=1e-4)
        assert row["sti_full_normalized"] == pytest.approx(float(full / full_l1), rel=1e-4)
        assert row["sti"] == pytest.approx(float(low), rel=1e-4)
        assert row["sti_normalized"] == pytest.approx(float(low / low_l1), rel=1e-4)
        assert row["sti_decorrelated_normalized"] < 1e-5
        flat = torch.stack([d.flatten() for d in deltas])
        cos = torch.nn.functional.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
        assert row["cosine_mean"] == pytest.approx(float(cos[[0, 0, 1], [1, 2, 2]].mean()), abs=1e-5)
        pair_sum += pairwise_singular_task_interference(deltas, r // 3)
        pair_norm += pairwise_singular_task_interference(deltas, r // 3, normalized=True)
    torch.testing.assert_close(torch.tensor(results["pairwise"]["sti_sum"], dtype=torch.float64), pair_sum, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor(results["pairwise"]["sti_normalized_mean"], dtype=torch.float64), pair_norm / 2, rtol=1e-4, atol=1e-6
    )

    for name, model in pool.items():  # inputs never modified
        assert all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items())
    on_disk = json.loads((tmp_path / "sti.json").read_text())
    assert on_disk["totals"] == pytest.approx(results["totals"])
    with open(tmp_path / "sti.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == layers
    assert float(rows[1]["sti"]) == pytest.approx(results["layers"][1]["sti"])
    for png in ("sti_per_layer.png", "sti_pairwise.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_rank_k_only_in_several_passes_gives_the_same_numbers(tmp_path):
    from fusion_bench_tsv import STIAnalysis

    pool = make_pool(T=4, seed=1)
    full = STIAnalysis(show_pbar=False, device="cpu")
    full.run(pool)
    small = STIAnalysis(full_rank=False, max_memory_gb=1e-9, show_pbar=False, device="cpu", rank=2)
    small.run(pool)
    ref = STIAnalysis(show_pbar=False, device="cpu", rank=2)
    ref.run(pool)
    for a, b in zip(small.results["layers"], ref.results["layers"]):
        assert a["sti_full"] is None and a["k"] == 2
        for c in ("sti", "sti_normalized", "sti_decorrelated_normalized"):
            assert a[c] == pytest.approx(b[c], rel=1e-4, abs=1e-6)
    assert full.results["layers"][0]["k"] == 12 // 4


def test_analysis_bad_input():
    from fusion_bench_tsv import STIAnalysis

    pool = make_pool(T=2)
    with pytest.raises(ValueError, match="at least 2 fine-tuned models"):
        STIAnalysis(show_pbar=False).run({"_pretrained_": pool["_pretrained_"], "task_0": pool["task_0"]})
    with pytest.raises(ValueError, match=r"'rank'=9 exceeds the rank of parameter '2.weight'"):
        STIAnalysis(rank=9, show_pbar=False, device="cpu").run(pool)
    with pytest.raises(ValueError, match="max_memory_gb"):
        STIAnalysis(max_memory_gb=0)


@pytest.mark.cli
def test_cli_on_tiny_clip_pool(tiny_pool, tmp_path):
    proc = run_fusion_bench(
        [
            "--config-dir",
            str(tiny_pool["config_dir"]),
            "method=tsv/sti_analysis",
            f"modelpool=CLIPVisionModelPool/{tiny_pool['name']}",
            "method.show_pbar=false",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = list(tmp_path.glob("outputs/**/sti.json"))
    assert len(found) == 1, list(tmp_path.glob("outputs/**/*"))
    out_dir = found[0].parent
    results = json.loads(found[0].read_text())
    assert results["tasks"] == tiny_pool["tasks"]
    assert results["totals"]["sti_normalized_mean"] > 1e-3
    assert results["totals"]["sti_decorrelated_normalized_mean"] < 1e-4
    with open(out_dir / "sti.csv") as f:
        assert len(list(csv.DictReader(f))) == len(results["layers"]) > 0
    for png in ("sti_per_layer.png", "sti_pairwise.png"):
        assert (out_dir / png).stat().st_size > 1000
    assert list(out_dir.glob("**/events.out.tfevents*")), "no TensorBoard scalars"
