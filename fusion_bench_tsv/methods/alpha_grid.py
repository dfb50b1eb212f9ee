"""TSV-M's α chosen on validation tasks (options ``alpha_grid`` and ``validation_taskpool``).

With a scalar α the merged update ``M = U⊥ΣV⊥ᵀ`` does not depend on α, so the grid costs one merge and
one validation pass per α: :class:`UpdateMerge` makes the merge job return ``M`` itself (kept in the
compute dtype, float32 or float64, on θ₀'s device), :func:`run_alpha_grid` forms ``θ₀ + α·M`` in place
in the model for each α (with :func:`~fusion_bench_tsv.runtime.merge_job.add_scaled`, the merge job's own
formula), evaluates it with the validation task pool, and leaves the model at the best α: the highest
finite average accuracy (a NaN or infinite score is logged and ignored wherever it is in the grid; a grid
without any finite score is an error naming the pool); ties: the smaller α, the smaller change to θ₀. The
returned model has the dtype and device of each of its parameters and buffers before validation, whatever
the task pool did to it (e.g. ``.half()`` or a move to its own device). Memory: ``M`` and a copy of θ₀'s
floating parameters, about two models beside the returned one. :func:`write_outputs` writes
``alpha_grid.json`` and ``alpha_grid.png``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..functional import compute_dtype
from ..io.keys import state_dict_of
from ..io.modelpool import check_taskpool_paths, taskpool_config
from ..io.outputs import output_dir, write_output_dir
from ..runtime.merge_job import ParameterMerge, add_scaled
from ..runtime.timing import timed

log = logging.getLogger(__name__)

__all__ = ["OUTPUT_NAME", "UpdateMerge", "best_point", "load_taskpool", "open_alpha_grid", "run_alpha_grid", "validation_accuracy", "write_outputs"]

OUTPUT_NAME = "alpha_grid"
"""The directory in the run's log dir that holds ``alpha_grid.json`` and ``alpha_grid.png``."""


class UpdateMerge(ParameterMerge):
    """The merge job's per-parameter merge returning the merged update ``M`` (unscaled, not added to θ₀),
    in ``compute_dtype(θ₀.dtype)`` on θ₀'s device."""

    def merged(self, theta0: Tensor, acc) -> Tensor:
        with timed(self.timer, "merge"):
            return self.update(acc).to(theta0.device, compute_dtype(theta0.dtype))


def _available_val_configs() -> List[str]:
    """Task pool configs named ``*_val`` on the search path of the initialized Hydra, for error hints."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    loader = GlobalHydra.instance().config_loader()
    names = []
    for group in ["", *loader.get_group_options("taskpool", results_filter=ObjectType.GROUP)]:
        path = f"taskpool/{group}".rstrip("/")
        names += [f"{group}/{n}".lstrip("/") for n in loader.get_group_options(path, results_filter=ObjectType.CONFIG)
                  if n.endswith("_val")]
    return sorted(names)


def _suggested_val_pool() -> str:
    """The ``_val`` task pool config named like the run's ``taskpool=`` (or ``modelpool=``) choice of the CLI,
    when there is one (an offline pool's own validation pool); FusionBench's TA8 one otherwise."""
    fallback = "CLIPVisionModelTaskPool/clip-vit-classification_TA8_val"
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return fallback
        choices = HydraConfig.get().runtime.choices
        available = set(_available_val_configs())
    except Exception:  # no Hydra run, or its config loader is not available: the generic example
        return fallback
    candidates = [f"{choices.get('taskpool')}_val"]
    modelpool = str(choices.get("modelpool") or "")
    candidates.append("CLIPVisionModelTaskPool/" + modelpool.split("/")[-1].removesuffix("_model_only") + "_val")
    return next((c for c in candidates if c in available), fallback)


def _compose_taskpool(name: str):
    """The task pool config ``name`` (``taskpool=<name>`` of the CLI), composed with Hydra: with the running
    CLI's search path when Hydra is initialized, else from the config directory the CLI would use."""
    from fusion_bench.utils.hydra_utils import get_default_config_path
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    def composed():
        try:
            return compose(overrides=[f"+taskpool={name}"]).taskpool
        except HydraException as e:
            raise ValueError(
                f"TSVMergeAlgorithm: option 'validation_taskpool'={name!r} is not a task pool config "
                f"({type(e).__name__}: {str(e).splitlines()[0]}); validation task pools found: "
                f"{', '.join(_available_val_configs())}"
            ) from None

    if GlobalHydra.instance().is_initialized():
        return composed()
    with initialize_config_dir(config_dir=get_default_config_path(), version_base=None):
        return composed()


def open_alpha_grid(alpha_grid: Optional[Sequence[float]], validation_taskpool: Any, alpha: Any, fabric,
                    log_dir: Optional[str]) -> tuple[Any, Optional[Path]]:
    """With ``alpha_grid``: refuse what cannot work before anything is computed; return the validation task
    pool (instantiated, not set up) and the output directory (None without a log dir). ``(None, None)``
    without a grid."""
    if not alpha_grid:
        return None, None
    if validation_taskpool is None:
        raise ValueError(
            "TSVMergeAlgorithm: option 'alpha_grid' needs option 'validation_taskpool', the task pool that "
            f"chooses alpha, e.g. method.validation_taskpool={_suggested_val_pool()}"
        )
    if fabric.world_size > 1:
        raise ValueError(
            f"TSVMergeAlgorithm: option 'alpha_grid' runs in one process; this Fabric run has "
            f"{fabric.world_size}: run it with fabric.devices=1, or give a single alpha"
        )
    if not isinstance(alpha, (list, tuple)) and alpha not in (None, 1.0):
        log.warning(f"TSV-M: option 'alpha'={alpha} is ignored: alpha_grid chooses alpha")
    out_dir = None
    if log_dir is not None:
        out_dir = output_dir(f"{{log_dir}}/{OUTPUT_NAME}", log_dir, OUTPUT_NAME, "TSV-M", option="alpha_grid")
    return load_taskpool(validation_taskpool, fabric), out_dir


def load_taskpool(spec: Any, fabric) -> Any:
    """The task pool ``spec`` names (a config name, a config with ``_target_``, or a task pool), set up to run
    on ``fabric``'s device without its loggers (FusionBench's task pools write ``report.json`` into the
    log dir of a Fabric with loggers: the validation passes must not take the test report's name)."""
    from fusion_bench import instantiate
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, str):
        spec = _compose_taskpool(spec)
    check_taskpool_paths(spec, "TSVMergeAlgorithm: option 'validation_taskpool'")
    if isinstance(spec, Mapping):
        config = spec if isinstance(spec, DictConfig) else OmegaConf.create(dict(spec))
        taskpool = instantiate(config, _recursive_=config.get("_recursive_", False))
    else:
        taskpool = spec
    if hasattr(taskpool, "_fabric_instance") and fabric is not None:
        quiet = copy.copy(fabric)
        quiet._loggers = []
        taskpool._fabric_instance = quiet
    return taskpool


