"""TSV-M on the LoRA pool of the offline tiny-CLIP benchmark (rank-deficient task updates), beside FusionBench.

The pool is ``CLIPVisionModelPool/tiny_clip_8_lora``: 8 tasks as rank-4 LoRA adapters on ``q_proj`` and
``v_proj``, merged with ``merge_and_unload`` by FusionBench's own loader, so each task update of those matrices
has rank ≤ 4 < k = floor(64 / 8) = 8, and every other matrix is unchanged (a zero update). Built by

    fusion-bench-tsv-build --num-tasks 8 && python -m fusion_bench_tsv.benchmark.lora --num-tasks 8

Accuracies: each method through the ``fusion_bench`` CLI on ``taskpool=CLIPVisionModelTaskPool/tiny_clip_8``
(task arithmetic with FusionBench's default scaling 0.3 and with 1.0, FusionBench's TSVM, ours with and without
rank revealing); zero-shot and the LoRA fine-tuned accuracies from the LoRA build's ``build.json``
(normalized accuracy = accuracy / LoRA fine-tuned accuracy, averaged over tasks). Merge wall time: each
merge run in-process on the same pool (loading the 8 LoRA models included), the fastest of ``--repeats``;
ours is also checked bitwise deterministic (two runs, equal merged weights). Components dropped: our
``tsv_merge_ranks.json``. Writes ``benchmarks/results/lora_pool.json`` and ``.md``.

    OMP_NUM_THREADS=1 python benchmarks/lora_pool.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

from fusion_bench_tsv.io.atomic import write_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "lora_pool"
MODELPOOL = "CLIPVisionModelPool/tiny_clip_8_lora"
TASKPOOL = "CLIPVisionModelTaskPool/tiny_clip_8"

#: row name → the CLI's method overrides
METHODS: Dict[str, List[str]] = {
    "task_arithmetic (0.3)": ["method=task_arithmetic"],
    "task_arithmetic (1.0)": ["method=task_arithmetic", "method.scaling_factor=1.0"],
    "fusion_bench_tsvm": ["method=task_singular_vector/TaskSingularVectorMerging"],
    "tsv_merge": ["method=tsv/tsv_merge", "method.show_pbar=false"],
    "tsv_merge (rank_revealing=false)": ["method=tsv/tsv_merge", "method.show_pbar=false", "method.rank_revealing=false"],
}

log = logging.getLogger("lora_pool")


def run_cli(overrides: Sequence[str], workdir: Path, timeout: int = 1800) -> Path:
    """Run ``fusion_bench`` (offline) in ``workdir``; the log dir of the run (holding ``program_report.json``)."""
    exe = Path(sys.executable).parent / "fusion_bench"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [str(exe), *overrides, f"modelpool={MODELPOOL}", f"taskpool={TASKPOOL}"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    reports = sorted(workdir.glob("outputs/**/program_report.json"))
    if len(reports) != 1:
        raise SystemExit(f"{' '.join(cmd)}: expected one program_report.json under {workdir}, found {reports}")
    return reports[0].parent


def accuracies(log_dir: Path) -> Dict[str, float]:
    report = json.loads((log_dir / "program_report.json").read_text())
    return {k: float(v["accuracy"]) for k, v in report.items() if isinstance(v, dict) and "accuracy" in v and k != "average"}


def row(method: str, per_task: Dict[str, float], fine_tuned: Dict[str, float], **extra) -> dict:
    tasks = list(fine_tuned)
    return {
        "method": method,
        "per_task": {t: 100 * per_task[t] for t in tasks},
        "avg_accuracy": 100 * sum(per_task[t] for t in tasks) / len(tasks),
        "normalized_accuracy": 100 * sum(per_task[t] / fine_tuned[t] for t in tasks) / len(tasks),
        **extra,
    }


def lora_pool():
    """The LoRA model pool, instantiated from its committed config (as the CLI does)."""
    from omegaconf import OmegaConf

    from fusion_bench.utils import instantiate

    return instantiate(OmegaConf.load(REPO / "config" / "modelpool" / f"{MODELPOOL}.yaml"))


def merge_times(repeats: int) -> dict:
    """In-process merge wall times (s, the fastest of ``repeats``) of FusionBench's TSVM and ours with and
    without rank revealing, and whether two runs of ours give bitwise equal weights."""
    import torch

    from fusion_bench.method import TaskSingularVectorMerging
    from fusion_bench_tsv import TSVMergeAlgorithm

    makers = {
        "fusion_bench_tsvm": lambda: TaskSingularVectorMerging(alpha=1.0, exclude_keys=None),
        "tsv_merge": lambda: TSVMergeAlgorithm(show_pbar=False),
        "tsv_merge (rank_revealing=false)": lambda: TSVMergeAlgorithm(show_pbar=False, rank_revealing=False),
    }
    times, states = {}, {}
    for name, make in makers.items():
        best = float("inf")
        for r in range(repeats):
            pool = lora_pool()
            start = time.perf_counter()
            model = make().run(pool)
            best = min(best, time.perf_counter() - start)
            states.setdefault(name, []).append({k: v.detach().clone() for k, v in model.state_dict().items()})
        times[name] = best
    runs = states["tsv_merge"]
    if len(runs) < 2:
        runs.append({k: v.detach().clone() for k, v in TSVMergeAlgorithm(show_pbar=False).run(lora_pool()).state_dict().items()})
    bitwise = all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    return {"seconds": times, "tsv_merge_bitwise_deterministic": bitwise}


def markdown(result: dict) -> str:
    rows, tasks = result["rows"], list(result["rows"][0]["per_task"])
    lines = ["| method | " + " | ".join(tasks) + " | avg | norm. |", "|---|" + "---|" * (len(tasks) + 2)]
    for r in rows:
        cells = [f"{r['per_task'][t]:.1f}" for t in tasks]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['avg_accuracy']:.1f} | {r['normalized_accuracy']:.1f} |")
    times = result["merge_seconds"]
    lines += ["", "| merge | wall time (s) |", "|---|---|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in times.items()]
    d = result["tsv_merge_ranks"]
    lines += ["", f"Ours (rank revealing): {d['totals']['kept']} singular triplets kept, {d['totals']['dropped']} dropped "
              f"over {d['totals']['matrices']} matrices and {len(d['tasks'])} tasks:", "",
              "| shape | k | matrices | kept per task | dropped | rank-deficient |", "|---|---|---|---|---|---|"]
    for g in d["by_shape"]:
        span = str(g["kept_min"]) if g["kept_min"] == g["kept_max"] else f"{g['kept_min']}–{g['kept_max']}"
        lines.append(f"| {tuple(g['shape'])} | {g['k']} | {g['matrices']} | {span} | {g['dropped']} | {g['rank_deficient']} |")
    lines += ["", f"Two runs of ours: bitwise equal merged weights: {result['tsv_merge_bitwise_deterministic']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="PREFIX",
                   help="output prefix: writes PREFIX.json and PREFIX.md (default: benchmarks/results/lora_pool)")
    p.add_argument("--repeats", type=int, default=2, help="in-process merges per method for the wall time (default 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fusion_bench_tsv.benchmark.build import suite_dir

    build_file = suite_dir() / "lora" / "build.json"
    if not build_file.is_file():
        raise SystemExit(f"no LoRA pool at {build_file.parent}: run `fusion-bench-tsv-build --num-tasks 8` and "
                         "`python -m fusion_bench_tsv.benchmark.lora --num-tasks 8` first")
    build = json.loads(build_file.read_text())
    lora = {t: v["lora_test"] for t, v in build["tasks"].items()}
    rows = [row("zero_shot", {t: v["zero_shot_test"] for t, v in build["tasks"].items()}, lora),
            row("lora_fine_tuned", lora, lora)]
    ranks = None
    with tempfile.TemporaryDirectory(prefix="lora_pool_") as tmp:
        for i, (name, overrides) in enumerate(METHODS.items()):
            start = time.time()
            workdir = Path(tmp) / str(i)
            workdir.mkdir()
            log_dir = run_cli(overrides, workdir)
            rows.append(row(name, accuracies(log_dir), lora, cli_seconds=time.time() - start))
            log.info("%s: %.2f (%.0f s)", name, rows[-1]["avg_accuracy"], time.time() - start)
            if name == "tsv_merge":
                ranks = json.loads((log_dir / "tsv_merge_ranks.json").read_text())
    timing = merge_times(args.repeats)
    result = {"modelpool": MODELPOOL, "taskpool": TASKPOOL, "lora_settings": build["settings"], "rows": rows,
              "merge_seconds": timing["seconds"],
              "tsv_merge_bitwise_deterministic": timing["tsv_merge_bitwise_deterministic"], "tsv_merge_ranks": ranks}
    write_atomic(args.out.with_suffix(".json"), lambda path: path.write_text(json.dumps(result, indent=1)))
    table = markdown(result)
    write_atomic(args.out.with_suffix(".md"), lambda path: path.write_text(table))
    print(table)


if __name__ == "__main__":
    sys.exit(main())
