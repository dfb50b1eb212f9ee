#!/usr/bin/env python
"""Write the FusionBench pull requests (``upstream/series/``) from this repository.

Each pull request of :data:`SERIES` is a patch against FusionBench's git main (:data:`MAIN_COMMIT`) with the pull
requests before it applied, written from three sources:

- ``upstream/src/<name>/``: its new or wholly replaced files in FusionBench's repository layout, and ``PR.md``, its
  description (``{files}``, ``{total}``, ``{main_commit}``, ``{main_commit_short}`` and ``{version}`` are filled in);
- ``modules``: modules of this package copied byte for byte, so that the plugin runs the code the pull request
  carries; each may import only the standard library, FusionBench's dependencies and modules FusionBench has at
  that point, and must be black- and isort-clean as FusionBench's code is;
- ``edits``: passages of FusionBench's files replaced (each found exactly once).

The FusionBench files a pull request touches are read from the installed ``fusion_bench`` (``fusion_bench/`` and
``config/``) or, for the rest of its repository (``docs/``, ``mkdocs.yml``, ``tests/``), from ``upstream/base/``;
either way they must be main's text (:data:`MAIN_BLOBS`, git blob ids).

    python upstream/generate.py           # writes upstream/series/<name>.patch and <name>.md
    python upstream/generate.py --check   # exit 1 (listing the files) when they are out of date
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import importlib.metadata
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = REPO_ROOT / "upstream"

#: the release the series also applies to (no file the series touches differs between it and MAIN_COMMIT)
FUSION_BENCH_VERSION = "0.2.33"
#: FusionBench's git main (github.com/tanganke/fusion_bench) that the series is made against
MAIN_COMMIT = "54c9e8c9d9621620c720452cd8533332a32d3689"
#: Every FusionBench file the series touches: its git blob id at MAIN_COMMIT (``git ls-tree``), ``None`` for a
#: file main does not have.
MAIN_BLOBS: Dict[str, Optional[str]] = {
    "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py": "f45ff82c7af9a51a0fa1c025f9f95845a4371edc",
    "fusion_bench/method/task_singular_vector/utils/task_singular_interference.py":
        "4dae241d79f24f6a2bd6f3a50b3e33014717c73e",
    "tests/test_task_singular_vector.py": None,
    "fusion_bench/method/__init__.py": "aeb91e27a7893837b21cf51c3660b76568598be0",
    "fusion_bench/method/task_singular_vector/__init__.py": "69686a05a004a3766d2238147ea03dd1daa1b6f2",
    "fusion_bench/method/task_singular_vector/TSVC.py": "d8a69ea3c706aa930e44c299dd1a66f5cd11e9b8",
    "fusion_bench/method/task_singular_vector/TSVM.py": "381ab8b3840b060fafb1643465bee397dad9a20d",
    "fusion_bench/method/task_singular_vector/utils/__init__.py": "870c1ec0a0de73f15193f2f8138e882f4becc2e6",
    "fusion_bench/method/task_singular_vector/utils/TSVC_utils.py": "1eb0e89b43b06348fee5dd705d3dde73d66fa428",
    "config/method/task_singular_vector/TaskSingularVectorMerging.yaml": "7c32958e47388bb4f250cfd82e732c79d524bb10",
    "mkdocs.yml": "0eefd891c61482a2f7616984dbe67ad048c18dfa",
    "docs/algorithms/task_singular_vector.md": "43a4707daad6863924c4213309674c8adafffda5",
    "docs/api/fusion_bench.method/merging.md": "1ddccc1a8de7f1591f49cdb71617504ffd8dbc4f",
    "docs/api/fusion_bench.method/compression.md": "bfedc1d3ab10ba39fa4f4f7ab0121181cc519ddb",
    "fusion_bench/method/task_singular_vector/utils/tsv_compression.py": None,
    "config/method/task_singular_vector/TaskSingularVectorCompression.yaml": None,
    "tests/test_tsv_compression.py": None,
    "docs/api/fusion_bench.method/utility.md": "4303aa699dff3f16930d4bb01455c83b93ae3fb8",
    "config/method/task_singular_vector/SingularTaskInterference.yaml": None,
    "fusion_bench/method/task_singular_vector/STI.py": None,
    "fusion_bench/method/task_singular_vector/utils/interference.py": None,
    "tests/test_singular_task_interference.py": None,
}
#: top-level imports a contributed module may have besides the standard library and FusionBench: FusionBench's
#: own requirements that the methods use
ALLOWED_IMPORTS = {"torch", "numpy", "scipy", "safetensors", "lightning", "omegaconf", "hydra", "transformers", "tqdm"}
#: words that refer to this plugin, which FusionBench does not have
FORBIDDEN = [r"fusion_bench_tsv", r"fusion-bench-tsv", r"\btiny_clip", r"\bsmall_clip", r"\bbenchmarks/",
             r"hydra_plugins", r"\bplugin\b"]


@dataclass(frozen=True)
class PullRequest:
    """One pull request: ``upstream/src/<name>/`` (its files and ``PR.md``), ``modules`` (``(path in this
    repository, path in FusionBench)``, copied as they are) and ``edits`` (``(FusionBench path, old, new)``)."""

    name: str
    edits: Tuple[Tuple[str, str, str], ...] = ()
    modules: Tuple[Tuple[str, str], ...] = ()


#: the STI section of docs/algorithms/task_singular_vector.md (0003-sti)
STI_DOCS = r"""## Singular Task Interference (STI)

