"""Singular Task Interference: the formula against a float64 oracle, its invariances, the streaming
analysis against the functional core, and the CLI on the tiny local CLIP pool."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
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
from oracles import assert_within, eps, oracle_sti, roundoff_bound, task_triplets


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


#: each total of sti.json and the per-layer column it reduces
TOTALS = {"sti_full_sum": ("sti_full", "sum"), "sti_sum": ("sti", "sum"), "sti_decorrelated_sum": ("sti_decorrelated", "sum"),
          "sti_full_normalized_mean": ("sti_full_normalized", "mean"), "sti_normalized_mean": ("sti_normalized", "mean"),
          "sti_decorrelated_normalized_mean": ("sti_decorrelated_normalized", "mean"), "cosine_mean": ("cosine_mean", "mean")}


def check_totals(results: dict) -> None:
    """Every total recomputed from the per-layer rows (math.fsum, exact to one rounding); float64 sums of L
    terms err by at most L·ε₆₄·Σ|v|."""
    rows = results["layers"]
    for total, (column, how) in TOTALS.items():
        values = [r[column] for r in rows if r[column] is not None]
        if not values:
            assert total not in results["totals"], total
            continue
        expected = math.fsum(values) / (len(values) if how == "mean" else 1)
        bound = len(values) * eps(torch.float64) * math.fsum(abs(v) for v in values)
        assert_within(results["totals"][total], expected, bound, f"total {total} = {how} of {column}")


def layer_deltas(pool: dict, key: str, num_tasks: int) -> list:
    """The task updates of one layer, subtracted in float32 as the analysis does, as float64."""
    base = pool["_pretrained_"].state_dict()[key]
    return [(pool[f"task_{i}"].state_dict()[key] - base).double() for i in range(num_tasks)]


@pytest.mark.parametrize("max_memory_gb", [4.0, 1e-9], ids=["one-block", "one-row-blocks"])
def test_analysis_matches_functional(tmp_path, max_memory_gb):
    from fusion_bench_tsv import STIAnalysis

    pool = make_pool()
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in pool.items()}
    algo = STIAnalysis(save_path=str(tmp_path), show_pbar=False, device="cpu", max_memory_gb=max_memory_gb)
    assert algo.run(pool) is None
    results = algo.results
    assert results["tasks"] == ["task_0", "task_1", "task_2"]
    layers = ["0.weight", "2.weight"]
    assert [r["layer"] for r in results["layers"]] == layers
    pair_sum = torch.zeros(3, 3, dtype=torch.float64)
    pair_norm = torch.zeros(3, 3, dtype=torch.float64)
    pair_bound = pair_norm_bound = 0.0
    for row, key in zip(results["layers"], layers):
        deltas = layer_deltas(pool, key, 3)
        (m, n), r = deltas[0].shape, min(deltas[0].shape)
        assert row["k"] == r // 3
        # the analysis runs in float32 (the models' dtype); a normalized value's denominator adds ε-level error
        for column, k in (("sti_full", r), ("sti", r // 3)):
            value, l1 = oracle_sti(deltas, k)
            bound = sti_bound(deltas, k, torch.float32)
            assert_within(row[column], value, bound, f"{key} {column}")
            assert_within(row[f"{column}_normalized"], value / l1, 2 * bound / l1, f"{key} {column}_normalized")
        assert_within(row["sti_decorrelated_normalized"], 0.0, decorrelated_sti_bound(m, n, 3 * (r // 3), torch.float32),
                      f"{key} decorrelated")
        flat = torch.stack([d.flatten() for d in deltas])
        cos = torch.nn.functional.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
        assert_within(row["cosine_mean"], cos[[0, 0, 1], [1, 2, 2]].mean(), roundoff_bound(torch.float32, m * n, 1.0),
                      f"{key} cosine")
        pair_sum += pairwise_singular_task_interference(deltas, r // 3)
        pair_norm += pairwise_singular_task_interference(deltas, r // 3, normalized=True)
        pair_bound += sti_bound(deltas, r // 3, torch.float32)  # the 3-task bound covers each pair's
        pair_norm_bound += 2 * sti_bound(deltas, r // 3, torch.float32) / oracle_sti(deltas, r // 3)[1]
    assert_within(torch.tensor(results["pairwise"]["sti_sum"]), pair_sum, pair_bound, "pairwise sum")
    assert_within(torch.tensor(results["pairwise"]["sti_normalized_mean"]), pair_norm / 2, pair_norm_bound / 2,
                  "pairwise normalized mean")
    check_totals(results)

    for name, model in pool.items():  # inputs never modified
        assert all(torch.equal(v, before[name][k]) for k, v in model.state_dict().items())
    on_disk = json.loads((tmp_path / "sti.json").read_text())
    assert on_disk["totals"] == results["totals"]  # JSON writes floats with repr: exact
    with open(tmp_path / "sti.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == layers
    assert float(rows[1]["sti"]) == results["layers"][1]["sti"]  # csv writes floats with repr: exact
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
        deltas = layer_deltas(pool, a["layer"], 4)
        (m, n), (value, l1) = deltas[0].shape, oracle_sti(deltas, 2)
        bound = 2 * sti_bound(deltas, 2, torch.float32)  # two float32 evaluations of the same value
        assert_within(a["sti"], b["sti"], bound, "sti")
        assert_within(a["sti_normalized"], b["sti_normalized"], 2 * bound / l1, "sti_normalized")
        assert_within(a["sti_decorrelated_normalized"], b["sti_decorrelated_normalized"],
                      2 * decorrelated_sti_bound(m, n, 8, torch.float32), "sti_decorrelated_normalized")
    check_totals(small.results)
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
    check_totals(results)
    # the tiny CLIP's layers (k = floor(r/8), T·k <= r): decorrelation leaves round-off only
    largest = max(int(d) for row in results["layers"] for d in row["shape"].split("x"))
    bound = decorrelated_sti_bound(largest, largest, largest, torch.float32)
    assert results["totals"]["sti_normalized_mean"] > 1e3 * bound
    assert_within(results["totals"]["sti_decorrelated_normalized_mean"], 0.0, bound, "decorrelated mean")
    with open(out_dir / "sti.csv") as f:
        assert len(list(csv.DictReader(f))) == len(results["layers"]) > 0
    for png in ("sti_per_layer.png", "sti_pairwise.png"):
        assert (out_dir / png).stat().st_size > 1000
    assert out_dir.name == "sti", "the default save_path is <log_dir>/sti"
    assert list(out_dir.parent.glob("**/events.out.tfevents*")), "no TensorBoard scalars"
