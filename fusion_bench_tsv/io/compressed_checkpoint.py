"""The TSV-C compressed checkpoint: per-task rank-k factors + full non-matrix parameters, on disk.

A checkpoint is a directory holding

- ``task_vectors.safetensors``: for task number ``i`` and every compressed matrix ``key``, the tensors
  ``t{i}/{key}/U`` (m × k), ``t{i}/{key}/S`` (k) and ``t{i}/{key}/Vh`` (k × n); for every other
  floating-point parameter, ``t{i}/{key}``: its value in the fine-tuned model, in full;
- ``manifest.json``: base model, task names, k per layer and task, shapes and dtypes, checksums, and the
  parameter and byte counts (:func:`storage_accounting`).

Checksums (SHA-256): of the tensor file (``files``), of each task's tensors (``tasks[i].sha256``:
:func:`task_digest`, over the task's name and its tensors' names, dtypes, shapes and bytes, in sorted
order) and of every floating-point parameter of the base model (``base_fingerprint``: dtype and SHA-256
of its bytes). Loading verifies all three and checks the manifest's shapes, ranks and dtypes against the
tensor file's header, so a damaged, edited or mismatched checkpoint, or another base model (any
changed bit), is refused with an error naming the file and the task or parameter.

Task ``i``'s model is ``θ₀ + U diag(S) Vhᵀ`` on the compressed matrices and the stored values elsewhere
(:func:`apply_compressed`). :func:`load_task_model` rebuilds one task from the base model and the
directory, keeping only that task's tensors: the tensor file is read once per load, hashed in the same pass
that copies out the task's bytes (what is returned is what was verified), and every tensor read is checked
finite (a NaN or Inf factor is refused even when the checksums match). Writes are atomic and durable
(:func:`~fusion_bench_tsv.io.atomic.write_dir_atomic`).
"""

from __future__ import annotations

import hashlib
import json
import os
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .outputs import file_sha256, output_dir, write_output_dir
from ..functional import SVDFactors, compute_dtype, factor_numel, reconstruct
from .paths import confined_path
from .safetensors_state import SAFETENSORS_DTYPES, CheckpointError, check_tensor_finite, read_safetensors_header

_SAFETENSORS_NAME = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "TENSOR_FILE",
    "CompressedTask",
    "apply_compressed",
    "base_fingerprint",
    "build_task_model",
    "CheckpointError",
    "check_base",
    "describe_storage",
    "load_compressed_task",
    "load_task_model",
    "load_task_state",
    "read_manifest",
    "save_compressed",
    "storage_accounting",
    "task_digest",
    "verify_checkpoint",
]

FORMAT = "fusion_bench_tsv/tsv_c"
VERSION = 2
MANIFEST_FILE = "manifest.json"
TENSOR_FILE = "task_vectors.safetensors"
_FACTORS = ("U", "S", "Vh")


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


def _tensor_bytes(value: Tensor) -> memoryview:
    """The tensor's bytes as stored (CPU, contiguous, native little-endian order), as safetensors writes them."""
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _hash_tensor(h, name: str, value: Tensor) -> None:
    h.update(json.dumps([name, _dtype_name(value.dtype), list(value.shape)]).encode())
    h.update(_tensor_bytes(value))