def validation_accuracy(report: Mapping[str, Any]) -> tuple[float, Dict[str, float]]:
    """The average accuracy of a FusionBench task pool report and the accuracy of each task."""
    average = report.get("average", {}).get("accuracy") if isinstance(report.get("average"), Mapping) else None
    if average is None:
        raise ValueError(
            f"TSVMergeAlgorithm: the validation task pool's report has no average accuracy "
            f"(report['average']['accuracy']); its keys: {list(report)}. Give a task pool that reports accuracy"
        )
    per_task = {k: float(v["accuracy"]) for k, v in report.items()
                if k != "average" and isinstance(v, Mapping) and "accuracy" in v}
    return float(average), per_task


def _set_alpha(model: nn.Module, theta0: Mapping[str, Tensor], updates: Mapping[str, Tensor], alpha: float) -> None:
    """Write ``θ₀ + α·M`` into ``model``'s parameters (wherever the task pool moved them)."""
    current = state_dict_of(model)
    for key, update in updates.items():
        current[key].copy_(add_scaled(theta0[key], update, alpha))


def _layout(model: nn.Module) -> Dict[tuple, tuple]:
    """(module name, tensor name, is a parameter) -> (dtype, device) of every parameter and buffer."""
    return {(m, n, n in module._parameters): (t.dtype, t.device) for m, module in model.named_modules()
            for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}


def _restore_layout(model: nn.Module, layout: Mapping[tuple, tuple]) -> None:
    """Put every parameter and buffer back in the dtype and on the device of ``layout`` (:func:`_layout`)."""
    modules = dict(model.named_modules())
    for (m, n, is_parameter), (dtype, device) in layout.items():
        module = modules[m]
        tensor = (module._parameters if is_parameter else module._buffers).get(n)
        if tensor is None or (tensor.dtype, tensor.device) == (dtype, device):
            continue
        if is_parameter:
            tensor.data = tensor.data.to(device=device, dtype=dtype)
        else:
            module._buffers[n] = tensor.to(device=device, dtype=dtype)


def _pool_name(taskpool: Any) -> str:
    tasks = (taskpool_config(taskpool) or {}).get("test_datasets")
    return type(taskpool).__name__ + (f" (tasks {list(tasks)})" if isinstance(tasks, Mapping) else "")


