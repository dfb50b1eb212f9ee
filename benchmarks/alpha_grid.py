"""TSV-M's built-in α grid against running the CLI once per α, on the offline tiny-CLIP benchmark.

- grid: one ``fusion_bench`` run, ``method.alpha_grid=[...]`` with ``method.validation_taskpool=
  CLIPVisionModelTaskPool/tiny_clip_<n>_val``: M merged once, θ₀ + α·M evaluated on the validation splits per
  α, the best α's model evaluated on the test splits (``taskpool=…/tiny_clip_<n>``);
- per-α CLI: one ``fusion_bench`` run per α with ``method.alpha=<α> taskpool=…/tiny_clip_<n>_val`` (a merge and a
  validation pass each), as a user without the option would do, then (not timed) nothing more: the sum of
  their wall times is what choosing α costs that way, before one more run for the test evaluation.

Both sides are wall times of whole CLI processes (start-up, loading, merge, evaluation). Writes
``benchmarks/results/alpha_grid.{json,md,png}`` (the png is the grid run's own ``alpha_grid.png``) and checks
the chosen α against ``tsv_merge_val_alpha`` of ``benchmarks/results/tiny_clip.json``.

    OMP_NUM_THREADS=2 python benchmarks/alpha_grid.py --num-tasks 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

from fusion_bench_tsv.io.atomic import write_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ALPHAS = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)


def fusion_bench(args: Sequence[str], cwd: Path) -> tuple[float, Path]:
    """Run the ``fusion_bench`` CLI; its wall time and its log directory (the one holding ``config.yaml``)."""
    exe = Path(sys.executable).parent / "fusion_bench"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([str(exe), *args, "method.show_pbar=false"], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"fusion_bench {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    reports = sorted(cwd.glob("outputs/**/report.json"), key=lambda p: p.stat().st_mtime)
    return seconds, reports[-1].parent


def average_accuracy(report_path: Path) -> tuple[float, Dict[str, float]]:
    report = json.loads(report_path.read_text())
    per_task = {k: v["accuracy"] for k, v in report.items() if isinstance(v, dict) and "accuracy" in v and k != "average"}
    return report["average"]["accuracy"], per_task


def same_build(rows: List[dict], num_tasks: int) -> bool:
    """Whether the cached build's fine-tuned test accuracies are those of ``tiny_clip.json`` (trained weights
    differ across torch builds, and with them every accuracy)."""
    data = Path(os.environ.get("FUSION_BENCH_TSV_DATA", Path.home() / ".cache" / "fusion_bench_tsv"))
    build = json.loads((data / "tiny_clip" / "build.json").read_text())["tasks"]
    stored = [r for r in rows if r["method"] == "fine_tuned" and r["num_tasks"] == num_tasks][0]["per_task"]
    return all(abs(100 * build[t]["fine_tuned_test"] - acc) < 0.01 for t, acc in stored.items())


def run(num_tasks: int, alphas: Sequence[float], work: Path) -> dict:
    pools = [f"modelpool=CLIPVisionModelPool/tiny_clip_{num_tasks}", "method=tsv/tsv_merge"]
    grid = "[" + ",".join(f"{a:g}" for a in alphas) + "]"
    grid_command = [*pools, f"taskpool=CLIPVisionModelTaskPool/tiny_clip_{num_tasks}", f"method.alpha_grid={grid}",
                    f"method.validation_taskpool=CLIPVisionModelTaskPool/tiny_clip_{num_tasks}_val"]
    (work / "grid").mkdir()
    grid_seconds, grid_dir = fusion_bench(grid_command, work / "grid")
    curve = json.loads((grid_dir / "alpha_grid" / "alpha_grid.json").read_text())
    test_accuracy, test_per_task = average_accuracy(grid_dir / "report.json")
    per_alpha: List[dict] = []
    for alpha in alphas:
        cwd = work / f"alpha_{alpha:g}"
        cwd.mkdir()
        seconds, log_dir = fusion_bench([*pools, f"taskpool=CLIPVisionModelTaskPool/tiny_clip_{num_tasks}_val",
                                         f"method.alpha={alpha:g}"], cwd)
        accuracy, _ = average_accuracy(log_dir / "report.json")
        per_alpha.append({"alpha": alpha, "seconds": seconds, "validation_accuracy": accuracy})
    rows = json.loads((RESULTS / "tiny_clip.json").read_text())
    stored = [r for r in rows if r["method"] == "tsv_merge_val_alpha" and r["num_tasks"] == num_tasks]
    return {
        "num_tasks": num_tasks,
        "grid_command": "fusion_bench " + " ".join(grid_command),
        "grid_seconds": grid_seconds,
        "per_alpha_cli_seconds": sum(r["seconds"] for r in per_alpha),
        "best_alpha": curve["best"]["alpha"],
        "best_validation_accuracy": curve["best"]["accuracy"],
        "test_accuracy_at_best": test_accuracy,
        "test_per_task_at_best": test_per_task,
        "curve": [{"alpha": p["alpha"], "validation_accuracy": p["accuracy"]} for p in curve["curve"]],
        "per_alpha_cli": per_alpha,
        "max_curve_difference": max(abs(p["accuracy"] - r["validation_accuracy"])
                                    for p, r in zip(curve["curve"], per_alpha)),
        "tiny_clip_json": {"alpha": stored[0]["alpha"], "avg_accuracy": stored[0]["avg_accuracy"]} if stored else None,
        "same_build_as_tiny_clip_json": same_build(rows, num_tasks),
        "png": (grid_dir / "alpha_grid" / "alpha_grid.png").read_bytes(),
    }


def markdown(result: dict) -> str:
    lines = [
        f"# TSV-M alpha grid, tiny CLIP, {result['num_tasks']} tasks", "",
        f"`{result['grid_command']}`", "",
        "| alpha | validation acc. % (grid run) | validation acc. % (CLI per alpha) | CLI run time s |",
        "|---|---|---|---|",
    ]
    for point, single in zip(result["curve"], result["per_alpha_cli"]):
        lines.append(f"| {point['alpha']:g} | {100 * point['validation_accuracy']:.2f} | "
                     f"{100 * single['validation_accuracy']:.2f} | {single['seconds']:.1f} |")
    stored = result["tiny_clip_json"]
    lines += [
        "",
        f"Best alpha {result['best_alpha']:g} (validation {100 * result['best_validation_accuracy']:.2f} %), "
        f"test accuracy {100 * result['test_accuracy_at_best']:.2f} %"
        + (f"; tiny_clip.json's tsv_merge_val_alpha: alpha {stored['alpha']:g}, {stored['avg_accuracy']:.2f} % "
           f"({'the same' if result['same_build_as_tiny_clip_json'] else 'another'} build of the benchmark)."
           if stored else "."),
        f"Time: one grid run (merge, {len(result['curve'])} validation passes, test evaluation) "
        f"{result['grid_seconds']:.1f} s; one CLI run per alpha (merge + validation each) "
        f"{result['per_alpha_cli_seconds']:.1f} s in all.", "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-tasks", type=int, default=8, choices=(8, 14, 20))
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--out", type=Path, default=RESULTS / "alpha_grid", help="writes <out>.json, .md, .png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = run(args.num_tasks, args.alphas, Path(work))
    png = result.pop("png")
    write_atomic(args.out.with_suffix(".json"), lambda p: p.write_text(json.dumps(result, indent=1) + "\n"))
    write_atomic(args.out.with_suffix(".md"), lambda p: p.write_text(markdown(result)))
    write_atomic(args.out.with_suffix(".png"), lambda p: p.write_bytes(png))
    print(markdown(result))


if __name__ == "__main__":
    main()
