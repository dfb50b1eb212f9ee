"""Per-layer accuracy of the float32 SVD path (FusionBench's numerics) and of our Gram path against a
float64 evaluation of TSV-M, on layers of a pool built by ``benchmarks/performance.py``.

Usage: ``PYTHONPATH=. python benchmarks/layer_accuracy.py --pool /tmp/fbtsv_bench/ViT-B-32-spiky-v2 --num-tasks 20``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fusion_bench_tsv.functional import tsv_merge_matrix
from fusion_bench_tsv.io.safetensors_state import SafetensorsState

KEYS = ["vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision_model.encoder.layers.0.mlp.fc1.weight"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--num-tasks", type=int, default=20)
    parser.add_argument("--keys", nargs="+", default=KEYS)
    args = parser.parse_args()
    base = SafetensorsState(args.pool / "pretrained" / "model.safetensors", "_pretrained_")
    tasks = [SafetensorsState(args.pool / f"task_{i:02d}" / "model.safetensors", f"task_{i:02d}")
             for i in range(args.num_tasks)]
    out = []
    for key in args.keys:
        b = base[key]
        d32 = [t[key] - b for t in tasks]  # float32 subtraction, as FusionBench's state_dict_sub
        d64 = [t[key].double() - b.double() for t in tasks]
        exact = tsv_merge_matrix(d64, method="svd")  # float64 LAPACK SVDs and polar factors
        fb_like = tsv_merge_matrix(d32, method="svd").double()  # float32 full SVDs (FusionBench's numerics)
        gram = tsv_merge_matrix(d64, method="gram").float().double()  # ours, rounded to float32 weights
        s = torch.linalg.svdvals(d64[0])
        k = min(b.shape) // args.num_tasks
        row = dict(key=key, shape=list(b.shape), num_tasks=args.num_tasks, k=k,
                   max_abs_M=exact.abs().max().item(),
                   float32_svd_vs_float64=(fb_like - exact).abs().max().item(),
                   gram_vs_float64=(gram - exact).abs().max().item(),
                   sigma_1=s[0].item(), sigma_k=s[k - 1].item(), sigma_k_gap=(s[k - 1] - s[k]).item())
        print(json.dumps(row), flush=True)
        out.append(row)


if __name__ == "__main__":
    main()