`SingularTaskInterference` measures how much the task vectors interfere in each weight matrix
(Gargiulo et al., CVPR 2025, Eq. 4). With the top-$k$ singular triplets of each task's update
$\Delta_i = U_i \Sigma_i V_i^\top$, $U = [U_1, \ldots, U_T]$, $V = [V_1, \ldots, V_T]$ and
$\Sigma = \mathrm{diag}(\Sigma_1, \ldots, \Sigma_T)$:

$$\mathrm{STI} = \left\lVert (U^\top U - I)\, \Sigma\, (V^\top V - I) \right\rVert_1$$

(entrywise L1 norm), 0 when different tasks' singular vectors are orthogonal. Per 2-D parameter
it reports the STI at rank $k$ (TSVM's $\max(1, \lfloor \min(m, n) / T \rfloor)$ unless `rank`
is set), after TSVM's decorrelation (0 up to round-off when $Tk \le \min(m, n)$) and at full
rank, each also divided by $\lVert \Sigma \rVert_1$; the mean pairwise cosine of the task
vectors; and the STI of each pair of tasks at rank $k$, summed over layers. Each task keeps at
most the numerical rank of its update: null-space vectors of low-rank (LoRA) updates do not count.

```bash
fusion_bench method=task_singular_vector/SingularTaskInterference \
    modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only taskpool=dummy
```

It returns no model and writes `sti.json` and `sti.csv` (one row per layer) to
`method.output_path`, by default the log directory.

"""



SERIES: List[PullRequest] = [
    PullRequest(
        "0001-tsv-fixes",
        edits=(
            (
                "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py",
                """\
                if i == 0:
                    print(f"Computed SVD for {key}...")
                    sum_u = torch.zeros_like(u, device=accelerator)
                    sum_s = torch.zeros_like(s, device=accelerator)
                    sum_vh = torch.zeros_like(vh, device=accelerator)
                reduced_index_s = int(s.shape[0] * sv_reduction)
""",
                """\
                # at least one singular triplet per task: int(min(m, n) / T) is 0 when
                # min(m, n) < T, which would drop the layer's update
                reduced_index_s = max(1, int(s.shape[0] * sv_reduction))
                if i == 0:
                    print(f"Computed SVD for {key}...")
                    # T * reduced_index_s exceeds min(m, n) when min(m, n) < T
                    width = max(s.shape[0], num_tasks * reduced_index_s)
                    sum_u = u.new_zeros(u.shape[0], width)
                    sum_s = s.new_zeros(width)
                    sum_vh = vh.new_zeros(width, vh.shape[1])
""",
            ),
            (
                "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py",
                """\
            if return_single_task_models:
                reduced_index_s = int(sum_s.shape[0] * sv_reduction)
                new_u = u_u @ vh_u
""",
                """\
            if return_single_task_models:
                new_u = u_u @ vh_u
