"""What a TSV-M of one CLIP vision tower costs, kernel by kernel, on one thread: the floor under its wall time.

For the matrix shapes of a tower (ViT-B/32 by default: per block 4 attention 768 × 768 and the MLP's 3072 × 768 and
768 × 3072) and T tasks, times on one thread, with the synthetic ``decaying`` updates of ``benchmarks/performance.py``:

- per task and matrix (``truncated_svd(method="gram")``): the float64 Gram matrix and ``dsyevr`` for its top k;
- per matrix (``tsv_merge_factors``): the orthogonalization, two Tk × Tk Gram matrices and their full ``dsyevr``,
  and the products that assemble M;
- FusionBench's kernels on the same matrices: a float32 ``torch.linalg.svd`` per task, and the two SVDs of the
  concatenated U and V.

- the CPU's floor under those kernels (``primitives``): float64 matrix products at n = 768 (GFLOP/s), a full
  768 × 768 symmetric eigendecomposition (``dsyevr`` as the merge calls it, ``torch.linalg.eigh``) and its
  tridiagonalization alone (``dsytrd``), and the two polar factors of a 768 × 768 side (the Gram whitening the
  merge uses, and a float64 SVD).

CPU-seconds per tower = Σ over the tower's matrices. Our kernels are also timed two at a time on the worker
pool of a merge (``LayerExecutor(2)``, one BLAS thread each): each runs ``slowdown`` times slower than alone, so on
2 cores our wall time cannot be below Σ (kernel seconds × its slowdown) / 2.
Writes ``benchmarks/results/merge_kernels.{json,md}``::

    PYTHONPATH=. python benchmarks/merge_kernels.py --num-tasks 8 14 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import List, Optional

import torch

from fusion_bench_tsv.benchmark.synthetic import synthetic_task_state
from fusion_bench_tsv.functional import truncated_svd, tsv_merge_factors
from fusion_bench_tsv.functional.svd import concat_factors, eigh_top, gram
from fusion_bench_tsv.io.atomic import write_atomic
from fusion_bench_tsv.runtime.parallel import LayerExecutor, single_thread
from performance import UPDATES, device_name

RESULTS = Path(__file__).resolve().parent / "results"
#: per block of a tower: (shape, count); ViT-B/32 and B/16 have 12 blocks of width 768 and MLP 3072
TOWERS = {"ViT-B/32": (12, [((768, 768), 4), ((3072, 768), 1), ((768, 3072), 1)])}


def decaying_updates(shape, num_tasks: int, seed: int) -> List[torch.Tensor]:
    """T updates of one matrix: the ``decaying`` synthetic task updates of the performance pools."""
    zero = {"w": torch.zeros(shape)}
    return [synthetic_task_state(zero, seed=seed + i, **UPDATES["decaying"])["w"] for i in range(num_tasks)]


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def side_by_side(fn, alone: float, workers: int = 2) -> float:
    """How many times slower each of ``workers`` concurrent runs of ``fn`` on a merge's worker pool is than
    one run alone, which took ``alone`` seconds (1.0: the workers scale perfectly)."""

    def together():
        with LayerExecutor(workers) as pool:
            for future in [pool.submit(fn) for _ in range(workers)]:
                future.result()

    return best_of(together) / alone


def measure(shape, num_tasks: int, seed: int) -> dict:
    k = min(shape) // num_tasks
    deltas = decaying_updates(shape, num_tasks, seed)
    task_times = [best_of(lambda d=d: truncated_svd(d.double(), k, "gram")) for d in deltas]
    task_slowdown = side_by_side(lambda: truncated_svd(deltas[0].double(), k, "gram"), task_times[0])
    factors = [truncated_svd(d.double(), k, "gram") for d in deltas]
    merge = lambda: tsv_merge_factors(factors, "gram")  # noqa: E731
    ours_merge = best_of(merge)
    merge_slowdown = side_by_side(merge, ours_merge)
    fb_task = best_of(lambda: torch.linalg.svd(deltas[0], full_matrices=False), 2)
    u, _, vh = concat_factors([truncated_svd(d, k, "svd") for d in deltas])
    fb_merge = best_of(lambda: (torch.linalg.svd(u, full_matrices=False), torch.linalg.svd(vh, full_matrices=False)), 2)
    return {"shape": list(shape), "k": k, "ours_per_task_s": sum(task_times) / num_tasks, "ours_merge_s": ours_merge,
            "ours_per_task_slowdown_2_workers": task_slowdown, "ours_merge_slowdown_2_workers": merge_slowdown,
            "fusion_bench_per_task_s": fb_task, "fusion_bench_merge_s": fb_merge}


def primitives(n: int = 768) -> dict:
    """One-thread seconds (and GEMM GFLOP/s) of the LAPACK/BLAS kernels under TSV-M at width ``n``."""
    from scipy.linalg.lapack import dsytrd

    a = decaying_updates((n, n), 1, seed=7)[0].double()
    g = gram(a)
    gemm = best_of(lambda: a @ a, 5)
    return {"n": n, "gemm_gflops": 2 * n**3 / gemm / 1e9, "gemm_s": gemm,
            "eigh_dsyevr_s": best_of(lambda: eigh_top(g)), "eigh_torch_s": best_of(lambda: torch.linalg.eigh(g)),
            "tridiagonalization_s": best_of(lambda: dsytrd(g.numpy())),
            "polar_whitening_s": best_of(lambda: eigh_top(gram(a))),
            "polar_svd_s": best_of(lambda: torch.linalg.svd(a, full_matrices=False))}


def tower_totals(rows, blocks: int, layout, num_tasks: int) -> dict:
    by_shape = {tuple(r["shape"]): r for r in rows}

    def total(field: str, slowdown: Optional[str] = None) -> float:
        """Σ over the tower's matrices of ``field`` (times ``slowdown``, if named)."""
        return blocks * sum(count * by_shape[shape][field] * (by_shape[shape][slowdown] if slowdown else 1)
                            for shape, count in layout)

    out = {}
    for impl in ("ours", "fusion_bench"):
        task, merge = total(f"{impl}_per_task_s") * num_tasks, total(f"{impl}_merge_s")
        out[impl] = {"per_task_cpu_s": task, "orthogonalization_cpu_s": merge, "total_cpu_s": task + merge}
    out["ours"]["wall_floor_2_workers_s"] = (
        total("ours_per_task_s", "ours_per_task_slowdown_2_workers") * num_tasks
        + total("ours_merge_s", "ours_merge_slowdown_2_workers")) / 2
    return out


