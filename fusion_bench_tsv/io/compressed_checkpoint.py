"""The TSV-C compressed checkpoint: one ``.safetensors`` file, verified when loaded.

A checkpoint is a directory (written as a whole, :func:`~.outputs.write_output_dir`) holding
:data:`TENSOR_FILE`: the tensors and header metadata of FusionBench's format
(:func:`~fusion_bench_tsv.functional.tsv_compression.checkpoint_tensors`: per task ``t{i}/{key}/U``,
``/S``, ``/Vh`` and ``t{i}/{key}`` for the parameters kept in full; the task names, each matrix's shape and
k per task), plus these metadata entries (JSON):

- ``base_fingerprint``: per floating-point parameter of θ₀ its shape, dtype and SHA-256 of its bytes;
- ``task_sha256``: per task the SHA-256 of its tensors (:func:`task_digest`: names, dtypes, shapes, bytes);
- ``base_model``, ``rank_choice``, ``storage`` (:func:`storage_accounting`, checked against the bytes written);
- ``sha256``: the SHA-256 of all other metadata entries (:func:`metadata_digest`).

The task digests and the metadata digest cover every tensor and every metadata value of the file, and a
task is verified reading only its own tensors (``safetensors.safe_open``), not the whole file. Loading checks
the metadata digest, the base model against its fingerprint (any changed bit), each tensor's shape, the task's
digest and that every value is finite: a damaged, edited or mismatched checkpoint is refused with an error
naming the file and the entry, task or parameter. Tensors are copied out of the file before they are hashed:
what is returned is what was verified.
"""

from __future__ import annotations

import hashlib
import json
import os
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..functional import SVDFactors
from ..functional.tsv_compression import (
    FORMAT,
    VERSION,
    CompressedTask,
    apply_compressed,
    checkpoint_tensors,
    read_layout,
    storage_accounting,
    task_from_tensors,
)
from .outputs import output_dir, write_output_dir
from .safetensors_state import CheckpointError, check_tensor_finite

__all__ = [
    "FORMAT",
    "VERSION",
    "TENSOR_FILE",
    "CheckpointError",
    "CompressedTask",
    "apply_compressed",
    "base_fingerprint",
    "build_task_model",
    "check_base",
    "describe_storage",
    "load_compressed_task",
    "load_task_model",
    "load_task_state",
    "metadata_digest",
    "read_metadata",
    "save_compressed",
    "storage_accounting",
    "task_digest",
    "verify_checkpoint",
]

