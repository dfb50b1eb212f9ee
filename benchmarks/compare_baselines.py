"""TSV-M beside FusionBench's baselines on an offline benchmark suite (8 / 14 / 20 tasks; ``--suite``).

Every row goes through FusionBench's program (``FabricModelFusionProgram``, composed by Hydra in-process
exactly as the ``fusion_bench`` CLI composes it, from ``modelpool=CLIPVisionModelPool/<suite>_<n>`` and
``taskpool=CLIPVisionModelTaskPool/<suite>_<n>``, ``<suite>`` = ``tiny_clip`` or ``small_clip``):

- ``zero_shot``: ``method=dummy`` (the pretrained model); ``fine_tuned``: each fine-tuned model on its own task
  (``method=dummy`` on a one-model pool). Both are measured once on the 20 tasks; the 8/14 suites use the same
  test sets, so their rows are the first 8 / 14 entries.
- ``simple_average``, ``task_arithmetic``, ``ties_merging``, ``fusion_bench_tsvm``
  (``task_singular_vector/TaskSingularVectorMerging``), ``iso_cts`` (``isotropic_merging/iso_cts``) and our
  ``tsv_merge`` (``tsv/tsv_merge``) with FusionBench's default hyper-parameters (TSV-M: α = 1.0);
- ``<method>_val_alpha``: α (``scaling_factor`` / ``alpha``) chosen on the validation splits
  (``taskpool=…/<suite>_<n>_val``) from ``--alphas`` (default 0.1 0.3 0.5 0.7 1.0 1.5 2.0 3.0, a coarse version
  of the authors' 0.1…3.0 grid), then evaluated once on the test splits.
- ``tsv_merge_alpha_grid``: our TSV-M with its built-in grid (``method.alpha_grid`` = ``--alphas``,
  ``method.validation_taskpool=CLIPVisionModelTaskPool/<suite>_<n>_val``): one merge, α chosen inside the run.
- ``tsv_compress``: TSV-C (``method=tsv/tsv_compress``, k = floor(r/T)), routed: task i is evaluated with its
  own compressed model θ₀ + Δ̂ᵢ only (oracle routing, as the paper); not a merge, an upper reference.

``--update`` merges the rows it computes into the existing ``<out>.json`` (replacing rows of the same method
and size) instead of starting anew. Writes ``<out>.json`` (rows: method, num_tasks, avg_accuracy, per_task, normalized_accuracy, alpha),
``<out>.md`` and ``<out>.png``. ``--show N`` prints the stored table for N tasks, optionally beside a fresh
``program_report.json`` (``--report``) and the zero-shot / fine-tuned accuracies of the build it evaluated
(``--build``, default ``$FUSION_BENCH_TSV_DATA/<suite>/build.json``), normalized by that build's fine-tuned
accuracies, which is what ``demo.sh`` does.

    OMP_NUM_THREADS=2 python benchmarks/compare_baselines.py --sizes 8 14 20
    OMP_NUM_THREADS=2 python benchmarks/compare_baselines.py --suite small_clip --sizes 8 14 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

from fusion_bench_tsv.io.atomic import write_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# name in the results → (FusionBench method config, the option that scales the merged update or None)
METHODS: Dict[str, tuple] = {
    "simple_average": ("simple_average", None),
    "task_arithmetic": ("task_arithmetic", "scaling_factor"),
    "ties_merging": ("ties_merging", "scaling_factor"),
    "fusion_bench_tsvm": ("task_singular_vector/TaskSingularVectorMerging", "alpha"),
    "iso_cts": ("isotropic_merging/iso_cts", "scaling_factor"),
    "tsv_merge": ("tsv/tsv_merge", "alpha"),
    "tsv_merge_alpha_grid": ("tsv/tsv_merge", None),
    "tsv_compress": ("tsv/tsv_compress", None),
}
# extra overrides per method: TSV-C's own fine-tuned evaluation is the fine_tuned row already
METHOD_OVERRIDES: Dict[str, List[str]] = {"tsv_compress": ["method.evaluate_finetuned=false"]}
ALPHAS = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
ROW_ORDER = ["zero_shot", "fine_tuned", "simple_average", "task_arithmetic", "task_arithmetic_val_alpha",
             "ties_merging", "ties_merging_val_alpha", "fusion_bench_tsvm", "fusion_bench_tsvm_val_alpha",
             "iso_cts", "iso_cts_val_alpha", "tsv_merge", "tsv_merge_val_alpha", "tsv_merge_alpha_grid",
             "tsv_compress"]
SUITE = "tiny_clip"  # the suite whose configs run_program composes (--suite)

log = logging.getLogger("compare_baselines")


def run_program(method: str, n: int, overrides: Sequence[str] = (), split: str = "test", edit=None) -> Dict[str, float]:
    """Compose and run FusionBench's program in-process; return {task: accuracy}."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from fusion_bench.utils import instantiate
    from fusion_bench.utils.hydra_utils import get_default_config_path

    suffix = "_val" if split == "validation" else ""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(get_default_config_path()), version_base=None):
        cfg = compose("fabric_model_fusion", overrides=[
            f"method={method}", f"modelpool=CLIPVisionModelPool/{SUITE}_{n}",
            f"taskpool=CLIPVisionModelTaskPool/{SUITE}_{n}{suffix}", "print_config=false",
            "print_function_call=false", "report_save_path=null", "fabric.loggers=null",
            # ${hydra:...} is unset outside the CLI's @hydra.main
            f"path.log_dir={REPO / 'outputs' / 'compare_baselines'}", f"path.work_dir={REPO}", *overrides])
    with open_dict(cfg):
        if edit is not None:
            edit(cfg)
        OmegaConf.resolve(cfg)
    program = instantiate(cfg)
    report = program.run()["report"]
    if "tasks" in report and "routing" in report:  # TSV-C's routed report: {"tasks": {task: {...}}, ...}
        report = report["tasks"]
    return {k: float(v["accuracy"]) for k, v in report.items() if isinstance(v, dict) and "accuracy" in v and k != "average"}


