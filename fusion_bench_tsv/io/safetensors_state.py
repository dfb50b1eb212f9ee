"""A state dict read lazily from safetensors checkpoints, one tensor at a time (``safetensors.safe_open``).

Used by :mod:`fusion_bench_tsv.io.streaming` to read fine-tuned (and pretrained) checkpoints layer by layer
instead of building T models.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .paths import confined_path

__all__ = [
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX",
    "CheckpointError",
    "SafetensorsState",
    "check_tensor_finite",
    "open_safetensors",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (damaged, truncated, not what it claims to be); the message names the
    model or file (and the parameter where known), the original exception is the ``__cause__``."""


def check_tensor_finite(value: Tensor, model_name: str, key: str) -> None:
    """Raise a ``ValueError`` naming the model and the key if a floating-point ``value`` holds NaN or Inf."""
    # a finite sum proves every entry finite (NaN and ±Inf propagate); only a non-finite sum (NaN/Inf, or an
    # overflow of large finite values) needs the entrywise test
    if not torch.is_floating_point(value) or value.numel() == 0:
        return
    value = value.float() if value.itemsize == 1 else value  # float8: torch has no sum for it
    if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"model '{model_name}': parameter '{key}' contains NaN or Inf values")


SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@contextmanager
def open_safetensors(file: Path, owner: str) -> Iterator:
    """``safe_open(file, framework="pt")``; a file safetensors cannot read (a damaged header, a truncated
    file) raises :class:`CheckpointError` naming ``owner`` (e.g. ``"model 'task_a'"``) and the file."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(
            f"{owner}: {file} is not a readable safetensors file ({e}); "
            "the checkpoint is damaged or incomplete: save or download it again"
        ) from e


def _safetensors_files(path: Path, model_name: str) -> Tuple[List[Path], Optional[Dict[str, str]]]:
    """The ``.safetensors`` files of a checkpoint (a file, an index ``.json`` or a directory holding
    ``model.safetensors`` or ``model.safetensors.index.json``) and the index's weight map, if any.

    The index's file names must stay inside the checkpoint directory (:func:`~.paths.confined_path`)."""
    if path.is_dir():
        if (path / SAFETENSORS_FILE).is_file():
            return [path / SAFETENSORS_FILE], None
        if (path / SAFETENSORS_INDEX).is_file():
            path = path / SAFETENSORS_INDEX
        else:
            raise FileNotFoundError(f"model '{model_name}': {path} holds neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")
    if path.suffix == ".json":
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"model '{model_name}': {path} is not a valid safetensors index: {e}") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"model '{model_name}': {path} is not a safetensors index: it has no 'weight_map'")
        files = {}
        for key, name in weight_map.items():
            files[name] = confined_path(path.parent, name, f"model '{model_name}': weight_map entry '{key}' of {path}")
        return [files[name] for name in sorted(files)], weight_map
    return [path], None


class SafetensorsState(Mapping[str, Tensor]):
    """A read-only state dict backed by safetensors files, read one tensor at a time.

    ``path`` is a ``.safetensors`` file, a sharded checkpoint's ``model.safetensors.index.json``, or a
    directory holding either (as ``save_pretrained`` writes them). Only the headers are read up front
    (names, dtypes, shapes). ``state[key]`` opens the file with ``safe_open`` for that tensor alone (so
    that no mapped page of the file stays resident between reads), casts it to the dtype of
    ``reference[key]`` (as ``from_pretrained`` would load it into the reference's architecture) and checks
    it for NaN/Inf, raising the ``check_finite`` error naming the model.

    ``aliases`` maps keys that the files do not hold to keys they do: tied weights (``lm_head.weight``
    of a model with ``tie_word_embeddings`` is saved once, as ``model.embed_tokens.weight``).
    """

    def __init__(
        self,
        path: os.PathLike,
        model_name: str,
        reference: Optional[Mapping[str, Tensor]] = None,
        aliases: Optional[Mapping[str, str]] = None,
    ):
        self.path, self.model_name, self.reference = Path(path), model_name, reference
        files, weight_map = _safetensors_files(self.path, model_name)
        self._entries: Dict[str, Tuple[Path, torch.dtype, torch.Size]] = {}
        for file in files:
            with open_safetensors(file, f"model '{model_name}'") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    shape = torch.Size(part.get_shape())
                    empty = part[:0] if shape else part[...]  # the dtype, reading at most one element
                    self._entries[key] = (file, empty.dtype, shape)
        if weight_map is not None:
            lost = [k for k in weight_map if k not in self._entries]
            if lost:
                raise CheckpointError(
                    f"model '{model_name}': {self.path} lists parameters its shards do not hold: {lost[:5]}"
                )
        self.aliases = {k: v for k, v in (aliases or {}).items() if k not in self._entries}
        for key, target in self.aliases.items():
            if target not in self._entries:
                raise KeyError(f"model '{model_name}': alias '{key}' -> '{target}': '{target}' is not in {self.path}")

    def __getitem__(self, key: str) -> Tensor:
        stored = self.aliases.get(key, key)
        file = self._entries[stored][0]  # KeyError for unknown keys, as a dict
        try:
            with open_safetensors(file, f"model '{self.model_name}'") as f:
                value = f.get_tensor(stored)
        except OSError as e:
            raise CheckpointError(
                f"model '{self.model_name}': cannot read parameter '{key}' from {file}: {type(e).__name__}: {e}"
            ) from e
        if self.reference is not None and key in self.reference and self.reference[key].dtype != value.dtype:
            value = value.to(self.reference[key].dtype)
        check_tensor_finite(value, self.model_name, key)
        return value

    def stored_dtype(self, key: str) -> torch.dtype:
        """The dtype ``key`` is stored in (from the header, before the cast to the reference's dtype)."""
        return self._entries[self.aliases.get(key, key)][1]

    def shape_of(self, key: str) -> torch.Size:
        return self._entries[self.aliases.get(key, key)][2]

    def __iter__(self) -> Iterator[str]:
        yield from self._entries
        yield from self.aliases

    def __len__(self) -> int:
        return len(self._entries) + len(self.aliases)

    def __contains__(self, key) -> bool:
        return key in self._entries or key in self.aliases

