"""Tests for Task Singular Vectors (TSV-M, TSV-C, STI; Gargiulo et al., CVPR 2025, arXiv:2412.00081).

Every algorithm is checked against a direct float64 evaluation of the paper's formulas written here with
``torch.linalg.svd`` only. The models are float64, so the implementations run in float64 too and the only
differences are round-off: each check's bound is backward-stable SVD error (c·n·ε₆₄·‖Δ‖, c ≤ 10) divided
by how well the fixture determines the singular subspaces (Davis–Kahan: the relative singular-value gap).
"""

import json
import tempfile
import unittest
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

from fusion_bench_tsv.functional import singular_task_interference

EPS64 = torch.finfo(torch.float64).eps


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)  # r = 6: k = 2 per task for T = 3
        self.fc2 = nn.Linear(6, 2)  # r = 2 < T = 3: k = 1 (the built-in TaskSingularVectorMerging uses k = 0)


def make_models(num_tasks=3, seed=0):
    torch.manual_seed(seed)
    pretrained = TinyModel().double()
    models = {"_pretrained_": pretrained}
    for i in range(num_tasks):
        finetuned = deepcopy(pretrained)
        with torch.no_grad():
            for p in finetuned.parameters():
                p.add_(0.1 * torch.randn_like(p))
        models[f"task_{i}"] = finetuned
    return models


def task_deltas(models):
    base = models["_pretrained_"].state_dict()
    tasks = [m.state_dict() for name, m in models.items() if name != "_pretrained_"]
    return base, {key: [sd[key] - base[key] for sd in tasks] for key in base}