def _row(method: str, n: int, per_task: Dict[str, float], fine_tuned: Dict[str, float], alpha=None) -> dict:
    tasks = list(per_task)
    return {
        "method": method,
        "num_tasks": n,
        "avg_accuracy": 100 * sum(per_task.values()) / len(tasks),
        "normalized_accuracy": 100 * sum(per_task[t] / fine_tuned[t] for t in tasks) / len(tasks),
        "alpha": alpha,
        "per_task": {t: 100 * per_task[t] for t in tasks},
    }


def compare(sizes: Sequence[int], alphas: Sequence[float], methods: Sequence[str], val_alpha: bool = True) -> List[dict]:
    from fusion_bench_tsv.benchmark.build import suite_tasks

    TASK_NAMES = suite_tasks(SUITE)
    biggest = max(sizes)
    zero = run_program("dummy", biggest)
    fine: Dict[str, float] = {}
    for task in TASK_NAMES[:biggest]:
        def one_model(cfg, task=task):
            cfg.modelpool.models = {"_pretrained_": cfg.modelpool.models[task]}
            cfg.taskpool.test_datasets = {task: cfg.taskpool.test_datasets[task]}
        fine.update(run_program("dummy", biggest, edit=one_model))
    rows = []
    for n in sizes:
        tasks = TASK_NAMES[:n]
        ft = {t: fine[t] for t in tasks}
        rows.append(_row("zero_shot", n, {t: zero[t] for t in tasks}, ft))
        rows.append(_row("fine_tuned", n, ft, ft))
        for name in methods:
            config, knob = METHODS[name]
            t0 = time.time()
            overrides = METHOD_OVERRIDES.get(name, [])
            if name == "tsv_merge_alpha_grid":
                overrides = [f"method.alpha_grid=[{','.join(map(str, alphas))}]",
                             f"method.validation_taskpool=CLIPVisionModelTaskPool/{SUITE}_{n}_val"]
            rows.append(_row(name, n, run_program(config, n, overrides), ft))
            log.info("%s, %d tasks: %.2f (%.0f s)", name, n, rows[-1]["avg_accuracy"], time.time() - t0)
            if knob is None or not val_alpha:
                continue
            scores = {}
            for a in alphas:
                val = run_program(config, n, [f"method.{knob}={a}"], split="validation")
                scores[a] = sum(val.values()) / len(val)
            best = max(scores, key=lambda a: (scores[a], -abs(a - 1.0)))
            row = _row(f"{name}_val_alpha", n, run_program(config, n, [f"method.{knob}={best}"]), ft, alpha=best)
            row["validation_avg_accuracy_by_alpha"] = {str(a): 100 * s for a, s in scores.items()}
            rows.append(row)
            log.info("%s_val_alpha, %d tasks: α=%s → %.2f", name, n, best, row["avg_accuracy"])
    return rows


