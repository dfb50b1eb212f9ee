"""Stream fine-tuned models out of a FusionBench modelpool, one at a time, and validate them.

Shared by every algorithm of the package: TSV-M, TSV-C and STI all see the task vectors
``Δᵢ = θᵢ − θ₀`` one model at a time, layer by layer, and never hold T models in memory.
"""

from __future__ import annotations

import fnmatch
import gc
import logging
import os
import re
from copy import deepcopy
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .paths import looks_like_local_path
from .safetensors_state import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    CheckpointError,
    SafetensorsState,
    check_tensor_finite,
)

log = logging.getLogger(__name__)

StateDict = Dict[str, Tensor]

DEFAULT_EXCLUDE_KEYS = ("*text_projection*",)
"""Parameters averaged (TSV-M) or kept in full (TSV-C) instead of decomposed: the reference excludes text_projection."""

LLM_EXCLUDE_KEYS = ("*embed_tokens*", "*lm_head*", "*text_projection*")
"""The defaults of the causal-LM configs (``tsv_merge_llm`` ...): vocabulary-sized token embeddings and
``lm_head`` are averaged (TSV-M) / kept in full (TSV-C) / not analysed (STI) instead of decomposed."""

__all__ = [
    "OFFLINE_BENCHMARK_HINT",
    "CheckpointError",
    "HubUnreachableError",
    "as_modelpool",
    "check_checkpoint_keys",
    "check_pool_entries",
    "finetuned_model_names",
    "DEFAULT_EXCLUDE_KEYS",
    "LLM_EXCLUDE_KEYS",
    "StateDict",
    "check_compatible",
    "check_finite",
    "is_excluded",
    "iter_finetuned_states",
    "iter_layers",
    "load_model",
    "load_pretrained_model",
    "local_checkpoint",
    "materialize",
    "missing_checkpoint_keys",
    "open_lazy_states",
    "split_keys",
    "state_dict_of",
    "tied_aliases",
    "unique_storage_keys",
    "SafetensorsState",
]


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


def finetuned_model_names(modelpool, purpose: str, minimum: int = 1) -> List[str]:
    """The fine-tuned models' names, or a ``ValueError`` when the pool has fewer than ``minimum`` of them."""
    names = list(modelpool.model_names)
    if not names:
        raise ValueError(f"the modelpool has no fine-tuned models to {purpose} (only '_pretrained_' or nothing)")
    if len(names) < minimum:
        raise ValueError(f"{purpose} needs at least {minimum} fine-tuned models in the modelpool, got {len(names)}: {names}")
    return names


OFFLINE_BENCHMARK_HINT = (
    "Without network, point the modelpool at local checkpoint directories, or use the offline benchmark: "
    "build it with `fusion-bench-tsv-build --num-tasks 8`, then run with "
    "`modelpool=CLIPVisionModelPool/tiny_clip_8 taskpool=CLIPVisionModelTaskPool/tiny_clip_8`"
)


class HubUnreachableError(ConnectionError):
    """A model named by a hub id could not be fetched: the hub is offline or unreachable and the model is not
    in the local cache."""


def as_modelpool(modelpool, method: str):
    """``modelpool`` as a FusionBench ``BaseModelPool`` (a dict ``{name: model}`` is wrapped), checked for
    what every algorithm of the package needs before it loads anything: a ``_pretrained_`` entry, and local
    paths that exist (:func:`check_pool_entries`). ``method`` names the algorithm in the errors."""
    from fusion_bench import BaseModelPool

    if not isinstance(modelpool, BaseModelPool):
        if not isinstance(modelpool, Mapping):
            raise TypeError(
                f"{method}: expected a FusionBench modelpool or a dict {{name: model}}, got {type(modelpool).__name__}"
            )
        modelpool = BaseModelPool(dict(modelpool))
    if not modelpool.has_pretrained:
        raise ValueError(
            f"{method} needs the pretrained model under the key '_pretrained_' of the modelpool, e.g. "
            "{'_pretrained_': pretrained_model, 'task_a': finetuned_a, 'task_b': finetuned_b} "
            "(in YAML: models: {_pretrained_: <path or hub id>, task_a: <path or hub id>, ...}); "
            f"the modelpool has {list(modelpool._models)}"
        )
    check_pool_entries(modelpool)
    return modelpool