""",
            ),
        ),
    ),
    PullRequest(
        "0002-tsv-compression",
        modules=(
            (
                "fusion_bench_tsv/functional/tsv_compression.py",
                "fusion_bench/method/task_singular_vector/utils/tsv_compression.py",
            ),
        ),
        edits=(
            (
                "fusion_bench/method/__init__.py",
                '''    "task_singular_vector": ["TaskSingularVectorMerging"],\n''',
                '''    "task_singular_vector": [
        "TaskSingularVectorMerging",
        "TaskSingularVectorCompression",
    ],\n''',
            ),
            (
                "fusion_bench/method/__init__.py",
                "    from .task_singular_vector import TaskSingularVectorMerging\n",
                "    from .task_singular_vector import (\n"
                "        TaskSingularVectorCompression,\n"
                "        TaskSingularVectorMerging,\n"
                "    )\n",
            ),
            (
                "fusion_bench/method/task_singular_vector/__init__.py",
                "from .TSVM import TaskSingularVectorMerging\n",
                "from .TSVC import TaskSingularVectorCompression\n"
                "from .TSVM import TaskSingularVectorMerging\n",
            ),
            (
                "docs/api/fusion_bench.method/compression.md",
                "        - BitDeltaAlgorithm\n",
                "        - BitDeltaAlgorithm\n\n"
                "### Task Singular Vector Compression (TSV-C)\n\n"
                "::: fusion_bench.method\n"
                "    options:\n"
                "        show_root_heading: false\n"
                "        heading_level: 4\n"
                "        members:\n"
                "        - TaskSingularVectorCompression\n",
            ),
        ),
    ),
    PullRequest(
        "0003-sti",
        modules=(
            (
                "fusion_bench_tsv/functional/interference.py",
                "fusion_bench/method/task_singular_vector/utils/interference.py",
            ),
        ),
        edits=(
            (
                "fusion_bench/method/__init__.py",
                '        "TaskSingularVectorCompression",\n    ],\n',
                '        "TaskSingularVectorCompression",\n        "SingularTaskInterference",\n    ],\n',
            ),
            (
                "fusion_bench/method/__init__.py",
                "    from .task_singular_vector import (\n        TaskSingularVectorCompression,\n",
                "    from .task_singular_vector import (\n        SingularTaskInterference,\n"
                "        TaskSingularVectorCompression,\n",
            ),
            (
                "fusion_bench/method/task_singular_vector/__init__.py",
                "from .TSVC import TaskSingularVectorCompression\n",
                "from .STI import SingularTaskInterference\nfrom .TSVC import TaskSingularVectorCompression\n",
            ),
            (
                "docs/algorithms/task_singular_vector.md",
                "## Implementation Details\n",
                STI_DOCS + "## Implementation Details\n",
            ),
            (
                "docs/algorithms/task_singular_vector.md",
                "- [fusion_bench.method.TaskSingularVectorCompression][]\n",
                "- [fusion_bench.method.TaskSingularVectorCompression][]\n"
                "- [fusion_bench.method.SingularTaskInterference][]\n",
            ),
            (
                "docs/api/fusion_bench.method/utility.md",
                "Generates a violin plot for task vector distributions.\n",
                "Generates a violin plot for task vector distributions.\n"
                "- [SingularTaskInterference][fusion_bench.method.SingularTaskInterference]: Computes the singular "
                "task interference (STI) of task vectors, per layer.\n",
            ),
            (
                "docs/api/fusion_bench.method/utility.md",
                "        - TaskVectorViolinPlot\n",
                "        - TaskVectorViolinPlot\n        - SingularTaskInterference\n",
            ),
        ),
    ),
    PullRequest(
        "0004-tsvm-low-memory",
        edits=(
            (
                "fusion_bench/method/task_singular_vector/TSVM.py",
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
                "fusion_bench/method/task_singular_vector/TSVM.py",
                """\
\"\"\"

from copy import deepcopy
from typing import Iterable, List, Optional, Union
""",
                """\
\"\"\"

import logging
from copy import deepcopy
from typing import Iterable, List, Optional, Union
""",
            ),
            (
                "fusion_bench/method/task_singular_vector/TSVM.py",
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
                "fusion_bench/method/task_singular_vector/TSVM.py",
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
                "fusion_bench/method/task_singular_vector/TSVM.py",
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
                "fusion_bench/method/task_singular_vector/TSVM.py",
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
                "fusion_bench/method/task_singular_vector/TSVM.py",
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
                "fusion_bench/method/task_singular_vector/TSVM.py",
                """\
        \"\"\"
        # Determine the compute device for SVD operations (GPU if available for faster computation)
