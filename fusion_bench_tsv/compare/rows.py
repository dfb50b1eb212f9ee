"""Rows of a comparison, read from what FusionBench and this package write.

A row is a JSON object: ``method``, ``num_tasks``, ``avg_accuracy`` (mean of the per-task accuracies, %),
``normalized_accuracy`` (:data:`NORMALIZED`, % or None where the fine-tuned accuracies are not known),
``alpha`` (the scale of the merged update, or None), ``per_task`` ({task: accuracy %}); optionally ``source``
(a short name of where the row comes from), ``path``, ``options``, ``seconds`` and ``fine_tuned_from``.

Sources:

- a FusionBench run directory (``fusion_bench …`` writes ``program_report.json`` beside Hydra's
  ``config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, or under ``.hydra/``) or its ``program_report.json``:
  the method from Hydra's config choice (``hydra.runtime.choices.method``, else ``method._target_``), its
  options from the ``method.*`` overrides, α from ``method.alpha`` / ``method.scaling_factor`` or, with
  ``method.alpha_grid``, from ``alpha_grid/alpha_grid.json``; a directory holding runs is searched for them;
- a stored comparison (the JSON list of rows :mod:`.report` writes, e.g. ``benchmarks/results/tiny_clip.json``);
- the ``build.json`` that ``fusion-bench-tsv-build`` writes: the zero-shot and fine-tuned test accuracies
  measured while building.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from ..methods.summary import task_accuracies, task_entries

__all__ = ["NORMALIZED", "METHODS", "REPORT_FILE", "task_accuracies", "normalized_accuracy", "make_row",
           "find_reports", "read_run", "read_results", "read_build", "read_fine_tuned", "normalize"]

NORMALIZED = ("normalized accuracy = mean over tasks of (the task's accuracy / the fine-tuned model's accuracy "
              "on that task), in %")
"""The definition printed with every table (the mean of per-task ratios, not a ratio of averages)."""

METHODS: Dict[str, Tuple[str, Optional[str]]] = {
    "simple_average": ("simple_average", None),
    "task_arithmetic": ("task_arithmetic", "scaling_factor"),
    "ties_merging": ("ties_merging", "scaling_factor"),
    "fusion_bench_tsvm": ("task_singular_vector/TaskSingularVectorMerging", "alpha"),
    "iso_c": ("isotropic_merging/iso_c", "scaling_factor"),
    "iso_cts": ("isotropic_merging/iso_cts", "scaling_factor"),
    "tsv_merge": ("tsv/tsv_merge", "alpha"),
    "tsv_merge_alpha_grid": ("tsv/tsv_merge", None),
    "tsv_compress": ("tsv/tsv_compress", None),
}
"""Name in a comparison → (FusionBench method config, the option that scales the merged update, or None)."""

REPORT_FILE = "program_report.json"


def normalized_accuracy(per_task: Mapping[str, float], fine_tuned: Optional[Mapping[str, float]]) -> Optional[float]:
    """:data:`NORMALIZED`: 100 · mean over tasks t of acc_t / acc_t(fine-tuned); None unless every task has a
    positive fine-tuned accuracy."""
    if not per_task or fine_tuned is None or any(not fine_tuned.get(t) for t in per_task):
        return None
    return 100 * sum(acc / fine_tuned[t] for t, acc in per_task.items()) / len(per_task)


def make_row(method: str, per_task: Mapping[str, float], fine_tuned: Optional[Mapping[str, float]] = None,
             alpha: Optional[float] = None, **extra: Any) -> dict:
    """A row from accuracies given as fractions (stored as %)."""
    return {
        "method": method,
        "num_tasks": len(per_task),
        "avg_accuracy": 100 * sum(per_task.values()) / len(per_task),
        "normalized_accuracy": normalized_accuracy(per_task, fine_tuned),
        "alpha": alpha,
        "per_task": {t: 100 * a for t, a in per_task.items()},
        **extra,
    }


def find_reports(path: Path) -> List[Path]:
    """The ``program_report.json`` files ``path`` names: the file itself, the one of a run directory, or those
    of every run under a directory (``outputs/fabric_model_fusion``)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or directory (give a FusionBench run directory or its {REPORT_FILE})")
    if (path / REPORT_FILE).is_file():
        return [path / REPORT_FILE]
    found = sorted(path.rglob(REPORT_FILE))
    if not found:
        raise ValueError(f"{path} holds no {REPORT_FILE}: a FusionBench run writes one into its run directory when "
                         "it evaluates a task pool (taskpool=…, report_save_path)")
    return found


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read it as {what}: {error}") from None


