"""The TSV-C compressed checkpoint: per-task rank-k factors + full non-matrix parameters, on disk.

A checkpoint is a directory holding

- ``task_vectors.safetensors``: for task number ``i`` and every compressed matrix ``key``, the tensors
  ``t{i}/{key}/U`` (m × k), ``t{i}/{key}/S`` (k) and ``t{i}/{key}/Vh`` (k × n); for every other
  floating-point parameter, ``t{i}/{key}``: its value in the fine-tuned model, in full;
- ``manifest.json``: base model, task names, k per layer and task, dtypes, a fingerprint of the base
  model's parameters, and the parameter and byte counts (:func:`storage_accounting`).

Task ``i``'s model is ``θ₀ + U diag(S) Vhᵀ`` on the compressed matrices and the stored values elsewhere
(:func:`apply_compressed`). :func:`load_task_model` rebuilds one task from the base model and the
directory, reading only that task's tensors (``safetensors.safe_open``). Writes are atomic: the
directory is written under a temporary name beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .functional import SVDFactors, compute_dtype, factor_numel, reconstruct

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "TENSOR_FILE",
    "CompressedTask",
    "apply_compressed",
    "base_fingerprint",
    "build_task_model",
    "check_base",
    "load_compressed_task",
    "load_task_model",
    "load_task_state",
    "read_manifest",
    "save_compressed",
    "storage_accounting",
]

FORMAT = "fusion_bench_tsv/tsv_c"
VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSOR_FILE = "task_vectors.safetensors"
# relative tolerance of the base-model fingerprint (sums may differ in the last bits across devices)
_FINGERPRINT_RTOL = 1e-6


@dataclass
class CompressedTask:
    """One task's compressed update: rank-k ``factors`` of its matrices and the ``others`` in full."""

    name: str
    factors: Dict[str, SVDFactors] = field(default_factory=dict)
    others: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def ranks(self) -> Dict[str, int]:
        return {key: int(f.S.numel()) for key, f in self.factors.items()}

    def tensors(self, prefix: str) -> Dict[str, Tensor]:
        """The task's tensors under their checkpoint names."""
        out = {}
        for key, (U, S, Vh) in self.factors.items():
            out[f"{prefix}/{key}/U"], out[f"{prefix}/{key}/S"], out[f"{prefix}/{key}/Vh"] = U, S, Vh
        for key, value in self.others.items():
            out[f"{prefix}/{key}"] = value
        return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def apply_compressed(
    base_state: Mapping[str, Tensor], task: CompressedTask, device: Optional[Union[str, torch.device]] = None
) -> Dict[str, Tensor]:
    """A new state dict: ``θ₀ + U diag(S) Vh`` for compressed matrices, the stored values elsewhere.

    The sum is formed on ``device`` (default: where ``θ₀`` is) in float32 at least and cast to each
    parameter's dtype; parameters that are neither compressed nor stored (integer buffers) are copied
    from ``θ₀``. Neither input is modified. The in-memory path and the checkpoint loader both go through
    this function, so they give bit-identical models.
    """
    out: Dict[str, Tensor] = {}
    for key, base in base_state.items():
        dev = base.device if device is None else torch.device(device)
        if key in task.factors:
            work = compute_dtype(base.dtype)
            delta = reconstruct(SVDFactors(*(f.to(dev, work) for f in task.factors[key])))
            out[key] = (base.to(dev, work) + delta).to(base.device, base.dtype)
        elif key in task.others:
            out[key] = task.others[key].to(base.device, base.dtype, copy=True)
        else:
            out[key] = base.clone()
    return out


def build_task_model(
    base_model: nn.Module, task: CompressedTask, device: Optional[Union[str, torch.device]] = None
) -> nn.Module:
    """A copy of ``base_model`` holding task ``task``'s compressed model ``θ₀ + Δ̂``."""
    model = deepcopy(base_model)
    model.load_state_dict(apply_compressed(base_model.state_dict(), task, device))
    return model


def base_fingerprint(base_state: Mapping[str, Tensor]) -> Dict[str, List[float]]:
    """Per floating-point parameter of θ₀: ``[Σ x, Σ |x|]`` in float64 (detects a different base model)."""
    out = {}
    for key, value in base_state.items():
        if torch.is_floating_point(value):
            v = value.detach().to(torch.float64)
            out[key] = [float(v.sum()), float(v.abs().sum())]
    return out


