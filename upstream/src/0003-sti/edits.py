"""The passages of FusionBench's files that this pull request replaces, read by upstream/generate.py:
``(path, old, new)``, each ``old`` found exactly once in the file as the pull requests before leave it."""

EDITS = [
    (
        'fusion_bench/method/__init__.py',
        """\
        "TaskSingularVectorCompression",
    ],
""",
        """\
        "TaskSingularVectorCompression",
        "SingularTaskInterference",
    ],
""",
    ),
    (
        'fusion_bench/method/__init__.py',
        """\
    from .task_singular_vector import (
        TaskSingularVectorCompression,
""",
        """\
    from .task_singular_vector import (
        SingularTaskInterference,
        TaskSingularVectorCompression,
""",
    ),
    (
        'fusion_bench/method/task_singular_vector/__init__.py',
        """\
from .TSVC import TaskSingularVectorCompression
""",
        """\
from .STI import SingularTaskInterference
from .TSVC import TaskSingularVectorCompression
""",
    ),
    (
        'docs/algorithms/task_singular_vector.md',
        """\
## Implementation Details
""",
        """\
## Singular Task Interference (STI)

`SingularTaskInterference` measures how much the task vectors interfere in each weight matrix
(Gargiulo et al., CVPR 2025, Eq. 4). With the top-$k$ singular triplets of each task's update
$\\Delta_i = U_i \\Sigma_i V_i^\\top$, $U = [U_1, \\ldots, U_T]$, $V = [V_1, \\ldots, V_T]$ and
$\\Sigma = \\mathrm{diag}(\\Sigma_1, \\ldots, \\Sigma_T)$:

$$\\mathrm{STI} = \\left\\lVert (U^\\top U - I)\\, \\Sigma\\, (V^\\top V - I) \\right\\rVert_1$$

(entrywise L1 norm), 0 when different tasks' singular vectors are orthogonal. Per 2-D parameter
it reports the STI at rank $k$, after TSVM's decorrelation and at full rank, each also divided by
$\\lVert \\Sigma \\rVert_1$; the mean pairwise cosine of the task vectors; and the pairwise STI
at rank $k$, summed over layers. Each task keeps at most the numerical rank of its update.

```bash
fusion_bench method=task_singular_vector/SingularTaskInterference \\
    modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only taskpool=dummy
```

```yaml title="config/method/task_singular_vector/SingularTaskInterference.yaml"
--8<-- "config/method/task_singular_vector/SingularTaskInterference.yaml"
```

It returns no model and writes `sti.json` and `sti.csv` (one row per layer).

## Implementation Details
""",
    ),
    (
        'docs/algorithms/task_singular_vector.md',
        """\
- [fusion_bench.method.TaskSingularVectorCompression][]
""",
        """\
- [fusion_bench.method.TaskSingularVectorCompression][]
- [fusion_bench.method.SingularTaskInterference][]
""",
    ),
    (
        'docs/api/fusion_bench.method/utility.md',
        """\
Generates a violin plot for task vector distributions.
""",
        """\
Generates a violin plot for task vector distributions.
- [SingularTaskInterference][fusion_bench.method.SingularTaskInterference]: Computes the singular task interference (STI) of task vectors, per layer.
""",
    ),
    (
        'docs/api/fusion_bench.method/utility.md',
        """\
        - TaskVectorViolinPlot
""",
        """\
        - TaskVectorViolinPlot
        - SingularTaskInterference
""",
    ),
    (
        'fusion_bench/method/task_singular_vector/utils/task_singular_interference.py',
        """\
import torch

""",
        """\
import torch

from .interference import singular_task_interference

""",
    ),
    (
        'fusion_bench/method/task_singular_vector/utils/task_singular_interference.py',
        """\
    device = weight_differences[0].device
    dtype = weight_differences[0].dtype

    U = []
    S = []
    V = []
    for delta_w in weight_differences:
        u, s, vh = torch.linalg.svd(delta_w, full_matrices=False)
        U.append(u)
        S.append(s)
        V.append(vh.t())
    U = torch.cat(U, dim=1)
    S = torch.cat(S, dim=0)
    V = torch.cat(V, dim=1)

    singular_task_interference = torch.linalg.multi_dot(
        (
            U.t() @ U - torch.eye(U.shape[1], device=device, dtype=dtype),
            torch.diag(S),
            V.t() @ V - torch.eye(V.shape[1], device=device, dtype=dtype),
        )
    )
    # entrywise L1 norm
    return singular_task_interference.abs().sum().item()
""",
        """\
    return float(
        singular_task_interference(
            weight_differences, k=min(weight_differences[0].shape)
        )
    )
""",
    ),
    (
        'fusion_bench/method/task_singular_vector/utils/task_singular_interference.py',
        """\
is the thin SVD,""",
        """\
is the thin SVD truncated at the numerical rank of $W_i - W_0$,""",
    ),
]