_PATH_KEYS = ("pretrained_model_name_or_path", "path")


def _entry_paths(entry, keys: Sequence[str] = _PATH_KEYS) -> List[str]:
    """The path strings a pool entry names: the entry itself, or the ``keys`` of a config (``_target_`` ...)."""
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, Mapping):
        return [v for k in keys if isinstance(v := entry.get(k), str)]
    return []


def check_pool_entries(modelpool) -> None:
    """Raise a ``FileNotFoundError`` naming the model for an entry that is meant as a local path
    (:func:`~.paths.looks_like_local_path`) and does not exist. Hub ids are left to the loader."""
    models = modelpool._models
    names = list(models.keys()) if hasattr(models, "keys") else []
    for name in names:
        for path in _entry_paths(models[name]):
            if looks_like_local_path(path) and not os.path.exists(path):
                hint = " ('~' is not expanded: write the full path)" if path.startswith("~") else ""
                hint += offline_benchmark_hint(path, len([n for n in names if n != "_pretrained_"]))
                raise FileNotFoundError(
                    f"model '{name}': local path {path} does not exist{hint}; otherwise fix the modelpool entry "
                    f"(modelpool.models.{name}=<checkpoint directory or hub id>)"
                )


def offline_benchmark_hint(path: str, num_tasks: int) -> str:
    """For a missing ``path`` inside the offline benchmark's layout (``<root>/tiny_clip/...``): the exact
    ``fusion-bench-tsv-build`` command that makes it; ``""`` for any other path."""
    from .benchmark.build import default_root

    suite = next((p for p in list(Path(path).parents)[:3] if p.name == "tiny_clip"), None)
    if suite is None:
        return ""
    root = suite.parent
    command = f"fusion-bench-tsv-build --num-tasks {num_tasks}"
    if os.path.realpath(root) != os.path.realpath(default_root()):
        command += f" --root {root}"
    state = "is not built" if not (suite / "build.json").is_file() else f"was built with fewer than {num_tasks} tasks"
    return f"; the offline benchmark at {suite} {state}: run `{command}`"


def _pool_entry(modelpool, name: str):
    models = modelpool._models
    return models.get(name) if hasattr(models, "get") else None


def _entry_path(modelpool, name: str, keys: Sequence[str] = _PATH_KEYS) -> Optional[str]:
    """The path or hub id a pool entry names (a string, or a config's ``pretrained_model_name_or_path``/``path``)."""
    return next(iter(_entry_paths(_pool_entry(modelpool, name), keys)), None)


def _checkpoint_of(modelpool, name: str) -> Optional[Path]:
    """The local ``from_pretrained`` directory of a pool entry (a string, or a config's
    ``pretrained_model_name_or_path``) when it holds safetensors weights."""
    return _checkpoint_dir(_entry_path(modelpool, name, keys=("pretrained_model_name_or_path",)))


def _hub_id(modelpool, name: str) -> Optional[str]:
    path = _entry_path(modelpool, name)
    return path if path is not None and not looks_like_local_path(path) else None


def _exception_chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


_OFFLINE_MARKERS = ("offline", "outgoing traffic has been disabled", "connection", "max retries exceeded",
                    "name resolution", "failed to resolve", "timed out", "network is unreachable")


