"""FusionBench's baselines and ours on a benchmark's pools, one row at a time, each row's output to its own log.

Every row goes through FusionBench's program (``FabricModelFusionProgram``), composed by Hydra in-process
exactly as the ``fusion_bench`` CLI composes it from ``method=…``, ``modelpool=…`` and ``taskpool=…`` config
names (any pools: the offline suites ``CLIPVisionModelPool/tiny_clip_8`` …, or the hub's):

- ``zero_shot``: ``method=dummy`` (the pretrained model); ``fine_tuned``: each fine-tuned model on its own
  task (``method=dummy`` on a one-model pool). Both are measured once per (model, test set): a smaller suite
  whose tasks are those of a larger one reuses them.
- the methods of :data:`~.rows.METHODS` with their configs' defaults;
- ``<method>_val_alpha``: α (``scaling_factor`` / ``alpha``) chosen on the validation task pool from the
  grid (the highest finite average accuracy; ties: the α nearest 1), then evaluated once on the test task pool;
- ``tsv_merge_alpha_grid``: TSV-M's built-in grid (``method.alpha_grid``, ``method.validation_taskpool``):
  one merge, α chosen inside the run;
- ``tsv_compress``: TSV-C with oracle routing (task i evaluated with its own θ₀ + Δ̂ᵢ only): a compression,
  not a merge.

Everything a row prints (FusionBench's logs, progress bars, reports) goes to ``<log dir>/<pool>_<row>.log``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .rows import METHODS, make_row, task_accuracies

__all__ = ["ALPHAS", "BASELINES", "Pools", "output_to", "plan", "run_baselines"]

ALPHAS = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
"""The α grid of the ``_val_alpha`` rows: a coarse version of the authors' 0.1…3.0."""
BASELINES = ["zero_shot", "fine_tuned", *METHODS]
METHOD_OVERRIDES: Dict[str, List[str]] = {"tsv_compress": ["method.evaluate_finetuned=false"]}
"""Extra overrides per row: TSV-C's own fine-tuned evaluation is the ``fine_tuned`` row already."""


@dataclasses.dataclass(frozen=True)
class Pools:
    """The config names of one benchmark size: model pool, test task pool, validation task pool (or None),
    and the primary config directory that holds them (None: the one the ``fusion_bench`` CLI would use here)."""

    modelpool: str
    taskpool: str
    validation: Optional[str]
    config_dir: Optional[str] = None

    @property
    def label(self) -> str:
        return self.modelpool.rsplit("/", 1)[-1]


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send everything written to stdout and stderr (``sys.stdout`` / ``sys.stderr`` and file descriptors 1
    and 2: Python, rich, tqdm, C libraries) and every log record of level INFO and above to ``path``
    (appended) for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    root = logging.getLogger()
    level = root.level
    with open(path, "a", encoding="utf-8", buffering=1) as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            log.flush()
            root.removeHandler(handler)
            root.setLevel(level)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def compose(method: str, pools: Pools, overrides: Sequence[str] = (), split: str = "test",
            log_dir: Optional[Path] = None):
    """FusionBench's ``fabric_model_fusion`` config for ``method`` on ``pools`` (the test or validation task
    pool), as the ``fusion_bench`` CLI composes it; a clear error for a config name that does not exist."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException
    from fusion_bench.utils.hydra_utils import get_default_config_path

    taskpool = pools.validation if split == "validation" else pools.taskpool
    config_dir = Path(pools.config_dir or get_default_config_path()).resolve()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return hydra_compose("fabric_model_fusion", overrides=[
                f"method={method}", f"modelpool={pools.modelpool}", f"taskpool={taskpool}", "print_config=false",
                "print_function_call=false", "report_save_path=null", "fabric.loggers=null",
                # ${hydra:...} is unset outside the CLI's @hydra.main
                f"path.log_dir={log_dir or Path.cwd()}", f"path.work_dir={Path.cwd()}", *overrides])
    except MissingConfigException as error:
        raise ValueError(f"{error}: name FusionBench configs that exist (modelpool={pools.modelpool}, "
                         f"taskpool={taskpool}, looked up from {config_dir}, FusionBench's and this package's "
                         "configs)") from None


def run_program(cfg, edit: Optional[Callable[[Any], None]] = None) -> Tuple[Dict[str, float], Any]:
    """Run FusionBench's program of ``cfg`` (after ``edit(cfg)``): ({task: accuracy}, the method instance)."""
    from omegaconf import OmegaConf, open_dict
    from fusion_bench.utils import instantiate

    with open_dict(cfg):
        if edit is not None:
            edit(cfg)
        OmegaConf.resolve(cfg)
    program = instantiate(cfg)
    report = program.run()["report"]
    return task_accuracies(report or {}), program.method


