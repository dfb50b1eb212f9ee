r"""Numerical rank of a task update: which singular triplets are indistinguishable from zero.

When :math:`\mathrm{rank}(\Delta_i) < k` (LoRA updates merged with ``merge_and_unload``: rank ≤ the
adapter rank), the top-k SVD returns :math:`k - \mathrm{rank}` triplets whose σ is zero up to rounding
and whose singular vectors are an arbitrary basis of the null space. TSV-M orthogonalizes them together
with the real ones, so the merged matrix depends on which basis an SVD routine returned. Rank-revealing
TSV keeps :math:`k_i = \min(k, \mathrm{rank}_\tau(\Delta_i))` triplets, with

.. math::  \mathrm{rank}_\tau(\Delta) = \#\{j : \sigma_j > \tau\},\qquad
           \tau = \max\bigl(\underbrace{\max(m, n)\,\varepsilon_c\,\sigma_1}_{\text{round-off}},\;
           \underbrace{c_s\,u_s\,\bar\theta\,(\sqrt m + \sqrt n)}_{\text{storage noise}}\bigr).

**Round-off** (:func:`roundoff_floor`): a backward-stable SVD in the compute dtype (machine epsilon
:math:`\varepsilon_c`) returns the exact σ of :math:`\Delta + E` with :math:`\|E\|_2 \lesssim p(m,n)\,\varepsilon_c\,\sigma_1`
(Weyl: each σ moves by at most :math:`\|E\|_2`); ``max(m, n)·ε·σ₁`` is the tolerance of LAPACK/NumPy's
``matrix_rank``. Measured on exact rank-r products (64×48 to 768×3072, float32 and float64), the zero
σ come out at 2–18·ε·σ₁ from the SVD and below 0.3·ε₃₂·σ₁ from the float64 Gram path of float32 data,
so the floor is ≥ 25× above them (64×48; 170× at 768×3072) while real σ down to ``max(m, n)·ε·σ₁`` are kept.

**Storage noise** (:func:`storage_noise_floor`): checkpoints stored in a dtype with unit round-off
:math:`u_s = \varepsilon_s/2` (bf16 :math:`2^{-8} = 3.9\cdot10^{-3}`, fp16 :math:`2^{-11} = 4.9\cdot10^{-4}`,
fp32 :math:`2^{-24} = 6.0\cdot10^{-8}`) hold :math:`\theta_i` and :math:`\theta_0` rounded entry by
entry, each error at most :math:`u_s|\theta|` and uniform in ±half an ulp, so the RMS of one rounding is
at most :math:`u_s\bar\theta/\sqrt3` and of the difference of two at most
:math:`\sqrt{2/3}\,u_s\bar\theta = 0.82\,u_s\bar\theta`, where :math:`\bar\theta` is the RMS of the stored
weights (``weight_rms``, over :math:`\theta_0` and :math:`\theta_i`). A random ``m × n`` matrix of
independent entries of RMS s has spectral norm :math:`\approx s(\sqrt m + \sqrt n)` (Bai–Yin), which
bounds every σ the noise alone can produce. Measured (Gaussian θ of RMS 0.02 plus a rank-4 update, both
rounded): :math:`\|E\|_2 / (u_s\bar\theta(\sqrt m+\sqrt n))` = 0.58–0.64 for bf16, fp16 and fp32 alike,
at 64×48, 256×256, 768×768 and 3072×768 (0.72 of the worst case: the ulp is between :math:`u_s|\theta|`
and :math:`2u_s|\theta|`). ``STORAGE_NOISE_FACTOR`` :math:`c_s = 2` puts the floor 3× above the measured
noise and 2.4× above the worst-case estimate. Example, a 768×768 bf16 layer with
:math:`\bar\theta = 0.02`: :math:`\tau_s = 2 \cdot 3.9\cdot10^{-3} \cdot 0.02 \cdot 55.4 = 8.7\cdot10^{-3}`
(noise measured at :math:`2.6\cdot10^{-3}`); fp16: :math:`1.1\cdot10^{-3}`; fp32: :math:`1.3\cdot10^{-7}`.
The estimate assumes the error variance is spread over the matrix; weights whose magnitude sits in a few
rows can have noise above the floor, and then noise triplets are kept, as without rank revealing.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "STORAGE_NOISE_FACTOR",
    "coarsest_dtype",
    "numerical_rank",
    "rank_options",
    "rank_threshold",
    "roundoff_floor",
    "storage_noise_floor",
    "weight_rms",
]

#: :math:`c_s` of the storage noise floor :math:`c_s u_s \bar\theta(\sqrt m+\sqrt n)` (module docstring).
STORAGE_NOISE_FACTOR = 2.0


def _mn(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"a matrix shape (m, n) is needed, got {tuple(shape)}")
    return int(shape[-2]), int(shape[-1])


def roundoff_floor(sigma_max: float, shape: Sequence[int], dtype: torch.dtype) -> float:
    """``max(m, n) · ε(dtype) · σ₁``: singular values below it are round-off of an SVD computed in ``dtype``
    (half precision is computed in float32, see :func:`~.svd.compute_dtype`)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return max(_mn(shape)) * torch.finfo(work).eps * float(sigma_max)