""",
                """\
        \"\"\"
        if self.low_memory:
            return self.run_low_memory(modelpool)

        # Determine the compute device for SVD operations (GPU if available for faster computation)
""",
            ),
            (
                "fusion_bench/method/task_singular_vector/TSVM.py",
                """\
            # Return only the merged model
            return pretrained_model
""",
                """\
            # Return only the merged model
            return pretrained_model

    @torch.no_grad()
    def run_low_memory(self, modelpool: fb.BaseModelPool):
        \"\"\"
        `run`, one parameter at a time (`low_memory=True`).

        For each parameter of the pretrained model, the T task vectors of that parameter
        alone go through `TSVM_utils.compute_and_sum_svd_mem_reduction` and the same
        state-dict arithmetic as in `run`, so the merged model (and the single task models)
        are bitwise those of `run`.
        \"\"\"
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
        \"\"\"`state_dict` loaded into `pretrained_model` (a copy of it with `copy`), or into
        an empty copy of the meta module of a `LazyStateDict`.\"\"\"
        if isinstance(pretrained_model, LazyStateDict):
            device = next(iter(state_dict.values())).device
            model = deepcopy(pretrained_model.meta_module).to_empty(device=device)
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
""",
            ),
            (
                "config/method/task_singular_vector/TaskSingularVectorMerging.yaml",
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
                "docs/algorithms/task_singular_vector.md",
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
_target_: fusion_bench.modelpool.LazyStateDictPool
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
                "tests/test_task_singular_vector.py",
                """\
\"\"\"

import unittest
from copy import deepcopy
""",
                """\
\"\"\"

import tempfile
import unittest
from copy import deepcopy
""",
            ),
            (
                "tests/test_task_singular_vector.py",
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
                "tests/test_task_singular_vector.py",
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
                "tests/test_task_singular_vector.py",
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
                "tests/test_task_singular_vector.py",
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
                "tests/test_task_singular_vector.py",
                """\


if __name__ == "__main__":
    unittest.main()
""",
                """\


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
    \"\"\"`low_memory=True`: one parameter at a time, the same merged model as the default
    path (bitwise: every parameter goes through the same
    `compute_and_sum_svd_mem_reduction` on the same task vectors).\"\"\"

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
        # each tensor is read once (T + 1 checkpoints), all of a parameter before the next
        keys = [c.args[1] for c in getitem.call_args_list]
        order = list(dict.fromkeys(keys))
        self.assertEqual(keys, [key for key in order for _ in range(len(models))])


if __name__ == "__main__":
    unittest.main()
""",
            ),
        ),
    ),
]


class GenerationError(RuntimeError):
    """The package, SERIES or FusionBench's files do not fit together; the message says what to change."""


