"""The passages of FusionBench's files that this pull request replaces, read by upstream/generate.py:
``(path, old, new)``, each ``old`` found exactly once in the file as the pull requests before leave it."""

EDITS = [
    (
        'fusion_bench/method/task_singular_vector/TSVM.py',
        """\
```

## References:

""",
        """\
```

Merge one parameter at a time, holding only that parameter's task vectors (the fine-tuned
models are read tensor by tensor when the model pool returns `LazyStateDict`s):

```bash
fusion_bench \\
    method=task_singular_vector/TaskSingularVectorMerging \\
    method.low_memory=true \\
    modelpool=...
```

## References:

""",
    ),
    (
        'fusion_bench/method/task_singular_vector/TSVM.py',
        '''\
"""

from copy import deepcopy
from typing import Iterable, List, Optional, Union
''',
        '''\
"""

import logging
from copy import deepcopy
from typing import Iterable, List, Optional, Union
''',
    ),
    (
        'fusion_bench/method/task_singular_vector/TSVM.py',
        """\
from fusion_bench.utils import timeit_context
from fusion_bench.utils.state_dict_arithmetic import (
""",
        """\
from fusion_bench.utils import timeit_context
from fusion_bench.utils.lazy_state_dict import LazyStateDict
from fusion_bench.utils.state_dict_arithmetic import (
""",
    ),
    (
        'fusion_bench/method/task_singular_vector/TSVM.py',
        """\
    vector_to_state_dict,
)


""",
        """\
    vector_to_state_dict,
)

log = logging.getLogger(__name__)


""",
    ),
    (
        'fusion_bench/method/task_singular_vector/TSVM.py',
        """\
        return_single_task_models: bool = False,
        **kwargs,
""",
        """\
        return_single_task_models: bool = False,
        low_memory: bool = False,
        **kwargs,
""",
    ),
    (
        'fusion_bench/method/task_singular_vector/TSVM.py',
        """\
                Defaults to False.

            **kwargs: Additional arguments passed to the parent BaseAlgorithm class.

""",
        """\
                Defaults to False.

            low_memory (bool, optional): Merge one parameter at a time: each parameter's T task
                vectors are formed, merged by the same `compute_and_sum_svd_mem_reduction` and
                freed before the next parameter, instead of holding all T task vectors. The result
                is the same, bit for bit: that function merges every parameter independently of
                the others. Memory drops from about T + 3 models to about 2 models plus one
                parameter's T task vectors when `modelpool.load_model` returns a
                `LazyStateDict` (e.g. `LazyStateDictPool`, or `CausalLMPool` with
                `enable_lazy_loading=True`), which reads a tensor from the checkpoint only when
                it is used; a model pool that returns `nn.Module`s holds all T fine-tuned models
                (a warning says so). Defaults to False.

            **kwargs: Additional arguments passed to the parent BaseAlgorithm class.

""",
    ),
    (
        'fusion_bench/method/task_singular_vector/TSVM.py',
        """\
        self.return_single_task_models = return_single_task_models
        super().__init__(**kwargs)
""",
        """\
        self.return_single_task_models = return_single_task_models
        self.low_memory = low_memory
        super().__init__(**kwargs)
""",
    ),
    (
        'fusion_bench/method/task_singular_vector/TSVM.py',
        '''\
        """
        # Determine the compute device for SVD operations (GPU if available for faster computation)
''',
        '''\
        """
        if self.low_memory:
            return self.run_low_memory(modelpool)

        # Determine the compute device for SVD operations (GPU if available for faster computation)
''',
    ),
    (
        'fusion_bench/method/task_singular_vector/TSVM.py',
        """\
            # Return only the merged model
            return pretrained_model
""",
        '''\
            # Return only the merged model
            return pretrained_model

    @torch.no_grad()
    def run_low_memory(self, modelpool: fb.BaseModelPool):
        """
        `run`, one parameter at a time (`low_memory=True`).

        For each parameter of the pretrained model, the T task vectors of that parameter
        alone go through `TSVM_utils.compute_and_sum_svd_mem_reduction` and the same
        state-dict arithmetic as in `run`, so the merged model (and the single task models)
        are bitwise those of `run`.
        """
        names = modelpool.model_names
        if isinstance(self.alpha, Iterable):
            assert len(self.alpha) == len(
                names
            ), f"Alpha list length ({len(self.alpha)}) must match number of models ({len(names)})"
        pretrained_model = modelpool.load_pretrained_model()
        if (
            isinstance(pretrained_model, LazyStateDict)
            and pretrained_model.meta_module is None
        ):
            raise ValueError(
                "low_memory: the pretrained model is a LazyStateDict without a meta "
                "module; give it meta_module_class to build the merged model"
            )
        pretrained_sd = pretrained_model.state_dict()
        finetuned_sds = [modelpool.load_model(name).state_dict() for name in names]
        for name, state_dict in zip(names, finetuned_sds):
            if set(state_dict.keys()) != set(pretrained_sd.keys()):
                raise ValueError(
                    f"Model '{name}' and the pretrained model have different parameters: "
                    f"{sorted(set(state_dict.keys()) ^ set(pretrained_sd.keys()))}"
                )
        eager = [
            n
            for n, sd in zip(names, finetuned_sds)
            if not isinstance(sd, LazyStateDict)
        ]
        if eager:
            log.warning(
                f"low_memory: {eager} were loaded as modules and stay in memory; a model "
                "pool that returns LazyStateDict (e.g. LazyStateDictPool) reads them lazily"
            )

        merged_sd, single_sds = {}, [{} for _ in names]
        for key in pretrained_sd:
            base = {key: pretrained_sd[key]}
            task_vectors = [
                state_dict_sub({key: sd[key]}, base) for sd in finetuned_sds
            ]
            if isinstance(self.alpha, Iterable):
                task_vectors = [
                    state_dict_mul(state_dict=tv, scalar=a)
                    for tv, a in zip(task_vectors, self.alpha)
                ]
            merged_tv = TSVM_utils.compute_and_sum_svd_mem_reduction(
                task_vectors,
                exclude_keys=self.exclude_keys,
                accelerator=self.fabric.device,
                return_single_task_models=self.return_single_task_models,
            )
            del task_vectors
            if self.return_single_task_models:
                merged_tv, singles = merged_tv
                for single_sd, single in zip(single_sds, singles):
                    single_sd.update(state_dict_add(base, single))
            if self.alpha is not None and isinstance(self.alpha, (float, int)):
                merged_tv = state_dict_mul(state_dict=merged_tv, scalar=self.alpha)
            merged_sd.update(state_dict_add(merged_tv, base))

        if not self.return_single_task_models:
            return self._to_model(pretrained_model, merged_sd)
        models = {
            name: self._to_model(pretrained_model, single_sd, copy=True)
            for name, single_sd in zip(names, single_sds)
        }
        models["merged"] = self._to_model(pretrained_model, merged_sd)
        return models

    @staticmethod
    def _to_model(pretrained_model, state_dict: StateDictType, copy: bool = False):
        """`state_dict` loaded into `pretrained_model` (a copy of it with `copy`), or into
        an empty copy of the meta module of a `LazyStateDict`."""
        if isinstance(pretrained_model, LazyStateDict):
            device = next(iter(state_dict.values())).device
            meta = pretrained_model.meta_module
            model = deepcopy(meta).to_empty(device=device)
            # to_empty also empties the buffers that are not in the state dict (e.g.
            # CLIP's position_ids), which the meta module holds with their values
            for name, buffer in meta.named_buffers():
                if not buffer.is_meta:
                    model.get_buffer(name).copy_(buffer)
            result = model.load_state_dict(state_dict, strict=False)
            if result.unexpected_keys:
                raise ValueError(
                    f"Unexpected keys in state dict: {result.unexpected_keys}"
                )
            if result.missing_keys:
                log.warning(f"Missing keys in state dict: {result.missing_keys}")
            return model
        model = deepcopy(pretrained_model) if copy else pretrained_model
        model.load_state_dict(state_dict)
        return model
''',
    ),
    (
        'config/method/task_singular_vector/TaskSingularVectorMerging.yaml',
        """\
alpha: 1
return_single_task_models: false
""",
        """\
alpha: 1
return_single_task_models: false
# true: merge one parameter at a time (the same model, less memory with a model pool
# that returns LazyStateDict, e.g. LazyStateDictPool)
low_memory: false
""",
    ),
    (
        'docs/algorithms/task_singular_vector.md',
        """\
where $\\alpha$ is an optional global scaling factor.


""",
        """\
where $\\alpha$ is an optional global scaling factor.

## Low-Memory Merging

By default TSVM holds the task vectors of all $T$ models at once (about $T + 3$ models in
memory). With `low_memory=true` it merges one parameter at a time: each parameter's $T$
task vectors are formed, merged and freed before the next one. Every parameter is merged
independently of the others, so the merged model is the same, bit for bit. The fine-tuned
models are read tensor by tensor when the model pool returns `LazyStateDict`s (e.g.
`LazyStateDictPool`, or `CausalLMPool` with `enable_lazy_loading: true`); then memory is
about two models (the pretrained and the merged one) plus one parameter's $T$ task vectors.
A model pool that returns modules keeps all $T$ fine-tuned models in memory.

```bash
fusion_bench \\
    method=task_singular_vector/TaskSingularVectorMerging \\
    method.low_memory=true \\
    modelpool=...
```

with a model pool such as

```yaml
_target_: fusion_bench.modelpool.lazy_state_dict_pool.LazyStateDictPool
models:
  _pretrained_:
    _target_: fusion_bench.utils.LazyStateDict
    checkpoint: path/to/pretrained  # a directory with model.safetensors
    meta_module_class: transformers.CLIPVisionModel  # builds the merged model
  task_1: path/to/task_1
  task_2: path/to/task_2
```

""",
    ),
    (
        'tests/test_task_singular_vector.py',
        '''\
"""

import unittest
from copy import deepcopy
''',
        '''\
"""

import tempfile
import unittest
from copy import deepcopy
''',
    ),
    (
        'tests/test_task_singular_vector.py',
        """\
import unittest
from copy import deepcopy

import torch
""",
        """\
import unittest
from copy import deepcopy
from unittest import mock

import torch
""",
    ),
    (
        'tests/test_task_singular_vector.py',
        """\
import torch
import torch.nn as nn

from fusion_bench.method import TaskSingularVectorMerging
""",
        """\
import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench.method import TaskSingularVectorMerging
""",
    ),
    (
        'tests/test_task_singular_vector.py',
        """\
from fusion_bench.method import TaskSingularVectorMerging
from fusion_bench.method.task_singular_vector.utils import (
""",
        """\
from fusion_bench.method import TaskSingularVectorMerging
from fusion_bench.method.task_singular_vector import TSVM
from fusion_bench.method.task_singular_vector.utils import (
""",
    ),
    (
        'tests/test_task_singular_vector.py',
        """\
)
from fusion_bench.modelpool import BaseModelPool

EPS = torch.finfo(torch.float64).eps
""",
        """\
)
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.modelpool.lazy_state_dict_pool import LazyStateDictPool
from fusion_bench.utils.lazy_state_dict import LazyStateDict

EPS = torch.finfo(torch.float64).eps
""",
    ),
    (
        'tests/test_task_singular_vector.py',
        """\


if __name__ == "__main__":
    unittest.main()
""",
        '''\


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


class TestTaskSingularVectorMergingLowMemory(unittest.TestCase):
    """`low_memory=True`: one parameter at a time, the same merged model as the default
    path (bitwise: every parameter goes through the same
    `compute_and_sum_svd_mem_reduction` on the same task vectors)."""

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
        # r = min(6, 8) = 6 and T = 3: k = 2; the float64 reference and its bound
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
        # and the buffers outside the state dict (position_ids), so the same outputs
        self.assertStatesEqual(
            dict(merged.named_buffers()), dict(expected.named_buffers())
        )
        pixel_values = torch.randn(2, 3, 32, 32)
        self.assertTrue(
            torch.equal(
                merged.eval()(pixel_values).last_hidden_state,
                expected.eval()(pixel_values).last_hidden_state,
            )
        )
        # each tensor is read once (T + 1 checkpoints), all of a parameter before the next
        keys = [c.args[1] for c in getitem.call_args_list]
        order = list(dict.fromkeys(keys))
        self.assertEqual(keys, [key for key in order for _ in range(len(models))])


if __name__ == "__main__":
    unittest.main()
''',
    ),
]
