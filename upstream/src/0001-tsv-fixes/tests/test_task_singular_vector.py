"""Tests for Task Singular Vector Merging (TSVM) and the singular task interference (STI).

Each result is compared with a float64 evaluation of the formulas of Gargiulo et al., CVPR 2025
(arXiv:2412.00081), written independently of ``TSVM_utils``.
"""

import unittest
from copy import deepcopy

import torch
import torch.nn as nn

from fusion_bench.method import TaskSingularVectorMerging
from fusion_bench.method.task_singular_vector.utils import (
    compute_task_singular_interference,
)
from fusion_bench.modelpool import BaseModelPool

EPS = torch.finfo(torch.float64).eps


def _modelpool(in_features, out_features, num_tasks, seed):
    torch.manual_seed(seed)
    pretrained = nn.Linear(in_features, out_features, dtype=torch.float64)
    models = {"_pretrained_": pretrained}
    for i in range(num_tasks):
        finetuned = deepcopy(pretrained)
        with torch.no_grad():
            for p in finetuned.parameters():
                p.add_(torch.randn_like(p))
        models[f"task_{i}"] = finetuned
    return models


def _orthogonalize(x):
    """The nearest matrix with orthonormal columns, x (xᵀx)^(-1/2), or rows, (x xᵀ)^(-1/2) x, when x is wide."""
    gram = x @ x.T if x.shape[0] < x.shape[1] else x.T @ x
    w, q = torch.linalg.eigh(gram)
    inv_sqrt = q @ torch.diag(w.rsqrt()) @ q.T
    return inv_sqrt @ x if x.shape[0] < x.shape[1] else x @ inv_sqrt


def _reference_tsvm(deltas, k):
    """TSV-M of one matrix: the top-k factors of every task concatenated, U and V orthogonalized.

    Returns U⊥, Σ, V⊥ (the merged update is U⊥ Σ V⊥ᵀ, task i's part the i-th blocks of k columns) and the
    bound on the update's round-off: the eigh-based orthogonalization has an error of order d·ε·κ²
    (κ: condition number of U or V, d: the largest dimension), times ‖Σ‖.
    """
    svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    U = torch.cat([u[:, :k] for u, _, _ in svds], dim=1)
    S = torch.cat([s[:k] for _, s, _ in svds])
    V = torch.cat([vh[:k].T for _, _, vh in svds], dim=1)
    kappa = [torch.linalg.cond(x).item() for x in (U, V)]
    bound = (
        10 * max(*U.shape, *V.shape) * EPS * sum(c**2 for c in kappa) * S.max().item()
    )
    return _orthogonalize(U), S, _orthogonalize(V), bound


def _reference_sti(deltas):
    """STI block by block: block (i, j) of (UᵀU − I) Σ (VᵀV − I) is Σ_l (U_iᵀU_l − δ_il I) Σ_l (V_lᵀV_j − δ_lj I).

    Returns the STI and the bound on its round-off, first order in ε over the inner dimensions of the
    products: 4 (m + n + r T) ε ‖(|U|ᵀ|U| + I) Σ (|V|ᵀ|V| + I)‖₁.
    """
    svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    U = [u for u, _, _ in svds]
    S = [s for _, s, _ in svds]
    V = [vh.T for _, _, vh in svds]
    T, r = len(deltas), S[0].shape[0]
    I = torch.eye(r, dtype=torch.float64)
    total = 0.0
    for i in range(T):
        for j in range(T):
            block = sum(
                (U[i].T @ U[l] - (i == l) * I)
                @ torch.diag(S[l])
                @ (V[l].T @ V[j] - (l == j) * I)
                for l in range(T)
            )
            total += block.abs().sum().item()
    Ua, Va = torch.cat(U, dim=1).abs(), torch.cat(V, dim=1).abs()
    eye = torch.eye(T * r, dtype=torch.float64)
    magnitude = (Ua.T @ Ua + eye) @ torch.diag(torch.cat(S)) @ (Va.T @ Va + eye)
    m, n = deltas[0].shape
    return total, 4 * (m + n + r * T) * EPS * magnitude.sum().item()


class TestTaskSingularVectorMerging(unittest.TestCase):
    def _check_merge(self, in_features, out_features, num_tasks, k):
        models = _modelpool(in_features, out_features, num_tasks, seed=0)
        pretrained = deepcopy(models["_pretrained_"]).state_dict()
        names = [f"task_{i}" for i in range(num_tasks)]
        tasks = [models[name].state_dict() for name in names]

        algorithm = TaskSingularVectorMerging(alpha=1, return_single_task_models=True)
        merged = algorithm.run(BaseModelPool(models))

        deltas = [t["weight"] - pretrained["weight"] for t in tasks]
        U, S, V, bound = _reference_tsvm(deltas, k)
        update = U @ torch.diag(S) @ V.T
        error = (merged["merged"].weight - pretrained["weight"] - update).abs().max()
        self.assertLessEqual(error.item(), bound)
        for i, name in enumerate(names):  # each task's part of the merged update
            part = slice(i * k, (i + 1) * k)
            task_update = U[:, part] @ torch.diag(S[part]) @ V[:, part].T
            error = (
                (merged[name].weight - pretrained["weight"] - task_update).abs().max()
            )
            self.assertLessEqual(error.item(), bound, name)
        # parameters that are not matrices are averaged
        mean_bias = torch.stack([t["bias"] - pretrained["bias"] for t in tasks]).mean(0)
        torch.testing.assert_close(
            merged["merged"].bias, pretrained["bias"] + mean_bias
        )
        return update

    def test_matches_reference(self):
        # r = min(6, 8) = 6 and T = 3: k = 2 components per task
        self._check_merge(in_features=8, out_features=6, num_tasks=3, k=2)

    def test_rank_below_number_of_tasks_keeps_one_component_per_task(self):
        # r = min(4, 3) = 3 < T = 5: int(r / T) = 0 would drop the layer's update
        update = self._check_merge(in_features=3, out_features=4, num_tasks=5, k=1)
        self.assertGreater(update.abs().max().item(), 0.1)


class TestTaskSingularInterference(unittest.TestCase):
    def test_matches_reference(self):
        torch.manual_seed(0)
        deltas = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
        expected, bound = _reference_sti(deltas)
        self.assertAlmostEqual(
            compute_task_singular_interference(deltas), expected, delta=bound
        )

    def test_two_scalar_tasks(self):
        # 1 x 1 differences d_1, d_2: (UᵀU - I) Σ (VᵀV - I) = diag(c |d_2|, c |d_1|) with c = ±1
        deltas = [torch.tensor([[2.0]]), torch.tensor([[-3.0]])]
        self.assertAlmostEqual(
            compute_task_singular_interference(deltas), 5.0, delta=20 * 5.0 * EPS
        )

    def test_orthogonal_column_spaces_have_no_interference(self):
        # U = [U_1, U_2] is orthogonal when the tasks change disjoint rows, so UᵀU - I = 0
        torch.manual_seed(0)
        deltas = [torch.zeros(4, 2, dtype=torch.float64) for _ in range(2)]
        deltas[0][:2] = torch.randn(2, 2, dtype=torch.float64)
        deltas[1][2:] = torch.randn(2, 2, dtype=torch.float64)
        _, bound = _reference_sti(deltas)
        self.assertLessEqual(compute_task_singular_interference(deltas), bound)


if __name__ == "__main__":
    unittest.main()
