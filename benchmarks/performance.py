"""Side-by-side performance of our streaming TSV-M and FusionBench's built-in TSVM on the same pool.

Builds real-shaped CLIP vision towers locally (random pretrained weights; each task update a low-rank
part plus small dense noise, :func:`fusion_bench_tsv.benchmark.synthetic.synthetic_task_state`), saves them as
Hugging Face checkpoints in a cache directory (not in the repository), and merges T = 8, 14, 20 of them
with each implementation in its own process, one process at a time, each under an address-space cap so
that running out of memory gives a row saying so. Measures the wall time of ``algorithm.run(modelpool)``
(loading included: both load the models from the same local pool), the child's peak RSS (``VmHWM`` of
that process: ``ru_maxrss`` would carry the parent's peak through fork/exec), and max |Δ| between the two
merged models. Each implementation runs with its defaults (torch's threads; ours: ``num_workers`` = cores).

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/performance.py --models ViT-B/32 --num-tasks 8 14 20
    PYTHONPATH=. python benchmarks/performance.py --models ViT-L/14 --num-tasks 20 --delete-pool
    PYTHONPATH=. python benchmarks/performance.py --models ViT-B/32 --num-tasks 20 --update spiky

Results are merged into ``benchmarks/results/performance.json`` (rows keyed by model, T, impl, device)
and ``benchmarks/results/performance.md`` is regenerated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from fusion_bench_tsv.io.atomic import write_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_CACHE = Path(os.environ.get("FBTSV_BENCH_CACHE", Path(tempfile.gettempdir()) / "fbtsv_bench"))

#: transformers CLIPVisionConfig arguments of the three towers of the paper's benchmark
MODELS: Dict[str, dict] = {
    "ViT-B/32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=32, image_size=224, projection_dim=512),
    "ViT-B/16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=16, image_size=224, projection_dim=512),
    "ViT-L/14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, image_size=224, projection_dim=768),
}
#: synthetic task updates (:func:`fusion_bench_tsv.benchmark.synthetic.synthetic_task_state`), entries of RMS ~5e-4
#: (the order of CLIP fine-tuning task vectors at lr 1e-5).
#: "decaying" (default): a rank-128 part whose singular values decay as 1/j (90 % of the energy) plus dense
#: noise (10 %): a smooth spectrum, as fine-tuned task matrices have, so top-k is well posed at every k.
#: "spiky" (the first benchmark): 8 equal spikes (entries ~2e-3) on a 1e-4 noise floor; for T >= 8 the
#: top-k cut falls inside the noise bulk, where float32 SVDs disagree with float64 by up to 5e-3.
UPDATES = {
    "decaying": dict(rank=128, decay=1.0, scale=4.7e-4, noise=1.6e-4),
    "spiky": dict(rank=8, scale=2e-3, noise=1e-4),
}
IMPLS = ("tsv_merge", "fusion_bench_tsvm")
#: part of the pool directory's name: bump when build_pool makes different checkpoints (2: every fine-tuned
#: model is the pretrained one plus its own update)
POOL_VERSION = 2



def peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB): ``VmHWM`` (``ru_maxrss`` would carry over the parent's
    peak through ``fork``/``exec``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def slug(model: str) -> str:
    return model.replace("/", "-")


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# ----------------------------------------------------------------------------------------------- pool
def build_pool(model: str, num_tasks: int, cache: Path, update: str = "decaying") -> Path:
    """Pretrained + ``num_tasks`` fine-tuned towers as HF checkpoints under ``cache/<model>``, reused if there."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state

    root = cache / f"{slug(model)}-{update}-v{POOL_VERSION}"
    marker = root / f"complete_T{num_tasks}.json"
    if marker.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = CLIPVisionConfig(**MODELS[model])
    base = CLIPVisionModel(config).eval()
    if not (root / "pretrained" / "model.safetensors").exists():
        base.save_pretrained(root / "pretrained")
    base = CLIPVisionModel.from_pretrained(root / "pretrained")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}  # not the model's own tensors
    for i in range(num_tasks):
        path = root / f"task_{i:02d}"
        if (path / "model.safetensors").exists():
            continue
        t0 = time.perf_counter()
        base.load_state_dict(synthetic_task_state(base_state, seed=1000 * (i + 1), **UPDATES[update]))
        base.save_pretrained(path)
        base.load_state_dict(base_state)
        print(f"[build] {model} task_{i:02d} in {time.perf_counter() - t0:.1f}s", flush=True)
    marker.write_text(json.dumps({"model": model, "num_tasks": num_tasks, "update": UPDATES[update]}))
    return root


