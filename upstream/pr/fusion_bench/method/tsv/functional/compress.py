"""TSV-C: Task Singular Vector Compression of one layer (Gargiulo et al., CVPR 2025, Sec. 3).

Each task update :math:`\\Delta_i = \\theta_i - \\theta_0` of a weight matrix is replaced by its top-k
singular triplets :math:`\\hat\\Delta_i = U_k \\Sigma_k V_k^\\top`, the best rank-k approximation
(Eckart–Young): :math:`\\|\\Delta_i - \\hat\\Delta_i\\|_F^2 = \\sum_{j>k} \\sigma_j^2`. Stored, it costs
:math:`k(m + n + 1)` numbers instead of :math:`mn`. The reference keeps :math:`k = \\lfloor r/T \\rfloor`.

Rank choice per layer (exactly one, or none for the default ``floor(r / T)``), never 0:

- ``fraction`` f in (0, 1]: :math:`k = \\max(1, \\lfloor f r \\rfloor)`;
- ``rank`` k: a fixed number of triplets, at most r;
- ``energy`` e in (0, 1]: the smallest k with :math:`\\sum_{j \\le k} \\sigma_j^2 \\ge e \\sum_j \\sigma_j^2`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .svd import SVDFactors, default_rank, truncated_svd

__all__ = [
    "check_rank_options",
    "compress_matrix",
    "energy_rank",
    "factor_numel",
    "fraction_rank",
    "layer_rank",
    "reconstruct",
]

# relative slack for ``floor(f * r)`` so that e.g. f = 0.3 and r = 10 give 3, not 2 (0.3 * 10 = 2.9999...)
_FLOOR_EPS = 1e-9


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rank_options(
    fraction: Optional[float] = None, rank: Optional[int] = None, energy: Optional[float] = None
) -> None:
    """Validate the rank choice: at most one of ``fraction``, ``rank``, ``energy``, each in range.

    Raises ``ValueError`` naming the option.
    """
    given = [name for name, v in (("fraction", fraction), ("rank", rank), ("energy", energy)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"options {' and '.join(repr(g) for g in given)} are exclusive: give at most one of them")
    if fraction is not None and not (_is_number(fraction) and 0 < fraction <= 1 and math.isfinite(fraction)):
        raise ValueError(f"option 'fraction' must be a number in (0, 1], got {fraction!r}")
    if rank is not None and not (_is_int(rank) and rank >= 1):
        raise ValueError(f"option 'rank' must be a positive integer, got {rank!r}")
    if energy is not None and not (_is_number(energy) and 0 < energy <= 1 and math.isfinite(energy)):
        raise ValueError(f"option 'energy' must be a number in (0, 1], got {energy!r}")


def fraction_rank(shape: Sequence[int], fraction: float) -> int:
    """``max(1, floor(fraction · min(m, n)))``."""
    check_rank_options(fraction=fraction)
    r = min(shape[-2:])
    return max(1, min(r, math.floor(fraction * r * (1 + _FLOOR_EPS))))


def energy_rank(singular_values: Tensor, energy: float) -> int:
    r"""The smallest k with :math:`\sum_{j \le k} \sigma_j^2 \ge e \sum_j \sigma_j^2` (at least 1).

    ``singular_values`` are in descending order (as ``torch.linalg.svd`` returns them). A zero update
    keeps one triplet.
    """
    check_rank_options(energy=energy)
    if singular_values.dim() != 1 or singular_values.numel() == 0:
        raise ValueError(f"singular_values must be a non-empty 1-D tensor, got shape {tuple(singular_values.shape)}")
    cumulative = torch.cumsum(singular_values.detach().to("cpu", torch.float64) ** 2, dim=0)
    target = energy * cumulative[-1]
    k = int((cumulative < target).sum().item()) + 1
    return max(1, min(k, singular_values.numel()))


def layer_rank(
    shape: Sequence[int],
    num_tasks: int,
    *,
    fraction: Optional[float] = None,
    rank: Optional[int] = None,
    name: str = "matrix",
) -> int:
    """The per-task rank of a layer of ``shape`` for the shape-only choices (default, fraction, rank).

    The default (no option) is the reference's ``floor(min(m, n) / T)``, at least 1. A ``rank`` above
    ``min(m, n)`` raises a ``ValueError`` naming the layer ``name``. (``energy`` depends on the singular
    values: see :func:`compress_matrix`.)
    """
    check_rank_options(fraction=fraction, rank=rank)
    r = min(shape[-2:])
    if rank is not None:
        if rank > r:
            raise ValueError(
                f"option 'rank'={rank} exceeds the rank of parameter '{name}' of shape {tuple(shape)} (at most {r})"
            )
        return rank
    if fraction is not None:
        return fraction_rank(shape, fraction)
    return default_rank(shape, num_tasks)


def compress_matrix(
    delta: Tensor,
    k: Optional[int] = None,
    *,
    energy: Optional[float] = None,
    rank_revealing: bool = True,
    storage_dtype: Optional[torch.dtype] = None,
    weight_rms: Optional[float] = None,
) -> SVDFactors:
    r"""Compress one task update to its top-k singular triplets :math:`(U_k, \Sigma_k, V_k^\top)`.

    This is :func:`truncated_svd` (the same decomposition TSV-M uses); with ``energy`` instead of
    ``k``, k is the smallest rank keeping that share of :math:`\sum \sigma^2` (:func:`energy_rank`),
    read off the same decomposition. Exactly one of ``k`` and ``energy`` is given. With
    ``rank_revealing`` (default) no more than the numerical rank of ``delta`` is kept (the triplets
    dropped have σ at round-off or storage-noise level: ``storage_dtype``/``weight_rms``, see :mod:`.rank`),
    so the result may have fewer than ``k`` triplets.
    """
    if (k is None) == (energy is None):
        raise ValueError("compress_matrix needs exactly one of 'k' and 'energy'")
    options = dict(rank_revealing=rank_revealing, storage_dtype=storage_dtype, weight_rms=weight_rms)
    if k is not None:
        return truncated_svd(delta, k, **options)
    if delta.dim() != 2:
        raise ValueError(f"delta must be a 2-D matrix, got shape {tuple(delta.shape)}")
    full = truncated_svd(delta, min(delta.shape), **options)
    k = energy_rank(full.S, energy)
    return SVDFactors(full.U[:, :k], full.S[:k], full.Vh[:k, :])


def reconstruct(factors: SVDFactors) -> Tensor:
    r""":math:`\hat\Delta = U \,\mathrm{diag}(S)\, V^\top`, in the factors' dtype."""
    U, S, Vh = factors
    return (U * S) @ Vh


def factor_numel(shape: Sequence[int], k: int) -> int:
    """Numbers stored for a rank-k factorization of an ``m × n`` matrix: ``k (m + n + 1)``."""
    m, n = shape[-2:]
    return k * (m + n + 1)
