"""Rank revealing at the algorithm level: a pool whose task updates have exact rank 2 < k merges to the
float64 oracle that keeps 2 triplets per task (svd and gram, layer-outer lazy and model-outer loops), the
kept/dropped report counts them, a bf16-stored pool uses the storage-noise floor, and TSV-C and STI keep
the numerical rank too.

The oracle (:func:`oracles.numpy_ranked_merge`) is NumPy's float64 TSV-M of the stored differences
θᵢ − θ₀ keeping the known rank; without rank revealing the same merges miss it by O(1) (the null-space
vectors of each task enter the orthogonalization), which :func:`test_plain_top_k_misses_the_oracle` shows.
"""

from __future__ import annotations

import json
import logging
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench import BaseModelPool
from fusion_bench_tsv import STIAnalysis, TSVCompressAlgorithm, TSVMergeAlgorithm
from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state
from fusion_bench_tsv.methods.tsv_merge import RANK_REPORT_FILE

from oracles import assert_within, eps, mean_of_updates, numpy_ranked_merge, roundoff_bound

VISION = CLIPVisionConfig(
    hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
T, RANK = 4, 2  # k = floor(min(m, n) / T) = 8 (32×32, 80×32, 32×80) and 4 (17×32 position embedding) > RANK
# σ ∝ (1, 1/2): the kept triplets are well separated (σ₁/gap = 2); Δ entries of RMS 0.005, below θ₀'s ≈ 0.02
UPDATE = dict(rank=RANK, noise=0.0, decay=1.0, scale=0.005)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny SVDs: threads only fight over the shared cores
    yield
    torch.set_num_threads(threads)


def make_models(dtype: torch.dtype = torch.float32) -> dict:
    """θ₀ and T models whose every 2-D update has rank 2 (other parameters unchanged), in ``dtype``."""
    torch.manual_seed(0)
    base = CLIPVisionModel(VISION).eval()
    models = {"_pretrained_": base}
    for i in range(T):
        model = CLIPVisionModel(VISION).eval()
        model.load_state_dict(synthetic_task_state(base.state_dict(), seed=i + 1, **UPDATE))
        models[f"task{i}"] = model
    return {name: model.to(dtype) for name, model in models.items()}


def save_pool(models: dict, root: Path, task_dtype: torch.dtype = torch.float32) -> dict:
    """The models as local checkpoints (the tasks stored in ``task_dtype``): ``{name: path}``."""
    paths = {}
    for name, model in models.items():
        paths[name] = root / name
        deepcopy(model).to(torch.float32 if name == "_pretrained_" else task_dtype).save_pretrained(paths[name])
    return paths


def disk_pool(paths: dict):
    from fusion_bench.modelpool import CLIPVisionModelPool

    return CLIPVisionModelPool(models={k: str(v) for k, v in paths.items()}, processor=None)


def stored_states(models: dict, dtype: torch.dtype = torch.float32) -> tuple[dict, list]:
    """θ₀ and the θᵢ as the algorithm reads them (tasks rounded to ``dtype``, then back to θ₀'s dtype)."""
    base = models["_pretrained_"].state_dict()
    return base, [{k: v.to(dtype).to(base[k].dtype) for k, v in m.state_dict().items()}
                  for n, m in models.items() if n != "_pretrained_"]


def check_against_oracle(merged: dict, base: dict, states: list, what: str) -> dict:
    """Every decomposed matrix of ``merged`` against the float64 TSV-M keeping RANK triplets per task, every
    other parameter against θ₀ + the mean update. Returns the measured relative errors of the matrices."""
    errors = {}
    for key, theta0 in base.items():
        got = merged[key].double()
        if theta0.dim() != 2:
            expected = mean_of_updates(states, base, key)
            # a sum of T updates in float32, then rounded to θ's dtype (as oracle_merge_state)
            bound = roundoff_bound(torch.float32, T, max(float((s[key].double() - theta0.double()).abs().max())
                                                          for s in states))
            assert_within(got, expected, bound + eps(theta0.dtype) * float(expected.abs().max()), f"{what} {key}")
            continue
        ref = numpy_ranked_merge([s[key].double() - theta0.double() for s in states], [RANK] * T)
        m = np.linalg.norm(ref.merged)
        err = np.linalg.norm((got - theta0.double()).numpy() - ref.merged)
        # the merge computed in float32 (RankedMerge.error_bound), then θ₀ + M rounded to θ's dtype: u·‖θ‖_F
        bound = ref.error_bound(torch.float32) * m + eps(theta0.dtype) / 2 * float(torch.linalg.norm(got))
        assert err <= bound, f"{what} {key}: ‖error‖_F = {err:.3e} > bound {bound:.3e} (‖M‖_F = {m:.3e})"
        errors[key] = err / m
    return errors


@pytest.mark.parametrize("svd_method", ["svd", "gram"])
def test_rank_deficient_pool_merges_to_the_oracle_lazy_and_eager(svd_method, tmp_path):
    models = make_models()
    paths = save_pool(models, tmp_path)
    lazy = TSVMergeAlgorithm(show_pbar=False, device="cpu", svd_method=svd_method).run(disk_pool(paths))
    eager = TSVMergeAlgorithm(show_pbar=False, device="cpu", svd_method=svd_method, lazy_loading=False).run(
        disk_pool(paths))
    in_memory = TSVMergeAlgorithm(show_pbar=False, device="cpu", svd_method=svd_method).run(BaseModelPool(models))
    base, states = stored_states(models)
    check_against_oracle(lazy.state_dict(), base, states, f"{svd_method}, layer-outer (lazy)")
    for name, other in (("model-outer (load_model)", eager), ("model-outer (in memory)", in_memory)):
        for key, value in lazy.state_dict().items():  # the loops run the same per-parameter merge
            assert torch.equal(other.state_dict()[key], value), f"{svd_method}: {name} differs from lazy at {key}"


def test_plain_top_k_misses_the_oracle():
    """What the test above would catch: without rank revealing the null-space vectors enter U⊥ and V⊥."""
    models = make_models()
    base, states = stored_states(models)
    for svd_method in ("svd", "gram"):
        merged = TSVMergeAlgorithm(show_pbar=False, device="cpu", svd_method=svd_method, rank_revealing=False).run(
            BaseModelPool(models)).state_dict()
        with pytest.raises(AssertionError, match="bound"):
            check_against_oracle(merged, base, states, svd_method)


def test_report_counts_the_dropped_triplets(tmp_path, monkeypatch, caplog):
    models = make_models()
    monkeypatch.setattr(TSVMergeAlgorithm, "log_dir", property(lambda self: str(tmp_path)))
    with caplog.at_level(logging.INFO, logger="fusion_bench_tsv.methods.base"):
        TSVMergeAlgorithm(show_pbar=False, device="cpu").run(BaseModelPool(models))
    report = json.loads((tmp_path / RANK_REPORT_FILE).read_text())
    base = models["_pretrained_"].state_dict()
    matrices = [k for k, v in base.items() if v.dim() == 2]
    assert report["rank_revealing"] is True and report["tasks"] == [f"task{i}" for i in range(T)]
    assert sorted(report["layers"]) == sorted(matrices)
    expected_dropped = 0
    for key in matrices:
        k = max(1, min(base[key].shape) // T)
        layer = report["layers"][key]
        assert layer == {"shape": list(base[key].shape), "k": k, "kept": [RANK] * T, "dropped": T * (k - RANK)}, key
        expected_dropped += T * (k - RANK)
    assert report["totals"] == {"matrices": len(matrices), "kept": len(matrices) * T * RANK, "dropped": expected_dropped}
    by_shape = {(tuple(g["shape"]), g["k"]): g for g in report["by_shape"]}
    # 2 layers × (q, k, v, out 32×32) = 8; fc1 80×32 and fc2 32×80: 2 each; the position embedding 17×32
    assert {s: g["matrices"] for s, g in by_shape.items()} == {((32, 32), 8): 8, ((80, 32), 8): 2, ((32, 80), 8): 2,
                                                                ((17, 32), 4): 1}
    assert by_shape[((32, 32), 8)]["dropped"] == 8 * T * (8 - RANK)
    assert f"TSV-M: 8 matrices of shape (32, 32), k=8: kept 2/8 per task on {T} tasks ({8 * T * 6} dropped; " \
           "8 rank-deficient)" in caplog.text, caplog.text
    monkeypatch.setattr(TSVMergeAlgorithm, "log_dir", property(lambda self: str(tmp_path / "off")))
    TSVMergeAlgorithm(show_pbar=False, device="cpu", rank_revealing=False).run(BaseModelPool(models))
    off = json.loads((tmp_path / "off" / RANK_REPORT_FILE).read_text())
    assert off["rank_revealing"] is False and off["totals"]["dropped"] == 0


@pytest.mark.parametrize("where", ["lazy, bf16 files", "in memory, bf16 models"])
def test_bf16_storage_noise_is_dropped(where, tmp_path):
    """The tasks stored in bf16: θᵢ − θ₀ = rank 2 + rounding noise (σ ≈ u_bf16·θ̄·(√m+√n) ≈ 1e-3, far above
    the round-off floor); the storage floor of the checkpoint's dtype drops it, so every task keeps 2."""
    models = make_models()
    if where.startswith("lazy"):  # θ₀ in float32, the tasks' files in bf16: only the headers say so
        paths = save_pool(models, tmp_path, task_dtype=torch.bfloat16)
        pool, (base, states) = disk_pool(paths), stored_states(models, torch.bfloat16)
    else:
        models = {n: m.to(torch.bfloat16) for n, m in models.items()}
        pool, (base, states) = BaseModelPool(models), stored_states(models, torch.bfloat16)
    algorithm = TSVMergeAlgorithm(show_pbar=False, device="cpu", svd_method="svd")
    merged = algorithm.run(pool).state_dict()
    check_against_oracle(merged, base, states, where)


def test_tsv_compress_and_sti_keep_the_numerical_rank(tmp_path):
    models = make_models()
    base = models["_pretrained_"].state_dict()
    matrices = [k for k, v in base.items() if v.dim() == 2]
    tasks = TSVCompressAlgorithm(show_pbar=False, device="cpu", routed_eval=False).compress(BaseModelPool(models))[1]
    assert all(t.ranks == {k: RANK for k in matrices} for t in tasks), [t.ranks for t in tasks]
    plain = TSVCompressAlgorithm(show_pbar=False, device="cpu", routed_eval=False, rank_revealing=False)
    assert all(t.ranks[k] == max(1, min(base[k].shape) // T) for t in plain.compress(BaseModelPool(models))[1]
               for k in matrices)
    for full_rank in (True, False):
        sti = STIAnalysis(show_pbar=False, device="cpu", full_rank=full_rank, save_path=str(tmp_path / f"sti{full_rank}"))
        sti.run(BaseModelPool(models))
        rows = sti.results["layers"]
        assert sorted(r["layer"] for r in rows) == sorted(matrices)
        assert all(r["kept"] == [RANK] * T for r in rows), [(r["layer"], r["kept"]) for r in rows]
        csv_kept = (tmp_path / f"sti{full_rank}" / "sti.csv").read_text().splitlines()[1].split(",")[3]
        assert csv_kept == " ".join([str(RANK)] * T), csv_kept
