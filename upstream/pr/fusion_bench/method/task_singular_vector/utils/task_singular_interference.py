from typing import List

import torch

from ...tsv.functional import singular_task_interference


def compute_task_singular_interference(weight_differences: List[torch.Tensor]) -> float:
    R"""
    Compute the singular task interference of a list of weight differences $\{W_i - W_0\}_{i=1}^T$,
    where $W_0$ is the pre-trained model weight, $W_i$ is the weight of the i-th fine-tuned model
    and $T$ is the number of fine-tuned models (Gargiulo et al., CVPR 2025, Eq. 4, with the full-rank
    SVD of each difference): $\lVert (U^\top U - I) \Sigma (V^\top V - I) \rVert_1$, the entrywise L1 norm,
    with $U$ and $V$ the column-wise concatenations of the tasks' singular vectors.

    Args:
        weight_differences (List[torch.Tensor]): A list of weight differences $\{W_i - W_0\}_{i=1}^T$.

    Returns:
        float: The singular interference of the list of weight differences.
    """
    rank = min(weight_differences[0].shape)
    return float(singular_task_interference(weight_differences, k=rank))
