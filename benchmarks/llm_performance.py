"""TSV-M on an LLM-shaped pool: wall time and peak RSS, eager vs lazy, each run in its own process.

The pool is made here (nothing is downloaded): a ``Qwen2Config`` shaped like Qwen2.5-0.5B (hidden 896,
intermediate 4864, 24 layers, 14 heads, 2 KV heads, vocab 151936, tied embeddings) with random weights,
and T fine-tunes = base + synthetic low-rank updates (:func:`fusion_bench_tsv.benchmark.synthetic.synthetic_task_state`),
saved with ``save_pretrained`` (sharded safetensors). Each mode then runs in a fresh Python process:

- ``eager``: ``CausalLMPool(enable_lazy_loading=False)``, ``lazy_loading=False``: one fine-tuned model
  loaded at a time (model-outer loop, per-layer factors of all T tasks kept until the end);
- ``lazy``: ``CausalLMPool(enable_lazy_loading=True)``: every checkpoint read tensor by tensor from its
  shards, layer-outer loop (peak: the merged model + one layer × T).

Peak RSS is ``VmHWM`` of that process (after imports it is reported too). Rows (JSON) are appended to
``benchmarks/results/llm_performance.json`` and a markdown table written next to it.

    python benchmarks/llm_performance.py --shape qwen2.5-0.5b --tasks 4 --dtype float32 --work /tmp/llm_pool
    python benchmarks/llm_performance.py --shape tiny --work /tmp/llm_tiny   # a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
from typing import List
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "llm_performance.json"

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=True),
}
TASK_NAMES = ("math", "code", "instruction", "chat", "task5", "task6", "task7", "task8")


def rss_mib() -> float:
    """Peak resident memory of this process (MiB), as ``performance.py`` measures it (``VmHWM``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from performance import peak_rss_mib

    return peak_rss_mib()


def make_pool(work: Path, shape: str, num_tasks: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state

    torch.manual_seed(0)
    config = Qwen2Config(torch_dtype=dtype, **SHAPES[shape])
    base = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).eval()
    paths = {}
    for i, name in enumerate(("_pretrained_",) + TASK_NAMES[:num_tasks]):
        path = work / name
        if not (path / "config.json").is_file():
            if i:
                model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
                model.load_state_dict(synthetic_task_state(base.state_dict(), seed=i, rank=16, scale=0.02))
            else:
                model = base
            model.save_pretrained(path, max_shard_size="1GB")
            del model
        paths[name] = str(path)
    model_bytes = sum(f.stat().st_size for f in Path(paths["_pretrained_"]).glob("*.safetensors"))
    return {"paths": paths, "model_bytes": model_bytes, "params": sum(p.numel() for p in base.parameters())}


def run_mode(paths: dict, mode: str, device: str, svd_method: str) -> dict:
    """One merge in this process; returns wall time and peak RSS."""
    import torch

    from fusion_bench.modelpool import CausalLMPool
    from fusion_bench_tsv import TSVMergeAlgorithm
    from fusion_bench_tsv.io.keys import LLM_EXCLUDE_KEYS

    after_imports = rss_mib()
    lazy = mode == "lazy"
    pool = CausalLMPool(models=paths, tokenizer=None, enable_lazy_loading=lazy)
    algorithm = TSVMergeAlgorithm(show_pbar=False, exclude_keys=list(LLM_EXCLUDE_KEYS), lazy_loading=lazy, device=device,
                                  svd_method=svd_method)
    start = time.perf_counter()
    merged = algorithm.run(pool)
    wall = time.perf_counter() - start
    checksum = float(sum(v.double().sum() for v in merged.state_dict().values()))
    return {"mode": mode, "wall_s": round(wall, 2), "peak_rss_mib": round(rss_mib(), 1),
            "rss_after_imports_mib": round(after_imports, 1), "checksum": checksum,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--work", type=Path, required=True, help="directory for the generated pool")
    parser.add_argument("--modes", nargs="+", default=["eager", "lazy"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--svd-method", default="gram", help="TSVMergeAlgorithm svd_method (the rows in results: gram)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the generated pool")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # a single measured run, in its own process
        print("RESULT " + json.dumps(run_mode(json.loads(args.child), args.modes[0], args.device, args.svd_method)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pool = make_pool(args.work, args.shape, args.tasks, args.dtype)
    print(f"pool ready in {time.perf_counter() - start:.0f} s: {pool['params'] / 1e6:.0f} M parameters, "
          f"{pool['model_bytes'] / 2**20:.0f} MiB per model")
    rows = []
    for mode in args.modes:
        proc = subprocess.run(
            [sys.executable, __file__, "--work", str(args.work), "--modes", mode, "--device", args.device,
             "--svd-method", args.svd_method, "--child", json.dumps(pool["paths"])],
            capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
        row = json.loads(lines[-1][len("RESULT "):])
        row.update(shape=args.shape, tasks=args.tasks, dtype=args.dtype, device=args.device, svd_method=args.svd_method,
                   params=pool["params"], model_mib=round(pool["model_bytes"] / 2**20, 1),
                   peak_rss_over_model=round(row["peak_rss_mib"] / (pool["model_bytes"] / 2**20), 2),
                   merge_rss_over_model=round((row["peak_rss_mib"] - row["rss_after_imports_mib"])
                                              / (pool["model_bytes"] / 2**20), 2),
                   machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                   command=" ".join(["python", "benchmarks/llm_performance.py", "--shape", args.shape, "--tasks",
                                     str(args.tasks), "--dtype", args.dtype, "--svd-method", args.svd_method]))
        print(json.dumps(row))
        rows.append(row)
    if len({r["checksum"] for r in rows}) > 1:
        print("WARNING: eager and lazy merged models differ")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.is_file() else []
    existing.extend(rows)
    from fusion_bench_tsv.io.atomic import write_atomic

    write_atomic(args.out, lambda p: p.write_text(json.dumps(existing, indent=1)))
    header = ("| shape | T | dtype | mode | wall (s) | peak RSS (MiB) | one model (MiB) | peak / model | RSS after imports (MiB) "
              "| (peak − imports) / model | threads |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    table = "".join(
        f"| {r['shape']} | {r['tasks']} | {r['dtype']} | {r['mode']} | {r['wall_s']} | {r['peak_rss_mib']} | "
        f"{r['model_mib']} | {r['peak_rss_over_model']} | {r['rss_after_imports_mib']} | {r['merge_rss_over_model']} | "
        f"{r.get('torch_threads')} |\n" for r in existing
    )
    write_atomic(args.out.with_suffix(".md"), lambda p: p.write_text(header + table))
    print(header + table)
    if args.out == RESULTS:
        add_to_performance_table(rows)


def add_to_performance_table(rows: List[dict]) -> None:
    """Upsert the LLM rows into ``benchmarks/results/performance.{json,md}`` (the issue's common table):
    model ``<shape> (LLM, <dtype>)``, impl ``tsv_merge (eager)`` / ``tsv_merge (lazy)``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from performance import load_rows, save_rows

    new = [
        {"model": f"{r['shape']} (LLM, {r['dtype']})", "num_tasks": r["tasks"], "impl": f"tsv_merge ({r['mode']})",
         "device": f"cpu ({r['machine']}, shared machine)", "wall_s": r["wall_s"],
         "peak_rss_gb": round(r["peak_rss_mib"] / 1024, 3), "rss_after_import_gb": round(r["rss_after_imports_mib"] / 1024, 3),
         "one_model_gb": round(r["model_mib"] / 1024, 3), "svd_method": r.get("svd_method", "gram"),
         "torch_threads": r.get("torch_threads"), "status": "ok", "max_abs_diff": None,
         "update": "see llm_performance.md"}
        for r in rows
    ]
    keys = {(r["model"], r["num_tasks"], r["impl"]) for r in new}
    save_rows([r for r in load_rows() if (r["model"], r["num_tasks"], r["impl"]) not in keys] + new)


if __name__ == "__main__":
    main()
