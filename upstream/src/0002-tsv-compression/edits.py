"""The passages of FusionBench's files that this pull request replaces, read by upstream/generate.py:
``(path, old, new)``, each ``old`` found exactly once in the file as the pull requests before leave it."""

EDITS = [
    (
        'fusion_bench/method/__init__.py',
        """\
    "task_singular_vector": ["TaskSingularVectorMerging"],
""",
        """\
    "task_singular_vector": [
        "TaskSingularVectorMerging",
        "TaskSingularVectorCompression",
    ],
""",
    ),
    (
        'fusion_bench/method/__init__.py',
        """\
    from .task_singular_vector import TaskSingularVectorMerging
""",
        """\
    from .task_singular_vector import (
        TaskSingularVectorCompression,
        TaskSingularVectorMerging,
    )
""",
    ),
    (
        'fusion_bench/method/task_singular_vector/__init__.py',
        """\
from .TSVM import TaskSingularVectorMerging
""",
        """\
from .TSVC import TaskSingularVectorCompression
from .TSVM import TaskSingularVectorMerging
""",
    ),
    (
        'docs/api/fusion_bench.method/compression.md',
        """\
        - BitDeltaAlgorithm
""",
        """\
        - BitDeltaAlgorithm

### Task Singular Vector Compression (TSV-C)

::: fusion_bench.method
    options:
        show_root_heading: false
        heading_level: 4
        members:
        - TaskSingularVectorCompression
""",
    ),
]