def top_k(delta, k):
    """Top-k triplets (U, S, V) and the relative gap (σ_k − σ_{k+1}) / σ_1 that determines them (1 at full rank)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    gap = 1.0 if k == S.numel() else float((S[k - 1] - S[k]) / S[0])
    return U[:, :k], S[:k], Vh[:k].T, gap


def polar(a):
    """Orthogonal Procrustes: the nearest matrix with orthonormal columns (or rows), P Qᵀ of a = P D Qᵀ."""
    P, D, Qh = torch.linalg.svd(a, full_matrices=False)
    return P @ Qh, float(D[-1] / D[0])


def reference_tsv_merge(models, alpha=1.0):
    """θ₀ + α·U⊥ΣV⊥ᵀ per matrix (k = max(1, floor(r / T))), θ₀ + α·mean(Δ) otherwise; and the smallest gap."""
    base, deltas = task_deltas(models)
    merged, gap = {}, 1.0
    for key, ds in deltas.items():
        if ds[0].dim() == 2:
            k = max(1, min(ds[0].shape) // len(ds))
            parts = [top_k(d, k) for d in ds]
            U_perp, cond_u = polar(torch.cat([p[0] for p in parts], dim=1))
            V_perp, cond_v = polar(torch.cat([p[2] for p in parts], dim=1))
            S = torch.cat([p[1] for p in parts])
            update = (U_perp * S) @ V_perp.T
            gap = min([gap, cond_u, cond_v] + [p[3] for p in parts])
        else:
            update = torch.stack(ds).mean(0)
        merged[key] = base[key] + alpha * update
    return merged, gap


def assert_states_close(test, actual, expected, gap, what):
    for key, ref in expected.items():
        n = max(ref.shape) if ref.dim() else 1
        # backward-stable float64 SVDs (c·n·ε₆₄·‖θ‖, c = 10), amplified by 1/gap (Davis–Kahan), ×10 for the
        # chain of per-task SVD, Procrustes and products
        bound = 100 * n * EPS64 * float(ref.abs().max()) / gap
        err = float((actual[key].double() - ref).abs().max())
        test.assertLessEqual(err, bound, msg=f"{what}: {key}: max |error| {err:.3g} > bound {bound:.3g}")


class TestRegistration(unittest.TestCase):
    def test_algorithms_import_lazily_from_fusion_bench_method(self):
        import fusion_bench.method as method
        from fusion_bench import BaseAlgorithm

        for name in ("TSVMergeAlgorithm", "TSVCompressAlgorithm", "STIAnalysis"):
            self.assertTrue(issubclass(getattr(method, name), BaseAlgorithm), msg=name)

    def test_task_singular_vector_compression_is_implemented(self):
        from fusion_bench.method import TSVCompressAlgorithm
        from fusion_bench.method.task_singular_vector.TSVC import TaskSingularVectorCompression

        self.assertIs(TaskSingularVectorCompression, TSVCompressAlgorithm)


class TestTSVMerge(unittest.TestCase):
    def test_matches_reference(self):
        from fusion_bench.method import TSVMergeAlgorithm

        models = make_models()
        for alpha, svd_method in ((1.0, "svd"), (1.0, "gram"), (0.5, "gram")):
            with self.subTest(alpha=alpha, svd_method=svd_method):
                algo = TSVMergeAlgorithm(alpha=alpha, svd_method=svd_method, device="cpu", show_pbar=False)
                merged = algo.run({k: deepcopy(v) for k, v in models.items()})
                expected, gap = reference_tsv_merge(models, alpha)
                assert_states_close(self, merged.state_dict(), expected, gap, f"alpha={alpha}, {svd_method}")

    def test_layer_with_rank_below_num_tasks_is_merged(self):
        # fc2 has r = 2 < T = 3: floor(r / T) = 0 would drop its update; TSV-M keeps k = 1 per task
        from fusion_bench.method import TSVMergeAlgorithm

        models = make_models()
        merged = TSVMergeAlgorithm(device="cpu", show_pbar=False).run({k: deepcopy(v) for k, v in models.items()})
        change = float((merged.fc2.weight - models["_pretrained_"].fc2.weight).abs().max())
        self.assertGreater(change, 1e-3, msg=f"fc2's merged update is {change:.3g}: the layer was dropped")

    def test_inputs_are_not_modified(self):
        from fusion_bench.method import TSVMergeAlgorithm

        models = make_models()
        before = {name: deepcopy(m.state_dict()) for name, m in models.items()}
        TSVMergeAlgorithm(device="cpu", show_pbar=False).run(models)
        for name, model in models.items():
            for key, value in model.state_dict().items():
                self.assertTrue(torch.equal(value, before[name][key]), msg=f"{name}.{key} was modified")


class TestTSVCompress(unittest.TestCase):
    def test_task_models_match_truncated_svd(self):
        from fusion_bench.method import TSVCompressAlgorithm

        models = make_models()
        base, deltas = task_deltas(models)
        algo = TSVCompressAlgorithm(routed_eval=False, device="cpu", show_pbar=False)
        task_models = algo.run({k: deepcopy(v) for k, v in models.items()})
        self.assertEqual(sorted(task_models), ["task_0", "task_1", "task_2"])
        for i, name in enumerate(sorted(task_models)):
            state = task_models[name].state_dict()
            for key, ds in deltas.items():
                if ds[i].dim() != 2:  # kept as the fine-tuned model has it
                    self.assertTrue(torch.equal(state[key], models[name].state_dict()[key]), msg=f"{name}.{key}")
                    continue
                k = max(1, min(ds[i].shape) // len(ds))
                U, S, V, gap = top_k(ds[i], k)
                assert_states_close(self, {key: state[key]}, {key: base[key] + (U * S) @ V.T}, gap, name)


class TestSTI(unittest.TestCase):
    @staticmethod
    def reference_sti(ds, k):
        parts = [top_k(d, k) for d in ds]
        U = torch.cat([p[0] for p in parts], dim=1)
        V = torch.cat([p[2] for p in parts], dim=1)
        S = torch.diag(torch.cat([p[1] for p in parts]))
        eye = torch.eye(U.shape[1], dtype=U.dtype)
        return float(((U.T @ U - eye) @ S @ (V.T @ V - eye)).abs().sum()), min(p[3] for p in parts)

    def test_orthogonal_tasks_do_not_interfere(self):
        # tasks on disjoint coordinates: UᵀU = I and VᵀV = I, so STI is 0 up to round-off
        ds = [torch.zeros(6, 6, dtype=torch.float64) for _ in range(3)]
        for i, d in enumerate(ds):
            d[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        sti = float(singular_task_interference(ds))
        bound = 100 * 6 * EPS64 * 3.7  # c·n·ε₆₄·σ₁ with σ₁ = (5 + √5) / 2 ≈ 3.62
        self.assertLessEqual(sti, bound, msg=f"STI {sti:.3g} > bound {bound:.3g}")

    def test_analysis_matches_reference(self):
        from fusion_bench.method import STIAnalysis

        models = make_models()
        _, deltas = task_deltas(models)
        with tempfile.TemporaryDirectory() as out:
            STIAnalysis(save_path=out, device="cpu", show_pbar=False).run({k: deepcopy(v) for k, v in models.items()})
            layers = {row["layer"]: row for row in json.loads((Path(out) / "sti.json").read_text())["layers"]}
        self.assertEqual(sorted(layers), ["fc1.weight", "fc2.weight"])
        for key, row in layers.items():
            ds = deltas[key]
            for column, k in (("sti", max(1, min(ds[0].shape) // len(ds))), ("sti_full", min(ds[0].shape))):
                expected, gap = self.reference_sti(ds, k)
                bound = 100 * len(ds) * max(ds[0].shape) * EPS64 * expected / gap  # as assert_states_close
                err = abs(row[column] - expected)
                self.assertLessEqual(err, bound, msg=f"{key} {column}: |error| {err:.3g} > bound {bound:.3g}")

    def test_compute_task_singular_interference_runs(self):
        from fusion_bench.method.task_singular_vector.utils import compute_task_singular_interference

        _, deltas = task_deltas(make_models())
        ds = deltas["fc1.weight"]
        expected, gap = self.reference_sti(ds, min(ds[0].shape))
        value = compute_task_singular_interference(ds)
        bound = 100 * len(ds) * max(ds[0].shape) * EPS64 * expected / gap
        self.assertLessEqual(abs(value - expected), bound, msg=f"{value} vs {expected}: bound {bound:.3g}")


if __name__ == "__main__":
    unittest.main()