def storage_noise_floor(shape: Sequence[int], storage_dtype: torch.dtype, weight_rms: float) -> float:
    r""":math:`c_s\,u_s\,\bar\theta\,(\sqrt m + \sqrt n)`: the largest σ that rounding :math:`\theta_i` and
    :math:`\theta_0` to ``storage_dtype`` (unit round-off :math:`u_s = \varepsilon_s / 2`) can put into
    :math:`\Delta_i`, for weights of RMS ``weight_rms`` (module docstring)."""
    if not (isinstance(storage_dtype, torch.dtype) and storage_dtype.is_floating_point):
        raise ValueError(f"option 'storage_dtype' must be a floating-point torch.dtype, got {storage_dtype!r}")
    if isinstance(weight_rms, bool) or not isinstance(weight_rms, (int, float)) or not (
        math.isfinite(weight_rms) and weight_rms >= 0
    ):
        raise ValueError(f"option 'weight_rms' must be a finite number >= 0 (the RMS of the stored weights), got {weight_rms!r}")
    m, n = _mn(shape)
    return STORAGE_NOISE_FACTOR * torch.finfo(storage_dtype).eps / 2 * float(weight_rms) * (math.sqrt(m) + math.sqrt(n))


def rank_threshold(
    sigma_max: float,
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    storage_dtype: Optional[torch.dtype] = None,
    weight_rms: Optional[float] = None,
) -> float:
    """τ: the larger of :func:`roundoff_floor` and, when the weights' ``storage_dtype`` and ``weight_rms``
    are given (both or neither), :func:`storage_noise_floor`."""
    if (storage_dtype is None) != (weight_rms is None):
        raise ValueError(
            "options 'storage_dtype' and 'weight_rms' go together: give both (the dtype the checkpoints are "
            f"stored in and the RMS of their weights) or neither; got storage_dtype={storage_dtype!r}, weight_rms={weight_rms!r}"
        )
    tau = roundoff_floor(sigma_max, shape, dtype)
    if storage_dtype is not None:
        tau = max(tau, storage_noise_floor(shape, storage_dtype, weight_rms))
    return tau


def numerical_rank(
    singular_values: Tensor,
    shape: Sequence[int],
    dtype: Optional[torch.dtype] = None,
    *,
    storage_dtype: Optional[torch.dtype] = None,
    weight_rms: Optional[float] = None,
) -> int:
    """How many of the (descending) ``singular_values`` of an ``m × n`` matrix exceed :func:`rank_threshold`.

    ``dtype`` is the dtype the matrix was decomposed from (default: that of ``singular_values``); σ₁ is
    ``singular_values[0]``, so pass the leading values of the matrix, not a tail. A zero matrix has rank 0.
    """
    if singular_values.dim() != 1:
        raise ValueError(f"singular_values must be a 1-D tensor, got shape {tuple(singular_values.shape)}")
    if singular_values.numel() == 0:
        return 0
    s = singular_values.detach()
    tau = rank_threshold(
        float(s[0]), shape, s.dtype if dtype is None else dtype, storage_dtype=storage_dtype, weight_rms=weight_rms
    )
    return int((s > tau).sum())


def weight_rms(weights: Tensor) -> float:
    r""":math:`\bar\theta`, the RMS of ``weights`` accumulated in float64 (one pass)."""
    if weights.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(weights.detach(), dtype=torch.float64)) / math.sqrt(weights.numel())


def coarsest_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """Of floating ``dtypes``, the one with the largest machine epsilon: its rounding dominates the noise."""
    dtypes = list(dtypes)
    if not dtypes:
        raise ValueError("coarsest_dtype needs at least one dtype")
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def rank_options(theta_rms: Optional[float], storage_dtypes: Iterable[torch.dtype] = ()) -> Dict[str, Any]:
    """The rank-revealing keywords of :func:`~.svd.truncated_svd` (and of the TSV functions built on it) for
    one task's matrix: with ``theta_rms`` (θ̄, :func:`weight_rms` of θ₀), rank revealing with the storage
    floor of the coarsest of ``storage_dtypes`` (θ₀'s and the task checkpoint's dtypes); ``None``: the plain top-k."""
    if theta_rms is None:
        return {"rank_revealing": False}
    return {"rank_revealing": True, "storage_dtype": coarsest_dtype(storage_dtypes), "weight_rms": theta_rms}