def _entry_key(node) -> str:
    """A stable key of one resolved config entry (a model or a test set)."""
    from omegaconf import OmegaConf

    value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return json.dumps(value, sort_keys=True, default=str)


def _tasks(cfg) -> Dict[str, Tuple[str, Optional[str]]]:
    """{task: (key of the pretrained model and test set, key of its fine-tuned model and test set or None)}."""
    models, tests = cfg.modelpool.models, cfg.taskpool.test_datasets
    pretrained = _entry_key(models["_pretrained_"]) if "_pretrained_" in models else "first model"
    return {t: (pretrained + _entry_key(tests[t]), _entry_key(models[t]) + _entry_key(tests[t]) if t in models else None)
            for t in tests}


def plan(pools: Sequence[Pools], methods: Sequence[str], val_alpha: bool,
         known: Sequence[Tuple[str, str]] = ()) -> List[Tuple[Pools, str]]:
    """The rows to compute, in order: per pool, zero-shot, fine-tuned, then each method and its ``_val_alpha``
    row (methods with a scaling option, when the pool has a validation task pool; ``tsv_merge_alpha_grid``
    too needs one); ``known`` (pool label, row) pairs are left out."""
    rows = []
    first = [m for m in methods if m == "fine_tuned"]  # it normalizes the rows after it
    for p in pools:
        for name in [*first, *(m for m in methods if m != "fine_tuned")]:
            if name == "tsv_merge_alpha_grid" and not p.validation:
                continue
            rows.append((p, name))
            if val_alpha and p.validation and name in METHODS and METHODS[name][1] is not None:
                rows.append((p, f"{name}_val_alpha"))
    return [(p, name) for p, name in rows if (p.label, name) not in set(known)]


class _Runner:
    """The rows of :func:`run_baselines`, with the zero-shot and fine-tuned accuracies shared across pools."""

    def __init__(self, alphas: Sequence[float], log_dir: Path, fine_tuned: Mapping[str, Dict[str, float]]):
        self.alphas = list(alphas)
        self.log_dir = log_dir
        self.measured: Dict[str, float] = {}  # entry key → accuracy
        self.fine_tuned = dict(fine_tuned)  # pool label → {task: accuracy}, known beforehand or measured

    def _cached(self, pools: Pools, index: int, one_model: bool) -> Dict[str, float]:
        cfg = compose("dummy", pools, log_dir=self.log_dir)
        keys = {t: k[index] for t, k in _tasks(cfg).items() if k[index] is not None}
        if not one_model and any(k not in self.measured for k in keys.values()):
            acc, _ = run_program(cfg)
            self.measured.update({keys[t]: a for t, a in acc.items() if t in keys})
        for task, key in keys.items():
            if one_model and key not in self.measured:
                def edit(c, task=task):
                    c.modelpool.models = {"_pretrained_": c.modelpool.models[task]}
                    c.taskpool.test_datasets = {task: c.taskpool.test_datasets[task]}
                acc, _ = run_program(compose("dummy", pools, log_dir=self.log_dir), edit)
                self.measured[key] = acc[task]
        return {t: self.measured[k] for t, k in keys.items()}

    def row(self, pools: Pools, name: str) -> dict:
        fine = self.fine_tuned.get(pools.label)
        if name == "zero_shot":
            return make_row(name, self._cached(pools, 0, one_model=False), fine)
        if name == "fine_tuned":
            fine = self.fine_tuned[pools.label] = self._cached(pools, 1, one_model=True)
            return make_row(name, fine, fine)
        base = name[: -len("_val_alpha")] if name.endswith("_val_alpha") else name
        config, knob = METHODS[base]
        overrides = list(METHOD_OVERRIDES.get(base, []))
        if base == "tsv_merge_alpha_grid":
            overrides += [f"method.alpha_grid=[{','.join(map(str, self.alphas))}]",
                          f"method.validation_taskpool={pools.validation}"]
        if base == name:
            cfg = compose(config, pools, overrides, log_dir=self.log_dir)
            alpha = cfg.method.get(knob) if knob else None
            acc, method = run_program(cfg)
            results = getattr(method, "alpha_grid_results", None)
            if results:
                alpha = results["best"]["alpha"]
            return make_row(name, acc, fine, float(alpha) if isinstance(alpha, (int, float)) else None)
        scores = {}
        for a in self.alphas:
            val, _ = run_program(compose(config, pools, [*overrides, f"method.{knob}={a}"], "validation", self.log_dir))
            scores[a] = sum(val.values()) / len(val)
        finite = [a for a in scores if math.isfinite(scores[a])]  # a NaN would make max() depend on the order
        if not finite:
            raise RuntimeError(f"{name}: the validation task pool {pools.validation} gave no finite average accuracy "
                               f"for any α of {self.alphas} ({list(scores.values())})")
        best = max(finite, key=lambda a: (scores[a], -abs(a - 1.0)))
        acc, _ = run_program(compose(config, pools, [*overrides, f"method.{knob}={best}"], log_dir=self.log_dir))
        return make_row(name, acc, fine, best,
                        validation_avg_accuracy_by_alpha={str(a): 100 * s for a, s in scores.items()})


