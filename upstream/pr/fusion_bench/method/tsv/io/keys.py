"""Parameter names and values of a state dict: which are decomposed, which match, which are finite, which are tied.

The exclusion defaults live here, once: :data:`DEFAULT_EXCLUDE_KEYS` (every method's default) and
:data:`LLM_EXCLUDE_KEYS` (the causal-LM configs).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

from .safetensors_state import check_tensor_finite

__all__ = [
    "DEFAULT_EXCLUDE_KEYS",
    "LLM_EXCLUDE_KEYS",
    "StateDict",
    "check_compatible",
    "check_finite",
    "is_excluded",
    "missing_checkpoint_keys",
    "split_keys",
    "state_dict_of",
    "tied_aliases",
    "unique_storage_keys",
]


StateDict = Dict[str, Tensor]


DEFAULT_EXCLUDE_KEYS = ("*text_projection*",)
"""Parameters averaged (TSV-M) or kept in full (TSV-C) instead of decomposed: the reference excludes text_projection."""


LLM_EXCLUDE_KEYS = ("*embed_tokens*", "*lm_head*", "*text_projection*")
"""The defaults of the causal-LM configs (``tsv_merge_llm`` ...): vocabulary-sized token embeddings and
``lm_head`` are averaged (TSV-M) / kept in full (TSV-C) / not analysed (STI) instead of decomposed."""


def state_dict_of(model: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The model's state dict (tensors share storage with the model; nothing is copied).

    A ``dict`` is copied shallowly; any other ``Mapping`` (a lazy one: :class:`SafetensorsState`,
    FusionBench's ``LazyStateDict``) is returned as it is, so that no tensor is read before it is used.
    """
    if isinstance(model, nn.Module):
        return model.state_dict(keep_vars=False)
    if isinstance(model, dict):
        return dict(model)
    if isinstance(model, Mapping):
        return model
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
    shape_of = getattr(state, "shape_of", None) or (lambda k: state[k].shape)
    for key, ref in reference.items():
        if shape_of(key) != ref.shape:
            raise ValueError(
                f"model '{model_name}': parameter '{key}' has shape {tuple(shape_of(key))}, "
                f"the pretrained model has {tuple(ref.shape)}"
            )


def check_finite(state: Mapping[str, Tensor], model_name: str) -> None:
    """Raise a ``ValueError`` naming the model and the first key that holds NaN or Inf."""
    for key, value in state.items():
        check_tensor_finite(value, model_name, key)


def unique_storage_keys(state: Mapping[str, Tensor], keys: Iterable[str]) -> List[str]:
    """``keys`` without the second and later names of one storage (tied weights), in order."""
    seen, out = set(), []
    for key in keys:
        ptr = state[key].data_ptr()
        if ptr and ptr in seen:
            continue
        seen.add(ptr)
        out.append(key)
    return out


def tied_aliases(reference: Mapping[str, Tensor], present: Iterable[str]) -> Dict[str, str]:
    """For each key of ``reference`` not in ``present`` that shares its storage with a key that is
    (tied weights), ``missing key -> present key``."""
    present = set(present)
    by_ptr = {}
    for key in reference:
        if key in present and reference[key].data_ptr():
            by_ptr.setdefault((reference[key].data_ptr(), tuple(reference[key].shape)), key)
    out = {}
    for key in reference:
        if key not in present:
            found = by_ptr.get((reference[key].data_ptr(), tuple(reference[key].shape)))
            if found is not None:
                out[key] = found
    return out


def _tie_groups(module: nn.Module) -> Dict[str, List[str]]:
    """For every parameter or buffer name, the other names of the same tensor object (tied weights)."""
    by_id: Dict[int, List[str]] = {}
    for key, tensor in list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    ):
        by_id.setdefault(id(tensor), []).append(key)
    return {key: names for names in by_id.values() for key in names}


def missing_checkpoint_keys(module: nn.Module, checkpoint_keys: Iterable[str]) -> List[str]:
    """The keys of ``module.state_dict()`` that ``from_pretrained`` would not find in ``checkpoint_keys``
    and would therefore initialise at random.

    As ``transformers`` matches them: legacy names renamed (``_fix_state_dict_key_on_load``), the
    ``base_model_prefix`` added or removed, tied weights saved under one of their names (and the
    ``_tied_weights_keys`` of a model whose config ties the word embeddings), and the model's
    ``_keys_to_ignore_on_load_missing`` patterns. Non-persistent buffers are not in the state dict.
    """
    fix = getattr(module, "_fix_state_dict_key_on_load", None)
    present = {fix(k)[0] if callable(fix) else k for k in checkpoint_keys}
    prefix = getattr(module, "base_model_prefix", "") or ""
    ignore = [re.compile(p) for p in (getattr(module, "_keys_to_ignore_on_load_missing", None) or [])]
    if getattr(getattr(module, "config", None), "tie_word_embeddings", False):
        # tied to the input embeddings when the model is built (a meta module may not be tied yet)
        ignore += [re.compile(rf"^{re.escape(k)}$") for k in (getattr(module, "_tied_weights_keys", None) or [])]
    ties = _tie_groups(module)

    def found(key: str) -> bool:
        candidates = [key]
        if prefix:
            candidates += [key[len(prefix) + 1:]] if key.startswith(prefix + ".") else [f"{prefix}.{key}"]
        return any(c in present for c in candidates)

    missing = []
    for key in module.state_dict():
        if any(found(k) for k in ties.get(key, [key])) or any(p.search(key) for p in ignore):
            continue
        missing.append(key)
    return missing
