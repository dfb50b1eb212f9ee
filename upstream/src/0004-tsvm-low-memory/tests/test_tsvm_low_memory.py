"""Tests for `TaskSingularVectorMerging(low_memory=True)`: one parameter at a time, the
same merged model as the default path (bitwise: every parameter goes through the same
`compute_and_sum_svd_mem_reduction` on the same task vectors)."""

import tempfile
import unittest
from copy import deepcopy
from unittest import mock

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench.method import TaskSingularVectorMerging
from fusion_bench.method.task_singular_vector import TSVM
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.modelpool.lazy_state_dict_pool import LazyStateDictPool
from fusion_bench.utils.lazy_state_dict import LazyStateDict

from .test_task_singular_vector import _modelpool, _reference_tsvm


def _merge(models, **kwargs):
    pool = BaseModelPool({name: deepcopy(model) for name, model in models.items()})
    return TaskSingularVectorMerging(**kwargs).run(pool)


def _clip_models(num_tasks):
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    pretrained = CLIPVisionModel(config)
    models = {"_pretrained_": pretrained}
    for i in range(num_tasks):
        models[f"task_{i}"] = finetuned = deepcopy(pretrained)
        with torch.no_grad():
            for p in finetuned.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return models


class TestTSVMLowMemory(unittest.TestCase):
    def _merge_low_memory(self, models, **kwargs):
        # a pool of modules: the same merge, with a warning that they stay in memory
        with self.assertLogs(TSVM.__name__, "WARNING") as logs:
            merged = _merge(models, low_memory=True, **kwargs)
        self.assertIn("stay in memory", logs.output[0])
        return merged

    def assertStatesEqual(self, got, expected):
        self.assertEqual(list(got.keys()), list(expected.keys()))
        for key in expected:
            self.assertTrue(torch.equal(got[key], expected[key]), key)

    def test_equals_in_memory_merge(self):
        # the 17 x 32 position embedding and 80 x 32 MLP matrices: k = 5 and 10
        models = _clip_models(num_tasks=3)
        for kwargs in (
            {"alpha": 0.7},
            {"alpha": [0.5, 1.0, 1.5]},
            {"exclude_keys": ["vision_model.encoder.layers.0.mlp.fc1.weight"]},
            {"return_single_task_models": True},
        ):
            with self.subTest(**kwargs):
                expected = _merge(models, **kwargs)
                got = self._merge_low_memory(models, **kwargs)
                if isinstance(expected, dict):
                    self.assertEqual(list(got), list(expected))
                    for name in expected:
                        self.assertStatesEqual(
                            got[name].state_dict(), expected[name].state_dict()
                        )
                else:
                    self.assertStatesEqual(got.state_dict(), expected.state_dict())

    def test_matches_reference(self):
        # r = min(6, 8) = 6 and T = 3: k = 2; the float64 reference of
        # tests/test_task_singular_vector.py and its round-off bound
        models = _modelpool(in_features=8, out_features=6, num_tasks=3, seed=0)
        pretrained = deepcopy(models["_pretrained_"].state_dict())
        tasks = [models[f"task_{i}"].state_dict() for i in range(3)]
        merged = self._merge_low_memory(models, alpha=1)
        U, S, V, bound = _reference_tsvm(
            [t["weight"] - pretrained["weight"] for t in tasks], k=2
        )
        error = merged.weight - pretrained["weight"] - U @ torch.diag(S) @ V.T
        self.assertLessEqual(error.abs().max().item(), bound)
        mean_bias = torch.stack([t["bias"] - pretrained["bias"] for t in tasks]).mean(0)
        torch.testing.assert_close(merged.bias, pretrained["bias"] + mean_bias)

    def test_lazy_state_dict_pool_reads_one_parameter_at_a_time(self):
        models = _clip_models(num_tasks=3)
        expected = _merge(models, alpha=0.7)
        with tempfile.TemporaryDirectory() as root:
            paths = {}
            for name, model in models.items():
                paths[name] = f"{root}/{name}"
                model.save_pretrained(paths[name])  # model.safetensors
            pool = LazyStateDictPool(
                models={
                    **paths,
                    "_pretrained_": {
                        "_target_": "fusion_bench.utils.lazy_state_dict.LazyStateDict",
                        "checkpoint": paths["_pretrained_"],
                        "meta_module_class": "transformers.CLIPVisionModel",
                    },
                }
            )
            algorithm = TaskSingularVectorMerging(alpha=0.7, low_memory=True)
            read = LazyStateDict.__getitem__
            with mock.patch.object(
                LazyStateDict, "__getitem__", autospec=True, side_effect=read
            ) as getitem:
                merged = algorithm.run(pool)
        self.assertIsInstance(merged, CLIPVisionModel)
        self.assertStatesEqual(merged.state_dict(), expected.state_dict())
        # each tensor is read once (T + 1 checkpoints), all of a parameter before the next
        keys = [c.args[1] for c in getitem.call_args_list]
        order = list(dict.fromkeys(keys))
        self.assertEqual(keys, [key for key in order for _ in range(len(models))])


if __name__ == "__main__":
    unittest.main()