def run_baselines(pools: Sequence[Pools], methods: Sequence[str], *, alphas: Sequence[float] = ALPHAS,
                  val_alpha: bool = True, log_dir: Path, known: Sequence[dict] = (),
                  say: Callable[[str], None] = lambda line: print(line, flush=True)) -> Tuple[List[dict], List[str]]:
    """Compute the rows of :func:`plan` that ``known`` rows (of the same model pool, or number of tasks for rows
    that do not record their pools) lack, one progress line per row with its time; (the rows, the failures).
    A known ``fine_tuned`` row normalizes the new rows of its pool."""
    sizes = {}
    for p in pools:  # every config name is checked before the first row runs
        sizes[p] = len(compose("dummy", p, log_dir=log_dir).taskpool.test_datasets)
        if p.validation:
            compose("dummy", p, split="validation", log_dir=log_dir)

    def same(row: dict, p: Pools) -> bool:
        """Whether a known row is of pool ``p``: by its recorded model pool, else by its number of tasks."""
        return row["pools"][0] == p.modelpool if row.get("pools") else row["num_tasks"] == sizes[p]

    have = {(p.label, r["method"]) for r in known for p in pools if same(r, p)}
    fine = {p.label: {t: a / 100 for t, a in r["per_task"].items()}
            for r in known if r["method"] == "fine_tuned" for p in pools if same(r, p)}
    todo = plan(pools, methods, val_alpha, known=sorted(have))
    runner = _Runner(alphas, log_dir, fine)
    say(f"{len(todo)} rows to run ({len(have)} already in the given results); each row's output goes to "
        f"{log_dir}/<pool>_<row>.log")
    for p in pools:
        if not p.validation:
            say(f"{p.label}: no validation task pool (--validation-taskpool): no rows with α chosen on validation")
    rows, failures = [], []
    for i, (p, name) in enumerate(todo, 1):
        log_file = log_dir / f"{p.label}_{name}.log"
        start = time.perf_counter()
        try:
            with output_to(log_file):
                try:
                    row = runner.row(p, name)
                except BaseException:
                    traceback.print_exc()
                    raise
        except Exception as error:  # one failed row does not stop the others
            seconds = time.perf_counter() - start
            failures.append(f"{p.label} {name}: {type(error).__name__}: {error}")
            say(f"[{i:>2}/{len(todo)}] {p.label:<14} {name:<28} FAILED after {seconds:.0f} s: "
                f"{type(error).__name__}: {str(error)[:200]} (log: {log_file})")
            continue
        row.update(seconds=time.perf_counter() - start, pools=[p.modelpool, p.taskpool])
        rows.append(row)
        norm = row["normalized_accuracy"]
        alpha = "" if row["alpha"] is None else f"α={row['alpha']:g}"
        say(f"[{i:>2}/{len(todo)}] {p.label:<14} {name:<28} acc {row['avg_accuracy']:5.1f} %  "
            f"norm. {'  –  ' if norm is None else f'{norm:5.1f}'} %  {alpha:<7} {row['seconds']:6.1f} s")
    return rows, failures