def _hydra_file(run_dir: Path, name: str) -> Any:
    """Hydra's ``name`` of a run (FusionBench saves them in the run directory itself; Hydra's default is
    ``.hydra/``), parsed; None when absent."""
    for candidate in (run_dir / name, run_dir / ".hydra" / name):
        if candidate.is_file():
            try:  # not OmegaConf.load: same result on 249 run files, 2.2x slower (1.59 s vs 0.72 s)
                return yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as error:
                raise ValueError(f"{candidate}: cannot read the run's Hydra file: {error}") from None
    return None


def _run_alpha(method: Mapping[str, Any], knob: Optional[str], run_dir: Path) -> Optional[float]:
    """α of a run: the best of TSV-M's ``alpha_grid`` (``alpha_grid/alpha_grid.json``), else the scaling option."""
    if method.get("alpha_grid"):
        grid = run_dir / "alpha_grid" / "alpha_grid.json"
        return float(_load_json(grid, "TSV-M's alpha grid results")["best"]["alpha"]) if grid.is_file() else None
    for option in ([knob] if knob else ["alpha", "scaling_factor"]):
        value = method.get(option)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    return None


def _method_name(choice: Optional[str], method: Mapping[str, Any], config: Mapping[str, Any]) -> Tuple[str, Optional[str]]:
    """The comparison's name of a run's method (:data:`METHODS`; ``dummy`` on a pool with ``_pretrained_`` is the
    zero-shot model) and its scaling option."""
    if choice == "dummy" and "_pretrained_" in ((config.get("modelpool") or {}).get("models") or {}):
        return "zero_shot", None
    if choice == "tsv/tsv_merge" and method.get("alpha_grid"):
        return "tsv_merge_alpha_grid", None
    for name, (config_name, knob) in METHODS.items():
        if choice == config_name:
            return name, knob
    if choice:
        return choice, None
    target = str(method.get("_target_", "unknown method"))
    return target.rsplit(".", 1)[-1], None


def read_run(report_path: Path, fine_tuned: Optional[Mapping[str, float]] = None,
             fine_tuned_from: Optional[str] = None) -> dict:
    """The row of one run, from its ``program_report.json`` and the Hydra files beside it; normalized by
    ``fine_tuned`` ({task: fraction}), else by the fine-tuned accuracies the report holds (TSV-C's)."""
    report = _load_json(report_path, "a FusionBench report")
    per_task = task_accuracies(report) if isinstance(report, Mapping) else {}
    if not per_task:
        raise ValueError(f"{report_path}: no per-task accuracies ({{task: {{'accuracy': …}}}}): not the "
                         "program_report.json of a run that evaluated a task pool")
    run_dir = report_path.parent
    config = _hydra_file(run_dir, "config.yaml") or {}
    hydra = _hydra_file(run_dir, "hydra.yaml") or {}
    overrides = _hydra_file(run_dir, "overrides.yaml") or []
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    method = config.get("method") or {}
    name, knob = _method_name(choices.get("method"), method, config)
    row = make_row(
        name, per_task, None, _run_alpha(method, knob, run_dir),
        source=run_dir.name if report_path.name == REPORT_FILE else report_path.name,
        path=str(report_path.resolve()),
        options=[o[len("method."):] for o in overrides if isinstance(o, str) and o.startswith("method.")],
        pools=[p for p in (choices.get("modelpool"), choices.get("taskpool")) if p],
        fine_tuned_from=None,
    )
    if fine_tuned is not None:
        return normalize(row, fine_tuned, fine_tuned_from or "the given fine-tuned accuracies")
    own = _routed_fine_tuned(report)
    return normalize(row, own, "the run's own fine-tuned evaluation") if own is not None else row