def _hub_unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it chains) says the hub could not be reached."""
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "ConnectError",
             "Timeout", "ReadTimeout", "ProxyError"}
    for e in _exception_chain(error):
        if any(t.__name__ in names for t in type(e).__mro__):
            return True
        if isinstance(e, (OSError, ValueError)) and any(m in str(e).lower() for m in _OFFLINE_MARKERS):
            return True
    return False


def _first_line(error: BaseException, limit: int = 600) -> str:
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _checkpoint_dir(path: Optional[str]) -> Optional[Path]:
    """``path`` when it is a local directory holding ``model.safetensors`` or its sharded index."""
    if not isinstance(path, str) or not os.path.isdir(path):
        return None
    directory = Path(path)
    if (directory / SAFETENSORS_FILE).is_file() or (directory / SAFETENSORS_INDEX).is_file():
        return directory
    return None


def _reference_module(model) -> Optional[nn.Module]:
    if isinstance(model, nn.Module):
        return model
    meta = getattr(model, "meta_module", None)  # FusionBench's LazyStateDict
    return meta if isinstance(meta, nn.Module) else None


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


def check_checkpoint_keys(
    module: nn.Module, directory: os.PathLike, name: str, allow_missing_keys: bool = False,
    header: Optional[SafetensorsState] = None,
) -> List[str]:
    """Refuse a local safetensors checkpoint that lacks parameters of the model it is loaded into.

    ``from_pretrained`` fills such parameters with random values and goes on; with
    ``allow_missing_keys=False`` this raises a :class:`CheckpointError` naming the model, the directory and
    the keys; with ``True`` it logs a warning. Only the file headers are read (``header``, when given, is
    that checkpoint's :class:`SafetensorsState`). Returns the missing keys.
    """
    header = SafetensorsState(directory, name) if header is None else header
    missing = missing_checkpoint_keys(module, header)
    if missing:
        shown = f"{missing[:8]}{' ...' if len(missing) > 8 else ''}"
        if not allow_missing_keys:
            raise CheckpointError(
                f"model '{name}': the checkpoint {directory} lacks {len(missing)} parameter(s) of "
                f"{type(module).__name__}: {shown}; loading it would fill them with random values. Use a complete "
                "checkpoint, or set the method's option allow_missing_keys=true to accept random values"
            )
        log.warning(
            f"model '{name}': the checkpoint {directory} lacks {len(missing)} parameter(s), which hold random "
            f"values (allow_missing_keys=true): {shown}"
        )
    return missing


def load_model(modelpool, name: str, allow_missing_keys: bool = False):
    """``modelpool.load_model(name)``, with errors that name the model and what to do, and the checkpoint's
    keys checked against the model (:func:`check_checkpoint_keys`).

    - a local safetensors checkpoint whose header cannot be read: a :class:`CheckpointError` naming the
      model and the file, before the pool is asked to load it;
    - a hub id while the hub is offline or unreachable: a :class:`HubUnreachableError` naming the model and
      the repository, with the original one-line cause and a pointer to the offline benchmark (the long
      chain of hub exceptions is dropped);
    - any other failure of the pool's loader: a :class:`CheckpointError` naming the model and the entry,
      the original exception as its ``__cause__``.

    The keys are checked for local checkpoint directories and for hub models cached as safetensors
    (``model.name_or_path``).
    """
    directory = _checkpoint_of(modelpool, name)
    header = SafetensorsState(directory, name) if directory is not None else None
    try:
        model = modelpool.load_model(name)
    except (MemoryError, CheckpointError, HubUnreachableError):
        raise
    except Exception as e:
        hub_id = _hub_id(modelpool, name)
        if hub_id is not None and _hub_unreachable(e):
            offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else ""
            raise HubUnreachableError(
                f"model '{name}': cannot load '{hub_id}' from the Hugging Face hub: it is offline or unreachable"
                f"{offline} and the model is not in the local cache. Cause: {_first_line(e).rstrip('.')}. "
                + OFFLINE_BENCHMARK_HINT
            ) from None
        where = directory or _entry_path(modelpool, name) or "its modelpool entry"
        raise CheckpointError(f"model '{name}': cannot load {where}: {_first_line(e)}") from e
    module = _reference_module(model)
    if module is not None and not isinstance(_pool_entry(modelpool, name), nn.Module):  # not the caller's instance
        if directory is None:
            directory = _checkpoint_dir(getattr(module, "name_or_path", None))
            header = SafetensorsState(directory, name) if directory is not None else None
        if directory is not None:
            check_checkpoint_keys(module, directory, name, allow_missing_keys, header)
    return model


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


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Streaming allocates and frees one model's worth of large tensors per model; glibc keeps freed
    blocks in the heap (its mmap threshold grows up to 32 MiB), so without trimming the resident set
    grows with fragmentation although the live data does not.
    """
    gc.collect()
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


def local_checkpoint(modelpool, name: str, lazy: bool = False) -> Optional[Path]:
    """The local checkpoint directory of ``name`` when it may be read lazily, else None (use ``load_model``).

    A ``CLIPVisionModelPool`` entry that is a local directory, when ``lazy``; a ``CausalLMPool`` entry
    (a path, or a config with ``pretrained_model_name_or_path``) that is a local directory, when ``lazy``
    or the pool's ``enable_lazy_loading``. The directory must hold ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``.
    """
    try:
        from fusion_bench.modelpool import CausalLMPool, CLIPVisionModelPool
    except ImportError:  # pragma: no cover
        return None
    if isinstance(modelpool, CausalLMPool):
        allowed = lazy or bool(getattr(modelpool, "enable_lazy_loading", False))
    else:
        allowed = lazy and isinstance(modelpool, CLIPVisionModelPool)
    if not allowed:
        return None
    return _checkpoint_of(modelpool, name)


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


def materialize(lazy: Mapping[str, Tensor], name: str = "_pretrained_", reader: Optional[Mapping[str, Tensor]] = None) -> nn.Module:
    """An ``nn.Module`` holding a FusionBench ``LazyStateDict``'s weights (peak: one model + one tensor).

    The module is a copy of its ``meta_module`` allocated on the CPU (as ``simple_average`` does), its
    non-persistent buffers (e.g. rotary ``inv_freq``, real tensors in the meta module) copied over, and
    every state-dict entry read from ``reader`` (default: ``lazy`` itself) one tensor at a time.
    """
    meta = getattr(lazy, "meta_module", None)
    if not isinstance(meta, nn.Module):
        raise ValueError(f"model '{name}': a lazy state dict without a model class cannot be made into a model")
    model = deepcopy(meta).to_empty(device="cpu")
    if hasattr(model, "tie_weights"):  # a meta module built under init_empty_weights may come untied
        model.tie_weights()
    for key, buffer in meta.named_buffers():
        if not buffer.is_meta:
            model.get_buffer(key).copy_(buffer)
    state = model.state_dict()
    reader = lazy if reader is None else reader
    aliases = tied_aliases(state, reader)
    for key in unique_storage_keys(state, state):
        state[key].copy_(reader[aliases.get(key, key)])
    return model


def load_pretrained_model(modelpool, allow_missing_keys: bool = False) -> nn.Module:
    """``modelpool.load_pretrained_model()`` through :func:`load_model` (errors naming the model, checkpoint
    keys checked), as an ``nn.Module`` even from a lazy pool.

    A ``LazyStateDict`` (``CausalLMPool(enable_lazy_loading=True)``) is materialized (:func:`materialize`),
    reading a local checkpoint through :class:`SafetensorsState`.
    """
    model = load_model(modelpool, "_pretrained_", allow_missing_keys)
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, Mapping):
        raise TypeError(f"model '_pretrained_': expected an nn.Module or a state dict, got {type(model).__name__}")
    path = local_checkpoint(modelpool, "_pretrained_", lazy=True)
    reader = None
    if path is not None and isinstance(getattr(model, "meta_module", None), nn.Module):
        skeleton = model.meta_module.state_dict()
        reader = SafetensorsState(path, "_pretrained_", skeleton)
    return materialize(model, "_pretrained_", reader)


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
