from typing import List

import torch


def compute_task_singular_interference(weight_differences: List[torch.Tensor]) -> float:
    R"""
    Compute the singular task interference (STI) of a list of weight differences $\{W_i - W_0\}_{i=1}^T$,
    where $W_0$ is the pre-trained model weight, $W_i$ is the weight of the i-th fine-tuned model
    and $T$ is the number of fine-tuned models (Gargiulo et al., CVPR 2025, Eq. 4):

    $$\mathrm{STI} = \left\lVert (U^\top U - I) \Sigma (V^\top V - I) \right\rVert_1,$$

    where $W_i - W_0 = U_i \Sigma_i V_i^\top$ is the thin SVD, $U = [U_1, \ldots, U_T]$ and
    $V = [V_1, \ldots, V_T]$ are concatenated column-wise, $\Sigma = \mathrm{diag}(\Sigma_1, \ldots, \Sigma_T)$,
    and $\lVert \cdot \rVert_1$ is the entrywise L1 norm (the sum of absolute values). It is 0 when
    $U$ or $V$ has orthonormal columns.

    Args:
        weight_differences (List[torch.Tensor]): A list of weight differences $\{W_i - W_0\}_{i=1}^T$.

    Returns:
        float: The singular interference of the list of weight differences.
    """
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