def markdown(doc: dict) -> str:
    lines = ["# TSV-M kernels on one thread: the CPU-seconds of one tower", "",
             f"Made by `benchmarks/merge_kernels.py` ({doc['tower']}, decaying updates, best of repeats, one thread, "
             f"{doc['machine']}).", "",
             "| T | k (768-wide) | ours: per-task top-k (CPU-s) | ours: orthogonalization (CPU-s) | ours: total | "
             "ours: wall floor on 2 workers (s) | FusionBench: per-task SVDs | FusionBench: orthogonalization | "
             "FusionBench: total |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        o, f = r["tower"]["ours"], r["tower"]["fusion_bench"]
        lines.append(f"| {r['num_tasks']} | {r['matrices'][0]['k']} | {o['per_task_cpu_s']:.1f} | "
                     f"{o['orthogonalization_cpu_s']:.1f} | {o['total_cpu_s']:.1f} | {o['wall_floor_2_workers_s']:.1f} | "
                     f"{f['per_task_cpu_s']:.1f} | {f['orthogonalization_cpu_s']:.1f} | {f['total_cpu_s']:.1f} |")
    lines += ["", "Per matrix (seconds, one thread):", "",
              "| T | shape | k | ours: one task's top-k | ours: orthogonalization | FusionBench: one task's SVD | "
              "FusionBench: SVDs of U and V | ours: slowdown on 2 workers (top-k / orthogonalization) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        for mrow in r["matrices"]:
            lines.append(f"| {r['num_tasks']} | {mrow['shape'][0]}×{mrow['shape'][1]} | {mrow['k']} | "
                         f"{mrow['ours_per_task_s']:.3f} | {mrow['ours_merge_s']:.3f} | "
                         f"{mrow['fusion_bench_per_task_s']:.3f} | {mrow['fusion_bench_merge_s']:.3f} | "
                         f"{mrow['ours_per_task_slowdown_2_workers']:.2f} / {mrow['ours_merge_slowdown_2_workers']:.2f} |")
    p = doc["primitives"]
    lines += ["", f"The CPU's floor (one thread, n = {p['n']}): a float64 matrix product {p['gemm_s']:.3f} s "
              f"({p['gemm_gflops']:.1f} GFLOP/s); a full symmetric eigendecomposition {p['eigh_dsyevr_s']:.3f} s "
              f"(`dsyevr`), {p['eigh_torch_s']:.3f} s (`torch.linalg.eigh`), of which the tridiagonalization "
              f"(`dsytrd`) {p['tridiagonalization_s']:.3f} s; the polar factor of one side: Gram matrix and "
              f"`dsyevr` {p['polar_whitening_s']:.3f} s, float64 SVD {p['polar_svd_s']:.3f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-tasks", type=int, nargs="+", default=[8, 14, 20])
    parser.add_argument("--out", type=Path, default=RESULTS / "merge_kernels")
    args = parser.parse_args()
    tower = "ViT-B/32"
    blocks, layout = TOWERS[tower]
    rows = []
    with single_thread():  # torch's and SciPy's BLAS
        for t in args.num_tasks:
            matrices = [measure(shape, t, seed=1000 * j) for j, (shape, _) in enumerate(layout)]
            rows.append({"num_tasks": t, "matrices": matrices, "tower": tower_totals(matrices, blocks, layout, t)})
            print(json.dumps(rows[-1]["tower"]), flush=True)
        doc = {"command": "PYTHONPATH=. python benchmarks/merge_kernels.py --num-tasks "
               + " ".join(map(str, args.num_tasks)), "tower": tower, "machine": device_name(None), "rows": rows,
               "primitives": primitives()}
    write_atomic(args.out.with_suffix(".json"), lambda p: p.write_text(json.dumps(doc, indent=1)))
    write_atomic(args.out.with_suffix(".md"), lambda p: p.write_text(markdown(doc)))
    print(markdown(doc))


if __name__ == "__main__":
    main()
