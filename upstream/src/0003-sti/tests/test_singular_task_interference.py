"""STI analysis against a float64 evaluation of Gargiulo et al., CVPR 2025, Eq. 4."""

import json
import os
import tempfile
import unittest
from copy import deepcopy

import torch
import torch.nn as nn

from fusion_bench.method import SingularTaskInterference
from fusion_bench.method.task_singular_vector.utils.interference import (
    pairwise_singular_task_interference,
    singular_task_interference,
)

EPS = torch.finfo(torch.float64).eps


def _polar(a):
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _reference_sti(deltas, k, decorrelate=False):
    """STI and its error bound: each of the p² entries sums p terms <= σ_max from
    inner products of length <= m + n + p, so |error| <= p³ (m + n + p) ε σ_max."""
    svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    U = torch.cat([u[:, :k] for u, _, _ in svds], dim=1)
    S = torch.cat([s[:k] for _, s, _ in svds])
    V = torch.cat([vh[:k].T for _, _, vh in svds], dim=1)
    if decorrelate:  # TSVM's: the nearest matrices with orthonormal columns (rows)
        U, V = _polar(U), _polar(V)
    eye = torch.eye(U.shape[1], dtype=torch.float64)
    sti = ((U.T @ U - eye) @ torch.diag(S) @ (V.T @ V - eye)).abs().sum().item()
    (m, n), p = deltas[0].shape, U.shape[1]
    return sti, S.sum().item(), p**3 * (m + n + p) * EPS * S.max().item()


def _mean_cosine(tasks):
    flat = torch.stack([d.flatten() for d in tasks])
    cos = nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    return cos[[0, 0, 1], [1, 2, 2]].mean().item()


def _models(num_tasks=3, seed=0):
    torch.manual_seed(seed)
    pretrained = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5)).double()
    models = {"_pretrained_": pretrained}
    for i in range(num_tasks):
        models[f"task_{i}"] = deepcopy(pretrained)
        for p in models[f"task_{i}"].parameters():
            p.data += torch.randn_like(p)
    return models


class TestSingularTaskInterference(unittest.TestCase):
    def test_two_scalar_tasks(self):
        # (UᵀU - I) Σ (VᵀV - I) = diag(c |d_2|, c |d_1|), c = ±1: STI = |d_1| + |d_2|
        deltas = [torch.tensor([[2.0]]), torch.tensor([[-3.0]])]
        self.assertEqual(singular_task_interference(deltas).item(), 5.0)

    def test_matches_reference(self):
        models = _models()
        before = [deepcopy(m.state_dict()) for m in models.values()]
        with tempfile.TemporaryDirectory() as out:
            algorithm = SingularTaskInterference(output_path=out)
            self.assertIsNone(algorithm.run(models))
            with open(os.path.join(out, "sti.json")) as f:
                results = json.load(f)
            with open(os.path.join(out, "sti.csv")) as f:
                self.assertEqual(len(f.readlines()), 3)
        for model, state in zip(models.values(), before):  # inputs are not modified
            self.assertTrue(
                all(map(torch.equal, model.state_dict().values(), state.values()))
            )
        base, tasks = models["_pretrained_"].state_dict(), list(models.values())[1:]
        pair, pair_bound = 0.0, 0.0
        for row, key in zip(results["layers"], ["0.weight", "2.weight"]):
            deltas = [m.state_dict()[key] - base[key] for m in tasks]
            r = min(deltas[0].shape)
            self.assertEqual((row["layer"], row["k"]), (key, r // 3))
            for column, k in (("sti_full", r), ("sti", r // 3)):
                sti, sigma, bound = _reference_sti(deltas, k)
                self.assertAlmostEqual(row[column], sti, delta=bound)
                self.assertAlmostEqual(
                    row[column + "_normalized"], sti / sigma, delta=2 * bound / sigma
                )
            # exactly 0 when T k <= r; its round-off is far below that of the STI
            self.assertLessEqual(row["sti_decorrelated"], bound)
            self.assertGreater(row["sti"], 1e3 * bound)
            # float64 sums of mn terms
            expected = _mean_cosine(deltas)
            self.assertAlmostEqual(row["cosine_mean"], expected, delta=10 * 48 * EPS)
            sti, _, bound = _reference_sti(deltas[:2], r // 3)
            pair, pair_bound = pair + sti, pair_bound + bound
        self.assertAlmostEqual(
            results["pairwise_sti_sum"][0][1], pair, delta=pair_bound
        )

    def test_rank_deficient_tasks_keep_their_rank(self):
        # the null-space singular vectors are an arbitrary basis: they are left out
        torch.manual_seed(0)
        x = torch.randn(2, 6, 1, dtype=torch.float64)
        deltas = list(x @ torch.randn(2, 1, 5, dtype=torch.float64))  # rank 1 each
        sti, _, bound = _reference_sti(deltas, 1)
        got = singular_task_interference(deltas, 3).item()
        self.assertAlmostEqual(got, sti, delta=bound)

    def test_options_and_current_directory(self):
        models = _models()
        base, tasks = models["_pretrained_"].state_dict(), list(models.values())[1:]
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory() as out:
            os.chdir(out)  # no output_path and no log directory: the current one
            try:
                SingularTaskInterference(full_rank=False, exclude_keys=["0.*"]).run(
                    models
                )
                with open("sti.json") as f:
                    (row,) = json.load(f)["layers"]
            finally:
                os.chdir(cwd)
        self.assertEqual(
            (row["layer"], row["k"], row["sti_full"]), ("2.weight", 1, None)
        )
        deltas = [m.state_dict()["2.weight"] - base["2.weight"] for m in tasks]
        sti, _, bound = _reference_sti(deltas, 1)
        self.assertAlmostEqual(row["sti"], sti, delta=bound)
        # cosines of the rank-1 reconstructions (from the factors): sums of 30 terms
        svds = map(torch.linalg.svd, deltas)
        expected = _mean_cosine([u[:, :1] * s[:1] @ vh[:1] for u, s, vh in svds])
        self.assertAlmostEqual(row["cosine_mean"], expected, delta=10 * 30 * EPS)

    def test_pairwise_decorrelated(self):
        # each pair decorrelated alone; not 0 as 2k > max(m, n)
        torch.manual_seed(0)
        deltas = list(torch.randn(3, 3, 3, dtype=torch.float64))
        got = pairwise_singular_task_interference(deltas, 2, decorrelate=True)
        self.assertEqual(got.diagonal().tolist(), [0.0] * 3)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            sti, _, bound = _reference_sti([deltas[i], deltas[j]], 2, decorrelate=True)
            self.assertGreater(sti, 1e3 * bound)
            # the polar factors add an error of the order of the products'
            self.assertAlmostEqual(got[i, j].item(), sti, delta=2 * bound)
            self.assertEqual(got[j, i].item(), got[i, j].item())

    def test_bad_input(self):
        models = _models(num_tasks=2)
        with self.assertRaisesRegex(ValueError, "at least 2 fine-tuned models"):
            SingularTaskInterference().run({k: models[k] for k in list(models)[:2]})
        with self.assertRaisesRegex(ValueError, "rank=6 .* parameter '2.weight'"):
            SingularTaskInterference(rank=6).run(models)


if __name__ == "__main__":
    unittest.main()