def storage_accounting(
    params: Mapping[str, Tuple[Sequence[int], torch.dtype]],
    ranks: Sequence[Mapping[str, int]],
    factor_dtype: Optional[torch.dtype] = None,
) -> Dict[str, Any]:
    """Stored parameters and bytes of T compressed tasks versus T full task vectors and one model.

    Args:
        params: the model's floating-point parameters, ``key -> (shape, dtype)``.
        ranks: one mapping per task, ``matrix key -> k``; the task's other parameters are stored in full.
        factor_dtype: dtype of the stored factors; default: each matrix's own dtype.

    A compressed matrix costs ``k (m + n + 1)`` numbers (:func:`factor_numel`), everything else its size.
    """
    num_tasks = len(ranks)
    model_params = sum(_numel(shape) for shape, _ in params.values())
    model_bytes = sum(_numel(shape) * _itemsize(dtype) for shape, dtype in params.values())
    matrix_keys = set().union(*[set(r) for r in ranks]) if ranks else set()
    model_matrix_params = sum(_numel(params[k][0]) for k in matrix_keys)
    factor_params = factor_bytes = other_params = other_bytes = 0
    for task_ranks in ranks:
        for key, (shape, dtype) in params.items():
            if key in task_ranks:
                n = factor_numel(shape, task_ranks[key])
                factor_params += n
                factor_bytes += n * _itemsize(factor_dtype or dtype)
            else:
                other_params += _numel(shape)
                other_bytes += _numel(shape) * _itemsize(dtype)
    stored_params, stored_bytes = factor_params + other_params, factor_bytes + other_bytes
    full_params, full_bytes = num_tasks * model_params, num_tasks * model_bytes
    return {
        "num_tasks": num_tasks,
        "stored": {
            "params": stored_params,
            "bytes": stored_bytes,
            "matrix_factor_params": factor_params,
            "matrix_factor_bytes": factor_bytes,
            "other_params": other_params,
            "other_bytes": other_bytes,
        },
        "full_task_vectors": {"params": full_params, "bytes": full_bytes},
        "one_model": {"params": model_params, "bytes": model_bytes, "matrix_params": model_matrix_params},
        "stored_over_full_task_vectors": stored_bytes / full_bytes if full_bytes else None,
        "stored_over_one_model": stored_bytes / model_bytes if model_bytes else None,
        "matrix_factors_over_one_model_matrices": (
            factor_params / model_matrix_params if model_matrix_params else None
        ),
    }


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def save_compressed(
    directory: Union[str, os.PathLike],
    tasks: Sequence[CompressedTask],
    base_state: Mapping[str, Tensor],
    *,
    base_model: str = "unknown",
    rank_choice: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Write ``tasks`` to the checkpoint ``directory`` atomically and return the manifest.

    The directory is written under a temporary name in its parent and renamed into place; an existing
    checkpoint there is replaced, any other existing non-empty directory is an error.
    """
    from safetensors.torch import save_file

    if not tasks:
        raise ValueError("save_compressed needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{directory} exists and is not a TSV-C checkpoint: refusing to overwrite it")
    first = tasks[0]
    for t in tasks[1:]:
        if set(t.factors) != set(first.factors) or set(t.others) != set(first.others):
            raise ValueError(f"task '{t.name}' does not have the same parameters as task '{first.name}'")

    tensors: Dict[str, Tensor] = {}
    for i, task in enumerate(tasks):
        tensors.update(task.tensors(f"t{i}"))
    floating = {k: v for k, v in base_state.items() if torch.is_floating_point(v)}
    factor_dtypes = sorted({_dtype_name(f.U.dtype) for t in tasks for f in t.factors.values()})
    storage = storage_accounting(
        {k: (tuple(v.shape), v.dtype) for k, v in floating.items()},
        [t.ranks for t in tasks],
        factor_dtype=first.factors[next(iter(first.factors))].U.dtype if first.factors else None,
    )
    stored_bytes = sum(_nbytes(t) for t in tensors.values())
    if stored_bytes != storage["stored"]["bytes"]:  # the accounting must describe what is written
        raise RuntimeError(f"byte accounting {storage['stored']['bytes']} != tensors written {stored_bytes}")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tensor_file": TENSOR_FILE,
        "base_model": str(base_model),
        "tasks": [{"name": t.name, "prefix": f"t{i}"} for i, t in enumerate(tasks)],
        "rank_choice": dict(rank_choice or {}),
        "factor_dtype": factor_dtypes[0] if len(factor_dtypes) == 1 else factor_dtypes,
        "matrices": {
            key: {"shape": list(floating[key].shape), "k": [t.ranks[key] for t in tasks]} for key in first.factors
        },
        "others": {
            key: {"shape": list(first.others[key].shape), "dtype": _dtype_name(first.others[key].dtype)}
            for key in first.others
        },
        "base_fingerprint": base_fingerprint(base_state),
        "storage": storage,
        **dict(extra or {}),
    }

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "ckpt")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def read_manifest(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The checkpoint's manifest (validated format)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no TSV-C checkpoint at {directory}: {MANIFEST_FILE} not found")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a TSV-C manifest (format {manifest.get('format')!r}, expected {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported TSV-C checkpoint version {manifest.get('version')!r}")
    return manifest


def check_base(manifest: Mapping[str, Any], base_state: Mapping[str, Tensor]) -> None:
    """Raise a ``ValueError`` naming the parameter if ``base_state`` is not the checkpoint's base model."""
    expected = {**{k: v["shape"] for k, v in manifest["matrices"].items()},
                **{k: v["shape"] for k, v in manifest["others"].items()}}
    floating = {k: v for k, v in base_state.items() if torch.is_floating_point(v)}
    for key in expected:
        if key not in floating:
            raise ValueError(f"the base model has no parameter '{key}', which the compressed checkpoint holds")
    for key in floating:
        if key not in expected:
            raise ValueError(f"the base model's parameter '{key}' is not in the compressed checkpoint")
    for key, shape in expected.items():
        if list(floating[key].shape) != list(shape):
            raise ValueError(
                f"parameter '{key}': the base model has shape {tuple(floating[key].shape)}, "
                f"the compressed checkpoint {tuple(shape)}"
            )
    fingerprint = manifest.get("base_fingerprint") or {}
    mine = base_fingerprint({k: floating[k] for k in fingerprint if k in floating})
    for key, (total, total_abs) in fingerprint.items():
        if abs(mine[key][0] - total) > _FINGERPRINT_RTOL * max(total_abs, mine[key][1]) + 1e-12:
            raise ValueError(
                f"parameter '{key}' of the base model differs from the base model the checkpoint was made from "
                f"({manifest.get('base_model')})"
            )


def _task_prefix(manifest: Mapping[str, Any], task: str) -> str:
    for entry in manifest["tasks"]:
        if entry["name"] == task:
            return entry["prefix"]
    raise KeyError(f"task '{task}' is not in the compressed checkpoint; it has {[t['name'] for t in manifest['tasks']]}")


def load_compressed_task(directory: Union[str, os.PathLike], task: str) -> CompressedTask:
    """Read one task's tensors from the checkpoint, and no other task's."""
    from safetensors import safe_open

    manifest = read_manifest(directory)
    prefix = _task_prefix(manifest, task)
    out = CompressedTask(task)
    with safe_open(str(Path(directory) / manifest["tensor_file"]), framework="pt") as f:
        for key in manifest["matrices"]:
            out.factors[key] = SVDFactors(*(f.get_tensor(f"{prefix}/{key}/{p}") for p in ("U", "S", "Vh")))
        for key in manifest["others"]:
            out.others[key] = f.get_tensor(f"{prefix}/{key}")
    return out


def load_task_state(
    directory: Union[str, os.PathLike],
    task: str,
    base_state: Mapping[str, Tensor],
    device: Optional[Union[str, torch.device]] = None,
) -> Dict[str, Tensor]:
    """Task ``task``'s state dict ``θ₀ + Δ̂`` from the base model's state dict and the checkpoint."""
    check_base(read_manifest(directory), base_state)
    return apply_compressed(base_state, load_compressed_task(directory, task), device)


def load_task_model(
    directory: Union[str, os.PathLike],
    task: str,
    base_model: nn.Module,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """Rebuild task ``task``'s model from ``base_model`` (not modified) and the checkpoint ``directory``.

    Example::

        from transformers import CLIPVisionModel
        base = CLIPVisionModel.from_pretrained("openai/clip-vit-base-patch32")
        model = load_task_model("outputs/tsv_c", "sun397", base)
    """
    model = deepcopy(base_model)
    model.load_state_dict(load_task_state(directory, task, base_model.state_dict(), device))
    return model