# ---------------------------------------------------------------------------------------------- child
def child(args) -> None:
    """Run one implementation on the pool, in this process, and write its measurements."""
    if args.mem_gb:
        cap = int(args.mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch
    from safetensors.torch import save_file

    from fusion_bench.modelpool import CLIPVisionModelPool

    root = Path(args.pool)
    models = {"_pretrained_": str(root / "pretrained")}
    models.update({f"task_{i:02d}": str(root / f"task_{i:02d}") for i in range(args.num_tasks)})
    pool = CLIPVisionModelPool(models=models, processor=None)
    if args.impl == "tsv_merge":
        from fusion_bench_tsv import TSVMergeAlgorithm

        algorithm = TSVMergeAlgorithm(alpha=1.0, show_pbar=False, svd_method=args.svd_method, device=args.device)
    else:
        from fusion_bench.method import TaskSingularVectorMerging

        algorithm = TaskSingularVectorMerging(alpha=1.0)
        if args.device:
            algorithm.fabric  # noqa: B018  (FusionBench uses the Fabric device)
    rss_before = peak_rss_mib() / 1024
    if args.device and args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        merged = algorithm.run(pool)
    if args.device and args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak = peak_rss_mib() / 1024
    profile = {}
    if hasattr(algorithm, "_profiler") and algorithm._profiler is not None:
        profile = {k: round(sum(v), 3) for k, v in algorithm._profiler.recorded_durations.items()}
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in merged.state_dict().items()
             if torch.is_floating_point(v)}
    write_atomic(args.out, lambda tmp: save_file(state, str(tmp)))
    result = dict(wall_s=round(wall, 2), peak_rss_gb=round(peak, 3), rss_after_import_gb=round(rss_before, 3),
                  profile_s=profile, torch_threads=torch.get_num_threads())
    Path(args.result).write_text(json.dumps(result))


def run_child(model: str, pool: Path, num_tasks: int, impl: str, work: Path, args) -> dict:
    out, result, log = (work / f"{impl}_T{num_tasks}.{s}" for s in ("safetensors", "json", "log"))
    for p in (out, result):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "child", "--impl", impl, "--pool", str(pool), "--num-tasks", str(num_tasks),
           "--out", str(out), "--result", str(result), "--mem-gb", str(args.mem_gb), "--svd-method", args.svd_method]
    if args.device:
        cmd += ["--device", args.device]
    print(f"[run] {model} T={num_tasks} {impl} ...", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
    row = dict(model=model, num_tasks=num_tasks, impl=impl, device=device_name(args.device), update=args.update)
    if impl == "tsv_merge" and args.svd_method != "gram":
        row["impl"] = f"tsv_merge (svd_method={args.svd_method})"
    if proc.returncode == 0 and result.exists():
        row.update(json.loads(result.read_text()), status="ok")
        row["merged_path"] = str(out)
    else:
        text = log.read_text(errors="replace")
        oom = is_out_of_memory(text, proc.returncode)
        row.update(wall_s=None, peak_rss_gb=None,
                   status=f"out of memory (address space capped at {args.mem_gb:g} GiB)" if oom else f"error rc={proc.returncode}")
        print(text[-2000:], flush=True)
    print(f"[run] -> {json.dumps({k: v for k, v in row.items() if k != 'merged_path'})}", flush=True)
    return row


def is_out_of_memory(log: str, returncode: int) -> bool:
    """Whether a child died for lack of memory (Python, C++ or mmap under the address-space cap, or SIGKILL)."""
    text = " ".join(log.lower().split())  # rich tracebacks wrap lines
    return (returncode in (-9, 137) or "memoryerror" in text or "out of memory" in text
            or "std::bad_alloc" in text or "cannot allocate memory" in text)


def device_name(device: Optional[str]) -> str:
    if device and device.startswith("cuda"):
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({os.cpu_count()} cores, {cpu_model()}, shared machine)"


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), else the architecture: rows of different machines differ."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def max_abs_diff(path_a: str, path_b: str) -> float:
    from safetensors.torch import load_file

    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys(), "merged models have different keys"
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --------------------------------------------------------------------------------------------- report
def load_rows() -> List[dict]:
    path = RESULTS / "performance.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for r in rows:  # rows of the first benchmark predate the "update" field
        r.setdefault("update", "spiky" if r["model"] in MODELS else "see llm_performance.md")
    return rows


def row_key(r: dict) -> tuple:
    return r["device"], r["update"], r["model"], r["num_tasks"], r["impl"]