# ----------------------------------------------------------------------------------------- FusionBench's files
def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def installed_fusion_bench() -> Path:
    """The directory of the installed ``fusion_bench`` package, from its distribution's metadata (an imported
    ``fusion_bench`` may be a lazy module without ``__spec__``, so ``importlib.util.find_spec`` is not used)."""
    try:
        init = Path(importlib.metadata.distribution("fusion-bench").locate_file("fusion_bench/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        init = None
    if init is None or not init.is_file():
        raise GenerationError(f"fusion_bench is not installed: pip install fusion-bench=={FUSION_BENCH_VERSION}")
    return init.parent


def base_path(path: str) -> Path:
    """Where FusionBench's ``path`` is read from: the installed package, or ``upstream/base/``."""
    if path.startswith(("fusion_bench/", "config/")):
        return installed_fusion_bench().parent / re.sub(r"^config/", "fusion_bench_config/", path)
    return UPSTREAM / "base" / path


def main_file(path: str) -> Optional[str]:
    """FusionBench's ``path`` at MAIN_COMMIT (``None``: main has no such file)."""
    if path not in MAIN_BLOBS:
        raise GenerationError(f"the series touches {path}: record its blob id at {MAIN_COMMIT[:7]} in MAIN_BLOBS "
                              f"(`git ls-tree {MAIN_COMMIT[:7]} {path}`; None for a new file)")
    blob = MAIN_BLOBS[path]
    if blob is None:
        return None
    file = base_path(path)
    if not file.is_file():
        raise GenerationError(f"{file} (FusionBench's {path}) is missing: install fusion-bench=={FUSION_BENCH_VERSION}"
                              f" or copy main's file there (`git show {MAIN_COMMIT[:7]}:{path}`)")
    data = file.read_bytes()
    if git_blob_id(data) != blob:
        raise GenerationError(f"{file} is not FusionBench's {path} at {MAIN_COMMIT[:7]} (blob {blob})")
    return data.decode()


# ----------------------------------------------------------------------------------------- contributed modules
def _module_of(path: str) -> str:
    parts = path[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def check_module(source: str, destination: str, text: str, available: Sequence[str]) -> None:
    """Refuse a module that cannot be copied into FusionBench as it is: an import of something FusionBench does
    not have at that point (``available``: FusionBench paths the series has written so far) or a word that refers
    to this plugin (black and isort are checked on every file of a pull request)."""
    where = f"{source} (copied to {destination})"
    package = _module_of(destination).rsplit(".", 1)[0] if not destination.endswith("__init__.py") else _module_of(destination)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            path = target.replace(".", "/")
            candidates = [f"{path}.py", f"{path}/__init__.py"]
            if node.module is None:
                candidates = [f"{path}/{a.name}.py" for a in node.names]
            if not any(c in available or (installed_fusion_bench().parent / c).is_file() for c in candidates):
                raise GenerationError(f"{where}:{node.lineno}: imports {target}, which FusionBench does not have at "
                                      "this point of the series: copy it in this or an earlier pull request")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ALLOWED_IMPORTS | {"fusion_bench", "__future__"}:
                    raise GenerationError(f"{where}:{node.lineno}: imports {name!r}, which FusionBench does not "
                                          f"depend on (allowed: the standard library, {sorted(ALLOWED_IMPORTS)})")
    for pattern in FORBIDDEN:
        match = re.search(pattern, text)
        if match:
            line = text.count("\n", 0, match.start()) + 1
            raise GenerationError(f"{where}:{line}: {match[0]!r} refers to this plugin, not to FusionBench")


def formatting_problems(path: str, text: str) -> List[str]:
    """What black (line length 88) and isort (profile black), FusionBench's settings, would change in ``text``."""
    problems = []
    for tool, cmd in (("black", ["-m", "black", "--line-length", "88", "--quiet", "--check", "-"]),
                      ("isort", ["-m", "isort", "--profile", "black", "--project", "fusion_bench", "--check-only", "--quiet", "-"])):
        # run in upstream/base so that no configuration of this repository applies
        proc = subprocess.run([sys.executable, *cmd], input=text, capture_output=True, text=True, cwd=UPSTREAM / "base")
        if f"No module named {tool}" in proc.stderr:
            raise GenerationError(f"{tool} is not installed: pip install '.[test]'")
        if proc.returncode:
            problems.append(f"{tool} would reformat it: run `{tool} {'--profile black ' if tool == 'isort' else ''}"
                            f"<file>`{(': ' + proc.stderr.strip()[:300]) if proc.stderr.strip() else ''}")
    return problems


# ----------------------------------------------------------------------------------------- the series
def unified_diff(path: str, old: Optional[str], new: str) -> str:
    """A ``git apply``-able diff of one file (``old`` None: a new file)."""
    old_lines = [] if old is None else old.splitlines(keepends=True)
    body = "".join(difflib.unified_diff(old_lines, new.splitlines(keepends=True),
                                        "/dev/null" if old is None else f"a/{path}", f"b/{path}"))
    if not body:
        return ""
    header = f"diff --git a/{path} b/{path}\n" + ("new file mode 100644\n" if old is None else "")
    return header + body


def diffstat(patch: str) -> Tuple[Dict[str, Tuple[int, int]], int, int]:
    """``({path: (added, removed)}, added, removed)`` of a patch made by :func:`unified_diff`."""
    stats: Dict[str, Tuple[int, int]] = {}
    for block in patch.split("diff --git a/")[1:]:
        path = block.split(" ", 1)[0]
        body = [line for line in block.splitlines()[1:] if not line.startswith(("--- ", "+++ "))]
        stats[path] = (sum(line.startswith("+") for line in body), sum(line.startswith("-") for line in body))
    return stats, sum(a for a, _ in stats.values()), sum(r for _, r in stats.values())


def pull_request_files(pr: PullRequest, current: Dict[str, Optional[str]]) -> Dict[str, str]:
    """``{FusionBench path: new text}`` of every file ``pr`` adds or changes (``current``: the series so far)."""
    src = UPSTREAM / "src" / pr.name
    new: Dict[str, str] = {}
    for file in sorted(src.rglob("*")):
        if file.is_file() and file.name != "PR.md" and "__pycache__" not in file.parts:
            new[file.relative_to(src).as_posix()] = file.read_text()
    available = [p for p, t in current.items() if t is not None] + list(new) + [d for _, d in pr.modules]
    for source, destination in pr.modules:
        if destination in new:
            raise GenerationError(f"{pr.name}: {destination} comes both from upstream/src and from {source}")
        text = (REPO_ROOT / source).read_text()
        check_module(source, destination, text, available)
        new[destination] = text
    for path, old, replacement in pr.edits:
        text = new[path] if path in new else (current[path] if path in current else main_file(path))
        if text is None or text.count(old) != 1:
            raise GenerationError(f"{pr.name}: the passage to replace in {path} is not there exactly once: "
                                  "update SERIES in upstream/generate.py")
        new[path] = text.replace(old, replacement)
    for path, text in new.items():
        before = current.get(path) if path in current else main_file(path) if path in MAIN_BLOBS else None
        if before is not None and path.endswith(".py") and formatting_problems(path, before):
            continue  # FusionBench's own file is not black/isort-clean at main (method/__init__.py): not this PR's
        for problem in formatting_problems(path, text) if path.endswith(".py") else ():
            raise GenerationError(f"{pr.name}: {path}: {problem}")
    return new


def build_series() -> Dict[str, str]:
    """``{path under upstream/: text}``: ``series/<name>.patch`` and ``series/<name>.md`` per pull request."""
    current: Dict[str, Optional[str]] = {}
    out: Dict[str, str] = {}
    for pr in SERIES:
        description = UPSTREAM / "src" / pr.name / "PR.md"
        if not description.is_file():
            raise GenerationError(f"upstream/src/{pr.name}/PR.md (the pull request's description) is missing")
        new = pull_request_files(pr, current)
        base = {path: current[path] if path in current else main_file(path) for path in new}
        patch = "".join(unified_diff(path, base[path], new[path]) for path in sorted(new))
        per_file, added, removed = diffstat(patch)
        out[f"series/{pr.name}.patch"] = patch
        out[f"series/{pr.name}.md"] = description.read_text().format(
            main_commit=MAIN_COMMIT,
            main_commit_short=MAIN_COMMIT[:7],
            version=FUSION_BENCH_VERSION,
            files="\n".join(f"- `{p}` (+{a} −{r}{', new' if base[p] is None else ''})" for p, (a, r) in per_file.items()),
            total=f"{len(per_file)} files, +{added} −{removed} lines",
        )
        current.update(new)
    return out


def stale_files(outputs: Dict[str, str], out_dir: Path) -> List[str]:
    """The outputs that differ from what ``out_dir`` holds, and files under ``out_dir/series`` no longer written."""
    stale = [p for p in sorted(outputs) if not (out_dir / p).is_file() or (out_dir / p).read_text() != outputs[p]]
    extra = [p.relative_to(out_dir).as_posix() for p in (out_dir / "series").glob("*")]
    return stale + [f"{p} (no longer in SERIES)" for p in sorted(extra) if p not in outputs]


def write(outputs: Dict[str, str], out_dir: Path) -> None:
    """Write the series, each file atomically (a temporary beside it, then one rename)."""
    (out_dir / "series").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "series").glob("*"):
        if old.relative_to(out_dir).as_posix() not in outputs:
            old.unlink()
    for name, text in outputs.items():
        target = out_dir / name
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.replace(target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=UPSTREAM, help="output directory (default: upstream/)")
    parser.add_argument("--check", action="store_true", help="only report files that are out of date (exit 1)")
    args = parser.parse_args(argv)
    try:
        outputs = build_series()
    except GenerationError as exc:
        print(f"upstream/generate.py: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_files(outputs, args.out)
        if stale:
            print("out of date (run python upstream/generate.py):\n  " + "\n  ".join(stale), file=sys.stderr)
            return 1
        print(f"{args.out}: up to date ({', '.join(sorted(outputs))})")
        return 0
    write(outputs, args.out)
    print(f"wrote {', '.join(str(args.out / p) for p in sorted(outputs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