TENSOR_FILE = "tsv_c.safetensors"
#: the JSON entries this package adds to the format's metadata
_ENTRIES = ("base_fingerprint", "task_sha256", "rank_choice", "storage")
_OLD_MANIFEST = "manifest.json"  # the format before the single file (fusion_bench_tsv <= version 2 checkpoints)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_bytes(value: Tensor) -> memoryview:
    """The tensor's bytes as stored (CPU, contiguous, native little-endian order), as safetensors writes them."""
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def task_digest(name: str, tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of a task: its ``name``, then each tensor's name (without the ``t{i}`` prefix), dtype, shape
    and bytes, in sorted name order."""
    h = hashlib.sha256(json.dumps(["task", name]).encode())
    for key in sorted(tensors):
        h.update(json.dumps([key, _dtype_name(tensors[key].dtype), list(tensors[key].shape)]).encode())
        h.update(_tensor_bytes(tensors[key]))
    return h.hexdigest()


def base_fingerprint(base_state: Mapping[str, Tensor]) -> Dict[str, Dict[str, Any]]:
    """Per floating-point parameter of θ₀: its shape, dtype and the SHA-256 of its bytes (any changed bit shows)."""
    return {key: {"shape": list(value.shape), "dtype": _dtype_name(value.dtype),
                  "sha256": hashlib.sha256(_tensor_bytes(value)).hexdigest()}
            for key, value in base_state.items() if torch.is_floating_point(value)}


def metadata_digest(metadata: Mapping[str, str]) -> str:
    """SHA-256 of every metadata entry but ``sha256`` itself (sorted ``[name, value]`` pairs as JSON)."""
    return hashlib.sha256(json.dumps(sorted((k, v) for k, v in metadata.items() if k != "sha256")).encode()).hexdigest()


def describe_storage(storage: Mapping[str, Any]) -> str:
    """:func:`storage_accounting`'s result in one line."""
    s, f, m = storage["stored"], storage["full_task_vectors"], storage["one_model"]
    return (
        f"TSV-C storage, T={storage['num_tasks']}: stored {s['params']:,} params / "
        f"{s['bytes']:,} bytes (factors {s['matrix_factor_params']:,}, other "
        f"{s['other_params']:,}); T full task vectors {f['params']:,} / "
        f"{f['bytes']:,} bytes; one model {m['params']:,} / {m['bytes']:,} bytes; "
        f"stored = {storage['stored_over_full_task_vectors']:.4f} x T task vectors = "
        f"{storage['stored_over_one_model']:.3f} models; matrix factors = "
        f"{storage['matrix_factors_over_one_model_matrices']:.3f} x one model's matrices"
    )


def build_task_model(
    base_model: nn.Module, task: CompressedTask, device: Optional[Union[str, torch.device]] = None
) -> nn.Module:
    """A copy of ``base_model`` holding task ``task``'s compressed model ``θ₀ + Δ̂``."""
    model = deepcopy(base_model)
    model.load_state_dict(apply_compressed(base_model.state_dict(), task, device))
    return model


def save_compressed(
    directory: Union[str, os.PathLike],
    tasks: Sequence[CompressedTask],
    base_state: Mapping[str, Tensor],
    *,
    base_model: str = "unknown",
    rank_choice: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Write ``tasks`` to the checkpoint ``directory`` atomically and return its metadata, decoded
    (:func:`read_metadata`'s form).

    The directory is written under a temporary name in its parent and moved into place
    (:func:`~fusion_bench_tsv.io.outputs.write_output_dir`); an existing directory there is replaced only
    when it is empty or an unchanged TSV-C output, anything else is a ``FileExistsError``.
    """
    tensors, metadata = checkpoint_tensors(tasks)
    first = tasks[0]
    for t in tasks:
        for key, factors in t.factors.items():
            if {f.dtype for f in factors} != {first.factors[key][0].dtype}:
                raise ValueError(f"task '{t.name}': the factors of '{key}' are not all {first.factors[key][0].dtype}")
        for key, value in t.others.items():
            if (value.dtype, value.shape) != (first.others[key].dtype, first.others[key].shape):
                raise ValueError(f"task '{t.name}': parameter '{key}' differs in dtype or shape from task '{first.name}'")
    directory = output_dir(str(directory), None, "tsv_c", "TSV-C", record=False)  # TSV-C's run checked it first
    floating = {k: (tuple(v.shape), v.dtype) for k, v in base_state.items() if torch.is_floating_point(v)}
    factor_dtype = next((f[0].dtype for f in first.factors.values()), None)
    storage = storage_accounting(floating, [t.ranks for t in tasks], factor_dtype)
    written = sum(t.numel() * t.element_size() for t in tensors.values())
    if written != storage["stored"]["bytes"]:  # the accounting must describe what is written
        raise RuntimeError(f"byte accounting {storage['stored']['bytes']} != tensors written {written}")
    entries = {
        "base_fingerprint": base_fingerprint(base_state),
        "task_sha256": {t.name: task_digest(t.name, t.tensors("")) for t in tasks},
        "rank_choice": dict(rank_choice or {}),
        "storage": storage,
    }
    metadata.update({k: json.dumps(v) for k, v in entries.items()}, base_model=str(base_model))
    metadata["sha256"] = metadata_digest(metadata)
    write_output_dir(directory, lambda tmp: save_file(tensors, str(tmp / TENSOR_FILE), metadata=metadata), "TSV-C")
    return _decode(Path(directory) / TENSOR_FILE, metadata)


def _open(path: Path):
    """``safe_open`` of the checkpoint's file; a file that is not readable safetensors is a CheckpointError."""
    if not path.is_file():
        old = path.parent / _OLD_MANIFEST
        if old.is_file():
            raise CheckpointError(
                f"{path.parent}: a TSV-C checkpoint of the older format ({_OLD_MANIFEST} + task_vectors.safetensors, "
                "written by an older fusion_bench_tsv); this version reads one .safetensors file. Create it again: "
                "fusion_bench method=tsv/tsv_compress method.save_path=<directory> modelpool=<the same pool>"
            )
        raise FileNotFoundError(f"no TSV-C checkpoint at {path.parent}: {TENSOR_FILE} not found")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}): the checkpoint is damaged or "
                              "incomplete; write it again") from e


def _decode(path: Path, metadata: Optional[Mapping[str, str]]) -> Dict[str, Any]:
    """The metadata checked (its digest, the format's layout, the JSON entries) and decoded."""
    metadata = dict(metadata or {})

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {problem}: the checkpoint is damaged or was edited; write it again")

    if metadata.get("format") == FORMAT and metadata.get("version") != VERSION:
        raise CheckpointError(f"{path}: TSV-C file version {metadata.get('version')!r}; this fusion_bench_tsv "
                              f"reads version {VERSION}: upgrade fusion_bench_tsv or write the checkpoint again")
    if metadata.get("sha256") != metadata_digest(metadata):
        raise bad("its metadata does not match their SHA-256 (metadata entry 'sha256')")
    try:
        info: Dict[str, Any] = read_layout(metadata)
        info.update({entry: json.loads(metadata[entry]) for entry in _ENTRIES})
    except (KeyError, ValueError) as e:
        raise bad(str(e) if isinstance(e, ValueError) else f"metadata entry {e} is missing") from e
    for entry in _ENTRIES:
        if not isinstance(info[entry], dict):
            raise bad(f"metadata entry '{entry}' is not a mapping")
    if set(info["task_sha256"]) != set(info["tasks"]):
        raise bad("metadata entry 'task_sha256' does not list the tasks of 'tasks'")
    return {**info, "format": metadata["format"], "version": metadata["version"],
            "base_model": metadata.get("base_model", "unknown"), "sha256": metadata["sha256"]}


