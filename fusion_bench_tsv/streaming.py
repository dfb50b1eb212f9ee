"""Stream fine-tuned models out of a FusionBench modelpool, one at a time, and validate them.

Shared by every algorithm of the package: TSV-M, TSV-C and STI all see the task vectors
``Δᵢ = θᵢ − θ₀`` one model at a time, layer by layer, and never hold T models in memory.
"""

from __future__ import annotations

import fnmatch
import gc
import logging
from typing import Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

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
    for key, ref in reference.items():
        if state[key].shape != ref.shape:
            raise ValueError(
                f"model '{model_name}': parameter '{key}' has shape {tuple(state[key].shape)}, "
                f"the pretrained model has {tuple(ref.shape)}"
            )


def check_finite(state: Mapping[str, Tensor], model_name: str) -> None:
    """Raise a ``ValueError`` naming the model and the first key that holds NaN or Inf."""
    for key, value in state.items():
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"model '{model_name}': parameter '{key}' contains NaN or Inf values")


def iter_finetuned_states(
    modelpool,
    reference: Mapping[str, Tensor],
    *,
    desc: str = "fine-tuned models",
    show_pbar: bool = True,
    profile=None,
) -> Iterator[Tuple[int, str, StateDict]]:
    """Yield ``(index, name, state_dict)`` for each fine-tuned model of ``modelpool``, one at a time.

    Each model is checked against ``reference`` (names, shapes) and for NaN/Inf before it is
    yielded, and released before the next one is loaded, so that one fine-tuned model is resident
    at a time. ``profile`` is an optional ``SimpleProfilerMixin.profile`` used to time the loading.
    """
    names = list(modelpool.model_names)
    for index, name in enumerate(tqdm(names, desc=desc, disable=not show_pbar, dynamic_ncols=True)):
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