def task_digest(name: str, tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of a task: its ``name``, then each tensor's name (without the task prefix), dtype, shape and
    bytes, in sorted name order."""
    h = hashlib.sha256(json.dumps(["task", name]).encode())
    for key in sorted(tensors):
        _hash_tensor(h, key, tensors[key])
    return h.hexdigest()


def base_fingerprint(base_state: Mapping[str, Tensor]) -> Dict[str, Dict[str, str]]:
    """Per floating-point parameter of θ₀: its dtype and the SHA-256 of its bytes (any changed bit shows)."""
    out = {}
    for key, value in base_state.items():
        if torch.is_floating_point(value):
            out[key] = {"dtype": _dtype_name(value.dtype), "sha256": hashlib.sha256(_tensor_bytes(value)).hexdigest()}
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


def describe_storage(storage: Mapping[str, Any]) -> str:
    """One line summing up :func:`storage_accounting`'s result."""
    s, f, m = storage["stored"], storage["full_task_vectors"], storage["one_model"]
    return (
        f"TSV-C storage, T={storage['num_tasks']}: stored {s['params']:,} params / {s['bytes']:,} bytes "
        f"(factors {s['matrix_factor_params']:,}, other {s['other_params']:,}); "
        f"T full task vectors {f['params']:,} / {f['bytes']:,} bytes; one model {m['params']:,} / {m['bytes']:,} bytes; "
        f"stored = {storage['stored_over_full_task_vectors']:.4f} x T task vectors = "
        f"{storage['stored_over_one_model']:.3f} models; matrix factors = "
        f"{storage['matrix_factors_over_one_model_matrices']:.3f} x one model's matrices"
    )


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_tasks(tasks: Sequence[CompressedTask]) -> None:
    """Refuse an empty list, repeated names, or tasks that differ in parameters, dtypes or shapes."""
    if not tasks:
        raise ValueError("save_compressed needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    first = tasks[0]
    for t in tasks:
        if set(t.factors) != set(first.factors) or set(t.others) != set(first.others):
            raise ValueError(f"task '{t.name}' does not have the same parameters as task '{first.name}'")
        for key, factors in t.factors.items():
            if {f.dtype for f in factors} != {first.factors[key].U.dtype}:
                raise ValueError(f"task '{t.name}': the factors of '{key}' are not all {first.factors[key].U.dtype}")
        for key, value in t.others.items():
            if value.dtype != first.others[key].dtype or value.shape != first.others[key].shape:
                raise ValueError(f"task '{t.name}': parameter '{key}' differs in dtype or shape from task '{first.name}'")


# longer than ~60 lines: the manifest is one literal, every field in one place (the format's reference)
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

    The directory is written under a temporary name in its parent and moved into place
    (:func:`~fusion_bench_tsv.io.outputs.write_output_dir`); an existing directory there is replaced only
    when it is empty or an unchanged TSV-C output, anything else is a ``FileExistsError``.
    """
    from safetensors.torch import save_file

    _check_tasks(tasks)
    directory = output_dir(str(directory), None, "tsv_c", "TSV-C", record=False)  # TSV-C's run checked it first
    first = tasks[0]

    tensors: Dict[str, Tensor] = {}
    digests = []
    for i, task in enumerate(tasks):
        tensors.update(task.tensors(f"t{i}"))
        digests.append(task_digest(task.name, task.tensors("")))
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
        "tasks": [{"name": t.name, "prefix": f"t{i}", "sha256": d} for i, (t, d) in enumerate(zip(tasks, digests))],
        "rank_choice": dict(rank_choice or {}),
        "factor_dtype": factor_dtypes[0] if len(factor_dtypes) == 1 else factor_dtypes,
        "matrices": {
            key: {
                "shape": list(floating[key].shape),
                "dtype": _dtype_name(first.factors[key].U.dtype),
                "k": [t.ranks[key] for t in tasks],
            }
            for key in first.factors
        },
        "others": {
            key: {"shape": list(first.others[key].shape), "dtype": _dtype_name(first.others[key].dtype)}
            for key in first.others
        },
        "base_fingerprint": base_fingerprint(base_state),
        "storage": storage,
        **dict(extra or {}),
    }

    def write(tmp: Path) -> Dict[str, str]:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT})
        # hashed as written: what the loader will read (and what the output marker records)
        digest = file_sha256(tmp / TENSOR_FILE)
        manifest["files"] = {TENSOR_FILE: {"bytes": (tmp / TENSOR_FILE).stat().st_size, "sha256": digest}}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        return {TENSOR_FILE: digest}

    write_output_dir(directory, write, "TSV-C")
    return manifest


def _bad(path: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: '{field}' {problem}: the manifest is damaged or was edited; write the checkpoint again"
    )


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_shape(value, dims: Optional[int] = None) -> bool:
    return (isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
            and (dims is None or len(value) == dims))


def _torch_dtype(name) -> Optional[torch.dtype]:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype in _SAFETENSORS_NAME else None


def read_manifest(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The checkpoint's manifest, validated: format, version, and the structure of every field (tensor file
    inside the directory, tasks, shapes, ranks, dtypes, checksums). Errors name the manifest and the field."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no TSV-C checkpoint at {directory}: {MANIFEST_FILE} not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; write it again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path} is not a TSV-C manifest (format {found!r}, expected {FORMAT!r})")
    version = manifest.get("version")
    if version != VERSION:
        if isinstance(version, int) and version < VERSION:
            raise CheckpointError(
                f"{path}: TSV-C checkpoint format version {version}, written by an older fusion_bench_tsv; this "
                f"version reads version {VERSION} (checksums of the tensors and of the base model). Create it "
                "again: fusion_bench method=tsv/tsv_compress method.save_path=<directory> modelpool=<the same pool>"
            )
        raise CheckpointError(
            f"{path}: unsupported TSV-C checkpoint version {version!r}; this fusion_bench_tsv reads version "
            f"{VERSION}: upgrade fusion_bench_tsv"
        )
    _validate_manifest(manifest, path)
    return manifest


def _validate_manifest(manifest: Mapping[str, Any], path: Path) -> None:
    tensor_file = manifest.get("tensor_file")
    confined_path(path.parent, tensor_file, f"{path}: 'tensor_file'")
    files = manifest.get("files")
    entry = files.get(tensor_file) if isinstance(files, dict) else None
    if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and _is_sha256(entry.get("sha256"))):
        raise _bad(path, "files", f"has no size and SHA-256 of {tensor_file!r}")
    tasks = manifest.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise _bad(path, "tasks", "is not a non-empty list")
    for t in tasks:
        if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("prefix"), str)
                and _is_sha256(t.get("sha256"))):
            raise _bad(path, "tasks", f"entry {t!r} needs a name, a prefix and a sha256")
    for field_name in ("name", "prefix"):
        values = [t[field_name] for t in tasks]
        if len(set(values)) != len(values):
            raise _bad(path, "tasks", f"has repeated {field_name}s {values}")
    for key, meta in _mapping(manifest, "matrices", path).items():
        k = meta.get("k") if isinstance(meta, dict) else None
        if not (isinstance(meta, dict) and _is_shape(meta.get("shape"), 2) and _torch_dtype(meta.get("dtype"))
                and isinstance(k, list) and len(k) == len(tasks)
                and all(isinstance(r, int) and 1 <= r <= min(meta["shape"]) for r in k)):
            raise _bad(path, f"matrices.{key}", f"is not {{shape: [m, n], dtype, k: one rank in 1..min(m, n) per task}}: {meta!r}")
    for key, meta in _mapping(manifest, "others", path).items():
        if not (isinstance(meta, dict) and _is_shape(meta.get("shape")) and _torch_dtype(meta.get("dtype"))):
            raise _bad(path, f"others.{key}", f"is not {{shape, dtype}}: {meta!r}")
    for key, meta in _mapping(manifest, "base_fingerprint", path).items():
        if not (isinstance(meta, dict) and _torch_dtype(meta.get("dtype")) and _is_sha256(meta.get("sha256"))):
            raise _bad(path, f"base_fingerprint.{key}", f"is not {{dtype, sha256}}: {meta!r}")
    declared = {meta["dtype"] for meta in manifest["matrices"].values()}
    factor_dtype = manifest.get("factor_dtype")
    if declared and set([factor_dtype] if isinstance(factor_dtype, str) else factor_dtype or []) != declared:
        raise _bad(path, "factor_dtype", f"is {factor_dtype!r} but the matrices are stored as {sorted(declared)}")


def _mapping(manifest: Mapping[str, Any], field_name: str, path: Path) -> Mapping[str, Any]:
    value = manifest.get(field_name)
    if not isinstance(value, dict):
        raise _bad(path, field_name, "is not a mapping")
    return value


def check_base(manifest: Mapping[str, Any], base_state: Mapping[str, Tensor]) -> None:
    """Raise a ``ValueError`` naming the parameter if ``base_state`` is not the checkpoint's base model:
    another set of floating-point parameters, another shape or dtype, or any other value (SHA-256 of the
    parameter's bytes, :func:`base_fingerprint`)."""
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
    fingerprint = manifest["base_fingerprint"]
    if set(fingerprint) != set(floating):
        raise ValueError(
            f"the compressed checkpoint's base_fingerprint does not cover the base model's parameters "
            f"{sorted(set(floating) ^ set(fingerprint))[:5]}: the manifest is damaged or was edited"
        )
    made_from = manifest.get("base_model")
    for key, value in floating.items():
        if _dtype_name(value.dtype) != fingerprint[key]["dtype"]:
            raise ValueError(
                f"parameter '{key}' of the base model is {_dtype_name(value.dtype)}, the checkpoint was made from "
                f"{fingerprint[key]['dtype']} weights ({made_from}): load the base model in that dtype"
            )
        if hashlib.sha256(_tensor_bytes(value)).hexdigest() != fingerprint[key]["sha256"]:
            raise ValueError(
                f"parameter '{key}' of the base model differs from the base model the checkpoint was made from "
                f"({made_from}): load that model"
            )


def _task_entry(manifest: Mapping[str, Any], task: str) -> Tuple[int, Mapping[str, Any]]:
    for i, entry in enumerate(manifest["tasks"]):
        if entry["name"] == task:
            return i, entry
    raise KeyError(f"task '{task}' is not in the compressed checkpoint; it has {[t['name'] for t in manifest['tasks']]}")


def _read_verified(path: Path, manifest: Mapping[str, Any], data_start: int,
                   wanted: Mapping[str, Mapping[str, Any]]) -> Dict[str, bytearray]:
    """The bytes of the tensors ``wanted`` (``{name: header entry}``), read in the same pass that hashes the
    whole file against the manifest's SHA-256: what is returned is what was verified, whatever happens to the
    file before or after (no cache by size or modification time: an edit that restores both is still seen)."""
    expected = manifest["files"][manifest["tensor_file"]]
    ranges = sorted((data_start + e["data_offsets"][0], data_start + e["data_offsets"][1], name)
                    for name, e in wanted.items())
    out = {name: bytearray(stop - begin) for begin, stop, name in ranges}
    h, position = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            end = position + len(chunk)
            for begin, stop, name in ranges:
                if begin < end and stop > position:  # the part of this tensor inside the chunk
                    lo, hi = max(begin, position), min(stop, end)
                    out[name][lo - begin:hi - begin] = chunk[lo - position:hi - position]
            position = end
    if position != expected["bytes"] or h.hexdigest() != expected["sha256"]:
        raise CheckpointError(
            f"{path}: its SHA-256 differs from the one in {MANIFEST_FILE}: the file is damaged or is not this "
            "checkpoint's; write the checkpoint again"
        )
    return out


def _expected_tensors(manifest: Mapping[str, Any], index: int) -> Dict[str, Tuple[List[int], str]]:
    """Task ``index``'s tensor names (without its prefix) -> (shape, dtype name), as the manifest describes them."""
    out = {}
    for key, meta in manifest["matrices"].items():
        (m, n), k = meta["shape"], meta["k"][index]
        for part, shape in zip(_FACTORS, ([m, k], [k], [k, n])):
            out[f"/{key}/{part}"] = (shape, meta["dtype"])
    for key, meta in manifest["others"].items():
        out[f"/{key}"] = (meta["shape"], meta["dtype"])
    return out


def load_compressed_task(
    directory: Union[str, os.PathLike], task: str, manifest: Optional[Mapping[str, Any]] = None
) -> CompressedTask:
    """Read one task's tensors from the checkpoint, and no other task's, verified: the tensor file's size
    and SHA-256 (one pass over the file, :func:`_read_verified`), each tensor's shape and dtype against the
    manifest, every value finite, and the task's SHA-256 (:func:`task_digest`). Every error names the file and
    the task or tensor."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    index, entry = _task_entry(manifest, task)
    path = confined_path(directory, manifest["tensor_file"], f"{directory / MANIFEST_FILE}: 'tensor_file'")
    if not path.is_file():
        raise CheckpointError(f"{path}: the tensor file named in {directory / MANIFEST_FILE} does not exist")
    size, recorded = path.stat().st_size, manifest["files"][manifest["tensor_file"]]["bytes"]
    if size != recorded:
        raise CheckpointError(
            f"{path} has {size} bytes, {MANIFEST_FILE} records {recorded}: the file is truncated or was replaced; "
            "write the checkpoint again"
        )
    data_start, header = read_safetensors_header(path, f"TSV-C checkpoint {directory}")
    expected = _expected_tensors(manifest, index)
    prefix = entry["prefix"]
    for name, (shape, dtype) in expected.items():
        found = header.get(prefix + name)
        if found is None:
            raise CheckpointError(f"{path}: task '{task}': tensor '{prefix}{name}' is missing")
        if list(found["shape"]) != shape or found["dtype"] != _SAFETENSORS_NAME[_torch_dtype(dtype)]:
            raise CheckpointError(
                f"{path}: task '{task}': tensor '{prefix}{name}' is {found['dtype']} {found['shape']}, "
                f"{MANIFEST_FILE} describes {dtype} {shape}: the checkpoint is inconsistent; write it again"
            )
    raw = _read_verified(path, manifest, data_start, {prefix + name: header[prefix + name] for name in expected})
    tensors: Dict[str, Tensor] = {}
    for name, (shape, dtype) in expected.items():
        data = raw.pop(prefix + name)
        tensors[name] = (torch.frombuffer(data, dtype=_torch_dtype(dtype)) if data else
                         torch.empty(0, dtype=_torch_dtype(dtype))).reshape(shape)
    if task_digest(task, tensors) != entry["sha256"]:
        raise CheckpointError(
            f"{path}: the tensors of task '{task}' (prefix '{prefix}') do not match its SHA-256 in {MANIFEST_FILE}: "
            "the checkpoint is damaged or was modified; write it again"
        )
    for name, value in tensors.items():
        try:
            check_tensor_finite(value, task, prefix + name)
        except ValueError:
            raise CheckpointError(
                f"{path}: task '{task}': tensor '{prefix}{name}' holds NaN or Inf values (its checksums match: it "
                "was written so); compress the task again from a finite model"
            ) from None
    out = CompressedTask(task)
    for key in manifest["matrices"]:
        out.factors[key] = SVDFactors(*(tensors[f"/{key}/{p}"] for p in _FACTORS))
    for key in manifest["others"]:
        out.others[key] = tensors[f"/{key}"]
    return out


def verify_checkpoint(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Verify a whole checkpoint (manifest, tensor file, every task's tensors) and return its manifest; the
    tensor file is read once per task (one task's tensors in memory at a time)."""
    manifest = read_manifest(directory)
    for entry in manifest["tasks"]:
        load_compressed_task(directory, entry["name"], manifest)
    return manifest


def load_task_state(
    directory: Union[str, os.PathLike],
    task: str,
    base_state: Mapping[str, Tensor],
    device: Optional[Union[str, torch.device]] = None,
) -> Dict[str, Tensor]:
    """Task ``task``'s state dict ``θ₀ + Δ̂`` from the base model's state dict and the checkpoint."""
    manifest = read_manifest(directory)
    check_base(manifest, base_state)
    return apply_compressed(base_state, load_compressed_task(directory, task, manifest), device)


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
