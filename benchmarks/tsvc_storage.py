"""TSV-C storage for a CLIP ViT-B/32 vision tower at T = 8, 14, 20 tasks (shapes only, nothing downloaded).

The model is ``transformers.CLIPVisionModel`` with ``CLIPVisionConfig()`` defaults, which are those of
``openai/clip-vit-base-patch32`` (hidden 768, intermediate 3072, 12 layers, patch 32, image 224), built on
the ``meta`` device (no memory, no weights). Ranks are the reference's k = floor(min(m, n) / T) (or the
``--fraction`` / ``--rank`` given); the counts come from :func:`fusion_bench_tsv.io.compressed_checkpoint.storage_accounting`,
the function that writes the manifest of a real checkpoint.

    python benchmarks/tsvc_storage.py            # markdown table for T = 8, 14, 20, float32
    python benchmarks/tsvc_storage.py --tasks 8 20 --factor-dtype float16
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import torch


def vit_b32_params() -> Dict[str, tuple]:
    """``key -> (shape, dtype)`` of the floating-point parameters of a CLIP ViT-B/32 vision tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig())
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if torch.is_floating_point(v)}


def storage_rows(
    params: Dict[str, tuple],
    tasks: Sequence[int],
    fraction: Optional[float] = None,
    rank: Optional[int] = None,
    factor_dtype: Optional[torch.dtype] = None,
    exclude_keys: Sequence[str] = ("*text_projection*",),
) -> List[dict]:
    """One storage accounting per T (every task gets the same k per layer)."""
    from fusion_bench_tsv.io.compressed_checkpoint import storage_accounting
    from fusion_bench_tsv.functional import layer_rank
    from fusion_bench_tsv.io.keys import is_excluded

    matrices = [k for k, (shape, _) in params.items() if len(shape) == 2 and not is_excluded(k, exclude_keys)]
    rows = []
    for T in tasks:
        ranks = {k: layer_rank(params[k][0], T, fraction=fraction, rank=rank, name=k) for k in matrices}
        row = storage_accounting(params, [ranks] * T, factor_dtype)
        row["k"] = {str(params[k][0]): v for k, v in ranks.items()}
        rows.append(row)
    return rows


def markdown(rows: List[dict]) -> str:
    mib = 2**20
    lines = [
        "| T | k (768×768 / 768×3072 / 50×768) | stored params | stored MiB | T full task vectors MiB | one model MiB "
        "| stored / T task vectors | stored / one model | matrix factors / one model's matrices |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = r["k"]
        ks = " / ".join(str(k.get(s, "-")) for s in ("(768, 768)", "(3072, 768)", "(50, 768)"))
        lines.append(
            f"| {r['num_tasks']} | {ks} | {r['stored']['params']:,} | {r['stored']['bytes'] / mib:.1f} "
            f"| {r['full_task_vectors']['bytes'] / mib:.1f} | {r['one_model']['bytes'] / mib:.1f} "
            f"| {r['stored_over_full_task_vectors']:.3f} | {r['stored_over_one_model']:.2f} "
            f"| {r['matrix_factors_over_one_model_matrices']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 14, 20])
    parser.add_argument("--fraction", type=float, default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--factor-dtype", default=None, help="e.g. float16 (default: the model's float32)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.factor_dtype) if args.factor_dtype else None
    print(markdown(storage_rows(vit_b32_params(), args.tasks, args.fraction, args.rank, dtype)))


if __name__ == "__main__":
    main()
