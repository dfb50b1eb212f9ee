"""The outputs of the STI analysis: totals over layers, ``sti.json``, ``sti.csv`` and the two figures."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

from torch import Tensor

__all__ = ["CSV_COLUMNS", "VALUE_COLUMNS", "short_layer_names", "summarize", "write_files"]

CSV_COLUMNS = [
    "layer",
    "shape",
    "k",
    "kept",
    "sti_full",
    "sti_full_normalized",
    "sti",
    "sti_normalized",
    "sti_decorrelated",
    "sti_decorrelated_normalized",
    "cosine_mean",
]
"""One row per layer: its name, shape, rank k, the triplets kᵢ each task kept (k, or fewer with rank revealing;
space-separated in the CSV, a list in the JSON), then the measured values (:data:`VALUE_COLUMNS`)."""

VALUE_COLUMNS = CSV_COLUMNS[4:]
"""The measured values of a row, logged per layer."""


def short_layer_names(keys: Sequence[str]) -> List[str]:
    """Drop the dotted prefix shared by all ``keys`` and a trailing ``.weight``, for plot labels."""
    parts = [k.split(".") for k in keys]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    names = [".".join(p[common:]) for p in parts]
    return [n[: -len(".weight")] if n.endswith(".weight") else n for n in names]


def summarize(
    names: List[str], rows: List[dict], pairwise: Tensor, pairwise_normalized: Tensor, rank: Optional[int], full_rank: bool
) -> dict:
    """The results: totals over layers, the per-layer ``rows`` and the T × T pairwise STI.

    Args:
        names: the tasks.
        rows: one dict per layer, with the :data:`CSV_COLUMNS`.
        pairwise: the pairwise STI summed over layers.
        pairwise_normalized: the normalized pairwise STI summed over layers (averaged here).
        rank: the ``rank`` option.
        full_rank: whether the full-rank STI was measured.
    """
    def total(column: str, reduce) -> Optional[float]:
        values = [r[column] for r in rows if r[column] is not None]
        return reduce(values) if values else None

    def mean(values: List[float]) -> float:
        return sum(values) / len(values)

    totals = {
        "sti_full_sum": total("sti_full", sum),
        "sti_sum": total("sti", sum),
        "sti_decorrelated_sum": total("sti_decorrelated", sum),
        "sti_full_normalized_mean": total("sti_full_normalized", mean),
        "sti_normalized_mean": total("sti_normalized", mean),
        "sti_decorrelated_normalized_mean": total("sti_decorrelated_normalized", mean),
        "cosine_mean": total("cosine_mean", mean),
    }
    return {
        "tasks": names,
        "rank": rank,
        "full_rank": full_rank,
        "cosine_of": "full task vectors" if full_rank else "rank-k approximations",
        "norm": "entrywise L1: sum of |(U^T U - I) S (V^T V - I)|; normalized = divided by sum of singular values",
        "totals": {k: v for k, v in totals.items() if v is not None},
        "layers": rows,
        "pairwise": {
            "definition": "entry (i, j): STI at rank k of the two-task concatenation {i, j}, summed over layers; "
            "diagonal 0; normalized: per-layer STI / (||S_i||_1 + ||S_j||_1), averaged over layers",
            "sti_sum": pairwise.tolist(),
            "sti_normalized_mean": (pairwise_normalized / len(rows)).tolist(),
        },
    }


def _csv_cell(value):
    """A CSV cell: empty for None, space-separated for a list (the kept ranks)."""
    if value is None:
        return ""
    return " ".join(map(str, value)) if isinstance(value, list) else value


def write_files(out_dir: Path, results: Mapping) -> None:
    """``sti.json``, ``sti.csv``, ``sti_per_layer.png`` and ``sti_pairwise.png`` of ``results`` into ``out_dir``."""
    from .plots import heatmap, per_layer_bars

    (out_dir / "sti.json").write_text(json.dumps(results, indent=2))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in results["layers"]:
        writer.writerow({c: _csv_cell(row[c]) for c in CSV_COLUMNS})
    (out_dir / "sti.csv").write_text(buffer.getvalue())

    rows = results["layers"]
    series = {}
    if results["full_rank"]:
        series["full rank"] = [r["sti_full_normalized"] for r in rows]
    series["rank k (before TSV-M)"] = [r["sti_normalized"] for r in rows]
    fig = per_layer_bars(
        short_layer_names([r["layer"] for r in rows]),
        series,
        title=f"Singular task interference per layer, T={len(results['tasks'])} tasks",
        ylabel="STI / ||Σ||₁ (linear)",
        lower={"rank k, decorrelated (after TSV-M)": [r["sti_decorrelated_normalized"] for r in rows]},
        lower_ylabel="after TSV-M (log)",
    )
    fig.savefig(out_dir / "sti_per_layer.png", format="png", dpi=120)
    pairwise = [
        [float("nan") if i == j else v for j, v in enumerate(row)]
        for i, row in enumerate(results["pairwise"]["sti_sum"])
    ]
    fig = heatmap(
        pairwise,
        results["tasks"],
        title="Pairwise STI at rank k, summed over layers (diagonal: 0)",
        colorbar_label="STI, not normalized (sum over layers of ‖(UᵀU − I) Σ (VᵀV − I)‖₁)",
    )
    fig.savefig(out_dir / "sti_pairwise.png", format="png", dpi=120)