def markdown(rows: List[dict], extras: Sequence[dict] = ()) -> str:
    sizes = sorted({r["num_tasks"] for r in rows})
    by = {(r["method"], r["num_tasks"]): r for r in rows}
    methods = [m for m in ROW_ORDER if any((m, n) in by for n in sizes)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    head = "| method | " + " | ".join(f"{n} tasks: acc (norm.)" for n in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for m in methods:
        cells = []
        for n in sizes:
            r = by.get((m, n))
            if r is None:
                cells.append("–")
                continue
            a = f" α={r['alpha']}" if r.get("alpha") is not None else ""
            cells.append(f"{r['avg_accuracy']:.1f} ({r['normalized_accuracy']:.1f}){a}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for extra in extras:
        lines.append(f"| **{extra['method']}** | " + " | ".join(
            f"**{extra['avg_accuracy']:.1f} ({extra['normalized_accuracy']:.1f})**" if n == extra["num_tasks"] else "–"
            for n in sizes) + " |")
    return "\n".join(lines) + "\n"


def this_build_rows(report: Path, build: Path, n: int, label: str) -> List[dict]:
    """The rows of a fresh ``program_report.json`` beside the zero-shot and fine-tuned accuracies of the build it
    evaluated (``build.json``, written by ``fusion-bench-tsv-build``), normalized by that build's fine-tuned
    accuracies: a rebuild with other library versions has other fine-tuned accuracies than the stored table."""
    rep = json.loads(report.read_text())
    acc = {k: v["accuracy"] for k, v in rep.items() if isinstance(v, dict) and "accuracy" in v and k != "average"}
    tasks = json.loads(build.read_text())["tasks"]
    missing = sorted(set(acc) - set(tasks))
    if missing:
        raise SystemExit(f"{build} has no accuracies for {missing}: pass --build with the build.json of the suite "
                         f"that {report} evaluated")
    fine = {t: tasks[t]["fine_tuned_test"] for t in acc}
    return [_row("zero_shot (this build)", n, {t: tasks[t]["zero_shot_test"] for t in acc}, fine),
            _row("fine_tuned (this build)", n, fine, fine),
            _row(label, n, acc, fine)]


def plot(rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for m in [m for m in ROW_ORDER if any(r["method"] == m for r in rows)]:
        pts = sorted((r["num_tasks"], r["avg_accuracy"]) for r in rows if r["method"] == m)
        style = "-" if not m.endswith("_val_alpha") else "--"
        width = 2.5 if m.startswith("tsv") else 1.2
        ax.plot(*zip(*pts), style, marker="o", lw=width, label=m)
    ax.set_xlabel("number of tasks")
    ax.set_ylabel("average test accuracy (%)")
    ax.set_xticks(sorted({r["num_tasks"] for r in rows}))
    ax.set_title(f"Offline {SUITE} benchmark (FusionBench pools)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=120, format="png"))


def main(argv=None) -> None:
    from fusion_bench_tsv.benchmark.build import SUITES, suite_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="tiny_clip", choices=sorted(SUITES),
                   help="the suite (fusion-bench-tsv-build --suite) whose configs <suite>_<n> run (default: tiny_clip)")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 14, 20], metavar="N",
                   help="suite sizes (numbers of tasks) to run (default: 8 14 20)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), metavar="A",
                   help="scaling factors tried on the validation splits for the *_val_alpha rows "
                        f"(default: {' '.join(map(str, ALPHAS))})")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"methods to run, of {', '.join(METHODS)} (default: all)")
    p.add_argument("--no-val-alpha", action="store_true", help="skip the validation sweeps (no *_val_alpha rows)")
    p.add_argument("--update", action="store_true",
                   help="merge the new rows into the existing PREFIX.json (default: start anew)")
    p.add_argument("--out", type=Path, default=None, metavar="PREFIX",
                   help="output prefix: writes PREFIX.json/.md/.png (default: benchmarks/results/<suite>)")
    p.add_argument("--show", type=int, default=None, metavar="N",
                   help="print the stored table (PREFIX.json) of the N-task suite and exit, running nothing")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="with --show: a fusion_bench program_report.json to add as a row")
    p.add_argument("--build", type=Path, default=None, metavar="JSON",
                   help="with --report: the build.json of the evaluated suite, whose fine-tuned accuracies normalize "
                        "the rows (default: the one fusion-bench-tsv-build writes, "
                        "$FUSION_BENCH_TSV_DATA/<suite>/build.json)")
    p.add_argument("--label", default="tsv_merge (this run)",
                   help="with --report: the name of its row (default: 'tsv_merge (this run)')")
    args = p.parse_args(argv)
    global SUITE
    SUITE = args.suite
    args.out = args.out if args.out is not None else RESULTS / args.suite
    if args.build is None:
        args.build = suite_dir(suite=args.suite) / "build.json"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.show is not None:
        rows = [r for r in json.loads(args.out.with_suffix(".json").read_text()) if r["num_tasks"] == args.show]
        extras = []
        if args.report is not None:
            extras = this_build_rows(args.report, args.build, args.show, args.label)
            print(f"bold rows: this run ({args.report}) and the build it evaluated ({args.build}), normalized by "
                  "that build's fine-tuned accuracies; the other rows: the stored table")
        print(markdown(rows, extras))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    rows = compare(args.sizes, args.alphas, args.methods, val_alpha=not args.no_val_alpha)
    if args.update and args.out.with_suffix(".json").is_file():
        new = {(r["method"], r["num_tasks"]) for r in rows}
        old = [r for r in json.loads(args.out.with_suffix(".json").read_text()) if (r["method"], r["num_tasks"]) not in new]
        rows = sorted(old + rows, key=lambda r: (r["num_tasks"], ROW_ORDER.index(r["method"])))
    write_atomic(args.out.with_suffix(".json"), lambda p: p.write_text(json.dumps(rows, indent=1)))
    table = markdown(rows)
    write_atomic(args.out.with_suffix(".md"), lambda p: p.write_text(table))
    plot(rows, args.out.with_suffix(".png"))
    print(table)
    log.info("done in %.0f s", time.time() - t0)


if __name__ == "__main__":
    sys.exit(main())
