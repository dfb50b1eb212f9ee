"""FusionBench model pools: coercion and entry checks, loading one model with errors that name it, and the
pretrained model as an ``nn.Module`` even from a lazy pool."""

from __future__ import annotations

import logging
import os
import re
from copy import deepcopy
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Sequence

from torch import Tensor, nn

from .keys import missing_checkpoint_keys, tied_aliases, unique_storage_keys
from .paths import looks_like_local_path
from .safetensors_state import SAFETENSORS_FILE, SAFETENSORS_INDEX, CheckpointError, SafetensorsState

log = logging.getLogger(__name__)

__all__ = [
    "OFFLINE_BENCHMARK_HINT",
    "HubUnreachableError",
    "as_modelpool",
    "check_taskpool_paths",
    "taskpool_config",
    "check_checkpoint_keys",
    "check_pool_entries",
    "finetuned_model_names",
    "load_model",
    "load_pretrained_model",
    "local_checkpoint",
    "materialize",
    "offline_benchmark_hint",
    "pool_input_paths",
]


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


def pool_input_paths(modelpool) -> List[str]:
    """The local paths a run reads: every model entry's path (a string, or a config's
    ``pretrained_model_name_or_path``/``path``) and the pool's ``tokenizer``/``processor`` when they are
    paths, those that exist (hub ids are left out)."""
    models = getattr(modelpool, "_models", None) or {}
    entries = [models[name] for name in (models.keys() if hasattr(models, "keys") else [])]
    entries += [getattr(modelpool, attr, None) for attr in ("tokenizer", "_processor", "processor")]
    paths = [path for entry in entries for path in _entry_paths(entry)]
    return sorted({path for path in paths if looks_like_local_path(path) and os.path.exists(path)})


_CONFIG_PATH_KEYS = ("pretrained_model_name_or_path", "path", "root", "clip_model", "processor")


def _config_paths(config) -> Iterator[str]:
    """Local path strings a task pool config names (``clip_model``, ``processor``, datasets' ``root`` and
    ``root/task``, ``pretrained_model_name_or_path``), recursively; a value that cannot be resolved is skipped."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        try:
            config = OmegaConf.to_container(config, resolve=True)
        except Exception:  # an interpolation that cannot be resolved here: FusionBench reports it itself
            return
    if isinstance(config, Mapping):
        for key, value in config.items():
            if key in _CONFIG_PATH_KEYS and isinstance(value, str) and looks_like_local_path(value):
                yield value
                if key == "root" and isinstance(config.get("task"), str):
                    yield str(Path(value) / config["task"])
            else:
                yield from _config_paths(value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            yield from _config_paths(value)


def taskpool_config(taskpool) -> Optional[Mapping]:
    """A task pool's configuration (``test_datasets``, ``clip_model``, ...): a mapping as it is, an instantiated
    FusionBench pool's public ``config``; ``None`` for an object without one."""
    if isinstance(taskpool, Mapping):
        return taskpool
    try:
        config = taskpool.config
    except Exception:  # not a FusionBench pool, or one whose values OmegaConf cannot hold
        return None
    return config if isinstance(config, Mapping) else None


def check_taskpool_paths(taskpool, what: str) -> None:
    """Raise a ``FileNotFoundError`` naming ``what`` for the first local path of a task pool (a config, or a
    FusionBench ``CLIPVisionModelTaskPool`` before its setup) that does not exist, with the offline benchmark's
    build command when it lies there (:func:`offline_benchmark_hint`), instead of transformers' hub message
    when the pool is set up."""
    taskpool = taskpool_config(taskpool)
    if taskpool is None:
        return
    tasks = taskpool.get("test_datasets")
    num_tasks = len(tasks) if isinstance(tasks, Mapping) else 0
    for path in _config_paths(taskpool):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{what}: local path {path} does not exist{offline_benchmark_hint(path, num_tasks)}; otherwise fix "
                "the task pool config"
            )


def offline_benchmark_hint(path: str, num_tasks: int) -> str:
    """For a missing ``path`` inside an offline benchmark suite's layout (``<root>/<suite>/...``, e.g.
    ``tiny_clip``): the exact ``fusion-bench-tsv-build`` command that makes it; ``""`` for any other path."""
    from ..benchmark.build import DEFAULT_SUITE, SUITES, default_root

    suite = next((p for p in list(Path(path).parents)[:3] if p.name in SUITES), None)
    if suite is None:
        return ""
    root = suite.parent
    command = f"fusion-bench-tsv-build --num-tasks {num_tasks}"
    if suite.name != DEFAULT_SUITE:
        command += f" --suite {suite.name}"
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


_SIZE_MISMATCH = re.compile(r"size mismatch for ([^:\s]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")
_LOAD_STATE_DICT = re.compile(r"Error\(s\) in loading state_dict for (\w+):")


def _state_dict_mismatch(error: BaseException) -> Optional[str]:
    """For torch's ``load_state_dict`` error (anywhere in the chain): the model class and, for each parameter of
    another shape, its name and both shapes, e.g. ``Linear: parameter 'weight' has shape (3, 4) in the
    checkpoint, (2, 4) in the model``; the other lines (missing or unexpected keys) as torch gives them."""
    for e in _exception_chain(error):
        text = str(e)
        found = _LOAD_STATE_DICT.search(text)
        if found is None:
            continue
        shape = lambda dims: tuple(int(d) for d in dims.split(",") if d.strip())  # noqa: E731
        details = [f"parameter '{key}' has shape {shape(ckpt)} in the checkpoint, {shape(model)} in the model"
                   for key, ckpt, model in _SIZE_MISMATCH.findall(text)]
        details += [line.strip() for line in text[found.end():].splitlines()
                    if line.strip() and "size mismatch" not in line and "You may consider" not in line]
        shown = "; ".join(details[:8]) + (f"; and {len(details) - 8} more" if len(details) > 8 else "")
        return f"the checkpoint does not fit the model {found.group(1)}: {shown}"
    return None


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
        raise CheckpointError(f"model '{name}': cannot load {where}: {_state_dict_mismatch(e) or _first_line(e)}") from e
    module = _reference_module(model)
    if module is not None and not isinstance(_pool_entry(modelpool, name), nn.Module):  # not the caller's instance
        if directory is None:
            directory = _checkpoint_dir(getattr(module, "name_or_path", None))
            header = SafetensorsState(directory, name) if directory is not None else None
        if directory is not None:
            check_checkpoint_keys(module, directory, name, allow_missing_keys, header)
    return model


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
