"""Thread and memory bounds on the CPU: TSV-C and STI with busy cores, and STI's peak memory against T.

``busy``: every core is kept busy by a ``yes > /dev/null`` process (started and killed here), then TSV-C's
truncated SVDs and STI's interference step run on the 8-task tiny CLIP pool (hidden 64, as in the tests),
each in its own process with torch's default threads: "before" with the small-work bound off
(``fusion_bench_tsv.runtime.parallel.SMALL_WORK_NUMEL = 0``: every op on torch's default threads, TSV-C's code path
before the bound), "after" with it. Times are the algorithms' own profile entries.

``sti-memory``: STI with ``full_rank: true`` on an in-memory pool of T one-matrix models (``hidden × hidden``,
synthetic task updates), each T in its own process; peak RSS is that process's ``VmHWM`` (baseline: its RSS
after imports and building the pool).

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/cpu_bounds.py                      # both parts
    PYTHONPATH=. python benchmarks/cpu_bounds.py --part sti-memory --num-tasks 8 50 100 --hidden 256

Results: ``benchmarks/results/cpu_bounds.json`` (the rows of the last run of each part) and ``cpu_bounds.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from fusion_bench_tsv.io.atomic import write_atomic
from fusion_bench_tsv.runtime.parallel import available_cores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from performance import peak_rss_mib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TASKS = [f"task_{i}" for i in range(8)]
#: thread-count variables removed from a child's environment, so that it runs with torch's default threads
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def rss_mib() -> float:
    """Current resident memory of this process (MiB), ``VmRSS``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------- children
def child_busy(pool_dir: Path, bound: bool) -> dict:
    """TSV-C's and STI's times on the tiny CLIP pool, with or without the small-work thread bound."""
    import torch
    from fusion_bench.modelpool import CLIPVisionModelPool

    import fusion_bench_tsv.runtime.parallel as parallel
    from fusion_bench_tsv import STIAnalysis, TSVCompressAlgorithm

    if not bound:
        parallel.SMALL_WORK_NUMEL = 0
    models = {"_pretrained_": str(pool_dir / "pretrained"), **{t: str(pool_dir / "models" / t) for t in TASKS}}
    pool = CLIPVisionModelPool(models=models, processor=str(pool_dir / "pretrained"))
    tsvc = TSVCompressAlgorithm(device="cpu", show_pbar=False)
    start = time.perf_counter()
    _, tasks, _ = tsvc.compress(pool)
    tsvc_wall = time.perf_counter() - start
    sti = STIAnalysis(device="cpu", show_pbar=False)
    start = time.perf_counter()
    sti.run(pool)
    sti_wall = time.perf_counter() - start
    return {
        "torch_threads": torch.get_num_threads(),
        "svds": sum(len(t.factors) for t in tasks),
        "tsvc_svd_s": sum(tsvc.profiler.recorded_durations["truncated svd"]),
        "tsvc_compress_s": tsvc_wall,
        "sti_interference_s": sum(sti.profiler.recorded_durations["interference"]),
        "sti_run_s": sti_wall,
    }


def child_sti_memory(num_tasks: int, hidden: int, max_memory_gb: float) -> dict:
    """Peak RSS of a full-rank STI analysis of ``num_tasks`` one-matrix models."""
    import torch
    from torch import nn

    from fusion_bench_tsv import STIAnalysis
    from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state

    torch.manual_seed(0)
    base = nn.Linear(hidden, hidden, bias=False)
    pool = {"_pretrained_": base}
    for i in range(num_tasks):
        model = nn.Linear(hidden, hidden, bias=False)
        model.load_state_dict(synthetic_task_state(base.state_dict(), seed=i + 1, rank=16, scale=0.02))
        pool[f"task_{i}"] = model
    baseline = rss_mib()
    algorithm = STIAnalysis(device="cpu", show_pbar=False, full_rank=True, max_memory_gb=max_memory_gb)
    start = time.perf_counter()
    algorithm.run(pool)
    return {
        "seconds": time.perf_counter() - start,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak_rss_mib(),
        "sti_full": algorithm.results["layers"][0]["sti_full"],
    }