def read_metadata(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The checkpoint's metadata, checked and decoded: ``tasks`` (names), ``matrices`` (``{key: {shape, k}}``),
    ``others`` (``{key: shape}``), ``base_fingerprint``, ``task_sha256``, ``rank_choice``, ``storage``,
    ``base_model``, ``format``, ``version``, ``sha256``. Errors name the file and the entry."""
    path = Path(directory) / TENSOR_FILE
    with _open(path) as f:
        return _decode(path, f.metadata())


def check_base(info: Mapping[str, Any], base_state: Mapping[str, Tensor]) -> None:
    """Raise a ``ValueError`` naming the parameter if ``base_state`` is not the checkpoint's base model:
    another set of floating-point parameters, another shape or dtype, or any other value (SHA-256 of the
    parameter's bytes, :func:`base_fingerprint`)."""
    fingerprint, made_from = info["base_fingerprint"], info["base_model"]
    floating = {k: v for k, v in base_state.items() if torch.is_floating_point(v)}
    for key in [*info["matrices"], *info["others"]]:
        if key not in floating:
            raise ValueError(f"the base model has no parameter '{key}', which the compressed checkpoint holds")
    for key in floating:
        if key not in fingerprint:
            raise ValueError(f"the base model's parameter '{key}' is not in the compressed checkpoint")
    for key, value in floating.items():
        expected = fingerprint[key]
        if list(value.shape) != expected.get("shape"):
            raise ValueError(f"parameter '{key}': the base model has shape {tuple(value.shape)}, "
                             f"the compressed checkpoint {tuple(expected.get('shape') or ())}")
        if _dtype_name(value.dtype) != expected.get("dtype"):
            raise ValueError(
                f"parameter '{key}' of the base model is {_dtype_name(value.dtype)}, the checkpoint was made from "
                f"{expected.get('dtype')} weights ({made_from}): load the base model in that dtype"
            )
        if hashlib.sha256(_tensor_bytes(value)).hexdigest() != expected.get("sha256"):
            raise ValueError(f"parameter '{key}' of the base model differs from the base model the checkpoint was "
                             f"made from ({made_from}): load that model")


def _read(f, name: str) -> Tensor:
    """Tensor ``name`` of the open file, copied out of the file's memory map."""
    return f.get_tensor(name).clone()


def load_compressed_task(
    directory: Union[str, os.PathLike], task: str, info: Optional[Mapping[str, Any]] = None
) -> CompressedTask:
    """Read one task's tensors from the checkpoint, and no other task's, verified: the metadata (and that it
    is the ``info`` given, if any), each tensor's shape, the task's SHA-256 (:func:`task_digest`) and every
    value finite. Every error names the file and the task or tensor."""
    path = Path(directory) / TENSOR_FILE
    with _open(path) as f:
        found = _decode(path, f.metadata())
        if info is not None and found["sha256"] != info["sha256"]:
            raise CheckpointError(f"{path} changed since its metadata was read; load it again")
        if task not in found["tasks"]:
            raise KeyError(f"task '{task}' is not in the compressed checkpoint; it has {found['tasks']}")
        prefix = f"t{found['tasks'].index(task)}"
        try:
            out = task_from_tensors(found, task, _reader(f, path, task))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}: the checkpoint is inconsistent; write it again") from e
    tensors = out.tensors("")
    if task_digest(task, tensors) != found["task_sha256"][task]:
        raise CheckpointError(
            f"{path}: the tensors of task '{task}' (prefix '{prefix}') do not match its SHA-256 in the metadata "
            "entry 'task_sha256': the checkpoint is damaged or was modified; write it again"
        )
    for name, value in tensors.items():
        try:
            check_tensor_finite(value, task, prefix + name)
        except ValueError:
            raise CheckpointError(
                f"{path}: task '{task}': tensor '{prefix}{name}' holds NaN or Inf values (its checksums match: it "
                "was written so); compress the task again from a finite model"
            ) from None
    out.factors = {key: SVDFactors(*factors) for key, factors in out.factors.items()}
    return out


def _reader(f, path: Path, task: str) -> Callable[[str], Tensor]:
    def read(name: str) -> Tensor:
        try:
            return _read(f, name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: task '{task}': tensor '{name}' cannot be read ({e})") from e
    return read


def verify_checkpoint(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Verify a whole checkpoint (metadata, every task's tensors) and return its metadata; one task's tensors
    in memory at a time."""
    info = read_metadata(directory)
    for task in info["tasks"]:
        load_compressed_task(directory, task, info)
    return info


def load_task_state(
    directory: Union[str, os.PathLike],
    task: str,
    base_state: Mapping[str, Tensor],
    device: Optional[Union[str, torch.device]] = None,
) -> Dict[str, Tensor]:
    """Task ``task``'s state dict ``θ₀ + Δ̂`` from the base model's state dict and the checkpoint."""
    info = read_metadata(directory)
    check_base(info, base_state)
    return apply_compressed(base_state, load_compressed_task(directory, task, info), device)


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
