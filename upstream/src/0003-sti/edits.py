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
it reports the STI at rank $k$ (TSVM's $\\max(1, \\lfloor \\min(m, n) / T \\rfloor)$ unless `rank`
is set), after TSVM's decorrelation (0 up to round-off when $Tk \\le \\min(m, n)$) and at full
rank, each also divided by $\\lVert \\Sigma \\rVert_1$; the mean pairwise cosine of the task
vectors; and the STI of each pair of tasks at rank $k$, summed over layers. Each task keeps at
most the numerical rank of its update: null-space vectors of low-rank (LoRA) updates do not count.

```bash
fusion_bench method=task_singular_vector/SingularTaskInterference \\
    modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only taskpool=dummy
```

It returns no model and writes `sti.json` and `sti.csv` (one row per layer) to
`method.output_path`, by default the log directory.

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
]