def normalize(row: dict, fine_tuned: Mapping[str, float], source: str) -> dict:
    """``row`` with its normalized accuracy by ``fine_tuned`` ({task: fraction}) and ``fine_tuned_from`` set,
    when ``fine_tuned`` covers every task of the row; else ``row`` unchanged."""
    value = normalized_accuracy({t: a / 100 for t, a in row["per_task"].items()}, fine_tuned)
    return row if value is None else {**row, "normalized_accuracy": value, "fine_tuned_from": source}


def read_results(path: Path) -> List[dict]:
    """The rows of a stored comparison (a JSON list of rows), each marked with its source file."""
    rows = _load_json(path, "a comparison (a JSON list of rows)")
    keys = {"method", "num_tasks", "avg_accuracy", "per_task"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and keys <= set(r) for r in rows):
        raise ValueError(f"{path}: not a comparison table (a JSON list of rows with {sorted(keys)}), as "
                         "fusion-bench-tsv-compare writes")
    return [{**r, "source": r.get("source") or path.name, "path": r.get("path") or str(path.resolve())} for r in rows]


def read_build(path: Path) -> Tuple[Dict[str, float], Dict[str, float]]:
    """({task: zero-shot accuracy}, {task: fine-tuned accuracy}) of a benchmark's ``build.json`` (fractions)."""
    build = _load_json(path, "a build.json of fusion-bench-tsv-build")
    tasks = build.get("tasks") if isinstance(build, dict) else None
    if not isinstance(tasks, dict) or not all(isinstance(v, dict) and "fine_tuned_test" in v for v in tasks.values()):
        raise ValueError(f"{path}: not a build.json of fusion-bench-tsv-build (no tasks.<task>.fine_tuned_test)")
    return ({t: float(v["zero_shot_test"]) for t, v in tasks.items() if "zero_shot_test" in v},
            {t: float(v["fine_tuned_test"]) for t, v in tasks.items()})


def _routed_fine_tuned(report: Any) -> Optional[Dict[str, float]]:
    """{task: fine-tuned accuracy} of TSV-C's routed report (its ``program_report.json`` or the full report) when
    it measured every task's, else None."""
    if not (isinstance(report, Mapping) and "routing" in report):
        return None
    own = {t: e.get("finetuned_accuracy") for t, e in task_entries(report).items() if isinstance(e, Mapping)}
    ok = own and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in own.values())
    return {t: float(v) for t, v in own.items()} if ok else None


def read_fine_tuned(path: Path) -> Dict[str, float]:
    """{task: fine-tuned accuracy (fraction)} from a ``build.json``, a stored comparison (its ``fine_tuned``
    rows) or a TSV-C run (its routed report measures each fine-tuned model on its own task)."""
    reports = [path] if path.is_file() else find_reports(path)
    data = _load_json(reports[0], "fine-tuned accuracies") if len(reports) == 1 else None
    if isinstance(data, dict) and isinstance(data.get("tasks"), dict) and "routing" not in data:
        return read_build(path)[1]
    if isinstance(data, list):
        rows = [r for r in read_results(path) if r["method"] == "fine_tuned"]
        if rows:
            return {t: a / 100 for r in rows for t, a in r["per_task"].items()}
    routed = _routed_fine_tuned(data)
    if routed is not None:
        return routed
    raise ValueError(f"{path}: no fine-tuned accuracies: give a build.json (fusion-bench-tsv-build), a comparison "
                     "with fine_tuned rows, or a TSV-C run made with method.evaluate_finetuned=true")