def run_child(args: List[str], threads_default: bool) -> dict:
    """Run this script as a child and return the JSON it prints last."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads_default:
        for name in THREAD_VARIABLES:
            env.pop(name, None)
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- parts
def build_tiny_pool(root: Path) -> None:
    """The tests' tiny CLIP (hidden 64) and 8 synthetic fine-tuned vision towers."""
    from fusion_bench_tsv.benchmark.synthetic import write_clip_pool
    from fusion_bench_tsv.benchmark.tiny_clip import make_tiny_clip, save_clip

    save_clip(make_tiny_clip(seed=0), root / "pretrained")
    write_clip_pool(root / "models", root / "pretrained", TASKS, seed=1)


def part_busy() -> List[dict]:
    cores = available_cores()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fbtsv_cpu_bounds_") as tmp:
        build_tiny_pool(Path(tmp))
        hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(cores)]
        try:
            for label, bound in (("before (no bound: torch's default threads)", False), ("after (bounded_threads)", True)):
                row = run_child(["busy", tmp, str(int(bound))], threads_default=True)
                rows.append({"part": "busy", "mode": label, "busy_processes": cores, **row})
                print(json.dumps(rows[-1]))
        finally:
            for hog in hogs:
                hog.kill()
            for hog in hogs:
                hog.wait()
    return rows


def part_sti_memory(num_tasks: List[int], hidden: int, max_memory_gb: float) -> List[dict]:
    rows = []
    for T in num_tasks:
        row = run_child(["sti-memory", str(T), str(hidden), str(max_memory_gb)], threads_default=True)
        rows.append({"part": "sti-memory", "num_tasks": T, "hidden": hidden, "max_memory_gb": max_memory_gb, **row})
        print(json.dumps(rows[-1]))
    return rows


# ------------------------------------------------------------------------------------------- output
def markdown(data: Dict[str, dict]) -> str:
    lines = ["# CPU thread and memory bounds", "", "Made by `benchmarks/cpu_bounds.py`; machine: "
             f"{data['machine']['cores']} cores, {data['machine']['processor']}.", ""]
    busy = data.get("busy")
    if busy:
        lines += [
            f"## TSV-C and STI with every core busy ({busy['rows'][0]['busy_processes']} `yes` processes)", "",
            f"Tiny CLIP pool (hidden 64), 8 tasks; torch's default threads ({busy['rows'][0]['torch_threads']}); "
            f"run {busy['date']}.", "",
            "| mode | TSV-C truncated SVDs (count) | TSV-C compress | STI interference step | STI run |",
            "|---|---|---|---|---|",
        ]
        for r in busy["rows"]:
            lines.append(f"| {r['mode']} | {r['tsvc_svd_s']:.3f} s ({r['svds']}) | {r['tsvc_compress_s']:.2f} s | "
                         f"{r['sti_interference_s']:.3f} s | {r['sti_run_s']:.2f} s |")
        lines.append("")
    mem = data.get("sti-memory")
    if mem:
        r0 = mem["rows"][0]
        lines += [
            "## STI peak memory against T (`full_rank: true`)", "",
            f"One {r0['hidden']} × {r0['hidden']} matrix per model, `max_memory_gb: {r0['max_memory_gb']}`, "
            f"run {mem['date']}; peak = the child's VmHWM, baseline = its RSS after imports and building the pool.", "",
            "| T | peak RSS | baseline | peak − baseline | time |", "|---|---|---|---|---|",
        ]
        for r in mem["rows"]:
            lines.append(f"| {r['num_tasks']} | {r['peak_rss_mib']:.0f} MiB | {r['baseline_rss_mib']:.0f} MiB | "
                         f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f} MiB | {r['seconds']:.1f} s |")
        lines.append("")
    return "\n".join(lines)


def save(part: str, rows: List[dict]) -> None:
    path = RESULTS / "cpu_bounds.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["machine"] = {"cores": available_cores(), "processor": platform.processor() or platform.machine()}
    data[part] = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=1) + "\n"))
    write_atomic(RESULTS / "cpu_bounds.md", lambda p: p.write_text(markdown(data)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["busy", "sti-memory", "all"], default="all")
    parser.add_argument("--num-tasks", type=int, nargs="+", default=[8, 50, 100])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--max-memory-gb", type=float, default=4.0)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "busy":
            print(json.dumps(child_busy(Path(rest[0]), bool(int(rest[1])))))
        else:
            print(json.dumps(child_sti_memory(int(rest[0]), int(rest[1]), float(rest[2]))))
        return
    if args.part in ("busy", "all"):
        save("busy", part_busy())
    if args.part in ("sti-memory", "all"):
        save("sti-memory", part_sti_memory(args.num_tasks, args.hidden, args.max_memory_gb))


if __name__ == "__main__":
    main()