def best_point(curve: Sequence[Mapping[str, Any]], taskpool: Any) -> Mapping[str, Any]:
    """The point of highest finite accuracy (ties: the smaller α); a ``ValueError`` naming the pool when none
    is finite."""
    finite = [point for point in curve if math.isfinite(point["accuracy"])]
    if not finite:
        raise ValueError(
            f"TSVMergeAlgorithm: option 'validation_taskpool': the validation task pool {_pool_name(taskpool)} "
            f"gave no finite average accuracy for any alpha of {[p['alpha'] for p in curve]} "
            f"({[p['accuracy'] for p in curve]}): check that task pool (its data and its report)"
        )
    return max(finite, key=lambda point: (point["accuracy"], -point["alpha"]))


# over ~40 lines only by its docstring (one line per argument)
@torch.no_grad()
def run_alpha_grid(
    model: nn.Module,
    updates: Mapping[str, Tensor],
    grid: Sequence[float],
    taskpool: Any,
    *,
    task_scales: Optional[Sequence[float]] = None,
    profile: Callable[[str], ContextManager] = lambda action: nullcontext(),
) -> Dict[str, Any]:
    """Evaluate ``θ₀ + α·M`` for each α of ``grid`` and leave ``model`` at the best α; the results.

    Args:
        model: θ₀ on entry (its state dict holds θ₀ for every key of ``updates``); the best model on return.
        updates: ``M`` of every merged parameter (one per storage).
        grid: the values of α, in the order they are evaluated.
        taskpool: the validation task pool (``evaluate(model)`` → a report with ``average.accuracy``).
        task_scales: the per-task scales applied before the SVD (option ``alpha`` as a list), recorded.
        profile: a context-manager factory timing ``"evaluate"``.
    """
    base = state_dict_of(model)
    layout = _layout(model)
    # every floating tensor: a task pool that rounds the model (e.g. .half()) must not change what is returned
    theta0 = {key: value.detach().clone() for key, value in base.items() if value.is_floating_point()}
    curve: List[Dict[str, Any]] = []
    for alpha in grid:
        _set_alpha(model, theta0, updates, alpha)
        with profile("evaluate"):
            average, per_task = validation_accuracy(taskpool.evaluate(model))
        if math.isfinite(average):
            log.info(f"TSV-M alpha grid: alpha={alpha:g}: validation accuracy {100 * average:.2f}%")
        else:
            log.warning(f"TSV-M alpha grid: alpha={alpha:g}: validation accuracy {average}: ignored")
        curve.append({"alpha": alpha, "accuracy": average, "per_task": per_task})
    best = best_point(curve, taskpool)
    _restore_layout(model, layout)
    current = state_dict_of(model)
    for key in theta0.keys() - updates.keys():
        current[key].copy_(theta0[key])
    _set_alpha(model, theta0, updates, best["alpha"])
    log.info(f"TSV-M alpha grid: best alpha={best['alpha']:g} (validation accuracy {100 * best['accuracy']:.2f}%)")
    return {
        "method": "TSV-M",
        "selection": "the alpha of highest finite average validation accuracy (NaN/Inf ignored); ties: the smaller alpha",
        "grid": list(grid),
        "task_scales": list(task_scales) if task_scales is not None else None,
        "best": {"alpha": best["alpha"], "accuracy": best["accuracy"], "per_task": best["per_task"]},
        "curve": curve,
    }


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or ±Inf float replaced by ``None`` (JSON has no NaN: ``null`` in the file)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def write_files(out_dir: Path, results: Mapping[str, Any]) -> None:
    """``alpha_grid.json`` and ``alpha_grid.png`` (validation accuracy against α, per task and on average)."""
    from .plots import curves

    (out_dir / "alpha_grid.json").write_text(json.dumps(finite_or_null(results), indent=1, allow_nan=False))
    alphas = [p["alpha"] for p in results["curve"]]
    series = {task: [100 * p["per_task"].get(task, float("nan")) for p in results["curve"]]
              for task in results["curve"][0]["per_task"]}
    best = results["best"]
    fig = curves(
        alphas,
        {"average": [100 * p["accuracy"] for p in results["curve"]]},
        thin=series,
        marker=(best["alpha"], 100 * best["accuracy"]),
        title=f"TSV-M: validation accuracy against alpha (best alpha={best['alpha']:g})",
        xlabel="alpha",
        ylabel="validation accuracy (%)",
    )
    fig.savefig(out_dir / "alpha_grid.png", format="png", dpi=120)


def write_outputs(out_dir: Optional[Path], results: Mapping[str, Any]) -> Optional[Path]:
    """The two files, written together as one directory (:func:`~fusion_bench_tsv.io.outputs.write_output_dir`);
    only a warning when ``out_dir`` is None."""
    if out_dir is None:
        log.warning("TSV-M: no Fabric log directory: the alpha grid's results are only in self.alpha_grid_results")
        return None
    path = write_output_dir(out_dir, lambda tmp: write_files(tmp, results), "TSV-M", option="alpha_grid")
    log.info(f"TSV-M: alpha grid written to {path}")
    return path
