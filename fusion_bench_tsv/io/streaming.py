"""Stream the fine-tuned models of a FusionBench modelpool, one at a time or layer by layer.

Shared by every algorithm of the package: TSV-M, TSV-C and STI all see the task vectors
``Δᵢ = θᵢ − θ₀`` one model at a time, layer by layer, and never hold T models in memory.
"""

from __future__ import annotations

import gc
import logging
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .keys import StateDict, check_compatible, check_finite, state_dict_of, tied_aliases
from .modelpool import load_model, local_checkpoint
from .safetensors_state import SafetensorsState

log = logging.getLogger(__name__)

__all__ = ["iter_finetuned_states", "iter_layers", "open_lazy_states", "release_memory", "stored_dtype"]


def stored_dtype(state: Mapping[str, Tensor], key: str) -> torch.dtype:
    """The dtype ``state[key]`` is stored in, without reading a lazily read tensor: the checkpoint's (its
    safetensors header) for a :class:`SafetensorsState`, else the tensor's own (a loaded model's parameter)."""
    return state.stored_dtype(key) if isinstance(state, SafetensorsState) else state[key].dtype

def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Streaming allocates and frees one model's worth of large tensors per model; glibc keeps freed
    blocks in the heap (its mmap threshold grows up to 32 MiB), so without trimming the resident set
    grows with fragmentation although the live data does not.
    """
    gc.collect()
    # measured, TSV-M lazy_loading=false, ViT-B/32, T=8: peak RSS 3.15/3.18 GB with malloc_trim, 3.62 without
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _lazy_state(modelpool, name: str, reference: Mapping[str, Tensor], lazy: bool = False) -> Optional[SafetensorsState]:
    path = local_checkpoint(modelpool, name, lazy)
    if path is None:
        return None
    state = SafetensorsState(path, name, reference)
    aliases = tied_aliases(reference, state)
    state = SafetensorsState(path, name, reference, aliases) if aliases else state
    # only when the files hold exactly the model's parameters (no renamed or missing buffers)
    if set(state) != set(reference):  # load_model refuses missing keys, or accepts them with allow_missing_keys
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
    allow_missing_keys: bool = False,
) -> Iterator[Tuple[int, str, StateDict]]:
    """Yield ``(index, name, state_dict)`` for each fine-tuned model of ``modelpool``, one at a time.

    Each model is checked against ``reference`` (names, shapes) and for NaN/Inf before it is
    yielded, and released before the next one is loaded, so that one fine-tuned model is resident
    at a time. ``profile`` is an optional ``SimpleProfilerMixin.profile`` used to time the loading.

    ``lazy=True`` (or a ``CausalLMPool`` with ``enable_lazy_loading``): where the pool allows (an entry
    that is a local directory whose ``model.safetensors``, or shards, hold exactly the reference's keys,
    tied weights aliased; see :func:`local_checkpoint`), yield a :class:`SafetensorsState` instead of
    building the model: names and shapes are checked from the file header before it is
    yielded, each tensor is read (and checked for NaN/Inf) when it is accessed, so at most the
    tensors the caller keeps are resident. Other models are loaded with ``modelpool.load_model``
    (:func:`load_model`: a checkpoint lacking parameters of the model is refused unless ``allow_missing_keys``).
    """
    names = list(modelpool.model_names)
    for index, name in enumerate(tqdm(names, desc=desc, disable=not show_pbar, dynamic_ncols=True)):
        state = _lazy_state(modelpool, name, reference, lazy)
        if state is not None:
            check_compatible(reference, state, name)
            yield index, name, state
            del state
            release_memory()
            continue
        if profile is not None:
            with profile("load model"):
                model = load_model(modelpool, name, allow_missing_keys)
        else:
            model = load_model(modelpool, name, allow_missing_keys)
        state = state_dict_of(model)
        check_compatible(reference, state, name)
        check_finite(state, name)
        yield index, name, state
        del model, state
        release_memory()


def open_lazy_states(
    modelpool, reference: Mapping[str, Tensor], lazy: bool = False
) -> Optional[List[Tuple[str, SafetensorsState]]]:
    """``[(name, SafetensorsState)]`` for every fine-tuned model, checked against ``reference`` (names,
    shapes, from the headers), when all of them can be read lazily (see :func:`iter_finetuned_states`);
    None otherwise. Nothing but the headers is read."""
    states = []
    for name in modelpool.model_names:
        state = _lazy_state(modelpool, name, reference, lazy)
        if state is None:
            return None
        check_compatible(reference, state, name)
        states.append((name, state))
    return states


def iter_layers(
    states: Sequence[Tuple[str, Mapping[str, Tensor]]],
    keys: Sequence[str],
    *,
    desc: str = "layers",
    show_pbar: bool = True,
) -> Iterator[Tuple[str, Iterator[Tensor]]]:
    """The layer-outer loop over lazily read models: yield ``(key, values)`` for each of ``keys``, where
    ``values`` reads ``state[key]`` of each model in order, one at a time, as it is iterated.

    What the caller keeps of one layer (T tensors, or T factors) is all that is resident besides its own
    result: peak memory is about one layer × T, not T models.
    """
    for key in tqdm(keys, desc=desc, disable=not show_pbar, dynamic_ncols=True):
        yield key, (state[key] for _, state in states)
