"""Tests for Task Singular Vector Compression (TSV-C).

Each task's model is compared with a float64 evaluation of the formula of Gargiulo et
al., CVPR 2025 (arXiv:2412.00081): W_0 + the best rank-k approximation of W_i - W_0,
computed here with numpy's SVD, independently of ``tsv_compression``.
"""

import json
import os
import tempfile
import unittest
from copy import deepcopy

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open

from fusion_bench.method import TaskSingularVectorCompression
from fusion_bench.method.task_singular_vector.utils.tsv_compression import (
    apply_compressed,
    read_layout,
    task_from_tensors,
)
from fusion_bench.modelpool import BaseModelPool

EPS = torch.finfo(torch.float64).eps


def _models(in_features, out_features, num_tasks, seed):
    torch.manual_seed(seed)
    pretrained = nn.Linear(in_features, out_features, dtype=torch.float64)
    pretrained.requires_grad_(False)
    models = {"_pretrained_": pretrained}
    for i in range(num_tasks):
        models[f"task_{i}"] = deepcopy(pretrained)
        for p in models[f"task_{i}"].parameters():
            p.add_(torch.randn_like(p))
    return models


def _rank_k(delta, k):
    """Best rank-k approximation in float64 and the bound on its round-off:
    8 sqrt(d) eps sigma_1 max(1, sigma_k / (sigma_k - sigma_k+1)) (the SVD's backward
    error, amplified at the cut by Wedin's gap)."""
    u, s, vh = np.linalg.svd(delta.numpy(), full_matrices=False)
    gap = s[k - 1] / (s[k - 1] - s[k]) if k < len(s) else 1.0
    bound = 8 * np.sqrt(max(delta.shape)) * EPS * s[0] * max(1.0, gap)
    return (u[:, :k] * s[:k]) @ vh[:k], bound


def _energy_k(delta, energy):
    s2 = np.linalg.svd(delta.numpy(), compute_uv=False) ** 2
    return next(k for k in range(1, len(s2) + 1) if s2[:k].sum() >= energy * s2.sum())


class TestTaskSingularVectorCompression(unittest.TestCase):
    def check(self, models, outputs, k_of):
        """Each task's weight is W_0 + the rank-k oracle, its bias the fine-tuned one."""
        w0 = models["_pretrained_"].weight
        for name, model in outputs.items():
            delta = models[name].weight - w0
            k = k_of(delta)
            expected, bound = _rank_k(delta, k)
            error = (model.weight - w0).detach().numpy() - expected
            self.assertLess(np.abs(error).max(), bound, f"{name}, k={k}")
            self.assertTrue(torch.equal(model.bias, models[name].bias))

    def test_default_rank(self):
        # k = floor(min(m, n) / T): 2 for 12 x 7 and T = 3; 1 (not 0) for 3 x 9 and T = 5
        for shape, num_tasks, k in (((7, 12), 3, 2), ((9, 3), 5, 1)):
            models = _models(*shape, num_tasks, seed=num_tasks)
            before = deepcopy(models)
            outputs = TaskSingularVectorCompression().run(BaseModelPool(models))
            self.assertEqual(sorted(outputs), [f"task_{i}" for i in range(num_tasks)])
            self.check(models, outputs, lambda delta: k)
            for name, model in models.items():  # inputs not modified
                self.assertTrue(torch.equal(model.weight, before[name].weight))

    def test_rank_options(self):
        models = _models(10, 8, 2, seed=0)
        for options, k_of in (
            ({"fraction": 0.3}, lambda delta: 2),  # floor(0.3 * 8)
            ({"rank": 5}, lambda delta: 5),
            ({"energy": 0.9}, lambda delta: _energy_k(delta, 0.9)),
        ):
            method = TaskSingularVectorCompression(**options)
            self.check(models, method.run(BaseModelPool(models)), k_of)
        with self.assertRaisesRegex(ValueError, "'rank'=9 exceeds .*'weight'"):
            TaskSingularVectorCompression(rank=9).run(BaseModelPool(models))
        with self.assertRaisesRegex(ValueError, "exclusive"):
            TaskSingularVectorCompression(rank=2, energy=0.5)

    def test_saved_file_rebuilds_the_models(self):
        models = _models(12, 7, 3, seed=1)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "tsv_c.safetensors")
            method = TaskSingularVectorCompression(save_path=path)
            outputs = method.run(BaseModelPool(models))
            self.assertEqual(os.listdir(tmp), ["tsv_c.safetensors"])
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata()
                layout = read_layout(metadata)
                self.assertEqual(layout["tasks"], ["task_0", "task_1", "task_2"])
                self.assertEqual(
                    json.loads(metadata["matrices"])["weight"]["k"], [2] * 3
                )
                stored = sum(f.get_tensor(n).numel() for n in f.keys())
                base = models["_pretrained_"].state_dict()
                for name in layout["tasks"]:
                    task = task_from_tensors(layout, name, f.get_tensor)
                    rebuilt = apply_compressed(base, task)
                    for key, value in outputs[name].state_dict().items():
                        self.assertTrue(torch.equal(rebuilt[key], value), (name, key))
        self.assertEqual(stored, 3 * (2 * (7 + 12 + 1) + 7))  # k(m + n + 1) + bias

    def test_routed_evaluation(self):
        """Each task's model is evaluated on its own task only, through the task pool."""
        models = _models(4, 3, 2, seed=2)

        class TaskPool:
            def setup(self):
                self.test_dataloaders = {"task_0": 0, "task_1": 1, "other": 2}

            def evaluate(self, model):
                (task,) = self.test_dataloaders
                return {task: {"accuracy": float(model.bias.sum()), "seen": task}}

        taskpool = TaskPool()
        method = TaskSingularVectorCompression()
        method._program = type("Program", (), {"taskpool": taskpool})()
        report = method.run(BaseModelPool(models))
        for name in ("task_0", "task_1"):  # the bias is the fine-tuned one
            accuracy = float(models[name].bias.sum())
            self.assertEqual(report[name], {"accuracy": accuracy, "seen": name})
        self.assertNotIn("other", report)
        self.assertEqual(len(taskpool.test_dataloaders), 3)  # restored
        mean = (report["task_0"]["accuracy"] + report["task_1"]["accuracy"]) / 2
        self.assertAlmostEqual(report["average"]["accuracy"], mean, places=12)
        self.assertEqual(report["storage"]["num_tasks"], 2)

    def test_no_routing_without_matching_test_sets(self):
        models = _models(4, 3, 2, seed=3)
        pool = type("TaskPool", (), {"setup": print, "test_dataloaders": {"mnist": 0}})
        method = TaskSingularVectorCompression()
        method._program = type("Program", (), {"taskpool": pool()})()
        outputs = method.run(BaseModelPool(models))  # routed: no evaluate, an error
        self.assertEqual(sorted(outputs), ["task_0", "task_1"])
        self.check(models, outputs, lambda delta: 1)  # floor(3 / 2)


if __name__ == "__main__":
    unittest.main()