def save_rows(rows: List[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    order = {m: i for i, m in enumerate(MODELS)}
    updates = {u: i for i, u in enumerate(UPDATES)}
    rows.sort(key=lambda r: (r["device"], updates.get(r["update"], 9), order.get(r["model"], 9), r["num_tasks"],
                             r["impl"] != "tsv_merge", r["impl"]))
    doc = {"command": "PYTHONPATH=. python benchmarks/performance.py", "updates": UPDATES, "rows": rows}
    write_atomic(RESULTS / "performance.json", lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))
    write_atomic(RESULTS / "performance.md", lambda p: p.write_text(markdown(rows)))


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def markdown(rows: List[dict]) -> str:
    lines = [
        "| model | T | impl | wall (s) | peak RSS (GB) | max abs diff | speed-up | RSS ratio | status | update | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {row_key(r): r for r in rows}
    for r in rows:
        ref = by_key.get(row_key(r)[:-1] + ("fusion_bench_tsvm",))
        speed = ratio = "—"
        if r["impl"] != "fusion_bench_tsvm" and ref and ref.get("wall_s") and r.get("wall_s"):
            speed = f"{ref['wall_s'] / r['wall_s']:.1f}×"
            ratio = f"{ref['peak_rss_gb'] / r['peak_rss_gb']:.1f}×"
        lines.append(
            f"| {r['model']} | {r['num_tasks']} | {r['impl']} | {fmt(r.get('wall_s'), '.1f')} | "
            f"{fmt(r.get('peak_rss_gb'), '.2f')} | {fmt(r.get('max_abs_diff'), '.1e')} | {speed} | {ratio} | "
            f"{r['status']} | {r['update']} | {r['device']} |"
        )
    lines.append("")
    # time against T for ours: least-squares slope
    for (device, update, model) in sorted({(r["device"], r["update"], r["model"]) for r in rows}):
        pts = [(r["num_tasks"], r["wall_s"]) for r in rows if r["impl"] == "tsv_merge" and r.get("wall_s")
               and (r["device"], r["update"], r["model"]) == (device, update, model)]
        if len(pts) >= 2:
            n = len(pts)
            mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
            slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
            icpt = my - slope * mx
            lines.append(f"- {model}, {update} updates, on {device}: tsv_merge wall ≈ {icpt:.1f} s + {slope:.2f} s × T "
                         f"(least squares over T = {', '.join(str(p[0]) for p in pts)}).")
    for r in rows:
        if r.get("note"):
            lines.append(f"- {r['model']}, T = {r['num_tasks']}, {r['impl']} ({r['update']}): {r['note']}.")
    lines.append("")
    lines.append("max abs diff: largest |Δ| over all parameters between the two merged models of the same T.")
    lines.append("update: the synthetic task updates (benchmarks/performance.py UPDATES): " + "; ".join(
        f"{name} = {kwargs}" for name, kwargs in UPDATES.items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    c = sub.add_parser("child")
    c.add_argument("--impl", choices=IMPLS, required=True)
    c.add_argument("--pool", required=True)
    c.add_argument("--num-tasks", type=int, required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--result", required=True)
    c.add_argument("--mem-gb", type=float, default=18.0)
    c.add_argument("--svd-method", default="gram")
    c.add_argument("--device", default=None)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--num-tasks", nargs="+", type=int, default=[8, 14, 20])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--mem-gb", type=float, default=18.0, help="address-space cap of each child (GiB)")
    parser.add_argument("--svd-method", default="gram", help="TSVMergeAlgorithm svd_method for our rows")
    parser.add_argument("--update", default="decaying", choices=list(UPDATES), help="synthetic task updates")
    parser.add_argument("--device", default=None, help="e.g. cuda: the Fabric/compute device for both")
    parser.add_argument("--delete-pool", action="store_true", help="delete each model's pool after its runs")
    parser.add_argument("--dry", action="store_true", help="do not write benchmarks/results")
    args = parser.parse_args(argv)
    if args.cmd == "child":
        return child(args)

    for model in args.models:
        pool = build_pool(model, max(args.num_tasks), args.cache, args.update)
        work = Path(f"{pool}_runs")
        work.mkdir(exist_ok=True)
        for num_tasks in args.num_tasks:
            rows = [run_child(model, pool, num_tasks, impl, work, args) for impl in args.impls]  # back to back
            paths = [r.get("merged_path") for r in rows]
            if len(rows) == 2 and all(paths):
                diff = max_abs_diff(*paths)
                for r in rows:
                    r["max_abs_diff"] = diff
                print(f"[diff] {model} T={num_tasks}: max|Δ| = {diff:.3e}", flush=True)
            previous = {row_key(r): r for r in load_rows()}
            for r in rows:
                if "max_abs_diff" not in r and len(rows) == 1:
                    # only one implementation re-run: keep the diff measured with the earlier pair, and say so
                    old = previous.get(row_key(r), {})
                    r["max_abs_diff"] = old.get("max_abs_diff")
                    if r["max_abs_diff"] is not None:
                        r["note"] = "max_abs_diff from the previous pair run (same numerics); wall/RSS re-measured"
                r.setdefault("max_abs_diff", None)
                r.pop("merged_path", None)
            for p in paths:
                if p:
                    Path(p).unlink(missing_ok=True)
            if not args.dry:
                keys = {row_key(r) for r in rows}
                kept = [r for r in load_rows() if row_key(r) not in keys]
                save_rows(kept + rows)
        if args.delete_pool:
            shutil.rmtree(pool, ignore_errors=True)


if __name__ == "__main__":
    main()
