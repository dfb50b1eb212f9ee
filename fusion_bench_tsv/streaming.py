"""Stream fine-tuned models out of a FusionBench modelpool, one at a time, and validate them.

Shared by every algorithm of the package: TSV-M, TSV-C and STI all see the task vectors
``Δᵢ = θᵢ − θ₀`` one model at a time, layer by layer, and never hold T models in memory.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import logging
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

StateDict = Dict[str, Tensor]

DEFAULT_EXCLUDE_KEYS = ("*text_projection*",)
"""Parameters averaged (TSV-M) or kept in full (TSV-C) instead of decomposed: the reference excludes text_projection."""

__all__ = [
    "DEFAULT_EXCLUDE_KEYS",
    "StateDict",
    "check_compatible",
    "check_finite",
    "is_excluded",
    "iter_finetuned_states",
    "split_keys",
    "state_dict_of",
    "SafetensorsState",
    "local_safetensors_file",
]


def state_dict_of(model: nn.Module | Mapping[str, Tensor]) -> StateDict:
    """The model's state dict (tensors share storage with the model; nothing is copied)."""
    if isinstance(model, nn.Module):
        return model.state_dict(keep_vars=False)
    if isinstance(model, Mapping):
        return dict(model)
    raise TypeError(f"expected an nn.Module or a state dict, got {type(model).__name__}")


def is_excluded(key: str, patterns: Iterable[str]) -> bool:
    """Whether ``key`` matches one of the glob ``patterns`` (``fnmatch``: ``*``, ``?``, ``[...]``)."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def split_keys(state: Mapping[str, Tensor], exclude_keys: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Split floating-point parameters into matrices (2-D, not excluded) and the rest.

    Non-floating tensors (integer buffers) belong to neither list: they are kept as in θ₀.
    """
    matrices, others = [], []
    for key, value in state.items():
        if not torch.is_floating_point(value):
            continue
        if value.dim() == 2 and not is_excluded(key, exclude_keys):
            matrices.append(key)
        else:
            others.append(key)
    return matrices, others


def check_compatible(reference: Mapping[str, Tensor], state: Mapping[str, Tensor], model_name: str) -> None:
    """Raise a ``ValueError`` naming the model and the key if ``state`` does not match ``reference``."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise ValueError(
            f"model '{model_name}' does not have the parameters of the pretrained model: " + "; ".join(parts)
        )
    shape_of = state.shape_of if isinstance(state, SafetensorsState) else (lambda k: state[k].shape)
    for key, ref in reference.items():
        if shape_of(key) != ref.shape:
            raise ValueError(
                f"model '{model_name}': parameter '{key}' has shape {tuple(shape_of(key))}, "
                f"the pretrained model has {tuple(ref.shape)}"
            )


def check_finite(state: Mapping[str, Tensor], model_name: str) -> None:
    """Raise a ``ValueError`` naming the model and the first key that holds NaN or Inf."""
    for key, value in state.items():
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"model '{model_name}': parameter '{key}' contains NaN or Inf values")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsState(Mapping[str, Tensor]):
    """A read-only state dict backed by a ``.safetensors`` file, read one tensor at a time.

    Only the JSON header is parsed up front (names, dtypes, shapes). ``state[key]`` reads that tensor
    with a plain positioned read (no memory map, so nothing of the file stays resident), casts it to
    the dtype of ``reference[key]`` (as ``from_pretrained`` would load it into the reference's
    architecture) and checks it for NaN/Inf, raising the ``check_finite`` error naming the model.
    """

    def __init__(self, path: os.PathLike, model_name: str, reference: Optional[Mapping[str, Tensor]] = None):
        self.path, self.model_name, self.reference = Path(path), model_name, reference
        with open(self.path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self._start = 8 + size
        self._entries = header

    def __getitem__(self, key: str) -> Tensor:
        entry = self._entries[key]  # KeyError for unknown keys, as a dict
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ValueError(f"model '{self.model_name}': file {self.path} is truncated at parameter '{key}'")
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        value = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        value = value.reshape(entry["shape"])
        if self.reference is not None and key in self.reference and self.reference[key].dtype != dtype:
            value = value.to(self.reference[key].dtype)
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"model '{self.model_name}': parameter '{key}' contains NaN or Inf values")
        return value

    def shape_of(self, key: str) -> torch.Size:
        return torch.Size(self._entries[key]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def local_safetensors_file(modelpool, name: str) -> Optional[Path]:
    """The ``model.safetensors`` of ``name`` when the pool loads it with ``from_pretrained`` from a local
    directory (a ``CLIPVisionModelPool`` entry that is a path), else None (then use ``load_model``)."""
    try:
        from fusion_bench.modelpool import CLIPVisionModelPool
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(modelpool, CLIPVisionModelPool):
        return None
    entry = modelpool._models.get(name) if hasattr(modelpool._models, "get") else None
    if not isinstance(entry, str) or not os.path.isdir(entry):
        return None
    path = Path(entry) / "model.safetensors"
    return path if path.is_file() else None


def _lazy_state(modelpool, name: str, reference: Mapping[str, Tensor]) -> Optional[SafetensorsState]:
    path = local_safetensors_file(modelpool, name)
    if path is None:
        return None
    state = SafetensorsState(path, name, reference)
    # only when the file holds exactly the model's parameters (no renamed or missing buffers)
    if set(state) != set(reference):
        log.info(f"model '{name}': {path} keys differ from the model's state dict; loading the model instead")
        return None
    return state


def iter_finetuned_states(
    modelpool,
    reference: Mapping[str, Tensor],
    *,
    desc: str = "fine-tuned models",
    show_pbar: bool = True,
    profile=None,
    lazy: bool = False,
) -> Iterator[Tuple[int, str, StateDict]]:
    """Yield ``(index, name, state_dict)`` for each fine-tuned model of ``modelpool``, one at a time.

    Each model is checked against ``reference`` (names, shapes) and for NaN/Inf before it is
    yielded, and released before the next one is loaded, so that one fine-tuned model is resident
    at a time. ``profile`` is an optional ``SimpleProfilerMixin.profile`` used to time the loading.

    ``lazy=True``: where the pool allows (a ``CLIPVisionModelPool`` entry that is a local directory
    with ``model.safetensors`` holding exactly the reference's keys), yield a :class:`SafetensorsState`
    instead of building the model: names and shapes are checked from the file header before it is
    yielded, each tensor is read (and checked for NaN/Inf) when it is accessed, so at most the
    tensors the caller keeps are resident. Other models are loaded with ``modelpool.load_model``.
    """
    names = list(modelpool.model_names)
    for index, name in enumerate(tqdm(names, desc=desc, disable=not show_pbar, dynamic_ncols=True)):
        state = _lazy_state(modelpool, name, reference) if lazy else None
        if state is not None:
            check_compatible(reference, state, name)
            yield index, name, state
            del state
            continue
        if profile is not None:
            with profile("load model"):
                model = modelpool.load_model(name)
        else:
            model = modelpool.load_model(name)
        state = state_dict_of(model)
        check_compatible(reference, state, name)
        check_finite(state, name)
        yield index, name, state
        del model, state
        gc.collect()
