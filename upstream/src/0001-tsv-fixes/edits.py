"""The passages of FusionBench's files that this pull request replaces, read by upstream/generate.py:
``(path, old, new)``, each ``old`` found exactly once in the file as the pull requests before leave it."""

EDITS = [
    (
        'fusion_bench/method/task_singular_vector/utils/TSVM_utils.py',
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
        'fusion_bench/method/task_singular_vector/utils/TSVM_utils.py',
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
    (
        'docs/algorithms/task_singular_vector.md',
        """\
For each task $i$, we select only the top $\\lfloor r \\cdot \\text{reduction_factor} \\rfloor$ singular components and place them in task-specific positions within larger matrices:
""",
        """\
For each task $i$, we select only the top $d$ singular components (at least one, also when $r < T$) and place them in task-specific positions within larger matrices, $\\max(r, Td)$ columns wide:
""",
    ),
    (
        'docs/algorithms/task_singular_vector.md',
        """\
where $d = \\lfloor r \\cdot \\text{reduction_factor} \\rfloor$.
""",
        """\
where $d = \\max(1, \\lfloor r / T \\rfloor)$.
""",
    ),
]
